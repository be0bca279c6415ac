"""The score phase on its own (memobench.pipeline.score): streamed samples, metric records, per-sample rows."""

from __future__ import annotations

import numpy as np
from pipeline_fakes import Broken, FakeImages, MeanPixel, make, prompts

from memobench.api import Context
from memobench.pipeline.plan import Job
from memobench.pipeline.score import ReferenceStore, condition_traces, load_samples, sample_row, score


def _jobs(roles=("target", "mitigated", "baseline")):
    return [Job(r, p, s, f"{r}-{p.id}-{s}") for r in roles for p in prompts(2) for s in (0, 1)]


def _refs(prompt):
    return [np.zeros((4, 4, 3), np.uint8)]


def test_samples_are_streamed_and_paired_with_their_baseline():
    jobs = _jobs()
    images = FakeImages([j.key for j in jobs if j.key != "target-p1-1"])  # one target not generated
    samples = load_samples(jobs, images, True, _refs, lambda role, p: [])
    assert [s.role for s in samples].count("baseline") == 0 and len(samples) == 7
    assert images.reads == []  # nothing decoded until read
    s = samples[0]
    assert s.sample_key == "target-p0-0" and s.has_baseline_image and s.extra["image_sha256"] == "sha-target-p0-0"
    assert int(s.image[0, 0, 0]) == 0 and images.reads == ["target-p0-0"]
    assert len(s.references) == 1


def test_without_baseline_jobs_the_targets_are_the_baseline():
    jobs = _jobs(("target",))
    samples = load_samples(jobs, FakeImages([j.key for j in jobs]), True, _refs, lambda role, p: [])
    assert all(s.has_baseline_image for s in samples)


def test_reference_store_keeps_the_last_prompt_and_stays_bounded():
    store = ReferenceStore(max_bytes=100)
    loads = []

    def loader(k):
        return lambda: loads.append(k) or [np.zeros(60, np.uint8)]

    store.get(("t", "a"), loader("a"))
    store.get(("t", "a"), loader("a"))
    store.get(("t", "b"), loader("b"))  # 120 bytes: "a" is dropped, "b" kept
    store.get(("t", "b"), loader("b"))
    store.get(("t", "a"), loader("a"))
    assert loads == ["a", "b", "a"]


def test_score_records_metrics_pairing_failures_and_the_grid_metric(tmp_path):
    jobs = _jobs(("target", "mitigated"))
    samples = load_samples(jobs, FakeImages([j.key for j in jobs]), False, _refs, lambda role, p: [])
    errors: list[str] = []
    out = score([make(MeanPixel), make(Broken)], samples, Context(cache_dir=tmp_path), True, errors)
    assert set(out.metrics) == set(out.without_attack) == {"fake-mean", "fake-mean_side"}
    rec = out.metrics["fake-mean"]
    assert (rec["category"], rec["headline"], rec["grid_score"]) == ("privacy", True, True)
    side = out.metrics["fake-mean_side"]  # another id of the same plugin: its category, not its headline
    assert (side["category"], side["headline"], side["grid_score"]) == ("privacy", False, False)
    assert rec["n"] == 4 and rec["display_name"] == "Mean pixel" and rec["metric_plugin"]["name"] == "fake-mean"
    assert out.grid_metric == "fake-mean" and len(out.per_sample["fake-mean"]) == 8
    assert len(errors) == 2 and all("fake-broken" in e and "boom" in e for e in errors)
    assert errors[1].endswith("(no attack)")
    row = sample_row(samples[0], out.per_sample)
    assert row["sample_key"] == "target-p0-0" and row["fake-mean"] == 0.0 and row["n_references"] == 1
    assert row["image_path"] == "images/ta/target-p0-0.png"


def test_condition_traces_come_from_each_targets_first_image():
    jobs = _jobs(("target",))
    traces = condition_traces(jobs, FakeImages([j.key for j in jobs]))
    assert traces == {"p0": {"k": "target-p0-0"}, "p1": {"k": "target-p1-0"}}
