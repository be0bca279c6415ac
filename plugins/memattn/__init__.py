"""MemAttn: inference-time mitigation by cross-attention logit rescaling (Ren et al.).

Paper: Ren, Li, Zeng, Xu, Lyu, Xing, Tang, "Unveiling and Mitigating Memorization in Text-to-image Diffusion Models
through Cross Attention", ECCV 2024 (arXiv 2403.11052), §4 (memorized prompts concentrate their cross-attention on
a few token embeddings: low attention entropy) and §5 (detection by attention entropy; inference-time mitigation by
moving the attention away from the prompt's trigger and padding tokens onto the beginning token). Reference code
``renjie3/MemAttn`` (c66efd2): ``text2img.py``, ``local_cmd_inference_time_mitigation.sh``,
``refactored_classes/refactored_attention_processor.py`` (``AttnProcessor2_0.__call__`` with ``miti_mem`` and
``cross_attn_mask``, ``my_simple_scaled_dot_product_attention``), ``detect.py``. MemBench
(``chunsanHong/MemBench_code`` f22a0fd, ``run_mitigation.py``) runs it as "Ren et al." with
``--rescale_attention 1.1``.

Registers the mitigation ``memattn`` (``kind = "inference"``). In every cross-attention layer of the UNet (all 16 of
SD v1.4: down, mid and up blocks), at every denoising step, with S = Q Kᵀ/√d the pre-softmax logits
((B·heads) × pixels × 77) and n the number of tokens of the prompt (BOS + words + the first EOS, at most 77)::

    S[:, :, k] = −∞               for k ≥ n            (both CFG halves: the padding tokens are masked out)
    S_c[:, :, 0] = C · S_c[:, :, 0]                    (conditional half only: the beginning token's logit)
    A = softmax(S)

1. ``condition`` counts n with the model's tokenizer (no padding, truncation at 77) from the conditioning's text, or
   from the target prompt's text when the conditioning has none (an attack's optimised embedding, e.g. DoRI), and
   returns a :class:`memobench.api.Guidance` that carries n and C.
2. ``apply`` installs explicit cross-attention on every cross-attention layer
   (:func:`memobench.api.cross_attention`) for the prompt; the logit edit is *armed* by the guidance when a
   denoising loop with this conditioning starts (:meth:`Guidance.start`: the batch is then [unconditional × B,
   conditional × B], so the conditional rows are the second half of the first axis) and disarmed after the last
   step's UNet call. UNet calls outside that loop (an attack's optimisation inside ``apply``) see the unedited
   attention: the attacker is not adaptive to the edit, and the images generated from its conditioning are.
3. The edit: the masked logits are set to −∞ (``masked_fill``; probability exactly 0), then the conditional rows'
   logit of token 0 is multiplied by C (out of place, differentiable). The softmax follows.

Defaults and where each comes from:

* ``c1`` = 1.25: ``local_cmd_inference_time_mitigation.sh`` (``--c1 1.25 --cross_attn_mask --miti_mem``), the
  reference's only mitigation command. MemBench uses 1.1 (preset ``membench``: ``--mitigation-param c1=1.1``).
* ``mask_padding`` = True: ``--cross_attn_mask`` (set in both commands). The reference builds a boolean attention
  mask that keeps the first ``prompt_length`` tokens, ``prompt_length`` being the length of the prompt tokenized
  without padding (BOS + words + EOS).
* ``mask_minus_one`` = False: ``--mask_length_minis1`` off in both commands (True would also mask the EOS token).
* ``mask_uncond`` = True: the reference repeats the conditional prompt's mask over the whole batch, so the
  unconditional half (the empty prompt: BOS, EOS, padding) attends to its first n tokens too.
* The logit is multiplied (not shifted): ``attn_weight[..., 0] = attn_weight[..., 0] * c1`` after the mask bias is
  added. For a positive logit (the beginning token's usual, attention-sink case) C > 1 raises its attention.

Where the reference and MemBench differ from what runs here (recorded in the trace):

* Rows: the reference rescales ``attn_weight[1::2]``, written for its own batch of one image per prompt,
  [unconditional, conditional], where 1::2 is the conditional row. MemBench calls it with 10 images per prompt, a
  batch [u₀…u₉, c₀…c₉], so 1::2 rescales both halves of the odd-indexed images and nothing of the even ones. Here
  the conditional half of every image is rescaled, as the paper describes and as the reference does for its own
  batches.
* Layers and steps: all cross-attention layers, all steps (``miti_mem`` is passed to every transformer block of
  the down, mid and up blocks, at every step; the reference's per-step switch is commented out). Self-attention is
  untouched.
* Precision: the reference runs fp16 with ``scaled_dot_product_attention``; here the explicit processor computes
  the logits in the model's dtype (fp32 on the CPU), upcast as diffusers' ``AttnProcessor`` does.

``attention_entropy`` is the paper's entropy of one record (E = −Σ_k ā_k log ā_k of the attention averaged over
heads and pixels); the mitigation does not use it.

Detector ``memattn`` (:class:`MemAttnDetector`, the detection track of ``memobench detect``): the paper's detection
by attention entropy (§4: memorized prompts spread the cross-attention of the first denoising steps over their
trigger tokens instead of the beginning token, so the entropy of the token distribution is *higher*; §5: detection
without extra cost during generation). Reference files: ``detect.py`` (the score, both modes), ``local_cmd.sh`` (the
detection command: ``detect.py --mode E``), ``read_results.py`` (``merge_small``: the array layout),
``refactored_classes/MemAttn.py`` (``save_numpy``: what is kept per layer and step: the conditional sample's
post-softmax attention averaged over pixels, one row per head, and ``prompt_length``), ``text2img.py`` (one image per
prompt, DDIM, fp16, CFG 7.5, no attention edit while detecting). With A_{s,l}^{(g)} the conditional cross-attention
probabilities of image g at step s in layer l, heads h and pixels p::

    ā_s^{(g)}[k] = 1/|L| Σ_{l∈L} 1/H Σ_h 1/P Σ_p A_{s,l}^{(g)}[h, p, k]        (k = 0..76, padding included)
    E_s = −Σ_k ā_s[k] log ā_s[k]                 P_s = −Σ_{k ≥ n−1} ā_s[k] log ā_s[k]   (EOS and padding)
    mode E (default):  score = E_{s=0}                     with L = {layer 3}
    mode D:            score = mean_{s∈last} E_s + (mean_{s∈last} P_s − P_0)   with L = all layers

then averaged over the images g. Higher = more likely memorized (``detect.py`` feeds the scores to
``roc_auc_score`` with memorized = 1, no sign flip). n is the prompt's token count (BOS + words + EOS,
:meth:`memobench.api.DiffusionModel.prompt_length`, the reference's ``prompt_length``), so P sums over the first EOS
and the padding (``attn[:, length - 1:]``). Natural logarithm; 0 · log 0 = 0.

Defaults and where each comes from:

* ``mode`` "E": ``local_cmd.sh`` (``detect.py --mode E``): step 0 only, ``layer_id = [3]``.
* ``layers`` "reference": mode E → layer 3 of the reference's list, which is in forward order (down blocks, mid,
  up; ``refactored_unet_2d_condition.py`` collects them in that order), i.e. ``down_blocks.1.attentions.1`` of SD
  v1.4 / v2, the last cross-attention layer of the second down block. [CHOICE] For a UNet with another layout the
  same rule — the last cross-attention layer of ``down_blocks.1`` — picks the layer (the embedded ``tiny`` model has
  three cross-attention layers; its layer there is ``down_blocks.1.attentions.0``, forward index 1). Mode D → all
  layers (``detect.py`` averages over every layer when ``use_special_layer`` is off). ``"all"`` or comma-separated
  forward-order indices (e.g. ``"3"``) choose explicitly.
* ``last_steps`` 10: mode D's ``step_id = np.arange(40, 50)`` of 50 steps, the last ten.
* ``seeds`` (0,): one image per prompt (``num_images_per_prompt = 1``). [CHOICE] The reference seeds the global RNG
  with the prompt's line number (``set_seed(line_id + seed)``); here the same explicit seeds serve every prompt, as
  the ``wen`` detector does (one CPU generator per image), so the score does not depend on the prompt's position.
  Several seeds: the per-image scores are averaged (the reference has one image).
* ``num_inference_steps`` / ``guidance_scale`` / ``height`` / ``width``: 0 / −1 = the model's generation defaults
  (the reference: the pipeline's 50 DDIM steps, CFG 7.5, 512 px). Mode E needs only the first timestep and the
  conditional UNet call on x_T (the conditional attention of a CFG batch does not depend on the unconditional half),
  so it costs one UNet call per image; mode D follows the whole guided trajectory.
* The attention is diffusers' (``memobench.api.cross_attention``, the model's dtype, upcast as diffusers does); the
  reference computes it in fp16 from ``scaled_dot_product_attention``'s inputs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

from memobench.api import BadInput, Conditioning, Detector, Guidance, Mitigation, hookimpl, param

#: Named configurations (the reference's command; MemBench's).
PRESETS: dict[str, dict] = {
    "memattn2024": {"c1": 1.25},
    "membench": {"c1": 1.1},
}


def rescale_logits(logits, c1: float, keep: int | None, mask_uncond: bool = True):
    """The edit of one layer: ``logits`` is (2B·heads) × pixels × tokens, unconditional rows first (a CFG batch).
    Tokens at positions ≥ ``keep`` get −∞ (all rows, or only the conditional half when ``mask_uncond`` is False;
    ``keep`` None: no mask); the conditional rows' token-0 logit is multiplied by ``c1``."""
    import torch

    rows, _, tokens = logits.shape
    if rows % 2:
        raise ValueError(f"memattn: a CFG batch has an even number of rows, got {rows}")
    half = rows // 2
    scale = torch.ones(rows, 1, tokens, dtype=logits.dtype, device=logits.device)
    scale[half:, 0, 0] = c1
    out = logits * scale
    if keep is not None and keep < tokens:
        masked = torch.zeros(rows, 1, tokens, dtype=torch.bool, device=logits.device)
        masked[(0 if mask_uncond else half):, 0, keep:] = True
        out = out.masked_fill(masked, float("-inf"))
    return out


