"""Plugin discovery, registries and hookspecs (CONVENTIONS §2, §3, §15)."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from memobench import hookspecs, registry
from memobench.api import Attack, Detector, MetricInfo, MetricValue, Metric, Mitigation, ModelPlugin, Prompt, \
    PromptSet, param
from memobench.hookspecs import hookimpl

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "plugins.md"
ALL_KINDS = {"model", "prompt_set", "mitigation", "attack", "metric", "detector"}
BROKEN_MODULE = "memobench_nonexistent_module_xyz"


# ------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def plugin(name: str, **hooks):
    """Register an in-process test plugin implementing ``hooks`` (name -> function); always unregistered."""
    obj = SimpleNamespace(**{h: hookimpl(f) for h, f in hooks.items()})
    try:
        yield registry.register_object(obj, name)
    finally:
        registry.unregister_object(name)


def registering(*classes):
    def hook(register):
        for c in classes:
            register(c)
    return hook


def _origin_of(cls) -> str:
    return f"{inspect.getsourcefile(cls)}:{inspect.getsourcelines(cls)[1]}"


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    """A directory that, on the path, holds a distribution ``brokenplug`` whose entry point cannot be imported."""
    site = tmp_path_factory.mktemp("broken-site")
    info = site / "brokenplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[memobench]\nbroken = {BROKEN_MODULE}\n")
    return site


def _broken_env(site: Path, **extra) -> dict:
    pp = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": pp, "MEMOBENCH_LOAD_PLUGINS": "memobench,brokenplug", **extra}


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------- listing
def test_plugins_json_lists_every_builtin(cli):
    res = cli(["plugins", "--json"])
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    items = data["plugins"]
    assert {p["kind"] for p in items} == ALL_KINDS
    for p in items:
        for field in ("name", "kind", "version", "origin"):
            assert isinstance(p[field], str) and p[field], (field, p)
        file, _, line = p["origin"].rpartition(":")
        assert Path(file).is_file() and line.isdigit(), p
        assert p["dist"] == "memobench", p
    listed = {(p["kind"], p["name"]) for p in items}
    reg = registry.build_registry()  # what this process registers from the same entry points
    assert listed == {(e.kind, e.name) for e in reg.all_entries()}
    assert {("model", "tiny"), ("prompt_set", "tiny-vm"), ("mitigation", "none"), ("attack", "none"),
            ("attack", "prompt")} <= listed
    assert data["failed"] == []
    assert {d["name"] for d in data["distributions"]} >= {"baseline", "tiny"}


# ------------------------------------------------------------------------------------------------- broken plugins
def test_broken_entry_point_is_reported_not_fatal(cli, broken_site):
    env = _broken_env(broken_site)
    res = cli(["--help"], env=env)
    assert res.returncode == 0, res.stderr
    assert "run" in res.stdout and "plugins" in res.stdout
    warn = _lines(res.stderr)
    assert len(warn) == 1 and warn[0].startswith("warning: plugin broken (brokenplug 0.1) failed to load: "), warn
    assert BROKEN_MODULE in warn[0]

    res = cli(["plugins", "--json"], env=env)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    (failed,) = data["failed"]
    assert (failed["name"], failed["dist"], failed["version"]) == ("broken", "brokenplug", "0.1")
    assert "ModuleNotFoundError" in failed["error"] and BROKEN_MODULE in failed["error"]
    assert {("mitigation", "none"), ("model", "tiny")} <= {(p["kind"], p["name"]) for p in data["plugins"]}


def test_broken_entry_point_does_not_stop_a_run(broken_site, monkeypatch, tmp_path, tiny_args, cli_inproc):
    monkeypatch.syspath_prepend(str(broken_site))
    monkeypatch.setenv("MEMOBENCH_LOAD_PLUGINS", "memobench,brokenplug")
    try:
        reg = registry.get_registry(reload=True)
        assert [f["name"] for f in reg.failures] == ["broken"]
        rc, _, err = cli_inproc(tiny_args(tmp_path / "cache", tmp_path / "out", "--limit", "1", "--seeds", "0-1",
                                          "--steps", "2", "--no-progress"))
        assert rc == 0, err
        assert len(list((tmp_path / "out").rglob("*.json"))) == 1
    finally:
        registry._REGISTRY = None  # rebuilt without the broken distribution by the next caller


def test_strict_plugins_makes_a_broken_entry_point_fatal(cli, broken_site):
    res = cli(["plugins", "--json"], env=_broken_env(broken_site, MEMOBENCH_STRICT_PLUGINS="1"))
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert res.stdout == ""
    errors = [line for line in _lines(res.stderr) if line.startswith("error:")]
    assert len(errors) == 1 and "plugin broken failed to load" in errors[0] and BROKEN_MODULE in errors[0]


# ------------------------------------------------------------------------------------------------- switches
def test_load_plugins_filter_matches_distribution_or_entry_point_names(monkeypatch):
    monkeypatch.setenv("MEMOBENCH_LOAD_PLUGINS", "")
    assert registry.build_registry().all_entries() == []
    monkeypatch.setenv("MEMOBENCH_LOAD_PLUGINS", "baseline")  # an entry-point name
    assert {(e.kind, e.name) for e in registry.build_registry().all_entries()} == {
        ("mitigation", "none"), ("attack", "none"), ("attack", "prompt")}
    monkeypatch.setenv("MEMOBENCH_LOAD_PLUGINS", " MemoBench ")  # a distribution name, not normalised by the user
    assert "tiny" in registry.build_registry().names("model")
    monkeypatch.setenv("MEMOBENCH_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert registry.build_registry().all_entries() == []


def test_plugins_dir_registers_one_off_files_and_tolerates_broken_ones(tmp_path, monkeypatch):
    (tmp_path / "one_off.py").write_text(
        "from dataclasses import dataclass\n"
        "from memobench.api import Mitigation\n"
        "from memobench.hookspecs import hookimpl\n\n"
        "class OneOff(Mitigation):\n"
        "    '''A one-off mitigation.'''\n"
        "    name = 'undo-one-off'\n"
        "    version = '3'\n"
        "    kind = 'inference'\n\n"
        "@hookimpl\n"
        "def register_mitigations(register):\n"
        "    register(OneOff)\n")
    (tmp_path / "zz_broken.py").write_text("raise RuntimeError('broken one-off plugin')\n")
    monkeypatch.setenv("MEMOBENCH_DISABLE_PLUGIN_AUTOLOAD", "1")
    for reg in (registry.build_registry(plugins_dir=tmp_path), _with_env(monkeypatch, tmp_path)):
        e = reg.entry("mitigation", "undo-one-off")
        assert (e.version, e.plugin, e.dist) == ("3", str(tmp_path / "one_off.py"), None)
        assert [f["error"] for f in reg.failures] == ["RuntimeError: broken one-off plugin"]


def test_plugins_dir_on_the_command_line_loads_once(tmp_path, cli_inproc):
    (tmp_path / "broken.py").write_text("raise RuntimeError('broken one-off plugin')\n")
    try:
        rc, out, err = cli_inproc(["--plugins-dir", tmp_path, "plugins", "--json"])
    finally:
        registry._REGISTRY = None  # built with the directory: rebuilt without it by the next caller
    assert rc == 0
    assert err == f"warning: plugin file {tmp_path / 'broken.py'} failed to load: RuntimeError: broken one-off plugin\n"
    assert [f["name"] for f in json.loads(out)["failed"]] == [str(tmp_path / "broken.py")]


def _with_env(monkeypatch, d: Path):
    monkeypatch.setenv("MEMOBENCH_PLUGINS_DIR", str(d))
    return registry.build_registry()


def test_trace_plugins_prints_hook_calls(monkeypatch, capsys):
    monkeypatch.setenv("MEMOBENCH_LOAD_PLUGINS", "baseline")
    monkeypatch.setenv("MEMOBENCH_TRACE_PLUGINS", "1")
    registry.build_registry()
    err = capsys.readouterr().err
    assert "[memobench hook] register_mitigations(register) -> baseline" in err
    assert "baseline registered mitigation 'none'" in err
    monkeypatch.setenv("MEMOBENCH_TRACE_PLUGINS", "0")
    registry.build_registry()
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------- names
def test_unknown_name_suggests_and_lists():
    reg = registry.get_registry()
    with pytest.raises(KeyError) as ei:  # UnknownPluginError is a KeyError
        reg.get("mitigation", "nonee")
    assert isinstance(ei.value, registry.UnknownPluginError)
    msg = str(ei.value)
    assert msg.startswith("Unknown mitigation 'nonee'. Did you mean: none")
    assert msg.endswith(f"? Available: {', '.join(reg.names('mitigation'))}")
    with pytest.raises(registry.UnknownPluginError) as ei:
        reg.get("prompt_set", "tiny-vn")
    msg = str(ei.value)
    assert msg.startswith("Unknown prompt set 'tiny-vn'. Did you mean: tiny-vm")
    assert msg.endswith(f"? Available: {', '.join(reg.names('prompt_set'))}") and "tiny-heldout" in msg
    with pytest.raises(registry.UnknownPluginError) as ei:
        reg.get("attack", "zzzzzz")
    assert str(ei.value) == f"Unknown attack 'zzzzzz'. Available: {', '.join(reg.names('attack'))}"


def test_unknown_name_on_the_command_line(cli_inproc):
    rc, out, err = cli_inproc(["run", "--attack", "promt"])
    assert rc == 2 and out == ""
    assert err.startswith("error: Unknown attack 'promt'. Did you mean: prompt")
    assert err.endswith(f"? Available: {', '.join(registry.get_registry().names('attack'))}\n")
    assert err.count("\n") == 1


class DupMitigation(Mitigation):
    """Claims the built-in's name."""

    name = "none"
    version = "0"


