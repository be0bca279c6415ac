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

``attention_entropy`` is the paper's detection statistic (§5, ``detect.py``: E = −Σ_k ā_k log ā_k of the attention
averaged over heads and pixels); it is exposed for the detection track and not used by the mitigation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

from memobench.api import BadInput, Conditioning, Guidance, Mitigation, hookimpl, param

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


@hookimpl
def register_mitigations(register):
    register(MemAttnMitigation)