def attention_entropy(probs) -> float:
    """Ren et al.'s attention entropy of one record, (rows) × pixels × tokens post-softmax probabilities: the token
    distribution ā averaged over rows (heads, samples) and pixels, E = −Σ_k ā_k log ā_k (natural log)."""
    a = probs.detach().float().mean(dim=tuple(range(probs.dim() - 1)))
    a = a[a > 0]
    return float(-(a * a.log()).sum())


class MemAttnGuidance(Guidance):
    """Arms the logit edit of :class:`MemAttnMitigation` for one denoising loop (the CFG weight is unchanged)."""

    def __init__(self, mitigation: "MemAttnMitigation", keep: int | None):
        self.mitigation, self.keep = mitigation, keep
        self.steps = 0

    def edit(self, layer: str, logits):
        p = self.mitigation.params
        return rescale_logits(logits, p.c1, self.keep, p.mask_uncond)

    def start(self, latents, timesteps):
        hooks = self.mitigation._hooks
        if hooks is None:
            raise RuntimeError("memattn: the guidance runs inside the mitigation's apply context (the runner's "
                               "order: apply, then condition and generation)")
        self.steps = len(timesteps)
        hooks.edit_logits = self.edit

    def scale(self, index, timestep, latents, eps_uncond, eps_cond, guidance_scale):
        if index == self.steps - 1 and self.mitigation._hooks is not None:  # after the last UNet call: disarm
            self.mitigation._hooks.edit_logits = None
        return guidance_scale


