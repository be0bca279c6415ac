"""The model adapter: one wrapper over a diffusers ``StableDiffusionPipeline`` (hub id or local folder).

It exposes what mitigations, attacks and detectors need — prompt encoding, per-image seeded initial latents,
one classifier-free-guidance denoising loop with access to both noise predictions at every step, and VAE
encode/decode — written against diffusers' public API (``UNet2DConditionModel.__call__``,
``scheduler.set_timesteps/step``, ``AutoencoderKL.encode/decode``). The same code serves SD v1.4/v2 and the
embedded ``tiny`` model; its loop reproduces ``StableDiffusionPipeline.__call__`` (DDIM, η = 0) step for step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import BadInput


@dataclass
class StepInfo:
    """Passed to ``on_step`` at every denoising step (before the scheduler update)."""

    index: int
    timestep: torch.Tensor
    latents: torch.Tensor
    eps_uncond: torch.Tensor | None  # ε (converted from v for v-prediction models)
    eps_cond: torch.Tensor


def _dir_sha256(path: Path) -> str:
    """sha256 over the weight files of a pipeline folder (relative names + contents), cached next to them."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".txt")
                   and not p.name.startswith(".memobench"))
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(path)).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def weights_identity(path: str | Path) -> str:
    """sha256 identity of a local pipeline folder, memoised by (file sizes, mtimes)."""
    path = Path(path)
    stamp = json.dumps(sorted((str(p.relative_to(path)), p.stat().st_size, int(p.stat().st_mtime))
                              for p in path.rglob("*") if p.is_file() and not p.name.startswith(".memobench")))
    from .cache import default_cache_dir, memoised

    key = hashlib.sha256((str(path.resolve()) + stamp).encode()).hexdigest()
    return memoised(default_cache_dir() / "weights_sha.json", key, lambda: _dir_sha256(path))


class WeightsPinError(BadInput):
    """Weights whose sha256 differs from a pin (``--model-param sha256=…``): bad input, exit 2."""


# what a Stable Diffusion pipeline needs from a hub repository: configs, tokenizer and the safetensors weights (not
# the single-file .ckpt, the pickled .bin files, fp16/EMA variants or the safety checker)
SNAPSHOT_PATTERNS = ("model_index.json", "scheduler/*", "tokenizer/*", "feature_extractor/*",
                     "text_encoder/config.json", "text_encoder/model.safetensors",
                     "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                     "vae/config.json", "vae/diffusion_pytorch_model.safetensors")


def resolve_snapshot(hub_id: str, revision: str | None = None, offline: bool = False) -> tuple[Path, str]:
    """``(folder, commit)``: the Hugging Face snapshot of ``hub_id`` at ``revision`` (default ``main``), downloaded
    (only :data:`SNAPSHOT_PATTERNS`) unless ``offline``, where only the local Hugging Face cache is read. The commit is
    the snapshot folder's name (the hub cache names snapshots by commit hash)."""
    import huggingface_hub

    try:
        folder = Path(huggingface_hub.snapshot_download(hub_id, revision=revision,
                                                        allow_patterns=list(SNAPSHOT_PATTERNS),
                                                        local_files_only=offline))
    except Exception as e:
        at = f" at revision {revision}" if revision else ""
        if offline:
            raise FileNotFoundError(f"model '{hub_id}'{at} is not a local folder and is not in the Hugging Face cache; "
                                    "run once online or pass a local path") from None
        raise FileNotFoundError(f"model '{hub_id}'{at}: download failed ({type(e).__name__}: {str(e)[:200]}); check "
                                "the id/revision and the network, or pass a local folder") from None
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"model '{hub_id}': snapshot {folder.name} has no model_index.json; it is not a "
                                "diffusers StableDiffusionPipeline repository")
    return folder, folder.name


