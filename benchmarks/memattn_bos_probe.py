"""python benchmarks/memattn_bos_probe.py  (about 1 min on one core)

BOS attention share per cross-attention layer of the embedded model (conditional half, mean over heads, pixels,
the 8 VM prompts x seed 0, all 50 DDIM steps at guidance 3), with and without memattn's C = 1.25."""
import torch
from memobench.api import Context, cross_attention
from memobench.registry import get_registry

torch.set_num_threads(1)
reg = get_registry()
model = reg.get("model", "tiny")().load(Context(cache_dir="/tmp/memattn-probe-cache"))
ps = reg.get("prompt_set", "tiny-vm")()
prompts = ps.prompts(Context(cache_dir="/tmp/memattn-probe-cache"))
for c1 in (1.0, 1.25):
    share = {}
    def edit(name, logits):
        half = logits.shape[0] // 2
        out = logits.clone(); out[half:, :, 0] = out[half:, :, 0] * c1
        return out
    def rec(name, probs):
        half = probs.shape[0] // 2
        share.setdefault(name, []).append(float(probs[half:, :, 0].mean()))
    with torch.no_grad(), cross_attention(model.unet, edit_logits=edit, record=rec):
        for p in prompts:
            model.generate(model.encode_prompt(p.text), model.empty_embedding(), [0], 50, 3.0)
    for n, v in share.items():
        print(f"C={c1} {n}: BOS share min {min(v):.3f} mean {sum(v)/len(v):.3f} max {max(v):.3f}")