class MemAttnMitigation(Mitigation):
    """Ren et al. (ECCV 2024): mask the padding tokens and scale the beginning token's cross-attention logit."""

    name = "memattn"
    version = "1"
    kind = "inference"

    @dataclass
    class Params:
        c1: float = param(1.25, "C × the BOS token's logit, conditional half (--c1; MemBench: 1.1)")
        mask_padding: bool = param(True, "--cross_attn_mask: logits of tokens after the prompt's EOS set to -inf")
        mask_minus_one: bool = param(False, "--mask_length_minis1: mask the EOS token as well (off in the reference)")
        mask_uncond: bool = param(True, "the reference masks the unconditional half with the prompt's length too")

        def __post_init__(self):
            if not self.c1 > 0:
                raise BadInput(f"mitigation 'memattn' parameter c1={self.c1}: must be > 0; the reference uses 1.25")

    def __init__(self, params=None, **overrides):
        super().__init__(params, **overrides)
        self._hooks = None
        self._summaries: dict[str, dict] = {}

    @classmethod
    def preset(cls, name: str) -> "MemAttnMitigation.Params":
        """``Params`` of a named preset: ``memattn2024`` (C = 1.25) or ``membench`` (C = 1.1)."""
        try:
            return replace(cls.Params(), **PRESETS[name])
        except KeyError:
            raise BadInput(f"memattn: unknown preset {name!r}; available: {', '.join(PRESETS)}") from None

    @contextlib.contextmanager
    def apply(self, model, prompt, ctx):
        from memobench.api import cross_attention

        with cross_attention(model.unet) as hooks:  # no edit until a guidance arms it
            self._hooks = hooks
            try:
                yield
            finally:
                self._hooks = None

    def condition(self, model, prompt, cond, latents, ctx):
        from memobench.api import cross_attention_layers

        p = self.params
        source = "conditioning text" if cond.text is not None else "target prompt"
        n = model.prompt_length(cond.text if cond.text is not None else prompt.text)  # the reference's prompt_length
        keep = (n - 1 if p.mask_minus_one else n) if p.mask_padding else None
        tokens = int(cond.prompt_embeds.shape[1])
        layers = [k.removesuffix(".processor") for k in cross_attention_layers(model.unet)]
        self._summaries[prompt.id] = {"prompt_length": n, "attended_tokens": keep if keep is not None else tokens}
        trace = {
            "mitigation": "memattn", "c1": p.c1, "rescaled_token": 0, "rescaled_rows": "conditional half",
            "operation": "logit × c1 (pre-softmax)", "prompt_length": n, "prompt_length_from": source,
            "attended_tokens": keep if keep is not None else tokens,
            "masked_tokens": (tokens - keep) if keep is not None else 0,
            "mask_rows": ("both halves" if p.mask_uncond else "conditional half") if keep is not None else None,
            "layers": layers, "steps": "all", "num_images": int(latents.shape[0]),
        }
        return Conditioning(cond.prompt_embeds, cond.negative_prompt_embeds, text=cond.text,
                            trace={**(cond.trace or {}), "memattn": trace}, latents=cond.latents,
                            guidance=MemAttnGuidance(self, keep))

    def report(self) -> dict:
        return {"prompts": dict(self._summaries), "c1": self.params.c1}


