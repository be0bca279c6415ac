"""The write phase on its own (memobench.pipeline.write): result assembly, atomic writing, grids."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from pipeline_fakes import EditMitigation, FakeImages, RealAttack, make, prompts

from memobench.cache import CacheError
from memobench.config import RunConfig
from memobench.distributed import Shard
from memobench.pipeline import write as W
from memobench.pipeline.plan import Job, Plan
from memobench.pipeline.score import Scores, load_samples


class _Entry:
    dist = "fake-dist"


def _run(tmp_path):
    ps = SimpleNamespace(identity=lambda: {"name": "fake-set"}, provenance=lambda: {"file": "x"})
    return SimpleNamespace(
        cfg=RunConfig(model="fake-model", mitigation="fake-edit", attack="fake-attack", output_dir=str(tmp_path)),
        shard=Shard(), config_hash=lambda: "ab" * 32, model_plugin=SimpleNamespace(identity=lambda: {"name": "m"}),
        mitigation=make(EditMitigation), attack=make(RealAttack), reg=SimpleNamespace(entry=lambda k, n: _Entry()),
        prompt_set=ps, utility_sets={}, generation={"height": 8, "width": 8}, seeds=[0, 1], utility_seeds=[0],
        paired=True)


def _inputs(tmp_path):
    jobs = [Job(r, p, s, f"{r}-{p.id}-{s}") for r in ("target", "mitigated") for p in prompts(2) for s in (0, 1)]
    plan = Plan(prompts(2), 5, {}, jobs, False)
    samples = load_samples(jobs, FakeImages([j.key for j in jobs]), False, lambda p: [], lambda r, p: [])
    scores = Scores(metrics={"fake-mean": {"value": float("nan"), "n": 4}},
                    without_attack={"fake-mean": {"value": 1.0}}, per_sample={"fake-mean": {"target-p0-0": 0.5}},
                    grid_metric="fake-mean")
    return plan, samples, scores


def test_assemble_and_write_a_result(tmp_path):
    run = _run(tmp_path)
    plan, samples, scores = _inputs(tmp_path)
    errors: list[str] = []
    result = W.assemble_result(run, plan, SimpleNamespace(source=None), {"weights": "w"}, scores,
                               {"attack": {"p0": {"loss": 1}}, "mitigation": {}}, errors, {"total_s": 1.0}, False)
    assert result["run_id"] == "ab" * 8 and result["config_hash"] == "ab" * 32 and result["status"] == "complete"
    assert result["config"]["model"] == "fake-model" and result["model"] == {"weights": "w", "plugin": {"name": "m"},
                                                                              "source": {}}
    assert result["mitigation"]["kind"] == "weights" and result["attack"]["dist"] == "fake-dist"
    assert result["prompt_set"]["n_original"] == 5 and result["prompt_set"]["n_effective"] == 2
    assert result["metrics_without_attack"] == {"fake-mean": {"value": 1.0}}
    assert result["env"]["execution"]["scored_by"] == "this process"
    directory = W.run_dir(tmp_path, "fake model", "fake-edit", "fake-attack")
    result_path, samples_path = W.write_result(result, samples, scores.per_sample, directory)
    assert result_path == directory / f"{'ab' * 8}.json" and result["samples_file"] == samples_path.name
    on_disk = json.loads(result_path.read_text())  # strict JSON: NaN written as null and recorded
    assert on_disk["metrics"]["fake-mean"]["value"] is None and on_disk["metrics"]["fake-mean"]["non_finite"] == "NaN"
    assert result["metrics"]["fake-mean"]["value"] is None  # the caller's copy equals what was written
    rows = [json.loads(x) for x in samples_path.read_text().splitlines()]
    assert len(rows) == 8 and rows[0]["fake-mean"] == 0.5
    assert sorted(p.name for p in directory.iterdir()) == sorted([result_path.name, samples_path.name])  # no tmp


def test_status_follows_errors_and_limit():
    s = Scores(metrics={"x": {}})
    assert W.run_status([], s, None) == "complete"
    assert W.run_status(["e"], s, None) == "partial" and W.run_status([], s, 3) == "partial"
    assert W.run_status(["e"], Scores(), None) == "failed"


def test_grids_use_the_grid_metric_and_never_lose_the_result(tmp_path, monkeypatch):
    plan, samples, scores = _inputs(tmp_path)
    seen = []
    monkeypatch.setattr(W, "write_grid", lambda s, path, scores=None, title="": seen.append((path.name, scores)))
    result, errors = {"run_id": "r1"}, []
    grid = W.write_grids(result, samples, scores, tmp_path, "fake-edit", "fake-attack", True, errors)
    assert grid == tmp_path / "r1.grid.png" and errors == []
    assert seen == [("r1.grid.png", {"target-p0-0": 0.5}), ("r1.grid_without_attack.png", {"target-p0-0": 0.5})]
    assert result["grid_without_attack_file"] == "r1.grid_without_attack.png"

    def broken(*a, **k):
        raise ValueError("no pixels")

    monkeypatch.setattr(W, "write_grid", broken)
    assert W.write_grids({"run_id": "r2"}, samples, scores, tmp_path, "m", "a", False, errors) is None
    assert errors == ["grid: ValueError: no pixels"]

    def corrupt(*a, **k):
        raise CacheError("corrupt PNG")

    monkeypatch.setattr(W, "write_grid", corrupt)
    with pytest.raises(CacheError):
        W.write_grids({"run_id": "r3"}, samples, scores, tmp_path, "m", "a", False, errors)
