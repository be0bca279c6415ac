"""MemAttn (Ren et al., ECCV 2024): the cross-attention logit edit by hand on SD v1.4's block layout, when it is
active (only inside the denoising loop of its own conditioning), the prompt length it masks with, the entropy
statistic, and the plugin's listing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from memobench.api import BadInput, Conditioning, Context, Prompt
from memobench_plugins.memattn import MemAttnMitigation, attention_entropy, rescale_logits

PROMPT = Prompt("p0", "a red cube on a table")
LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


@pytest.fixture(scope="module")
def sd14(tmp_path_factory):
    from memobench.model import DiffusionModel
    from memobench_plugins.sd_random.testing import tiny_random_pipeline

    torch.set_num_threads(1)
    tok = tmp_path_factory.mktemp("tok") / "tokenizer"
    return DiffusionModel(tiny_random_pipeline(sd14_layout=True, tokenizer_dir=tok), "tiny-random-sd14")


@pytest.fixture
def ctx(tmp_path):
    return Context(cache_dir=tmp_path, generation={"num_inference_steps": 2, "guidance_scale": 5.0})


def _cond(m, text=PROMPT.text):
    return Conditioning(m.encode_prompt(PROMPT.text), m.empty_embedding(), text=text)


def test_rescale_logits_by_hand():
    # 2 samples × 1 head (rows: u, c), 1 pixel, 5 tokens; keep 3 tokens, C = 2
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0]], [[1.5, -1.0, 0.5, 7.0, 8.0]]])
    out = rescale_logits(x, 2.0, keep=3)
    inf = float("-inf")
    assert out.tolist() == [[[1.0, 2.0, 3.0, inf, inf]], [[3.0, -1.0, 0.5, inf, inf]]]
    # unconditional half unmasked when mask_uncond is False; no mask at all with keep None
    assert rescale_logits(x, 2.0, 3, mask_uncond=False)[0].tolist() == [[1.0, 2.0, 3.0, 4.0, 5.0]]
    assert rescale_logits(x, 2.0, None)[1].tolist() == [[3.0, -1.0, 0.5, 7.0, 8.0]]
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(rescale_logits(x, 2.0, 3).softmax(-1)[1, 0, 0], [x])
    assert g[1, 0, 3:].abs().sum() == 0 and g[1, 0, 0] != 0  # differentiable; masked tokens get no gradient


def test_prompt_length_is_bos_words_eos(sd14):
    ids = sd14.tokenize([PROMPT.text])[0].tolist()
    n = ids.index(49407) + 1  # the first EOS, counted
    assert sd14.prompt_length(PROMPT.text) == n == 8  # BOS a red cube on a table EOS
    assert sd14.prompt_length("word " * 100) == 77  # truncated at 77


def test_one_layer_probabilities_by_hand(sd14, ctx):
    """Inside the loop: one layer's attention probabilities equal softmax of the hand-edited Q Kᵀ/√d."""
    mit = MemAttnMitigation(c1=1.5)
    seen = {}
    attn = sd14.unet.get_submodule(LAYER)

    def grab(mod, args, kwargs):
        seen.setdefault("x", (args[0] if args else kwargs["hidden_states"]).detach().double())
        seen.setdefault("enc", kwargs["encoder_hidden_states"].detach().double())

    lat = sd14.initial_latents([0, 1])
    h = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), mit.apply(sd14, PROMPT, ctx):
            cond = mit.condition(sd14, PROMPT, _cond(sd14), lat, ctx)
            mit._hooks.record = lambda name, p: seen.setdefault(name, p.detach().double())
            sd14.denoise(cond.prompt_embeds, cond.negative_prompt_embeds, lat, 2, 5.0, guidance=cond.guidance)
            assert mit._hooks.edit_logits is None  # disarmed after the last step
    finally:
        h.remove()
    n = sd14.prompt_length(PROMPT.text)
    assert cond.trace["memattn"]["attended_tokens"] == n and cond.trace["memattn"]["masked_tokens"] == 77 - n
    # by hand, in float64, from the layer's own weights and the inputs of the first step
    x, enc, heads = seen["x"], seen["enc"], attn.heads
    q = x @ attn.to_q.weight.double().T
    k = enc @ attn.to_k.weight.double().T
    B, P, D = q.shape
    d = D // heads
    want = np.zeros((B * heads, P, 77))
    for b in range(B):  # rows: sample-major, heads minor; samples 0..1 unconditional, 2..3 conditional
        for hd in range(heads):
            s = (q[b, :, hd * d:(hd + 1) * d] @ k[b, :, hd * d:(hd + 1) * d].T).numpy() / math.sqrt(d)
            if b >= B // 2:
                s[:, 0] *= 1.5
            s[:, n:] = -np.inf
            e = np.exp(s - s.max(1, keepdims=True))
            want[b * heads + hd] = e / e.sum(1, keepdims=True)
    got = seen[LAYER].numpy()
    assert got.shape == want.shape == (4 * heads, P, 77)
    assert np.allclose(got, want, atol=1e-5)
    assert (got[:, :, n:] == 0).all()
    # and the edit did something: the conditional rows' BOS attention is not the unedited one
    s0 = (q[2, :, :d] @ k[2, :, :d].T).numpy() / math.sqrt(d)
    plain = np.exp(s0 - s0.max(1, keepdims=True))
    plain /= plain.sum(1, keepdims=True)
    assert not np.allclose(got[2 * heads], plain, atol=1e-3)