# ---------------------------------------------------------------------------------------------- detection
_GROUPS = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def forward_order(names: list[str]) -> list[str]:
    """Cross-attention layer names in the UNet's forward order (down blocks, mid block, up blocks; by index within
    each): the order of the reference's attention list. ``unet.attn_processors`` lists the up blocks before the mid
    block."""
    def key(name: str):
        parts = name.split(".")
        return (_GROUPS.get(parts[0], 3), [int(x) if x.isdigit() else -1 for x in parts[1:]], name)

    return sorted(names, key=key)


def detection_layers(all_layers: list[str], spec: str, mode: str) -> list[str]:
    """The layers L of the score: ``spec`` "reference" (mode E: the last cross-attention layer of
    ``down_blocks.1``; mode D: all), "all", or comma-separated indices into :func:`forward_order`."""
    layers = forward_order(all_layers)
    if spec == "all" or (spec == "reference" and mode == "D"):
        return layers
    if spec == "reference":
        second = [n for n in layers if n.startswith("down_blocks.1.")]
        if not second:
            raise BadInput("detector 'memattn' parameter layers=reference: the UNet has no cross-attention layer in "
                           "down_blocks.1; pass layers=all or layer indices, e.g. layers=0")
        return [second[-1]]
    try:
        idx = [int(x) for x in spec.split(",")]
    except ValueError:
        raise BadInput(f"detector 'memattn' parameter layers={spec!r}: 'reference', 'all' or indices like 3 or "
                       "0,1") from None
    bad = [i for i in idx if not 0 <= i < len(layers)]
    if bad:
        raise BadInput(f"detector 'memattn' parameter layers={spec!r}: index {bad[0]} outside the UNet's "
                       f"{len(layers)} cross-attention layers (0..{len(layers) - 1})")
    return [layers[i] for i in idx]


