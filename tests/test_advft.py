"""DoRI adversarial fine-tuning (``advft``, METHODS §7.5) on a tiny random pipeline: the fit trains the UNet on
L_Adv + L_DM, leaves the shared model bit-identical, caches the fine-tuned weights as safetensors, and ``apply``
swaps them in and back out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memobench.api import Context, Prompt
from memobench.registry import get_registry
from memobench_plugins.advft import AdversarialFineTuning

PROMPT = Prompt("p0", "a photo of a cat sitting on a red mat", mem_type="VM", reference_ids=("r",))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from memobench.model import DiffusionModel
    from memobench_plugins.sd_random.testing import tiny_random_pipeline

    torch.set_num_threads(1)
    pipe = tiny_random_pipeline(tokenizer_dir=tmp_path_factory.mktemp("tok") / "tokenizer")
    return DiffusionModel(pipe, model_id="test")


def _ctx(tmp_path, model):
    r = model.resolution
    target = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    reg = get_registry()
    if "dori" not in reg.entries["attack"] or "tiny-general" not in reg.entries["prompt_set"]:
        pytest.skip("built-in plugins not installed as entry points (run `uv sync`)")
    return Context(cache_dir=tmp_path / "cache", seeds=(0,), registry=reg, references=lambda p: [target],
                   generation={"num_inference_steps": 3, "guidance_scale": 3.0, "height": r, "width": r},
                   model_prompt_sets={"regular": "tiny-general"})


def _params(model):
    return {n: p.detach().clone() for n, p in model.unet.named_parameters()}


PARAMS = dict(epochs=2, dori_steps=2, dori_batch=2, steps_per_epoch=25, lr=1e-3, n_regular=6, regular_batch=2,
              surrogate="none", surrogate_params="")


def test_advft_fits_caches_and_swaps(model, tmp_path):
    ctx = _ctx(tmp_path, model)
    before = _params(model)
    m = AdversarialFineTuning(**PARAMS)
    m.fit(model, [PROMPT], ctx)
    after = _params(model)
    assert all(torch.equal(before[n], after[n]) for n in before), "fit changed the shared model"
    assert all(not p.requires_grad and p.grad is None for p in model.unet.parameters())
    rep = m.report()
    assert rep["targets"] == ["p0"] and rep["regular_prompts"] == "tiny-general" and rep["n_regular_pairs"] == 6
    assert [e["n_adv"] for e in rep["epochs"]] == [2, 2]  # inits prompt + gaussian, one target
    assert rep["unet_sha256_original"] != rep["unet_sha256_finetuned"]
    assert rep["surrogates"]["p0"]["draws"] >= 1 and set(rep["surrogate_sscd_to_original"]) == {"p0"}
    with m.apply(model, PROMPT, ctx):
        inside = _params(model)
    changed = sum(not torch.equal(before[n], inside[n]) for n in before)
    assert changed == len(before)  # all UNet parameters are fine-tuned
    assert all(torch.equal(before[n], p) for n, p in model.unet.named_parameters())  # restored
    # the training loss goes down: L_Adv (fixed pairs within an epoch) over the first vs last steps of the run
    hist = m._report["history"]
    first = np.mean([x[0] for x in hist[0]["losses"][:8]])
    last = np.mean([x[0] for x in hist[-1]["losses"][-8:]])
    assert last < first
    # a second instance loads the cached safetensors instead of training again
    m2 = AdversarialFineTuning(**PARAMS)
    m2.fit(model, [PROMPT], ctx)
    assert m2.report()["file"] == rep["file"] and rep["file"].endswith(".safetensors")
    with m2.apply(model, PROMPT, ctx):
        again = _params(model)
    assert all(torch.equal(inside[n], again[n]) for n in inside)


def test_advft_needs_regular_pairs(model, tmp_path):
    ctx = _ctx(tmp_path, model)
    ctx.model_prompt_sets = {}
    with pytest.raises(ValueError, match="regular_prompts="):
        AdversarialFineTuning(**PARAMS).fit(model, [PROMPT], ctx)
    with pytest.raises(ValueError, match="inits is empty"):
        AdversarialFineTuning(**{**PARAMS, "inits": ""}).fit(model, [PROMPT], ctx)
    # an inference-kind surrogate would be skipped by apply() and leave the surrogates unmitigated: refused
    ctx.model_prompt_sets = {"regular": "tiny-general"}
    with pytest.raises(ValueError, match="surrogate='wen'"):
        AdversarialFineTuning(**{**PARAMS, "surrogate": "wen"}).fit(model, [PROMPT], ctx)
    with pytest.raises(RuntimeError, match="fit"):
        with AdversarialFineTuning().apply(model, PROMPT, ctx):
            pass


def test_choose_surrogate_redraws_until_one_is_not_a_replica():
    from memobench_plugins.advft import choose_surrogate

    sims = {1000: 0.95, 1001: 0.81, 1002: 0.42, 1003: 0.10}
    drawn = []

    def draw(seed):
        drawn.append(seed)
        return f"img{seed}"

    img, rec = choose_surrogate(draw, lambda im: sims[int(im[3:])], 1000, 10, 0.7)
    assert img == "img1002" and drawn == [1000, 1001, 1002]  # stops at the first draw ≤ 0.7
    assert rec == {"seed": 1002, "sscd": 0.42, "replica": False, "draws": 3, "scores": [0.95, 0.81, 0.42]}
    # none qualifies within the budget: the lowest-SSCD draw, flagged as a replica
    img, rec = choose_surrogate(draw, lambda im: sims[int(im[3:])], 1000, 2, 0.7)
    assert img == "img1001" and rec["replica"] and rec["draws"] == 2 and rec["seed"] == 1001
    # one try = the single draw of advft version 1, whatever its score
    img, rec = choose_surrogate(draw, lambda im: sims[int(im[3:])], 1000, 1, 0.7)
    assert img == "img1000" and rec["replica"] and rec["draws"] == 1


def test_advft_surrogates_report_every_draw_and_flag_replicas(model, tmp_path):
    ctx = _ctx(tmp_path, model)
    # a cosine is never below -1: every draw counts as a replica, so all 3 seeds are drawn and the lowest kept
    m = AdversarialFineTuning(**{**PARAMS, "surrogate_tries": 3, "surrogate_max_sscd": -2.0})
    z, info = m._surrogates(model, [PROMPT], ctx)
    rec = info["surrogates"]["p0"]
    assert rec["draws"] == 3 and rec["replica"] and info["surrogate_replicas"] == ["p0"]
    assert rec["seed"] == 1000 + int(np.argmin(rec["scores"])) and rec["sscd"] == min(rec["scores"])
    assert z["p0"].shape[0] == 1 and info["surrogate_sscd_impl"]["name"] == "sscd"
    with pytest.raises(ValueError, match="surrogate_tries"):
        AdversarialFineTuning(**{**PARAMS, "surrogate_tries": 0}).fit(model, [PROMPT], ctx)


def test_surrogate_params_reach_the_surrogate_mitigation(model, tmp_path):
    from memobench_plugins.advft import surrogate_params

    assert surrogate_params("") == {} and surrogate_params(" theta_min=0 ; blocks=down,mid ;") == {
        "theta_min": "0", "blocks": "down,mid"}
    with pytest.raises(ValueError, match="surrogate_params"):
        surrogate_params("theta_min")
    ctx = _ctx(tmp_path, model)
    m = AdversarialFineTuning(**{**PARAMS, "surrogate": "wanda", "surrogate_tries": 1,
                                    "surrogate_params": "skill_ratio=0.05;timesteps=2"})
    _, info = m._surrogates(model, [PROMPT], ctx)
    assert info["surrogate"]["name"] == "wanda"
    assert info["surrogate"]["params"]["skill_ratio"] == 0.05 and info["surrogate"]["params"]["timesteps"] == 2
    with pytest.raises(ValueError, match="no parameter"):
        AdversarialFineTuning(**{**PARAMS, "surrogate": "wanda", "surrogate_params": "nonsense=1"})._surrogates(
            model, [PROMPT], ctx)
    with pytest.raises(ValueError, match="surrogate_params"):
        AdversarialFineTuning(**{**PARAMS, "surrogate_params": "x"}).fit(model, [PROMPT], ctx)


def test_default_surrogate_params_name_nemo_and_a_mismatch_says_how_to_fix_it(model, tmp_path):
    assert AdversarialFineTuning.Params().surrogate == "nemo"
    assert AdversarialFineTuning.Params().surrogate_params == "theta_min=0"
    ctx = _ctx(tmp_path, model)
    m = AdversarialFineTuning(**{**PARAMS, "surrogate": "wanda", "surrogate_params": "theta_min=0"})
    with pytest.raises(ValueError, match="do not fit surrogate='wanda'.*surrogate_params=''"):
        m._surrogates(model, [PROMPT], ctx)
