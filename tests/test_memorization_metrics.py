"""Memorization statistics (memobench.stats) and the ``memorization`` metric plugin.

Arithmetic tests use hand-computed values from METHODS §4 and §6.3; the metric tests inject an embedder whose
vectors give exact cosines, plus one end-to-end check with the offline ONNX SSCD on real photographs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from typing import ClassVar

import memobench_plugins.memorization as mem
import numpy as np
import pluggy
import pytest

from memobench import hookspecs, stats
from memobench.api import Context, MetricValue, Prompt, Sample


# ---------------------------------------------------------------------------------------------- stats
def test_median_mad_is_raw():
    assert stats.median_mad([1, 2, 3, 4, 100]) == (3.0, 1.0)  # |v - 3| = 2, 1, 0, 1, 97
    assert stats.median_mad([0.25, 0.5, 0.75, 0.75]) == (0.625, 0.125)


def test_mean_std_population():
    m, s = stats.mean_std([1, 2, 3, 4])
    assert m == 2.5 and s == pytest.approx(math.sqrt(1.25), abs=1e-12)  # ddof = 0, not sqrt(5/3)
    v, d = stats.summarize([1, 2, 3, 4], "mean_std")
    assert v == 2.5 and d == {"kind": "std", "value": pytest.approx(math.sqrt(1.25)), "ddof": 0}
    assert stats.summarize([1, 2, 3, 4, 100], "median_mad") == (3.0, {"kind": "mad", "value": 1.0})
    with pytest.raises(ValueError):
        stats.mean_std([])


# Per-prompt s_{p,g}, with ties exactly at τ = 0.5 (exact in binary floating point).
TIES = [[0.5, 0.5, 0.75, 0.25], [0.5, 0.5], [0.75, 0.5], [0.25]]


def test_memorization_rates_strict_at_tau():
    # P1: 1 of 4 gens > 0.5, mean 0.5 (not >), max 0.75; P2: none, mean 0.5, max 0.5; P3: 1/2, 0.625, 0.75; P4: 0.
    assert stats.mr_gen(TIES, 0.5) == (0.25 + 0 + 0.5 + 0) / 4 == 0.1875
    assert stats.mr_mean(TIES, 0.5) == 0.25
    assert stats.mr_any(TIES, 0.5) == 0.5
    assert stats.memorization_rates(TIES, 0.5) == {"gen": 0.1875, "mean": 0.25, "any": 0.5}
    # with ">=" these would be 0.6875 / 0.75 / 0.75
    assert stats.mr_any([[0.7, 0.3]], 0.7) == 0.0 and stats.mr_any([[0.70001]], 0.7) == 1.0


def test_roc_hand_computed():
    # one ROC implementation (scikit-learn's, in the detect plugin): hand-computed values
    from memobench_plugins.detect.roc import detection_metrics

    pos, neg = [0.9, 0.8, 0.7, 0.3], [0.75, 0.4, 0.2, 0.1]
    d = detection_metrics(pos, neg)
    np.testing.assert_allclose(d["roc"]["fpr"], [0, 0, 0, .25, .25, .5, .5, .75, 1])
    np.testing.assert_allclose(d["roc"]["tpr"], [0, .25, .5, .5, .75, .75, 1, 1, 1])
    assert d["roc"]["thresholds"][0] is None  # +inf
    assert d["auc"] == pytest.approx(13 / 16)  # 13 of 16 (pos, neg) pairs ordered correctly
    assert d["acc"] == pytest.approx(0.75)
    assert d["tpr_at_fpr"] == pytest.approx(0.5)


def test_tpr_at_1pct_fpr_is_strict():
    from memobench_plugins.detect.roc import detection_metrics

    # 100 negatives: one at 0.95 (FPR exactly 0.01 once passed), 99 at 0.1; positives 0.99, 0.9, 0.9, 0.5.
    d = detection_metrics([0.99, 0.9, 0.9, 0.5], [0.95] + [0.1] * 99)
    assert d["tpr_at_fpr"] == 0.25  # only FPR < 0.01 counts; FPR <= 0.01 would give 1.0
    assert d["auc"] == pytest.approx(0.01 * 0.25 + 0.99 * 1.0)
    assert d["acc"] == pytest.approx(1 - 0.01 / 2)


def test_roc_needs_both_classes():
    from memobench_plugins.detect.roc import detection_metrics

    with pytest.raises(ValueError):
        detection_metrics([0.2, 0.3], [])


# ---------------------------------------------------------------------------------------------- fake embedder
class FakeEmbedder:
    """Maps image id (the value of every pixel of a 4×4 image) to a fixed unit vector; counts embedded images."""

    impl: ClassVar[dict] = {"name": "fake", "preset": "test", "weights_sha256": "0" * 64}

    def __init__(self, table: dict[int, np.ndarray]):
        self.table, self.calls, self.n_embedded = table, 0, 0

    def embed(self, images):
        self.calls += 1
        self.n_embedded += len(images)
        return np.stack([self.table[int(im[0, 0, 0])] for im in images])


def img(i: int) -> np.ndarray:
    return np.full((4, 4, 3), i, np.uint8)


def unit(*xs: float, dim: int = 8) -> np.ndarray:
    v = np.zeros(dim)
    v[:len(xs)] = xs
    return v


def gen_vec(s: float) -> np.ndarray:
    """Cosine with unit(1) (the reference) is exactly s."""
    return unit(s, math.sqrt(1 - s * s))


def ctx(tmp_path) -> Context:
    return Context(cache_dir=tmp_path, offline=True)


def metric(cls, table, **params):
    m = cls(cls.Params(**params)) if params else cls()
    fake = FakeEmbedder(table)
    m.make_embedder = lambda c: fake
    return m, fake


def ref_samples():
    """Prompts of TIES: P1, P2 VM; P3, P4 TM; P5 VM without reference. Image 1 = reference, 10+ = generations."""
    table = {1: unit(1.0), 2: unit(0, 0, 1.0)}
    samples = []
    iid = 10
    for p, (pid, mt) in enumerate([("p1", "VM"), ("p2", "VM"), ("p3", "TM"), ("p4", "TM")]):
        prompt = Prompt(id=pid, text=pid, mem_type=mt)
        for g, s in enumerate(TIES[p]):
            table[iid] = gen_vec(s)
            samples.append(Sample(f"{pid}-{g}", prompt, seed=g, image=img(iid), references=[img(1)]))
            iid += 1
    p5 = Prompt(id="p5", text="p5", mem_type="VM")
    table[iid] = gen_vec(0.9)
    samples.append(Sample("p5-0", p5, seed=0, image=img(iid), references=[]))
    return samples, table


# ---------------------------------------------------------------------------------------------- metrics
def test_mr_variants_groups_and_missing_refs(tmp_path):
    samples, table = ref_samples()
    m, _ = metric(mem.MemorizationRate, table, threshold=0.5)
    out = m.compute(samples, ctx(tmp_path))
    assert set(out) == {"mr", "mr_gen", "mr_mean", "mr_any"}
    assert all(isinstance(v, MetricValue) for v in out.values())
    # headline = VM prompts p1, p2 (p5 has no reference)
    assert out["mr_gen"].value == pytest.approx((0.25 + 0) / 2)
    assert out["mr_mean"].value == 0.0
    assert out["mr_any"].value == 0.5
    assert out["mr"].value == out["mr_mean"].value and out["mr"].extra["level"] == "mean"
    for v in out.values():
        assert v.n == 2 and v.extra["n_missing_ref"] == 1 and v.extra["headline_group"] == "VM"
        assert v.groups["all"]["n"] == 4 and v.groups["all"]["n_missing_ref"] == 1
        assert v.groups["TM"]["n"] == 2 and v.groups["TM"]["n_missing_ref"] == 0
        assert v.extra["missing_ref_prompts"] == ["p5"]
        assert v.extra["comparison"] == ">"
    assert out["mr_gen"].groups["all"]["value"] == 0.1875
    assert out["mr_mean"].groups["all"]["value"] == 0.25
    assert out["mr_any"].groups["all"]["value"] == 0.5
    assert out["mr_gen"].groups["TM"]["value"] == 0.25
    assert out["mr_gen"].extra["per_prompt"] == {"p1": 0.25, "p2": 0.0, "p3": 0.5, "p4": 0.0}
    assert out["mr_any"].per_sample["p1-2"] == pytest.approx(0.75)
    assert out["mr"].impl["name"] == "fake" and out["mr"].impl["metric"] == "mr"
    json.dumps({k: dataclasses.asdict(v) for k, v in out.items()}, allow_nan=False)  # result records are JSON


def test_mr_default_threshold_tie_at_0_7(tmp_path):
    table = {1: unit(1.0), 10: gen_vec(0.7), 11: gen_vec(0.7), 12: gen_vec(0.7 + 1e-9)}
    pa, pb = Prompt("a", "a", "VM"), Prompt("b", "b", "VM")
    samples = [Sample("a0", pa, 0, img(10), [img(1)]), Sample("a1", pa, 1, img(11), [img(1)]),
               Sample("b0", pb, 0, img(12), [img(1)])]
    m, _ = metric(mem.MemorizationRate, table)
    assert (m.params.threshold, m.params.level, m.params.preset) == (0.7, "mean", "dori2026")
    out = m.compute(samples, ctx(tmp_path))
    assert out["mr"].value == 0.5 and out["mr_any"].value == 0.5 and out["mr_gen"].value == 0.5


def test_mr_headline_all_without_labels(tmp_path):
    samples, table = ref_samples()
    m, _ = metric(mem.MemorizationRate, table, threshold=0.5, headline_group="all")
    out = m.compute(samples, ctx(tmp_path))
    assert out["mr"].value == 0.25 and out["mr"].n == 4 and out["mr"].extra["n_missing_ref"] == 1


def test_sscd_orig_reductions(tmp_path):
    samples, table = ref_samples()
    m, _ = metric(mem.SSCDOrig, table, headline_group="all")
    assert (m.params.gen_reduce, m.params.set_reduce, m.params.ref_reduce) == ("mean", "mean_std", "max")
    v = m.compute(samples, ctx(tmp_path))["sscd_orig"]
    means = [0.5, 0.5, 0.625, 0.25]
    assert v.value == pytest.approx(0.46875)
    assert v.dispersion == {"kind": "std", "value": pytest.approx(math.sqrt(0.0185546875)), "ddof": 0}
    assert v.n == 4 and v.extra["n_missing_ref"] == 1
    assert list(v.extra["per_prompt"].values()) == pytest.approx(means)
    assert v.groups["VM"]["value"] == pytest.approx(0.5) and v.groups["VM"]["dispersion"]["value"] == 0.0
    assert v.per_sample["p3-0"] == pytest.approx(0.75)
    by = v.extra["by_gen_reduce"]
    assert by["max"]["value"] == pytest.approx(np.mean([0.75, 0.5, 0.75, 0.25]))
    assert by["median"]["per_prompt"] == pytest.approx({"p1": 0.5, "p2": 0.5, "p3": 0.625, "p4": 0.25})

    json.dumps(dataclasses.asdict(v), allow_nan=False)

    m, _ = metric(mem.SSCDOrig, table, headline_group="all", gen_reduce="max", set_reduce="median_mad")
    v = m.compute(samples, ctx(tmp_path))["sscd_orig"]
    assert v.value == pytest.approx(0.625) and v.dispersion == {"kind": "mad", "value": pytest.approx(0.125)}


def test_sscd_orig_ref_reduce_median_vs_max(tmp_path):
    table = {1: unit(1.0), 2: unit(0, 0, 1.0), 10: gen_vec(0.8)}
    p = Prompt("a", "a", "VM")
    samples = [Sample("a0", p, 0, img(10), [img(1), img(2)])]
    for rr, want in (("max", 0.8), ("median", 0.4)):
        m, _ = metric(mem.SSCDOrig, table, ref_reduce=rr)
        assert m.compute(samples, ctx(tmp_path))["sscd_orig"].value == pytest.approx(want)
    m, _ = metric(mem.SSCDOrig, table, preset="nemo2024", ref_reduce="preset", gen_reduce="preset",
                  set_reduce="preset")
    v = m.compute(samples, ctx(tmp_path))["sscd_orig"]
    assert v.value == pytest.approx(0.4) and v.dispersion["kind"] == "mad"
    assert (v.extra["ref_reduce"], v.extra["gen_reduce"], v.extra["set_reduce"]) == ("median", "median", "median_mad")


def test_references_embedded_once(tmp_path):
    table = {1: unit(1.0), 10: gen_vec(0.9), 11: gen_vec(0.3)}
    p = Prompt("a", "a", "VM")
    # ten samples, each with its own copy (equal bytes) of the reference; generations repeat two images
    samples = [Sample(f"a{g}", p, g, img(10 + g % 2), [img(1).copy()]) for g in range(10)]
    m, fake = metric(mem.MemorizationRate, table)
    out = m.compute(samples, ctx(tmp_path))
    assert fake.n_embedded == 3 and fake.calls == 1
    assert out["mr_gen"].value == 0.5 and out["mr_mean"].value == 0.0  # mean 0.6


def test_sscd_gen_pairs_by_seed(tmp_path):
    # Baselines b_g = e_g; mitigated m_g = c_g e_g + sqrt(1 - c_g^2) e_{3+g}: only same-seed pairs are non-zero.
    cos = {0: 0.9, 1: 0.2, 2: 0.5}
    table = {}
    for g, c in cos.items():
        table[20 + g] = np.eye(8)[g]
        table[10 + g] = c * np.eye(8)[g] + math.sqrt(1 - c * c) * np.eye(8)[3 + g]
    table[30], table[31] = unit(1.0), unit(0.0, 1.0)
    pa, pb, pc = Prompt("a", "a", "VM"), Prompt("b", "b", "VM"), Prompt("c", "c", "TM")
    samples = [Sample(f"a{g}", pa, g, img(10 + g), [], baseline_image=img(20 + g)) for g in (2, 0, 1)]
    samples += [Sample("b0", pb, 0, img(30), [], baseline_image=img(30)),
                Sample("b1", pb, 1, img(31), [], baseline_image=img(31)),
                Sample("c0", pc, 0, img(30), [], baseline_image=None)]
    m, _ = metric(mem.SSCDGen, table)
    assert mem.SSCDGen.needs_baseline is True
    assert (m.params.gen_reduce, m.params.set_reduce, m.params.preset) == ("median", "median_mad", "nemo2024")
    v = m.compute(samples, ctx(tmp_path))["sscd_gen"]
    assert v.per_sample["a0"] == pytest.approx(0.9) and v.per_sample["a1"] == pytest.approx(0.2)
    assert v.per_sample["a2"] == pytest.approx(0.5)
    assert v.extra["per_prompt"] == pytest.approx({"a": 0.5, "b": 1.0})
    assert v.value == pytest.approx(0.75) and v.dispersion == {"kind": "mad", "value": pytest.approx(0.25)}
    assert v.n == 2 and v.extra["n_missing_baseline"] == 1 and v.extra["n_missing_ref"] == 0


def test_diversity_median_of_pairs(tmp_path):
    table = {10: unit(1.0), 11: unit(1.0, 0.0, 0.0, 1e-12), 12: unit(0.0, 1.0),
             20: unit(1.0), 21: unit(0.6, 0.8), 30: unit(1.0)}
    pa, pb, pc = Prompt("a", "a", "VM"), Prompt("b", "b", "VM"), Prompt("c", "c", "VM")
    samples = [Sample(f"a{g}", pa, g, img(10 + g), []) for g in range(3)]
    samples += [Sample(f"b{g}", pb, g, img(20 + g), []) for g in range(2)] + [Sample("c0", pc, 0, img(30), [])]
    m, _ = metric(mem.Diversity, table)
    v = m.compute(samples, ctx(tmp_path))["diversity"]
    # a: pairs (0,1)=1, (0,2)=0, (1,2)=0 -> median 0; b: 0.6; c: single generation, excluded
    assert v.extra["per_prompt"] == pytest.approx({"a": 0.0, "b": 0.6})
    assert v.value == pytest.approx(0.3) and v.dispersion == {"kind": "mad", "value": pytest.approx(0.3)}
    assert v.n == 2 and v.extra["n_single"] == 1
    assert v.per_sample["a0"] == pytest.approx(0.5)  # median of its similarities to a1 (1) and a2 (0)


def test_all_references_missing_is_unavailable(tmp_path):
    p = Prompt("a", "a", "VM")
    m, _ = metric(mem.SSCDOrig, {10: unit(1.0)})
    v = m.compute([Sample("a0", p, 0, img(10), [])], ctx(tmp_path))["sscd_orig"]
    assert v.value is None and v.unavailable and v.extra["n_missing_ref"] == 1


def test_missing_torchscript_offline_is_reported(tmp_path):
    p = Prompt("a", "a", "VM")
    m = mem.SSCDOrig(backend="torchscript", preset="wen2024")
    v = m.compute([Sample("a0", p, 0, img(10), [img(1)])], ctx(tmp_path))["sscd_orig"]
    assert v.value is None and "sscd_disc_large.torchscript.pt" in v.unavailable


# ---------------------------------------------------------------------------------------------- end to end (ONNX)
def test_end_to_end_onnx_on_photographs(tmp_path):
    import skimage.data
    from PIL import Image

    from memobench.sscd import jpeg_roundtrip

    def photo(name: str) -> np.ndarray:
        a = getattr(skimage.data, name)()
        return np.asarray(Image.fromarray(a).resize((160, 160), Image.Resampling.LANCZOS))

    astro, coffee, chelsea, rocket = (photo(n) for n in ("astronaut", "coffee", "chelsea", "rocket"))
    vm, tm = Prompt("vm", "astronaut", "VM"), Prompt("tm", "coffee", "TM")
    samples = [Sample("vm0", vm, 0, jpeg_roundtrip(astro, 90), [astro], baseline_image=astro),
               Sample("vm1", vm, 1, astro, [astro], baseline_image=astro),
               Sample("tm0", tm, 0, chelsea, [coffee], baseline_image=chelsea),
               Sample("tm1", tm, 1, rocket, [coffee], baseline_image=chelsea)]
    c = Context(cache_dir=tmp_path, offline=True)
    mr = mem.MemorizationRate(backend="onnx").compute(samples, c)
    assert mr["mr"].value == 1.0 and mr["mr"].groups["TM"]["value"] == 0.0
    assert mr["mr"].impl["backend"] == "onnx" and mr["mr"].impl["preset"] == "dori2026"
    orig = mem.SSCDOrig(backend="onnx").compute(samples, c)["sscd_orig"]
    assert orig.value > 0.9 and orig.groups["TM"]["value"] < 0.3
    gen = mem.SSCDGen(backend="onnx").compute(samples, c)["sscd_gen"]
    assert gen.per_sample["vm1"] == pytest.approx(1.0, abs=0.01) and gen.per_sample["tm1"] < 0.3


# ---------------------------------------------------------------------------------------------- plugin
def test_plugin_registers_four_metrics():
    pm = pluggy.PluginManager("memobench")
    pm.add_hookspecs(hookspecs)
    pm.register(mem, name="memorization")
    got = []
    pm.hook.register_metrics(register=got.append)
    assert {c.name for c in got} == {"mr", "sscd_orig", "sscd_gen", "diversity"}
    for cls in got:
        assert cls.info.name == cls.name and cls.info.higher_is_better is False
        assert "METHODS §4" in cls.__doc__
        assert cls.Params().preset in ("dori2026", "nemo2024")
    assert mem.MemorizationRate.make_params({"threshold": "0.5"}).threshold == 0.5


def test_plugin_import_is_torch_free():
    code = ("import sys, memobench_plugins.memorization, memobench.sscd, memobench.stats; "
            "assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
