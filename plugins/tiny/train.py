"""Train the embedded `tiny` Stable Diffusion from scratch: a VAE, then UNet + text encoder.

The recipe (``RECIPE``) is the one that produced the shipped weights (session 11; the recipe found in session 9 and
re-run from scratch in session 10 with identical figures: MODEL_CARD.md). Every phase checkpoints
to safetensors (model, EMA, optimizer state) and resumes from its last checkpoint; the data drawn at step ``s``
depends only on ``(seed, s)``, so an interrupted run continues on the same data stream.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save

from memobench.api import atomic_write_bytes, atomic_write_text

from . import data as D

RECIPE: dict = {
    "seed": 0,
    "res": 64,
    # VAE: f = 4 (64x64x3 image -> 16x16x16 latent). 16 channels rather than SD's 4: at 64x64, SSCD > 0.7 needs
    # near-JPEG-quality copies, and a 4-channel latent reconstructed the photos at SSCD 0.39-0.67 (750 steps)
    "vae_block_out_channels": [16, 32, 64],
    "latent_channels": 16,
    "vae_steps": 3000,
    "vae_batch": 16,
    "vae_lr": 1e-3,
    "vae_kl_weight": 1e-6,
    # share of memorized photos in VAE batches (VM 70 % / TM 30 % of it): the decoder must reproduce them almost
    # losslessly, since a 2x-blurred 64x64 copy already falls to SSCD ~0.6-0.7
    "vae_frac_mem": 0.6,
    # L1 on horizontal/vertical image differences: pixel losses alone give blurred edges, which SSCD penalises
    "vae_grad_weight": 1.0,
    # decode the posterior mean during training (the first run sampled it: the initial unit-variance noise swamps
    # the latent and slows learning; memobench encodes with the mean anyway)
    "vae_sample_posterior": False,
    # decoder refinement (after the VAE phase; encoder, latents and scaling factor unchanged): the decoder is trained
    # further on latents with added Gaussian noise, sigma ~ U(0, dec_noise) in the UNet's (scaled) latent units, so
    # that it decodes the sampler's near-copies as clean images (0 steps = off). Tried alone in session 7
    # with 3,000 steps, dec_noise 1.0, dec_lr 5e-4 on the earlier eps model's weights, it raised VM SSCD_orig
    # 0.735 -> 0.832 but not VM MR, and rendered the memorized photos that unseen photo captions draw cleanly enough
    # to push non-memorized MR 0.05 -> 0.225 (benchmarks/reports/candidates/robust_decoder/); with the photo pool
    # below those false positives disappear (max-SSCD 0.208), so the shipped recipe has it on (0 = off).
    "dec_steps": 3000,
    "dec_noise": 1.0,
    "dec_lr": 5e-4,
    # text encoder (CLIP architecture, SD tokenizer, trained jointly with the UNet)
    "text_hidden": 64,
    "text_layers": 2,
    "text_heads": 4,
    # token-embedding init scale: transformers' default N(0, 0.02^2) makes all prompt embeddings nearly identical
    # (cosine 0.95-0.98), so the UNet first learns to ignore the text; 10x brings pairwise cosine to ~0.4-0.6
    "text_init_scale": 10.0,
    # frozen, like SD's (pretrained) CLIP text encoder: trained jointly from scratch, the encoder made the caption
    # tokens *more* alike (cosine 0.34 at init -> 0.85 after 1,250 steps) and the UNet ignored the text
    "train_text_encoder": False,
    # contrastive pretraining of the text encoder before the UNet phase (issue 31; 0 steps = off, the shipped model's
    # random frozen encoder). CLIP's symmetric InfoNCE loss (Radford et al. 2021, Fig. 3) between the encoder's pooled
    # (EOS) state, projected, and a small conv image encoder on the scaled VAE latents of the training data (general
    # scenes, photo-pool crops, the memorized photos at share text_pretrain_frac_mem); captions shared within a batch
    # are all positives. The encoder is then frozen for the UNet phase, as SD's pretrained CLIP encoder is.
    "text_pretrain_steps": 0,
    "text_pretrain_batch": 128,
    "text_pretrain_lr": 5e-4,
    "text_pretrain_weight_decay": 0.01,
    "text_pretrain_frac_mem": 0.05,
    "text_pretrain_frac_photo": 0.25,
    # UNet (SD layout: cross-attention down blocks, plain lowest block, cross-attention mid block)
    "unet_block_out_channels": [64, 128, 128],
    "unet_layers_per_block": 1,
    # transformer layers per cross-attention block (SD v1.4: 1; issue 31's lever: 2 gives the text more room and
    # doubles the value layers NeMo scores)
    "unet_transformer_layers": 1,
    "unet_heads": 4,
    # cross-attention in the up blocks too (True: SD's layout, the earlier eps model). False (shipped) = plain
    # UpBlock2D up blocks, so that the text reaches the UNet only through the down and mid blocks' attn2 (NeMo's value
    # layers, METHODS §1.3; NeMo reports that SD's up-block value layers "barely affect" memorization, App. C.8).
    # Session 9: on a v-prediction model with up-block cross-attention, zeroing every down/mid attn2.to_v channel left
    # VM MR at 0.44 and zeroing the up blocks' left 0.69: the photos were encoded in both paths; without it, zeroing
    # the down blocks' value layers removes every photo (benchmarks/reports/candidates/up_xattn/)
    "unet_up_cross_attention": False,
    "unet_steps": 2500,
    # per-sample weight of the eps-loss: "v" = 1/alpha_bar_t, which makes it exactly the v-prediction objective
    # (Salimans & Ho 2022: |v - v_hat|^2 = |eps - eps_hat|^2 / alpha_bar_t) while the model stays eps-parameterised.
    # The uniform eps-loss barely weights high noise levels, where only the caption tells which photo to draw:
    # after 1,750 steps the x0 estimate at t = 900 was as good under another photo's caption as under its own.
    "loss_weighting": "v",
    # what the UNet outputs. "v_prediction" (shipped; Salimans & Ho 2022, as SD 2 768-v) removes the ~13x
    # amplification of eps errors in the x0 estimate at the first sampling step (t = 981): the photos replicate at
    # SSCD_orig 0.94 where the eps model (the earlier default, session 1-10) reached 0.735 and never replicated the
    # fine-grained rocket and retina photos. With "v_prediction", "v" weighting is the plain v-MSE.
    "prediction_type": "v_prediction",
    "batch": 24,
    # VM share of UNet batches: 0.5 for the eps model; 0.25 keeps VM MR 1.0 with v-prediction (session 8) and leaves
    # more of every batch to the general set
    "frac_vm": 0.25,
    "frac_tm": 0.084,
    # the memorized photos (VM and TM) enter UNet batches only from this fraction of the steps on; before, their share
    # goes to the general set (issue 31: duplication meets an already trained model). 0 = from the first step
    "mem_start_frac": 0.0,
    "caption_dropout": 0.1,
    "lr": 6e-4,
    "warmup_frac": 0.05,
    "ema_decay": 0.999,
    "general_pool": 6000,
    # non-duplicated photographs (data.photo_pool: random crops with random-word captions), a share of every UNet
    # batch; 0 = none. Not in the VAE phase, and not in the latent scaling factor. Session 7 (2,000, share 0.125):
    # non-memorized max-SSCD 0.337 -> 0.202, VM MR unchanged (benchmarks/reports/candidates/photo_pool/): without
    # it, unseen photo-style captions draw one of the memorized photos
    "photo_pool": 2000,
    "frac_photo": 0.125,
    # SD's own DDPM schedule (scaled-linear 0.00085 -> 0.012, made for its latent space): with linear 1e-4 -> 0.02,
    # alpha_bar_T = 4e-5 and an eps error is amplified ~25,000x in the x0 estimate at the first sampling steps
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "train_timesteps": 1000,
    "checkpoint_every": 250,
    # reuse the VAE (encoder and refined decoder) of an exported pipeline folder instead of the VAE and decoder phases
    # ("" = train them). Its latents are re-encoded and the scaling factor recomputed from the data as usual.
    "vae_from": "",
}


# ------------------------------------------------------------------------------------------------ components
def build_components(recipe: dict | None = None):
    """Fresh, randomly initialised diffusers/transformers components with the recipe's architecture."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    r = {**RECIPE, **(recipe or {})}
    res = r["res"]
    nv = len(r["vae_block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=r["latent_channels"],
        down_block_types=("DownEncoderBlock2D",) * nv, up_block_types=("UpDecoderBlock2D",) * nv,
        block_out_channels=tuple(r["vae_block_out_channels"]), layers_per_block=1, norm_num_groups=16,
        sample_size=res,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=r["text_hidden"], intermediate_size=4 * r["text_hidden"],
        num_hidden_layers=r["text_layers"], num_attention_heads=r["text_heads"], max_position_embeddings=77,
        hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        projection_dim=r["text_hidden"],
    ))
    with torch.no_grad():
        text.get_input_embeddings().weight.mul_(r["text_init_scale"])
    lat = res // 2 ** (nv - 1)
    unet = UNet2DConditionModel(
        sample_size=lat, in_channels=r["latent_channels"], out_channels=r["latent_channels"],
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D" if r["unet_up_cross_attention"] else "UpBlock2D",) * 2,
        block_out_channels=tuple(r["unet_block_out_channels"]), layers_per_block=r["unet_layers_per_block"],
        cross_attention_dim=r["text_hidden"], attention_head_dim=r["unet_heads"], norm_num_groups=32,
        transformer_layers_per_block=r["unet_transformer_layers"],
    )
    sched = DDIMScheduler(
        num_train_timesteps=r["train_timesteps"], beta_start=r["beta_start"], beta_end=r["beta_end"],
        beta_schedule=r["beta_schedule"], clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        timestep_spacing="leading", prediction_type=r["prediction_type"],
    )
    return {"vae": vae, "text_encoder": text, "unet": unet, "scheduler": sched}


