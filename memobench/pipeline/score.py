"""Score: the run's samples, streamed from the image cache, scored by every metric; each metric's values become a
record of the result, and its per-sample values columns of the per-sample table."""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import boundary
from ..api import Context, Metric, MetricValue, Prompt, Sample
from ..cache import CacheError, ImageCache
from ..config import BadInput
from ..registry import UnknownPluginError
from .plan import Job

TARGET_ROLES = ("target", "mitigated")  # samples of the target prompts (attacked, or the mitigation alone)


class ReferenceStore:
    """Reference images by prompt, loaded on first use and kept while they fit in ``max_bytes`` (least recently used
    prompts dropped first; the prompt just loaded is always kept). Metrics visit samples prompt by prompt, so a
    prompt's references are loaded about once, and memory stays bounded whatever the number of prompts."""

    def __init__(self, max_bytes: int = 128 << 20):
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict = collections.OrderedDict()  # key -> (value, bytes)
        self._bytes = 0

    def get(self, key, load):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key][0]
        value = load()
        size = _nbytes(value)
        self._items[key] = (value, size)
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, (_, b) = self._items.popitem(last=False)
            self._bytes -= b
        return value


def _nbytes(value) -> int:
    """Bytes of an array or of a list of arrays."""
    if isinstance(value, (list, tuple)):
        return sum(int(getattr(r, "nbytes", 0)) for r in value)
    return int(getattr(value, "nbytes", 0))


DECODED_IMAGES_MAX_BYTES = 64 << 20  # the run's store of decoded generated images (DecodedImages)


class DecodedImages:
    """Generated images of the run, decoded (and sha256-checked) once and kept while they fit in ``max_bytes``
    (a :class:`ReferenceStore` by sample key); every read returns a fresh copy. Several metrics read the same images,
    so a warm run decodes each about once; memory stays bounded whatever the number of samples."""

    def __init__(self, images: ImageCache, max_bytes: int | None = None):
        self.images = images
        self._store = ReferenceStore(DECODED_IMAGES_MAX_BYTES if max_bytes is None else max_bytes)

    def get(self, key: str):
        return self._store.get(key, lambda: self.images.get(key)).copy()


def load_samples(jobs: list[Job], images: ImageCache, needs_baseline: bool,
                 target_references: Callable[[Prompt], list],
                 utility_references: Callable[[str, Prompt], list]) -> list[Sample]:
    """The run's samples, *streamed*: each holds loaders, not pixels (:class:`memobench.api.Sample`). An image
    (and its baseline) is decoded from the cache, sha256-checked, when a metric or the grid first reads it, and kept
    while it fits in a bounded store (:class:`DecodedImages`, 64 MB); a prompt's reference images are loaded about
    once per prompt and kept while they fit in a bounded store (:class:`ReferenceStore`). Memory is then bounded by
    the two stores plus features, whatever the number of samples. Jobs whose image is not in the cache are left out (the phase that skipped them recorded why)."""
    refs = ReferenceStore()
    decoded = DecodedImages(images)
    baseline = {(j.prompt.id, j.seed): j.key for j in jobs if j.role == "baseline"}
    if not baseline and needs_baseline:  # no mitigation, no attack: the targets are the baseline
        baseline = {(j.prompt.id, j.seed): j.key for j in jobs if j.role == "target"}
    out = []
    for j in jobs:
        if j.role == "baseline" or not images.has(j.key):
            continue
        if j.role in TARGET_ROLES:
            ref_loader = functools.partial(refs.get, ("target", j.prompt.id),
                                           functools.partial(target_references, j.prompt))
        else:
            ref_loader = functools.partial(refs.get, (j.role, j.prompt.id),
                                           functools.partial(utility_references, j.role, j.prompt))
        bkey = baseline.get((j.prompt.id, j.seed)) if j.role in TARGET_ROLES else None
        out.append(Sample(sample_key=j.key, prompt=j.prompt, seed=j.seed, role=j.role,
                          image_loader=functools.partial(decoded.get, j.key),
                          references_loader=ref_loader,
                          baseline_loader=(functools.partial(decoded.get, bkey)
                                           if bkey and images.has(bkey) else None),
                          extra={"image_sha256": images.meta(j.key)["image_sha256"]}))
    return out


@dataclass
class Scores:
    metrics: dict[str, dict] = field(default_factory=dict)  # metric id -> record
    without_attack: dict[str, dict] = field(default_factory=dict)  # paired scoring: the mitigation alone
    per_sample: dict[str, dict] = field(default_factory=dict)  # metric id -> {sample key: value}
    grid_metric: str | None = None  # the metric id whose per-sample values a grid prints under each image