class DiffusionModel:
    """A Stable Diffusion pipeline plus the operations the benchmark needs."""

    def __init__(self, pipe, model_id: str, revision: str | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.pipe = pipe.to(device) if pipe.unet.dtype == dtype else pipe.to(device=device, dtype=dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.model_id = model_id
        self.revision = revision
        self.device = torch.device(device)
        self.dtype = dtype
        for m in (self.unet, self.vae, self.text_encoder):
            m.requires_grad_(False)
            m.eval()
        self._empty: torch.Tensor | None = None
        # where the weights came from (recorded in the result, outside the cache key): hub id + resolved commit
        self.source: dict = {"kind": "in memory"}
        if any(".to_kv" in n or n.endswith("to_qkv") for n, _ in self.unet.named_modules()):
            raise ValueError("fused QKV projections are active (fuse_qkv_projections()); unfuse them first: "
                             "hooks on attn2.to_v would never fire")

    def set_dtype(self, dtype: torch.dtype) -> "DiffusionModel":
        """Cast every component to ``dtype`` (``--dtype``); the dtype is part of :meth:`identity`, so images of
        different dtypes never share a cache key."""
        self.pipe.to(dtype=dtype)
        self.dtype = dtype
        self._empty = None
        return self

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path_or_id: str, *, revision: str | None = None, offline: bool = False,
                        device: str = "cpu", dtype: torch.dtype = torch.float32,
                        sha256: str | None = None) -> "DiffusionModel":
        """Load a ``StableDiffusionPipeline`` from a local folder or a hub id (safetensors only, no pickles).

        A hub id is first resolved to a snapshot folder (:func:`resolve_snapshot`: ``revision`` — a branch, tag or
        commit — is pinned there, and the commit it resolved to is recorded in :attr:`source`); the pipeline is then
        loaded from that folder. Online or offline, hub snapshot or a local copy of the same files, the weights are
        identified the same way: the sha256 of the folder's weight and config files (:func:`weights_identity`), which
        enters every cache key. ``sha256`` pins that identity: other weights are refused with one line."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        quiet_libraries()
        local = Path(path_or_id)
        if local.exists():
            if not (local / "model_index.json").is_file():
                raise FileNotFoundError(f"model '{path_or_id}': the folder has no model_index.json; pass a "
                                        "StableDiffusionPipeline folder (save_pretrained) or a hub id")
            folder, source = local, {"kind": "local folder"}
        else:
            folder, commit = resolve_snapshot(path_or_id, revision=revision, offline=offline)
            source = {"kind": "hub", "hub_id": path_or_id, "revision_requested": revision, "commit": commit}
        ident = weights_identity(folder)
        if sha256 and sha256.lower().removeprefix("sha256:") != ident:
            raise WeightsPinError(f"model '{path_or_id}': weights sha256 {ident[:16]}… differ from the pinned "
                                  f"{sha256[:16]}…; pass the revision those weights came from, or drop the pin")
        with warnings.catch_warnings():  # newer diffusers deprecate torch_dtype for dtype, which older ones lack
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(
                str(folder), use_safetensors=True, safety_checker=None, requires_safety_checker=False,
                local_files_only=True, torch_dtype=dtype,
            )
        # SD samples with DDIM (η = 0) and never clips x̂_0: set it explicitly, since DDIMScheduler's own default
        # (clip_sample=True) would apply wherever a folder's scheduler config lacks the key
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        model = cls(pipe, model_id=path_or_id, revision=ident, device=device, dtype=dtype)
        model.source = {**source, "weights_sha256": ident}
        return model

    # ------------------------------------------------------------------------------------------- components
    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def text_encoder(self):
        return self.pipe.text_encoder

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        h = (height or self.resolution) // self.vae_scale_factor
        w = (width or self.resolution) // self.vae_scale_factor
        return (int(self.unet.config.in_channels), h, w)

    def identity(self) -> dict:
        """What determines the model's outputs, part of every cache key: the sha256 of the weight and config files
        when they were loaded from a folder (a hub snapshot and a local copy of the same files are the same model,
        wherever the folder lies: :meth:`from_pretrained`), otherwise the id it was given; and the scheduler, dtype
        and attention processors. Where the weights came from (hub id, folder) is :attr:`model_id` / :attr:`source`,
        recorded in results outside the key."""
        return {
            **({} if self.revision else {"id": self.model_id}),
            "revision_or_sha256": self.revision,
            "pipeline_class": type(self.pipe).__name__,
            "scheduler": {"class": type(self.scheduler).__name__, "config": _jsonable(dict(self.scheduler.config))},
            "dtype": str(self.dtype).replace("torch.", ""),
            "attention_processor": sorted({type(p).__name__ for p in self.unet.attn_processors.values()}),
        }

    # ------------------------------------------------------------------------------------------- text
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)

    def prompt_length(self, text: str) -> int:
        """Tokens of ``text`` without padding, truncated at the tokenizer's maximum (77): BOS + words + EOS, the
        positions of the conditioning that carry the prompt (attention-based methods index the EOS token by it)."""
        return len(self.tokenizer(text, truncation=True, max_length=self.tokenizer.model_max_length).input_ids)

    def encode_prompt(self, texts: str | list[str]) -> torch.Tensor:
        """Text embeddings (B×77×d), as ``StableDiffusionPipeline.encode_prompt`` computes them."""
        if isinstance(texts, str):
            texts = [texts]
        with torch.no_grad():
            return self.text_encoder(self.tokenize(texts))[0].to(self.dtype)

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(ids)[0].to(self.dtype)

    def empty_embedding(self) -> torch.Tensor:
        if self._empty is None:
            self._empty = self.encode_prompt([""])
        return self._empty

    # ------------------------------------------------------------------------------------------- noise
    def initial_latents(self, seeds: list[int], height: int | None = None, width: int | None = None) -> torch.Tensor:
        """One CPU ``torch.Generator().manual_seed(s)`` per image: identical to passing
        ``generator=[torch.Generator().manual_seed(s) for s in seeds]`` to the diffusers pipeline."""
        shape = (1, *self.latent_shape(height, width))
        lat = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=self.dtype)
                         for s in seeds])
        return lat.to(self.device) * self.scheduler.init_noise_sigma

    def joint_latents(self, n: int, seed: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """``n`` initial latents from **one** CPU draw of shape (n, C, h, w) after ``manual_seed(seed)``, × the
        scheduler's initial sigma, in the model's dtype (NeMo's ``prepare_diffusion_inputs`` convention, also used
        by detectors that score a fixed set of latents); unlike :meth:`initial_latents` (one generator per image),
        latent g depends on n."""
        shape = (int(n), *self.latent_shape(height, width))
        lat = torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float32)
        return (lat * self.scheduler.init_noise_sigma).to(self.device, self.dtype)

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts (the scheduler's ``prediction_type``): ``"epsilon"`` (SD v1.x, SD 2 base) or
        ``"v_prediction"`` (SD 2 768-v; Salimans & Ho 2022). The shipped embedded ``tiny`` model is v-prediction."""
        pt = str(self.scheduler.config.get("prediction_type", "epsilon"))
        if pt not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler prediction_type {pt!r} is not supported; memobench handles 'epsilon' and "
                             "'v_prediction' models")
        return pt

    def unet_output(self, latents: torch.Tensor, t, embeds: torch.Tensor) -> torch.Tensor:
        """The UNet's raw output (ε or v, see :attr:`prediction_type`); differentiable when grad is enabled."""
        return self.unet(latents, t, encoder_hidden_states=embeds, return_dict=False)[0]

    def _ab(self, t, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t in ``like``'s dtype, shaped to broadcast over a batch like ``like`` (t: an index or a (B,) tensor)."""
        t = torch.as_tensor(t, device=self.device).long()
        a = self.alphas_cumprod()[t].to(like.dtype)
        return a.view(-1, *([1] * (like.dim() - 1))) if a.dim() else a

    def to_eps(self, output: torch.Tensor, latents: torch.Tensor, t) -> torch.Tensor:
        """Convert a raw UNet output at ``(latents, t)`` to ε: for v-prediction ε = √ᾱ_t·v + √(1−ᾱ_t)·x_t."""
        if self.prediction_type == "epsilon":
            return output
        a = self._ab(t, output.float())
        return (a.sqrt() * output.float() + (1 - a).sqrt() * latents.float()).to(output.dtype)

    def from_eps(self, eps: torch.Tensor, latents: torch.Tensor, t) -> torch.Tensor:
        """Inverse of :meth:`to_eps`: ε at ``(latents, t)`` → the model's parameterisation
        (v = (ε − √(1−ᾱ_t)·x_t)/√ᾱ_t), computed in fp32."""
        if self.prediction_type == "epsilon":
            return eps
        a = self._ab(t, eps.float())
        return ((eps.float() - (1 - a).sqrt() * latents.float()) / a.sqrt()).to(eps.dtype)

    def step_eps(self, eps: torch.Tensor, t, latents: torch.Tensor) -> torch.Tensor:
        """One deterministic scheduler step (η = 0) from an ε prediction, for code that guides in ε-space (Wen's
        detection and mitigation); identical to ``scheduler.step(eps, …)`` for ε-prediction models."""
        out = self.from_eps(eps, self.scheduler.scale_model_input(latents, t), t)
        return self.scheduler.step(out, t, latents, eta=0.0, return_dict=False)[0]

    def eps(self, latents: torch.Tensor, t, embeds: torch.Tensor) -> torch.Tensor:
        """ε_θ(x_t, t, e): one UNet call, converted to ε for v-prediction models (differentiable when grad is
        enabled). Detection statistics and NeMo's noise differences are defined on ε and use this."""
        return self.to_eps(self.unet_output(latents, t, embeds), latents, t)

    def eps_difference(self, x: torch.Tensor, t, e_u: torch.Tensor, e_c: torch.Tensor) -> torch.Tensor:
        """ε̃(x) = ε_θ(x, t, e_c) − ε_θ(x, t, e_u) for a batch x (B×C×h×w), in fp32: the text-conditional noise
        prediction of Wen et al., one CFG pass (both halves in one UNet call); differentiable when grad is on."""
        b = x.shape[0]
        xin = self.scheduler.scale_model_input(torch.cat([x, x]), t).to(self.dtype)
        emb = torch.cat([e_u.expand(b, -1, -1), e_c.expand(b, -1, -1)]).to(self.dtype)
        eu, ec = self.eps(xin, t, emb).float().chunk(2)
        return ec - eu

    def target(self, z0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """The training target of the UNet's raw output: ε, or v = √ᾱ_t·ε − √(1−ᾱ_t)·z0."""
        if self.prediction_type == "epsilon":
            return noise
        a = self._ab(t, z0)
        return a.sqrt() * noise - (1 - a).sqrt() * z0

    def diffusion_loss(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                       per_sample: bool = False) -> torch.Tensor:
        """The model's own training loss, MSE(raw output(x_t, t, e), target) with x_t = √ᾱ_t·z0 + √(1−ᾱ_t)·ε
        (the diffusers training-script convention: ε-MSE for ε models, v-MSE for v models). Computed in fp32;
        ``embeds`` broadcast over the batch. ``per_sample`` returns one mean per batch element."""
        x = self.add_noise(z0, noise, t)
        e = embeds.expand(z0.shape[0], -1, -1) if embeds.shape[0] == 1 else embeds
        pred = self.unet_output(x.to(self.dtype), t, e.to(self.dtype)).float()
        tgt = self.target(z0.float(), noise.float(), t)
        if not per_sample:
            return torch.nn.functional.mse_loss(pred, tgt)
        return (pred - tgt).pow(2).mean(dim=tuple(range(1, pred.dim())))

    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(self.device, torch.float32)

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self._ab(t, z0)
        return a.sqrt() * z0 + (1 - a).sqrt() * noise

    def timesteps(self, num_inference_steps: int) -> torch.Tensor:
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        return self.scheduler.timesteps

    # ------------------------------------------------------------------------------------------- sampling
    def denoise(self, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor, latents: torch.Tensor,
                num_inference_steps: int, guidance_scale: float,
                on_step: Callable[[StepInfo], None] | None = None, guidance=None) -> torch.Tensor:
        """The CFG denoising loop of ``StableDiffusionPipeline.__call__``; embeddings broadcast over the batch.
        ``guidance`` (a :class:`memobench.api.Guidance`) sets the weight of each step, per sample if it wishes."""
        b = latents.shape[0]
        pe = prompt_embeds.expand(b, -1, -1) if prompt_embeds.shape[0] == 1 else prompt_embeds
        ne = (negative_prompt_embeds.expand(b, -1, -1) if negative_prompt_embeds.shape[0] == 1
              else negative_prompt_embeds)
        cfg = guidance_scale > 1.0 or guidance is not None
        embeds = torch.cat([ne, pe]) if cfg else pe
        timesteps = self.timesteps(num_inference_steps)
        if guidance is not None:
            guidance.start(latents, timesteps)
        for i, t in enumerate(timesteps):
            if guidance is not None:
                guidance.before_step(i, t, latents)
            x = torch.cat([latents] * 2) if cfg else latents
            x = self.scheduler.scale_model_input(x, t)
            out = self.unet_output(x, t, embeds)
            e = self.to_eps(out, x, t) if (on_step is not None or guidance is not None) else None
            if cfg:
                ou, oc = out.chunk(2)
                w = guidance_scale
                if guidance is not None:
                    eu, ec = e.chunk(2)
                    w = guidance.scale(i, t, latents, eu, ec, guidance_scale)
                    if torch.is_tensor(w) and w.ndim == 1:
                        w = w.to(ou.dtype).view(-1, *([1] * (ou.ndim - 1)))
                guided = ou + w * (oc - ou)  # in the model's own parameterisation, as the pipeline
            else:
                ou, oc, guided = None, out, out
            if on_step is not None:
                eu, ec = e.chunk(2) if cfg else (None, e)
                on_step(StepInfo(i, t, latents, eu, ec))
            latents = self.scheduler.step(guided, t, latents, eta=0.0, return_dict=False)[0]
        return latents

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents → B×H×W×3 uint8, as the pipeline's ``output_type="pil"`` post-processing."""
        with torch.no_grad():
            img = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        img = (img / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        return (img * 255).round().astype("uint8")

    def decode_differentiable(self, latents: torch.Tensor) -> torch.Tensor:
        img = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return (img / 2 + 0.5).clamp(0, 1)

    def encode_image(self, image: np.ndarray, sample: bool = False, generator: torch.Generator | None = None,
                     height: int | None = None, width: int | None = None) -> torch.Tensor:
        """H×W×3 uint8 → scaled latent (1×C×h×w). The image is centre-cropped to the aspect ratio of
        ``height``×``width`` and resized to it (default: the model resolution, square; pass the run's generation
        size, :func:`generation_size`, so that the latent has the size the run denoises)."""
        size = (height or self.resolution, width or self.resolution)
        x = torch.from_numpy(to_size(image, *size)).permute(2, 0, 1)[None].float()
        x = (x / 127.5 - 1.0).to(self.device, self.dtype)
        with torch.no_grad():
            dist = self.vae.encode(x).latent_dist
            z = dist.sample(generator) if sample else dist.mean
        return z * self.vae.config.scaling_factor

    def generate(self, cond_embeds: torch.Tensor, negative_embeds: torch.Tensor, seeds: list[int],
                 num_inference_steps: int, guidance_scale: float, height: int | None = None,
                 width: int | None = None, latents: torch.Tensor | None = None) -> np.ndarray:
        """Images (B×H×W×3 uint8) for one conditioning and a list of seeds."""
        if latents is None:
            latents = self.initial_latents(seeds, height, width)
        with torch.no_grad():
            lat = self.denoise(cond_embeds, negative_embeds, latents, num_inference_steps, guidance_scale)
        return self.decode(lat)


@contextlib.contextmanager
def swapped_parameters(module, state: dict, who: str):
    """Within the block, the parameters of ``module`` named in ``state`` use the storage of ``state``'s tensors (no
    copy: fine-tuning mitigations apply their fitted weights with this); the original storage comes back on exit,
    even after an exception. ``who`` names the caller (e.g. "mitigation 'advft'") in the error raised, before any
    change, when a name or shape does not match."""
    named = dict(module.named_parameters())
    for n, t in state.items():
        if n not in named or named[n].shape != t.shape:
            raise RuntimeError(f"{who}: fine-tuned weights do not match the model at {n}")
    saved = {}
    try:
        for n, t in state.items():
            saved[n] = named[n].data
            named[n].data = t
        yield
    finally:
        for n, data in saved.items():
            named[n].data = data


@contextlib.contextmanager
def frozen_parameters(*modules):
    """Set ``requires_grad=False`` on every parameter of ``modules`` (None skipped); restore the flags on exit.
    Attacks and inference-time mitigations optimise an embedding through a frozen model with this."""
    saved = []
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            saved.append((p, p.requires_grad))
            p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def tensors_sha256(tensors: dict) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of named tensors in name order: the fingerprint results record of
    weights a mitigation edits or masks (bool tensors hashed as uint8)."""
    h = hashlib.sha256()
    for n in sorted(tensors):
        t = tensors[n].detach().cpu().contiguous()
        h.update(f"{n}|{t.dtype}|{tuple(t.shape)}|".encode())
        raw = t.to(torch.uint8) if t.dtype == torch.bool else t.view(-1).view(torch.uint8)
        h.update(raw.numpy().tobytes())
    return h.hexdigest()


UNET_BLOCKS = ("down", "mid", "up")


def transformer_blocks(unet, blocks: "tuple[str, ...] | list[str]" = UNET_BLOCKS) -> list[tuple[str, object]]:
    """``(name, BasicTransformerBlock)`` of every transformer block of a diffusers UNet in the UNet parts ``blocks``
    (of ``"down"``, ``"mid"``, ``"up"``), in forward order; names as in ``unet.named_modules()``
    (``down_blocks.0.attentions.1.transformer_blocks.0``). Plugins that hook or edit attention/FFN layers (NeMo's
    value layers, Wanda's FFN layers) walk the UNet with it."""
    groups: list[tuple[str, object]] = []
    if "down" in blocks:
        groups += [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if "mid" in blocks and getattr(unet, "mid_block", None) is not None:
        groups.append(("mid_block", unet.mid_block))
    if "up" in blocks:
        groups += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    out = []
    for prefix, block in groups:
        for a, attn in enumerate(getattr(block, "attentions", None) or []):
            for b, tb in enumerate(getattr(attn, "transformer_blocks", None) or []):
                out.append((f"{prefix}.attentions.{a}.transformer_blocks.{b}", tb))
    return out


def quiet_libraries() -> None:
    """Silence diffusers/transformers loading bars and info logs (memobench shows its own progress)."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def generation_size(model: "DiffusionModel", ctx=None) -> tuple[int, int]:
    """(height, width) in pixels of the run's generation: ``ctx.generation`` (the runner puts the
    resolved ``--height/--width`` or the model plugin's defaults there), else the model's native resolution.
    Plugins that encode images or draw latents outside the runner's generation loop use it so that every part of
    a run works at one resolution."""
    g = dict(getattr(ctx, "generation", None) or {})
    return int(g.get("height") or model.resolution), int(g.get("width") or model.resolution)


def size_key_part(model: "DiffusionModel", size: tuple[int, int]) -> tuple[str, ...]:
    """What a run's (height, width) adds to the cache key of something computed at that size (an attack output, a
    fitted artifact): nothing at the model's native square resolution, so native-size keys stay those of versions
    without sizes; ``("HxW",)`` otherwise."""
    h, w = (int(v) for v in size)
    return () if (h, w) == (model.resolution, model.resolution) else (f"{h}x{w}",)


def to_size(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop to the aspect ratio width/height and resize (bicubic, antialiased) to height×width, RGB uint8;
    for a square size exactly :func:`to_model_resolution`."""
    if height == width:
        return to_model_resolution(image, height)
    from PIL import Image

    a = np.asarray(image)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    a = a[..., :3]
    h, w = a.shape[:2]
    ch, cw = (h, round(h * width / height)) if w * height >= h * width else (round(w * height / width), w)
    ch, cw = max(1, min(h, ch)), max(1, min(w, cw))
    a = a[(h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw]
    if (ch, cw) != (height, width):
        a = np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((width, height), Image.BICUBIC))
    return a.astype(np.uint8)


def to_model_resolution(image: np.ndarray, res: int) -> np.ndarray:
    """Centre-crop to a square and resize (bicubic, antialiased) to res×res, RGB uint8."""
    from PIL import Image

    a = np.asarray(image)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    a = a[..., :3]
    h, w = a.shape[:2]
    s = min(h, w)
    a = a[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    if s != res:
        a = np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((res, res), Image.BICUBIC))
    return a.astype(np.uint8)


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if k.startswith("_"):
            continue
        if isinstance(v, (np.ndarray, torch.Tensor)):
            v = v.tolist()
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out