def test_duplicate_name_is_an_error_naming_both_origins():
    reg = registry.get_registry()
    builtin = reg.entry("mitigation", "none")
    with pytest.raises(registry.PluginError) as ei:
        with plugin("undo-dup", register_mitigations=registering(DupMitigation)):
            pass
    msg = str(ei.value)
    assert "duplicate mitigation name 'none'" in msg
    assert _origin_of(DupMitigation) in msg and "(plugin undo-dup)" in msg
    assert builtin.origin in msg and "(plugin baseline)" in msg
    assert re.search(r"plugins/baseline/__init__\.py:\d+", msg)
    # rolled back: the built-in still wins, the test plugin is gone, and unregistering forgot its failure
    assert reg.entry("mitigation", "none") is builtin
    assert reg.pm.get_plugin("undo-dup") is None
    assert not any(f["name"] == "undo-dup" for f in reg.failures)


def test_invalid_names_are_rejected():
    for bad in ("", " padded", "a/b"):
        cls = type("Bad", (Mitigation,), {"name": bad, "version": "0", "__module__": __name__})
        with pytest.raises(registry.PluginError, match="invalid name"):
            with plugin("undo-bad", register_mitigations=registering(cls)):
                pass


# ------------------------------------------------------------------------------------------------- hookspecs
def _hookspec_names() -> list[str]:
    return sorted(n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, "memobench_spec"))


