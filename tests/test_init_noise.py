"""init_noise (Han et al., NeurIPS 2025): one per-sample AdamW step and one batch-wise step against values computed
here by hand from raw UNet calls, the norms on the reference's size, per-sample independence, the deferred-CFG
weights, parameter checks and ``memobench ls``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from memobench.api import BadInput, Conditioning, Context, Prompt
from memobench_plugins.init_noise import DeferredCFG, InitNoise, norm_factor

PROMPT = Prompt("p0", "a photo of a cat sitting on a red mat", mem_type="VM")
STEPS = 3


@pytest.fixture(scope="module")
def sd14(tmp_path_factory):
    """SD v1.4's layout (ε-prediction, DDIM), reduced width; 8×8 latents (256 elements per sample)."""
    from memobench.model import DiffusionModel
    from memobench_plugins.sd_random.testing import tiny_random_pipeline

    torch.set_num_threads(1)
    tok = tmp_path_factory.mktemp("tok") / "tokenizer"
    return DiffusionModel(tiny_random_pipeline(sd14_layout=True, tokenizer_dir=tok), "tiny-random-sd14")


def _cond(m):
    return Conditioning(m.encode_prompt(PROMPT.text), m.empty_embedding(), text=PROMPT.text)


def _ctx():
    return Context(cache_dir=Path("."), generation={"num_inference_steps": STEPS, "guidance_scale": 5.0})


def _eps_diff(m, x, cond):
    """ε_c − ε_u at t_0 from one raw UNet call (ε-prediction model; DDIM's scale_model_input is the identity)."""
    t = m.timesteps(STEPS)[0]
    b = x.shape[0]
    emb = torch.cat([cond.negative_prompt_embeds.expand(b, -1, -1), cond.prompt_embeds.expand(b, -1, -1)])
    out = m.unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample
    return out[b:] - out[:b]


def test_norm_factor_puts_norms_on_the_reference_size():
    assert norm_factor(4 * 64 * 64, "reference", "4x64x64") == 1.0  # the reference's own size: untouched
    assert norm_factor(4 * 16 * 16, "reference", "4x64x64") == 4.0  # √(16384 / 1024)
    assert norm_factor(4 * 16 * 16, "raw", "4x64x64") == 1.0


def test_one_per_sample_adamw_step_by_hand(sd14):
    cond = _cond(sd14)
    x0 = sd14.initial_latents([0])
    out = InitNoise(max_iters=1, target_loss=0.0).condition(sd14, PROMPT, cond, x0, _ctx())
    # by hand: L = ‖ε̃(x)‖·√(16384/256); AdamW's first step: x·(1 − lr·wd) − lr·g/(|g| + 1e-8)
    factor = math.sqrt(16384 / x0[0].numel())
    x = x0.clone().requires_grad_(True)
    with torch.enable_grad():
        loss = _eps_diff(sd14, x, cond).flatten().norm() * factor
        (g,) = torch.autograd.grad(loss, [x])
    want = x0 * (1 - 0.01 * 0.01) - 0.01 * g / (g.abs() + 1e-8)
    assert torch.allclose(out.latents, want, atol=1e-6)
    tr = out.trace["init_noise"]
    assert tr["iterations"] == [1] and tr["norm_factor"] == factor
    assert tr["initial_loss"][0] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert out.guidance is None  # per-sample: plain CFG afterwards


