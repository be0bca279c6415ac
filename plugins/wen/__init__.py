"""Wen et al. inference-time mitigation: optimise the prompt embedding until its text-conditional noise is small.

Paper: Wen, Liu, Chen, Lyu, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models", ICLR 2024
(oral), §4 (detection by the magnitude of the text-conditional noise prediction) and §5 (inference-time
mitigation). Reference code ``YuxinWenRick/diffusion_memorization`` (c8fe471): ``local_sd_pipeline.aug_prompt``,
``inference_mem.py``; memobench ``METHODS.md`` §6.1, §7.2, §9 #9/#10.

Registers the mitigation ``wen`` (``kind = "inference"``). For one prompt with G initial latents x_T^(g)
(the latents of *all* the run's seeds for that prompt, as the runner passes them)::

    minimise over e*:   L(e*) = ‖ ε_θ(x_{t_s}, t_s, e*) − ε_θ(x_{t_s}, t_s, e_∅) ‖₂            (§7.2)

1. e* ← copy of the conditional embedding e_p (1×77×d), fp32, trainable; AdamW(lr = 0.05, weight decay 0.01).
2. Up to ``max_iters`` (10) times, at the target denoising step s (``target_step`` 0, t_s = t_0 = 981 for 50 DDIM
   steps): one UNet pass on the G latents with conditioning [e_∅ × G, e* × G] → ε_u, ε_c;
   L = ‖ε_c − ε_u‖₂ as **one** norm over the whole G×C×h×w tensor (not a per-image mean), expressed on the
   reference's tensor size (``loss_norm``, below);
   if L ≤ ``target_loss`` stop (checked *before* the update); otherwise the gradient of L w.r.t. e*, with the
   gradient of token position 0 (BOS) zeroed, and one optimiser step.
3. Generation then uses ``prompt_embeds = e*`` with the same latents; the unconditional embedding stays e_∅.

Faithful to the reference code (METHODS §0.2):

* lr 0.05 is the ``inference_mem.py`` CLI value (``aug_prompt``'s own default 0.1 is never used, §9 #9).
* ``target_loss`` 3 is the README "ours" command (preset ``wen2024``); MemBench runs it with 5 (preset
  ``membench``: ``--mitigation-param target_loss=5``, or ``Wen(Wen.preset("membench"))``).
* The threshold's scale (``loss_norm``). In the reference, ``aug_prompt`` takes ``torch.norm(noise_pred_text,
  p=2)`` of the whole (G, 4, h, w) tensor, with G = ``num_images_per_prompt`` = 4 (``inference_mem.py`` default,
  unchanged by the README command) and h = w = 64 (``height``/``width`` default to ``unet.config.sample_size`` ×
  ``vae_scale_factor`` = 512 px on SD v1.4): ``target_loss`` 3 was set for a norm over N_ref = 4 × 4×64×64 =
  65,536 elements. A joint norm grows with √(number of elements), so the same threshold on the runner's G
  (all of a prompt's seeds: 10 under ``nemo2024``) or at another resolution would be a different, stricter or
  looser, criterion. ``loss_norm = "reference"`` (default) therefore evaluates

      L = ‖ε_c − ε_u‖₂ · √(N_ref / N),      N = G·C·h·w of the run's tensor,

  i.e. √N_ref times the root-mean-square of the difference: the reference's own joint norm when the run has its
  shape (G = 4, 4×64×64 latents: the factor is exactly 1 and L is the reference's L bit for bit), and otherwise
  the value that norm takes in expectation for the same per-element difference (mean over all G images of the
  per-image squared norm, scaled to 4 images of 4×64×64). ``reference_images`` (4) and ``reference_latent``
  ("4x64x64") name the reference's shape. ``loss_norm = "joint"`` is the raw joint norm over whatever the runner
  passes (version 1's behaviour). The factor scales L, its gradient and the proximity mix alike; the trace
  records it (``loss_scale``) and every listed loss is the scaled L that is compared with the target.
* AdamW's decoupled weight decay acts on the *whole* e*, so the BOS row, whose gradient is zero (hence whose Adam
  update is zero), still shrinks by the factor (1 − lr·weight_decay) per update, exactly as in the reference
  code; with ``weight_decay=0`` the BOS row is left bit-identical.
* When ``target_step`` > 0 the latents are first advanced by that many guided DDIM steps (w from the run's
  generation settings) conditioned on the original e_p, as ``aug_prompt``'s loop does before reaching the target
  step; only a single target step is supported (the reference returns at the first one).
* The proximity term (``optim_epsilon``/``alpha`` in ``aug_prompt``, unused by default there) is available as
  ``proximity_epsilon`` (negative = off, the reference's ``None``) and ``proximity_alpha``: when the mean over
  token positions 1..76 of ‖e*_k − e_p,k‖₂ exceeds ε, the minimised loss becomes α·L + (1 − α)·that mean; the
  stopping test still uses L alone.

The optimisation loop (steps 1–2) is the module function :func:`optimize_embedding`, whose objective is a
parameter (default :func:`joint_noise_norm`): Bright Ending (``bright_ending``, Chen et al., ICLR 2025) runs the same
loop with a masked norm.

memobench choices where the reference is silent or differs by necessity (all recorded in ``Conditioning.trace``):

* The optimisation runs in fp32 under ``torch.enable_grad()`` (the reference runs in bf16): e* is an fp32 leaf,
  cast to the model dtype for the UNet call; L is computed in fp32. The returned embedding is cast back to the
  model dtype (generation uses it directly).
* The model's parameters are frozen for the duration (``requires_grad`` restored afterwards) and gradients are
  taken with ``torch.autograd.grad`` w.r.t. e* only, so no parameter ``.grad`` is ever written.
* The unconditional embedding of the objective is the conditioning's ``negative_prompt_embeds`` (e_∅ in every
  memobench run), as the reference uses its own negative/unconditional embedding.
* ``Conditioning.trace["wen"]`` holds the loss of every evaluation, the number of updates (``iterations``),
  ``final_loss`` and whether the target was reached; :meth:`WenMitigation.report` summarises them per prompt
  for the result JSON.
* ``final_loss`` in the trace is the loss at the last evaluation: the one that met the target, or, when the
  iteration cap is hit, the loss before the last update (what the reference prints); the returned e* after the
  last update is not re-evaluated (no extra UNet pass).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from memobench.api import (
    BadInput,
    Conditioning,
    Mitigation,
    hookimpl,
    latent_elements,
    param,
    reference_scale,
)

#: Named configurations of the reference code (METHODS §1.2, §9 #10).
PRESETS: dict[str, dict] = {
    "wen2024": {"target_loss": 3.0},
    "membench": {"target_loss": 5.0},
}


def joint_noise_norm(eps_cond, eps_uncond):
    """Wen's objective: one L2 norm over the whole G×C×h×w difference tensor, in fp32 (§7.2 step 3b)."""
    return (eps_cond.float() - eps_uncond.float()).flatten().norm(p=2)


