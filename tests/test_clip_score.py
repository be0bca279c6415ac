"""The ``clip_score`` metric plugin (memobench_plugins.clip_score): raw CLIP cosine via open_clip (METHODS §5.1).

No CLIP weights can be downloaded here, so the real code path (open_clip model creation from a weights file or a
``local-dir`` folder, open_clip's real BPE tokenizer, preprocessing, encoding, aggregation) runs on a tiny random-weight
open_clip ``CLIP`` built from a config; the numbers are checked against a hand computation. Absent weights give
``unavailable`` with a reason, never a number.
"""

from __future__ import annotations

import json
import subprocess
import sys

import memobench_plugins.clip_score as cs
import numpy as np
import pluggy
import pytest

from memobench import hookspecs
from memobench.api import Context, Prompt, Sample

TINY_CFG = {"embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TINY_ARCH = "memobench-test-tiny-clip"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> dict:
    """A tiny random open_clip CLIP saved two ways: a ``local-dir`` folder and a bare safetensors file whose
    architecture is registered with open_clip under a test name."""
    import open_clip
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    model = CLIP(**TINY_CFG)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder = root / "local"
    folder.mkdir()
    save_file(state, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_CFG,
        "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"}}))
    cfg_dir = root / "configs"
    cfg_dir.mkdir()
    (cfg_dir / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(1)
    file = root / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in CLIP(**TINY_CFG).state_dict().items()}, str(file))
    return {"dir": folder, "file": file}


def _samples() -> list[Sample]:
    """3 prompts × 4 generations (seeds 0..3) of random 48×40 images; prompt 2 is longer than 77 tokens."""
    rng = np.random.default_rng(0)
    texts = ["a red cube on a table", "a photograph of an astronaut riding a horse",
             " ".join(["a very long caption"] * 40)]
    return [Sample(sample_key=f"k{p}-{g}", prompt=Prompt(id=f"p{p}", text=texts[p], mem_type="NONMEM"), seed=g,
                   image=rng.integers(0, 256, (48, 40, 3), dtype=np.uint8), references=[], role="utility")
            for p in range(3) for g in range(4)]


def _hand_cosines(metric: cs.ClipScore, samples: list[Sample], ctx: Context) -> dict[str, float]:
    """Per-sample raw cosine computed by hand from the loaded model's features."""
    import torch
    from PIL import Image

    model, preprocess, tokenizer, _ = metric.load(ctx)
    out = {}
    with torch.no_grad():
        for s in samples:
            fi = model.encode_image(preprocess(Image.fromarray(s.image)).unsqueeze(0))[0].double().numpy()
            ft = model.encode_text(tokenizer([s.prompt.text]))[0].double().numpy()
            out[s.sample_key] = float(np.dot(fi, ft) / (np.sqrt(np.dot(fi, fi)) * np.sqrt(np.dot(ft, ft))))
    return out


# ---------------------------------------------------------------------------------------------- arithmetic
def test_raw_cosine_hand_computed():
    img = np.array([[3.0, 4.0], [1.0, 0.0], [-2.0, 0.0], [0.0, 5.0]])
    txt = np.array([4.0, 3.0])
    # (3,4)·(4,3)/(5·5) = 24/25; (1,0)·(4,3)/5 = 0.8; (-2,0) -> -0.8 (negative: not clipped); (0,5) -> 0.6
    np.testing.assert_allclose(cs.raw_cosine(img, txt), [0.96, 0.8, -0.8, 0.6], rtol=0, atol=1e-15)
    np.testing.assert_allclose(cs.raw_cosine(10 * img, txt / 7), cs.raw_cosine(img, txt), atol=1e-15)  # scale-free
    np.testing.assert_allclose(cs.raw_cosine([[1.0, 0.0]], [[0.0, 1.0]]), [0.0])
    assert np.all(np.abs(cs.raw_cosine(np.random.default_rng(0).normal(size=(50, 8)), np.ones(8))) <= 1.0)


