"""Wen et al.'s training-time mitigation (``wen_train``, METHODS §7.2 last paragraph): one filtered step against
hand-computed values on a stub model, the magnitude on a real (random) UNet against an independent computation,
the fit/apply cycle (shared model untouched, weights swapped in and restored bit for bit, artifact cached), and the
``ls`` listing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from memobench.api import BadInput, Context, Prompt
from memobench.registry import get_registry
from memobench_plugins.wen_train import WenTrainingMitigation, filter_step, magnitude_scale


# ------------------------------------------------------------------------------------------- stub model
class _Stub:
    """f(x, t, e) = w·x + e[:, 0, 0] (broadcast over C×h×w); ᾱ_t = 0.36 for every t (√ᾱ = 0.6, √(1−ᾱ) = 0.8)."""

    dtype = torch.float32

    def __init__(self, prediction_type="epsilon"):
        self.prediction_type = prediction_type
        self.w = torch.zeros((), requires_grad=True)

    def add_noise(self, z0, noise, t):
        return 0.6 * z0 + 0.8 * noise

    def unet_output(self, x, t, e):
        return self.w * x + e[:, 0, 0].view(-1, 1, 1, 1)

    def to_eps(self, out, x, t):
        return out if self.prediction_type == "epsilon" else 0.6 * out + 0.8 * x

    def target(self, z0, noise, t):
        return noise if self.prediction_type == "epsilon" else 0.6 * noise - 0.8 * z0


def _batch():
    # one sample = 1×2×2 (N = 4 elements): ‖(c_i − c_∅)·1‖₂ = 2·|c_i|, with c_∅ = 0
    c = torch.tensor([0.5, 1.0, 0.99, 3.0])  # magnitudes 1, 2 (= threshold: dropped), 1.98, 6
    e = torch.zeros(4, 77, 3)
    e[:, 0, 0] = c
    z0 = torch.arange(1.0, 5.0).view(4, 1, 1, 1).expand(4, 1, 2, 2).clone()  # x_i = 0.6·i + 0.8 = 1.4, 2.0, 2.6, 3.2
    noise = torch.ones(4, 1, 2, 2)
    return z0, noise, torch.tensor([10, 500, 700, 999]), e, torch.zeros(1, 77, 3)


def test_filter_step_against_hand_computed_values():
    m = _Stub()
    z0, noise, t, e, empty = _batch()
    loss, mags, keep = filter_step(m, z0, noise, t, e, empty, threshold=2.0)
    assert mags.tolist() == pytest.approx([1.0, 2.0, 1.98, 6.0])
    assert keep.tolist() == [True, False, True, False]  # the script keeps norm < threshold: 2.0 itself is dropped
    # kept samples 0 and 2: prediction c_i (w = 0), target ε = 1 → ((0.5 − 1)² + (0.99 − 1)²) / 2
    assert float(loss.detach()) == pytest.approx((0.25 + 0.0001) / 2, abs=1e-7)
    # only the kept samples feed the gradient: dL/dw = 2/(2·4) · Σ_kept 4·(c_i − 1)·x_i = −0.5·1.4 − 0.01·2.6
    (g,) = torch.autograd.grad(loss, [m.w])
    assert float(g) == pytest.approx(-0.726, abs=1e-6)


def test_filter_step_scale_and_empty_batch():
    m = _Stub()
    z0, noise, t, e, empty = _batch()
    _, mags, keep = filter_step(m, z0, noise, t, e, empty, threshold=2.0, scale=0.5)
    assert mags.tolist() == pytest.approx([0.5, 1.0, 0.99, 3.0]) and keep.tolist() == [True, True, True, False]
    loss, mags, keep = filter_step(m, z0, noise, t, e, empty, threshold=0.5)
    assert loss is None and not keep.any()  # nothing kept: no loss, the fit makes no update


def test_magnitude_of_eps_on_a_v_prediction_model():
    """v-prediction: ε_c − ε_u = √ᾱ_t·(v_c − v_u); 'output' takes the raw v difference, as the script's line."""
    m = _Stub("v_prediction")
    z0, noise, t, e, empty = _batch()
    _, mags_eps, _ = filter_step(m, z0, noise, t, e, empty, threshold=2.0, magnitude_of="eps")
    _, mags_out, _ = filter_step(m, z0, noise, t, e, empty, threshold=2.0, magnitude_of="output")
    assert mags_out.tolist() == pytest.approx([1.0, 2.0, 1.98, 6.0])
    assert mags_eps.tolist() == pytest.approx([0.6, 1.2, 1.188, 3.6])
    loss, _, keep = filter_step(m, z0, noise, t, e, empty, threshold=2.0)  # eps: samples 0, 1, 2 kept
    assert keep.tolist() == [True, True, True, False]
    # v target 0.6·1 − 0.8·z0 = −0.2, −1.0, −1.8 for z0 = 1, 2, 3; prediction c_i
    want = ((0.5 + 0.2) ** 2 + (1.0 + 1.0) ** 2 + (0.99 + 1.8) ** 2) / 3
    assert float(loss.detach()) == pytest.approx(want, rel=1e-6)


def test_magnitude_scale_follows_the_reference_latent():
    assert magnitude_scale(16 * 16 * 16) == 2.0  # the embedded model's 16×16×16 latent
    assert magnitude_scale(4 * 64 * 64) == 1.0  # SD v1.4 at 512 px: the script's norm itself
    assert magnitude_scale(4 * 8 * 8) == 8.0 and magnitude_scale(4096, "raw") == 1.0
    with pytest.raises(BadInput, match="reference_latent"):
        WenTrainingMitigation(reference_latent="64x64")
    with pytest.raises(BadInput, match="magnitude_of"):
        WenTrainingMitigation(magnitude_of="x0")


