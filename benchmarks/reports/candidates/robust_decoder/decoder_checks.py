"""Decoder checks behind README.md here, for the shipped weights or a candidate folder.

    python benchmarks/reports/candidates/robust_decoder/decoder_checks.py [--model-param path=DIR]

1. Sensitivity: mean SSCD to the photo of decodings of a VM photo's own (scaled) latent plus noise, 4 draws, white
   Gaussian or low-frequency (4x4 Gaussian, bilinearly upsampled, unit std), sigma 0.2 / 0.4 / 0.6.
2. Does the decoder itself draw memorized photos? Max SSCD to any VM photo of decodings of N(0, I) latents (16) and
   of 8 never-trained photographs' latents plus sigma = 0 / 0.4 / 0.8 white noise; and SSCD of each VM photo's own
   latent + 0.4 / 0.8 noise to that photo.
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from memobench.api import Context
from memobench.cache import default_cache_dir
from memobench.config import parse_kv
from memobench.registry import get_registry
from memobench.sscd import SSCD
from memobench_plugins.tiny import data as D


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-param", action="append", help="KEY=VALUE for the tiny model plugin (e.g. path=DIR)")
    a = ap.parse_args()
    cls = get_registry().get("model", "tiny")
    m = cls(cls.make_params(parse_kv(a.model_param, "--model-param"))).load(
        Context(cache_dir=default_cache_dir(), offline=True, device="cpu"))
    sscd = SSCD(preset="dori2026", backend="auto", cache_dir=default_cache_dir(), offline=True)
    refs = [D.photo(it.key, m.resolution) for it in D.VM_ITEMS]
    R = sscd.embed(refs)
    zv = torch.cat([m.encode_image(r) for r in refs])
    g = torch.Generator().manual_seed(0)

    def noise(shape, kind):
        if kind == "white":
            return torch.randn(shape, generator=g)
        n = F.interpolate(torch.randn((*shape[:2], 4, 4), generator=g), size=shape[-2:], mode="bilinear",
                          align_corners=False)
        return n / n.std()

    print("1. mean SSCD to the photo, own latent + noise (4 draws)")
    for i, it in enumerate(D.VM_ITEMS):
        row = []
        for kind in ("white", "low-frequency"):
            for s in (0.2, 0.4, 0.6):
                ims = m.decode(zv[i:i + 1] + s * noise((4, *zv.shape[1:]), kind))
                row.append(f"{kind} {s}: {float(np.mean(sscd.embed(list(ims)) @ R[i])):.2f}")
        print(f"  {it.key}: " + ", ".join(row))
    print("2. max SSCD to any VM photo")
    others = [D.photo(k, m.resolution) for k, _ in D.NONMEM_PHOTOS[:8]]
    zo = torch.cat([m.encode_image(o) for o in others])
    res = {"N(0, I) latents": m.decode(torch.randn((16, *zv.shape[1:]), generator=g))}
    for s in (0.0, 0.4, 0.8):
        res[f"never-trained photos + {s}"] = m.decode(zo + s * torch.randn(zo.shape, generator=g))
    for k, ims in res.items():
        S = sscd.embed(list(ims)) @ R.T
        print(f"  {k}: mean {S.max(1).mean():.3f}, max {S.max():.3f}")
    for s in (0.4, 0.8):
        S = sscd.embed(list(m.decode(zv + s * torch.randn(zv.shape, generator=g)))) @ R.T
        print(f"  VM photos + {s}, SSCD to own photo: "
              + ", ".join(f"{it.key} {v:.2f}" for it, v in zip(D.VM_ITEMS, np.diag(S))))


if __name__ == "__main__":
    main()