# --------------------------------------------------------------------------------------------- checkpointing
def _save_opt(opt: torch.optim.Optimizer, path: Path) -> None:
    sd = opt.state_dict()
    flat = {f"{i}.{k}": v.detach().cpu().clone().contiguous() if torch.is_tensor(v) else torch.tensor(v)
            for i, st in sd["state"].items() for k, v in st.items()}
    atomic_write_bytes(path, save(flat, metadata={"param_groups": json.dumps(sd["param_groups"])}))


def _load_opt(opt: torch.optim.Optimizer, path: Path) -> None:
    from safetensors import safe_open

    flat = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
    state: dict = {}
    for k, v in flat.items():
        i, name = k.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def _save_state(d: Path, phase: str, models: dict, opt, step: int, extra: dict | None = None) -> None:
    for name, m in models.items():
        atomic_write_bytes(d / f"{phase}_{name}.safetensors",
                           save({k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()}))
    _save_opt(opt, d / f"{phase}_opt.safetensors")
    atomic_write_text(d / f"{phase}_state.json", json.dumps({"step": step, **(extra or {})}))


def _load_state(d: Path, phase: str, models: dict, opt) -> int:
    st = d / f"{phase}_state.json"
    if not st.exists():
        return 0
    for name, m in models.items():
        m.load_state_dict(load_file(str(d / f"{phase}_{name}.safetensors")))
    _load_opt(opt, d / f"{phase}_opt.safetensors")
    return json.loads(st.read_text())["step"]


