"""SAIL: sharpness-aware initialization for latent diffusion (choose x_T where the probability landscape is flat).

Paper: Jeon, Kim, No, "Understanding and Mitigating Memorization in Generative Models via Sharpness of Probability
Landscapes", ICML 2025 (PMLR 267:27091–27112), arXiv 2412.04140: memorization as sharpness of log p (large negative
Hessian eigenvalues), the sharpness measure at the start of sampling, SAIL (Algorithm 2) and its hyperparameters
(Appendix D). Reference code ``Dongjae0324/sharpness_memorization_diffusion`` (f4ee4b8): ``local_model/pipe.py``
(the ``exp_type == 'miti'`` block), ``mitigate_mem.py`` (argument defaults = Appendix D),
``examples/inference_time_mitigation.ipynb``.

Registers the mitigation ``sail`` (``kind = "inference"``). It returns the chosen initial latents in
``Conditioning.latents`` (same shape and seed order as received); sampling is then plain CFG.

Idea: with s_c, s_u the conditional and unconditional scores at x_T, the guidance ε̃(x) = ε_θ(x, T, y) − ε_θ(x, T, ∅)
(∝ s_u − s_c) and its change along itself measure the sharpness of the conditional density at the start of
sampling; memorized generations start where it is large. SAIL optimises x_T so that the guidance evaluated a small
step along itself is small, while a regulariser keeps x_T's norm (its "Gaussianity") in check.

Algorithm (per candidate latent x; norms per sample over C×h×w; t = t_0, the first denoising timestep)::

    d̂(x)   = ε̃(x) / ‖ε̃(x)‖₂                                   (unit direction of the guidance)
    L(x)   = ‖ε̃(x + r·d̂(x))‖₂ + λ·‖x‖₂                          (the sharpness proxy + the regulariser)

1. Candidates: the prompt's G seeded latents (the runner passes all of its seeds); Adam (lr = ``lr`` 0.05,
   ``--miti_lr``; betas (0.9, 0.999), no weight decay) on Σ_g L(x_g), gradients through both UNet calls
   (d̂ is not detached, as in the reference).
2. Up to ``max_steps`` (10, ``--miti_max_steps``) steps: evaluate L; every candidate with L ≤ ℓ_thres
   (``threshold`` 8.2, ``--miti_thres`` = ℓ_thres of Algorithm 2) is accepted *as it is at that evaluation* and
   leaves the optimisation (the reference stores its snapshot; its further updates are unused); then one Adam step
   for the others.
3. A round that leaves slots unfilled starts a new round for them from fresh N(0, I) candidates
   (max(``budget``, unfilled) of them; ``--miti_budget`` 8), accepted ones filling the free slots in order; after
   every 3 failed rounds ℓ_thres += 0.1 (the reference's ``counter`` rule).
4. Defaults of the reference for SD v1.4: r = 1 (the direction is a unit vector), λ = ``reg_weight`` 0.05
   (``loss = hvp_loss + 0.05 * gaussianity``; 0.01 for SD 2), ℓ_thres 8.2, lr 0.05, 10 steps, budget 8.

The scale of the norms (``loss_norm``). The reference's numbers are for SD v1.4 at 512 px: one latent of
4×64×64 = 16,384 elements (``reference_latent``), where ‖x_T‖ ≈ 128, so λ·‖x‖ ≈ 6.4 of the 8.2 threshold. Every term
of L is a norm that grows with √(elements), and r is a radius. ``loss_norm = "reference"`` (default) puts them on
the reference's size: L is multiplied by √(N_ref/N) and the step along d̂ has length r·√(N/N_ref) (N = C·h·w of the
run's latent), so that the same per-element values give the reference's L and the same per-element step. At the
reference's size the factors are exactly 1. ``loss_norm = "raw"``: the numbers as given. The learning rate is per
element (Adam) and is not rescaled.

memobench choices (recorded in ``Conditioning.trace["sail"]``):

* Round 0 starts from the run's seeded latents, one per slot (so a seed whose own latent is accepted keeps it,
  optimised); the reference ignores the pipeline's latents and draws its candidates after ``torch.manual_seed(42)``
  for every prompt. Later rounds draw from a CPU generator seeded with ``resample_seed`` + the round (deterministic;
  the reference re-draws from the *same* seed for 3 rounds, so a second round re-adds the same accepted latents as
  duplicates, and then picks a random new seed).
* ``direction_at``: the reference computes d̂ once per round from a copy of the candidates taken before the first
  update (``lat_single`` is built outside the step loop), so later steps perturb along the round's *initial*
  direction while the gradient still flows through it as if at x. ``"current"`` (default) evaluates d̂ at the
  current x, the objective as written; ``"initial"`` reproduces the reference's code (value at the round's start,
  gradient through the identity).
* ``max_rounds`` (30: ℓ_thres up to +1.0) caps the reference's unbounded loop; slots still free then get the
  lowest-L iterate of their own round-0 candidate (recorded as not accepted).
* ε for v-prediction models: :meth:`memobench.model.DiffusionModel.eps` (the reference's SD 2 branch converts
  the v output with its own formula, equal up to the factor 1/√(1−ᾱ_T) ≈ 1.002 in the difference).
* fp32 optimisation under ``torch.enable_grad()`` with the model's parameters frozen, gradients by
  ``torch.autograd.grad`` w.r.t. the latents only (the reference: bf16, ``loss.backward()``).

Detector ``sail`` (:class:`SharpnessDetector`, the detection track of ``memobench detect``): the paper's sharpness
measure at the start of sampling (§4: memorized generations sit in sharp regions of the conditional log-density;
the measure is the Hessian-weighted score difference, computed with one Jacobian–vector product; Table 1 reports it
with n generations and the first "steps" sampling steps). Reference files: ``detect_mem.py`` (driver and argument
defaults), ``local_model/pipe.py`` (the ``exp_type == 'det'`` block), ``detect_eval.py`` (mean over the steps, AUC,
TPR@1%/3%FPR), README "Memorization Detection" (``--gen_num 4``). With s(x) = −ε_θ(x, t, e)/σ_t the score
(σ_t = √(1 − ᾱ_t)), s̃ = s_c − s_u the score difference and H = ∂s/∂x its Jacobian (the Hessian of log p_t)::

    v     = s̃(x_t) = −(ε_θ(x_t, t, e_p) − ε_θ(x_t, t, e_∅)) / σ_t
    S^(g) = ‖ (H_c(x_t) − H_u(x_t)) v ‖₂                       (per image, over C×h×w)
    score = 1/|S| Σ_{t∈S} 1/n Σ_g S^(g)                          (S = the first ``score_steps`` sampling steps)

(H_c − H_u) v is one forward-mode JVP of x ↦ [s_u(x), s_c(x)] along v (``torch.func.jvp``, as the reference; the
attention runs with PyTorch's math SDPA kernel there, which supports forward-mode AD — the reference disables the
flash and memory-efficient kernels for the same reason). Higher = sharper = more likely memorized (the reference
flips the labels when AUC < 0.5; the paper's direction is memorized = larger, which this detector keeps fixed).

Defaults and where each comes from:

* ``samples`` 4 (``--gen_num 4``, README), ``score_steps`` 1 (``--hvp_sampling_num`` default 1: x_T at the first
  timestep only), ``seed`` 42 (``--gen_seed``: ``set_seed(42)`` before every prompt, "invariant to prompt ordering").
  [CHOICE] The ``samples`` initial latents are one CPU draw of (samples, C, h, w) after ``manual_seed(seed)``, times
  the scheduler's initial sigma (the reference draws on the GPU with the global generator, which a CPU cannot
  reproduce), the same for every prompt.
* ``num_inference_steps`` 0 / ``guidance_scale`` −1 / ``height`` / ``width`` 0: the model's generation defaults
  (reference: 50 DDIM steps, CFG 7.5, 512 px). Only the first timestep matters for ``score_steps`` 1; later steps
  follow the CFG trajectory in ε (``step_eps``).
* [CHOICE] ε for v-prediction models: the model's own conversion (:meth:`memobench.api.DiffusionModel.eps`), so
  s = −ε/σ_t for every model. The reference's SD 2 branch builds its "score" from the v output with its own formula
  ((√ᾱ_t·v − x)/(1−ᾱ_t)); that branch is not reproduced.
* The model's dtype (fp32 on the CPU), norms in fp32; the reference runs bf16 with the JVP under fp32 autocast.
"""

