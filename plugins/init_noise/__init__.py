"""Initial-noise adjustment: move x_T to where the conditional guidance ‖ε_c(x_T) − ε_u(x_T)‖ is small.

Paper: Han*, Kim*, Joo, Hong, Lee, "Adjusting Initial Noise to Mitigate Memorization in Text-to-Image Diffusion
Models", NeurIPS 2025, arXiv 2510.08625. Reference code ``hygnhan/init_noise_diffusion_memorization`` (3a47d7a):
``local_sd_pipeline.py`` (``adj_init_noise_batch_wise``, ``adj_init_noise_per_sample`` and the denoising loop),
``generate_images.py`` (argument defaults) and the README's two commands.

Registers the mitigation ``init_noise`` (``kind = "inference"``). It returns the adjusted initial latents in
``Conditioning.latents`` (same shape and seed order as received) and, for the batch-wise variant, a
:class:`memobench.api.Guidance` that defers CFG for the first steps.

Idea: the paper builds on the attraction basin of Jain et al. (CVPR 2025; memobench's ``cfg_switch``): CFG applied
inside the basin leads to the memorized image, and deferring CFG until the trajectory leaves it costs prompt
alignment. Initial samples whose conditional guidance ε̃(x_T) = ε_θ(x_T, T, y) − ε_θ(x_T, T, ∅) is small leave the
basin earlier, so both strategies move x_T to reduce ‖ε̃(x_T)‖₂ (t_0 = T, the first denoising timestep; for SD v1.4's
DDIM 50 steps, 981).

Algorithm, ``variant = "per_sample"`` (README "Per-sample mitigation"; the default, the paper's best trade-off of
memorization and alignment):

1. For every initial latent x_T^(g) separately: an fp32 copy, optimised with AdamW (lr = ``lr`` 0.01, weight decay
   ``weight_decay`` 0.01 = the torch default the reference constructs it with, betas (0.9, 0.999), eps 1e-8).
2. Up to ``max_iters`` (1000, ``--optim_iters``) times: L_g = ‖ε̃(x^(g))‖₂ over the sample's C×h×w tensor
   (``torch.norm(noise_pred_text - noise_pred_uncond, p=2)`` with batch size 1), on the reference's scale (below);
   if L_g ≤ ``target_loss`` (0.9, README ``--target_loss 0.9``) stop this sample (checked before the update);
   otherwise one AdamW step on ∇_x L_g.
3. Generation then runs plain CFG from the adjusted latents (the run's guidance scale at every step).

Algorithm, ``variant = "batch_wise"`` (README "Batch-wise mitigation"; a sharpness-aware step à la SAM on all the
prompt's latents at once, without gradients through the UNet):

1. ``adj_iters`` (2, ``--adj_iters``) times, for the whole batch X of the prompt's latents:
   ε̃ = ε̃(X); δ̂ = ρ·ε̃/‖ε̃‖₂ (the norm per sample, ``dim=(1, 2, 3)``); ∇ = ε̃(X + δ̂) − ε̃(X); X ← X − γ·∇,
   with ρ = ``rho`` 50 (``--rho 50``) on the reference's scale and γ = ``gamma`` 0.7 (``--gamma 0.7``).
2. Generation defers CFG: steps i ≤ ``apply_cfg_step`` (4, ``--apply_cfg_step 4``, i.e. the first 5 steps) use the
   unconditional prediction alone (w = 0), the later steps the run's guidance scale (the reference's loop:
   ``if i <= args.apply_cfg_step: noise_pred = noise_pred_uncond``).

The scale of the norms (``loss_norm``). The reference runs SD v1.4 at 512 px: one latent is 4×64×64 = 16,384
elements (``reference_latent``). A norm over a sample grows with √(number of elements), so the same ``target_loss``
(a norm) and ``rho`` (a radius) on memobench's embedded model (64 px: 16 channels × 16×16 = 4,096 elements) would
be a 2× looser threshold and a 2× larger perturbation per element (ρ = 50 against ‖x_T‖ ≈ 64). With
``loss_norm = "reference"`` (default) every norm is put on the reference's size, as ``wen``'s ``loss_norm``: the
loss compared with ``target_loss`` is L = ‖ε̃‖₂·√(N_ref/N) (√N_ref times the per-element RMS; N = C·h·w of the run's
latent) and the radius used is ρ·√(N/N_ref) (the same per-element perturbation). At the reference's size the factor
is exactly 1. ``loss_norm = "raw"`` uses the numbers as given. lr and γ act per element (Adam's step, a multiple of a
difference of ε) and are not rescaled.

memobench choices (recorded in ``Conditioning.trace["init_noise"]``):

* fp32 optimisation under ``torch.enable_grad()`` with the model's parameters frozen, gradients by
  ``torch.autograd.grad`` w.r.t. the latents only (the reference: bf16 and ``loss.backward()``). The per-sample
  variant optimises the prompt's G latents in one batch: one AdamW over G separate leaves, a finished sample gets no
  gradient (so AdamW skips it: no update, no decay), which is G independent runs of the reference's loop.
* ε for v-prediction models (:meth:`memobench.model.DiffusionModel.eps`); the UNet input is
  ``scheduler.scale_model_input`` of the latents (the identity for DDIM, as in the reference's batch-wise code).
* The batch-wise "batch" is the latents the runner passes: all the prompt's seeds (10 on the embedded model; the
  reference: ``num_images_per_prompt`` = 10 too); every operation in it is per sample, so the batch size does not
  change the result.
* ``target_step`` of the reference's per-sample function is fixed to [0] there and here (t_0).
"""

