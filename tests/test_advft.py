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
    from memobench.testing import tiny_random_pipeline

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
                   settings={"generation": {"num_inference_steps": 3, "guidance_scale": 3.0, "height": r,
                                            "width": r}, "model_prompt_sets": {"regular": "tiny-general"}})


def _params(model):
    return {n: p.detach().clone() for n, p in model.unet.named_parameters()}


PARAMS = dict(epochs=2, dori_steps=2, dori_batch=2, steps_per_epoch=25, lr=1e-3, n_regular=6, regular_batch=2,
              surrogate="none")


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
    ctx.settings["model_prompt_sets"] = {}
    with pytest.raises(ValueError, match="regular_prompts="):
        AdversarialFineTuning(**PARAMS).fit(model, [PROMPT], ctx)
    with pytest.raises(ValueError, match="inits is empty"):
        AdversarialFineTuning(**{**PARAMS, "inits": ""}).fit(model, [PROMPT], ctx)
    # an inference-kind surrogate would be skipped by apply() and leave the surrogates unmitigated: refused
    ctx.settings["model_prompt_sets"] = {"regular": "tiny-general"}
    with pytest.raises(ValueError, match="surrogate='wen'"):
        AdversarialFineTuning(**{**PARAMS, "surrogate": "wen"}).fit(model, [PROMPT], ctx)
    with pytest.raises(RuntimeError, match="fit"):
        with AdversarialFineTuning().apply(model, PROMPT, ctx):
            pass
