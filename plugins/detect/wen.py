"""Wen et al.: detection by the magnitude of the text-conditional noise prediction, and token-wise significance.

Paper: Wen, Liu, Chen, Lyu, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models", ICLR 2024
(oral), arXiv 2407.21720: detection by the text-conditional noise magnitude and its explanation by token-wise
significance (the paper's detection and "explaining memorization" parts; the mitigation of the same paper is
``memobench_plugins.wen``). Reference code ``YuxinWenRick/diffusion_memorization`` (c8fe471):
``local_sd_pipeline.py`` (``__call__(track_noise_norm=True)``, ``get_text_cond_grad``), ``detect_mem.py``,
``examples/det_mem_viz.ipynb``, ``examples/token_wise_significance.ipynb``. memobench spec: METHODS §6.1 (the
equation below), §6.3 (evaluation, :mod:`.roc`), §1.2 preset ``wen2024``.

Detection statistic (METHODS §6.1)::

    d(p) = 1/|S| · Σ_{t ∈ S} 1/G · Σ_g ‖ ε_θ(x_t^(g), t, e_p) − ε_θ(x_t^(g), t, e_∅) ‖₂

along the guided DDIM trajectory x_t^(g) of generation g (CFG weight w, the same loop as
``StableDiffusionPipeline.__call__``); the norm is over one image's C×h×w tensor; S = the first ``score_steps``
sampling steps (0 = all, as the notebook: all 50; the paper's Table 1 also reports the first step and the first 10).
Higher = more likely memorized. :class:`WenDetector` registers it as the detector ``wen``.

Token-wise significance (METHODS §6.1, reference ``get_text_cond_grad``): at every step s ∈ S, with the latents of
the trajectory held fixed, L_s(e) = ‖ε_θ(x_s, s, e) − ε_θ(x_s, s, e_∅)‖₂ as **one** norm over the whole G×C×h×w
tensor (the reference's ``torch.norm(noise_pred_text, p=2)``); the significance of token position k is
``mean_{s∈S} ‖∂L_s/∂e[k]‖₂`` (norm over the embedding dimension). Reported for the prompt's own tokens only: BOS,
EOS and padding positions are excluded (the reference slices ``token_grads[1:1+len(prompt_tokens)]``).
METHODS' wording "averaged over generations and steps" would instead average per-image gradient norms; that
variant is ``significance="per_image"`` (mean over g of ‖∂‖δ_g‖/∂e[k]‖). The default follows the reference code
(METHODS §0.2). Both are computed with one backward pass per step: each image gets its own copy of the embedding as
a leaf, so per-image gradients are separate rows and the gradient w.r.t. the shared embedding is their sum.

What e[k] is (``attribution``): the reference differentiates w.r.t. the text encoder's *output* row k (the
conditioning the UNet reads), ``attribution="prompt_embeds"``, the default. Through a causal text encoder (CLIP's)
row k also carries every earlier word, so a function word after the distinctive ones can take the credit; that is
what the embedded ``tiny`` model (a frozen, randomly initialised CLIP text encoder) shows on its memorized prompts.
[CHOICE] ``attribution="token_embeds"`` differentiates w.r.t. the encoder's *input* token embeddings instead (the
rows of ``text_encoder.get_input_embeddings()`` for the prompt's ids), which credits each word for every row it
influences: the word a prompt author would edit. Same loss, same norms, same exclusions; the trajectory is unchanged
(the conditioning keeps its value, only the gradient path differs).

memobench choices (each a ``Params`` field, recorded in every result and calibration):

* Seeds: one CPU ``torch.Generator().manual_seed(s)`` per generation (memobench's native rule), default seeds 0-3,
  i.e. G = 4 as the notebook. The reference seeds a global RNG with ``i + gen_seed`` (prompt position); memobench
  uses the same seeds for every prompt.
* ``num_inference_steps`` (0), ``guidance_scale`` (−1), ``height``/``width`` (0): the model plugin's generation
  defaults (SD-1.4 plugins: DDIM 50, w = 7 from the ``nemo2024`` preset; ``wen2024`` used w = 7.5 — pass
  ``guidance_scale=7.5`` to reproduce it; the embedded ``tiny`` model: 50 steps, w = 3). With w ≤ 1 the trajectory
  follows the conditional prediction only (diffusers' rule) while ε(x, e_∅) is still evaluated for the statistic.
* Precision: the model's dtype for the UNet (the reference ran fp16); the difference and norms in float32
  (float64 when the model is float64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memobench.api import Detector, param

SIGNIFICANCE_MODES = ("reference", "per_image")
ATTRIBUTIONS = ("prompt_embeds", "token_embeds")


def _wide(x):
    """float32, or float64 when already float64: norms and gradients are taken at least in float32."""
    import torch

    return x if x.dtype == torch.float64 else x.float()


@dataclass
class WenTrace:
    """Result of :func:`text_noise_trajectory`."""

    statistic: float  # d(p)
    per_step: list[float]  # 1/G Σ_g ‖δ_g‖ at each scored step
    per_image: list[float]  # 1/|S| Σ_s ‖δ_g‖ for each generation g
    significance: Any = None  # torch.Tensor (L,) per token position (all positions), or None
    significance_per_step: Any = None  # torch.Tensor (|S|, L) or None
    latents: Any = None  # final latents (G×C×h×w) when run to the end, else None


def text_noise_trajectory(model, prompt_embeds, negative_embeds, latents, num_inference_steps: int,
                          guidance_scale: float, score_steps: int = 0, significance: str | None = None,
                          full: bool = False, token_ids=None) -> WenTrace:
    """Run the guided DDIM trajectory of G initial ``latents`` (G×C×h×w, already scaled by ``init_noise_sigma``)
    conditioned on ``prompt_embeds`` (1×L×d) and record d(p) over the first ``score_steps`` steps (0 = all).

    ``significance`` ("reference" | "per_image" | None) also returns the token-wise significance (see the module
    docstring). ``full=True`` continues to the last step and returns the final latents (for decoding images); the
    trajectory then equals :meth:`memobench.model.DiffusionModel.denoise`'s for w > 1 (same batch, same ops).
    ``token_ids`` (1×L, the ids ``prompt_embeds`` was encoded from) switches the significance to the text encoder's
    input token embeddings (``attribution="token_embeds"``); None = w.r.t. ``prompt_embeds`` rows (reference).
    """
    import torch

    from memobench.api import frozen_parameters

    if significance not in (None, *SIGNIFICANCE_MODES):
        raise ValueError(f"detector 'wen': significance must be one of {SIGNIFICANCE_MODES}, got {significance!r}")
    if prompt_embeds.shape[0] != 1 or negative_embeds.shape[0] != 1:
        raise ValueError("detector 'wen': expects one conditional and one unconditional embedding (1×L×d each)")
    dtype, device = model.dtype, model.device
    timesteps = model.timesteps(num_inference_steps)
    n_steps = len(timesteps)
    n_score = n_steps if score_steps <= 0 else int(score_steps)
    if n_score > n_steps:
        raise ValueError(f"detector 'wen': score_steps {score_steps} exceeds the {n_steps} denoising steps")
    stop = n_steps if full else n_score
    sched = model.scheduler
    x = latents.detach().to(device, dtype)
    G = x.shape[0]
    e_p = prompt_embeds.detach().to(device, dtype)
    e_u = negative_embeds.detach().to(device, dtype).expand(G, -1, -1)
    step_norms: list = []
    step_sig: list = []
    words = None if token_ids is None or significance is None else _token_embeddings(model, token_ids)
    with frozen_parameters(model.unet, model.text_encoder if words is not None else None):
        for i, t in enumerate(timesteps[:stop]):
            scored = i < n_score
            x_in = sched.scale_model_input(torch.cat([x, x]), t)
            if scored and significance is not None:
                with torch.enable_grad():
                    if words is None:
                        leaf = e_p.expand(G, -1, -1).clone().requires_grad_(True)  # one row per generation
                        cond = leaf
                    else:  # value = e_p exactly; the gradient flows to the input token embeddings
                        leaf = words.expand(G, -1, -1).clone().requires_grad_(True)
                        e_tok = _encode_from_token_embeddings(model, token_ids, leaf)
                        cond = e_p.expand(G, -1, -1) + (e_tok - e_tok.detach())
                    eu, ec = model.eps(x_in, t, torch.cat([e_u, cond])).chunk(2)
                    diff = _wide(ec) - _wide(eu)
                    norms = diff.flatten(1).norm(p=2, dim=1)
                    loss = diff.flatten().norm(p=2) if significance == "reference" else norms.sum()
                    (grad,) = torch.autograd.grad(loss, [leaf])
                grad = _wide(grad)
                if significance == "reference":  # gradient w.r.t. the shared embedding = sum of the rows
                    step_sig.append(grad.sum(0).norm(p=2, dim=-1))
                else:
                    step_sig.append(grad.norm(p=2, dim=-1).mean(0))
                eu, ec, norms = eu.detach(), ec.detach(), norms.detach()
            else:
                with torch.no_grad():
                    eu, ec = model.eps(x_in, t, torch.cat([e_u, e_p.expand(G, -1, -1)])).chunk(2)
                    norms = (_wide(ec) - _wide(eu)).flatten(1).norm(p=2, dim=1) if scored else None
            if scored:
                step_norms.append(norms)
            with torch.no_grad():
                eps = eu + guidance_scale * (ec - eu) if guidance_scale > 1.0 else ec
                x = model.step_eps(eps, t, x)
    per = torch.stack(step_norms)  # |S|×G
    sig_steps = torch.stack(step_sig) if step_sig else None
    return WenTrace(
        statistic=float(per.mean()), per_step=[float(v) for v in per.mean(1)],
        per_image=[float(v) for v in per.mean(0)],
        significance=sig_steps.mean(0).cpu() if sig_steps is not None else None,
        significance_per_step=sig_steps.cpu() if sig_steps is not None else None,
        latents=x if full else None)


def _token_embeddings(model, token_ids):
    """The prompt's input token embeddings (1×L×d_tok): the text encoder's ``get_input_embeddings()`` of its ids."""
    import torch

    with torch.no_grad():
        return model.text_encoder.get_input_embeddings()(token_ids.to(model.device)).detach()


def _encode_from_token_embeddings(model, token_ids, leaf):
    """Run the text encoder (frozen by the caller) with its token-embedding layer's output replaced by ``leaf``
    (G×L×d_tok, a forward hook on ``get_input_embeddings()``): the conditioning as a differentiable function of the
    token embeddings."""
    te = model.text_encoder
    ids = token_ids.to(model.device).expand(leaf.shape[0], -1)
    handle = te.get_input_embeddings().register_forward_hook(lambda mod, inp, out: leaf.to(out.dtype))
    try:
        return te(ids)[0].to(model.dtype)
    finally:
        handle.remove()


def prompt_token_positions(tokenizer, ids) -> list[tuple[int, int]]:
    """(position, token id) of the prompt's own tokens in a padded id row (BOS, EOS and padding excluded).

    The prompt tokens are the positions after the leading BOS up to the first EOS; any special id among them (none
    for CLIP's tokenizer) is skipped too."""
    ids = [int(i) for i in ids]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special = set(tokenizer.all_special_ids)
    start = 1 if ids and ids[0] == bos else 0
    end = ids.index(eos, start) if eos in ids[start:] else len(ids)
    return [(k, ids[k]) for k in range(start, end) if ids[k] not in special]


class WenDetector(Detector):
    """Wen et al. (ICLR 2024): d(p), the mean text-conditional noise magnitude along the sampling trajectory."""

    name = "wen"
    version = "1"
    statistic = "d(p) = mean over steps and generations of ‖ε(x_t, e_p) − ε(x_t, e_∅)‖₂"
    explanation_params = ("significance", "attribution")

    @dataclass
    class Params:
        seeds: tuple = param((0, 1, 2, 3), "G = 4 generations (notebook); one CPU generator per image")
        score_steps: int = param(0, "|S|: the first N sampling steps enter d(p); 0 = all (notebook); Table 1: 1, 10")
        num_inference_steps: int = param(0, "0 = the model's generation default (DDIM 50 for SD-1.4 and tiny)")
        guidance_scale: float = param(-1.0, "< 0 = the model's default (wen2024 on SD-1.4: 7.5)")
        height: int = param(0, "0 = the model's default")
        width: int = param(0, "0 = the model's default")
        significance: str = param("reference", "'reference' (get_text_cond_grad) | 'per_image' (METHODS' wording)")
        attribution: str = param("prompt_embeds", "e[k]: 'prompt_embeds' (reference: encoder output) | 'token_embeds'")

        def __post_init__(self):
            self.seeds = tuple(int(s) for s in self.seeds)
            if not self.seeds or min(self.seeds) < 0:
                raise ValueError("detector 'wen' parameter seeds: at least one non-negative seed")
            if len(set(self.seeds)) != len(self.seeds):
                raise ValueError("detector 'wen' parameter seeds: duplicate seeds")
            if self.score_steps < 0 or self.num_inference_steps < 0 or self.height < 0 or self.width < 0:
                raise ValueError("detector 'wen' parameters score_steps, num_inference_steps, height, width: ≥ 0")
            if self.significance not in SIGNIFICANCE_MODES:
                raise ValueError(f"detector 'wen' parameter significance: {self.significance!r} not in "
                                 f"{SIGNIFICANCE_MODES}")
            if self.attribution not in ATTRIBUTIONS:
                raise ValueError(f"detector 'wen' parameter attribution: {self.attribution!r} not in {ATTRIBUTIONS}")

    def resolved(self, generation: dict) -> "WenDetector":
        out = self.with_generation(generation)
        if out.params.score_steps > out.params.num_inference_steps:
            raise ValueError(f"detector 'wen' parameter score_steps: {out.params.score_steps} exceeds "
                             f"num_inference_steps {out.params.num_inference_steps}")
        return out

    def initial_latents(self, model):
        p = self.params
        return model.initial_latents(list(p.seeds), p.height or None, p.width or None)

    def trace(self, model, prompt_embeds, significance: bool = False, full: bool = False,
              token_ids=None) -> WenTrace:
        """``token_ids`` (1×L): the ids ``prompt_embeds`` was encoded from; required for the significance when
        ``attribution="token_embeds"``."""
        p = self.params
        if p.num_inference_steps == 0 or p.guidance_scale < 0:
            raise ValueError("detector 'wen': call resolved(generation) first (steps/guidance not set)")
        tok = None
        if significance and p.attribution == "token_embeds":
            if token_ids is None:
                raise ValueError("detector 'wen': attribution 'token_embeds' needs the prompt's token ids")
            tok = token_ids
        return text_noise_trajectory(model, prompt_embeds, model.empty_embedding(), self.initial_latents(model),
                                     p.num_inference_steps, p.guidance_scale, p.score_steps,
                                     p.significance if significance else None, full, tok)

    def score(self, model, text: str) -> dict:
        tr = self.trace(model, model.encode_prompt(text))
        return {"score": tr.statistic, "per_step": tr.per_step, "per_image": tr.per_image}