def test_per_sample_stops_each_latent_at_its_target_and_samples_are_independent(sd14):
    cond = _cond(sd14)
    lat = sd14.initial_latents([0, 1])
    with torch.no_grad():
        l0 = (_eps_diff(sd14, lat, cond).flatten(1).norm(dim=1) * math.sqrt(16384 / lat[0].numel())).tolist()
    target = sum(l0) / 2  # between the two initial losses: the lower one stops before any update
    m = InitNoise(max_iters=3, target_loss=target)
    both = m.condition(sd14, PROMPT, cond, lat, _ctx())
    low, high = (0, 1) if l0[0] < l0[1] else (1, 0)
    assert torch.equal(both.latents[low], lat[low])  # reached: untouched (no update, no weight decay)
    assert both.trace["init_noise"]["iterations"][low] == 0 and both.trace["init_noise"]["reached_target"][low]
    # the other latent, alone, follows the same path: the batch is G independent reference runs. Up to the CPU
    # kernels' rounding of a batch of 2 vs 1, which AdamW's g/(|g| + eps) amplifies where |g| is tiny (seen: 6.8e-6
    # after 3 steps on one machine, < 1e-6 on another); coupled samples would differ by about a step, lr = 1e-2
    alone = m.condition(sd14, PROMPT, cond, lat[high:high + 1], _ctx())
    assert torch.allclose(both.latents[high], alone.latents[0], atol=1e-4)
    assert both.trace["init_noise"]["iterations"][high] == alone.trace["init_noise"]["iterations"][0] > 0


def test_one_batch_wise_step_by_hand(sd14):
    cond = _cond(sd14)
    x0 = sd14.initial_latents([0, 1])
    out = InitNoise(variant="batch_wise", adj_iters=1).condition(sd14, PROMPT, cond, x0, _ctx())
    # by hand: ρ on the run's size = 50·√(256/16384) = 6.25; δ̂ = ρ·ε̃/‖ε̃‖ per sample; x − 0.7·(ε̃(x+δ̂) − ε̃(x))
    rho = 50 * math.sqrt(x0[0].numel() / 16384)
    assert rho == 6.25
    with torch.no_grad():
        d = _eps_diff(sd14, x0, cond)
        mag = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        d2 = _eps_diff(sd14, x0 + rho * d / mag, cond)
        want = x0 - 0.7 * (d2 - d)
    assert torch.allclose(out.latents, want, atol=1e-5)
    assert out.latents.shape == x0.shape
    tr = out.trace["init_noise"]
    assert tr["rho_applied"] == pytest.approx(6.25) and tr["iterations"] == 1
    assert isinstance(out.guidance, DeferredCFG)


def test_batch_wise_defers_cfg_for_the_first_five_steps():
    last = InitNoise.Params().apply_cfg_step  # 4 (--apply_cfg_step): steps 0..4 unguided
    w = [DeferredCFG(last).scale(i, None, None, None, None, 7.0) for i in range(8)]
    assert w == [0.0] * 5 + [7.0] * 3


def test_the_models_parameters_get_no_gradient(sd14):
    InitNoise(max_iters=2, target_loss=0.0).condition(sd14, PROMPT, _cond(sd14), sd14.initial_latents([0]), _ctx())
    assert all(p.grad is None for p in sd14.unet.parameters())


@pytest.mark.parametrize("kv,msg", [({"variant": "both"}, "variant"), ({"loss_norm": "joint"}, "loss_norm"),
                                    ({"lr": 0.0}, "lr"), ({"rho": -1.0}, "rho"), ({"max_iters": -1}, "max_iters"),
                                    ({"reference_latent": "64x64"}, "reference_latent"),
                                    ({"apply_cfg_step": -2}, "apply_cfg_step")])
def test_bad_parameters(kv, msg):
    with pytest.raises(BadInput, match=f"init_noise' parameter {msg}"):
        InitNoise.make_params(kv)


def test_ls_lists_init_noise_with_descriptions(cli_inproc, monkeypatch):
    from dataclasses import fields

    from memobench.api import param_help

    monkeypatch.setenv("COLUMNS", "400")
    rc, out, err = cli_inproc(["ls", "mitigations"])
    assert rc == 0, err
    text = " ".join(out.split())
    assert "init_noise" in text
    for f in fields(InitNoise.Params):
        help_ = param_help(InitNoise, f.name)
        assert help_ and f"{f.name}={f.default!r} — {' '.join(help_.split())}" in text, f.name