# ---------------------------------------------------------------------------------- tiny random pipeline
PROMPT = Prompt("p0", "a photo of a cat sitting on a red mat", mem_type="VM", reference_ids=("r",))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from memobench.model import DiffusionModel
    from memobench_plugins.sd_random.testing import tiny_random_pipeline

    torch.set_num_threads(1)
    pipe = tiny_random_pipeline(tokenizer_dir=tmp_path_factory.mktemp("tok") / "tokenizer",
                                prediction_type="v_prediction")
    return DiffusionModel(pipe, model_id="test-wen-train")


def _ctx(tmp_path, model):
    r = model.resolution
    target = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    reg = get_registry()
    if "tiny-general" not in reg.entries["prompt_set"]:
        pytest.skip("built-in plugins not installed as entry points (run `uv sync`)")
    return Context(cache_dir=tmp_path / "cache", seeds=(0,), registry=reg, references=lambda p: [target],
                   generation={"num_inference_steps": 3, "guidance_scale": 3.0, "height": r, "width": r},
                   model_prompt_sets={"regular": "tiny-general"})


def test_filter_step_magnitude_on_a_real_unet(model):
    """The per-sample magnitude equals ‖ε(x_t, e_p) − ε(x_t, e_∅)‖₂ computed here from two direct UNet calls."""
    g = torch.Generator().manual_seed(3)
    c, h, w = model.latent_shape()
    z0, noise = torch.randn(3, c, h, w, generator=g), torch.randn(3, c, h, w, generator=g)
    t = torch.tensor([50, 400, 950])
    e = model.encode_prompt(["a red circle", "a blue square", PROMPT.text]).float()
    empty = model.empty_embedding().float()
    with torch.no_grad():
        _, mags, _ = filter_step(model, z0, noise, t, e, empty, threshold=1e9, scale=1.5)
        ab = model.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1).float()
        x = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
        vc = model.unet(x, t, encoder_hidden_states=e).sample
        vu = model.unet(x, t, encoder_hidden_states=empty.expand(3, -1, -1)).sample
        want = [1.5 * float((ab[i].sqrt() * (vc[i] - vu[i])).norm()) for i in range(3)]  # ε diff of a v model
    assert mags.tolist() == pytest.approx(want, rel=1e-5)


def _params(model):
    return {n: p.detach().clone() for n, p in model.unet.named_parameters()}


FAST = {"steps": 4, "batch": 4, "n_regular": 4, "lr": 1e-3}


def test_fit_trains_caches_and_apply_restores_bit_for_bit(model, tmp_path):
    ctx = _ctx(tmp_path, model)
    before = _params(model)
    storage = {n: p.data.data_ptr() for n, p in model.unet.named_parameters()}
    m = WenTrainingMitigation(**FAST, hard_threshold=math.inf)  # nothing dropped: every step updates
    m.fit(model, [PROMPT], ctx)
    assert all(torch.equal(before[n], p) for n, p in model.unet.named_parameters()), "fit changed the shared model"
    assert all(not p.requires_grad and p.grad is None for p in model.unet.parameters())
    rep = m.report()
    assert rep["batch"] == {"memorized": 1, "regular": 3} and rep["n_memorized_pairs"] == 1
    assert rep["updates"] == 4 and rep["dropped_memorized_per_step"] == [0] * 4
    assert rep["dropped_regular_per_step"] == [0] * 4 and rep["regular_prompts"] == "tiny-general"
    assert rep["unet_sha256_original"] != rep["unet_sha256_finetuned"]
    with m.apply(model, PROMPT, ctx):
        inside = _params(model)
    assert sum(not torch.equal(before[n], inside[n]) for n in before) > len(before) // 2
    for n, p in model.unet.named_parameters():  # the original tensors themselves are back
        assert torch.equal(before[n], p) and p.data.data_ptr() == storage[n]
    m2 = WenTrainingMitigation(**FAST, hard_threshold=math.inf)  # a second instance loads the cached artifact
    m2.fit(model, [PROMPT], ctx)
    assert m2.report()["file"] == rep["file"] and rep["file"].endswith(".safetensors")
    with m2.apply(model, PROMPT, ctx):
        assert all(torch.equal(inside[n], p) for n, p in model.unet.named_parameters())


def test_fit_with_every_sample_dropped_leaves_the_weights(model, tmp_path):
    ctx = _ctx(tmp_path, model)
    m = WenTrainingMitigation(**FAST, hard_threshold=0.0)  # every magnitude is ≥ 0: every sample dropped
    m.fit(model, [PROMPT], ctx)
    rep = m.report()
    assert rep["updates"] == 0 and rep["skipped_steps"] == 4
    assert rep["dropped_memorized_per_step"] == [1] * 4 and rep["dropped_regular_per_step"] == [3] * 4
    assert rep["memorized"]["dropped_fraction"] == 1.0
    assert rep["unet_sha256_original"] == rep["unet_sha256_finetuned"]


def test_fit_needs_memorized_pairs(model, tmp_path):
    ctx = _ctx(tmp_path, model)
    ctx.references = lambda p: []
    with pytest.raises(BadInput, match="training image"):
        WenTrainingMitigation(**FAST).fit(model, [PROMPT], ctx)


def test_ls_lists_wen_train_with_descriptions(cli_inproc, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    rc, out, err = cli_inproc(["ls", "mitigations"])
    assert rc == 0, err
    text = " ".join(out.split())
    assert "wen_train" in text
    assert "hard_threshold=2.0 — --hard_threshold (README 'Ours')" in text
    assert "mem_fraction=0.25 — memorized share of each batch" in text
