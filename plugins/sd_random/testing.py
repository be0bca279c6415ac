"""Helpers for tests and plugin authors (part of the ``sd-random`` plugin, beside its full-size random SD): tiny random Stable Diffusion pipelines built from config (no download).

``sd14_layout=True`` mirrors SD v1.4's block layout (4 levels, 2 layers per block, cross-attention in the first
three down blocks and the mid block) at tiny widths, so layer maps resolved from the config (NeMo's 7 value
layers, Wanda's 16 FFN layers) can be checked without the real weights.
"""

from __future__ import annotations

from pathlib import Path


def tiny_random_pipeline(seed: int = 0, sd14_layout: bool = False, tokenizer_dir: str | Path | None = None,
                         cross_attention_dim: int = 32, sample_size: int = 8, prediction_type: str = "epsilon"):
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from memobench_plugins.tiny.tokenizer import load_sd_tokenizer  # the embedded model's tokenizer (test helper only)

    torch.manual_seed(seed)
    if sd14_layout:
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 64, 128, 128),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=cross_attention_dim, attention_head_dim=2, norm_num_groups=8,
        )
    else:
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim, attention_head_dim=2, norm_num_groups=8,
        )
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=sample_size * 2)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=cross_attention_dim,
                                        intermediate_size=2 * cross_attention_dim, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else Path(tempfile.gettempdir()) / "memobench-sd-tokenizer"
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=load_sd_tokenizer(tok_dir), unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_tiny_random_pipeline(path: str | Path, **kw) -> Path:
    pipe = tiny_random_pipeline(**kw)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return Path(path)
