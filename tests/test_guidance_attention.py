"""The core's extension points for inference-time mitigations (issue 28): ``Conditioning.latents`` and
``Conditioning.guidance`` in the denoising loop and the generate phase, and ``memobench.attention.cross_attention``
(explicit cross-attention with logit edits and probability records), on SD v1.4's block layout."""

from __future__ import annotations

import pytest
import torch

from memobench.api import Conditioning, Context, Guidance, Mitigation, Prompt, cross_attention
from memobench.attention import cross_attention_layers


@pytest.fixture(scope="module")
def sd14(tmp_path_factory):
    from memobench.model import DiffusionModel
    from memobench_plugins.sd_random.testing import tiny_random_pipeline

    torch.set_num_threads(1)
    tok = tmp_path_factory.mktemp("tok") / "tokenizer"
    return DiffusionModel(tiny_random_pipeline(sd14_layout=True, tokenizer_dir=tok), "tiny-random-sd14")


def _unet_inputs(m):
    """One latent twice, conditioned on (∅, a prompt): a CFG batch."""
    lat = m.initial_latents([0]).expand(2, -1, -1, -1).contiguous()
    return lat, torch.cat([m.empty_embedding(), m.encode_prompt("a red cube")])


def test_explicit_cross_attention_equals_diffusers(sd14):
    lat, emb = _unet_inputs(sd14)
    t = sd14.timesteps(3)[0]
    with torch.no_grad():
        ref = sd14.unet_output(lat, t, emb)
        seen = {}
        with cross_attention(sd14.unet, record=lambda n, p: seen.setdefault(n, p)):
            out = sd14.unet_output(lat, t, emb)
    assert torch.allclose(out, ref, atol=1e-5)
    # SD v1.4's layout: 2 transformer blocks in each of 3 down blocks, 1 in the mid block, 3 in each of 3 up blocks
    assert len(cross_attention_layers(sd14.unet)) == 16 and len(seen) == 16
    p = next(iter(seen.values()))
    assert p.shape[-1] == 77 and torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)
    # the processors are restored
    assert not any(type(p).__name__ == "ExplicitCrossAttention" for p in sd14.unet.attn_processors.values())


def test_logit_edit_changes_the_output_and_is_restored(sd14):
    lat, emb = _unet_inputs(sd14)
    t = sd14.timesteps(3)[0]

    def only_bos(name, logits):  # every pixel attends to token 0 only
        out = torch.full_like(logits, -1e4)
        out[..., 0] = 0
        return out

    with torch.no_grad():
        ref = sd14.unet_output(lat, t, emb)
        with cross_attention(sd14.unet, edit_logits=only_bos):
            edited = sd14.unet_output(lat, t, emb)
        # attending to BOS only, the prompt no longer matters: conditional half == unconditional half
        assert torch.allclose(edited[0], edited[1], atol=1e-5)
        assert not torch.allclose(edited, ref, atol=1e-3)
        assert torch.allclose(sd14.unet_output(lat, t, emb), ref, atol=0)


class Schedule(Guidance):
    """w = 0 for the first step, the run's scale after; records what it saw."""

    def __init__(self):
        self.calls = []

    def start(self, latents, timesteps):
        self.calls.append(("start", len(timesteps)))

    def before_step(self, index, timestep, latents):
        self.calls.append(("before", index))

    def scale(self, index, timestep, latents, eps_uncond, eps_cond, guidance_scale):
        self.calls.append(("scale", index))
        return torch.tensor([0.0, guidance_scale]) if index == 0 else guidance_scale


def test_guidance_sets_each_steps_weight_per_sample(sd14):
    lat = sd14.initial_latents([0, 1])
    pe, ne = sd14.encode_prompt("a red cube"), sd14.empty_embedding()
    g = Schedule()
    with torch.no_grad():
        out = sd14.denoise(pe, ne, lat, 2, 5.0, guidance=g)
        plain = sd14.denoise(pe, ne, lat, 2, 5.0)
        # by hand: step 0 with w = (0, 5), then w = 5
        ts = sd14.timesteps(2)
        x = lat
        for i, t in enumerate(ts):
            o = sd14.unet_output(torch.cat([x, x]), t, torch.cat([ne.expand(2, -1, -1), pe.expand(2, -1, -1)]))
            ou, oc = o.chunk(2)
            w = torch.tensor([0.0, 5.0]).view(2, 1, 1, 1) if i == 0 else 5.0
            x = sd14.scheduler.step(ou + w * (oc - ou), t, x, eta=0.0, return_dict=False)[0]
    assert torch.allclose(out, x, atol=1e-5)
    assert torch.allclose(out[1], plain[1], atol=1e-5) and not torch.allclose(out[0], plain[0], atol=1e-3)
    assert g.calls == [("start", 2), ("before", 0), ("scale", 0), ("before", 1), ("scale", 1)]


class Shift(Mitigation):
    """Replaces the latents by their negation and guides with w = 1 (the conditional prediction alone)."""

    name, kind = "shift-test", "inference"

    def condition(self, model, prompt, cond, latents, ctx):
        g = Guidance()
        g.scale = lambda *a: 1.0
        return Conditioning(cond.prompt_embeds, cond.negative_prompt_embeds, cond.text, {}, -latents, g)


def test_generate_phase_uses_the_conditionings_latents_and_guidance(sd14, tmp_path):
    from memobench.cache import ImageCache
    from memobench.pipeline.generate import Generator
    from memobench.pipeline.plan import Job

    p = Prompt("p0", "a red cube")
    jobs = [Job("target", p, s, f"k{s}") for s in (3, 4)]
    gen = {"num_inference_steps": 2, "guidance_scale": 5.0, "height": 16, "width": 16}
    g = Generator(ImageCache(tmp_path), gen, batch_size=2)
    cond = Conditioning(sd14.encode_prompt(p.text), sd14.empty_embedding(), text=p.text)
    g.prompt(sd14, p, jobs, jobs, cond, Shift(), Context(cache_dir=tmp_path), lambda n: None)
    with torch.no_grad():
        want = sd14.decode(sd14.denoise(cond.prompt_embeds, cond.negative_prompt_embeds,
                                        -sd14.initial_latents([3, 4], 16, 16), 2, 1.0))
    for j, img in zip(jobs, want):
        assert (g.images.get(j.key) == img).all()