def reference_elements(shape: str) -> int:
    """Number of elements of a ``"CxHxW"`` latent shape (e.g. "4x64x64" → 16384)."""
    return latent_elements(shape, "mitigation 'wen' parameter reference_latent")


def loss_scale(numel: int, loss_norm: str = "reference", reference_images: int = 4,
               reference_latent: str = "4x64x64") -> float:
    """The factor √(N_ref / N) that puts a joint norm over ``numel`` elements on the reference's scale
    (N_ref = ``reference_images`` × C·h·w of ``reference_latent``); exactly 1.0 for ``loss_norm = "joint"`` or
    when N = N_ref."""
    if loss_norm == "joint":
        return 1.0
    return reference_scale(numel, int(reference_images) * reference_elements(reference_latent))


class WenMitigation(Mitigation):
    """Wen et al. (ICLR 2024): optimise the prompt embedding until ‖ε(x_T, e*) − ε(x_T, e_∅)‖ ≤ target."""

    name = "wen"
    version = "2"  # 2: loss_norm "reference" (the threshold's scale is the reference's G = 4 at 512 px)
    kind = "inference"

    @dataclass
    class Params:
        lr: float = param(0.05, "inference_mem.py --optim_lr (aug_prompt's own default 0.1 is not the effective one)")
        weight_decay: float = param(0.01, "torch.optim.AdamW default, as the reference constructs it")
        max_iters: int = param(10, "--optim_iters")
        target_loss: float = param(3.0, "--optim_target_loss: 3 = README 'ours' (wen2024); MemBench uses 5")
        target_step: int = param(0, "--optim_target_steps: index of the denoising step optimised (t_0 = 981)")
        zero_bos_grad: bool = param(True, "the reference zeroes the gradient of token position 0")
        proximity_epsilon: float = param(-1.0, "aug_prompt optim_epsilon; < 0 = off (the reference's None, default)")
        proximity_alpha: float = param(0.5, "aug_prompt alpha (only with proximity_epsilon ≥ 0)")
        loss_norm: str = param("reference", "'reference': L on the reference's G×C×h×w (below) | 'joint': raw norm")
        reference_images: int = param(4, "inference_mem.py --num_images_per_prompt (the G target_loss was set for)")
        reference_latent: str = param("4x64x64", "C×h×w of one reference latent: SD v1.4 at 512×512")

        def __post_init__(self):
            if self.loss_norm not in ("reference", "joint"):
                raise BadInput(f"mitigation 'wen' parameter loss_norm: {self.loss_norm!r} not in "
                               "('reference', 'joint')")
            if self.reference_images < 1:
                raise BadInput("mitigation 'wen' parameter reference_images: at least 1")
            reference_elements(self.reference_latent)  # a malformed shape fails here

    def __init__(self, params=None, **overrides):
        super().__init__(params, **overrides)
        self._summaries: dict[str, dict] = {}

    def summaries(self) -> dict:
        """Per-prompt iterations / final loss of the optimisations run by this instance (in-process use; the
        runner stores each image's ``Conditioning.trace`` in its cache sidecar and the result's
        ``mitigation_traces``)."""
        return dict(self._summaries)

    @classmethod
    def preset(cls, name: str) -> "WenMitigation.Params":
        """``Params`` of a named preset: ``wen2024`` (target loss 3) or ``membench`` (target loss 5)."""
        try:
            return replace(cls.Params(), **PRESETS[name])
        except KeyError:
            raise BadInput(f"wen: unknown preset {name!r}; available: {', '.join(PRESETS)}") from None

    def condition(self, model, prompt, cond, latents, ctx):
        p = self.params
        run = optimize_embedding(model, cond, latents, ctx, p, name="wen")
        losses, updates, reached = run["losses"], run["iterations"], run["reached_target"]
        self._summaries[prompt.id] = {"iterations": updates, "final_loss": losses[-1] if losses else None,
                                      "reached_target": reached}
        trace = optimization_trace(run, p, "wen")
        return Conditioning(run["embedding"].to(model.dtype), cond.negative_prompt_embeds, text=cond.text,
                            trace={**(cond.trace or {}), "wen": trace})