def metric_record(m: Metric, mv: MetricValue, name: str) -> dict:
    """The result's record of metric id ``name`` (``category``, ``headline`` and ``grid_score`` from the plugin's
    :class:`~memobench.api.MetricInfo`; the last two for its main id only)."""
    info = m.info
    main = name == info.name
    rec = {
        "value": mv.value, "n": mv.n, "dispersion": mv.dispersion, "groups": mv.groups,
        "higher_is_better": info.higher_is_better, "min": info.min, "max": info.max,
        "display_name": mv.display_name or info.display_name, "metric_plugin": m.identity(), "impl": mv.impl,
        "extra": mv.extra, "category": info.category, "headline": bool(info.headline and main),
        "grid_score": bool(info.grid_score and main),
    }
    if mv.unavailable:
        rec["unavailable"] = mv.unavailable
    return rec


def _compute(m: Metric, subset: list[Sample], ctx: Context) -> dict[str, MetricValue]:
    vals = boundary.call(m, "compute", m.compute, subset, ctx, expect=dict)
    bad = [k for k, v in vals.items() if not isinstance(v, MetricValue)]
    if bad:
        raise boundary.PluginFailure(m, "compute", f"returned {type(vals[bad[0]]).__name__} for {bad[0]!r}, "
                                     "expected MetricValue")
    return vals


def score(metrics: list[Metric], samples: list[Sample], ctx: Context, paired: bool, errors: list[str]) -> Scores:
    """Every metric over the samples of its roles; with ``paired``, the target metrics also over the mitigation-alone
    samples. A metric that fails is recorded in ``errors`` and the others still run (bad input and a corrupt cache
    entry fail the run)."""
    out = Scores()
    for m in metrics:
        subsets = [(out.metrics, [s for s in samples if s.role in m.roles], "")]
        if paired and "target" in m.roles:  # the same metric over the mitigation-alone generations
            subsets.append((out.without_attack, [s.replace(role="target") for s in samples
                                                 if s.role == "mitigated"], " (no attack)"))
        for dest, subset, label in subsets:
            try:
                vals = _compute(m, subset, ctx)
            except (BadInput, UnknownPluginError, CacheError):
                raise
            except Exception as e:  # any other metric failure is recorded, the rest of the run survives
                errors.append(f"{boundary.failure(m, 'compute', e)}{label}")
                continue
            for name, mv in vals.items():
                dest[name] = metric_record(m, mv, name)
                out.per_sample.setdefault(name, {}).update(mv.per_sample or {})
        if m.info.grid_score and out.grid_metric is None:
            out.grid_metric = m.info.name
    return out


def sample_row(s: Sample, per_sample: dict[str, dict]) -> dict:
    """One line of the per-sample table."""
    row = {"sample_key": s.sample_key, "role": s.role, "prompt_id": s.prompt.id, "prompt": s.prompt.text,
           "prompt_sha256": s.prompt.sha256, "mem_type": s.prompt.mem_type, "seed": s.seed,
           "image_path": f"images/{s.sample_key[:2]}/{s.sample_key}.png",
           "image_sha256": s.extra.get("image_sha256"), "n_references": len(s.references)}
    for name, ps in per_sample.items():
        if s.sample_key in ps:
            row[name] = ps[s.sample_key]
    return row


def image_provenance(jobs: list[Job], images: ImageCache) -> dict:
    """How many of the run's images were computed where (``generated_with`` of their sidecars: device and CPU
    thread count; "unrecorded" for images cached by versions before it was recorded), e.g.
    ``{"cpu, 1 thread(s)": 190}``. Mixed values mean the images were not all computed under the same kernels."""
    out: dict[str, int] = {}
    for j in jobs:
        if not images.has(j.key):
            continue
        g = images.meta(j.key).get("generated_with")
        k = "unrecorded" if not g else (f"{g.get('device')}, {g['torch_threads']} thread(s)"
                                         if "torch_threads" in g else str(g.get("device")))
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


def condition_traces(jobs: list[Job], images: ImageCache) -> dict:
    """Per target prompt, the inference-time mitigation's trace stored with its first image."""
    out: dict[str, dict] = {}
    for j in jobs:
        if j.role == "target" and j.prompt.id not in out and images.has(j.key):
            tr = images.meta(j.key).get("condition_trace")
            if tr:
                out[j.prompt.id] = tr
    return out
