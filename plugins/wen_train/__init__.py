"""Wen et al. training-time mitigation (``wen_train``, kind ``"weights"``): fine-tune without the high-magnitude samples.

Paper: Wen, Liu, Chen, Lyu, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models", ICLR 2024,
§5 (mitigating memorization), the training-time strategy: while fine-tuning, a sample whose magnitude of the
text-conditional noise prediction (the detection statistic of §3, METHODS §6.1) is large is taken out of the
loss. Reference code ``YuxinWenRick/diffusion_memorization`` (c8fe471): ``train_text_to_image.py`` (the block
under ``### mitigation``) with the README's "Training-time mitigation / Ours" command (``--hard_threshold 2``);
memobench ``METHODS.md`` §7.2 (last paragraph). The paper evaluates it on SD v1.4 *fine-tuned* on LAION images
duplicated on purpose (200 images × 200 repeats, plus 3× as many non-duplicated pairs): the mitigation is applied
during the fine-tuning that would otherwise create the memorization, not to SD v1.4's own memorized prompts.

Algorithm (``fit``; one optimiser step per training step s = 1 … ``steps``):

1. Draw a batch of B = ``batch`` caption–latent pairs (z₀ᵢ, e_pᵢ): ⌊B·mem_fraction + ½⌋ from the memorized
   pairs, the rest from the regular pairs (below); ε ~ N(0, I) and tᵢ ~ U{0, …, T−1} per sample,
   x_tᵢ = √ᾱ_t·z₀ᵢ + √(1−ᾱ_t)·εᵢ — the ordinary diffusion-training draw.
2. One UNet pass with gradients on the captions, o_cᵢ = f_θ(x_tᵢ, tᵢ, e_pᵢ) (the training prediction), and one
   without gradients on the empty caption, o_uᵢ = f_θ(x_tᵢ, tᵢ, e_∅), on the **same** x_tᵢ and tᵢ (the loss's own
   noise and timestep: there is no separate measuring timestep such as the first sampling step of §3's detection).
3. Per sample, the magnitude

       mᵢ = ‖ε_θ(x_tᵢ, tᵢ, e_pᵢ) − ε_θ(x_tᵢ, tᵢ, e_∅)‖₂ · s,     s = √(N_ref / N)  (``loss_norm``, below)

   — one L2 norm over that sample's C×h×w tensor (``noise_pred_text.reshape(B, -1).norm(dim=1)`` in the script:
   per sample, not over the batch).
4. Keep the samples with mᵢ < ``hard_threshold`` (the script keeps ``norm < hard_threshold``: a sample *at* the
   threshold is dropped). Loss = the model's training MSE (ε- or v-target, as the diffusers script) averaged over
   the kept samples' elements only; if no sample is kept the step makes no update (the script skips backward,
   optimiser and scheduler step), and it still counts as a step.
5. Backward; clip the gradient norm of all UNet parameters to ``max_grad_norm``; AdamW step on **all UNet
   parameters** (text encoder and VAE frozen, as the script).

The fine-tuned UNet is the artifact (one safetensors file, keyed by model identity, parameters, the target prompts
and, when not native, the generation size; ``ctx.artifact_path``); ``apply`` swaps the UNet's parameter storage for
it and gives the original tensors back on exit (bit-for-bit: the original tensors themselves are restored).

Defaults and their sources ([CODE] = the reference script's argparse default or the README command):

* ``hard_threshold`` 2 — README "Ours" ``--hard_threshold 2`` [CODE].
* ``lr`` 1e-5, constant, no warm-up — README ``--learning_rate=1e-05 --lr_scheduler=constant --lr_warmup_steps=0``;
  AdamW β = (0.9, 0.999), ε = 1e-8, ``weight_decay`` 0.01 (the script's ``--adam_*`` defaults); ``max_grad_norm``
  1 (README) [CODE].
* ``batch`` 8 — README ``--train_batch_size=8`` (gradient accumulation 1) [CODE].
* ``mem_fraction`` 0.25 — README ``--non_mem_ratio=3``: the training set is the duplicated set plus 3× as many
  non-duplicated pairs, shuffled, so a quarter of every batch is memorized data in expectation [CODE]. Here each
  batch holds exactly ⌊B·mem_fraction + ½⌋ memorized pairs (2 of 8) [CHOICE: fixed counts, so the per-step
  drop counts of the two groups compare directly].
* ``uncond_prob`` 0 — the script has no caption dropout [CODE].
* ``steps`` 1,000 [CHOICE]. The README runs 20,000 steps (from SD v1.4 onto the duplicated set). Here the fit
  fine-tunes an *already trained* model for a budget that takes about 5 minutes on one CPU core for the embedded
  ``tiny`` model (measured with ``OMP_NUM_THREADS=1`` on a 2-core machine shared with other jobs: 0.27-0.36 s per
  step of batch 8; the committed run's fit took 356 s, its whole run 469 s; ``fit_seconds`` in the report).
* Not reproduced: ``--use_ema`` (the README's evaluation loads ``checkpoint-20000/unet``, the trained weights; the
  EMA copy is saved separately as ``unet_ema``, so EMA does not change what is evaluated); ``--mixed_precision=fp16``
  and gradient checkpointing (memobench trains in fp32; the same mathematics); random posterior samples of the VAE
  (``latent_dist.sample()`` per step: here the posterior mean, encoded once, as ``advft`` does [CHOICE]).

Choices where the reference does not carry over (each a ``Params`` field, recorded in every result):

* Threshold scale (``loss_norm``, following ``wen``'s ``loss_norm = "reference"``). The script's norm is over one
  SD v1.4 latent, 4×64×64 = 16,384 elements at 512 px (``--resolution=512``); the embedded ``tiny`` model's latent
  is 16×16×16 = 4,096. A norm grows with √(number of elements), so ``loss_norm = "reference"`` (default) evaluates
  mᵢ = ‖·‖₂ · √(N_ref / N) with N_ref from ``reference_latent`` ("4x64x64") and N = C·h·w of the run's latent:
  √N_ref times the per-element root-mean-square, i.e. the value the reference's norm takes for the same per-element
  difference (factor 2 on ``tiny``; exactly 1 on SD v1.4 at 512 px, where m is the script's norm bit for bit).
  ``loss_norm = "raw"`` compares the unscaled norm with the threshold.
* ``magnitude_of`` "eps" (default): the difference of the ε predictions, the paper's quantity (and what memobench's
  ``wen`` and ``detect`` use); on ε-prediction models (SD v1.4) it is the script's ``model_pred − noise_pred_uncond``
  exactly. On v-prediction models (the shipped ``tiny``, SD 2 768-v) the script's line would take the difference of
  the raw v outputs, which is larger by 1/√ᾱ_t (ε_c − ε_u = √ᾱ_t·(v_c − v_u) at the same x_t); ``"output"`` does
  that. The reference only trained ε models, so the two agree there.
* Training data. The memorized pairs are the run's target prompts that have training images (every reference image
  of each, encoded at the run's size): on the embedded model the duplicated photographs of ``tiny-vm`` with their
  captions (``plugins/tiny/data.py``). The regular pairs are the first ``n_regular`` (200) prompts of the model's
  ``regular`` prompt set with their first reference image (on ``tiny`` and ``sd-random``: ``tiny-general``, the
  general set's training captions and renderings), as ``advft`` builds its utility pairs; ``regular_prompts`` names
  another set.
* Half-precision models are refused (``BadInput``): the fit trains the model's own parameters in fp32 (run with
  ``--dtype fp32``). Memory: one extra copy of the UNet on the model's device while training (the original tensors
  are kept aside untouched and put back), plus gradients and AdamW's two moments: ≈ 4 × 3.2 GiB on SD v1.4.

Measured on the shipped ``tiny`` (v-prediction, 16×16×16 latents, scale factor 2; committed results
``benchmarks/results/tiny/wen_train__{none,dori}``): the filter dropped 1,990 of the 2,000 memorized samples drawn
(the 10 kept all at t ≥ 900) and 4,736 of the 6,000 regular ones (every one below t = 200, 48 % of those at t ≥ 900; the
tiny model's text-conditional magnitudes are larger than SD v1.4's: regular median 2.79 on the reference scale);
755 of the 1,000 steps updated the weights (relative change ‖Δθ‖/‖θ‖ = 0.64 %). MR stays 1.0 (SSCD_orig 0.928 vs
0.931 without mitigation), under DoRI too. Dropping a memorized sample withholds further reinforcement but removes
nothing already learned: in the paper the filter runs during the fine-tuning that would create the memorization.
Two diagnostic runs (not committed): the same fine-tuning without the filter (``hard_threshold=1e9``) gave MR 1.0,
SSCD_orig 0.932; with the filter and lr 1e-4 (10×), MR 1.0, SSCD_orig 0.833 (‖Δθ‖/‖θ‖ = 4.5 %, every prompt's
lowest SSCD over its 10 seeds still ≥ 0.70).

Report (``report()``, in the result JSON): per step, how many memorized and how many regular samples were dropped
(``dropped_memorized_per_step``, ``dropped_regular_per_step``), the steps with an update, the dropped fraction and
the magnitude quartiles of each group over the whole fit and per tenth of the timestep range, the loss of every
fifth updating step, ``fit_seconds``, and the sha256 of the UNet before and after.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

from memobench.api import (
    BadInput,
    Context,
    Mitigation,
    Prompt,
    hookimpl,
    latent_elements,
    param,
    reference_scale,
)

__all__ = ["WenTrainingMitigation", "filter_step", "magnitude_scale"]

REF_LATENT = "mitigation 'wen_train' parameter reference_latent"

LOSS_NORMS = ("reference", "raw")
MAGNITUDES = ("eps", "output")


def magnitude_scale(numel: int, loss_norm: str = "reference", reference_latent: str = "4x64x64") -> float:
    """√(N_ref / N) for one sample's latent of ``numel`` elements (1.0 for ``"raw"`` or when N = N_ref)."""
    if loss_norm == "raw":
        return 1.0
    return reference_scale(numel, latent_elements(reference_latent, REF_LATENT))


