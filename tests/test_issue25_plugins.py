"""Issue 25, defects 5, 6, 8 and 9: the plugins on the real Stable Diffusion path.

* (5) Wen's stopping threshold is on the reference's scale: the joint norm over the run's G×C×h×w is rescaled to
  the reference's 4 images of 4×64×64 (``loss_norm = "reference"``), so it no longer grows with the number of seeds;
  at the reference's own shape it is the raw joint norm bit for bit.
* (6) NeMo's θ schedule stops at θ_min for float steps (0.2, 0.1) with the candidate counts METHODS §7.1.4 implies.
* (8) One resolution per run: DoRI, advft, NeMo and Wanda run the UNet on latents of the run's generation size
  (``ctx.generation``; here 2× the native size of a tiny random pipeline), ``memobench run`` takes
  ``--height/--width``, and ``encode_image`` takes an optional size (default unchanged).
* (9) advft: train a subset (``train_params``), keep one copy of the original weights (CPU memory or disk) and give
  them back bit for bit, fp32 master weights for half-precision models.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from memobench.api import Conditioning, Context, Prompt
from memobench.registry import get_registry
from memobench_plugins import nemo as N
from memobench_plugins import wanda as W
from memobench_plugins.advft import AdversarialFineTuning
from memobench_plugins.dori import DoRIAttack
from memobench_plugins.wen import WenMitigation

PROMPT = Prompt("p0", "a photo of a cat sitting on a red mat", mem_type="VM", reference_ids=("r",))
NONMEM = [f"a photo of a {w}" for w in "cat dog house tree car boat bird fish".split()]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tmp_path_factory.mktemp("tok") / "tokenizer"


@pytest.fixture(scope="module")
def sd14(tok):
    """SD v1.4's block layout at reduced width; native 16 px (8×8 latents, VAE factor 2)."""
    from memobench.model import DiffusionModel
    from memobench_plugins.sd_random.testing import tiny_random_pipeline

    torch.set_num_threads(1)
    return DiffusionModel(tiny_random_pipeline(sd14_layout=True, tokenizer_dir=tok), "tiny-random-sd14")


@pytest.fixture(scope="module")
def small(tok):
    from memobench.model import DiffusionModel
    from memobench_plugins.sd_random.testing import tiny_random_pipeline

    return DiffusionModel(tiny_random_pipeline(tokenizer_dir=tok), "tiny-random")


def _gen(size: int, steps: int = 3) -> dict:
    return {"num_inference_steps": steps, "guidance_scale": 3.0, "height": size, "width": size}


class UNetShapes:
    """Records the spatial size of every UNet input while active."""

    def __init__(self, model):
        self.model, self.shapes = model, []

    def __enter__(self):
        self.h = self.model.unet.register_forward_pre_hook(
            lambda m, args: self.shapes.append(tuple(args[0].shape[-2:])))
        return self

    def __exit__(self, *exc):
        self.h.remove()


# ------------------------------------------------------------------------------------------ (5) Wen
def _wen_first_loss(model, latents, **kw) -> dict:
    cond = Conditioning(model.encode_prompt(PROMPT.text), model.empty_embedding(), text=PROMPT.text)
    ctx = Context(cache_dir=Path("."), generation=_gen(model.resolution))
    return WenMitigation(target_loss=0.0, max_iters=1, **kw).condition(model, PROMPT, cond, latents, ctx).trace["wen"]


def test_wen_threshold_does_not_depend_on_the_number_of_seeds(small):
    lat4 = small.initial_latents([0, 1, 2, 3])
    lat8 = torch.cat([lat4, lat4])  # the same four images twice: the same per-image noise, twice the elements
    t4, t8 = _wen_first_loss(small, lat4), _wen_first_loss(small, lat8)
    assert t8["losses"][0] == pytest.approx(t4["losses"][0], rel=1e-5)
    # the raw joint norm grows with √G (version 1's criterion, still available as loss_norm="joint")
    j4, j8 = _wen_first_loss(small, lat4, loss_norm="joint"), _wen_first_loss(small, lat8, loss_norm="joint")
    assert j8["losses"][0] == pytest.approx(math.sqrt(2) * j4["losses"][0], rel=1e-5)
    # the factor is √(N_ref / N), N_ref = 4 × 4×64×64 (the reference's G = 4 at 512 px on SD v1.4)
    n4 = lat4.numel()
    assert t4["loss_scale"] == pytest.approx(math.sqrt(4 * 4 * 64 * 64 / n4))
    assert t4["losses"][0] == pytest.approx(j4["losses"][0] * t4["loss_scale"], rel=1e-6)
    assert t8["loss_norm"] == "reference" and t8["latent_shape"] == list(lat8.shape)