def test_edit_only_inside_its_loop(sd14, ctx):
    lat = sd14.initial_latents([0, 1])
    c = _cond(sd14)
    t = sd14.timesteps(2)[0]
    emb = torch.cat([c.negative_prompt_embeds.expand(2, -1, -1), c.prompt_embeds.expand(2, -1, -1)])
    x2 = torch.cat([lat, lat])
    with torch.no_grad():
        plain_out = sd14.unet_output(x2, t, emb)
        plain = sd14.denoise(c.prompt_embeds, c.negative_prompt_embeds, lat, 2, 5.0)
        mit = MemAttnMitigation()
        with mit.apply(sd14, PROMPT, ctx):
            cond = mit.condition(sd14, PROMPT, c, lat, ctx)
            # a UNet call inside apply but outside the loop (an attack's): unedited
            assert torch.allclose(sd14.unet_output(x2, t, emb), plain_out, atol=1e-5)
            out = sd14.denoise(cond.prompt_embeds, cond.negative_prompt_embeds, lat, 2, 5.0, guidance=cond.guidance)
            assert torch.allclose(sd14.unet_output(x2, t, emb), plain_out, atol=1e-5)  # disarmed again
        assert not torch.allclose(out, plain, atol=1e-4)
        # C = 1 without the mask is the identity
        ident = MemAttnMitigation(c1=1.0, mask_padding=False)
        with ident.apply(sd14, PROMPT, ctx):
            cond = ident.condition(sd14, PROMPT, c, lat, ctx)
            same = sd14.denoise(cond.prompt_embeds, cond.negative_prompt_embeds, lat, 2, 5.0, guidance=cond.guidance)
    assert torch.allclose(same, plain, atol=1e-5)
    # the processors are restored after apply
    assert not any(type(p).__name__ == "ExplicitCrossAttention" for p in sd14.unet.attn_processors.values())


def test_trace_and_text_source(sd14, ctx):
    lat = sd14.initial_latents([0])
    mit = MemAttnMitigation(mask_minus_one=True)
    with mit.apply(sd14, PROMPT, ctx):
        tr = mit.condition(sd14, PROMPT, _cond(sd14, text=None), lat, ctx).trace["memattn"]
    n = sd14.prompt_length(PROMPT.text)
    assert tr["prompt_length_from"] == "target prompt" and tr["attended_tokens"] == n - 1
    assert tr["c1"] == 1.25 and tr["rescaled_rows"] == "conditional half" and len(tr["layers"]) == 16
    assert mit.report()["prompts"][PROMPT.id]["prompt_length"] == n
    with pytest.raises(RuntimeError, match="apply"):  # the guidance needs apply's processors
        cond = mit.condition(sd14, PROMPT, _cond(sd14), lat, ctx)
        sd14.denoise(cond.prompt_embeds, cond.negative_prompt_embeds, lat, 1, 5.0, guidance=cond.guidance)


def test_attention_entropy_by_hand():
    p = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]])  # mean over pixels: (0.75, 0.25, 0)
    assert attention_entropy(p) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_presets_and_bad_input():
    assert MemAttnMitigation.Params().c1 == 1.25 and MemAttnMitigation.preset("membench").c1 == 1.1
    with pytest.raises(BadInput, match="c1"):
        MemAttnMitigation.make_params({"c1": "0"})
    with pytest.raises(BadInput, match="preset"):
        MemAttnMitigation.preset("nope")


def test_ls_lists_memattn_with_descriptions(cli_inproc, monkeypatch):
    from memobench.api import param_help

    monkeypatch.setenv("COLUMNS", "400")
    rc, out, err = cli_inproc(["ls", "mitigations"])
    assert rc == 0, err
    rows = out.split("│ memattn ", 1)[1].split("\n")[:4]  # one parameter per row
    for row, (name, default) in zip(rows, (("c1", "1.25"), ("mask_padding", "True"), ("mask_minus_one", "False"),
                                           ("mask_uncond", "True"))):
        assert f"{name}={default} — {param_help(MemAttnMitigation, name)}" in row
