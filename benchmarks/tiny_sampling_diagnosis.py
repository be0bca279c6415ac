"""Where the embedded model loses the fine-grained photos (MODEL_CARD.md, "Tried after shipping"), by one command.

    python benchmarks/tiny_sampling_diagnosis.py [--model-param path=DIR] [--keys rocket,retina,astronaut]

For each memorized photo (its training caption):
1. one-step x0 estimates from the *training* latent noised to t (seed 0, 6 draws): RMSE to the training latent at
   t = 20, 100, 300, 600, 900 — how well the denoiser knows the image when it starts on the right trajectory;
   and from pure noise at the first timestep of 50 DDIM steps (the sampler's start, t = 981; seeds 0-5): the RMSE of
   each draw's x0 estimate and of their mean — a seed-independent estimate means the caption alone pins the photo
   down;
2. full DDIM samples (seeds 0-5) at guidance 1, 3, 6 and 50 or 200 steps: RMSE of the final latent to the training
   latent, and SSCD of the decoded image to the photo — whether sampling settings change where the sampler ends
   (skipped with ``--no-sampling``).
Also the SSCD of the VAE reconstruction (the ceiling). Prints one line per measurement.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from memobench.api import Context
from memobench.cache import default_cache_dir
from memobench.config import parse_kv
from memobench.registry import get_registry
from memobench.sscd import SSCD


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-param", action="append", help="KEY=VALUE for the tiny model plugin (e.g. path=DIR)")
    ap.add_argument("--keys", default="rocket,retina,astronaut", help="memorized photos (tiny-vm prompt ids)")
    ap.add_argument("--no-sampling", action="store_true", help="only the one-step x0 estimates (part 1)")
    a = ap.parse_args(argv)
    from memobench_plugins.tiny import data as D

    cls = get_registry().get("model", "tiny")
    model = cls(cls.make_params(parse_kv(a.model_param, "--model-param"))).load(
        Context(cache_dir=default_cache_dir(), offline=True, device="cpu"))
    sscd = SSCD(preset="dori2026", backend="auto", cache_dir=default_cache_dir(), offline=True)
    items = {it.key: it for it in D.VM_ITEMS}
    ac = model.alphas_cumprod()

    def x0_estimate(xt, t, e):  # x̂0 = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t, one UNet call per latent
        with torch.no_grad():
            return (xt - (1 - ac[t]).sqrt() * model.eps(xt, torch.tensor(t), e.expand(len(xt), -1, -1))) / ac[t].sqrt()

    for key in a.keys.split(","):
        ref = D.photo(key, model.resolution)
        rf = sscd.embed([ref])[0]
        z, e = model.encode_image(ref), model.encode_prompt(items[key].caption)
        print(f"{key}: VAE reconstruction SSCD {float(sscd.embed([model.decode(z)[0]])[0] @ rf):.3f}; "
              f"latent std {float(z.std()):.3f}", flush=True)
        row = []
        for t in (20, 100, 300, 600, 900):
            eps = torch.randn((6, *z.shape[1:]), generator=torch.Generator().manual_seed(0))
            x0 = x0_estimate(ac[t].sqrt() * z + (1 - ac[t]).sqrt() * eps, t, e)
            row.append(f"t={t}: {float((x0 - z).pow(2).mean().sqrt()):.3f}")
        print(f"{key}: one-step x0 RMSE from the noised training latent: " + ", ".join(row), flush=True)
        t = int(model.timesteps(50)[0])
        x0 = x0_estimate(model.initial_latents(list(range(6))), t, e)
        per = (x0 - z).pow(2).mean(dim=(1, 2, 3)).sqrt()
        print(f"{key}: x0 estimate from pure noise at t = {t} (seeds 0-5): per-draw RMSE "
              f"{float(per.min()):.3f}-{float(per.max()):.3f}, RMSE of their mean "
              f"{float((x0.mean(0) - z[0]).pow(2).mean().sqrt()):.3f}", flush=True)
        if a.no_sampling:
            continue
        for steps, gs in ((50, 3.0), (50, 1.0), (50, 6.0), (200, 3.0)):
            with torch.no_grad():
                out = model.denoise(e, model.empty_embedding(), model.initial_latents(list(range(6))), steps, gs)
            s = sscd.embed(list(model.decode(out))) @ rf
            d = (out - z).pow(2).mean(dim=(1, 2, 3)).sqrt().numpy()
            print(f"{key}: DDIM {steps} steps, guidance {gs:g}, seeds 0-5: SSCD mean {float(np.mean(s)):.3f} "
                  f"({', '.join(f'{v:.2f}' for v in s)}); final-latent RMSE {d.min():.2f}-{d.max():.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
