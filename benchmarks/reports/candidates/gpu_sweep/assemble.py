"""Rebuild a StableDiffusionPipeline from a device sweep's fp16 UNet + decoder (the text encoder is frozen and seeded,
so its weights are the recipe's seeded init; the scaling factor is read from a work folder whose VAE phase is the
one the sweep ran from, SWEEP_BASE).

    python assemble.py UNET16 DEC_VAE16 RECIPE_JSON BASE_WORK_DIR OUT_PIPELINE_DIR
"""
import json
import sys
from pathlib import Path

import torch
from memobench_plugins.tiny import train as T
from safetensors.torch import load_file

from memobench_plugins.tiny.tokenizer import load_sd_tokenizer

unet16, vae16, recipe, base, out = sys.argv[1:6]
r = {**T.RECIPE, **json.loads(Path(recipe).read_text())}
torch.manual_seed(r["seed"])
comps = T.build_components(r)
comps["unet"].load_state_dict({k: v.float() for k, v in load_file(unet16).items()})
comps["vae"].load_state_dict({k: v.float() for k, v in load_file(vae16).items()})
comps["vae"].register_to_config(scaling_factor=T._latent_scale(Path(base)))
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline(**comps, tokenizer=load_sd_tokenizer(Path(base) / "tokenizer"), safety_checker=None,
                               feature_extractor=None, requires_safety_checker=False)
pipe.save_pretrained(out, safe_serialization=True)
print("scale", T._latent_scale(Path(base)), "pred", pipe.scheduler.config.prediction_type)