def test_reductions_lower_median_and_mad():
    assert cs.lower_median([4, 1, 3, 2]) == 2.0  # torch.median: lower middle value
    assert cs.reduce_values([4, 1, 3, 2], "median", "average") == 2.5
    assert cs.reduce_values([4, 1, 3, 2], "median", "lower") == 2.0
    assert cs.reduce_values([4, 1, 3, 2], "mean") == 2.5
    # values 0.1, 0.2, 0.4, 0.8: lower median 0.2; |v - 0.2| = 0.1, 0, 0.2, 0.6 -> lower median 0.1
    v, d = cs.summarize([0.8, 0.1, 0.4, 0.2], "median_mad", "lower")
    assert v == 0.2 and d["kind"] == "mad" and d["value"] == pytest.approx(0.1, abs=1e-15)
    v, d = cs.summarize([0.8, 0.1, 0.4, 0.2], "median_mad", "average")
    assert v == pytest.approx(0.3) and d["value"] == pytest.approx(0.15)  # |v-.3| = .5,.2,.1,.1
    assert cs.summarize([0.8, 0.1, 0.4, 0.2], "mean") == (pytest.approx(0.375), None)


def test_plugin_registers_both_variants():
    pm = pluggy.PluginManager("memobench")
    pm.add_hookspecs(hookspecs)
    pm.register(cs, name="clip_score")
    got = []
    pm.hook.register_metrics(register=got.append)
    assert [c.name for c in got] == ["clip_score", "clip_score_wen2024"]
    for cls in got:
        assert cls.roles == ("utility",) and cls.info.name == cls.name and cls.info.higher_is_better
        assert "METHODS §5.1" in cls.__doc__
    assert cs.ClipScore.Params().variant == "nemo2024" and cs.ClipScoreWen.Params().variant == "wen2024"
    nemo, wen = cs.VARIANTS["nemo2024"], cs.VARIANTS["wen2024"]
    assert (nemo.arch, nemo.pretrained, nemo.quick_gelu, nemo.gen_reduce, nemo.set_reduce) == \
        ("ViT-B-32", "openai", True, "median", "median_mad")
    assert (wen.arch, wen.pretrained, wen.gen_reduce, wen.set_reduce) == \
        ("ViT-g-14", "laion2b_s12b_b42k", "mean", "mean")


def test_plugin_import_is_torch_free():
    code = "import sys, memobench_plugins.clip_score; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------- end to end
def test_nemo_variant_end_to_end_on_tiny_local_dir_model(tiny_clip, tmp_path):
    ctx = Context(cache_dir=tmp_path, offline=True)
    m = cs.ClipScore(cs.ClipScore.Params(weights_path=str(tiny_clip["dir"])))
    samples = _samples()
    out = m.compute(list(reversed(samples)), ctx)  # input order does not matter
    assert set(out) == {"clip_score"}
    v = out["clip_score"]
    assert v.unavailable is None and v.n == 3

    # the real open_clip tokenizer: BPE ids with start/end tokens, truncated to 77
    _, _, tok, impl = m.load(ctx)
    ids = tok(["a red cube", samples[8].prompt.text])
    assert ids.shape == (2, 77) and int(ids[0, 0]) == 49406 and 49407 in ids[0].tolist()
    assert impl["tokenizer"].startswith("open_clip SimpleTokenizer (context_length 77")

    hand = _hand_cosines(m, samples, ctx)
    assert set(v.per_sample) == set(hand)
    for k, c in hand.items():
        assert v.per_sample[k] == pytest.approx(c, abs=1e-5)
        assert -1.0 <= v.per_sample[k] <= 1.0  # raw cosine: not x100
    per_prompt = {f"p{p}": sorted(hand[f"k{p}-{g}"] for g in range(4))[1] for p in range(3)}  # lower median of 4
    assert v.extra["per_prompt"] == pytest.approx(per_prompt, abs=1e-5)
    vals = sorted(per_prompt.values())
    med = vals[1]
    mad = sorted(abs(x - med) for x in vals)[1]
    assert v.value == pytest.approx(med, abs=1e-5) and v.dispersion["value"] == pytest.approx(mad, abs=1e-5)
    assert v.dispersion["kind"] == "mad" and v.groups["NONMEM"]["value"] == v.value

    assert impl["variant"] == "nemo2024" and impl["score"].startswith("raw cosine")
    assert impl["library"].startswith("open_clip ") and impl["precision"] == "fp32"
    assert list(impl["weights_sha256"]) == ["open_clip_model.safetensors"]
    assert (impl["gen_reduce"], impl["set_reduce"], impl["median"]) == ("median", "median_mad", "lower")


