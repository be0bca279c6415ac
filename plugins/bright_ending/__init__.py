"""Bright Ending (BE): Wen et al.'s inference-time mitigation with the noise magnitude localized by the end token's
cross-attention at the last denoising step.

Paper: Chen, Liu, Shah, Xu, "Exploring Local Memorization in Diffusion Models via Bright Ending Attention", ICLR 2025
(spotlight; arXiv 2410.21665), §4 (the "bright ending" anomaly: at the final denoising step, memorized image patches
attend far more to the end token than non-memorized ones, so that attention map locates the locally memorized
region) and §5.1 (integration into Wen et al.'s detection and mitigation: "element-wise multiplication of the
magnitude by our memorization mask extracted via BE"). Reference code ``chenchen-usyd/BE-PRSS`` (fb2e942):
``controller.py`` (``AttentionStore``), ``detect_mem.py`` (run ``baseline``: the unmitigated generation that stores
the attention), ``inference_mem.py`` (run ``ours_A``: the mask from that store), ``local_sd_pipeline.py``
(``aug_prompt`` with ``attn_mask``); README "Baseline + BE".

Built on ``wen``: the paper's mitigation *is* Wen et al.'s prompt-embedding optimisation (the reference's
``aug_prompt`` is Wen's with the objective masked), so this module imports :func:`memobench_plugins.wen.optimize_embedding`
and passes its own objective; everything else (AdamW, target step, stopping rule, BOS gradient, the threshold's
scale) is Wen's, documented in ``plugins/wen``.

Registers the mitigation ``bright_ending`` (``kind = "inference"``). For one prompt with G initial latents x_T^(g)
(all the run's seeds of the prompt, as the runner passes them) and n its token count (BOS + words + EOS, ≤ 77)::

    m^(g)[p] = 1/|L| Σ_{l∈L} 1/H Σ_h A_{l,h}^(g)(t_last)[p, n−1]          (BE mask: end token, last step)
    minimise over e*:   L(e*) = ‖ (ε_θ(x_{t_s}, t_s, e*) − ε_θ(x_{t_s}, t_s, e_∅)) ⊙ m ‖₂ / mean(m)

1. BE pass: the G latents are denoised from (e_p, e_∅) with the run's steps and guidance scale, no mitigation,
   under explicit cross-attention (:func:`memobench.api.cross_attention` with ``record``); at step ``mask_step``
   (−1: the last, ``AttentionStore``'s ``cur_step == 49`` of 50) the post-softmax probabilities of the layers L are
   kept: the conditional half of the batch, the column of the end token k_e = n − 1
   (``token_len - 1`` with ``token_len = min(len(tokenizer.encode(prompt)), 77)``).
2. Aggregation, as the reference: mean over the H heads (``view(-1, 8, …).mean(1)``), then over the layers L
   (``np.mean(attn_score, axis=0)``), reshaped to the latent grid → m of shape G×1×h×w, broadcast over the latent
   channels. L (``mask_layers = "down-full"``) is the down-block cross-attention layers at the latent's full
   resolution (the reference keeps ``down_cross`` maps with 64² pixels: ``down_blocks.0``'s two transformer blocks of
   SD v1.4 at 512 px; ``down_blocks.0``'s one block in the embedded ``tiny`` model). The mask is soft (the
   probabilities themselves, no threshold) and not normalised per image; the objective divides by its mean over all
   G·h·w entries (``torch.norm(noise_pred_text * attn_mask, p=2) / torch.mean(attn_mask)``), so a uniform mask gives
   Wen's loss exactly.
3. Wen's optimisation (``plugins/wen`` steps 1–2) with this objective: AdamW on e* at target step 0, stop when
   L × √(N_ref/N) ≤ ``target_loss`` (checked before the update), BOS gradient zeroed.
4. Generation uses ``prompt_embeds = e*`` with the same latents (the runner); the unconditional embedding stays e_∅.

Defaults and where each comes from (README "Baseline + BE" command and ``inference_mem.py`` argument defaults):

* ``target_loss`` 1 (``--optim_target_loss 1``), ``reference_images`` 1 (``--num_images_per_prompt 1``: the
  threshold is on the reference's norm over one image of 4×64×64, ``reference_latent``), ``target_step`` 0
  (``--optim_target_steps 0``), ``lr`` 0.05 and ``max_iters`` 10 (``--optim_lr``/``--optim_iters`` defaults),
  ``weight_decay`` 0.01 (``torch.optim.AdamW`` default, as constructed), BOS gradient zeroed, no proximity term
  (``optim_epsilon`` None).
* ``mask_step`` −1, ``mask_layers`` "down-full", heads averaged, the end token: ``controller.py`` and
  ``inference_mem.py`` as above.

Where the paper is unclear (parameters):

* ``mask_threshold`` (−1: the soft mask the reference code uses). The paper speaks of a "memorization mask" and a
  reviewer asked whether it is thresholded; the code never binarizes it for mitigation. τ ≥ 0 gives the binary mask
  m = 1[a ≥ τ · max over the image's pixels of a].
* ``mask_layers`` "full": every cross-attention layer at the latent's full resolution (down and up blocks), for
  models or resolutions where the reference's choice is ambiguous.
* The end token when the conditioning has no text (an attack's optimised embedding, e.g. DoRI): k_e from the target
  prompt's token count; the trace says which (``prompt_length_from``).

memobench choices (recorded in ``Conditioning.trace["bright_ending"]``): the BE pass runs in the model's dtype
without gradients; the reference computes its mask in a separate fp16 run of ``detect_mem.py`` with the same seeds
(the same x_T), which is what the BE pass reproduces in one run. The mask is fp32; its per-image mean, max and
sha256 are traced, together with Wen's loss curve.

Detector ``bright_ending`` (:class:`BrightEndingDetector`, the detection track of ``memobench detect``): §5.1's
integration of BE into Wen et al.'s detection — the text-conditional noise magnitude of every image, masked by that
image's BE map and normalised by the map's mean, so that a locally memorized region is not diluted by the rest of the
image. Reference files: ``detect_mem.py`` (two runs of the same prompts and seeds: ``--run_version baseline``
stores the BE maps, ``--run_version ours`` tracks the masked magnitude), ``local_sd_pipeline.py`` (``__call__`` with
``track_noise_norm`` and ``attn_mask``: ``text_noise_norm_masked``), ``controller.py`` (``AttentionStore``), README
"Detect memorization". Per image g with mask m^(g) (step 1 above, from the same trajectory) and δ_t^(g) =
ε_θ(x_t, t, e_p) − ε_θ(x_t, t, e_∅) along the guided trajectory::

    LD^(g)(t) = ‖ δ_t^(g) ⊙ m^(g) ‖₂ / mean(m^(g))                (norm over C×h×w, mean over h×w)
    score     = 1/|S| Σ_{t∈S} 1/G Σ_g LD^(g)(t)                     (S: the first ``score_steps`` steps; 0 = all)

Higher = more likely memorized. The mask does not change the trajectory (the reference's second run denoises the same
seeds with the same CFG and only multiplies the tracked difference), so one guided pass here records δ_t at the
scored steps and the attention at the mask step, and the score follows from both.

Defaults: ``seeds`` (0, 1, 2, 3) — [CHOICE] G = 4, ``detect_mem.py``'s ``--num_images_per_prompt`` default (the README
commands use 16; the reference seeds each prompt with its index, ``seed = i + gen_seed``, here the same seeds serve
every prompt as in ``wen``); ``score_steps`` 0 — [CHOICE] all steps, as the ``wen`` detector and Wen's notebook
aggregate (the reference stores every step's value and leaves the aggregation to the evaluation); the mask
parameters as the mitigation's (``mask_step`` −1, ``mask_layers`` "down-full", ``mask_threshold`` −1: soft);
``num_inference_steps`` / ``guidance_scale`` / ``height`` / ``width`` 0 / −1: the model's defaults (reference: 50 DDIM
steps, CFG 7.5, 512 px); p = 2 (``lp=2``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from memobench_plugins.wen import optimize_embedding, optimization_trace

from memobench.api import (BadInput, Conditioning, Detector, Guidance, Mitigation, hookimpl, latent_elements,
                           param)

MASK_LAYERS = ("down-full", "full")


def layer_selected(name: str, pixels: int, latent_pixels: int, mask_layers: str) -> bool:
    """Whether cross-attention layer ``name`` (``down_blocks.0.attentions.0.transformer_blocks.0.attn2``) with
    ``pixels`` query positions enters the BE mask."""
    if pixels != latent_pixels:
        return False
    return mask_layers == "full" or name.startswith("down_blocks")


def be_mask(records: dict, num_images: int, end_token: int, size: tuple[int, int], threshold: float = -1.0):
    """The BE mask (G×1×h×w, fp32) from the post-softmax records of the selected layers at the mask step: each
    record is (2G·heads) × (h·w) × tokens with the unconditional half first. Conditional half, column
    ``end_token``, mean over heads, then over layers; ``threshold`` ≥ 0 binarizes at that fraction of each image's
    maximum."""
    import torch

    if not records:
        raise ValueError("bright_ending: no cross-attention layer at the latent's resolution was recorded")
    G = int(num_images)
    h, w = size
    maps = []
    for name in sorted(records):
        probs = records[name].float()
        rows = probs.shape[0]
        heads = rows // (2 * G)
        if heads * 2 * G != rows:
            raise ValueError(f"bright_ending: layer {name} has {rows} rows, not 2·{G}·heads")
        cond = probs[rows // 2:, :, end_token]  # (G·heads) × pixels, sample-major
        maps.append(cond.reshape(G, heads, -1).mean(dim=1))
    m = torch.stack(maps).mean(dim=0).reshape(G, 1, h, w)
    if threshold >= 0:
        top = m.flatten(1).max(dim=1).values.view(G, 1, 1, 1)
        m = (m >= threshold * top).float()
    return m


def masked_noise_norm(eps_cond, eps_uncond, mask):
    """BE's objective: ‖(ε_c − ε_u) ⊙ m‖₂ over the whole G×C×h×w tensor divided by mean(m), in fp32."""
    d = (eps_cond.float() - eps_uncond.float()) * mask
    return d.flatten().norm(p=2) / mask.mean()


