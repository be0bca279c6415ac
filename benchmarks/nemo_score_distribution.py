"""NeMo's memorization score on the embedded model's prompt sets (MODEL_CARD.md, "Tried, not shipped: v-prediction").

    python benchmarks/nemo_score_distribution.py [--model-param path=DIR]

For each prompt: m = max over seed pairs of the MS-SSIM between the noise differences δ = ε̂(x_T) − x_T of NeMo's 10
detection seeds, at NeMo's detection timestep, with NeMo's defaults (METHODS §7.1.3). Prints mean, std, min and max
over the 40 non-memorized prompts (``tiny-nonmem``, NeMo's activation-statistics set), 20 held-out general captions
and the 8 VM prompts. The paper's τ = 0.428 is mean + 1 std of this score over SD v1.4's hold-out prompts.
"""

from __future__ import annotations

import argparse

import numpy as np

from memobench.api import Context
from memobench.cache import default_cache_dir
from memobench.config import parse_kv
from memobench.registry import get_registry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-param", action="append", help="KEY=VALUE for the tiny model plugin (e.g. path=DIR)")
    a = ap.parse_args(argv)
    from memobench_plugins.nemo import NeMo, max_pairwise_ms_ssim, noise_differences

    reg = get_registry()
    cls = reg.get("model", "tiny")
    model = cls(cls.make_params(parse_kv(a.model_param, "--model-param"))).load(
        Context(cache_dir=default_cache_dir(), offline=True, device="cpu"))
    nemo = NeMo()
    p = nemo.params
    latents = nemo._latents(model)
    t = model.timesteps(p.num_inference_steps)[p.timestep_index]
    kw = {"kernel_size": p.msssim_kernel, "betas": p.msssim_betas, "small_latent": p.small_latent,
          "upsample_to": p.upsample_to}
    sets = {"tiny-nonmem": None, "tiny-heldout": 20, "tiny-vm": None}
    for name, limit in sets.items():
        texts = [q.text for q in reg.get("prompt_set", name)().prompts(None)][:limit]
        s = np.array([float(max_pairwise_ms_ssim(noise_differences(model, model.encode_prompt(x), latents, t,
                                                                     p.detect_guidance_scale), **kw).max())
                      for x in texts])
        print(f"{name} ({len(texts)} prompts): max pairwise MS-SSIM of δ mean {s.mean():.3f} std {s.std():.3f} "
              f"min {s.min():.3f} max {s.max():.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