def test_wen_at_the_reference_shape_is_the_raw_joint_norm(tok):
    """G = 4 latents of 4×64×64 (the reference's tensor): factor exactly 1, losses bit-identical to the raw norm."""
    from memobench.model import DiffusionModel
    from memobench_plugins.sd_random.testing import tiny_random_pipeline

    m = DiffusionModel(tiny_random_pipeline(tokenizer_dir=tok, sample_size=64), "tiny-random-64")
    lat = m.initial_latents([0, 1, 2, 3])
    assert tuple(lat.shape) == (4, 4, 64, 64)
    ref, joint = _wen_first_loss(m, lat), _wen_first_loss(m, lat, loss_norm="joint")
    assert ref["loss_scale"] == 1.0 and ref["losses"] == joint["losses"]


def test_wen_loss_norm_parameters_are_checked():
    with pytest.raises(ValueError, match="loss_norm"):
        WenMitigation(loss_norm="per_image")
    with pytest.raises(ValueError, match="reference_latent"):
        WenMitigation(reference_latent="64x64")
    assert WenMitigation.Params().loss_norm == "reference" and WenMitigation.Params().reference_images == 4


# ------------------------------------------------------------------------------------------ (6) NeMo θ
@pytest.mark.parametrize("step,n,last", [(0.25, 16, 1.25), (0.2, 20, 1.2), (0.1, 40, 1.1)])
def test_nemo_theta_schedule_stops_at_theta_min_for_float_steps(step, n, last):
    sched = N.theta_k_schedule(theta_step=step)
    assert len(sched) == n  # θ = 5 … θ_min + Δθ, k = 0 … n − 1 (METHODS §7.1.4 step 3)
    assert [k for _, k in sched] == list(range(n))
    assert [th for th, _ in sched] == pytest.approx([5 - i * step for i in range(n)], abs=1e-12)
    assert sched[-1][0] == pytest.approx(last, abs=1e-12)
    # the selection loop itself: every candidate fails, τ_ref falls back to the last score
    r = N.initial_selection(None, None, None, lambda sets: 0.9, theta_step=step)
    assert r["n_candidates"] == n and r["theta"] == pytest.approx(last) and r["tau_ref"] == 0.9


def test_nemo_theta_schedule_keeps_the_exact_cases():
    assert N.theta_k_schedule()[-1] == (1.25, 15)  # the defaults, bit for bit
    s0 = N.theta_k_schedule(theta_min=0)  # advft's surrogate NeMo
    assert len(s0) == 20 and s0[-1] == (0.25, 19)
    s3 = N.theta_k_schedule(theta_step=0.3)  # a step that does not divide θ_init − θ_min: stops above θ_min
    assert len(s3) == 14 and s3[-1][0] == pytest.approx(1.1)
    with pytest.raises(ValueError, match="theta_step"):
        N.theta_k_schedule(theta_step=0)


# ------------------------------------------------------------------------------------------ (8) resolution
def test_encode_image_takes_an_optional_size(sd14):
    from memobench.model import to_model_resolution, to_size

    img = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    assert tuple(sd14.encode_image(img).shape) == (1, 4, 8, 8)  # default: the native 16 px
    assert tuple(sd14.encode_image(img, height=32, width=48).shape) == (1, 4, 16, 24)
    assert np.array_equal(to_size(img, 24, 24), to_model_resolution(img, 24))
    assert to_size(img, 16, 32).shape == (16, 32, 3)
    # a 2:1 crop of a 60×40 image keeps the full width: the centre 30 rows
    assert np.array_equal(to_size(img, 30, 60), img[5:35])


def test_dori_attacks_at_the_run_resolution(sd14):
    ref = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    ctx = Context(cache_dir=Path("."), generation=_gen(32))  # 2× native
    with UNetShapes(sd14) as rec:
        out = DoRIAttack(steps=2, batch=2).run(sd14, PROMPT, ref, ctx)
    assert rec.shapes and set(rec.shapes) == {(16, 16)}
    assert out.trace["latent_shape"] == [1, 4, 16, 16]
    # without a run context: the native size, as before
    with UNetShapes(sd14) as rec:
        DoRIAttack(steps=1, batch=1).run(sd14, PROMPT, ref, None)
    assert set(rec.shapes) == {(8, 8)}


