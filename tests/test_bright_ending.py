"""Bright Ending (Chen et al., ICLR 2025): the BE mask from a crafted attention record and from the BE pass on SD
v1.4's block layout (end token, last step, conditional half, heads and layers averaged), one masked-loss AdamW step
by hand, the uniform-mask case equal to Wen's objective, and the plugin's listing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from memobench.api import BadInput, Conditioning, Context, Guidance, Prompt, cross_attention
from memobench_plugins.bright_ending import (BrightEndingMitigation, be_mask, masked_noise_norm)
from memobench_plugins.wen import joint_noise_norm

PROMPT = Prompt("p0", "a red cube on a table")
GEN = {"num_inference_steps": 2, "guidance_scale": 5.0}


@pytest.fixture(scope="module")
def sd14(tmp_path_factory):
    from memobench.model import DiffusionModel
    from memobench_plugins.sd_random.testing import tiny_random_pipeline

    torch.set_num_threads(1)
    tok = tmp_path_factory.mktemp("tok") / "tokenizer"
    return DiffusionModel(tiny_random_pipeline(sd14_layout=True, tokenizer_dir=tok), "tiny-random-sd14")


@pytest.fixture
def ctx(tmp_path):
    return Context(cache_dir=tmp_path, generation=dict(GEN))


def _cond(m, text=PROMPT.text):
    return Conditioning(m.encode_prompt(PROMPT.text), m.empty_embedding(), text=text)


def test_be_mask_from_a_crafted_record():
    G, H, h, w, T, k = 2, 3, 2, 2, 5, 2
    g = torch.Generator().manual_seed(0)
    recs = {f"down_blocks.0.attentions.{i}.transformer_blocks.0.attn2":
            torch.rand(2 * G * H, h * w, T, generator=g).softmax(-1) for i in range(2)}
    want = np.zeros((G, 1, h, w))
    for gi in range(G):
        for pix in range(h * w):
            vals = [float(r[(G + gi) * H + hd, pix, k]) for r in recs.values() for hd in range(H)]
            want[gi, 0, pix // w, pix % w] = sum(vals) / len(vals)  # equal heads per layer: the mean of means
    m = be_mask(recs, G, k, (h, w))
    assert m.shape == (G, 1, h, w) and np.allclose(m.numpy(), want, atol=1e-7)
    binary = be_mask(recs, G, k, (h, w), threshold=0.9)
    assert np.array_equal(binary.numpy(), (want >= 0.9 * want.reshape(G, -1).max(1).reshape(G, 1, 1, 1)) * 1.0)
    with pytest.raises(ValueError, match="no cross-attention layer"):
        be_mask({}, G, k, (h, w))


class _Index(Guidance):
    def __init__(self):
        self.i = -1

    def before_step(self, index, timestep, latents):
        self.i = index


def test_be_pass_uses_the_end_token_at_the_last_step(sd14, ctx):
    lat = sd14.initial_latents([0, 1])
    mit = BrightEndingMitigation()
    m, info = mit.bright_ending_mask(sd14, PROMPT, _cond(sd14), lat, ctx)
    # independently: the last step's probabilities of the down-block layers at 8×8, by loops
    idx, last = _Index(), {}
    c = _cond(sd14)

    def rec(name, p):
        if idx.i == 1 and name.startswith("down_blocks.0."):
            last[name] = p.clone()

    with torch.no_grad(), cross_attention(sd14.unet, record=rec):
        sd14.denoise(c.prompt_embeds, c.negative_prompt_embeds, lat, 2, 5.0, guidance=idx)
    assert sorted(last) == info["layers"] and len(last) == 2  # SD v1.4: two transformer blocks at full resolution
    k = sd14.prompt_length(PROMPT.text) - 1
    assert info["end_token"] == k == 7 and info["step"] == 1
    heads = sd14.unet.get_submodule(info["layers"][0]).heads
    want = np.zeros((2, 1, 8, 8))
    for gi in range(2):
        acc = sum(last[n][(2 + gi) * heads + hd, :, k] for n in last for hd in range(heads)) / (2 * heads)
        want[gi, 0] = acc.view(8, 8).numpy()
    assert np.allclose(m.numpy(), want, atol=1e-6)
    assert info["mean"] == pytest.approx(want.mean(axis=(1, 2, 3)).tolist(), abs=1e-6)


def test_one_masked_loss_gradient_step_by_hand(sd14, ctx):
    lat = sd14.initial_latents([0, 1])
    mask = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) + 0.05
    cond = _cond(sd14)
    mit = BrightEndingMitigation(max_iters=1, target_loss=0.0)
    out = mit.mitigate(sd14, PROMPT, cond, lat, ctx, mask)
    tr = out.trace["bright_ending"]
    assert tr["iterations"] == 1 and len(tr["losses"]) == 1
    # by hand: L = sqrt(Σ_g Σ_c Σ_p (m_g,p (ε_c − ε_u)_g,c,p)²) / mean(m) · sqrt(N_ref / N), N_ref = 1·4·64·64
    t0 = sd14.timesteps(2)[0]
    e0 = cond.prompt_embeds.float().clone().requires_grad_(True)
    with torch.enable_grad():
        x = sd14.scheduler.scale_model_input(torch.cat([lat, lat]), t0)
        emb = torch.cat([cond.negative_prompt_embeds.expand(2, -1, -1), e0.expand(2, -1, -1)])
        eu, ec = sd14.eps(x, t0, emb).chunk(2)
        total = 0.0
        for gi in range(2):
            for ch in range(4):
                total = total + ((ec[gi, ch] - eu[gi, ch]) * mask[gi, 0]).pow(2).sum()
        scale = math.sqrt(4 * 64 * 64 / (2 * 4 * 8 * 8))
        loss = total.sqrt() / mask.mean() * scale
        (g,) = torch.autograd.grad(loss, [e0])
    assert tr["losses"][0] == pytest.approx(float(loss.detach()), rel=1e-5) and tr["loss_scale"] == pytest.approx(scale)
    g[:, 0] = 0
    lr, wd = 0.05, 0.01  # AdamW's first step: decoupled decay, then lr · ĝ/(|ĝ| + 1e-8) (bias-corrected moments)
    want = e0.detach() * (1 - lr * wd) - lr * g / (g.abs() + 1e-8)
    assert torch.allclose(out.prompt_embeds.float(), want, atol=1e-6)
    # a uniform mask is Wen's objective exactly; this mask is not
    with torch.no_grad():
        assert float(masked_noise_norm(ec, eu, torch.full_like(mask, 0.3))) == pytest.approx(
            float(joint_noise_norm(ec, eu)), rel=1e-6)
        assert float(masked_noise_norm(ec, eu, mask)) != pytest.approx(float(joint_noise_norm(ec, eu)), rel=1e-3)


def test_condition_traces_the_mask_and_the_optimisation(sd14, ctx):
    lat = sd14.initial_latents([0, 1])
    mit = BrightEndingMitigation(max_iters=2, target_loss=0.0)
    out = mit.condition(sd14, PROMPT, _cond(sd14, text=None), lat, ctx)
    tr = json.loads(json.dumps(out.trace["bright_ending"]))
    assert tr["iterations"] == 2 and tr["mask"]["prompt_length_from"] == "target prompt"
    assert tr["mask"]["shape"] == [2, 1, 8, 8] and len(tr["mask"]["mean"]) == 2 and tr["mask"]["step"] == 1
    assert not torch.equal(out.prompt_embeds, _cond(sd14).prompt_embeds)
    assert mit.report()["prompts"][PROMPT.id]["iterations"] == 2


def test_bad_parameters(sd14, ctx):
    with pytest.raises(BadInput, match="mask_layers"):
        BrightEndingMitigation.make_params({"mask_layers": "mid"})
    with pytest.raises(BadInput, match="mask_threshold"):
        BrightEndingMitigation.make_params({"mask_threshold": "2"})
    with pytest.raises(BadInput, match="mask_step"):
        BrightEndingMitigation(mask_step=5).condition(sd14, PROMPT, _cond(sd14), sd14.initial_latents([0]), ctx)


def test_ls_lists_bright_ending_with_descriptions(cli_inproc, monkeypatch):
    from memobench.api import param_help

    monkeypatch.setenv("COLUMNS", "400")
    rc, out, err = cli_inproc(["ls", "mitigations"])
    assert rc == 0, err
    rows = out.split("│ bright_ending ", 1)[1].split("\n")[:14]  # one parameter per row
    defaults = {"lr": "0.05", "max_iters": "10", "target_loss": "1.0", "reference_images": "1",
                "mask_step": "-1", "mask_layers": "'down-full'", "mask_threshold": "-1.0"}
    for name, default in defaults.items():
        assert any(f"{name}={default} — {param_help(BrightEndingMitigation, name)}" in r for r in rows), name