def filter_step(model, z0, noise, t, embeds, empty, threshold: float, scale: float = 1.0, magnitude_of: str = "eps"):
    """One training step's loss under the hard-threshold filter (steps 2-4 of the module docstring).

    ``z0``, ``noise``: (B, C, h, w); ``t``: (B,) timesteps; ``embeds``: (B, 77, d) caption embeddings; ``empty``:
    (1, 77, d) e_∅. Returns ``(loss, magnitudes, keep)``: the MSE over the kept samples (differentiable w.r.t. the
    UNet; ``None`` when every sample is dropped), the per-sample magnitudes (B,) on the threshold's scale, and the
    boolean mask of kept samples (magnitude < threshold)."""
    import torch

    x = model.add_noise(z0, noise, t)
    xin = x.to(model.dtype)
    pred = model.unet_output(xin, t, embeds.to(model.dtype))  # the training prediction (with gradients)
    with torch.no_grad():
        unc = model.unet_output(xin, t, empty.to(model.dtype).expand(len(z0), -1, -1))
        pc, pu = pred.detach().float(), unc.float()
        if magnitude_of == "eps":
            pc, pu = model.to_eps(pc, x.float(), t), model.to_eps(pu, x.float(), t)
        mags = (pc - pu).flatten(1).norm(p=2, dim=1) * scale
    keep = mags < threshold
    if not bool(keep.any()):
        return None, mags, keep
    target = model.target(z0.float(), noise.float(), t)
    loss = torch.nn.functional.mse_loss(pred.float()[keep], target[keep])
    return loss, mags, keep