class _StepIndex(Guidance):
    """Tells the BE pass's record hook the current step (plain CFG weight)."""

    def __init__(self):
        self.index = -1

    def before_step(self, index, timestep, latents):
        self.index = index


class BrightEndingMitigation(Mitigation):
    """Chen et al. (ICLR 2025): Wen et al.'s optimisation with the magnitude masked by the bright-ending map."""

    name = "bright_ending"
    version = "1"
    kind = "inference"

    @dataclass
    class Params:
        lr: float = param(0.05, "inference_mem.py --optim_lr default")
        weight_decay: float = param(0.01, "torch.optim.AdamW default, as the reference constructs it")
        max_iters: int = param(10, "--optim_iters default")
        target_loss: float = param(1.0, "--optim_target_loss 1 (README 'Baseline + BE')")
        target_step: int = param(0, "--optim_target_steps 0: the denoising step optimised")
        zero_bos_grad: bool = param(True, "the reference zeroes the gradient of token position 0")
        proximity_epsilon: float = param(-1.0, "aug_prompt optim_epsilon; < 0 = off (the reference's None)")
        proximity_alpha: float = param(0.5, "aug_prompt alpha (only with proximity_epsilon ≥ 0)")
        loss_norm: str = param("reference", "'reference': L on the reference's G×C×h×w | 'joint': raw norm (wen)")
        reference_images: int = param(1, "--num_images_per_prompt 1 (the G target_loss was set for)")
        reference_latent: str = param("4x64x64", "C×h×w of one reference latent: SD v1.4 at 512×512")
        mask_step: int = param(-1, "step whose attention makes the mask (-1 = last; controller.py cur_step 49)")
        mask_layers: str = param("down-full", "'down-full': down-block layers at latent resolution (reference) | 'full'")
        mask_threshold: float = param(-1.0, "< 0: soft mask (reference code); τ ≥ 0: 1[a ≥ τ·max] per image")

        def __post_init__(self):
            if self.loss_norm not in ("reference", "joint"):
                raise BadInput(f"mitigation 'bright_ending' parameter loss_norm={self.loss_norm!r}: must be "
                               "'reference' or 'joint'")
            if self.mask_layers not in MASK_LAYERS:
                raise BadInput(f"mitigation 'bright_ending' parameter mask_layers={self.mask_layers!r}: must be one "
                               f"of {', '.join(MASK_LAYERS)}")
            if self.reference_images < 1:
                raise BadInput("mitigation 'bright_ending' parameter reference_images: must be at least 1")
            if self.mask_threshold > 1:
                raise BadInput(f"mitigation 'bright_ending' parameter mask_threshold={self.mask_threshold}: must be "
                               "≤ 1 (a fraction of the image's maximum) or < 0 for the soft mask")
            latent_elements(self.reference_latent, "mitigation 'bright_ending' parameter reference_latent")

    def __init__(self, params=None, **overrides):
        super().__init__(params, **overrides)
        self._summaries: dict[str, dict] = {}

    def bright_ending_mask(self, model, prompt, cond, latents, ctx):
        """Steps 1–2: the BE pass and the mask (G×1×h×w fp32) with what the trace records about it."""
        import torch

        from memobench.api import cross_attention

        p = self.params
        gen = dict(ctx.generation or {}) if ctx is not None else {}
        n_steps = int(gen.get("num_inference_steps", 50))
        w = float(gen.get("guidance_scale", 7.5))
        step = p.mask_step if p.mask_step >= 0 else n_steps + p.mask_step
        if not 0 <= step < n_steps:
            raise BadInput(f"mitigation 'bright_ending' parameter mask_step={p.mask_step}: outside the {n_steps} "
                           "denoising steps")
        source = "conditioning text" if cond.text is not None else "target prompt"
        # BOS + words + EOS, truncated at 77: the reference's min(len(tokenizer.encode(prompt)), 77)
        n = model.prompt_length(cond.text if cond.text is not None else prompt.text)
        end_token = n - 1
        G, _, h, wd = latents.shape
        tracker = _StepIndex()
        kept: dict = {}

        def record(name, probs):
            if tracker.index == step and layer_selected(name, probs.shape[1], h * wd, p.mask_layers):
                kept[name] = probs.detach()

        with torch.no_grad(), cross_attention(model.unet, record=record):
            model.denoise(cond.prompt_embeds, cond.negative_prompt_embeds, latents, n_steps, w, guidance=tracker)
        m = be_mask(kept, G, end_token, (h, wd), p.mask_threshold).to(model.device)
        means = m.mean(dim=(1, 2, 3))
        info = {
            "layers": sorted(kept), "step": step, "timestep": int(model.timesteps(n_steps)[step]),
            "end_token": end_token, "prompt_length": n, "prompt_length_from": source,
            "shape": list(m.shape), "threshold": p.mask_threshold, "mean": means.tolist(),
            "max": m.flatten(1).max(dim=1).values.tolist(), "overall_mean": float(m.mean()),
            "sha256": hashlib.sha256(m.cpu().contiguous().numpy().tobytes()).hexdigest(),
        }
        return m, info

    def mitigate(self, model, prompt, cond, latents, ctx, mask, mask_info: dict | None = None):
        """Steps 3–4: Wen's optimisation with the masked objective, for a given mask (G×1×h×w)."""
        import torch

        p = self.params
        mask = mask.to(model.device, dtype=torch.float32)
        if mask.shape[0] != latents.shape[0] or tuple(mask.shape[2:]) != tuple(latents.shape[2:]):
            raise ValueError(f"bright_ending: mask of shape {tuple(mask.shape)} for latents {tuple(latents.shape)}")
        if not float(mask.mean()) > 0:
            raise ValueError("bright_ending: the mask is zero everywhere (its mean normalises the objective)")
        run = optimize_embedding(model, cond, latents, ctx, p, name="bright_ending",
                                 noise_loss=lambda ec, eu: masked_noise_norm(ec, eu, mask))
        losses = run["losses"]
        self._summaries[prompt.id] = {"iterations": run["iterations"], "final_loss": losses[-1] if losses else None,
                                      "reached_target": run["reached_target"],
                                      "mask_mean": float(mask.mean())}
        trace = {**optimization_trace(run, p, "bright_ending"),
                 "objective": "||(eps_c - eps_u) * mask||_2 / mean(mask) * loss_scale", "mask": mask_info or {}}
        return Conditioning(run["embedding"].to(model.dtype), cond.negative_prompt_embeds, text=cond.text,
                            trace={**(cond.trace or {}), "bright_ending": trace}, latents=cond.latents)

    def condition(self, model, prompt, cond, latents, ctx):
        mask, info = self.bright_ending_mask(model, prompt, cond, latents, ctx)
        return self.mitigate(model, prompt, cond, latents, ctx, mask, info)

    def report(self) -> dict:
        return {"prompts": dict(self._summaries)}


