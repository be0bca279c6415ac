"""Memorization metrics built on SSCD (METHODS §4): ``mr``, ``sscd_orig``, ``sscd_gen`` and ``diversity``.

Every metric embeds images with :class:`memobench.sscd.SSCD` (preset, backend and weights are ``Params`` fields) and
aggregates with :mod:`memobench.stats`. Common behaviour:

* Samples of one prompt share ``prompt.id``; generations of a prompt are ordered by seed.
* s_{p,g} = reduction over the prompt's reference images (``ref_reduce``: max or median) of the cosine between
  generation g and each reference. Prompts without any reference image are excluded and counted in
  ``n_missing_ref`` (METHODS §4).
* ``groups`` holds one entry per ``prompt.mem_type`` present (``VM``, ``TM``, ``NONMEM`` ...) plus ``all``. The
  headline ``value`` is computed on the prompts of ``headline_group`` (default ``VM``, the DoRI/NeMo VM rows) when the
  samples contain prompts with that label (``value`` is None with ``unavailable`` set if none of them can be scored),
  and on all prompts otherwise (``"all"`` forces that); ``extra["headline_group"]`` records which.
* ``per_sample`` maps ``sample_key`` to the per-generation number; ``extra["per_prompt"]`` maps ``prompt.id`` to the
  per-prompt number, so every aggregate can be recomputed.
* Each distinct image (by content hash) is embedded once per ``compute`` call. Images are read a batch at a time
  (the runner's samples load them from the image cache on access): vectors are kept, pixels dropped.
* ``jpeg_roundtrip=True`` passes generated images through a PIL JPEG round trip (quality 75) first, as NeMo's scripts
  score JPEG files (METHODS §3.2 note).
* When the SSCD weights cannot be loaded (e.g. a TorchScript checkpoint missing in offline mode), the metric returns
  values with ``unavailable`` set to the reason.
* The embedder runs on the run's device (``ctx.device``). With ``backend="auto"`` the preset's official TorchScript
  checkpoint is used wherever it can be had (``weights_path``, the SSCD cache, or a download when not offline and
  the offline ONNX ``sscd_disc_mixup`` would be a substitution: a ``sscd_disc_large`` preset or a GPU run); see
  :class:`memobench.sscd.SSCD`. ``weights_sha256`` pins the TorchScript file: a file (downloaded, cached or given)
  whose sha256 differs is refused with one line (exit 2). Without a pin the sha256 recorded at download time is
  enforced (Meta publishes no hash; memobench does not invent one). Any substitution (checkpoint, device, failed
  download) is ``impl["substitution"]`` and printed under ``memobench run``'s summary table.

A local TorchScript file is given with the ``weights_path`` parameter
(``--metric-param mr.weights_path=/path/sscd_disc_large.torchscript.pt``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memobench.api import (
    SSCD, BadInput, Context, Metric, MetricInfo, MetricValue, SSCDUnavailableError, Sample, get_preset, hookimpl,
    image_sha256, jpeg_roundtrip, param, stats,
)

__all__ = ["Diversity", "EmbeddingCache", "MemorizationRate", "SSCDGen", "SSCDOrig"]


# ---------------------------------------------------------------------------------------------- helpers
class EmbeddingCache:
    """Embeds each distinct image (by :func:`memobench.api.image_sha256`) once; lookups by image."""

    def __init__(self, embedder: Any):
        self.embedder = embedder
        self._vectors: dict[str, np.ndarray] = {}

    def add(self, images: Sequence[np.ndarray]) -> None:
        """Embed, in one batched call, every image not seen before."""
        todo: dict[str, np.ndarray] = {}
        for im in images:
            d = image_sha256(im)
            if d not in self._vectors and d not in todo:
                todo[d] = im
        if todo:
            feats = np.asarray(self.embedder.embed(list(todo.values())))
            for d, f in zip(todo, feats):
                self._vectors[d] = f.astype(np.float64)

    def add_stream(self, items: Iterable[tuple[Any, Callable[[], np.ndarray]]]) -> dict[Any, str]:
        """Embed images that are loaded one at a time: ``items`` yields ``(key, load)``. Each image is loaded,
        hashed and, if new, queued; a full queue (the embedder's ``batch_size`` images of one preprocessed shape) is
        embedded and its pixels dropped, so at most a batch of images is held. The batches are those of
        :meth:`add` over the same images in the same order, so the vectors are the same as one ``add`` call.
        Returns ``{key: digest}`` for keys that are not None (look vectors up with :meth:`vector`)."""
        bs = int(getattr(self.embedder, "batch_size", 0) or 64)
        queues: dict[Any, dict[str, np.ndarray]] = {}  # preprocessed shape -> digest -> image, first-seen order
        out: dict[Any, str] = {}
        for key, load in items:
            im = load()
            d = image_sha256(im)
            if key is not None:
                out[key] = d
            if d in self._vectors:
                continue
            q = queues.setdefault(self._batch_shape(im), {})
            if d in q:  # equal bytes: the same shape, hence the same queue
                continue
            q[d] = im
            if len(q) >= bs:
                self._embed_queue(q)
        for q in queues.values():
            self._embed_queue(q)
        return out

    def _embed_queue(self, queue: dict[str, np.ndarray]) -> None:
        if queue:
            feats = np.asarray(self.embedder.embed(list(queue.values())))
            for d, f in zip(queue, feats):
                self._vectors[d] = f.astype(np.float64)
            queue.clear()

    def _batch_shape(self, image: np.ndarray) -> Any:
        """The shape an SSCD embedder batches ``image`` under (its preset's resize and crop); one group otherwise."""
        pre = getattr(self.embedder, "preset", None)
        resize = getattr(pre, "resize", None)
        if resize is None:
            return None
        if getattr(pre, "center_crop", None):
            return (pre.center_crop, pre.center_crop)
        if isinstance(resize, int):
            from memobench.api import short_side_size

            return short_side_size(image.shape[0], image.shape[1], resize)
        return tuple(resize)

    def vector(self, digest: str) -> np.ndarray:
        return self._vectors[digest]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self._vectors[image_sha256(image)]

    def __len__(self) -> int:
        return len(self._vectors)


def _by_prompt(samples: Sequence[Sample]) -> dict[str, list[Sample]]:
    """Samples grouped by ``prompt.id`` (first-appearance order), each group sorted by seed."""
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.prompt.id, []).append(s)
    return {pid: sorted(ss, key=lambda s: s.seed) for pid, ss in groups.items()}


def _ref_loaders(samples: Sequence[Sample]) -> dict[str, Callable[[], np.ndarray]]:
    """The distinct reference images of a prompt (union over its samples, by content hash, first-seen order) as
    ``{digest: load}``; the pixels are not kept (streamed samples load their references on access)."""
    seen: dict[str, Callable[[], np.ndarray]] = {}
    for s in samples:
        for i, r in enumerate(s.references or []):
            seen.setdefault(image_sha256(r), functools.partial(_nth_reference, s, i))
    return seen


def _nth_reference(s: Sample, i: int) -> np.ndarray:
    return s.references[i]


def _resolve(value: str, preset_value: str) -> str:
    return preset_value if value == "preset" else value


def _aggregate(per_prompt: dict[str, float], labels: dict[str, str | None], set_reduce: str,
               headline_group: str, impl: dict, per_sample: dict, extra: dict,
               missing: dict[str, str | None]) -> MetricValue:
    """Set-level value, dispersion and per-``mem_type`` groups of per-prompt values."""
    def summary(pids: list[str]) -> tuple[float | None, dict | None]:
        if not pids:
            return None, None
        return stats.summarize([per_prompt[p] for p in pids], set_reduce)  # type: ignore[arg-type]

    all_ids = list(per_prompt)
    groups: dict[str, dict] = {}
    names = sorted({lab for lab in list(labels.values()) + list(missing.values()) if lab})
    for g in names + ["all"]:
        ids = all_ids if g == "all" else [p for p in all_ids if labels[p] == g]
        n_miss = len(missing) if g == "all" else sum(1 for lab in missing.values() if lab == g)
        v, disp = summary(ids)
        groups[g] = {"value": v, "dispersion": disp, "n": len(ids), "n_missing_ref": n_miss}
    head = headline_group if headline_group in names else "all"
    extra = {**extra, "headline_group": head, "set_reduce": set_reduce, "n_missing_ref": groups[head]["n_missing_ref"],
             "missing_ref_prompts": sorted(missing), "per_prompt": dict(per_prompt)}
    if groups[head]["n"] == 0:
        what = "no prompt" if head == "all" else f"no {head} prompt"
        return MetricValue(value=None, n=0, impl=impl, groups=groups, per_sample=per_sample, extra=extra,
                           unavailable=f"{what} could be scored (missing references or generations)")
    return MetricValue(value=groups[head]["value"], n=groups[head]["n"], impl=impl,
                       dispersion=groups[head]["dispersion"], groups=groups, per_sample=per_sample, extra=extra)


# ---------------------------------------------------------------------------------------------- base class
class _SSCDMetric(Metric):
    """Shared embedding plumbing of the SSCD metrics."""

    version = "1"

    @dataclass
    class Params:
        preset: str = param("dori2026", "SSCD preset (resize, embedding, reductions): dori2026 | nemo2024 | …")
        backend: str = param("auto", "auto | onnx | torchscript (memobench.sscd.SSCD)")
        weights_path: str = param("", ".onnx, or an official *.torchscript.pt the user gives (e.g. sscd_disc_large)")
        weights_sha256: str = param("", "pin of the TorchScript file; '' = the sha256 recorded at download is enforced")
        headline_group: str = param("VM", "prompt group whose value is the headline number (VM, TM, …)")
        jpeg_roundtrip: bool = param(False, "JPEG-encode the generated images before SSCD")
        batch_size: int = param(16, "images per SSCD batch")

    def make_embedder(self, ctx: Context) -> Any:
        """The SSCD embedder for this metric's params and the run context (tests may replace this)."""
        p = self.params
        weights = p.weights_path or None
        return SSCD(preset=p.preset, backend=p.backend, weights_path=weights,
                    cache_dir=Path(ctx.cache_dir) if ctx.cache_dir is not None else None,
                    offline=ctx.offline, batch_size=p.batch_size, device=str(ctx.device or "cpu"),
                    sha256=p.weights_sha256 or None)

    def _gen_image(self, image: np.ndarray) -> np.ndarray:
        return jpeg_roundtrip(image) if self.params.jpeg_roundtrip else image

    def _gen_loader(self, s: Sample, baseline: bool = False) -> Callable[[], np.ndarray]:
        """Loads (streamed samples: decodes) the generation, or its baseline, when the embedding stream asks."""
        return lambda: self._gen_image(s.baseline_image if baseline else s.image)  # type: ignore[arg-type]

    def _unavailable(self, keys: Sequence[str], reason: str) -> dict[str, MetricValue]:
        impl = {"name": "sscd", "preset": self.params.preset, "backend": self.params.backend}
        return {k: MetricValue(value=None, n=0, impl=impl, extra={"n_missing_ref": None}, unavailable=reason)
                for k in keys}

    def _setup(self, ctx: Context) -> tuple[EmbeddingCache, dict]:
        embedder = self.make_embedder(ctx)
        impl = {**embedder.impl, "metric": self.name, "metric_version": self.version}
        return EmbeddingCache(embedder), impl

    def _reference_scores(self, samples: Sequence[Sample], ctx: Context, ref_reduce: str
                          ) -> tuple[dict[str, list[tuple[str, float]]], dict[str, str | None],
                                     dict[str, str | None], dict, EmbeddingCache]:
        """s_{p,g} per prompt as ``[(sample_key, s), ...]`` (seed order), labels, missing prompts, impl, cache."""
        by_prompt = _by_prompt(samples)
        labels = {pid: ss[0].prompt.mem_type for pid, ss in by_prompt.items()}
        refs = {pid: _ref_loaders(ss) for pid, ss in by_prompt.items()}
        missing = {pid: labels[pid] for pid in by_prompt if not refs[pid]}
        cache, impl = self._setup(ctx)
        # streamed: generations, then references, a batch at a time (features kept, pixels dropped)
        gens = cache.add_stream(itertools.chain(
            ((s.sample_key, self._gen_loader(s)) for pid in by_prompt if pid not in missing for s in by_prompt[pid]),
            ((None, load) for pid in refs for load in refs[pid].values())))
        scores: dict[str, list[tuple[str, float]]] = {}
        for pid, ss in by_prompt.items():
            if pid in missing:
                continue
            r = np.stack([cache.vector(d) for d in refs[pid]])
            scores[pid] = [(s.sample_key, stats.reduce(r @ cache.vector(gens[s.sample_key]), ref_reduce))  # type: ignore
                           for s in ss]
        return scores, {p: labels[p] for p in scores}, missing, impl, cache


# ---------------------------------------------------------------------------------------------- metrics
class SSCDOrig(_SSCDMetric):
    """SSCD_orig: similarity of generations to the prompt's training image(s) (METHODS §4.1).

    s_{p,g} = ref_reduce_r ⟨f(x_{p,g}), f(x*_{p,r})⟩ (METHODS §4 notation; max = Wen/MemBench/memobench default,
    median = NeMo ``metrics/compute_sscd_orig.py``); SSCD_orig(p) = gen_reduce_g s_{p,g}; the set value is mean ± std
    (ddof 0) or median ± MAD over prompts.

    Defaults: DoRI (Kowalczuk, Hintersdorf, Struppek et al., "Finding DoRI", ICML 2026, blog "SSCD_Orig … a mean
    cosine similarity", tables as mean ± deviation) — preset ``dori2026``, gen_reduce = mean, set_reduce = mean_std.
    NeMo (Hintersdorf, Struppek et al., NeurIPS 2024, Table 1) reports max_g and median_g as median ± MAD; Wen et al.
    (ICLR 2024, ``inference_mem.py``) mean_g/max_g/min_g averaged over prompts. ``extra["by_gen_reduce"]`` carries the
    mean/median/max/min variants with the same set reduction. ``"preset"`` for a reduction takes the preset's value.
    """

    name = "sscd_orig"
    info = MetricInfo("sscd_orig", "SSCD_Orig", higher_is_better=False, min=-1.0, max=1.0,
                      description="SSCD cosine between generations and the training image (METHODS §4.1)",
                      category="privacy", grid_score=True)

    @dataclass
    class Params(_SSCDMetric.Params):
        ref_reduce: str = param("max", "max | median | preset")
        gen_reduce: str = param("mean", "mean | median | max | min | preset")
        set_reduce: str = param("mean_std", "mean_std | median_mad | mean | preset")

    def compute(self, samples: list[Sample], ctx: Context) -> dict[str, MetricValue]:
        p, pre = self.params, get_preset(self.params.preset)
        ref_reduce, gen_reduce = _resolve(p.ref_reduce, pre.ref_reduce), _resolve(p.gen_reduce, pre.gen_reduce)
        set_reduce = _resolve(p.set_reduce, pre.set_reduce)
        try:
            scores, labels, missing, impl, _ = self._reference_scores(samples, ctx, ref_reduce)
        except SSCDUnavailableError as e:
            return self._unavailable([self.name], str(e))
        per_sample = {k: v for sc in scores.values() for k, v in sc}
        variants = {}
        for how in stats.REDUCTIONS:
            pp = {pid: stats.reduce([v for _, v in sc], how) for pid, sc in scores.items()}  # type: ignore[arg-type]
            mv = _aggregate(pp, labels, set_reduce, p.headline_group, impl, {}, {}, missing)
            variants[how] = {"value": mv.value, "dispersion": mv.dispersion, "n": mv.n, "groups": mv.groups,
                             "per_prompt": pp}
        extra = {"ref_reduce": ref_reduce, "gen_reduce": gen_reduce, "by_gen_reduce": variants}
        pp = variants[gen_reduce]["per_prompt"]
        return {self.name: _aggregate(pp, labels, set_reduce, p.headline_group, impl, per_sample, extra, missing)}


class MemorizationRate(_SSCDMetric):
    """MR: fraction of prompts (or generations) whose SSCD_orig exceeds τ, strict ">" (METHODS §4.2).

    MR_gen = 1/|P| Σ_p 1/G Σ_g 1[s_{p,g} > τ]; MR_mean = 1/|P| Σ_p 1[mean_g s_{p,g} > τ];
    MR_any = 1/|P| Σ_p 1[max_g s_{p,g} > τ] (METHODS §4.2 equations; MR_any at τ = 0.7 over 10 seeds is NeMo's VM rule,
    App. C.1; MR_gen at τ = 0.5 is DCR's replication rate and MemBench's ``SSCD > 0.5``).

    Defaults: DoRI (Kowalczuk, Hintersdorf, Struppek et al., ICML 2026, blog: "Values above 0.7 indicate
    replication", reported for verbatim memorized samples): τ = 0.7, level = prompt-mean, preset ``dori2026``,
    headline on the VM prompts. Returns ``mr`` (the chosen ``level``) and always ``mr_gen``, ``mr_mean``, ``mr_any``.
    """

    name = "mr"
    info = MetricInfo("mr", "MR", higher_is_better=False, min=0.0, max=1.0,
                      description="memorization rate: SSCD_orig > τ (METHODS §4.2)",
                      category="privacy", headline=True)

    @dataclass
    class Params(_SSCDMetric.Params):
        threshold: float = param(0.7, "τ: an SSCD similarity above it (strict >) counts as memorized")
        level: str = param("mean", "mean | gen | any")
        ref_reduce: str = param("max", "max | median | preset")

    def compute(self, samples: list[Sample], ctx: Context) -> dict[str, MetricValue]:
        p, pre = self.params, get_preset(self.params.preset)
        if p.level not in ("mean", "gen", "any"):
            raise BadInput(f"mr level must be mean, gen or any, not {p.level!r}")
        ref_reduce, tau = _resolve(p.ref_reduce, pre.ref_reduce), float(p.threshold)
        keys = ["mr", "mr_gen", "mr_mean", "mr_any"]
        try:
            scores, labels, missing, impl, _ = self._reference_scores(samples, ctx, ref_reduce)
        except SSCDUnavailableError as e:
            return self._unavailable(keys, str(e))
        per_sample = {k: v for sc in scores.values() for k, v in sc}
        indicator = {
            "gen": lambda s: float(np.mean(s > tau)),
            "mean": lambda s: float(np.mean(s) > tau),
            "any": lambda s: float(np.max(s) > tau),
        }
        out: dict[str, MetricValue] = {}
        for level, fn in indicator.items():
            pp = {pid: fn(np.array([v for _, v in sc])) for pid, sc in scores.items()}
            extra = {"threshold": tau, "comparison": ">", "level": level, "ref_reduce": ref_reduce}
            out[f"mr_{level}"] = _aggregate(pp, labels, "mean", p.headline_group, impl, per_sample, extra, missing)
        out["mr"] = dataclasses.replace(out[f"mr_{p.level}"], extra={**out[f"mr_{p.level}"].extra})
        return {k: out[k] for k in keys}


class SSCDGen(_SSCDMetric):
    """SSCD_gen: similarity of each mitigated generation to the unmitigated one with the same seed (METHODS §4.3).

    SSCD_gen(p) = median_g ⟨f(x^mit_{p,g}), f(x^base_{p,g})⟩, median ± MAD over prompts, VM/TM separately
    (NeMo, Hintersdorf, Struppek et al., NeurIPS 2024, Table 1; ``metrics/compute_sscd_gen.py``). The pair of slot g
    is ``Sample.image`` and ``Sample.baseline_image`` (same seed, same initial latent); samples without a baseline
    are excluded and counted in ``extra["n_missing_baseline"]``. 1.0 = unchanged. Reference images are not used.
    """

    name = "sscd_gen"
    info = MetricInfo("sscd_gen", "SSCD_Gen", higher_is_better=False, min=-1.0, max=1.0,
                      description="SSCD cosine between mitigated and unmitigated generations (METHODS §4.3)",
                      category="privacy")
    needs_baseline = True

    @dataclass
    class Params(_SSCDMetric.Params):
        preset: str = param("nemo2024", "SSCD preset (resize, embedding, reductions): nemo2024 (NeMo's) | dori2026 | …")
        gen_reduce: str = param("median", "mean | median | max | min")
        set_reduce: str = param("median_mad", "median_mad | mean_std | mean")

    def compute(self, samples: list[Sample], ctx: Context) -> dict[str, MetricValue]:
        p = self.params
        with_base = [s for s in samples if s.has_baseline_image]
        n_missing_base = len(samples) - len(with_base)
        try:
            cache, impl = self._setup(ctx)
        except SSCDUnavailableError as e:
            return self._unavailable([self.name], str(e))
        by_prompt = _by_prompt(with_base)
        digests = cache.add_stream(((s.sample_key, which), self._gen_loader(s, which == "base"))
                                   for s in with_base for which in ("gen", "base"))
        per_sample = {s.sample_key: float(cache.vector(digests[s.sample_key, "gen"])
                                          @ cache.vector(digests[s.sample_key, "base"])) for s in with_base}
        pp = {pid: stats.reduce([per_sample[s.sample_key] for s in ss], p.gen_reduce)  # type: ignore[arg-type]
              for pid, ss in by_prompt.items()}
        labels = {pid: ss[0].prompt.mem_type for pid, ss in by_prompt.items()}
        extra = {"gen_reduce": p.gen_reduce, "n_missing_baseline": n_missing_base, "uses_references": False,
                 "pairing": "Sample.image vs Sample.baseline_image (same seed)"}
        return {self.name: _aggregate(pp, labels, p.set_reduce, p.headline_group, impl, per_sample, extra, {})}


class Diversity(_SSCDMetric):
    """D_SSCD: median pairwise SSCD among a prompt's generations; lower = more diverse (METHODS §4.4).

    D_SSCD(p) = median over the G(G−1)/2 pairs g < g' of ⟨f(x_{p,g}), f(x_{p,g'})⟩, median ± MAD over prompts
    (NeMo, Hintersdorf, Struppek et al., NeurIPS 2024, Table 1; ``metrics/compute_diversity.py``). Prompts with fewer
    than two generations are excluded and counted in ``extra["n_single"]``. Reference images are not used;
    ``per_sample`` holds each generation's median similarity to the prompt's other generations.
    """

    name = "diversity"
    info = MetricInfo("diversity", "D_SSCD", higher_is_better=False, min=-1.0, max=1.0,
                      description="median pairwise SSCD among a prompt's generations (METHODS §4.4)",
                      category="privacy")

    @dataclass
    class Params(_SSCDMetric.Params):
        preset: str = param("nemo2024", "SSCD preset (resize, embedding, reductions): nemo2024 (NeMo's) | dori2026 | …")
        set_reduce: str = param("median_mad", "median_mad | mean_std | mean")

    def compute(self, samples: list[Sample], ctx: Context) -> dict[str, MetricValue]:
        p = self.params
        try:
            cache, impl = self._setup(ctx)
        except SSCDUnavailableError as e:
            return self._unavailable([self.name], str(e))
        by_prompt = _by_prompt(samples)
        single = [pid for pid, ss in by_prompt.items() if len(ss) < 2]
        by_prompt = {pid: ss for pid, ss in by_prompt.items() if len(ss) >= 2}
        gens = cache.add_stream((s.sample_key, self._gen_loader(s)) for ss in by_prompt.values() for s in ss)
        pp: dict[str, float] = {}
        per_sample: dict[str, float] = {}
        for pid, ss in by_prompt.items():
            f = np.stack([cache.vector(gens[s.sample_key]) for s in ss])
            sim = f @ f.T
            pp[pid] = float(np.median([sim[i, j] for i, j in itertools.combinations(range(len(ss)), 2)]))
            for i, s in enumerate(ss):
                per_sample[s.sample_key] = float(np.median(np.delete(sim[i], i)))
        labels = {pid: ss[0].prompt.mem_type for pid, ss in by_prompt.items()}
        extra = {"n_single": len(single), "uses_references": False, "pairs": "g < g'"}
        return {self.name: _aggregate(pp, labels, p.set_reduce, p.headline_group, impl, per_sample, extra, {})}


@hookimpl
def register_metrics(register):
    for cls in (MemorizationRate, SSCDOrig, SSCDGen, Diversity):
        register(cls)