def _quartiles(values: list[float]) -> list[float] | None:
    if not values:
        return None
    v = sorted(values)
    return [round(v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))], 4) for q in (0.25, 0.5, 0.75)]


class WenTrainingMitigation(Mitigation):
    """Wen et al. (ICLR 2024) training-time mitigation: fine-tune, dropping samples with ‖ε_c − ε_u‖ ≥ threshold."""

    name = "wen_train"
    version = "1"
    kind = "weights"
    prompt_independent = True  # one fine-tuned model for every prompt

    @dataclass
    class Params:
        hard_threshold: float = param(2.0, "--hard_threshold (README 'Ours'): samples with magnitude ≥ this leave "
                                           "the loss [CODE]")
        loss_norm: str = param("reference", "'reference': magnitude on SD v1.4's 4x64x64 latent scale "
                                            "(×√(N_ref/N)) | 'raw': the unscaled norm [CHOICE]")
        reference_latent: str = param("4x64x64", "C×h×w of the latent the threshold was set for (SD v1.4, 512 px)")
        magnitude_of: str = param("eps", "'eps': ε_c − ε_u (the paper's quantity) | 'output': raw UNet outputs "
                                         "(v on v-prediction models) [CHOICE]")
        steps: int = param(1000, "optimiser steps (README: 20,000 from SD v1.4; here ~5 min on one core for tiny) "
                                 "[CHOICE]")
        batch: int = param(8, "--train_batch_size [CODE]")
        mem_fraction: float = param(0.25, "memorized share of each batch: --non_mem_ratio 3 → 1/4 [CODE]")
        lr: float = param(1e-5, "--learning_rate, constant schedule [CODE]")
        weight_decay: float = param(0.01, "--adam_weight_decay default (AdamW) [CODE]")
        max_grad_norm: float = param(1.0, "--max_grad_norm [CODE]")
        uncond_prob: float = param(0.0, "caption dropout (the script has none) [CODE]")
        n_regular: int = param(200, "regular caption-image pairs (the non-memorized data) [CHOICE]")
        regular_prompts: str = param("", "prompt set of the regular pairs; '' = the model's 'regular' prompt set")
        seed: int = param(0, "seeds the batch, noise and timestep draws")

        def __post_init__(self):
            if self.loss_norm not in LOSS_NORMS:
                raise BadInput(f"mitigation 'wen_train' parameter loss_norm={self.loss_norm!r}: must be one of "
                               f"{', '.join(LOSS_NORMS)}")
            if self.magnitude_of not in MAGNITUDES:
                raise BadInput(f"mitigation 'wen_train' parameter magnitude_of={self.magnitude_of!r}: must be one of "
                               f"{', '.join(MAGNITUDES)}")
            latent_elements(self.reference_latent, REF_LATENT)
            if self.steps < 0 or self.batch < 1 or self.n_regular < 0:
                raise BadInput(f"mitigation 'wen_train' parameters steps={self.steps}, batch={self.batch}, "
                               f"n_regular={self.n_regular}: must be ≥ 0, ≥ 1, ≥ 0")
            if not 0.0 <= self.mem_fraction <= 1.0 or not 0.0 <= self.uncond_prob <= 1.0:
                raise BadInput(f"mitigation 'wen_train' parameters mem_fraction={self.mem_fraction}, "
                               f"uncond_prob={self.uncond_prob}: must be in [0, 1]")
            if not self.lr > 0 or self.max_grad_norm <= 0 or self.weight_decay < 0:
                raise BadInput(f"mitigation 'wen_train' parameters lr={self.lr}, max_grad_norm={self.max_grad_norm}, "
                               f"weight_decay={self.weight_decay}: lr and max_grad_norm must be > 0, weight_decay ≥ 0")

    def __init__(self, params=None, **overrides):
        super().__init__(params, **overrides)
        self._state: dict | None = None
        self._report: dict = {}

    # ----------------------------------------------------------------------------------------------- data
    def _memorized_pairs(self, model, targets: list[Prompt], ctx: Context, size):
        import torch

        texts, lats, owners = [], [], []
        for q in targets:
            for img in ctx.reference_images(q):
                texts.append(q.text)
                owners.append(q.id)
                lats.append(model.encode_image(img, height=size[0], width=size[1]).float())
        return texts, (torch.cat(lats) if lats else None), owners

    def _regular_pairs(self, model, ctx: Context, size):
        from memobench.api import caption_image_pairs

        p = self.params
        name = p.regular_prompts or ctx.model_prompt_sets.get("regular", "")
        if not name:
            raise BadInput("mitigation 'wen_train': the model names no 'regular' prompt set; pass --mitigation-param "
                           "regular_prompts=<prompt set with reference images> (or mem_fraction=1)")
        texts, lats = caption_image_pairs(model, ctx, name, p.n_regular, size, "wen_train")
        if lats is None:
            raise BadInput(f"mitigation 'wen_train': prompt set '{name}' gives no reference images to use as "
                           "regular pairs (n_regular > 0 needed, or mem_fraction=1)")
        return name, texts, lats

    # ----------------------------------------------------------------------------------------------- fit
    def fit(self, model, prompts: list[Prompt], ctx: Context) -> None:
        import torch
        from safetensors.torch import load_file, save

        from memobench.api import (
            atomic_write_text,
            frozen_parameters,
            generation_size,
            key_of,
            size_key_part,
            tensors_sha256,
            write_once_bytes,
        )

        p = self.params
        if model.dtype != torch.float32:
            raise BadInput(f"mitigation 'wen_train': the model is {str(model.dtype).replace('torch.', '')}; the fit "
                           "trains the UNet in fp32: run with --dtype fp32")
        targets = [q for q in prompts if ctx.reference_images(q)]
        size = generation_size(model, ctx)
        path = ctx.artifact_path(self, "unet", key_of([q.sha256 for q in targets]), *size_key_part(model, size))
        meta_path = path.with_suffix(".json")
        if path.exists():
            self._state = {k: v.to(model.device, model.dtype) for k, v in load_file(str(path)).items()}
            self._report = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            self._report["file"] = str(path)
            return
        n_mem = math.floor(p.batch * p.mem_fraction + 0.5)  # round half up
        n_reg = p.batch - n_mem
        if n_mem and not targets:
            raise BadInput("mitigation 'wen_train': none of the target prompts has a training image (the memorized "
                           "pairs); pass mem_fraction=0 to fine-tune on regular pairs only")
        t0 = time.time()
        mem_texts, mem_z, owners = self._memorized_pairs(model, targets, ctx, size) if n_mem else ([], None, [])
        reg_name, reg_texts, reg_z = self._regular_pairs(model, ctx, size) if n_reg else ("", [], None)
        with torch.no_grad():
            mem_e = model.encode_prompt(mem_texts).float() if mem_texts else None
            reg_e = model.encode_prompt(reg_texts).float() if reg_texts else None
            empty = model.empty_embedding().float()
        latent = mem_z if mem_z is not None else reg_z
        scale = magnitude_scale(latent[0].numel(), p.loss_norm, p.reference_latent)

        unet = model.unet
        named = list(unet.named_parameters())
        flags = [q.requires_grad for _, q in named]
        originals = {n: q.data for n, q in named}
        sha_original = tensors_sha256(originals)
        T = int(model.scheduler.config.num_train_timesteps)
        gen = torch.Generator().manual_seed(p.seed)
        dev = model.device
        drop_mem, drop_reg, losses, updates = [], [], [], 0
        mags_mem, mags_reg = [], []  # (t, magnitude) per sample
        was_training = unet.training
        opt = None
        try:
            for _, q in named:  # train a copy; the original tensors wait untouched and are put back afterwards
                q.data = q.data.clone()
                q.requires_grad_(True)
            params = [q for _, q in named]
            opt = torch.optim.AdamW(params, lr=p.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=p.weight_decay)
            unet.train()
            with frozen_parameters(model.text_encoder, model.vae), torch.enable_grad(), \
                    ctx.task(f"wen_train: {p.steps} fine-tuning steps (batch {n_mem} memorized + {n_reg} regular, "
                             f"threshold {p.hard_threshold:g})", p.steps) as advance:
                for _ in range(p.steps):
                    im = torch.randint(0, len(mem_z), (n_mem,), generator=gen) if n_mem else None
                    ir = torch.randint(0, len(reg_z), (n_reg,), generator=gen) if n_reg else None
                    z = torch.cat([x for x in (mem_z[im] if n_mem else None, reg_z[ir] if n_reg else None)
                                   if x is not None])
                    e = torch.cat([x for x in (mem_e[im] if n_mem else None, reg_e[ir] if n_reg else None)
                                   if x is not None]).clone()
                    if p.uncond_prob > 0:
                        e[torch.rand(len(e), generator=gen) < p.uncond_prob] = empty[0]
                    noise = torch.randn(z.shape, generator=gen).to(z)
                    t = torch.randint(0, T, (len(z),), generator=gen).to(dev)
                    loss, mags, keep = filter_step(model, z, noise, t, e, empty, p.hard_threshold, scale,
                                                   p.magnitude_of)
                    kept = keep.cpu().tolist()
                    drop_mem.append(sum(not k for k in kept[:n_mem]))
                    drop_reg.append(sum(not k for k in kept[n_mem:]))
                    tt, mm = t.cpu().tolist(), mags.cpu().tolist()
                    mags_mem += list(zip(tt[:n_mem], mm[:n_mem]))
                    mags_reg += list(zip(tt[n_mem:], mm[n_mem:]))
                    if loss is not None:
                        grads = torch.autograd.grad(loss, params, allow_unused=True)
                        for q, g in zip(params, grads):
                            q.grad = g
                        torch.nn.utils.clip_grad_norm_(params, p.max_grad_norm)
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                        updates += 1
                        if updates % 5 == 1:
                            losses.append(round(float(loss.detach()), 6))
                    advance()
        finally:  # the model object is shared by the whole run: always give back the original tensors
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            del opt
            unet.train(was_training)
            state = {}
            for (n, q), f in zip(named, flags):
                state[n] = q.data
                q.data = originals[n]
                q.grad = None
                q.requires_grad_(f)
        self._state = {n: v.detach() for n, v in state.items()}

        def by_bins(pairs):
            out = []
            for b in range(10):
                lo, hi = b * T // 10, (b + 1) * T // 10
                ms = [m for t_, m in pairs if lo <= t_ < hi]
                out.append({"t": [lo, hi - 1], "n": len(ms),
                            "dropped_fraction": round(sum(m >= p.hard_threshold for m in ms) / len(ms), 4)
                            if ms else None, "magnitude_quartiles": _quartiles(ms)})
            return out

        def summary(pairs):
            ms = [m for _, m in pairs]
            return {"n": len(ms), "dropped": int(sum(m >= p.hard_threshold for m in ms)),
                    "dropped_fraction": round(sum(m >= p.hard_threshold for m in ms) / len(ms), 4) if ms else None,
                    "magnitude_quartiles": _quartiles(ms), "by_timestep": by_bins(pairs)}

        self._report = {
            "targets": [q.id for q in targets], "n_memorized_pairs": len(mem_texts),
            "memorized_pairs_per_target": {k: owners.count(k) for k in dict.fromkeys(owners)},
            "regular_prompts": reg_name, "n_regular_pairs": len(reg_texts),
            "batch": {"memorized": n_mem, "regular": n_reg}, "steps": p.steps, "updates": updates,
            "skipped_steps": p.steps - updates, "magnitude_scale": scale, "latent_shape": list(latent.shape[1:]),
            "threshold": p.hard_threshold, "magnitude_of": p.magnitude_of, "loss_norm": p.loss_norm,
            "prediction_type": model.prediction_type,
            "memorized": summary(mags_mem), "regular": summary(mags_reg),
            "dropped_memorized_per_step": drop_mem, "dropped_regular_per_step": drop_reg,
            "loss_every_5th_update": losses, "fit_seconds": round(time.time() - t0, 1), "size": list(size),
            "unet_sha256_original": sha_original, "unet_sha256_finetuned": tensors_sha256(self._state),
        }
        # shards of one run may fit at the same time: the first complete file wins and every process applies it
        if write_once_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in self._state.items()})):
            atomic_write_text(meta_path, json.dumps(self._report))
        else:
            self._state = {k: v.to(model.device, model.dtype) for k, v in load_file(str(path)).items()}
            self._report = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        self._report["file"] = str(path)

    # --------------------------------------------------------------------------------------------- apply
    @contextlib.contextmanager
    def apply(self, model, prompt: Prompt | None, ctx: Context) -> Iterator[None]:
        if self._state is None:
            raise RuntimeError("mitigation 'wen_train': fit() must run before apply()")
        from memobench.api import swapped_parameters

        with swapped_parameters(model.unet, self._state, "mitigation 'wen_train'"):
            yield

    def report(self) -> dict:
        r = dict(self._report)
        r["edit"] = "UNet parameter storage swapped for the fine-tuned tensors inside apply(); restored on exit"
        return r


@hookimpl
def register_mitigations(register):
    register(WenTrainingMitigation)