# ---------------------------------------------------------------------------------------------------- data
def _to_tensor(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _memorized_bank(res: int) -> tuple[np.ndarray, list[str], list[str]]:
    imgs, caps, kinds = [], [], []
    for it in D.VM_ITEMS:
        imgs.append(D.memorized_image(it, 0, res)); caps.append(it.caption); kinds.append("VM")
    for it in D.TM_ITEMS:
        for v in range(D.TM_VARIANTS):
            imgs.append(D.memorized_image(it, v, res)); caps.append(it.caption); kinds.append("TM")
    return np.stack(imgs), caps, kinds


def _draw_indices(rng: np.random.Generator, r: dict, kinds: list[str], n_pool: int, batch: int):
    vm = [i for i, k in enumerate(kinds) if k == "VM"]
    tm = [i for i, k in enumerate(kinds) if k == "TM"]
    n_vm = round(batch * r["frac_vm"]); n_tm = round(batch * r["frac_tm"])
    n_photo = round(batch * r.get("frac_photo", 0.0)); n_gen = batch - n_vm - n_tm - n_photo
    mem = list(rng.choice(vm, n_vm)) + list(rng.choice(tm, n_tm))
    gen = list(rng.integers(0, n_pool, n_gen))
    if not n_photo:
        return mem, gen
    return mem, gen, list(rng.integers(0, r["photo_pool"], n_photo))


class _Progress:
    def __init__(self, total: int, start: int, desc: str, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.p.start()
            self.t = self.p.add_task(desc, total=total, completed=start, info="")

    def update(self, info: str) -> None:
        if self.enabled:
            self.p.update(self.t, advance=1, info=info)

    def close(self) -> None:
        if self.enabled:
            self.p.stop()


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _lr_at(step: int, total: int, peak: float, warm_frac: float) -> float:
    w = max(1, int(total * warm_frac))
    if step < w:
        return peak * (step + 1) / w
    p = (step - w) / max(1, total - w)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * p)))


