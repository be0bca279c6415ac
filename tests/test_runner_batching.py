"""Utility prompts under a prompt-independent model are denoised several prompts per batch: each image equals the
one its prompt gives alone (up to the kernels' batch-composition rounding, ≤ 2 uint8 levels), a resumed run
recomputes a missing image bit-identically, and prompt-dependent mitigations keep one prompt per batch."""

from __future__ import annotations

import json

import numpy as np
import torch

from memobench.cache import ImageCache
from memobench.config import RunConfig
from memobench.runner import Runner


def _run(tmp_path, cache, mitigation="none", bs=4):
    cfg = RunConfig(model="tiny", mitigation=mitigation, limit=1, seeds=[0], utility_limit=5, utility_seeds=[0],
                    num_inference_steps=3, metrics=["tiny_alignment"], output_dir=str(tmp_path / "out"),
                    cache_dir=str(cache), offline=True, batch_size=bs)
    out = Runner(cfg, progress=False).run()
    rows = [json.loads(x) for x in open(out.samples_path)]
    return out, {(r["prompt_id"], r["seed"]): r["sample_key"] for r in rows if r["role"] == "utility"}


def test_cross_prompt_batches_match_single_prompt_images_and_resume_exactly(tmp_path, monkeypatch):
    from memobench.model import DiffusionModel

    sizes, orig = [], DiffusionModel.denoise

    def recording_denoise(self, pe, ne, lat, *a, **k):
        sizes.append(lat.shape[0])
        return orig(self, pe, ne, lat, *a, **k)

    monkeypatch.setattr(DiffusionModel, "denoise", recording_denoise)
    cache = tmp_path / "cache"
    out, keys = _run(tmp_path, cache)
    assert len(keys) == 5
    assert sizes == [1, 4, 1]  # the target (1 seed), then the 5 utility prompts in batches of 4 + 1
    monkeypatch.setattr(DiffusionModel, "denoise", orig)
    images = ImageCache(cache)
    first = {k: images.get(v) for k, v in keys.items()}

    # each image against its prompt denoised alone (batch of 1), through the model's public API
    from memobench.registry import get_registry

    reg = get_registry()
    mcls = reg.get("model", "tiny")
    from memobench.api import Context

    model = mcls(mcls.make_params({})).load(Context(cache_dir=cache, offline=True, device="cpu"))
    gen = out.result["generation"]
    texts = {r["prompt_id"]: r["prompt"] for r in map(json.loads, open(out.samples_path)) if r["role"] == "utility"}
    for (pid, seed), img in first.items():
        with torch.no_grad():
            lat = model.denoise(model.encode_prompt(texts[pid]), model.empty_embedding(),
                                model.initial_latents([seed]), gen["num_inference_steps"], gen["guidance_scale"])
        alone = model.decode(lat)[0]
        assert np.abs(alone.astype(int) - img.astype(int)).max() <= 2, pid

    # resume: delete two cached images (in different batches of 4) and re-run: bit-identical
    for k in [keys[sorted(keys)[1]], keys[sorted(keys)[4]]]:
        for f in images.paths(k):
            f.unlink()
    _run(tmp_path, cache)
    images = ImageCache(cache)
    for k, v in keys.items():
        assert np.array_equal(images.get(v), first[k]), k


def test_prompt_dependence_is_declared():
    from memobench.registry import get_registry

    reg = get_registry()
    make = lambda n, **kw: (lambda c: c(c.make_params(kw)))(reg.get("mitigation", n))  # noqa: E731
    assert make("none").prompt_independent and make("advft").prompt_independent
    assert make("wanda").prompt_independent and not make("wanda", group_size=1).prompt_independent
    assert not make("nemo").prompt_independent and not make("wen").prompt_independent
