"""Small fakes for the pipeline phase tests (no model, no registry, no files but the ones a test writes)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memobench.api import Attack, Metric, MetricInfo, MetricValue, Mitigation, Prompt


@dataclass
class NoParams:
    pass


class NoMitigation(Mitigation):
    name, version, kind = "fake-none", "0", "none"
    Params = NoParams


class EditMitigation(Mitigation):
    name, version, kind = "fake-edit", "1", "weights"
    Params = NoParams


class IdentityAttack(Attack):
    name, version, is_identity = "fake-identity", "0", True
    Params = NoParams


class RealAttack(Attack):
    name, version, needs_reference = "fake-attack", "2", True
    Params = NoParams


class MeanPixel(Metric):
    """The mean pixel of each image (per sample), their mean (value)."""

    name, version = "fake-mean", "0"
    Params = NoParams
    info = MetricInfo("fake-mean", "Mean pixel", higher_is_better=False, category="privacy", headline=True,
                      grid_score=True)

    def compute(self, samples, ctx):
        per = {s.sample_key: float(s.image.mean()) for s in samples}
        extra = MetricValue(value=1.0, n=len(samples), impl={"name": "fake"})
        return {"fake-mean": MetricValue(value=float(np.mean(list(per.values()))) if per else None, n=len(per),
                                         impl={"name": "fake"}, per_sample=per),
                "fake-mean_side": extra}


class Broken(Metric):
    name, version = "fake-broken", "0"
    Params = NoParams
    info = MetricInfo("fake-broken", "Broken", higher_is_better=True)

    def compute(self, samples, ctx):
        raise RuntimeError("boom")


def make(cls):
    return cls(cls.make_params({}))


def prompts(n: int) -> list[Prompt]:
    return [Prompt(id=f"p{i}", text=f"prompt {i}", mem_type="VM", reference_ids=(f"r{i}",)) for i in range(n)]


class FakeImages:
    """The part of :class:`memobench.cache.ImageCache` the score phase reads: a constant image per key."""

    def __init__(self, keys):
        self.data = {k: np.full((8, 8, 3), i % 256, dtype=np.uint8) for i, k in enumerate(keys)}
        self.reads: list[str] = []

    def has(self, key):
        return key in self.data

    def get(self, key):
        self.reads.append(key)
        return self.data[key]

    def meta(self, key):
        return {"image_sha256": f"sha-{key}", "condition_trace": {"k": key} if key.endswith("0") else {}}