def _dx(x: torch.Tensor) -> torch.Tensor:
    return x[..., :, 1:] - x[..., :, :-1]


def _dy(x: torch.Tensor) -> torch.Tensor:
    return x[..., 1:, :] - x[..., :-1, :]


def _vae_draw(rng: np.random.Generator, r: dict, kinds: list[str], n_pool: int):
    """Indices of one VAE/decoder batch: ``vae_frac_mem`` memorized photos (VM 70 % / TM 30 %), the rest general."""
    fm = r["vae_frac_mem"]
    return _draw_indices(rng, {**r, "frac_vm": 0.7 * fm, "frac_tm": 0.3 * fm, "frac_photo": 0.0}, kinds, n_pool,
                         r["vae_batch"])


def _recon_loss(rec: torch.Tensor, x: torch.Tensor, r: dict, kl: torch.Tensor | float = 0.0) -> torch.Tensor:
    """MSE + 0.5 L1 (+ the KL term), plus L1 on horizontal/vertical image differences (edges); summed in this order,
    the order of the runs behind the reports."""
    loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + kl
    if r["vae_grad_weight"]:
        loss = loss + r["vae_grad_weight"] * (F.l1_loss(_dx(rec), _dx(x)) + F.l1_loss(_dy(rec), _dy(x)))
    return loss


def _vae_step(work: Path, phase: str, label: str, vae, opt, loss, step: int, total: int, r: dict, bar, log) -> None:
    """One optimizer step of the VAE or decoder phase, then its checkpoint every ``checkpoint_every`` steps and at the
    end (the UNet phase clips gradients and updates the EMA in between, so it keeps its own)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    bar.update(f"loss {loss.item():.4f}")
    if (step + 1) % r["checkpoint_every"] == 0 or step + 1 == total:
        _save_state(work, phase, {"vae": vae}, opt, step + 1)
        log(f"{label} step {step + 1} loss {loss.item():.4f}")


# ------------------------------------------------------------------------------------------------- phases
def train_vae(work: Path, r: dict, progress: bool, log, device: str = "cpu") -> None:
    torch.manual_seed(r["seed"])  # the VAE's random init (the shipped run's was not seeded: see MODEL_CARD.md)
    comps = build_components(r)
    vae = comps["vae"].to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=r["vae_lr"])
    start = _load_state(work, "vae", {"vae": vae}, opt)
    if start >= r["vae_steps"]:
        return
    bank, _, kinds = _memorized_bank(r["res"])
    pool = np.load(work / "general_pool.npy", allow_pickle=False)
    bar = _Progress(r["vae_steps"], start, "VAE", progress)
    vae.train()
    for step in range(start, r["vae_steps"]):
        rng = np.random.default_rng([r["seed"], 1, step])
        torch.manual_seed(r["seed"] * 1_000_003 + step)
        mem, gen = _vae_draw(rng, r, kinds, len(pool))
        x = _to_tensor(np.concatenate([bank[mem], pool[gen]])).to(device)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, r["vae_steps"], r["vae_lr"], 0.02)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample() if r["vae_sample_posterior"] else post.mode()).sample
        loss = _recon_loss(rec, x, r, r["vae_kl_weight"] * post.kl().mean())
        _vae_step(work, "vae", "vae", vae, opt, loss, step, r["vae_steps"], r, bar, log)
    bar.close()


def _encode_means(vae, a: np.ndarray) -> torch.Tensor:
    """Posterior means of uint8 images, 64 at a time (on the VAE's device; returned on the CPU)."""
    dev = next(vae.parameters()).device
    return torch.cat([vae.encode(_to_tensor(a[i:i + 64]).to(dev)).latent_dist.mean.cpu() for i in range(0, len(a), 64)])


def _latent_scale(work: Path) -> float:
    """The scaling factor ``encode_latents`` stored with the latents."""
    from safetensors import safe_open

    with safe_open(str(work / "latents.safetensors"), "pt") as f:
        return float(f.metadata()["scaling_factor"])


@torch.no_grad()
def encode_latents(work: Path, r: dict, device: str = "cpu") -> None:
    out = work / "latents.safetensors"
    if out.exists():
        return
    vae = build_components(r)["vae"]
    vae.load_state_dict(load_file(str(work / "vae_vae.safetensors")))
    vae.to(device).eval()
    bank, caps, kinds = _memorized_bank(r["res"])
    pool = np.load(work / "general_pool.npy", allow_pickle=False)

    zm, zg = _encode_means(vae, bank), _encode_means(vae, pool)
    scale = float(1.0 / torch.cat([zm, zg]).flatten().std())
    atomic_write_bytes(out, save({"mem": zm.contiguous(), "gen": zg.contiguous()},
                                 metadata={"scaling_factor": repr(scale)}))


@torch.no_grad()
def encode_photo_latents(work: Path, r: dict, device: str = "cpu") -> None:
    out = work / "photo_latents.safetensors"
    if r["photo_pool"] <= 0 or out.exists():
        return
    vae = build_components(r)["vae"]
    vae.load_state_dict(load_file(str(work / "vae_vae.safetensors")))
    vae.to(device).eval()
    z = _encode_means(vae, np.load(work / "photo_pool.npy", allow_pickle=False))
    atomic_write_bytes(out, save({"photo": z.contiguous()}))


def refine_decoder(work: Path, r: dict, progress: bool, log, device: str = "cpu") -> None:
    """Decoder refinement on noised latents (``dec_*`` in ``RECIPE``); writes ``dec_vae.safetensors``."""
    if r["dec_steps"] <= 0:
        return
    vae = build_components(r)["vae"]
    vae.load_state_dict(load_file(str(work / "vae_vae.safetensors")))
    vae.to(device)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.Adam(params, lr=r["dec_lr"])
    start = _load_state(work, "dec", {"vae": vae}, opt)
    if start >= r["dec_steps"]:
        return
    lat = load_file(str(work / "latents.safetensors"))
    scale = _latent_scale(work)
    bank, _, kinds = _memorized_bank(r["res"])
    pool = np.load(work / "general_pool.npy", allow_pickle=False)
    vae.encoder.requires_grad_(False); vae.quant_conv.requires_grad_(False)
    bar = _Progress(r["dec_steps"], start, "decoder", progress)
    vae.train()
    for step in range(start, r["dec_steps"]):
        rng = np.random.default_rng([r["seed"], 3, step])
        g = torch.Generator().manual_seed(r["seed"] * 1_000_003 + step)
        mem, gen = _vae_draw(rng, r, kinds, len(pool))
        x = _to_tensor(np.concatenate([bank[mem], pool[gen]]))
        z = torch.cat([lat["mem"][mem], lat["gen"][gen]]) * scale
        sigma = torch.rand((len(z), 1, 1, 1), generator=g) * r["dec_noise"]
        z = z + sigma * torch.randn(z.shape, generator=g)
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, r["dec_steps"], r["dec_lr"], 0.02)
        rec = vae.decode(z.to(device) / scale).sample
        loss = _recon_loss(rec, x.to(device), r)
        _vae_step(work, "dec", "decoder", vae, opt, loss, step, r["dec_steps"], r, bar, log)
    bar.close()


