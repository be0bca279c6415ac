"""The core names no plugin: unset model / mitigation / attack resolve through the registry (the plugins that
declare is_default, kind "none", is_identity) before anything is hashed, so committed results keep their hashes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from memobench import hookimpl, registry
from memobench.api import Attack, ModelPlugin
from memobench.config import RunConfig, config_from_dict, resolve_defaults
from memobench.registry import PluginError
from memobench.runner import Runner

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "tiny"


def _committed(pairing: str) -> dict:
    (path,) = [p for p in (RESULTS / pairing).glob("*.json")]
    return json.loads(path.read_text())


@pytest.mark.parametrize("pairing,drop", [("nemo__dori", ()), ("none__none", ("model", "mitigation", "attack"))])
def test_dry_run_reproduces_a_committed_config_hash(tmp_path, pairing, drop):
    """The committed result's config (its plugin names left out for none__none: the registry's defaults) plans to
    the same config hash, hence the same run id and cache keys."""
    res = _committed(pairing)
    cfg = {k: v for k, v in res["config"].items() if k not in drop}
    cfg.update(cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"))
    plan = Runner(config_from_dict(cfg), progress=False).run(dry_run=True)
    assert plan["config_hash"] == res["config_hash"] and plan["config_hash"][:16] == res["run_id"]


def test_defaults_are_the_plugins_that_declare_them():
    reg = registry.get_registry()
    assert (reg.default("model"), reg.default("mitigation"), reg.default("attack")) == ("tiny", "none", "none")
    cfg = resolve_defaults(RunConfig(), reg)
    assert (cfg.model, cfg.mitigation, cfg.attack) == ("tiny", "none", "none")
    assert RunConfig().identity() != cfg.identity()  # unresolved, a config is not hashed (None ≠ the name)
    cfg = resolve_defaults(RunConfig(model="sd-v1-4", attack="dori"), reg)  # named ones are kept
    assert (cfg.model, cfg.mitigation, cfg.attack) == ("sd-v1-4", "none", "dori")


@dataclass
class _P:
    pass


class _SecondDefault(ModelPlugin):
    name, version, is_default = "second-default-model", "0", True
    Params = _P


class _SecondIdentity(Attack):
    name, version, is_identity = "second-identity", "0", True
    Params = _P


def test_several_or_no_declared_defaults_are_a_clear_error():
    obj = SimpleNamespace(register_models=hookimpl(lambda register: register(_SecondDefault)),
                          register_attacks=hookimpl(lambda register: register(_SecondIdentity)))
    reg = registry.register_object(obj, "second-defaults")
    try:
        with pytest.raises(PluginError) as e:
            reg.default("model")
        msg = str(e.value)
        assert "\n" not in msg and "2 registered model plugins declare is_default = True" in msg
        assert "tiny" in msg and "second-default-model" in msg and "--model" in msg
        with pytest.raises(PluginError, match="is_identity"):
            reg.default("attack")
    finally:
        registry.unregister_object("second-defaults")
    saved = dict(reg.entries["mitigation"])
    try:
        reg.entries["mitigation"] = {n: e for n, e in saved.items() if e.cls.kind != "none"}
        with pytest.raises(PluginError, match='no registered mitigation plugins declare kind = "none"'):
            reg.default("mitigation")
    finally:
        reg.entries["mitigation"] = saved