def optimize_embedding(model, cond, latents, ctx, p, name: str = "wen", noise_loss=None) -> dict:
    """Steps 1–2 of the module docstring: optimise e* from ``cond.prompt_embeds`` on the G ``latents``.

    ``p`` carries Wen's parameters (attributes of :class:`WenMitigation.Params`). ``noise_loss(eps_cond,
    eps_uncond)`` is the objective before the ``loss_norm`` scale (default :func:`joint_noise_norm`, Wen's);
    a method built on Wen's optimisation passes its own (Bright Ending: a masked norm). Returns the fp32 e*
    (``embedding``), the loss of every evaluation, the number of updates and what the trace records."""
    import torch

    noise_loss = joint_noise_norm if noise_loss is None else noise_loss
    if p.max_iters < 0:
        raise BadInput(f"{name}: max_iters must be ≥ 0")
    gen = dict(ctx.generation or {}) if ctx is not None else {}
    n_steps = int(gen.get("num_inference_steps", 50))
    w = float(gen.get("guidance_scale", 7.5))
    if not 0 <= p.target_step < n_steps:
        raise BadInput(f"{name}: target_step {p.target_step} outside the {n_steps} denoising steps")
    dtype, device = model.dtype, model.device
    G = latents.shape[0]
    e_p = cond.prompt_embeds.detach().to(device)
    e_u = cond.negative_prompt_embeds.detach().to(device, dtype)
    if e_p.shape[0] != 1 or e_u.shape[0] != 1:
        raise ValueError(f"{name}: expects one conditional and one unconditional embedding (1×77×d each)")
    timesteps = model.timesteps(n_steps)
    sched = model.scheduler

    from memobench.api import frozen_parameters

    with frozen_parameters(model.unet, model.text_encoder, model.vae), torch.enable_grad():
        x = latents.detach().to(device, dtype)
        if p.target_step > 0:  # advance the G latents to the target step with the original conditioning
            with torch.no_grad():
                emb = torch.cat([e_u.expand(G, -1, -1), e_p.to(dtype).expand(G, -1, -1)])
                for t in timesteps[: p.target_step]:
                    out = model.eps(sched.scale_model_input(torch.cat([x, x]), t), t, emb)
                    eu, ec = out.chunk(2)
                    x = model.step_eps(eu + w * (ec - eu), t, x)
        t_s = timesteps[p.target_step]
        x_in = sched.scale_model_input(torch.cat([x, x]), t_s)
        e_init = e_p.float()
        e_star = e_init.clone().requires_grad_(True)
        opt = torch.optim.AdamW([e_star], lr=p.lr, weight_decay=p.weight_decay)
        losses: list[float] = []
        updates = 0
        reached = False
        scale = loss_scale(x.numel(), p.loss_norm, p.reference_images, p.reference_latent)
        for _ in range(p.max_iters):
            emb = torch.cat([e_u.expand(G, -1, -1), e_star.to(dtype).expand(G, -1, -1)])
            out = model.eps(x_in, t_s, emb)
            eu, ec = out.chunk(2)
            loss = noise_loss(ec, eu)
            if scale != 1.0:
                loss = loss * scale
            loss_item = float(loss.detach())
            losses.append(loss_item)
            if p.proximity_epsilon >= 0:
                with torch.no_grad():
                    prox = (e_init[:, 1:] - e_star[:, 1:]).norm(p=2, dim=-1).mean()
                if prox > p.proximity_epsilon:
                    prox = (e_init[:, 1:] - e_star[:, 1:]).norm(p=2, dim=-1).mean()
                    loss = p.proximity_alpha * loss + (1 - p.proximity_alpha) * prox
            if loss_item <= p.target_loss:  # checked before the update, on the noise norm alone
                reached = True
                break
            (grad,) = torch.autograd.grad(loss, [e_star])
            if p.zero_bos_grad:
                grad[:, 0] = 0
            e_star.grad = grad
            opt.step()
            opt.zero_grad(set_to_none=True)
            updates += 1
    e_out = e_star.detach()
    return {"embedding": e_out, "losses": losses, "iterations": updates, "reached_target": reached,
            "timestep": int(t_s), "num_images": int(G), "loss_scale": scale, "latent_shape": list(x.shape),
            "embedding_shift_l2": float((e_out - e_init).norm())}


def optimization_trace(run: dict, p, name: str) -> dict:
    """What ``Conditioning.trace[name]`` records of one :func:`optimize_embedding` run with parameters ``p``."""
    losses = run["losses"]
    return {
        "mitigation": name, "iterations": run["iterations"], "evaluations": len(losses), "losses": losses,
        "initial_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "reached_target": run["reached_target"], "target_loss": p.target_loss, "target_step": p.target_step,
        "timestep": run["timestep"], "num_images": run["num_images"], "lr": p.lr, "weight_decay": p.weight_decay,
        "loss_norm": p.loss_norm, "loss_scale": run["loss_scale"], "latent_shape": run["latent_shape"],
        "embedding_shift_l2": run["embedding_shift_l2"],
    }


@hookimpl
def register_mitigations(register):
    register(WenMitigation)
