"""The robust-decoder candidate (README.md here): the shipped UNet and text encoder, with the shipped VAE's decoder
refined by the recipe's decoder phase (``dec_*`` in ``memobench_plugins.tiny.train.RECIPE``).

    python benchmarks/reports/candidates/robust_decoder/reproduce.py WORK_DIR [--dec-steps 3000 --dec-noise 1.0
        --dec-lr 5e-4]

Writes WORK_DIR/fp16 (a pipeline folder, installed as fp16 like the shipped copy), to score with
``python benchmarks/tiny_model_checks.py --model-param path=WORK_DIR/fp16``. The latent scaling factor stays the
shipped one (the UNet was trained with it); the latents are the shipped encoder's posterior means.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from memobench_plugins.tiny import WEIGHTS
from memobench_plugins.tiny import data as D
from memobench_plugins.tiny import train as T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path)
    ap.add_argument("--dec-steps", type=int, default=3000)
    ap.add_argument("--dec-noise", type=float, default=1.0)
    ap.add_argument("--dec-lr", type=float, default=5e-4)
    a = ap.parse_args()
    r = {**T.RECIPE, "dec_steps": a.dec_steps, "dec_noise": a.dec_noise, "dec_lr": a.dec_lr}
    work = a.work
    (work / "tokenizer").mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def f32(p):
        return {k: v.float().contiguous() for k, v in load_file(str(p)).items()}

    save_file(f32(WEIGHTS / "vae/diffusion_pytorch_model.safetensors"), str(work / "vae_vae.safetensors"))
    save_file(f32(WEIGHTS / "unet/diffusion_pytorch_model.safetensors"), str(work / "unet_ema_unet.safetensors"))
    save_file(f32(WEIGHTS / "text_encoder/model.safetensors"), str(work / "unet_ema_text_encoder.safetensors"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (work / "tokenizer" / f).write_bytes((WEIGHTS / "tokenizer" / f).read_bytes())
    pool, caps = D.general_pool(r["general_pool"], seed=r["seed"], res=r["res"])
    np.save(work / "general_pool.npy", pool)
    (work / "general_pool.json").write_text(json.dumps(caps))
    vae = T.build_components(r)["vae"]
    vae.load_state_dict(load_file(str(work / "vae_vae.safetensors")))
    vae.eval()
    bank, _, _ = T._memorized_bank(r["res"])
    with torch.no_grad():
        def enc(x):
            return torch.cat([vae.encode(T._to_tensor(x[i:i + 64])).latent_dist.mean for i in range(0, len(x), 64)])

        zm, zg = enc(bank), enc(pool)
    scale = json.loads((WEIGHTS / "vae/config.json").read_text())["scaling_factor"]
    save_file({"mem": zm.contiguous(), "gen": zg.contiguous()}, str(work / "latents.safetensors"),
              metadata={"scaling_factor": repr(scale)})
    T.refine_decoder(work, r, True, print)
    T.export(work, r, work / "pipeline")
    T.install(work / "pipeline", work / "fp16")
    print(f"done in {time.time() - t0:.0f}s -> {work / 'fp16'}")


if __name__ == "__main__":
    main()
