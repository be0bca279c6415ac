"""Issue 31, try 1: what the contrastive pretraining did to the text encoder (run on a `zoo train tiny` work dir).

    python text_encoder_diag.py WORK_DIR

Held-out caption→image retrieval with the pretraining's own image tower (100 held-out general captions, rendered with
fixed seeds; a hit = the top image's caption equals the query) and the mean pairwise cosine of the 8 memorized
captions' mean token states, random init vs pretrained.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from memobench_plugins.tiny import train as T, data as D
from memobench_plugins.tiny.tokenizer import load_sd_tokenizer
torch.set_num_threads(1)
work = Path(sys.argv[1]); r = json.loads((work/"recipe.json").read_text())
tok = load_sd_tokenizer(work/"tokenizer")
torch.manual_seed(r["seed"]); text0 = T.build_components(r)["text_encoder"].eval()
text1 = T.build_components(r)["text_encoder"].eval(); text1.load_state_dict(load_file(str(work/"text_pretrained.safetensors")))
heads = torch.nn.ModuleDict({"image": T._LatentImageEncoder(r["latent_channels"], r["text_hidden"]), "text_proj": torch.nn.Linear(r["text_hidden"], r["text_hidden"], bias=False)})
heads.register_parameter("logit_scale", torch.nn.Parameter(torch.tensor(0.0)))
heads.load_state_dict(load_file(str(work/"text_heads.safetensors"))); heads.eval()
vae = T.build_components(r)["vae"]; vae.load_state_dict(load_file(str(work/"vae_vae.safetensors"))); vae.eval()
scale = T._latent_scale(work)
caps = D.heldout_captions()
rng = np.random.default_rng(123)
sel = rng.choice(len(caps), 100, replace=False); caps = [caps[i] for i in sel]
imgs = np.stack([D.render(c, np.random.default_rng(i)) for i, c in enumerate(caps)])
with torch.no_grad():
    z = T._encode_means(vae, imgs) * scale
    v = torch.nn.functional.normalize(heads["image"](z), dim=-1)
    ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    t = torch.nn.functional.normalize(heads["text_proj"](text1(ids).pooler_output), dim=-1)
    sim = t @ v.T
    same = torch.tensor([[a == b for b in caps] for a in caps])
    top = sim.argmax(1)
    acc = same[torch.arange(len(caps)), top].float().mean().item()
    print(f"held-out caption->image top-1 (100 held-out captions, equal captions count): {acc:.3f}")
    mem = [it.caption for it in D.VM_ITEMS]
    idm = tok(mem, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    for name, te in (("random init", text0), ("pretrained", text1)):
        h = te(idm)[0]  # 8x77x64
        # mean over caption tokens (excluding BOS/pad): pairwise cosine
        lens = [(row != 49407).sum().item() for row in idm]
        m = torch.stack([h[i, 1:lens[i]].mean(0) for i in range(8)])
        c = torch.nn.functional.cosine_similarity(m[:, None], m[None], dim=-1)
        off = c[~torch.eye(8, dtype=bool)].mean().item()
        print(name, "mean pairwise cosine of memorized captions' token means", round(off, 3))
