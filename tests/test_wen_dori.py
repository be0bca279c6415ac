"""Wen et al. inference-time mitigation, the RTA/RNA prompt-augmentation baselines and the DoRI attack, on a tiny
random Stable Diffusion pipeline (METHODS §7.2, §7.4, §7.6): optimisation behaviour, the reference code's
details (joint norm, BOS gradient, check-before-update, iteration cap), per-prompt seeding, frozen weights,
gradients through a mitigation hook, and one ``memobench run --attack dori --mitigation wen`` through the CLI.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from memobench.api import Conditioning, Context, Prompt
from memobench_plugins.dori import DoRIAttack, diffusion_loss, generator_seed
from memobench_plugins.prompt_aug import RandomNumberAddition, RandomTokenAddition
from memobench_plugins.wen import WenMitigation, joint_noise_norm

PROMPT = Prompt("p0", "a photo of a cat sitting on a red mat")
OTHER = Prompt("p1", "an old lighthouse on a rocky coast at dusk")
G = 2  # images (seeds) per prompt


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from memobench.model import DiffusionModel
    from memobench_plugins.sd_random.testing import tiny_random_pipeline

    torch.set_num_threads(1)
    pipe = tiny_random_pipeline(tokenizer_dir=tmp_path_factory.mktemp("tok") / "tokenizer")
    return DiffusionModel(pipe, model_id="test")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, model):
    r = model.resolution
    gen = {"num_inference_steps": 5, "guidance_scale": 7.5, "height": r, "width": r}
    return Context(cache_dir=tmp_path_factory.mktemp("ctx-cache"), seeds=tuple(range(G)),
                   generation=gen)


@pytest.fixture(scope="module")
def latents(model):
    return model.initial_latents(list(range(G)), model.resolution, model.resolution)


@pytest.fixture(scope="module")
def target_image():
    return np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _cond(model, prompt=PROMPT) -> Conditioning:
    return Conditioning(model.encode_prompt(prompt.text), model.empty_embedding(), text=prompt.text)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone()
            for name, mod in (("unet", model.unet), ("text", model.text_encoder), ("vae", model.vae))
            for k, v in mod.state_dict().items()}


def _assert_untouched(model, before: dict[str, torch.Tensor]) -> None:
    after = _snapshot(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "model weights changed"
    for mod in (model.unet, model.text_encoder, model.vae):
        for n, p in mod.named_parameters():
            assert p.grad is None, f"parameter {n} received a gradient"
            assert not p.requires_grad, f"requires_grad of {n} not restored"


def _hand_loss(model, emb_c, emb_u, latents, t) -> float:
    """sqrt(Σ_g ‖ε_c^g − ε_u^g‖²): one image at a time, then combined by hand."""
    sq = 0.0
    with torch.no_grad():
        for g in range(latents.shape[0]):
            x = latents[g: g + 1]
            d = model.eps(x, t, emb_c.to(model.dtype)) - model.eps(x, t, emb_u)
            sq += float((d.double() ** 2).sum())
    return math.sqrt(sq)


# ---------------------------------------------------------------------------------------------------- Wen
def test_wen_reduces_its_loss_and_keeps_the_model(model, ctx, latents):
    before = _snapshot(model)
    cond = _cond(model)
    wen = WenMitigation(target_loss=0.0, max_iters=6)  # never reached: all 6 updates run
    out = wen.condition(model, PROMPT, cond, latents, ctx)
    tr = out.trace["wen"]
    assert tr["iterations"] == 6 and tr["evaluations"] == 6 and not tr["reached_target"]
    assert tr["losses"][-1] < tr["losses"][0]
    t0 = model.timesteps(5)[0]
    assert tr["timestep"] == int(t0)
    # the returned embedding has a smaller objective than e_p (checked independently of the plugin's loop)
    assert _hand_loss(model, out.prompt_embeds, cond.negative_prompt_embeds, latents, t0) < \
        _hand_loss(model, cond.prompt_embeds, cond.negative_prompt_embeds, latents, t0)
    assert out.negative_prompt_embeds is cond.negative_prompt_embeds  # e_∅ unchanged
    assert out.prompt_embeds.shape == cond.prompt_embeds.shape and out.prompt_embeds.dtype == model.dtype
    assert out.text == PROMPT.text
    _assert_untouched(model, before)
    assert wen.summaries()[PROMPT.id]["iterations"] == 6


def test_wen_stops_before_the_first_update_when_below_target(model, ctx, latents):
    cond = _cond(model)
    out = WenMitigation(target_loss=1e9).condition(model, PROMPT, cond, latents, ctx)
    tr = out.trace["wen"]
    assert (tr["iterations"], tr["evaluations"], tr["reached_target"]) == (0, 1, True)
    assert torch.equal(out.prompt_embeds, cond.prompt_embeds)


def test_wen_stops_when_the_target_is_crossed(model, ctx, latents):
    cond = _cond(model)
    probe = WenMitigation(target_loss=0.0, max_iters=4).condition(model, PROMPT, cond, latents, ctx)
    losses = probe.trace["wen"]["losses"]
    target = (losses[1] + losses[2]) / 2  # strictly between the 2nd and 3rd evaluation
    if not losses[2] < target < losses[1]:
        pytest.skip("loss not strictly decreasing on this random model")
    tr = WenMitigation(target_loss=target, max_iters=10).condition(model, PROMPT, cond, latents, ctx).trace["wen"]
    assert (tr["iterations"], tr["evaluations"], tr["reached_target"]) == (2, 3, True)
    assert tr["final_loss"] <= target


@pytest.mark.parametrize("cap", [1, 3])
def test_wen_respects_the_iteration_cap(model, ctx, latents, cap):
    tr = WenMitigation(target_loss=0.0, max_iters=cap).condition(model, PROMPT, _cond(model), latents, ctx).trace
    assert tr["wen"]["iterations"] == cap and len(tr["wen"]["losses"]) == cap


def test_wen_zeroes_the_bos_gradient(model, ctx, latents):
    cond = _cond(model)
    e_p = cond.prompt_embeds
    # no weight decay: the BOS row is bit-identical, the other rows moved
    out = WenMitigation(target_loss=0.0, max_iters=3, weight_decay=0.0).condition(model, PROMPT, cond, latents, ctx)
    assert torch.equal(out.prompt_embeds[:, 0], e_p[:, 0])
    assert not torch.equal(out.prompt_embeds[:, 1:], e_p[:, 1:])
    # reference AdamW (weight decay 0.01): the BOS row only shrinks by (1 − lr·wd) per update, as in aug_prompt
    p = WenMitigation.Params(target_loss=0.0, max_iters=3)
    out = WenMitigation(p).condition(model, PROMPT, cond, latents, ctx)
    n = out.trace["wen"]["iterations"]
    torch.testing.assert_close(out.prompt_embeds[:, 0], e_p[:, 0] * (1 - p.lr * p.weight_decay) ** n)
    # not zeroed: the BOS row moves too
    out = WenMitigation(target_loss=0.0, max_iters=3, weight_decay=0.0, zero_bos_grad=False).condition(
        model, PROMPT, cond, latents, ctx)
    assert not torch.equal(out.prompt_embeds[:, 0], e_p[:, 0])


def test_wen_loss_is_one_joint_norm(model, ctx, latents):
    # the helper on synthetic tensors: one norm over G×C×h×w, not a mean of per-image norms
    a = torch.zeros(2, 4, 2, 2)
    a[0] = 3.0
    a[1] = 4.0
    b = torch.zeros_like(a)
    assert float(joint_noise_norm(a, b)) == pytest.approx(math.sqrt(16 * 9 + 16 * 16))
    assert float(joint_noise_norm(a, b)) != pytest.approx((math.sqrt(16 * 9) + math.sqrt(16 * 16)) / 2)
    # the plugin's first evaluation equals sqrt(Σ_g ‖ε_c^g − ε_u^g‖²) computed image by image (loss_norm "joint":
    # the raw norm; the default "reference" rescales it to the reference's tensor size, tests/test_issue25_plugins.py)
    cond = _cond(model)
    tr = WenMitigation(target_loss=0.0, max_iters=1, loss_norm="joint").condition(
        model, PROMPT, cond, latents, ctx).trace["wen"]
    t0 = model.timesteps(5)[0]
    hand = _hand_loss(model, cond.prompt_embeds, cond.negative_prompt_embeds, latents, t0)
    assert tr["losses"][0] == pytest.approx(hand, rel=1e-4)
    per_image_mean = []
    with torch.no_grad():
        for g in range(G):
            x = latents[g: g + 1]
            per_image_mean.append(float((model.eps(x, t0, cond.prompt_embeds)
                                         - model.eps(x, t0, cond.negative_prompt_embeds)).norm()))
    assert tr["losses"][0] != pytest.approx(sum(per_image_mean) / G, rel=1e-3)


def test_wen_presets():
    assert WenMitigation.Params().target_loss == 3.0 and WenMitigation.Params().lr == 0.05
    assert WenMitigation.preset("membench").target_loss == 5.0
    with pytest.raises(ValueError):
        WenMitigation.preset("nope")


# ---------------------------------------------------------------------------------------------------- RTA / RNA
@pytest.mark.parametrize("cls", [RandomTokenAddition, RandomNumberAddition])
def test_prompt_augmentation_is_seeded_per_prompt(model, ctx, latents, cls):
    n = 4
    mit = cls(n_tokens=n, seed=0)
    a1 = mit.condition(model, PROMPT, _cond(model), latents, ctx)
    a2 = cls(n_tokens=n, seed=0).condition(model, PROMPT, _cond(model), latents, ctx)
    assert a1.text == a2.text and torch.equal(a1.prompt_embeds, a2.prompt_embeds)
    other = mit.condition(model, OTHER, _cond(model, OTHER), latents, ctx)
    tr1, tro = a1.trace[cls.name], other.trace[cls.name]
    assert tr1["inserted"] != tro["inserted"]
    assert cls(n_tokens=n, seed=1).condition(model, PROMPT, _cond(model), latents, ctx).text != a1.text
    # global RNG state plays no part
    np.random.seed(123)
    torch.manual_seed(123)
    assert cls(n_tokens=n, seed=0).condition(model, PROMPT, _cond(model), latents, ctx).text == a1.text
    # exactly n words inserted, the original words kept in order
    words, orig = a1.text.split(" "), PROMPT.text.split(" ")
    assert len(words) == len(orig) + n and len(tr1["inserted"]) == n
    it = iter(words)
    assert all(w in it for w in orig)
    rest = list(words)
    for w in orig:
        rest.remove(w)
    assert sorted(rest) == sorted(tr1["inserted"])
    if cls is RandomNumberAddition:
        assert all(w.isdigit() and 0 <= int(w) < 100000 for w in tr1["inserted"])
    # re-encoded with the model's text encoder; e_∅ unchanged
    assert torch.equal(a1.prompt_embeds, model.encode_prompt(a1.text))
    assert a1.negative_prompt_embeds is not None and torch.equal(a1.negative_prompt_embeds, model.empty_embedding())


def test_prompt_augmentation_edge_cases(model, ctx, latents):
    assert RandomTokenAddition(n_tokens=0).condition(model, PROMPT, _cond(model), latents, ctx).text == PROMPT.text
    assert RandomTokenAddition.Params().n_tokens == 4 and RandomNumberAddition.Params().n_tokens == 4
    emb_only = Conditioning(model.encode_prompt(PROMPT.text), model.empty_embedding(), text=None)
    out = RandomNumberAddition().condition(model, PROMPT, emb_only, latents, ctx)
    assert out.prompt_embeds is emb_only.prompt_embeds and out.trace["rna"]["applied"] is False


# ---------------------------------------------------------------------------------------------------- DoRI
def _eval_loss(model, image, y, n=64) -> float:
    """The DoRI objective with fixed (common) t/ε draws, to compare embeddings without sampling noise."""
    z = model.encode_image(image).float()
    g = torch.Generator().manual_seed(1234)
    t = torch.randint(0, 1000, (n,), generator=g)
    eps = torch.randn((n, *z.shape[1:]), generator=g)
    with torch.no_grad():
        return float(diffusion_loss(model, z.expand(n, -1, -1, -1), y, t, eps))


def test_dori_loss_decreases_and_model_is_untouched(model, ctx, target_image):
    before = _snapshot(model)
    out = DoRIAttack(steps=20).run(model, PROMPT, target_image, ctx)
    tr = out.trace
    assert len(tr["loss_curve"]) == 20 == tr["steps"] and len(tr["timesteps"]) == 20
    assert all(len(ts) == 8 and all(0 <= t <= 999 for t in ts) for ts in tr["timesteps"])
    assert (tr["lr"], tr["batch"], tr["init"]) == (0.1, 8, "prompt")
    y_init, y_adv = out.tensors["y_init"], out.conditioning.prompt_embeds
    torch.testing.assert_close(y_init, model.encode_prompt(PROMPT.text).float())
    assert _eval_loss(model, target_image, y_adv) < _eval_loss(model, target_image, y_init) - 0.01
    assert tr["final_loss"] == tr["loss_curve"][-1]
    assert tr["y_adv_norm"] == pytest.approx(float(y_adv.norm()))
    assert tr["y_adv_minus_prompt_norm"] == pytest.approx(float((y_adv - y_init).norm()))
    assert tr["generator_seed"] == generator_seed(PROMPT.sha256, 0)
    assert torch.equal(out.conditioning.negative_prompt_embeds, model.empty_embedding())
    assert not y_adv.requires_grad and y_adv.shape == model.empty_embedding().shape
    json.dumps(tr)  # JSON-able
    _assert_untouched(model, before)


def test_dori_only_y_receives_gradients(model, ctx, target_image):
    # even a parameter that requires grad is left without .grad (gradients are taken w.r.t. y only), and its
    # requires_grad flag is restored
    p0 = next(model.unet.parameters())
    p0.requires_grad_(True)
    try:
        seen = []
        orig = model.unet_output

        def spy(latents, t, embeds):
            seen.append((embeds.requires_grad, p0.requires_grad, torch.is_grad_enabled()))
            return orig(latents, t, embeds)

        model.unet_output = spy  # every UNet call of the adapter (eps, diffusion_loss) goes through it
        try:
            with torch.no_grad():  # the attack enables grad itself
                DoRIAttack(steps=2).run(model, PROMPT, target_image, ctx)
        finally:
            del model.unet_output
        assert seen and all(s == (True, False, True) for s in seen)
        assert p0.grad is None and p0.requires_grad
    finally:
        p0.requires_grad_(False)


def test_dori_gaussian_init_is_seeded(model, ctx, target_image):
    a = DoRIAttack(steps=2, init="gaussian", seed=0).run(model, PROMPT, target_image, ctx)
    b = DoRIAttack(steps=2, init="gaussian", seed=0).run(model, PROMPT, target_image, ctx)
    c = DoRIAttack(steps=2, init="gaussian", seed=1).run(model, PROMPT, target_image, ctx)
    d = DoRIAttack(steps=2, init="gaussian", seed=0).run(model, OTHER, target_image, ctx)
    assert torch.equal(a.tensors["y_init"], b.tensors["y_init"])
    assert torch.equal(a.conditioning.prompt_embeds, b.conditioning.prompt_embeds)
    assert a.trace["timesteps"] == b.trace["timesteps"] and a.trace["loss_curve"] == b.trace["loss_curve"]
    for other in (c, d):
        assert not torch.equal(a.tensors["y_init"], other.tensors["y_init"])
        assert not torch.equal(a.conditioning.prompt_embeds, other.conditioning.prompt_embeds)
    y0 = a.tensors["y_init"]
    assert abs(float(y0.mean())) < 0.1 and abs(float(y0.std()) - 1) < 0.1  # N(0, I)


def test_dori_inits_steps_and_bos(model, ctx, target_image):
    nonmem = DoRIAttack(steps=0, init="nonmem", init_prompt="a bowl of fruit").run(model, PROMPT, target_image, ctx)
    torch.testing.assert_close(nonmem.tensors["y_init"], model.encode_prompt("a bowl of fruit").float())
    assert nonmem.trace["loss_curve"] == [] and nonmem.trace["final_loss"] is None
    assert torch.equal(nonmem.conditioning.prompt_embeds.cpu(), nonmem.tensors["y_init"])  # 0 steps: y_adv = y^(0)
    frozen = DoRIAttack(steps=3, optimize_bos=False).run(model, PROMPT, target_image, ctx)
    y0, y = frozen.tensors["y_init"], frozen.conditioning.prompt_embeds.cpu()
    assert torch.equal(y[:, 0], y0[:, 0]) and not torch.equal(y[:, 1:], y0[:, 1:])
    free = DoRIAttack(steps=3).run(model, PROMPT, target_image, ctx)
    assert not torch.equal(free.conditioning.prompt_embeds.cpu()[:, 0], free.tensors["y_init"][:, 0])
    with pytest.raises(ValueError):
        DoRIAttack(init="zeros").run(model, PROMPT, target_image, ctx)
    with pytest.raises(ValueError):
        DoRIAttack(t_max=1000).run(model, PROMPT, target_image, ctx)


def test_dori_gradients_flow_through_a_value_mask_hook(model, ctx, target_image):
    """A NeMo-style mitigation context: forward hooks on every ``attn2.to_v`` returning ``out * mask``."""
    to_v = [m for n, m in model.unet.named_modules() if n.endswith("attn2.to_v")]
    assert to_v
    calls = [0]

    def run_with(mask_fn):
        masks = {id(m): mask_fn(m.out_features) for m in to_v}

        def hook(mod, inp, out):
            calls[0] += 1
            return out * masks[id(mod)].to(out.dtype)

        handles = [m.register_forward_hook(hook) for m in to_v]
        try:
            return DoRIAttack(steps=3).run(model, PROMPT, target_image, ctx)
        finally:
            for h in handles:
                h.remove()

    g = torch.Generator().manual_seed(0)
    partial = run_with(lambda c: (torch.rand(c, generator=g) > 0.5).float())
    assert calls[0] >= 3 * len(to_v)
    assert not torch.equal(partial.conditioning.prompt_embeds.cpu(), partial.tensors["y_init"])
    plain = DoRIAttack(steps=3).run(model, PROMPT, target_image, ctx)
    assert not torch.equal(partial.conditioning.prompt_embeds, plain.conditioning.prompt_embeds)
    # all values masked: y cannot influence the UNet, its gradient is exactly zero and Adam leaves it in place
    blocked = run_with(lambda c: torch.zeros(c))
    assert torch.equal(blocked.conditioning.prompt_embeds.cpu(), blocked.tensors["y_init"])
    assert all(not m._forward_hooks for m in to_v)


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_smoke_dori_under_wen(tiny_pipe, tmp_path, cli_inproc):
    from memobench.registry import get_registry

    reg = get_registry()
    extra = []
    if "dori" not in reg.entries["attack"] or "wen" not in reg.entries["mitigation"]:
        # entry points not (re)installed yet: register the plugin modules as one-off files
        shim = tmp_path / "shim"
        shim.mkdir()
        (shim / "dori_shim.py").write_text("from memobench_plugins.dori import register_attacks  # noqa: F401\n")
        (shim / "wen_shim.py").write_text("from memobench_plugins.wen import register_mitigations  # noqa: F401\n")
        extra = ["--plugins-dir", str(shim)]
    out, cache = tmp_path / "out", tmp_path / "cache"
    rc, stdout, err = cli_inproc([*extra, "run", "--model", "tiny", "--model-param", f"path={tiny_pipe}",
                                  "--attack", "dori", "--attack-param", "steps=2", "--mitigation", "wen",
                                  "--steps", "2", "--seeds", "0-1", "--limit", "1", "-o", out,
                                  "--cache-dir", cache, "--offline", "--metric", "mr", "--no-progress"])
    assert rc == 0, err
    (path,) = [p for p in Path(out).rglob("*.json")]
    result = json.loads(path.read_text())
    assert result["status"] == "partial" and result["errors"] == []
    assert result["attack"]["name"] == "dori" and result["mitigation"]["name"] == "wen"
    (trace,) = result["attack_traces"].values()
    assert len(trace["loss_curve"]) == 2 and trace["init"] == "prompt"
    rows = [json.loads(x) for x in (path.parent / result["samples_file"]).read_text().splitlines()]
    assert len([r for r in rows if r["role"] == "target"]) == 2
    # paired scoring: the mitigation alone on the same targets and seeds, in the same result
    mitigated = [r for r in rows if r["role"] == "mitigated"]
    assert sorted(r["seed"] for r in mitigated) == [0, 1]
    assert {r["prompt_id"] for r in mitigated} == {r["prompt_id"] for r in rows if r["role"] == "target"}
    assert set(result["metrics_without_attack"]) == set(result["metrics"])
    assert result["metrics_without_attack"]["mr"]["n"] == 1
    assert (path.parent / result["grid_without_attack_file"]).is_file()
    assert "no attack" in stdout and "+ dori" in stdout
    (mtrace,) = result["mitigation_traces"].values()  # Wen's trace, stored with the images it produced
    assert mtrace["wen"]["mitigation"] == "wen" and 0 <= mtrace["wen"]["iterations"] <= 10
    assert (cache / "attacks").is_dir() and any((cache / "attacks").rglob("*.safetensors"))
