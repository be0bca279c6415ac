"""``sd-random``: Stable Diffusion v1.4 / 2 architectures with seeded random weights, built offline.

The real code path of memobench at the real size, without a download: every shape, hook and memory figure of SD v1.4
(``arch=sd14``) or SD 2 768-v (``arch=sd2``) is the real one; only the pixels are noise. Use it to check that a
mitigation or attack runs at SD size (``memobench run --model sd-random --model-param arch=sd14 …``), to time the
harness on a GPU (``benchmarks/gpu_check.py``) and, with ``size=reduced``, in tests.

Architectures (diffusers configs of the public checkpoints, METHODS §1.1, §1.3):

* ``sd14`` — ``CompVis/stable-diffusion-v1-4``: UNet ``block_out_channels`` (320, 640, 1280, 1280), 2 layers per block,
  cross-attention in the first three down blocks, the mid block and the last three up blocks (16 cross-attention
  layers, 7 of them NeMo's value layers, 16 FFNs), 8 heads, ``cross_attention_dim`` 768; text encoder CLIP ViT-L/14
  (768 wide, 12 layers, 12 heads, MLP 3072, quick-GELU): embeddings 77×768; ε-prediction; 512×512 (64×64×4 latents).
* ``sd2`` — ``stabilityai/stable-diffusion-2`` (768-v): the same UNet widths with head counts (5, 10, 20, 20), linear
  projections in the transformers, ``cross_attention_dim`` 1024; text encoder OpenCLIP ViT-H/14 as SD 2 uses it
  (1024 wide, 23 of its 24 layers, 16 heads, MLP 4096, GELU): embeddings 77×1024; v-prediction; 768×768; the
  tokenizer pads with "!" (id 0).
* VAE (both): ``block_out_channels`` (128, 256, 512, 512), 2 layers per block, scaling factor 0.18215; DDIM with SD's
  scaled-linear schedule (β 0.00085–0.012), ``clip_sample`` off, ``set_alpha_to_one`` off, ``steps_offset`` 1.

``size=reduced`` keeps the layout (the number and names of every block, layer, head and the 77×768 / 77×1024 text
embeddings) and divides the UNet widths by 8 (groups 8 instead of 32), the VAE widths by 8 and the text encoder's
depth to 2 layers: the shapes a hook sees differ only in the channel count. ``size=full`` is the real parameter count
(UNet 860 M for sd14 / 866 M for sd2).

Weights are drawn by the modules' own initialisers after ``torch.manual_seed(seed)``; the model identity is the
sha256 of every parameter's bytes (memoised in the cache folder per arch, size, seed and torch version), so a torch
release that draws other weights gives another identity and never reuses cached images.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from memobench.api import BadInput, ModelPlugin, hookimpl, param

ARCHS = ("sd14", "sd2")
SIZES = ("full", "reduced")


def _unet_config(arch: str, size: str) -> dict:
    div, groups = (1, 32) if size == "full" else (8, 8)
    cfg = dict(
        sample_size=64 if arch == "sd14" else 96, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=tuple(c // div for c in (320, 640, 1280, 1280)),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        norm_num_groups=groups, norm_eps=1e-5, act_fn="silu", downsample_padding=1, flip_sin_to_cos=True,
        freq_shift=0, mid_block_scale_factor=1,
    )
    if arch == "sd14":
        cfg.update(cross_attention_dim=768, attention_head_dim=8)
    else:
        cfg.update(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
    return cfg


def _text_config(arch: str, size: str) -> dict:
    if arch == "sd14":
        cfg = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu", projection_dim=768, pad_token_id=49407)
    else:
        cfg = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   hidden_act="gelu", projection_dim=512, pad_token_id=0)
    if size == "reduced":
        cfg["num_hidden_layers"] = 2
    return {**cfg, "vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407}


def _vae_config(size: str) -> dict:
    div, groups = (1, 32) if size == "full" else (8, 8)
    return dict(in_channels=3, out_channels=3, latent_channels=4,
                block_out_channels=tuple(c // div for c in (128, 256, 512, 512)),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=groups, act_fn="silu", sample_size=512, scaling_factor=0.18215)


def build_pipeline(arch: str = "sd14", size: str = "full", seed: int = 0, tokenizer_dir: str | Path | None = None,
                   device: str = "cpu"):
    """A ``StableDiffusionPipeline`` of ``arch`` at ``size`` with weights drawn after ``torch.manual_seed(seed)``.
    Modules are created on ``device`` (fast random init on a GPU); fp32."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from memobench_plugins.tiny.tokenizer import load_sd_tokenizer

    if arch not in ARCHS:
        raise BadInput(f"model 'sd-random' parameter arch: {arch!r} is not one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise BadInput(f"model 'sd-random' parameter size: {size!r} is not one of {', '.join(SIZES)}")
    torch.manual_seed(int(seed))
    with torch.device(device):
        unet = UNet2DConditionModel(**_unet_config(arch, size))
        vae = AutoencoderKL(**_vae_config(size))
        text = CLIPTextModel(CLIPTextConfig(**_text_config(arch, size)))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1,
                          prediction_type="epsilon" if arch == "sd14" else "v_prediction")
    pad = "<|endoftext|>" if arch == "sd14" else "!"
    tok_dir = Path(tokenizer_dir or Path(tempfile.gettempdir()) / "memobench-sd-tokenizer") / arch
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=load_sd_tokenizer(tok_dir, pad_token=pad),
                                   unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def weights_sha256(pipe) -> str:
    """sha256 over every parameter and buffer of the UNet, VAE and text encoder (names, dtypes, shapes, bytes)."""
    import torch

    h = hashlib.sha256()
    for comp in ("unet", "vae", "text_encoder"):
        for name, t in getattr(pipe, comp).state_dict().items():
            t = t.detach().to("cpu").contiguous()
            h.update(f"{comp}.{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
    return h.hexdigest()


class SDRandom(ModelPlugin):
    """SD v1.4 / SD 2 (768-v) architecture with seeded random weights, built offline (no download)."""

    name = "sd-random"
    version = "1"
    generation = {"num_inference_steps": 50, "guidance_scale": 7.5, "height": 512, "width": 512}
    default_seeds = tuple(range(10))
    default_utility_seeds = (0,)
    default_metrics = ["mr", "sscd_orig"]
    # the embedded model's sets: offline prompts with training images (the DoRI attack and SSCD need references)
    prompt_sets = {"target": "tiny-vm", "nonmem": "tiny-nonmem", "utility": "tiny-heldout", "regular": "tiny-general"}

    @dataclass
    class Params:
        arch: str = param("sd14", "architecture: sd14 | sd2")
        size: str = param("full", "full | reduced (layout kept, widths / 8, 2 text layers: for tests)")
        seed: int = param(0, "torch.manual_seed before the modules are built")

    def __init__(self, params=None, **kw):
        super().__init__(params, **kw)
        if self.params.arch not in ARCHS:
            raise BadInput(f"model 'sd-random' parameter arch: {self.params.arch!r} is not one of {', '.join(ARCHS)}")
        if self.params.size not in SIZES:
            raise BadInput(f"model 'sd-random' parameter size: {self.params.size!r} is not one of "
                           f"{', '.join(SIZES)}")

    def load(self, ctx):
        import torch

        from memobench.api import DiffusionModel, memoised

        p = self.params
        build_dev = ctx.device if str(ctx.device).startswith("cuda") else "cpu"
        pipe = build_pipeline(p.arch, p.size, p.seed, tokenizer_dir=Path(ctx.cache_dir) / "sd-random-tokenizer",
                              device=build_dev)
        key = f"{p.arch}|{p.size}|{p.seed}|torch {torch.__version__}|{build_dev.split(':')[0]}"
        sha = memoised(Path(ctx.cache_dir) / "sd-random-identity.json", key, lambda: weights_sha256(pipe))
        return DiffusionModel(pipe, model_id=f"sd-random:{p.arch}:{p.size}:seed{p.seed}",
                              revision=f"sha256:{sha}", device=ctx.device)


@hookimpl
def register_models(register):
    register(SDRandom)