from __future__ import annotations

from dataclasses import dataclass

from memobench.api import (
    BadInput,
    Conditioning,
    Detector,
    Mitigation,
    hookimpl,
    latent_elements,
    param,
    reference_scale,
)

REF_LATENT = "mitigation 'sail' parameter reference_latent"


def norm_factor(numel_per_sample: int, loss_norm: str, reference_latent: str) -> float:
    """√(N_ref / N) for a per-sample norm over N elements (1.0 for ``"raw"`` or N = N_ref)."""
    if loss_norm == "raw":
        return 1.0
    return reference_scale(numel_per_sample, latent_elements(reference_latent, REF_LATENT))


def _norm(v):
    return v.flatten(1).norm(p=2, dim=1)


def sail_loss(model, x, t, e_u, e_c, radius: float, reg_weight: float, factor: float, x_dir=None):
    """Per sample: factor·(‖ε̃(x + radius·d̂)‖ + reg_weight·‖x‖) with d̂ = ε̃(x_dir)/‖ε̃(x_dir)‖ (x_dir = x unless
    given: the reference's stale direction)."""
    d = model.eps_difference(x if x_dir is None else x_dir, t, e_u, e_c)
    d_hat = d / _norm(d).view(-1, *([1] * (x.dim() - 1)))
    sharp = _norm(model.eps_difference(x + radius * d_hat, t, e_u, e_c))
    return factor * (sharp + reg_weight * _norm(x))