def test_wen_variant_with_weights_file_and_registered_config(tiny_clip, tmp_path):
    ctx = Context(cache_dir=tmp_path, offline=True)
    m = cs.ClipScoreWen(cs.ClipScoreWen.Params(arch=TINY_ARCH, weights_path=str(tiny_clip["file"])))
    samples = _samples()
    v = m.compute(samples, ctx)["clip_score_wen2024"]
    assert v.unavailable is None
    hand = _hand_cosines(m, samples, ctx)
    per_prompt = {f"p{p}": float(np.mean([hand[f"k{p}-{g}"] for g in range(4)])) for p in range(3)}
    assert v.extra["per_prompt"] == pytest.approx(per_prompt, abs=1e-5)
    assert v.value == pytest.approx(np.mean(list(per_prompt.values())), abs=1e-5) and v.dispersion is None
    assert v.impl["arch"] == TINY_ARCH and v.impl["weights"] == str(tiny_clip["file"])
    assert len(v.impl["weights_sha256"]) == 64 and v.impl["variant"] == "wen2024"
    # a different checkpoint gives different numbers (the weights really are loaded)
    other = cs.ClipScoreWen(cs.ClipScoreWen.Params(weights_path=str(tiny_clip["dir"]))).compute(samples, ctx)
    assert other["clip_score_wen2024"].value != pytest.approx(v.value, abs=1e-6)


def test_openai_torchscript_file_found_in_open_clip_cache(tmp_path):
    """nemo2024 without weights_path: the openai tag's file in open_clip's cache (``<cache_dir>/ViT-B-32.pt``, the
    TorchScript archive that openai's ``clip.load`` also reads) is found and rebuilt by
    ``open_clip.load_openai_model``."""
    import warnings

    import torch
    from open_clip.model import CLIP

    cfg = {"embed_dim": 16, "quick_gelu": True,  # openai format: head width 64 is implied by the state dict
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}}
    torch.manual_seed(2)
    model = CLIP(**cfg).eval()
    mask = model.attn_mask
    del model.attn_mask  # openai's archives carry no attn_mask buffer
    model.attn_mask = mask
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (torch.zeros(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long)),
                                 check_trace=False)
    cache = tmp_path / "clip-cache"
    cache.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.save is deprecated in recent torch
        torch.jit.save(traced, str(cache / "ViT-B-32.pt"))
    ctx = Context(cache_dir=tmp_path, offline=True)
    m = cs.ClipScore(cs.ClipScore.Params(cache_dir=str(cache)))
    samples = _samples()[:4]
    v = m.compute(samples, ctx)["clip_score"]
    assert v.unavailable is None
    assert v.impl["weights_format"].startswith("openai TorchScript") and "open_clip cache" in v.impl["weights"]
    assert v.impl["quick_gelu"] is True and v.impl["pretrained"] == "openai"
    hand = _hand_cosines(m, samples, ctx)
    assert v.per_sample == pytest.approx(hand, abs=1e-5)
    assert v.value == pytest.approx(sorted(hand.values())[1], abs=1e-5)  # one prompt: lower median of 4


def test_absent_weights_unavailable_with_reason(tiny_clip, tmp_path):
    empty_cache = tmp_path / "empty-cache"
    empty_cache.mkdir()
    ctx = Context(cache_dir=tmp_path, offline=True)
    samples = _samples()
    for cls in (cs.ClipScore, cs.ClipScoreWen):
        v = cls(cls.Params(cache_dir=str(empty_cache))).compute(samples, ctx)[cls.name]
        assert v.value is None and v.unavailable and "offline" in v.unavailable and "weights_path" in v.unavailable
    v = cs.ClipScore(cs.ClipScore.Params(weights_path=str(tmp_path / "nope.safetensors"))).compute(samples, ctx)
    assert v["clip_score"].value is None and "does not exist" in v["clip_score"].unavailable
    v = cs.ClipScore(cs.ClipScore.Params(weights_path=str(empty_cache))).compute(samples, ctx)
    assert v["clip_score"].value is None and "open_clip_config.json" in v["clip_score"].unavailable
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    v = cs.ClipScore(cs.ClipScore.Params(arch=TINY_ARCH, weights_path=str(bad))).compute(samples, ctx)
    assert v["clip_score"].value is None and v["clip_score"].unavailable.startswith("could not load CLIP")
    assert cs.ClipScore().compute([], ctx)["clip_score"].unavailable == "no utility samples to score"