def test_every_hookspec_is_documented_and_tested():
    names = _hookspec_names()
    reg = registry.get_registry()
    assert names == sorted(n for n in dir(reg.pm.hook) if not n.startswith("_"))
    docs = DOCS.read_text()
    for n in names:
        assert (getattr(hookspecs, n).__doc__ or "").strip(), f"hookspec {n} has no docstring"
        assert re.search(rf"^#+ .*`{n}\b", docs, re.M), f"docs/plugins.md has no heading for {n}"
        assert callable(globals().get(f"test_hook_{n}")), f"no test_hook_{n} in {__file__}"


@dataclass
class _NoParams:
    pass


class UndoModel(ModelPlugin):
    """A test model plugin."""

    name = "undo-model"
    version = "7"

    @dataclass
    class Params:
        path: str = "nowhere"


class UndoPrompts(PromptSet):
    """A test prompt set."""

    name = "undo-prompts"
    version = "2"
    Params = _NoParams

    def prompts(self, ctx):
        return [Prompt("p0", "a red square"), Prompt("p1", "a blue circle")]


class UndoMitigation(Mitigation):
    """A test mitigation."""

    name = "undo-mitigation"
    version = "5"
    kind = "inference"

    @dataclass
    class Params:
        strength: float = 0.5


class UndoAttack(Attack):
    """A test attack."""

    name = "undo-attack"
    version = "4"
    Params = _NoParams


class UndoMetric(Metric):
    """Counts the samples it is given (a test metric)."""

    name = "undo-metric"
    version = "1"
    info = MetricInfo("undo-metric", "Undo count", higher_is_better=True, min=0.0)
    Params = _NoParams

    def compute(self, samples, ctx):
        return {"undo-metric": MetricValue(float(len(samples)), len(samples), impl={"name": "count"},
                                           per_sample={s.sample_key: 1.0 for s in samples})}


class UndoDetector(Detector):
    """Scores a prompt by its length (a test detector)."""

    name = "undo-detector"
    version = "1"
    statistic = "prompt length"

    @dataclass
    class Params:
        scale: float = param(1.0, "factor on the prompt length")

    def score(self, model, text):
        return {"score": self.params.scale * len(text)}


def _check_registered(reg, kind: str, cls, cli_inproc) -> None:
    e = reg.entry(kind, cls.name)
    assert e.cls is cls and (e.plugin, e.dist, e.version) == (f"undo-{kind}", None, cls.version)
    assert e.origin == _origin_of(cls)
    rc, out, _ = cli_inproc(["plugins", "--json"])
    assert rc == 0
    assert {"name": cls.name, "kind": kind, "version": cls.version, "plugin": f"undo-{kind}", "dist": None,
            "origin": e.origin} in json.loads(out)["plugins"]