class SAIL(Mitigation):
    """Jeon et al. (ICML 2025): SAIL, initial latents with a small sharpness proxy ‖ε̃(x + d̂)‖ + λ‖x‖."""

    name = "sail"
    version = "1"
    kind = "inference"

    @dataclass
    class Params:
        threshold: float = param(8.2, "ℓ_thres of Algorithm 2 on the reference scale (--miti_thres)")
        lr: float = param(0.05, "Adam learning rate on the latents (--miti_lr)")
        max_steps: int = param(10, "Adam steps per round (--miti_max_steps)")
        reg_weight: float = param(0.05, "λ of the ‖x‖ regulariser (reference: 0.05 for SD v1, 0.01 for SD 2)")
        radius: float = param(1.0, "length r of the step along d̂ on the reference scale (reference: unit vector)")
        budget: int = param(8, "fresh candidates per later round, at least the free slots (--miti_budget)")
        threshold_step: float = param(0.1, "ℓ_thres increase after every 3 failed rounds (reference)")
        max_rounds: int = param(30, "memobench cap on rounds; then the best round-0 iterate (docstring)")
        resample_seed: int = param(42, "seed of the later rounds' candidates (+ round index); reference --gen_seed")
        direction_at: str = param("current", "'current': d̂ at x (the objective) | 'initial': the reference code's")
        loss_norm: str = param("reference", "'reference': norms on reference_latent's size (docstring) | 'raw'")
        reference_latent: str = param("4x64x64", "C×h×w of the reference's latent: SD v1.4 at 512×512")

        def __post_init__(self):
            what = "mitigation 'sail' parameter"
            for k in ("lr", "radius"):
                if getattr(self, k) <= 0:
                    raise BadInput(f"{what} {k}={getattr(self, k)}: must be > 0")
            for k in ("reg_weight", "threshold_step"):
                if getattr(self, k) < 0:
                    raise BadInput(f"{what} {k}={getattr(self, k)}: must be ≥ 0")
            for k in ("max_steps", "budget", "max_rounds"):
                if getattr(self, k) < 1:
                    raise BadInput(f"{what} {k}={getattr(self, k)}: must be ≥ 1")
            if self.direction_at not in ("current", "initial"):
                raise BadInput(f"{what} direction_at={self.direction_at!r}: must be 'current' or 'initial'")
            if self.loss_norm not in ("reference", "raw"):
                raise BadInput(f"{what} loss_norm={self.loss_norm!r}: must be 'reference' or 'raw'")
            latent_elements(self.reference_latent, REF_LATENT)

    def __init__(self, params=None, **overrides):
        super().__init__(params, **overrides)
        self._summaries: dict[str, dict] = {}

    def _round(self, model, cand, t0, e_u, e_c, thres, factor, radius):
        """One round: Adam on the candidates; returns [(candidate index, step, loss, latent)] of the accepted ones
        in acceptance order, per candidate the lowest loss and its latent, and the first evaluation's losses."""
        import torch

        p = self.params
        n = cand.shape[0]
        x = cand.clone().requires_grad_(True)
        x_start = cand.clone()
        opt = torch.optim.Adam([x], lr=p.lr)
        accepted, done = [], torch.zeros(n, dtype=torch.bool)
        best = [(float("inf"), None)] * n
        first: list = []
        for step in range(p.max_steps):
            active = torch.nonzero(~done).flatten()
            xa = x[active]
            x_dir = None
            if p.direction_at == "initial":
                x_dir = x_start[active] + (xa - xa.detach())  # the round's initial value, gradient as through x
            loss = sail_loss(model, xa, t0, e_u, e_c, radius, p.reg_weight, factor, x_dir)
            vals = loss.detach().tolist()
            if step == 0:
                first = list(vals)
            keep = []
            for k, i in enumerate(active.tolist()):
                if vals[k] < best[i][0]:
                    best[i] = (vals[k], x[i].detach().clone())
                if vals[k] <= thres:
                    accepted.append((i, step, vals[k], x[i].detach().clone()))
                    done[i] = True
                else:
                    keep.append(k)
            if not keep:
                break
            (g,) = torch.autograd.grad(loss[keep].sum(), [x])
            x.grad = g  # zero for the accepted ones: Adam's moments stay as they were, their values are kept
            opt.step()
            opt.zero_grad(set_to_none=True)
        return accepted, best, first

    def condition(self, model, prompt, cond, latents, ctx):
        import torch

        from memobench.api import frozen_parameters

        p = self.params
        gen = dict(ctx.generation or {}) if ctx is not None else {}
        n_steps = int(gen.get("num_inference_steps", 50))
        t0 = model.timesteps(n_steps)[0]
        e_u = cond.negative_prompt_embeds.detach().to(model.device)
        e_c = cond.prompt_embeds.detach().to(model.device)
        if e_u.shape[0] != 1 or e_c.shape[0] != 1:
            raise ValueError("sail: expects one conditional and one unconditional embedding (1×77×d each)")
        x0 = latents.detach().to(model.device).float()
        G = x0.shape[0]
        factor = norm_factor(x0[0].numel(), p.loss_norm, p.reference_latent)
        radius = p.radius / factor
        slots: list = [None] * G
        info = [{"round": None, "step": None, "loss": None} for _ in range(G)]
        thres = p.threshold
        rounds, failed, best0, first0 = 0, 0, None, None
        sigma = float(model.scheduler.init_noise_sigma)
        with frozen_parameters(model.unet, model.text_encoder, model.vae), torch.enable_grad():
            while rounds < p.max_rounds and any(s is None for s in slots):
                free = [g for g in range(G) if slots[g] is None]
                if rounds == 0:
                    cand = x0
                else:
                    gen_ = torch.Generator().manual_seed(int(p.resample_seed) + rounds)
                    cand = torch.randn((max(p.budget, len(free)), *x0.shape[1:]), generator=gen_) * sigma
                    cand = cand.to(x0.device)
                accepted, best, first = self._round(model, cand, t0, e_u, e_c, thres, factor, radius)
                if rounds == 0:
                    best0, first0 = best, first
                    for i, step, val, lat in accepted:  # each seed keeps its own accepted latent
                        slots[i] = lat
                        info[i] = {"round": 0, "step": step, "loss": val}
                else:
                    for (i, step, val, lat), g in zip(accepted, free):
                        slots[g] = lat
                        info[g] = {"round": rounds, "step": step, "loss": val}
                rounds += 1
                if any(s is None for s in slots):
                    failed += 1
                    if failed % 3 == 0:
                        thres += p.threshold_step
        for g in range(G):
            if slots[g] is None:  # the cap: the lowest-loss iterate of its own round-0 candidate
                slots[g] = best0[g][1]
                info[g] = {"round": None, "step": None, "loss": best0[g][0]}
        x = torch.stack(slots).to(latents.device)
        accepted_n = sum(i["round"] is not None for i in info)
        rec = {"mitigation": "sail", "timestep": int(t0), "rounds": rounds, "final_threshold": thres,
               "threshold": p.threshold, "accepted": accepted_n, "per_seed": info, "norm_factor": factor,
               "radius_applied": radius, "direction_at": p.direction_at, "latent_shape": list(x0.shape),
               "kept_own_seed": sum(i["round"] == 0 for i in info),
               "initial_loss": first0,
               "latent_norm": _norm(x).tolist()}
        self._summaries[prompt.id] = {"rounds": rounds, "accepted": accepted_n, "final_threshold": thres,
                                      "kept_own_seed": rec["kept_own_seed"]}
        return Conditioning(cond.prompt_embeds, cond.negative_prompt_embeds, text=cond.text,
                            trace={**(cond.trace or {}), "sail": rec}, latents=x.to(latents.dtype))

    def report(self) -> dict:
        """Per prompt: rounds run, latents accepted, the final threshold, how many seeds kept their own latent."""
        return {"prompts": dict(self._summaries)}