# cheap: every seed passes, the first candidate (top-1 per layer, no OOD neuron at θ = 1e9) is accepted
NEMO_FAST = dict(samples_per_prompt=2, pairwise_threshold=-1.0, initial_threshold=2.0, refinement_threshold=-1.0,
                 k_init=1, theta_init=1e9)


def test_nemo_detects_on_latents_of_the_run_resolution(sd14, tmp_path):
    ctx = Context(cache_dir=tmp_path, nonmem_prompts=NONMEM, generation=_gen(32))
    m = N.NeMo(**NEMO_FAST)
    with UNetShapes(sd14) as rec:
        m.fit(sd14, [PROMPT], ctx)
    assert rec.shapes and set(rec.shapes) == {(16, 16)}
    assert m.report()["detection_size"] == [32, 32]
    with UNetShapes(sd14) as rec:
        m.select_for_embedding(sd14, sd14.encode_prompt(PROMPT.text), ctx)
    assert rec.shapes and set(rec.shapes) == {(16, 16)}
    # the native size localizes again (its own cache entry), on native latents
    native = N.NeMo(**NEMO_FAST)
    with UNetShapes(sd14) as rec:
        native.fit(sd14, [PROMPT], Context(cache_dir=tmp_path, nonmem_prompts=NONMEM, generation=_gen(16)))
    assert rec.shapes and set(rec.shapes) == {(8, 8)}


def test_wanda_statistics_at_the_run_resolution(sd14, tmp_path):
    ctx = Context(cache_dir=tmp_path, generation=_gen(32))
    m = W.Wanda(skill_ratio=0.1, num_inference_steps=4, timesteps=2)
    with UNetShapes(sd14) as rec:
        m.fit(sd14, [PROMPT], ctx)
    assert rec.shapes and set(rec.shapes) == {(16, 16)}
    assert m.report()["statistics_size"] == [32, 32]
    with UNetShapes(sd14) as rec:  # embedding masks default to the fitted size
        m.embedding_masks(sd14, sd14.encode_prompt(PROMPT.text))
    assert rec.shapes and set(rec.shapes) == {(16, 16)}
    fresh = W.Wanda(skill_ratio=0.1, num_inference_steps=4, timesteps=2)  # not fitted: the run's size from ctx
    with UNetShapes(sd14) as rec:
        fresh.embedding_masks(sd14, sd14.encode_prompt(PROMPT.text), ctx=ctx)
    assert rec.shapes and set(rec.shapes) == {(16, 16)}
    native = W.Wanda(skill_ratio=0.1, num_inference_steps=4, timesteps=2)
    with UNetShapes(sd14) as rec:
        native.fit(sd14, [PROMPT], Context(cache_dir=tmp_path, generation=_gen(16)))
    assert rec.shapes and set(rec.shapes) == {(8, 8)}  # not the 2× masks from the cache


def _advft_ctx(tmp_path, size: int):
    target = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    reg = get_registry()
    if "dori" not in reg.entries["attack"] or "tiny-general" not in reg.entries["prompt_set"]:
        pytest.skip("built-in plugins not installed as entry points (run `uv sync`)")
    return Context(cache_dir=tmp_path / "cache", seeds=(0,), registry=reg, references=lambda p: [target],
                   generation=_gen(size), model_prompt_sets={"regular": "tiny-general"})


ADVFT = dict(epochs=1, dori_steps=2, dori_batch=2, steps_per_epoch=3, lr=1e-3, n_regular=4, regular_batch=2,
             surrogate="none", surrogate_params="", surrogate_tries=1, inits="prompt")


def test_advft_encodes_generates_and_trains_at_the_run_resolution(small, tmp_path):
    native = small.resolution
    ctx = _advft_ctx(tmp_path, 2 * native)
    m = AdversarialFineTuning(**ADVFT)
    with UNetShapes(small) as rec:
        m.fit(small, [PROMPT], ctx)
    # surrogate generation, DoRI and every fine-tuning step see latents of the run's size
    lat = 2 * native // small.vae_scale_factor
    assert rec.shapes and set(rec.shapes) == {(lat, lat)}
    assert m.report()["size"] == [2 * native, 2 * native]


