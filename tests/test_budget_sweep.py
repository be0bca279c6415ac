"""``memobench run --budget-sweep``: the target metrics at several values of the attack's budget parameter, in the
run's own result. Each point equals a separate run with that parameter value; the work column is the attack's own
unit (DoRI: steps × batch); "work to re-extract" is the first point whose MR exceeds 0.5."""

from __future__ import annotations

import dataclasses
import json

import pytest

from memobench.config import BadInput, RunConfig
from memobench.pipeline.budget import work_to_reextract
from memobench.runner import Runner


def _cfg(tmp_path, **kw):
    base = dict(model="tiny", attack="dori", attack_params={"batch": 2, "steps": 3}, limit=1, seeds=[0, 1],
                num_inference_steps=2, metrics=["mr", "sscd_orig"], output_dir=str(tmp_path / "out"),
                cache_dir=str(tmp_path / "cache"), offline=True)
    base.update(kw)
    return RunConfig(**base)


def test_sweep_points_equal_separate_runs(tmp_path):
    out = Runner(_cfg(tmp_path, budget_sweep=[0, 1]), progress=False).run()
    sw = json.loads(out.result_path.read_text())["budget_sweep"]
    assert sw["param"] == "steps" and sw["unit"].startswith("UNet forward+backward")
    assert [p["value"] for p in sw["points"]] == [0, 1]
    assert [p["budget"] for p in sw["points"]] == [0.0, 2.0]  # steps × batch
    assert sw["headline_metric"] == "mr" and sw["threshold"] == 0.5
    one = Runner(_cfg(tmp_path, attack_params={"batch": 2, "steps": 1}), progress=False).run()
    p1 = sw["points"][1]
    assert p1["config_hash"] == Runner(_cfg(tmp_path, attack_params={"batch": 2, "steps": 1}, metrics=["mr", "sscd_orig"]),
                                       progress=False).config_hash()
    for k, rec in one.result["metrics"].items():
        assert p1["metrics"][k] == rec["value"], k
    # the 0-step point starts from the prompt's own embedding: its SSCD differs from the 1-step point's
    assert sw["points"][0]["metrics"]["sscd_orig"] != p1["metrics"]["sscd_orig"]
    assert "budget_sweep_s" in out.result["timing"]


def test_sweep_leaves_the_hash_of_runs_without_it(tmp_path):
    cfg = _cfg(tmp_path)
    assert "budget_sweep" not in cfg.identity()
    assert Runner(cfg, progress=False).config_hash() != Runner(dataclasses.replace(cfg, budget_sweep=[0]),
                                                               progress=False).config_hash()


def test_sweep_needs_a_budgeted_attack(tmp_path):
    with pytest.raises(BadInput, match="declares no budget"):
        Runner(_cfg(tmp_path, attack="none", attack_params={}, budget_sweep=[]), progress=False).run()
    with pytest.raises(BadInput, match="integers ≥ 0"):
        Runner(_cfg(tmp_path, budget_sweep=[-1]), progress=False).run()


def test_work_to_reextract_is_the_first_point_above_half():
    pts = [{"value": v, "budget": 8.0 * v, "metrics": {"mr": m}} for v, m in [(0, 0.1), (10, 0.5), (25, 0.625),
                                                                             (50, 1.0)]]
    assert work_to_reextract(pts, "mr") == {"value": 25, "budget": 200.0}  # 0.5 is not above 0.5
    assert work_to_reextract(pts[:2], "mr") is None
    assert work_to_reextract(list(reversed(pts)), "mr")["value"] == 25  # ordered by work, not by listing
    assert work_to_reextract(pts, None) is None


def test_cli_budget_values_parse(cli_inproc, tmp_path):
    rc, _, err = cli_inproc(["run", "--budget-values", "0,5", "--output-dir", str(tmp_path)])
    assert rc != 0 and "only with --budget-sweep" in err
    rc, _, err = cli_inproc(["run", "--attack", "dori", "--budget-sweep", "--budget-values", "0,x",
                             "--output-dir", str(tmp_path)])
    assert rc != 0 and "--budget-values" in err and "0,10,50" in err
