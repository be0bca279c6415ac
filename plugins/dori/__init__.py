"""DoRI: adversarial text-embedding optimisation that recovers memorized images from a mitigated model (attack).

Paper: Kowalczuk*, Hintersdorf*, Struppek*, Kersting, Dziedzic, Boenisch, "Finding DoRI: Discovery of Retained
Images in Diffusion Models", ICML 2026, arXiv 2507.16880 (v1 "Finding Dori: Memorization in Text-to-Image
Diffusion Models Is Less Local Than Assumed"), §3 (threat model, optimisation objective) and the authors' blog
post; code announced at ``sprintml/finding_dori``. memobench ``METHODS.md`` §7.4 (objective, hyperparameter table,
algorithm steps 1–6), §8.1 (MR vs steps 0/1/10/25/50), §10 item 6.

Registers the attack ``dori`` (``needs_reference = True``). With θ_M the mitigated model (the runner calls
:meth:`DoRIAttack.run` inside the mitigation's ``apply`` context, so its hooks / pruned weights are active) and
z_mem the VAE latent of the target's training image x_mem::

    y_adv = argmin_y  E_{t ~ U{0..999}, ε ~ N(0, I)} ‖ ε − ε_θM( √ᾱ_t·z_mem + √(1−ᾱ_t)·ε , t , y ) ‖²      (§7.4)

1. All model parameters frozen (``requires_grad`` restored afterwards); y is the only trainable tensor.
2. z_mem ← ``model.encode_image(x_mem)``: centre-crop and resize to the run's generation size
   (``ctx.generation`` height/width, :func:`memobench.model.generation_size`; the model's native
   resolution without a run context), scale to [−1, 1], VAE posterior **mean** × scaling factor (0.18215 for
   SD-1) — ``latent = "mean"`` ([UNPUBLISHED]; ``"sample"`` draws from the posterior with the attack generator
   instead). METHODS §7.4 writes 512 for SD-1.4, which is its generation size: the embedding is optimised on
   latents of the size it then conditions (a 256-px run attacks at 32×32 latents, not at the native 64×64).
3. y ← initialisation ``init``: ``"prompt"`` (default; the target prompt's embedding e_p), ``"gaussian"`` (N(0, I)
   of shape 1×77×d, drawn from the attack generator) or ``"nonmem"`` (the embedding of the non-memorized prompt
   ``init_prompt``). Adam(lr = 0.1) on y, in fp32.
4. For ``steps`` (50) iterations: draw ``batch`` (8) pairs t_b ~ U{``t_min``..``t_max``} (0..999) and ε_b ~ N(0, I)
   (fresh every step), x_b = √ᾱ_{t_b} z_mem + √(1−ᾱ_{t_b}) ε_b, L = mean over elements and batch of
   (ε_b − ε_θM(x_b, t_b, y))² (``torch.nn.functional.mse_loss``, the diffusers training convention,
   [UNPUBLISHED]); gradient w.r.t. y only (``torch.autograd.grad``); one Adam step. ``objective`` ("native",
   default) is the model's own training loss (``Model.diffusion_loss``): this ε-MSE for ε-prediction models (SD
   v1.4, SD 2 base, the paper's models) and the v-MSE ‖v_b − v_θM(x_b, t_b, y)‖², v_b = √ᾱ_t ε_b − √(1−ᾱ_t) z_mem,
   for v-prediction models (SD 2 768-v and the shipped embedded ``tiny`` model), which weights t by 1/ᾱ_t
   relative to ε-MSE.
   [CHOICE] the paper only uses ε models; ``objective = "eps"`` applies the ε-MSE above to any model (ε converted
   from v).
5. The runner generates from ``prompt_embeds = y_adv`` with ``negative_prompt_embeds = e_∅`` under the same
   mitigation, with the run's seeds.
6. The trace records the loss curve (one value per step: the batch loss before that step's update), the
   timestep draws, the generator seed, ‖y_adv‖, ‖y_adv − e_p‖ and the sha256 of y_adv; ``tensors`` holds ``y_init``.

[SECONDARY] values used as defaults (METHODS §7.4): Adam, lr 0.1, 50 steps, batch 8, t ~ U{1..T}.
[UNPUBLISHED] choices, each a named parameter: ``latent`` ("mean"), loss reduction (mean; fixed), ``optimize_bos``
(True: all 77 positions are optimised; False zeroes the BOS gradient, as Wen does, so with Adam the BOS row
stays exactly at its initial value), ``objective`` (step 4), precision (fp32 optimisation: y is an fp32 leaf cast to
the model dtype for the UNet call, the loss is computed in fp32), ``t_min``/``t_max`` (0..999, diffusers' indexing of U{1..1000}).

Randomness: one dedicated CPU ``torch.Generator`` per target, seeded from sha256(prompt sha256 | ``seed``)
(CONVENTIONS §8), recorded in the trace as ``generator_seed``. It draws, in this order, the posterior sample
(``latent = "sample"`` only), the Gaussian initialisation (``init = "gaussian"`` only), then per step the 8
timesteps and the 8 noise tensors. Draws are made on the CPU and moved to the model's device, so they do not
depend on the device. ``steps = 0`` returns the initialisation itself (the 0-step point of the MR-vs-steps figure).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

from memobench.api import Attack, AttackOutput, BadInput, Conditioning, hookimpl, param

INITS = ("prompt", "gaussian", "nonmem")


def generator_seed(prompt_sha256: str, seed: int) -> int:
    """The attack generator's seed: the first 63 bits of sha256(prompt sha256 | seed)."""
    h = hashlib.sha256(f"dori|{prompt_sha256}|{int(seed)}".encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


def diffusion_loss(model, z, y, t, eps, objective: str = "native"):
    """DoRI's objective for one batch: the model's own training loss (``"native"``: ε-MSE, or v-MSE for a
    v-prediction model) or the ε-MSE (``"eps"``), mean over elements and batch, at x = √ᾱ_t z + √(1−ᾱ_t) ε.

    ``z`` (B×C×h×w, fp32), ``t`` (B,) timestep indices, ``eps`` (B×C×h×w, fp32), ``y`` (1×77×d, any dtype; cast
    to the model dtype for the UNet). Differentiable w.r.t. ``y`` (and through any hooks the model carries)."""
    import torch.nn.functional as F

    if objective == "native":
        return model.diffusion_loss(z, eps, t, y)
    x = model.add_noise(z, eps, t)
    pred = model.eps(x.to(model.dtype), t, y.to(model.dtype).expand(z.shape[0], -1, -1))
    return F.mse_loss(pred.float(), eps.float())



class DoRIAttack(Attack):
    """DoRI (Kowalczuk et al., ICML 2026): optimise the text conditioning against the target's training image."""

    name = "dori"
    version = "1"
    needs_reference = True
    # the attacker's work: steps × batch UNet forward+backward passes; the blog's MR-vs-steps figure (METHODS §8.1)
    budget_param = "steps"
    budget_unit = "UNet forward+backward passes (steps × batch)"
    budget_values = (0, 5, 10, 25, 50)

    def budget(self) -> float:
        return float(self.params.steps * self.params.batch)

    @dataclass
    class Params:
        steps: int = param(50, "optimisation steps; the MR-vs-steps figure uses 0/1/10/25/50 [SECONDARY]")
        lr: float = param(0.1, "Adam learning rate [SECONDARY]")
        batch: int = param(8, "(t, ε) draws per step for the same image [SECONDARY]")
        init: str = param("prompt", "'prompt' (default) | 'gaussian' (N(0, I)) | 'nonmem' (embedding of init_prompt)")
        init_prompt: str = param("a photo of a living room with a sofa and a table", "used by init='nonmem'")
        seed: int = param(0, "with the prompt's sha256, seeds the attack generator")
        optimize_bos: bool = param(True, "all 77 positions; False = zero the BOS gradient [UNPUBLISHED]")
        latent: str = param("mean", "'mean' (VAE posterior mean) | 'sample' (posterior sample) [UNPUBLISHED]")
        t_min: int = param(0, "t ~ U{t_min..t_max} (diffusers indices of U{1..1000}) [SECONDARY]")
        t_max: int = param(999, "upper end of the timestep range t ~ U{t_min..t_max} [SECONDARY]")
        objective: str = param("native", "'native' (the model's training loss: ε- or v-MSE) | 'eps' (ε-MSE) [CHOICE]")

    def _check(self, model) -> None:
        p = self.params
        if p.init not in INITS:
            raise BadInput(f"dori: init must be one of {', '.join(INITS)}, not {p.init!r}")
        if p.latent not in ("mean", "sample"):
            raise BadInput(f"dori: latent must be 'mean' or 'sample', not {p.latent!r}")
        if p.objective not in ("native", "eps"):
            raise BadInput(f"dori: objective must be 'native' or 'eps', not {p.objective!r}")
        if p.steps < 0 or p.batch < 1:
            raise BadInput("dori: steps must be ≥ 0 and batch ≥ 1")
        T = int(model.scheduler.config.num_train_timesteps)
        if not 0 <= p.t_min <= p.t_max < T:
            raise BadInput(f"dori: need 0 ≤ t_min ≤ t_max < {T}, got {p.t_min}..{p.t_max}")

    def initial_embedding(self, model, prompt, gen):
        """y^(0) (1×77×d, fp32) for the configured ``init``."""
        import torch

        p = self.params
        if p.init == "prompt":
            return model.encode_prompt(prompt.text).float()
        if p.init == "nonmem":
            return model.encode_prompt(p.init_prompt).float()
        shape = tuple(model.empty_embedding().shape)
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(model.device)

    def run(self, model, prompt, reference, ctx) -> AttackOutput:
        import torch

        p = self.params
        self._check(model)
        if reference is None:
            raise BadInput(f"dori: prompt {prompt.id} has no reference (training) image")
        from memobench.api import generation_size

        device, dtype = model.device, model.dtype
        gseed = generator_seed(prompt.sha256, p.seed)
        gen = torch.Generator().manual_seed(gseed)
        height, width = generation_size(model, ctx)

        if p.latent == "sample":
            z = model.encode_image(reference, sample=True, generator=gen, height=height, width=width)
        else:
            z = model.encode_image(reference, height=height, width=width)
        z = z.detach().to(device, torch.float32)
        e_p = model.encode_prompt(prompt.text).float()
        y_init = self.initial_embedding(model, prompt, gen).detach()
        y = y_init.clone().requires_grad_(True)
        opt = torch.optim.Adam([y], lr=p.lr)
        losses: list[float] = []
        t_draws: list[list[int]] = []
        B = p.batch

        from memobench.api import frozen_parameters

        with frozen_parameters(model.unet, model.text_encoder, model.vae), torch.enable_grad(), \
                ctx_task(ctx, f"DoRI {prompt.id}", p.steps) as advance:
            zb = z.expand(B, -1, -1, -1)
            for _ in range(p.steps):
                t = torch.randint(p.t_min, p.t_max + 1, (B,), generator=gen)
                eps = torch.randn((B, *z.shape[1:]), generator=gen, dtype=torch.float32).to(device)
                t = t.to(device)
                loss = diffusion_loss(model, zb, y, t, eps, p.objective)
                (grad,) = torch.autograd.grad(loss, [y])
                if not p.optimize_bos:
                    grad[:, 0] = 0
                y.grad = grad
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                t_draws.append([int(v) for v in t.tolist()])
                advance(1)

        y_adv = y.detach()
        trace = {
            "loss_curve": losses, "steps": p.steps, "lr": p.lr, "batch": B, "init": p.init,
            "init_prompt": p.init_prompt if p.init == "nonmem" else None, "seed": p.seed,
            "generator_seed": gseed, "generator": "torch.Generator (CPU), seeded from sha256(prompt sha256 | seed)",
            "timesteps": t_draws, "initial_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None, "optimize_bos": p.optimize_bos, "latent": p.latent,
            "y_adv_norm": float(y_adv.norm()), "y_adv_minus_prompt_norm": float((y_adv - e_p).norm()),
            "y_init_minus_prompt_norm": float((y_init - e_p).norm()),
            "y_adv_sha256": hashlib.sha256(y_adv.cpu().contiguous().numpy().tobytes()).hexdigest(),
            "precision": "fp32 embedding and loss; UNet in " + str(dtype).replace("torch.", ""),
            "latent_shape": list(z.shape),
        }
        return AttackOutput(Conditioning(y_adv, model.empty_embedding(), text=None), trace=trace,
                            tensors={"y_init": y_init.cpu()})


def ctx_task(ctx, description: str, total: int):
    """``ctx.task(...)`` when a context is given, else a no-op progress task."""
    if ctx is None:
        return contextlib.nullcontext(lambda n=1, **kw: None)
    return ctx.task(description, total, transient=True)


@hookimpl
def register_attacks(register):
    register(DoRIAttack)