def test_cli_run_takes_height_and_width(tiny_pipe, tmp_path, cli_inproc):
    out, cache = tmp_path / "out", tmp_path / "cache"
    rc, _, err = cli_inproc(["run", "--model", "tiny", "--model-param", f"path={tiny_pipe}", "--attack", "dori",
                             "--attack-param", "steps=1", "--attack-param", "batch=1", "--steps", "2",
                             "--seeds", "0", "--limit", "1", "--height", "32", "--width", "32", "-o", out,
                             "--cache-dir", cache, "--offline", "--metric", "mr", "--no-progress"])
    assert rc == 0, err
    (path,) = list(Path(out).rglob("*.json"))
    result = json.loads(path.read_text())
    assert result["generation"]["height"] == 32 and result["generation"]["width"] == 32
    (trace,) = result["attack_traces"].values()
    assert trace["latent_shape"][-2:] == [16, 16]  # the tiny random pipeline: native 16 px, VAE factor 2
    rows = [json.loads(x) for x in (path.parent / result["samples_file"]).read_text().splitlines()]
    from PIL import Image

    img = Image.open(cache / "images" / rows[0]["image_path"].removeprefix("images/"))
    assert img.size == (32, 32)


# ------------------------------------------------------------------------------------------ (9) advft memory
def _unet(model) -> dict:
    return {n: q.detach().clone() for n, q in model.unet.named_parameters()}


def test_advft_trains_a_subset_and_restores_the_model(small, tmp_path):
    ctx = _advft_ctx(tmp_path, small.resolution)
    before = _unet(small)
    m = AdversarialFineTuning(**ADVFT, train_params="xattn")
    m.fit(small, [PROMPT], ctx)
    assert all(torch.equal(before[n], q) for n, q in small.unet.named_parameters()), "fit changed the model"
    assert all(not q.requires_grad and q.grad is None for q in small.unet.parameters())
    from memobench_plugins.advft import trainable_parameters

    xattn = {n for n, _ in trainable_parameters(small.unet, "xattn")}
    assert xattn and all(".attn2." in n for n in xattn)
    assert set(m._state) == xattn  # only the trained tensors are kept (and saved)
    rep = m.report()
    assert rep["train_params"] == "xattn" and rep["n_trained_parameters"] == sum(before[n].numel() for n in xattn)
    with m.apply(small, PROMPT, ctx):
        inside = _unet(small)
    changed = {n for n in before if not torch.equal(before[n], inside[n])}
    assert changed and changed <= xattn
    assert all(torch.equal(before[n], q) for n, q in small.unet.named_parameters())
    with pytest.raises(ValueError, match="train_params"):
        AdversarialFineTuning(**ADVFT, train_params="ffn").fit(small, [PROMPT], ctx)


@pytest.mark.parametrize("copy", ["cpu", "disk"])
def test_advft_keeps_one_original_copy_and_gives_it_back(small, tmp_path, copy):
    ctx = _advft_ctx(tmp_path, small.resolution)
    before = _unet(small)
    m = AdversarialFineTuning(**ADVFT, original_copy=copy)
    m.fit(small, [PROMPT], ctx)
    assert all(torch.equal(before[n], q) for n, q in small.unet.named_parameters())
    assert m.report()["original_copy"] == copy
    tmp = tmp_path / "cache" / "tmp"
    assert not tmp.exists() or not list(tmp.iterdir())  # a disk copy is removed after the fit
    # the fine-tuned tensors are the trained parameters themselves, not clones of clones: one per parameter
    ptrs = {q.data_ptr() for q in small.unet.parameters()}
    assert not ptrs & {t.data_ptr() for t in m._state.values()}
    # the same fine-tuning whichever way the original was kept (a fresh fit in a new cache; CPU kernels may differ
    # in the last bits between calls in one process, and AdamW moves a weight by at most ~lr per step)
    other = AdversarialFineTuning(**ADVFT, original_copy="disk" if copy == "cpu" else "cpu")
    other.fit(small, [PROMPT], _advft_ctx(tmp_path / "other", small.resolution))
    assert set(m._state) == set(other._state)
    bound = ADVFT["steps_per_epoch"] * ADVFT["lr"]
    assert max(float((m._state[n] - other._state[n]).abs().max()) for n in m._state) <= bound