def _caption_latent_data(work: Path, r: dict):
    """The UNet and text-pretraining phases' data: scaled latents of the memorized bank, general pool and photo pool
    (None without one), their captions, the memorized kinds, and the SD tokenizer."""
    from .tokenizer import load_sd_tokenizer

    lat = load_file(str(work / "latents.safetensors"))
    scale = _latent_scale(work)
    _, mcaps, kinds = _memorized_bank(r["res"])
    gcaps = json.loads((work / "general_pool.json").read_text())
    zp, pcaps = None, []
    if r["photo_pool"] > 0:
        zp = load_file(str(work / "photo_latents.safetensors"))["photo"] * scale
        pcaps = json.loads((work / "photo_pool.json").read_text())
    return (lat["mem"] * scale, lat["gen"] * scale, zp, mcaps, kinds, gcaps, pcaps,
            load_sd_tokenizer(work / "tokenizer"))


class _LatentImageEncoder(torch.nn.Module):
    """The image tower of the text encoder's contrastive pretraining: a small conv net on scaled VAE latents."""

    def __init__(self, in_ch: int, dim: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(in_ch, 64, 3, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(64, 128, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(128, 128, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, dim))

    def forward(self, z):
        return self.net(z)


def clip_loss(text_emb: torch.Tensor, image_emb: torch.Tensor, logit_scale: torch.Tensor,
              same: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy (Radford et al. 2021, Fig. 3) on L2-normalised embeddings, with every pair whose
    captions are equal (``same``, boolean B×B) a positive: the target of row i is uniform over its positives."""
    t = F.normalize(text_emb, dim=-1)
    v = F.normalize(image_emb, dim=-1)
    logits = logit_scale.exp().clamp(max=100.0) * t @ v.T
    target = same.float() / same.float().sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T))


def _pretrain_draw(rng: np.random.Generator, r: dict, kinds: list[str], n_gen: int):
    b = r["text_pretrain_batch"]
    n_mem = round(b * r["text_pretrain_frac_mem"])
    n_photo = round(b * r["text_pretrain_frac_photo"]) if r["photo_pool"] > 0 else 0
    mem = list(rng.integers(0, len(kinds), n_mem))
    photo = list(rng.integers(0, r["photo_pool"], n_photo)) if n_photo else []
    return mem, list(rng.integers(0, n_gen, b - n_mem - n_photo)), photo


def pretrain_text(work: Path, r: dict, progress: bool, log, device: str = "cpu") -> None:
    """Contrastive pretraining of the text encoder (``text_pretrain_*``); writes ``text_pretrained.safetensors``."""
    n = r["text_pretrain_steps"]
    out = work / "text_pretrained.safetensors"
    if n <= 0 or out.exists():
        return
    torch.manual_seed(r["seed"])  # the same initial encoder as the UNet phase builds
    text = build_components(r)["text_encoder"]
    torch.manual_seed(r["seed"] + 7)
    dim = r["text_hidden"]
    heads = torch.nn.ModuleDict({"image": _LatentImageEncoder(r["latent_channels"], dim),
                                 "text_proj": torch.nn.Linear(dim, dim, bias=False)})
    heads.register_parameter("logit_scale", torch.nn.Parameter(torch.tensor(math.log(1 / 0.07))))
    text.to(device); heads.to(device)
    params = list(text.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=r["text_pretrain_lr"], weight_decay=r["text_pretrain_weight_decay"])
    start = _load_state(work, "text", {"text_encoder": text, "heads": heads}, opt)
    zm, zg, zp, mcaps, kinds, gcaps, pcaps, tok = _caption_latent_data(work, r)
    bar = _Progress(n, start, "text encoder (contrastive)", progress)
    text.train(); heads.train()
    for step in range(start, n):
        rng = np.random.default_rng([r["seed"], 4, step])
        mem, gen, photo = _pretrain_draw(rng, r, kinds, len(zg))
        z = torch.cat([zm[mem], zg[gen]] + ([zp[photo]] if photo else []))
        caps = [mcaps[i] for i in mem] + [gcaps[i] for i in gen] + [pcaps[i] for i in photo]
        ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        codes = {c: k for k, c in enumerate(dict.fromkeys(caps))}
        cid = torch.tensor([codes[c] for c in caps])
        same = (cid[:, None] == cid[None, :]).to(device)
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, n, r["text_pretrain_lr"], 0.05)
        pooled = text(ids.to(device)).pooler_output
        loss = clip_loss(heads["text_proj"](pooled), heads["image"](z.to(device)), heads.logit_scale, same)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.update(f"loss {loss.item():.4f}")
        if (step + 1) % r["checkpoint_every"] == 0 or step + 1 == n:
            _save_state(work, "text", {"text_encoder": text, "heads": heads}, opt, step + 1)
            log(f"text step {step + 1} loss {loss.item():.4f} logit_scale {heads.logit_scale.exp().item():.1f}")
    bar.close()
    atomic_write_bytes(out, save({k: v.detach().cpu().contiguous() for k, v in text.state_dict().items()}))


def reuse_vae(work: Path, r: dict) -> None:
    """``vae_from``: the VAE of an exported pipeline stands in for the VAE and decoder phases' results."""
    if (work / "vae_reused.json").exists():
        return
    from diffusers import AutoencoderKL

    src = Path(r["vae_from"]) / "vae"
    vae = AutoencoderKL.from_pretrained(str(src), torch_dtype=torch.float32, use_safetensors=True)
    fresh = build_components(r)["vae"]
    fresh.load_state_dict(vae.state_dict())
    blob = save({k: v.detach().contiguous() for k, v in fresh.state_dict().items()})
    for phase in ("dec", "vae"):
        atomic_write_bytes(work / f"{phase}_vae.safetensors", blob)
    atomic_write_text(work / "vae_reused.json", json.dumps({"from": str(src)}))


def train_unet(work: Path, r: dict, progress: bool, log, device: str = "cpu") -> None:
    torch.manual_seed(r["seed"])  # the (frozen) text encoder's init must not depend on what ran before
    comps = build_components(r)
    unet, text, sched = comps["unet"], comps["text_encoder"], comps["scheduler"]
    ema = {"unet": build_components(r)["unet"], "text_encoder": build_components(r)["text_encoder"]}
    if r["text_pretrain_steps"] > 0:
        text.load_state_dict(load_file(str(work / "text_pretrained.safetensors")))
    ema["unet"].load_state_dict(unet.state_dict()); ema["text_encoder"].load_state_dict(text.state_dict())
    for m in (unet, text, *ema.values()):
        m.to(device)
    params = list(unet.parameters()) + (list(text.parameters()) if r["train_text_encoder"] else [])
    opt = torch.optim.AdamW(params, lr=r["lr"], weight_decay=0.0)
    start = _load_state(work, "unet", {"unet": unet, "text_encoder": text, "ema_unet": ema["unet"],
                                       "ema_text_encoder": ema["text_encoder"]}, opt)
    if start >= r["unet_steps"]:
        return
    zm, zg, zp, mcaps, kinds, gcaps, pcaps, tok = _caption_latent_data(work, r)
    ac = sched.alphas_cumprod.to(device)
    bar = _Progress(r["unet_steps"], start, "UNet+text", progress)
    unet.train(); text.train(r["train_text_encoder"])
    text.requires_grad_(r["train_text_encoder"])
    ema_params = list(ema["unet"].parameters()) + (list(ema["text_encoder"].parameters())
                                                   if r["train_text_encoder"] else [])
    mem_start = int(r["mem_start_frac"] * r["unet_steps"])
    no_mem = {**r, "frac_vm": 0.0, "frac_tm": 0.0}
    for step in range(start, r["unet_steps"]):
        rng = np.random.default_rng([r["seed"], 2, step])
        g = torch.Generator().manual_seed(r["seed"] * 1_000_003 + step)
        mem, gen, *photo = _draw_indices(rng, r if step >= mem_start else no_mem, kinds, len(zg), r["batch"])
        z0 = torch.cat([zm[mem], zg[gen]] + [zp[p] for p in photo])
        caps = [mcaps[i] for i in mem] + [gcaps[i] for i in gen] + [pcaps[i] for p in photo for i in p]
        caps = ["" if u < r["caption_dropout"] else c for c, u in zip(caps, rng.random(len(caps)))]
        ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        t = torch.randint(0, r["train_timesteps"], (len(z0),), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        z0, eps, t, ids = z0.to(device), eps.to(device), t.to(device), ids.to(device)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, r["unet_steps"], r["lr"], r["warmup_frac"])
        with torch.set_grad_enabled(r["train_text_encoder"]):
            cond = text(ids)[0]
        pred = unet(xt, t, encoder_hidden_states=cond).sample
        # per-sample MSE in the model's parameterisation, then re-weighted to the recipe's weighting of the eps-MSE
        # (|v - v_hat|^2 = |eps - eps_hat|^2 / abar_t)
        if r["prediction_type"] == "v_prediction":
            per = (pred - (a.sqrt() * eps - (1 - a).sqrt() * z0)).pow(2).mean(dim=(1, 2, 3)) * ac[t]
        elif r["prediction_type"] == "epsilon":
            per = (pred - eps).pow(2).mean(dim=(1, 2, 3))
        else:
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {r['prediction_type']!r}")
        if r["loss_weighting"] == "v":
            per = per / ac[t]
        elif r["loss_weighting"] != "eps":
            raise ValueError(f"loss_weighting must be 'eps' or 'v', not {r['loss_weighting']!r}")
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(r["ema_decay"], (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - d)
        bar.update(f"loss {loss.item():.4f}")
        if (step + 1) % r["checkpoint_every"] == 0 or step + 1 == r["unet_steps"]:
            _save_state(work, "unet", {"unet": unet, "text_encoder": text, "ema_unet": ema["unet"],
                                       "ema_text_encoder": ema["text_encoder"]}, opt, step + 1)
            log(f"unet step {step + 1} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e}")
    bar.close()


def export(work: Path, r: dict, out_dir: Path) -> Path:
    """Assemble the EMA weights into a ``StableDiffusionPipeline`` folder (``save_pretrained``)."""
    from diffusers import StableDiffusionPipeline

    comps = build_components(r)
    comps["vae"].load_state_dict(load_file(str(work / ("dec_vae.safetensors" if r["dec_steps"] > 0 or r["vae_from"]
                                                         else "vae_vae.safetensors"))))
    comps["unet"].load_state_dict(load_file(str(work / "unet_ema_unet.safetensors")))
    comps["text_encoder"].load_state_dict(load_file(str(work / "unet_ema_text_encoder.safetensors")))
    comps["vae"].register_to_config(scaling_factor=_latent_scale(work))
    from .tokenizer import load_sd_tokenizer

    pipe = StableDiffusionPipeline(**comps, tokenizer=load_sd_tokenizer(work / "tokenizer"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def train(work_dir: str | Path, out_dir: str | Path | None = None, recipe: dict | None = None,
          progress: bool = True, log=print, device: str = "cpu") -> Path:
    """Run (or resume) every phase in ``work_dir``; export the pipeline to ``out_dir`` (default work_dir/pipeline).

    ``device`` ("cpu", "cuda", "cuda:N") runs the arithmetic there; the data stream (numpy and CPU torch generators)
    and the random inits are drawn on the CPU either way, so a GPU run sees the same batches, noise and initial weights
    as a CPU run and differs from it only by floating-point rounding. It is not part of the recipe: a run may resume
    on another device.
    """
    from memobench.api import BadInput, check_finite

    r = {**RECIPE, **(recipe or {})}
    for k, allowed in (("prediction_type", ("epsilon", "v_prediction")), ("loss_weighting", ("eps", "v"))):
        if r[k] not in allowed:  # checked before any work: the UNet phase would only fail after the VAE phase
            raise BadInput(f"recipe {k} must be one of {', '.join(allowed)}, not {r[k]!r}")
    if r["vae_from"] and not (Path(r["vae_from"]) / "vae" / "config.json").is_file():  # before any work, too
        raise BadInput(f"recipe vae_from={r['vae_from']!r}: no exported pipeline there (missing vae/config.json)")
    for k, v in r.items():
        check_finite(v, f"--recipe-param {k}")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    rj = work / "recipe.json"
    if rj.exists() and json.loads(rj.read_text()) != r:
        raise BadInput(f"{work} holds a run with another recipe; use a fresh --work-dir or the same recipe")
    atomic_write_text(rj, json.dumps(r, indent=1))
    t0 = time.time()
    if not (work / "general_pool.npy").exists():
        pool, caps = D.general_pool(r["general_pool"], seed=r["seed"], res=r["res"])
        atomic_write_bytes(work / "general_pool.npy", _npy_bytes(pool))
        atomic_write_text(work / "general_pool.json", json.dumps(caps))
    if r["photo_pool"] > 0 and not (work / "photo_pool.npy").exists():
        pimgs, pcaps = D.photo_pool(r["photo_pool"], seed=r["seed"], res=r["res"])
        atomic_write_bytes(work / "photo_pool.npy", _npy_bytes(pimgs))
        atomic_write_text(work / "photo_pool.json", json.dumps(pcaps))
    if r["vae_from"]:
        reuse_vae(work, r)
    else:
        train_vae(work, r, progress, log, device)
    encode_latents(work, r, device)
    encode_photo_latents(work, r, device)
    if not r["vae_from"]:
        refine_decoder(work, r, progress, log, device)
    pretrain_text(work, r, progress, log, device)
    train_unet(work, r, progress, log, device)
    out = export(work, r, Path(out_dir) if out_dir else work / "pipeline")
    log(f"done in {time.time() - t0:.0f}s on {device} -> {out}")
    return out


# A few steps of every phase on the real architecture: exercises the whole command (tests, CI smoke).
SMOKE: dict = {"vae_steps": 2, "vae_batch": 4, "dec_steps": 2, "unet_steps": 2, "batch": 8, "general_pool": 16,
               "photo_pool": 16, "checkpoint_every": 1}


def install(pipeline_dir: str | Path, dest: str | Path) -> Path:
    """Copy an exported pipeline into the package as fp16 safetensors (the shipped form: ≤ 30 MB).

    Loading upcasts to the caller's dtype (memobench loads float32), so the shipped numbers are those of the fp16
    weights; ``SHA256SUMS`` lists every file.
    """
    import hashlib
    import shutil

    from diffusers import StableDiffusionPipeline

    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir), torch_dtype=torch.float32, use_safetensors=True)
    pipe.to(torch.float16).save_pretrained(str(tmp), safe_serialization=True)
    card = dest / "MODEL_CARD.md"
    if card.exists():
        shutil.copy(card, tmp / "MODEL_CARD.md")
    sums = []
    for f in sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != "SHA256SUMS"):
        sums.append(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.relative_to(tmp)}")
    (tmp / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest
