"""Issue 26: input validation and error classes (defects 1, 3, 4, 5, 6, 7 and the `-rs` half of 12).

* non-finite floats: every float option and plugin parameter must be finite; result JSON is strict JSON;
* a UTF-8 byte-order mark is stripped from .txt, .csv and .jsonl prompt files alike;
* registration checks the class (kind, ``Params``); only memobench's own bad-input errors are exit 2, any other
  exception is one ``error: internal error: …`` line with exit 1 (the traceback with ``MEMOBENCH_DEBUG=1``);
* a prompt file's ``reference`` must be an image, checked before any generation;
* the seed cap holds for the whole ``--seeds`` spec; ``--device`` names a device this torch offers.

Each test failed on the code before the fix. Error cases: exit code 2 and exactly one line ``error: …`` naming the
input (the same rule as tests/test_bad_input.py).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from memobench import registry
from memobench.api import Attack, Metric, MetricInfo, Mitigation, PromptSet
from memobench.config import BadInput
from memobench.hookspecs import hookimpl

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(rc: int, out: str, err: str, needles: list[str], code: int = 2) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == code, f"exit code {rc}; stderr: {err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    assert out == "", out
    return lines[0]


def _run(tmp_path: Path, *args) -> list[str]:
    """``memobench run --dry-run`` on the embedded model: plans the run (plugins, prompts) and generates nothing, so
    an input that validation misses exits 0 here instead of failing later."""
    return ["run", "--dry-run", "-o", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), *args]


def _strict_loads(text: str):
    def refuse(token):
        raise AssertionError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=refuse)


# ================================================================================ 1. non-finite floats
@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "Infinity"])
def test_guidance_must_be_finite(value, tmp_path, cli_inproc):
    _one_error_line(*cli_inproc(_run(tmp_path, "--guidance", value)), ["--guidance", "finite"])


def test_guidance_from_a_config_file_must_be_finite(tmp_path, cli_inproc):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"guidance_scale": NaN}')  # Python's json reads NaN
    _one_error_line(*cli_inproc(_run(tmp_path, "--config", cfg)), ["guidance", "finite", "nan"])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_plugin_float_parameter_must_be_finite(value, tmp_path, cli_inproc):
    _one_error_line(*cli_inproc(_run(tmp_path, "--attack", "dori", "--attack-param", f"lr={value}")),
                    ["attack 'dori' parameter lr", "finite"])


def test_plugin_float_parameter_from_a_config_file_must_be_finite(tmp_path, cli_inproc):
    cfg = tmp_path / "c.json"
    cfg.write_text('{"attack": "dori", "attack_params": {"lr": Infinity}}')
    _one_error_line(*cli_inproc(_run(tmp_path, "--config", cfg)), ["attack 'dori' parameter lr", "finite"])


def test_make_params_refuses_non_finite_floats_in_scalars_and_tuples():
    reg = registry.get_registry()
    dori = reg.get("attack", "dori")
    for v in (float("nan"), "inf", np.float32("nan")):
        with pytest.raises(BadInput, match="parameter lr: must be a finite number"):
            dori.make_params({"lr": v})
    nemo = reg.get("mitigation", "nemo")
    with pytest.raises(BadInput, match="parameter msssim_betas"):
        nemo.make_params({"msssim_betas": "0.5,inf,0.2"})
    assert dori.make_params({"lr": "0.05"}).lr == 0.05  # finite values still pass


def test_locality_guidance_must_be_finite():
    from memobench_plugins.locality.analysis import LocalityParams

    for g in (math.inf, math.nan):
        with pytest.raises(ValueError, match="--guidance"):
            LocalityParams(guidance_scale=g)


def test_zoo_recipe_value_must_be_finite(tmp_path, cli_inproc):
    work = tmp_path / "zoo"
    _one_error_line(*cli_inproc(["zoo", "train", "tiny", "--smoke", "--work-dir", work, "--recipe-param",
                                 "vae_lr=NaN"]), ["--recipe-param vae_lr", "finite"])
    assert not (work / "recipe.json").exists()


# ------------------------------------------------------------------------------ strict result JSON
PLUGIN_FILE = '''
from dataclasses import dataclass

from memobench.api import Metric, MetricInfo, MetricValue, PromptSet
from memobench.hookspecs import hookimpl


class Boom(PromptSet):
    """A prompt set with a bug: prompts() raises a plain ValueError."""

    name = "issue26-boom"

    def prompts(self, ctx):
        raise ValueError("issue26 internal boom")


class NonFinite(Metric):
    """A metric whose value is NaN and whose per-sample values are +inf."""

    name = "issue26-nonfinite"
    info = MetricInfo("issue26-nonfinite", "non-finite test metric", higher_is_better=False)

    def compute(self, samples, ctx):
        return {"issue26-nonfinite": MetricValue(value=float("nan"), n=len(samples), impl={"name": "test"},
                                                 per_sample={s.sample_key: float("inf") for s in samples})}


@hookimpl
def register_prompt_sets(register):
    register(Boom)


@hookimpl
def register_metrics(register):
    register(NonFinite)
'''


@pytest.fixture
def plugin_dir(tmp_path):
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "issue26_plugin.py").write_text(PLUGIN_FILE)
    try:
        yield d
    finally:
        registry._REGISTRY = None  # built with the directory: rebuilt without it by the next caller


def test_result_and_samples_files_are_strict_json(plugin_dir, tmp_path, tiny_args, cli_inproc):
    out = tmp_path / "out"
    args = tiny_args(tmp_path / "cache", out, "--limit", "1", "--seeds", "0", "--steps", "2", "--metric",
                     "issue26-nonfinite", "--no-progress")
    rc, _, err = cli_inproc(["--plugins-dir", plugin_dir, *args])
    assert rc == 0, err
    (result_path,) = [p for p in out.rglob("*.json")]
    result = _strict_loads(result_path.read_text())
    rec = result["metrics"]["issue26-nonfinite"]
    assert rec["value"] is None and rec["non_finite"] == "NaN"
    assert result["non_finite_values"]["/metrics/issue26-nonfinite/value"] == "NaN"
    rows = [_strict_loads(line) for line in (result_path.parent / result["samples_file"]).read_text().splitlines()]
    assert rows and all(r["issue26-nonfinite"] is None for r in rows)
    assert all(r["non_finite_values"] == {"/issue26-nonfinite": "+inf"} for r in rows)


def test_dumps_strict_records_every_replacement():
    from memobench.config import dumps_strict

    obj = {"a": {"value": float("-inf"), "n": 2}, "b": [1.0, (float("nan"), 2)], "c~/d": np.float64("inf"),
           "non_finite_values": {"/old": "NaN"}}
    text = dumps_strict(obj, sort_keys=True)
    back = _strict_loads(text)
    assert back["a"] == {"value": None, "n": 2, "non_finite": "-inf"}
    assert back["b"] == [1.0, [None, 2]] and back["c~/d"] is None
    assert back["non_finite_values"] == {"/old": "NaN", "/a/value": "-inf", "/b/1/0": "NaN", "/c~0~1d": "+inf"}
    assert obj == back  # the caller's object is what was written
    assert dumps_strict({"x": 0.5}) == '{"x": 0.5}'  # nothing recorded when everything is finite


# ================================================================================ 3. byte-order mark
BOM = "\ufeff"


@pytest.mark.parametrize("suffix, body", [
    (".txt", "a red square\na blue circle\n"),
    (".csv", "prompt,mem_type\na red square,VM\na blue circle,\n"),
    (".jsonl", '{"prompt": "a red square"}\n{"prompt": "a blue circle"}\n'),
])
def test_utf8_bom_is_stripped_from_every_prompt_file_format(suffix, body, tmp_path):
    from memobench.prompts import read_prompt_file

    plain, bom = tmp_path / f"plain{suffix}", tmp_path / f"bom{suffix}"
    plain.write_text(body, encoding="utf-8")
    bom.write_bytes((BOM + body).encode("utf-8"))
    got = read_prompt_file(bom)
    assert [p.text for p in got] == ["a red square", "a blue circle"]
    assert [(p.id, p.text, p.sha256) for p in got] == [(p.id, p.text, p.sha256) for p in read_prompt_file(plain)]


# ================================================================================ 4. registration and error classes
@dataclass
class _P:
    x: float = 1.0


class _NotAPlugin:
    """Registered as a mitigation, but derives from nothing of memobench."""

    name = "issue26-not-a-plugin"
    Params = _P


class _AMetric(Metric):
    """A metric registered under the mitigation hook."""

    name = "issue26-a-metric"
    info = MetricInfo("issue26-a-metric", "m", higher_is_better=True)


class _ParamsNotDataclass(Attack):
    """Its Params is a plain class."""

    name = "issue26-params-plain"

    class Params:
        x = 1


class _ParamsMissing(PromptSet):
    name = "issue26-params-none"
    Params = None


@pytest.mark.parametrize("hook, cls, needles", [
    ("register_mitigations", _NotAPlugin, ["_NotAPlugin as a mitigation", "memobench.api.Mitigation"]),
    ("register_mitigations", _AMetric, ["_AMetric as a mitigation", "memobench.api.Mitigation"]),
    ("register_mitigations", lambda: None, ["as a mitigation", "not a class"]),
    ("register_attacks", _ParamsNotDataclass, ["_ParamsNotDataclass as an attack", "'Params' is not a dataclass"]),
    ("register_prompt_sets", _ParamsMissing, ["as a prompt set", "'Params' is not a dataclass"]),
])
def test_registration_checks_kind_and_params(hook, cls, needles):
    def reg(register):
        register(cls)

    obj = SimpleNamespace(**{hook: hookimpl(reg)})
    try:
        with pytest.raises(registry.PluginError) as e:
            registry.register_object(obj, "issue26-bad-plugin")
    finally:
        registry.unregister_object("issue26-bad-plugin")
    msg = str(e.value)
    assert "\n" not in msg and "plugin issue26-bad-plugin" in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    assert all(getattr(x, "__name__", "") != getattr(cls, "__name__", "?")
               for k in registry.KINDS for x in (v.cls for v in registry.get_registry().entries[k].values()))


def test_a_valid_class_still_registers():
    class Fine(Mitigation):
        """OK."""

        name = "issue26-fine"

    obj = SimpleNamespace(register_mitigations=hookimpl(lambda register: register(Fine)))
    try:
        reg = registry.register_object(obj, "issue26-fine-plugin")
        assert reg.get("mitigation", "issue26-fine") is Fine
    finally:
        registry.unregister_object("issue26-fine-plugin")


def test_bad_input_is_exported_to_plugins():
    """Plugins raise memobench.api.BadInput (a ValueError, so `except ValueError` around a plugin still works)."""
    from memobench import api

    assert api.BadInput is BadInput and "BadInput" in api.__all__ and issubclass(BadInput, ValueError)


def test_an_internal_value_error_is_not_bad_input(plugin_dir, tmp_path, cli_inproc, monkeypatch):
    """A plain ValueError from a plugin: one line naming the plugin, its hook and the exception, exit 1 (not 2)."""
    monkeypatch.delenv("MEMOBENCH_DEBUG", raising=False)
    line = _one_error_line(*cli_inproc(["--plugins-dir", plugin_dir, *_run(tmp_path, "--prompts", "issue26-boom")]),
                           ["prompt set 'issue26-boom' failed in prompts()", "ValueError", "issue26 internal boom",
                            "not of your input", "MEMOBENCH_DEBUG=1"], code=1)
    assert not line.startswith("error: issue26")


def test_memobench_debug_shows_the_traceback(plugin_dir, tmp_path, cli):
    res = cli(["--plugins-dir", str(plugin_dir), *_run(tmp_path, "--prompts", "issue26-boom")],
              env={"MEMOBENCH_DEBUG": "1"})
    assert res.returncode == 1, res.stderr
    assert "Traceback (most recent call last)" in res.stderr and "ValueError: issue26 internal boom" in res.stderr


def test_a_plugin_bad_input_outside_its_params_stays_exit_2(tmp_path, cli_inproc):
    """sd-random checks `arch` in __init__, hub model 'sd' its `path` in load(): both BadInput (exit 2)."""
    from memobench_plugins.sd_random import build_pipeline

    with pytest.raises(BadInput, match="parameter arch"):
        build_pipeline("nosuch")
    from memobench.api import Context

    sd = registry.get_registry().get("model", "sd")
    with pytest.raises(BadInput, match="needs --model-param path="):
        sd(sd.make_params({})).load(Context(cache_dir=tmp_path))


# ================================================================================ 5. reference that is not an image
def _csv_with_reference(tmp_path: Path, ref: str) -> Path:
    f = tmp_path / "with_ref.csv"
    f.write_text(f"id,prompt,mem_type,reference\nm0,a red square,VM,{ref}\n")
    return f


def test_reference_that_is_not_an_image_fails_before_generation(tmp_path, cli_inproc):
    (tmp_path / "notes.png").write_text("this is text, not a PNG\n")
    f = _csv_with_reference(tmp_path, "notes.png")
    line = _one_error_line(*cli_inproc(_run(tmp_path, "--prompts", f)),
                           ["--prompts", "with_ref.csv line 2", "'notes.png'", "not a readable image"])
    assert "(" in line


def test_reference_that_does_not_exist_is_named(tmp_path, cli_inproc):
    f = _csv_with_reference(tmp_path, "missing/photo.png")
    _one_error_line(*cli_inproc(_run(tmp_path, "--prompts", f)),
                    ["with_ref.csv line 2", "'missing/photo.png'", "not found"])


def test_reference_checks_in_jsonl_and_a_good_reference_passes(tmp_path):
    from PIL import Image

    from memobench.prompts import read_prompt_file

    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "reference": "ok.png"}\n{"prompt": "b", "reference": "bad.jpg"}\n')
    with pytest.raises(BadInput, match=re.escape(f"{f} line 2: reference 'bad.jpg'")):
        read_prompt_file(f)
    f.write_text('{"prompt": "a", "reference": "ok.png"}\n{"prompt": "b"}\n')
    assert [p.reference_ids for p in read_prompt_file(f)] == [("ok.png",), ()]


# ================================================================================ 6. seed cap over the whole spec
def test_seed_cap_counts_all_ranges(tmp_path, cli_inproc):
    from memobench.config import parse_seeds

    with pytest.raises(BadInput, match="at most 100,000"):
        parse_seeds("0-100000,100001-200001,200002-300002")
    with pytest.raises(BadInput, match="at most"):
        parse_seeds(",".join(f"{i * 60_000}-{i * 60_000 + 59_999}" for i in range(2)))
    assert len(parse_seeds("0-99999")) == 100_000  # the cap itself is allowed
    _one_error_line(*cli_inproc(_run(tmp_path, "--seeds", "0-60000,60001-120000")), ["--seeds", "at most 100,000"])


# ================================================================================ 7. devices torch offers
def test_mps_is_refused_where_torch_has_no_mps(tmp_path, cli_inproc):
    import torch

    if torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    _one_error_line(*cli_inproc(_run(tmp_path, "--device", "mps")), ["--device mps", "not available", "--device cpu"])


def test_cuda_index_beyond_the_devices_is_refused(tmp_path, cli_inproc):
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    _one_error_line(*cli_inproc(_run(tmp_path, "--device", f"cuda:{n}")), [f"--device cuda:{n}"])
    from memobench.config import check_device

    assert check_device("cpu") == "cpu"
    for bad in ("tpu", "cuda:x", "CPU", "", None):
        with pytest.raises(BadInput, match="--device"):
            check_device(bad)
    if n:
        assert check_device(f"cuda:{n - 1}") == f"cuda:{n - 1}"


# ================================================================================ 12. skip reasons in CI
def test_ci_runs_the_readme_test_command_with_skip_reasons():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    readme_cmd = [ln.strip() for ln in readme.splitlines() if ln.strip().startswith("uv run pytest")]
    ci_cmd = [ln.strip() for ln in ci.splitlines() if ln.strip().startswith("uv run pytest")]
    assert len(readme_cmd) == 1 and readme_cmd == ci_cmd, (readme_cmd, ci_cmd)
    assert "-rs" in readme_cmd[0].split()
