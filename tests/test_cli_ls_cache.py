"""`memobench ls` shows parameter descriptions; `cache clear` checks its input before asking."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from memobench import hookimpl, registry
from memobench.api import Mitigation, param


class _Described(Mitigation):
    """A mitigation with described parameters."""

    name, version, kind = "ls-described", "0", "inference"

    @dataclass
    class Params:
        strength: float = param(0.5, "how strongly [it] mitigates")
        quiet: bool = False


def test_ls_shows_parameter_descriptions(cli_inproc, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one table row per line
    obj = SimpleNamespace(register_mitigations=hookimpl(lambda register: register(_Described)))
    registry.register_object(obj, "ls-described")
    try:
        rc, out, err = cli_inproc(["ls", "mitigations"])
    finally:
        registry.unregister_object("ls-described")
    assert rc == 0, err
    text = " ".join(out.split())
    assert "strength=0.5 — how strongly [it] mitigates" in text and "quiet=False" in text
    assert "quiet=False —" not in text  # nothing extra for a parameter without a description


def test_ls_shows_the_builtin_descriptions(cli_inproc, monkeypatch):
    """A built-in plugin's parameters are listed with the descriptions its Params declare."""
    from memobench.api import param_help
    from memobench.registry import get_registry

    monkeypatch.setenv("COLUMNS", "400")
    rc, out, err = cli_inproc(["ls", "attacks"])
    assert rc == 0, err
    line = out.split("dori", 1)[1].split("\n", 1)[0]
    help_ = param_help(get_registry().get("attack", "dori"), "steps")
    assert help_ and f"steps=50 — {help_}" in line


def test_cache_clear_refuses_before_asking(cli_inproc, tmp_path):
    rc, out, err = cli_inproc(["cache", "clear", "--cache-dir", str(tmp_path), "--section", "bogus"])
    assert rc == 2 and "--section: unknown section 'bogus'" in err and "delete memobench" not in out
    (tmp_path / "theirs").mkdir()
    rc, out, err = cli_inproc(["cache", "clear", "--cache-dir", str(tmp_path)])
    assert rc == 2 and "not a memobench cache" in err and "delete memobench" not in out
    assert (tmp_path / "theirs").is_dir()