from __future__ import annotations

from dataclasses import dataclass

from memobench.api import (
    BadInput,
    Conditioning,
    Guidance,
    Mitigation,
    hookimpl,
    latent_elements,
    param,
    reference_scale,
)

REF_LATENT = "mitigation 'init_noise' parameter reference_latent"

VARIANTS = ("per_sample", "batch_wise")


def norm_factor(numel_per_sample: int, loss_norm: str, reference_latent: str) -> float:
    """√(N_ref / N): multiplies a per-sample norm over N elements to put it on the reference's size (1.0 for
    ``loss_norm = "raw"`` or N = N_ref)."""
    if loss_norm == "raw":
        return 1.0
    return reference_scale(numel_per_sample, latent_elements(reference_latent, REF_LATENT))


def per_sample_norm(d):
    return d.flatten(1).norm(p=2, dim=1)


def batch_wise_step(model, x, t, e_u, e_c, rho: float, gamma: float):
    """One batch-wise adjustment: X − γ·(ε̃(X + ρ·ε̃(X)/‖ε̃(X)‖) − ε̃(X)), norms per sample; also ‖ε̃(X)‖ per sample."""
    d = model.eps_difference(x, t, e_u, e_c)
    mag = per_sample_norm(d).view(-1, *([1] * (x.dim() - 1)))
    d_pert = model.eps_difference(x + rho * d / mag, t, e_u, e_c)
    return x - gamma * (d_pert - d), mag.flatten()


class DeferredCFG(Guidance):
    """w = 0 (the unconditional prediction) for steps i ≤ ``last_unguided``, then the run's scale."""

    def __init__(self, last_unguided: int):
        self.last_unguided = int(last_unguided)

    def scale(self, index, timestep, latents, eps_uncond, eps_cond, guidance_scale):
        return 0.0 if index <= self.last_unguided else float(guidance_scale)


