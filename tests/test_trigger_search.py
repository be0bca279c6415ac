"""MemBench trigger-prompt search (``trigger_search``): one Gibbs step against energies recomputed from raw UNet
calls and a replayed generator, the word pool, parameter checks, determinism, ``memobench ls``, and an end-to-end
run on the embedded model."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from memobench_plugins.trigger_search import (
    TriggerSearchAttack,
    generator_seed,
    vocab_words,
)

from memobench.api import BadInput, Context, Prompt

PROMPT = Prompt("p0", "a photo of a cat sitting on a red mat")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from memobench_plugins.sd_random.testing import tiny_random_pipeline

    from memobench.model import DiffusionModel

    torch.set_num_threads(1)
    pipe = tiny_random_pipeline(tokenizer_dir=tmp_path_factory.mktemp("tok") / "tokenizer")
    return DiffusionModel(pipe, model_id="test")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, model):
    r = model.resolution
    return Context(cache_dir=tmp_path_factory.mktemp("ctx-cache"), seeds=(0,),
                   generation={"num_inference_steps": 2, "guidance_scale": 7.5, "height": r, "width": r},
                   nonmem_prompts=["an old lighthouse on a rocky coast", "a bowl of ramen on a table"])


@pytest.fixture(scope="module")
def reference():
    return np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)


def _attack(**kw) -> TriggerSearchAttack:
    return TriggerSearchAttack(TriggerSearchAttack.make_params(kw))


def _raw_eps(model, x, t, emb):
    """ε straight from the UNet (the test model predicts ε)."""
    assert model.prediction_type == "epsilon"
    with torch.no_grad():
        return model.unet(x, t, encoder_hidden_states=emb).sample.float()


def _hand_energy(model, text, x_T, ts, noises, z, lam):
    """(E, D, L) of one prompt, one image at a time: D = mean_j Σ(ε(x_j, 999, e_p) − ε(x_j, 999, e_∅))²,
    L = mean_i Σ(ε_i − ε(√ᾱ z + √(1−ᾱ) ε_i, t_i, e_p))², E = −D + λ L."""
    e_p, e_u = model.encode_prompt(text), model.encode_prompt("")
    D = sum(float((_raw_eps(model, x[None], 999, e_p) - _raw_eps(model, x[None], 999, e_u)).double().pow(2).sum())
            for x in x_T) / len(x_T)
    ab = model.scheduler.alphas_cumprod
    L = 0.0
    for t, n in zip(ts.tolist(), noises):
        x = math.sqrt(float(ab[t])) * z + math.sqrt(1 - float(ab[t])) * n[None]
        L += float((n[None] - _raw_eps(model, x, t, e_p)).double().pow(2).sum())
    L /= len(ts)
    return -D + lam * L, D, L


def test_one_gibbs_step_matches_a_hand_computation(model, ctx, reference):
    p = {"proposals": 1, "candidates": 4, "length": 4, "init_prompt": "a red cat", "latents_per_prompt": 2,
         "ref_draws": 2, "temperature": 50.0, "target_weight": 0.5}
    out = _attack(**p).run(model, PROMPT, reference, ctx)
    tr = out.trace
    # replay the generator by hand: slot, pool permutation, noise, Gibbs draw
    seed = int.from_bytes(hashlib.sha256(f"trigger_search|{PROMPT.sha256}|0".encode()).digest()[:8], "big") >> 1
    assert tr["generator_seed"] == seed == generator_seed(PROMPT.sha256, 0)
    gen = torch.Generator().manual_seed(seed)
    slots = ["a", "red", "cat", ""]
    pool = vocab_words(model.tokenizer)
    k = int(torch.randint(4, (1,), generator=gen))
    perm = torch.randperm(len(pool), generator=gen).tolist()
    words = [slots[k]] + ([""] if slots[k] else [])
    words += [pool[i] for i in perm if pool[i] != slots[k]][: 4 - len(words)]
    shape = model.latent_shape()
    x_T = torch.randn((2, *shape), generator=gen)
    ts = torch.randint(0, 1000, (2,), generator=gen)
    noises = torch.randn((2, *shape), generator=gen)
    texts = [" ".join(w for w in slots[:k] + [c] + slots[k + 1:] if w) for c in words]
    z = model.encode_image(reference).float()
    hand = [_hand_energy(model, t, x_T, ts, noises, z, 0.5) for t in texts]
    E = torch.tensor([h[0] for h in hand], dtype=torch.float64)
    probs = torch.exp(-(E - E.min()) / 50.0)
    j = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
    assert tr["positions"] == [k] and tr["chain"] == [texts[j]] and tr["words"] == [words[j]]
    assert tr["energy_curve"][0] == pytest.approx(hand[j][0], rel=1e-4, abs=1e-3)
    assert tr["detect_curve"][0] == pytest.approx(hand[j][1], rel=1e-4, abs=1e-4)
    assert tr["target_curve"][0] == pytest.approx(hand[j][2], rel=1e-4, abs=1e-4)
    assert tr["timesteps"] == [ts.tolist()]
    assert tr["acceptance_rate"] == float(words[j] != slots[k])
    best = texts[int(E.argmin())]  # output "best": the lowest energy of every scored candidate
    assert tr["trigger_text"] == best and tr["best_energy"] == pytest.approx(float(E.min()), rel=1e-4, abs=1e-3)
    assert tr["trigger_token_ids"] == model.tokenizer(best).input_ids
    assert torch.equal(out.conditioning.prompt_embeds, model.encode_prompt(best))
    assert out.conditioning.text == best
    assert tr["unet_evaluations"] == 2 * (1 + 4) + 4 * 2


def test_gibbs_draw_follows_the_boltzmann_weights():
    """softmax(−E/τ) with a fixed generator: E = (0, τ ln 3) gives weights (3/4, 1/4)."""
    from memobench_plugins.trigger_search import gibbs_choice

    tau = 0.1
    E = torch.tensor([0.0, tau * math.log(3.0)])
    gen = torch.Generator().manual_seed(123)
    picks = [gibbs_choice(E, tau, gen) for _ in range(4000)]
    assert abs(picks.count(0) / 4000 - 0.75) < 0.03
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert gibbs_choice(E, tau, g1) == int(torch.multinomial(torch.tensor([0.75, 0.25], dtype=torch.float64), 1,
                                                             generator=g2))


def test_word_pool_is_whole_words_that_round_trip(model, ctx):
    pool = vocab_words(model.tokenizer)
    assert 30000 < len(pool) < 33000 and "cat" in pool and "the" in pool
    assert all(w.isalpha() and w.isascii() for w in pool)
    ids = model.tokenizer(pool[:500], add_special_tokens=False).input_ids
    assert all(len(i) == 1 for i in ids) and [i[0] for i in ids] == sorted(i[0] for i in ids)
    a = _attack(pool_size=100, banned="the, of", candidates=4)
    small = a.word_pool(model, ctx)
    assert len(small) <= 100 and "the" not in small and "of" not in small
    nm = _attack(pool="nonmem", candidates=4).word_pool(model, ctx)
    assert nm[:3] == ["an", "old", "lighthouse"] and "ramen" in nm


def test_untargeted_search_is_seeded_and_needs_no_reference(model, ctx):
    a = _attack(proposals=3, candidates=3, target_weight=0.0)
    r1 = a.run(model, PROMPT, None, ctx).trace
    r2 = a.run(model, PROMPT, None, ctx).trace
    r3 = _attack(proposals=3, candidates=3, target_weight=0.0, seed=1).run(model, PROMPT, None, ctx).trace
    assert r1["chain"] == r2["chain"] and r1["energy_curve"] == r2["energy_curve"]
    assert (r1["chain"], r1["init_prompt"]) != (r3["chain"], r3["init_prompt"])
    assert r1["init_prompt"] in ctx.nonmem_prompts and len(r1["energy_curve"]) == 3
    assert r1["target_curve"] == [0.0] * 3 and r1["unet_evaluations"] == 3 * (1 + 3)
    assert all(e == -d for e, d in zip(r1["energy_curve"], r1["detect_curve"]))
    last = _attack(proposals=3, candidates=3, target_weight=0.0, output="last").run(model, PROMPT, None, ctx).trace
    assert last["chain"] == r1["chain"] and last["trigger_text"] == r1["chain"][-1]
    assert r1["best_energy"] <= min(r1["energy_curve"])  # the chain's states are among the scored candidates


def test_zero_proposals_return_the_initial_prompt(model, ctx, reference):
    out = _attack(proposals=0, init_prompt="Sailboat on a calm lake at sunset today", length=3).run(
        model, PROMPT, reference, ctx)
    assert out.conditioning.text == "sailboat on a" and out.trace["energy_curve"] == []
    assert out.trace["acceptance_rate"] is None and _attack().budget() == 30.0


@pytest.mark.parametrize("kv,fragment", [
    ({"proposals": -1}, "proposals"), ({"candidates": 1}, "candidates"), ({"length": 0}, "length"),
    ({"temperature": 0.0}, "temperature"), ({"ref_draws": 0}, "ref_draws"), ({"pool": "bert"}, "pool"),
    ({"output": "mean"}, "output"), ({"t_detect": 1000}, "t_detect"), ({"target_weight": -1.0}, "target_weight"),
    ({"latents_per_prompt": 0}, "latents_per_prompt"), ({"pool_size": -3}, "pool_size"),
])
def test_bad_params_are_one_line(model, ctx, reference, kv, fragment):
    with pytest.raises(BadInput, match=fragment) as e:
        _attack(**kv).run(model, PROMPT, reference, ctx)
    assert "\n" not in str(e.value)


def test_missing_inputs_are_bad_input(model, ctx, reference):
    with pytest.raises(BadInput, match="target_weight=0"):
        _attack().run(model, PROMPT, None, ctx)
    bare = Context(cache_dir=ctx.cache_dir, generation=ctx.generation)
    with pytest.raises(BadInput, match="init_prompt"):
        _attack().run(model, PROMPT, reference, bare)
    with pytest.raises(BadInput, match="fewer than candidates"):
        _attack(pool="nonmem", candidates=50).run(model, PROMPT, reference, ctx)


def test_listed_with_every_parameter_help(cli_inproc, monkeypatch):
    import dataclasses

    monkeypatch.setenv("COLUMNS", "1000")
    rc, out, err = cli_inproc(["ls", "attacks"])
    assert rc == 0, err
    text = " ".join(out.replace("│", " ").split())
    assert "trigger_search" in text
    for f in dataclasses.fields(TriggerSearchAttack.Params):
        help_ = " ".join(f.metadata["help"].split())
        assert help_ and f"{f.name}={f.default!r} — {help_}" in text, f.name


def test_end_to_end_on_the_embedded_model(tmp_path):
    from memobench.config import RunConfig
    from memobench.runner import Runner

    cfg = RunConfig(model="tiny", attack="trigger_search", limit=1, seeds=[0, 1], num_inference_steps=2,
                    metrics=["mr"], cache_dir=str(tmp_path / "c"), offline=True, output_dir=str(tmp_path / "out"),
                    attack_params={"proposals": "2", "candidates": "3"})
    res = Runner(cfg, progress=False).run().result
    (trace,) = res["attack_traces"].values()
    assert len(trace["energy_curve"]) == 2 and trace["trigger_text"] and trace["unet_evaluations"] == 2 * 7
    from memobench_plugins.tiny import data

    assert trace["init_prompt"] in data.NONMEM_PROMPTS + tuple(data.heldout_captions())  # the model's nonmem set
    assert res["metrics"]["mr"]["n"] == 1 and "mr" in res["metrics_without_attack"]
