"""Attack: per target prompt, the attack's conditioning under the (applied) mitigation, cached as safetensors + a
JSON trace, and the traces a result records (read back from the cache, whichever process attacked)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import boundary
from ..api import Attack, AttackOutput, Conditioning, Context, Mitigation, Prompt
from ..cache import CACHE_SCHEMA, TensorCache, key_of
from ..model import size_key_part
from ..util import image_sha256


def attack_key(model_ident: dict, mitigation: Mitigation | None, attack: Attack, prompt: Prompt,
               ref_sha: str | None, size_part: tuple[str, ...] = (), sampler: dict | None = None) -> str:
    """Cache key of one attack output: the model, the mitigation it attacked (None = no mitigation), the attack
    (with its params), the target prompt and its reference image, and the size the attack encoded the image at
    (``size_part``: :func:`memobench.model.size_key_part`, empty at the native size). ``sampler``: the run's
    sampler settings and number of seeds, for an attack whose output depends on them
    (:attr:`memobench.api.Attack.depends_on_sampler`). The Runner and analyses such as ``memobench analyze
    locality`` share these entries."""
    rec = {"schema": CACHE_SCHEMA, "model": model_ident,
           "mitigation": None if mitigation is None or mitigation.kind == "none" else mitigation.identity(),
           "attack": attack.identity(), "prompt_sha256": prompt.sha256, "reference": ref_sha}
    if size_part:
        rec["size"] = list(size_part)
    if sampler:
        rec["sampler"] = dict(sampler)
    return key_of(rec)


def cached_attack(cache: TensorCache, key: str, attack: Attack, model, prompt: Prompt, reference, ctx: Context
                  ) -> tuple[dict, dict, bool]:
    """``(tensors, meta, was_cached)`` of ``attack.run`` for ``key``: read from ``cache``, or run (under whatever
    mitigation the caller applied) and stored. ``tensors`` holds ``prompt_embeds``, ``negative_prompt_embeds`` and
    the attack's own tensors; ``meta`` the trace."""
    if cache.has(key):
        tensors, meta = cache.get(key)
        return tensors, meta, True
    out: AttackOutput = boundary.call(attack, "run", attack.run, model, prompt, reference, ctx, expect=AttackOutput)
    tensors = {"prompt_embeds": out.conditioning.prompt_embeds,
               "negative_prompt_embeds": out.conditioning.negative_prompt_embeds, **out.tensors}
    if out.conditioning.latents is not None:  # the initial noise the attack chose, one per seed of the run
        tensors["latents"] = out.conditioning.latents
    meta = {"trace": out.trace, "prompt_id": prompt.id, "attack": attack.identity()}
    cache.put(key, tensors, meta)
    return tensors, meta, False


@dataclass
class AttackPhase:
    """The run's attack on its targets. ``references(prompt)``: the target's training images (empty when none)."""

    attack: Attack
    mitigation: Mitigation
    cache: TensorCache
    generation: dict  # the run's sampler settings (its height and width enter the attack key)
    references: Callable[[Prompt], list]
    n_seeds: int = 0  # the run's seeds per target (in the key of an attack that depends on the sampler)

    def key(self, model, model_ident: dict, prompt: Prompt, ref_sha: str | None) -> str:
        g = self.generation
        size = (g["height"], g["width"])
        sampler = None
        if self.attack.depends_on_sampler:
            sampler = {"num_inference_steps": g["num_inference_steps"], "guidance_scale": g["guidance_scale"],
                       "n_seeds": self.n_seeds}
        return attack_key(model_ident, self.mitigation, self.attack, prompt, ref_sha, size_key_part(model, size),
                          sampler)

    def output(self, model, model_ident: dict, prompt: Prompt, ctx: Context) -> Conditioning | None:
        """The conditioning of one target (None when the attack has no reference image for it: that is reported
        by :meth:`traces`, which reads every target's attack output from the cache for the result)."""
        if self.attack.is_identity:
            emb = model.encode_prompt(prompt.text)
            return Conditioning(emb, model.empty_embedding(), text=prompt.text)
        ref = None
        if self.attack.needs_reference:
            refs = self.references(prompt)
            if not refs:
                return None
            ref = refs[0]
        ref_sha = image_sha256(ref) if ref is not None else None
        key = self.key(model, model_ident, prompt, ref_sha)
        tensors, _, _ = cached_attack(self.cache, key, self.attack, model, prompt, ref, ctx)
        lat = tensors.get("latents")
        return Conditioning(tensors["prompt_embeds"].to(model.device, model.dtype),
                            tensors["negative_prompt_embeds"].to(model.device, model.dtype), text=None,
                            latents=None if lat is None else lat.to(model.device))

    def traces(self, model, model_ident: dict, prompts: list[Prompt], errors: list[str]) -> dict:
        """Per target prompt, the attack's trace as stored in the attack cache (whichever process attacked it);
        targets without a reference image or attack output are appended to ``errors``."""
        if self.attack.is_identity:
            return {}
        name = self.attack.name
        traces: dict[str, Any] = {}
        for p in prompts:
            ref_sha = None
            if self.attack.needs_reference:
                refs = self.references(p)
                if not refs:
                    errors.append(f"attack {name}: prompt {p.id} has no reference image; skipped")
                    continue
                ref_sha = image_sha256(refs[0])
            key = self.key(model, model_ident, p, ref_sha)
            if not self.cache.has(key):
                errors.append(f"attack {name}: prompt {p.id}: no attack output in the cache ({key[:16]})")
                continue
            _, meta = self.cache.get(key)
            traces[p.id] = {"attack_key": key, **meta.get("trace", {})}
        return traces