class InitNoise(Mitigation):
    """Han et al. (NeurIPS 2025): adjust x_T so that the conditional guidance ‖ε_c(x_T) − ε_u(x_T)‖ is small."""

    name = "init_noise"
    version = "1"
    kind = "inference"

    @dataclass
    class Params:
        variant: str = param("per_sample", "'per_sample' (AdamW to target_loss per latent) | 'batch_wise' (SAM-like "
                                           "steps, CFG deferred)")
        target_loss: float = param(0.9, "per_sample: stop when ‖ε_c−ε_u‖ (reference scale) ≤ this (--target_loss)")
        lr: float = param(0.01, "per_sample: AdamW learning rate (--lr)")
        weight_decay: float = param(0.01, "per_sample: AdamW weight decay (torch default, as the reference builds it)")
        max_iters: int = param(1000, "per_sample: most AdamW steps per latent (--optim_iters)")
        rho: float = param(50.0, "batch_wise: perturbation radius ρ on the reference scale (--rho)")
        gamma: float = param(0.7, "batch_wise: step size γ (--gamma)")
        adj_iters: int = param(2, "batch_wise: adjustment iterations M (--adj_iters)")
        apply_cfg_step: int = param(4, "batch_wise: steps i ≤ this are unguided, w = 0 (--apply_cfg_step)")
        loss_norm: str = param("reference", "'reference': norms on reference_latent's size (docstring) | 'raw'")
        reference_latent: str = param("4x64x64", "C×h×w of the reference's latent: SD v1.4 at 512×512")

        def __post_init__(self):
            what = "mitigation 'init_noise' parameter"
            if self.variant not in VARIANTS:
                raise BadInput(f"{what} variant={self.variant!r}: must be one of {VARIANTS}")
            if self.loss_norm not in ("reference", "raw"):
                raise BadInput(f"{what} loss_norm={self.loss_norm!r}: must be 'reference' or 'raw'")
            for k in ("lr", "rho", "gamma"):
                if getattr(self, k) <= 0:
                    raise BadInput(f"{what} {k}={getattr(self, k)}: must be > 0")
            if self.weight_decay < 0:
                raise BadInput(f"{what} weight_decay={self.weight_decay}: must be ≥ 0")
            for k in ("max_iters", "adj_iters"):
                if getattr(self, k) < 0:
                    raise BadInput(f"{what} {k}={getattr(self, k)}: must be ≥ 0")
            if self.apply_cfg_step < -1:
                raise BadInput(f"{what} apply_cfg_step={self.apply_cfg_step}: must be ≥ −1 (−1: no deferral)")
            latent_elements(self.reference_latent, REF_LATENT)

    def __init__(self, params=None, **overrides):
        super().__init__(params, **overrides)
        self._summaries: dict[str, dict] = {}

    def condition(self, model, prompt, cond, latents, ctx):
        from memobench.api import frozen_parameters

        p = self.params
        gen = dict(ctx.generation or {}) if ctx is not None else {}
        n_steps = int(gen.get("num_inference_steps", 50))
        t0 = model.timesteps(n_steps)[0]
        e_u = cond.negative_prompt_embeds.detach().to(model.device)
        e_c = cond.prompt_embeds.detach().to(model.device)
        if e_u.shape[0] != 1 or e_c.shape[0] != 1:
            raise ValueError("init_noise: expects one conditional and one unconditional embedding (1×77×d each)")
        x0 = latents.detach().to(model.device).float()
        factor = norm_factor(x0[0].numel(), p.loss_norm, p.reference_latent)
        rec: dict = {"mitigation": "init_noise", "variant": p.variant, "timestep": int(t0), "loss_norm": p.loss_norm,
                     "norm_factor": factor, "latent_shape": list(x0.shape)}
        guidance = None
        with frozen_parameters(model.unet, model.text_encoder, model.vae):
            if p.variant == "per_sample":
                x, info = self._per_sample(model, x0, t0, e_u, e_c, factor)
            else:
                x, info = self._batch_wise(model, x0, t0, e_u, e_c, factor)
                guidance = DeferredCFG(p.apply_cfg_step)
        rec.update(info)
        rec["shift_l2"] = per_sample_norm(x - x0).tolist()
        rec["latent_norm"] = per_sample_norm(x).tolist()
        self._summaries[prompt.id] = {k: rec[k] for k in ("initial_loss", "final_loss", "iterations", "reached_target")
                                      if k in rec}
        return Conditioning(cond.prompt_embeds, cond.negative_prompt_embeds, text=cond.text,
                            trace={**(cond.trace or {}), "init_noise": rec},
                            latents=x.to(latents.dtype), guidance=guidance)

    def _per_sample(self, model, x0, t0, e_u, e_c, factor):
        import torch

        p = self.params
        G = x0.shape[0]
        leaves = [x0[g:g + 1].clone().requires_grad_(True) for g in range(G)]
        opt = torch.optim.AdamW(leaves, lr=p.lr, weight_decay=p.weight_decay)
        done = [False] * G
        updates = [0] * G
        first: list = [None] * G
        last: list = [None] * G
        with torch.enable_grad():
            for _ in range(p.max_iters):
                active = [g for g in range(G) if not done[g]]
                if not active:
                    break
                x = torch.cat([leaves[g] for g in active])
                loss = per_sample_norm(model.eps_difference(x, t0, e_u, e_c)) * factor
                keep = []
                for k, g in enumerate(active):
                    v = float(loss[k].detach())
                    first[g] = v if first[g] is None else first[g]
                    last[g] = v
                    if v <= p.target_loss:  # checked before the update, as the reference
                        done[g] = True
                    else:
                        keep.append(k)
                if not keep:
                    break
                grads = torch.autograd.grad(loss[keep].sum(), [leaves[active[k]] for k in keep])
                for leaf in leaves:
                    leaf.grad = None
                for k, gr in zip(keep, grads):
                    leaves[active[k]].grad = gr
                    updates[active[k]] += 1
                opt.step()
        x = torch.cat([leaf.detach() for leaf in leaves])
        return x, {"initial_loss": first, "final_loss": last, "iterations": updates, "reached_target": done,
                   "target_loss": p.target_loss, "lr": p.lr, "weight_decay": p.weight_decay,
                   "max_iters": p.max_iters}

    def _batch_wise(self, model, x0, t0, e_u, e_c, factor):
        import torch

        p = self.params
        rho = p.rho / factor  # the radius on the run's size: ρ·√(N/N_ref)
        x = x0
        mags = []
        with torch.no_grad():
            for _ in range(p.adj_iters):
                x, mag = batch_wise_step(model, x, t0, e_u, e_c, rho, p.gamma)
                mags.append((mag * factor).tolist())
            final = (per_sample_norm(model.eps_difference(x, t0, e_u, e_c)) * factor).tolist()
        return x, {"guidance_norm_per_iter": mags, "initial_loss": mags[0] if mags else final, "final_loss": final,
                   "iterations": p.adj_iters, "rho": p.rho, "rho_applied": rho, "gamma": p.gamma,
                   "apply_cfg_step": p.apply_cfg_step}

    def report(self) -> dict:
        """Per prompt: initial and final ‖ε_c − ε_u‖ (reference scale) and iterations of every latent."""
        return {"variant": self.params.variant, "prompts": dict(self._summaries)}


@hookimpl
def register_mitigations(register):
    register(InitNoise)