def test_advft_fused_optimizer_option(small, tmp_path):
    ctx = _advft_ctx(tmp_path, small.resolution)
    before = _unet(small)
    m = AdversarialFineTuning(**ADVFT, optimizer="adamw_fused", train_params="attn")
    m.fit(small, [PROMPT], ctx)
    assert m.report()["optimizer"] == "adamw_fused"
    assert all(torch.equal(before[n], q) for n, q in small.unet.named_parameters())
    with pytest.raises(ValueError, match="optimizer"):
        AdversarialFineTuning(**ADVFT, optimizer="adam8bit").fit(small, [PROMPT], ctx)


def test_advft_half_precision_trains_through_an_fp32_master_copy(tok, tmp_path):
    """bf16 has 8 significant bits: for |w| ≥ 1/16 one AdamW step of size ≤ lr = 1e-4 is below half a unit in the
    last place (≥ 2.4e-4), so bf16 weights updated in place never move. With the fp32 master copy the steps add up
    (8 steps: up to 8e-4) and the bf16 weights change."""
    from memobench.model import DiffusionModel
    from memobench_plugins.sd_random.testing import tiny_random_pipeline

    model = DiffusionModel(tiny_random_pipeline(tokenizer_dir=tok), "tiny-random-bf16", dtype=torch.bfloat16)
    ctx = _advft_ctx(tmp_path, model.resolution)
    before = _unet(model)
    m = AdversarialFineTuning(**{**ADVFT, "steps_per_epoch": 8, "lr": 1e-4, "train_params": "xattn"})
    m.fit(model, [PROMPT], ctx)
    assert all(torch.equal(before[n], q) for n, q in model.unet.named_parameters())
    rep = m.report()
    assert rep["master_dtype"] == "float32" and rep["model_dtype"] == "bfloat16"
    big = changed = 0
    for n, t in m._state.items():
        assert t.dtype == torch.bfloat16
        sel = before[n].float().abs() >= 1 / 16
        big += int(sel.sum())
        changed += int((t[sel] != before[n][sel]).sum())
    assert big > 100 and changed / big > 0.2, (changed, big)


def test_master_step_equals_a_clipped_adamw_step_and_skips_fp16_overflow():
    """_MasterStep (chunked, one fp32 gradient chunk at a time) = clip_grad_norm_ + AdamW over all masters at once."""
    from memobench_plugins.advft import _MasterStep

    g = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (128, 64), (7,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(torch.bfloat16)) for s in shapes]
    grads = [torch.randn(s, generator=g).to(torch.bfloat16) * 3 for s in shapes]
    masters = [q.detach().float().clone() for q in params]
    ref = [q.detach().float().clone().requires_grad_(True) for q in params]
    step = _MasterStep(params, masters, torch.optim.AdamW(masters, lr=0.01, weight_decay=0.0), fp16=False)
    step.CHUNK_BYTES = 64 * 32 * 4  # several chunks
    ref_opt = torch.optim.AdamW(ref, lr=0.01, weight_decay=0.0)
    for _ in range(3):
        for q, gr, r in zip(params, grads, ref):
            q.grad = gr.clone()
            r.grad = gr.float()
        step(1.0)
        torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ref_opt.step()
        assert all(q.grad is None and m.grad is None for q, m in zip(params, masters))
        for m, r, q in zip(masters, ref, params):
            assert torch.allclose(m, r.detach(), atol=1e-6)
            assert torch.equal(q.detach(), m.to(torch.bfloat16))
    # fp16: an overflowing gradient skips the step and halves the loss scale
    p16 = [torch.nn.Parameter(torch.ones(4, dtype=torch.float16))]
    m16 = [p16[0].detach().float().clone()]
    s16 = _MasterStep(p16, m16, torch.optim.AdamW(m16, lr=0.1), fp16=True)
    p16[0].grad = torch.tensor([1.0, float("inf"), 0.0, 0.0], dtype=torch.float16)
    s16(1.0)
    assert s16.skipped == 1 and s16.scale == 2.0 ** 15 and torch.equal(m16[0], torch.ones(4))
    p16[0].grad = torch.full((4,), 2.0 ** 15, dtype=torch.float16)  # = 1.0 per element after unscaling
    s16(1.0)
    assert s16.skipped == 1 and bool((m16[0] < 1).all()) and torch.equal(p16[0].detach(), m16[0].half())