# ---------------------------------------------------------------------------------------------- detection
def sharpness(model, x, t, e_u, e_c):
    """Per image ‖(H_c − H_u) s̃‖₂ at (x, t) (the detection measure; x: G×C×h×w, embeddings 1×L×d), with ε_u and
    ε_c − ε_u there (G×C×h×w, fp32) for the next sampling step."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    G = x.shape[0]
    sigma = float((1 - model.alphas_cumprod()[int(t)]).sqrt())
    xin = model.scheduler.scale_model_input(x, t)
    emb = torch.cat([e_u.expand(G, -1, -1), e_c.expand(G, -1, -1)]).to(model.dtype)

    def scores(z):  # s(z) = −ε(z)/σ for both halves: the unconditional first
        return -model.eps(torch.cat([z, z]), t, emb) / sigma

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        s_u, s_c = scores(xin).chunk(2)
        v = s_c - s_u
        _, jv = torch.func.jvp(scores, (xin,), (v,))
    h_u, h_c = jv.float().chunk(2)
    return (h_c - h_u).flatten(1).norm(dim=1), (-sigma * s_u).float(), (-sigma * v).float()


class SharpnessDetector(Detector):
    """Jeon et al. (ICML 2025): the sharpness ‖(H_c − H_u)(s_c − s_u)‖ at the start of sampling (higher = memorized)."""

    name = "sail"
    version = "1"
    statistic = "‖(H_c − H_u) s̃‖₂ at x_T, t_0 (JVP of the score difference), mean over n = 4 latents"

    @dataclass
    class Params:
        samples: int = param(4, "n: initial latents per prompt (--gen_num 4, README)")
        seed: int = param(42, "seed of the one CPU draw of the latents (--gen_seed 42)")
        score_steps: int = param(1, "the first N sampling steps enter the mean (--hvp_sampling_num 1)")
        num_inference_steps: int = param(0, "0 = the model's default (reference: 50 DDIM steps)")
        guidance_scale: float = param(-1.0, "CFG of the trajectory (score_steps > 1); < 0 = the model's default")
        height: int = param(0, "0 = the model's default")
        width: int = param(0, "0 = the model's default")

        def __post_init__(self):
            what = "detector 'sail' parameter"
            if self.samples < 1 or self.score_steps < 1:
                raise BadInput(f"{what} samples, score_steps: at least 1 (got {self.samples}, {self.score_steps})")
            if self.seed < 0 or min(self.num_inference_steps, self.height, self.width) < 0:
                raise BadInput(f"{what} seed, num_inference_steps, height, width: ≥ 0")

    def resolved(self, generation: dict) -> "SharpnessDetector":
        out = self.with_generation(generation)
        if out.params.score_steps > out.params.num_inference_steps:
            raise BadInput(f"detector 'sail' parameter score_steps={out.params.score_steps}: exceeds the "
                           f"{out.params.num_inference_steps} denoising steps")
        return out

    def initial_latents(self, model):
        p = self.params
        return model.joint_latents(p.samples, p.seed, p.height or None, p.width or None)

    def score(self, model, text: str) -> dict:
        import torch

        p = self.params
        if p.num_inference_steps == 0 or p.guidance_scale < 0:
            raise ValueError("detector 'sail': call resolved(generation) first (steps/guidance not set)")
        e_c, e_u = model.encode_prompt(text), model.empty_embedding()
        x = self.initial_latents(model)
        per_step = []
        for t in model.timesteps(p.num_inference_steps)[: p.score_steps]:
            val, eu, d = sharpness(model, x, t, e_u, e_c)
            per_step.append(val)
            if len(per_step) < p.score_steps:  # the CFG step in ε to the next scored timestep
                with torch.no_grad():
                    x = model.step_eps((eu + p.guidance_scale * d).to(x.dtype), t, x)
        per = torch.stack(per_step)  # steps × n
        return {"score": float(per.mean()), "per_step": per.mean(dim=1).tolist(),
                "per_image": per.mean(dim=0).tolist()}


@hookimpl
def register_detectors(register):
    register(SharpnessDetector)


@hookimpl
def register_mitigations(register):
    register(SAIL)
