"""SAIL (Jeon et al., ICML 2025): the loss and one Adam step on x_T against values computed here by hand from raw UNet
calls, the reference's stale-direction variant, acceptance per seed and the later rounds' fresh candidates (on a
stub loss), the threshold schedule, parameter checks and ``memobench ls``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import memobench_plugins.sail as S
from memobench.api import BadInput, Conditioning, Context, Prompt
from memobench_plugins.sail import SAIL

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
    """ε_c − ε_u at t_0 from one raw UNet call (ε-prediction; DDIM's scale_model_input is the identity)."""
    t = m.timesteps(STEPS)[0]
    b = x.shape[0]
    emb = torch.cat([cond.negative_prompt_embeds.expand(b, -1, -1), cond.prompt_embeds.expand(b, -1, -1)])
    out = m.unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample
    return out[b:] - out[:b]


def _loss_by_hand(m, x, cond, x_dir=None):
    """f·(‖ε̃(x + r·d̂)‖ + 0.05·‖x‖), f = √(16384/256) = 8, r = 1/8, d̂ = ε̃(x_dir)/‖ε̃(x_dir)‖."""
    f = math.sqrt(16384 / x[0].numel())
    d = _eps_diff(m, x if x_dir is None else x_dir, cond)
    d_hat = d / d.flatten().norm()
    return f * (_eps_diff(m, x + d_hat / f, cond).flatten().norm() + 0.05 * x.flatten().norm())


@pytest.mark.parametrize("direction_at", ["current", "initial"])
def test_loss_and_one_adam_step_by_hand(sd14, direction_at):
    cond = _cond(sd14)
    x0 = sd14.initial_latents([0])
    x = x0.clone().requires_grad_(True)
    with torch.enable_grad():
        l0 = _loss_by_hand(sd14, x, cond)
        (g,) = torch.autograd.grad(l0, [x])  # through both UNet calls (d̂ is not detached)
    x1 = x0 - 0.05 * g / (g.abs() + 1e-8)  # Adam's first step: lr·m̂/(√v̂ + eps) = lr·g/(|g| + eps)
    with torch.no_grad():
        l1 = _loss_by_hand(sd14, x1, cond, x_dir=x0 if direction_at == "initial" else None)
    l0 = l0.detach()
    assert float(l1) < float(l0)  # the step went down: a threshold between them accepts x1, not x0
    thr = (float(l0) + float(l1)) / 2
    out = SAIL(threshold=thr, max_steps=2, direction_at=direction_at).condition(sd14, PROMPT, cond, x0, _ctx())
    tr = out.trace["sail"]
    assert tr["initial_loss"][0] == pytest.approx(float(l0), rel=1e-5)
    assert tr["per_seed"][0]["round"] == 0 and tr["per_seed"][0]["step"] == 1
    assert tr["per_seed"][0]["loss"] == pytest.approx(float(l1), rel=1e-5)
    assert torch.allclose(out.latents, x1, atol=1e-6)
    assert tr["norm_factor"] == 8.0 and tr["radius_applied"] == 0.125
    assert out.guidance is None and all(p.grad is None for p in sd14.unet.parameters())


def test_stale_direction_differs_from_the_current_one(sd14):
    cond = _cond(sd14)
    x0 = sd14.initial_latents([0])
    x1 = x0 + 0.3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert not math.isclose(float(_loss_by_hand(sd14, x1, cond)), float(_loss_by_hand(sd14, x1, cond, x0)),
                                rel_tol=1e-4)


def test_all_accepted_at_once_keeps_the_seeded_latents(sd14):
    lat = sd14.initial_latents([0, 1, 2])
    out = SAIL(threshold=1e9).condition(sd14, PROMPT, _cond(sd14), lat, _ctx())
    assert torch.equal(out.latents, lat)
    tr = out.trace["sail"]
    assert tr["rounds"] == 1 and tr["accepted"] == 3 and tr["kept_own_seed"] == 3


def test_rounds_fill_free_slots_with_fresh_candidates_in_order(sd14, monkeypatch):
    """Stub loss L(x) = ‖x‖ (no UNet): seed 0's latent is accepted at once; seed 1's (×100) never comes under the
    threshold in round 0 and gets round 1's first fresh candidate (generator seed 42 + 1)."""
    monkeypatch.setattr(S, "sail_loss", lambda model, x, *a, **k: x.flatten(1).norm(dim=1))
    lat = sd14.initial_latents([0, 1])
    lat[1] *= 100
    out = SAIL(threshold=100.0, max_steps=2).condition(sd14, PROMPT, _cond(sd14), lat, _ctx())
    fresh = torch.randn((8, *lat.shape[1:]), generator=torch.Generator().manual_seed(43))
    assert torch.equal(out.latents[0], lat[0]) and torch.equal(out.latents[1], fresh[0])
    tr = out.trace["sail"]
    assert [s["round"] for s in tr["per_seed"]] == [0, 1] and tr["rounds"] == 2 and tr["kept_own_seed"] == 1


def test_threshold_rises_after_every_three_failed_rounds_and_the_cap_keeps_the_best(sd14, monkeypatch):
    monkeypatch.setattr(S, "sail_loss", lambda model, x, *a, **k: x.flatten(1).norm(dim=1))
    lat = sd14.initial_latents([0])
    out = SAIL(threshold=-1.0, max_steps=3, max_rounds=7).condition(sd14, PROMPT, _cond(sd14), lat, _ctx())
    tr = out.trace["sail"]
    assert tr["rounds"] == 7 and tr["accepted"] == 0
    assert tr["final_threshold"] == pytest.approx(-1.0 + 2 * 0.1)  # after failed rounds 3 and 6
    # the cap: the lowest-loss iterate of the seed's own round-0 run (Adam shrinks ‖x‖: the last of 3)
    x = lat.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    for _ in range(2):
        x.grad = torch.autograd.grad(x.flatten(1).norm(dim=1).sum(), [x])[0]
        opt.step()
    assert torch.allclose(out.latents, x.detach(), atol=1e-6)
    assert tr["per_seed"][0]["round"] is None


@pytest.mark.parametrize("kv,msg", [({"lr": 0.0}, "lr"), ({"radius": -1.0}, "radius"), ({"max_steps": 0}, "max_steps"),
                                    ({"budget": 0}, "budget"), ({"direction_at": "stale"}, "direction_at"),
                                    ({"loss_norm": "joint"}, "loss_norm"), ({"reg_weight": -0.1}, "reg_weight"),
                                    ({"reference_latent": "4x64"}, "reference_latent")])
def test_bad_parameters(kv, msg):
    with pytest.raises(BadInput, match=f"sail' parameter {msg}"):
        SAIL.make_params(kv)


def test_ls_lists_sail_with_descriptions(cli_inproc, monkeypatch):
    from dataclasses import fields

    from memobench.api import param_help

    monkeypatch.setenv("COLUMNS", "400")
    rc, out, err = cli_inproc(["ls", "mitigations"])
    assert rc == 0, err
    text = " ".join(out.split())
    assert "sail" in text
    for f in fields(SAIL.Params):
        help_ = param_help(SAIL, f.name)
        assert help_ and f"{f.name}={f.default!r} — {' '.join(help_.split())}" in text, f.name