def localized_magnitude(deltas, mask):
    """LD per scored step and image (S × G): ‖δ ⊙ m‖₂ over C×h×w divided by each image's mask mean; ``deltas``
    S×G×C×h×w, ``mask`` G×1×h×w."""
    m = mask.float()
    masked = (deltas.float() * m.unsqueeze(0)).flatten(2).norm(dim=2)
    return masked / m.mean(dim=(1, 2, 3)).unsqueeze(0)


class BrightEndingDetector(Detector):
    """Chen et al. (ICLR 2025): Wen's magnitude masked by each image's bright-ending map (localized detection)."""

    name = "bright_ending"
    version = "1"
    statistic = "mean over steps and images of ‖(ε_c − ε_u) ⊙ m‖₂ / mean(m), m = the end token's last-step attention"

    @dataclass
    class Params:
        seeds: tuple = param((0, 1, 2, 3), "G generations (detect_mem.py default 4; README 16); one CPU generator each")
        score_steps: int = param(0, "the first N steps enter the mean; 0 = all (as wen)")
        num_inference_steps: int = param(0, "0 = the model's default (reference: 50 DDIM steps)")
        guidance_scale: float = param(-1.0, "< 0 = the model's default (reference: 7.5)")
        height: int = param(0, "0 = the model's default")
        width: int = param(0, "0 = the model's default")
        mask_step: int = param(-1, "step whose attention makes the mask (-1 = last; controller.py cur_step 49)")
        mask_layers: str = param("down-full", "'down-full': down-block layers at latent resolution (reference) | 'full'")
        mask_threshold: float = param(-1.0, "< 0: soft mask (reference); τ ≥ 0: 1[a ≥ τ·max] per image")

        def __post_init__(self):
            what = "detector 'bright_ending' parameter"
            self.seeds = tuple(int(x) for x in self.seeds)
            if not self.seeds or min(self.seeds) < 0 or len(set(self.seeds)) != len(self.seeds):
                raise BadInput(f"{what} seeds: distinct non-negative seeds, e.g. 0,1,2,3")
            if min(self.score_steps, self.num_inference_steps, self.height, self.width) < 0:
                raise BadInput(f"{what} score_steps, num_inference_steps, height, width: ≥ 0")
            if self.mask_layers not in MASK_LAYERS:
                raise BadInput(f"{what} mask_layers={self.mask_layers!r}: one of {', '.join(MASK_LAYERS)}")
            if self.mask_threshold > 1:
                raise BadInput(f"{what} mask_threshold={self.mask_threshold}: ≤ 1, or < 0 for the soft mask")

    def resolved(self, generation: dict) -> "BrightEndingDetector":
        out = self.with_generation(generation)
        n, q = out.params.num_inference_steps, out.params
        if q.score_steps > n or not -n <= q.mask_step < n:
            raise BadInput(f"detector 'bright_ending' parameters score_steps={q.score_steps}, mask_step="
                           f"{q.mask_step}: inside the {n} denoising steps")
        return out

    def trajectory(self, model, text: str):
        """One guided pass: δ at the scored steps (S×G×C×h×w, fp32) and the BE mask (G×1×h×w)."""
        import torch

        from memobench.api import cross_attention

        p = self.params
        if p.num_inference_steps == 0 or p.guidance_scale < 0:
            raise ValueError("detector 'bright_ending': call resolved(generation) first (steps/guidance not set)")
        n_steps = p.num_inference_steps
        n_score = p.score_steps or n_steps
        mask_step = p.mask_step % n_steps
        x = model.initial_latents(list(p.seeds), p.height or None, p.width or None)
        G, _, h, w = x.shape
        tracker, kept, deltas = _StepIndex(), {}, []

        def record(name, probs):
            if tracker.index == mask_step and layer_selected(name, probs.shape[1], h * w, p.mask_layers):
                kept[name] = probs.detach()

        def on_step(info):
            if info.index < n_score:
                deltas.append(info.eps_cond.float() - info.eps_uncond.float())

        with torch.no_grad(), cross_attention(model.unet, record=record):
            model.denoise(model.encode_prompt(text), model.empty_embedding(), x, n_steps, p.guidance_scale,
                          on_step=on_step, guidance=tracker)
        end_token = model.prompt_length(text) - 1
        return torch.stack(deltas), be_mask(kept, G, end_token, (h, w), p.mask_threshold).to(x.device)

    def score(self, model, text: str) -> dict:
        deltas, mask = self.trajectory(model, text)
        ld = localized_magnitude(deltas, mask)
        return {"score": float(ld.mean()), "per_step": ld.mean(dim=1).tolist(), "per_image": ld.mean(dim=0).tolist(),
                "mask_mean": mask.mean(dim=(1, 2, 3)).tolist()}


@hookimpl
def register_detectors(register):
    register(BrightEndingDetector)


@hookimpl
def register_mitigations(register):
    register(BrightEndingMitigation)
