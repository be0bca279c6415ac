"""``memobench run --matrix``: every mitigation × attack, the no-attack run first per mitigation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memobench.cli import matrix_pairings
from memobench.registry import get_registry


def test_matrix_pairings_order_and_identity_attacks():
    reg = get_registry()
    if "dori" not in reg.entries["attack"]:
        pytest.skip("built-in plugins not installed as entry points")
    pairs = matrix_pairings(reg)
    mits = sorted(reg.entries["mitigation"])
    assert pairs[0] == ("none", "none")
    assert {m for m, _ in pairs} == set(mits)
    atks = {a for _, a in pairs}
    assert "none" in atks and "dori" in atks and "prompt" not in atks  # one identity attack only
    for m in mits:  # per mitigation: no-attack run first
        assert [a for mm, a in pairs if mm == m][0] == "none"
    assert matrix_pairings(reg, "wen,none", "dori") == [("wen", "dori"), ("none", "dori")] or \
        matrix_pairings(reg, "wen,none", "dori") == [("none", "dori"), ("wen", "dori")]


def test_cli_matrix_runs_every_pairing(tiny_pipe, tmp_path, cli_inproc):
    reg = get_registry()
    if "dori" not in reg.entries["attack"] or "wen" not in reg.entries["mitigation"]:
        pytest.skip("built-in plugins not installed as entry points")
    out, cache = tmp_path / "out", tmp_path / "cache"
    base = ["run", "--model", "tiny", "--model-param", f"path={tiny_pipe}", "--steps", "2", "--seeds", "0",
            "--limit", "1", "-o", out, "--cache-dir", cache, "--offline", "--metric", "mr", "--no-progress"]
    rc, stdout, err = cli_inproc([*base, "--matrix", "--mitigation", "none,wen", "--attack", "none,dori"])
    assert rc == 0, err
    results = [json.loads(p.read_text()) for p in Path(out).rglob("*.json")]
    got = sorted((r["mitigation"]["name"], r["attack"]["name"]) for r in results)
    assert got == [("none", "dori"), ("none", "none"), ("wen", "dori"), ("wen", "none")]
    assert all(("metrics_without_attack" in r) == (r["attack"]["name"] == "dori") for r in results)
    assert "matrix: 4 of 4 pairings" in stdout
    rc, _, err = cli_inproc([*base, "--matrix", "--attack-param", "steps=2"])
    assert rc == 2 and err.strip().startswith("error: --matrix")
    rc, _, err = cli_inproc([*base, "--matrix", "--mitigation", "nemoo"])
    assert rc == 2 and "did you mean: nemo" in err.lower()


def test_matrix_includes_the_fields_mitigations():
    """Issue 28: `run --matrix` scores every installed mitigation, the six added ones included, alone and + DoRI."""
    from memobench.cli_run import matrix_pairings

    reg = get_registry()
    if "dori" not in reg.entries["attack"]:
        pytest.skip("built-in plugins not installed as entry points")
    pairs = set(matrix_pairings(reg))
    for m in ("cfg_switch", "init_noise", "sail", "memattn", "bright_ending", "wen_train"):
        assert {(m, "none"), (m, "dori")} <= pairs, m
