"""The cross-attention of a diffusers UNet made explicit, so that a plugin can edit the attention logits or read the
attention probabilities of every text → image attention layer: what attention-based mitigations and detectors
(MemAttn, Bright Ending) work on.

It uses diffusers' public attention-processor API: :func:`cross_attention` saves ``unet.attn_processors``, installs
an explicit processor on every cross-attention layer (``attn2`` of each transformer block; self-attention layers keep
theirs) and restores the saved processors on exit. The explicit processor computes what diffusers' ``AttnProcessor``
computes (``softmax(scale · Q Kᵀ + mask) V``, with its upcasting) and calls the hooks in between:

* ``edit_logits(layer, logits) -> logits``: the pre-softmax scores, ``(B·heads) × pixels × tokens``;
* ``record(layer, probs)``: the post-softmax attention probabilities, same shape (rows sum to 1).

Both run inside the UNet's forward pass and stay differentiable. The batch order of the first axis is diffusers'
(``head_to_batch_dim``: sample-major, heads minor), and under CFG the unconditional half comes first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass
class CrossAttentionHooks:
    """What :func:`cross_attention` calls in every cross-attention layer (either may be None)."""

    edit_logits: Callable[[str, torch.Tensor], torch.Tensor] | None = None
    record: Callable[[str, torch.Tensor], None] | None = None


class ExplicitCrossAttention:
    """An attention processor for one cross-attention layer (``name``) that exposes its logits and probabilities."""

    def __init__(self, name: str, hooks: CrossAttentionHooks, fallback):
        self.name, self.hooks, self.fallback = name, hooks, fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if encoder_hidden_states is None:  # not a cross-attention call: the layer's own processor
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, tokens = encoder_hidden_states.shape[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)
        dtype = query.dtype
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        logits = attn.scale * torch.bmm(query, key.transpose(-1, -2))
        if attention_mask is not None:
            logits = logits + attention_mask
        if attn.upcast_softmax:
            logits = logits.float()
        if self.hooks.edit_logits is not None:
            logits = self.hooks.edit_logits(self.name, logits)
        probs = logits.softmax(dim=-1).to(dtype)
        if self.hooks.record is not None:
            self.hooks.record(self.name, probs)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def cross_attention_layers(unet) -> list[str]:
    """The processor names of the UNet's cross-attention layers (``…attn2.processor``), in module order."""
    return [n for n in unet.attn_processors if n.endswith("attn2.processor")]


@contextlib.contextmanager
def cross_attention(unet, edit_logits: Callable | None = None,
                    record: Callable | None = None) -> Iterator[CrossAttentionHooks]:
    """Within the block, every cross-attention layer of ``unet`` runs :class:`ExplicitCrossAttention` with these
    hooks (the yielded object: a plugin may swap its callables between steps); the saved processors come back on
    exit, even after an exception."""
    saved = dict(unet.attn_processors)
    hooks = CrossAttentionHooks(edit_logits, record)
    layers = set(cross_attention_layers(unet))
    unet.set_attn_processor({n: ExplicitCrossAttention(n.removesuffix(".processor"), hooks, p) if n in layers else p
                             for n, p in saved.items()})
    try:
        yield hooks
    finally:
        unet.set_attn_processor(saved)