def test_hook_register_models(cli_inproc):
    with plugin("undo-model", register_models=registering(UndoModel)) as reg:
        _check_registered(reg, "model", UndoModel, cli_inproc)
        rc, out, _ = cli_inproc(["ls", "models"])
        assert rc == 0 and "undo-model" in out and "path='nowhere'" in out
    assert "undo-model" not in registry.get_registry().names("model")


def test_hook_register_prompt_sets(cli_inproc):
    with plugin("undo-prompt_set", register_prompt_sets=registering(UndoPrompts)) as reg:
        _check_registered(reg, "prompt_set", UndoPrompts, cli_inproc)
        assert [p.text for p in reg.get("prompt_set", "undo-prompts")().prompts(None)][0] == "a red square"
    assert "undo-prompts" not in registry.get_registry().names("prompt_set")


def test_hook_register_mitigations(cli_inproc):
    with plugin("undo-mitigation", register_mitigations=registering(UndoMitigation)) as reg:
        _check_registered(reg, "mitigation", UndoMitigation, cli_inproc)
        cls = reg.get("mitigation", "undo-mitigation")
        assert cls.make_params({"strength": "2"}).strength == 2.0
        rc, out, _ = cli_inproc(["ls", "mitigations"])
        assert rc == 0 and "strength=0.5" in out
    assert "undo-mitigation" not in registry.get_registry().names("mitigation")


def test_hook_register_attacks(cli_inproc):
    with plugin("undo-attack", register_attacks=lambda register: register(UndoAttack, aliases=("undo-alias",))) \
            as reg:
        _check_registered(reg, "attack", UndoAttack, cli_inproc)
        assert reg.get("attack", "undo-alias") is UndoAttack
    assert not {"undo-attack", "undo-alias"} & set(registry.get_registry().names("attack"))


def test_hook_register_metrics(cli_inproc, tiny_args, tmp_path):
    """Registered, listed, and computed by a real run on the tiny random pipeline."""
    with plugin("undo-metric", register_metrics=registering(UndoMetric)) as reg:
        _check_registered(reg, "metric", UndoMetric, cli_inproc)
        out = tmp_path / "out"
        rc, _, err = cli_inproc(tiny_args(tmp_path / "cache", out, "--limit", "1", "--seeds", "0-1", "--steps", "2",
                                          "--metric", "undo-metric", "--no-progress"))
        assert rc == 0, err
        (path,) = out.rglob("*.json")
        rec = json.loads(path.read_text())["metrics"]["undo-metric"]
        assert (rec["value"], rec["n"], rec["metric_plugin"]["name"]) == (2.0, 2, "undo-metric")
    assert "undo-metric" not in registry.get_registry().names("metric")


def test_hook_register_detectors(cli_inproc, monkeypatch):
    """Registered, listed with its parameter's description, and found by the detect plugin's lookup."""
    from memobench_plugins.detect.bench import detector_names, make_detector

    monkeypatch.setenv("COLUMNS", "400")  # one table row per line

    with plugin("undo-detector", register_detectors=registering(UndoDetector)) as reg:
        _check_registered(reg, "detector", UndoDetector, cli_inproc)
        rc, out, _ = cli_inproc(["ls", "detectors"])
        assert rc == 0 and "undo-detector" in out and "factor on the prompt length" in out
        assert "undo-detector" in detector_names(reg)
        det = make_detector("undo-detector", {"scale": "2"}, registry=reg)
        assert det.score(None, "abc") == {"score": 6.0}
        assert det.identity()["name"] == "detect-undo-detector"
    assert "undo-detector" not in registry.get_registry().names("detector")


def test_hook_register_commands(cli_inproc):
    import typer

    from memobench import cli as cli_mod

    def register_commands(app):
        @app.command("undo-hello")
        def hello(who: str = typer.Option("world", "--who")):
            """Say hello (a test command)."""
            typer.echo(f"hello {who}")

    try:
        with plugin("undo-commands", register_commands=register_commands):
            rc, out, err = cli_inproc(["undo-hello", "--who", "plugins"])
            assert (rc, out, err) == (0, "hello plugins\n", "")
            rc, out, _ = cli_inproc(["--help"])
            assert rc == 0 and "undo-hello" in out
    finally:
        cli_mod.app.registered_commands[:] = [c for c in cli_mod.app.registered_commands if c.name != "undo-hello"]
        cli_mod._State.commands_added.discard("undo-commands")