def token_distribution(probs, num_images: int, cfg: bool):
    """ā per image (G × tokens, fp32) from one layer's record ((2)·G·heads × pixels × tokens, sample-major; ``cfg``:
    the unconditional half comes first and the conditional half is used): the mean over heads and pixels."""
    rows = probs.shape[0]
    per = 2 * num_images if cfg else num_images
    if rows % per:
        raise ValueError(f"memattn: a record of {rows} rows for {num_images} images (cfg={cfg})")
    cond = probs[rows // 2:] if cfg else probs
    return cond.float().reshape(num_images, -1, probs.shape[-1]).mean(dim=1)


def token_entropy(a, start: int = 0):
    """−Σ_{k ≥ start} a_k log a_k per row of ``a`` (natural log; 0 · log 0 = 0)."""
    import torch

    return -torch.special.xlogy(a[..., start:], a[..., start:]).sum(dim=-1)


class MemAttnDetector(Detector):
    """Ren et al. (ECCV 2024): the entropy of the prompt's cross-attention over its tokens (higher = memorized)."""

    name = "memattn"
    version = "1"
    statistic = "E = −Σ_k ā_k log ā_k of the conditional cross-attention (mode E: step 0, layer 3)"

    @dataclass
    class Params:
        mode: str = param("E", "'E': first step, one layer (local_cmd.sh) | 'D': last steps, all layers + padding")
        layers: str = param("reference", "'reference' (E: last layer of down_blocks.1 = SD layer 3; D: all) | "
                                         "'all' | forward-order indices, e.g. 3 or 0,1")
        last_steps: int = param(10, "mode D: the last N steps (detect.py np.arange(40, 50) of 50)")
        seeds: tuple = param((0,), "one image per prompt (num_images_per_prompt 1); one CPU generator per image")
        num_inference_steps: int = param(0, "0 = the model's default (reference: 50 DDIM steps)")
        guidance_scale: float = param(-1.0, "mode D's trajectory; < 0 = the model's default (reference: 7.5)")
        height: int = param(0, "0 = the model's default")
        width: int = param(0, "0 = the model's default")

        def __post_init__(self):
            what = "detector 'memattn' parameter"
            self.seeds = tuple(int(x) for x in self.seeds)
            if self.mode not in ("E", "D"):
                raise BadInput(f"{what} mode={self.mode!r}: 'E' (first step) or 'D' (last steps)")
            if not self.seeds or min(self.seeds) < 0 or len(set(self.seeds)) != len(self.seeds):
                raise BadInput(f"{what} seeds: distinct non-negative seeds, e.g. 0 or 0,1,2,3")
            if self.last_steps < 1:
                raise BadInput(f"{what} last_steps={self.last_steps}: at least 1")
            if min(self.num_inference_steps, self.height, self.width) < 0:
                raise BadInput(f"{what} num_inference_steps, height, width: ≥ 0 (0 = the model's default)")

    def resolved(self, generation: dict) -> "MemAttnDetector":
        out = self.with_generation(generation)
        if out.params.mode == "D" and out.params.last_steps >= out.params.num_inference_steps:
            raise BadInput(f"detector 'memattn' parameter last_steps={out.params.last_steps}: fewer than the "
                           f"{out.params.num_inference_steps} denoising steps (step 0 is the reference step)")
        return out

    def distributions(self, model, text: str) -> dict:
        """{step index: ā (G × tokens)} at the steps the score reads (mode E: step 0; D: 0 and the last steps)."""
        import torch

        from memobench.api import cross_attention, cross_attention_layers

        p = self.params
        if p.num_inference_steps == 0 or p.guidance_scale < 0:
            raise ValueError("detector 'memattn': call resolved(generation) first (steps/guidance not set)")
        names = [n.removesuffix(".processor") for n in cross_attention_layers(model.unet)]
        layers = set(detection_layers(names, p.layers, p.mode))
        x = model.initial_latents(list(p.seeds), p.height or None, p.width or None)
        G, n_steps = x.shape[0], p.num_inference_steps
        steps = {0} if p.mode == "E" else {0, *range(n_steps - p.last_steps, n_steps)}
        e_p = model.encode_prompt(text)
        cfg = p.mode == "D" and p.guidance_scale > 1.0
        calls: dict[str, int] = {}
        sums: dict[int, list] = {}

        def record(name, probs):
            step = calls.get(name, 0)
            calls[name] = step + 1
            if name in layers and step in steps:
                sums.setdefault(step, []).append(token_distribution(probs.detach(), G, cfg))

        with torch.no_grad(), cross_attention(model.unet, record=record):
            if p.mode == "E":
                t0 = model.timesteps(n_steps)[0]
                model.eps(model.scheduler.scale_model_input(x, t0), t0, e_p.expand(G, -1, -1))
            else:
                model.denoise(e_p, model.empty_embedding(), x, n_steps, p.guidance_scale)
        return {s: torch.stack(v).mean(dim=0) for s, v in sorted(sums.items())}

    def score(self, model, text: str) -> dict:
        p = self.params
        a = self.distributions(model, text)
        if p.mode == "E":
            per = token_entropy(a[0])
            return {"score": float(per.mean()), "per_image": per.tolist()}
        n = model.prompt_length(text)
        last = [s for s in a if s > 0]
        ent = sum(token_entropy(a[s]) for s in last) / len(last)
        pad = sum(token_entropy(a[s], n - 1) for s in last) / len(last) - token_entropy(a[0], n - 1)
        per = ent + pad
        return {"score": float(per.mean()), "per_image": per.tolist(), "entropy_last": ent.tolist(),
                "padding_entropy_change": pad.tolist(), "prompt_length": n}


@hookimpl
def register_detectors(register):
    register(MemAttnDetector)


@hookimpl
def register_mitigations(register):
    register(MemAttnMitigation)
