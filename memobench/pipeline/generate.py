"""Generate: every planned image this process owns into the image cache, keyed by everything that determines its
pixels and written atomically as soon as its batch is done (a re-run generates only what is missing).

Batches are cut at fixed boundaries of the full job list of a prompt (or of a role), never of the pending jobs
only: CPU/GPU kernels can change a few uint8 values by one level with the batch composition, so a resumed or
sharded run computes every image in the same batch as an uninterrupted one (bit-identical resume). A batch with a
cached image is recomputed whole; cached images are never rewritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass

import torch

from .. import boundary
from ..api import BadInput, Conditioning, Context, Mitigation, Prompt
from ..cache import ImageCache
from .attack import AttackPhase
from .plan import Job, Plan


def generated_with(model) -> dict:
    """Where an image was computed: the device and, on CPU, torch's intra-op thread count. CPU kernels sum in an
    order that depends on the thread count, so the same seed gives bit-identical images only for the same count
    (a uint8 value may differ by one level otherwise); the cache key does not contain it (a cache stays usable from
    another machine), the sidecar and the result record it."""
    dev = str(getattr(model, "device", "cpu"))
    return {"device": dev, **({"torch_threads": torch.get_num_threads()} if dev.startswith("cpu") else {})}


def image_meta(job: Job, condition_trace: dict, model=None) -> dict:
    """The sidecar of a generated image."""
    meta = {"prompt_id": job.prompt.id, "prompt_sha256": job.prompt.sha256, "seed": job.seed, "role": job.role,
            "condition_trace": condition_trace}
    if model is not None:
        meta["generated_with"] = generated_with(model)
    return meta


def jsonable_trace(trace: dict) -> dict:
    return json.loads(json.dumps(trace or {}, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _by_prompt(jobs: list[Job]) -> dict[str, list[Job]]:
    out: dict[str, list[Job]] = {}
    for j in jobs:
        out.setdefault(j.prompt.id, []).append(j)
    return out


def _applied(mitigation: Mitigation | None, model, prompt: Prompt | None, ctx: Context):
    """The mitigation's ``apply`` context (nothing without a mitigation)."""
    if mitigation is None:
        return contextlib.nullcontext()
    return boundary.context(mitigation, "apply", lambda: mitigation.apply(model, prompt, ctx))


@dataclass
class Generator:
    images: ImageCache
    generation: dict  # num_inference_steps, guidance_scale, height, width
    batch_size: int

    def all_roles(self, model, model_ident: dict, plan: Plan, ctx: Context, attacks: AttackPhase, paired: bool,
                  timing: dict) -> None:
        """Targets (attacked), then the mitigation alone (paired scoring), the baseline and the utility roles."""
        mitigation, owned = attacks.mitigation, plan.owned
        t = time.time()
        self.targets(model, model_ident, plan, ctx, attacks)
        timing["target_s"] = time.time() - t
        t = time.time()
        if paired:
            self.plain(model, plan.of_role("mitigated"), mitigation, ctx,
                       f"mitigated ({mitigation.name}, no attack)", owned)
        if plan.baseline_needed:
            self.plain(model, plan.of_role("baseline"), None, ctx, "baseline", owned)
        for role in plan.utility:
            self.plain(model, plan.of_role(role), mitigation, ctx, role, owned, across_prompts=True)
        timing["other_generation_s"] = time.time() - t

    def targets(self, model, model_ident: dict, plan: Plan, ctx: Context, attacks: AttackPhase) -> None:
        """Each target prompt: under the mitigation, the attack's conditioning, then its pending images."""
        attack, mitigation, owned = attacks.attack, attacks.mitigation, plan.owned
        by_prompt = _by_prompt(plan.of_role("target"))
        total = sum(1 for j in plan.jobs if j.role == "target" and j.key in owned)
        label = "generate" if attack.is_identity else f"attack {attack.name} + generate"
        with ctx.task(f"{label} ({mitigation.name})", total) as advance:
            for p in plan.prompts:
                pj = by_prompt[p.id]
                mine = [j for j in pj if j.key in owned]
                pending = [j for j in mine if not self.images.has(j.key)]
                advance(len(mine) - len(pending))
                # a shard attacks exactly the targets whose unit it owns (their attack output is cached for the
                # result even when all their images already are)
                need_attack = bool(pending) or (("target", p.id) in plan.owned_units and not attack.is_identity)
                if not need_attack:
                    continue
                with _applied(mitigation, model, p, ctx):
                    ctx.sampler = self.sampler(model, p, mitigation, ctx)
                    try:
                        cond = attacks.output(model, model_ident, p, ctx)
                    finally:
                        ctx.sampler = None
                    if cond is None:
                        advance(len(pending))
                        continue
                    if pending:
                        self.prompt(model, p, pj, pending, cond, mitigation, ctx, advance)

    def plain(self, model, jobs: list[Job], mitigation: Mitigation | None, ctx: Context, role: str,
              owned: set[str], across_prompts: bool = False) -> None:
        """Images from the prompts' own conditioning. ``across_prompts``: several prompts per batch when the
        mitigation gives them the same model (:meth:`Mitigation.apply_group`; utility sets only: target prompts'
        images share their cache keys between runs and are always batched per prompt)."""
        with ctx.task(f"generate {role}", sum(j.key in owned for j in jobs)) as advance:
            groups = self._apply_groups(mitigation, jobs) if across_prompts else None
            if groups is not None:
                for gjobs in groups:
                    first = None if mitigation is None or mitigation.prompt_independent else gjobs[0].prompt
                    with _applied(mitigation, model, first, ctx):
                        self.across_prompts(model, gjobs, owned, advance)
                return
            for pj in _by_prompt(jobs).values():
                p = pj[0].prompt
                mine = [j for j in pj if j.key in owned]
                pending = [j for j in mine if not self.images.has(j.key)]
                advance(len(mine) - len(pending))
                if not pending:
                    continue
                with _applied(mitigation, model, p, ctx):
                    cond = Conditioning(model.encode_prompt(p.text), model.empty_embedding(), text=p.text)
                    self.prompt(model, p, pj, pending, cond, mitigation, ctx, advance)

    @staticmethod
    def _apply_groups(mitigation: Mitigation | None, jobs: list[Job]) -> list[list[Job]] | None:
        """The jobs split by :meth:`Mitigation.apply_group` of their prompt (first-appearance order; no mitigation:
        one group), or None when a prompt must be generated alone."""
        if mitigation is None:
            return [jobs]
        groups: dict = {}
        for j in jobs:
            g = boundary.call(mitigation, "apply_group", mitigation.apply_group, j.prompt)
            if g is None:
                return None
            groups.setdefault(g, []).append(j)
        return list(groups.values())

    def across_prompts(self, model, jobs: list[Job], owned: set[str], advance) -> None:
        """Images of several prompts per batch (a prompt-independent model); a batch with a cached or another
        shard's image is recomputed whole, and only this shard's missing images are written."""
        g, bs = self.generation, self.batch_size
        for i in range(0, len(jobs), bs):
            chunk = jobs[i: i + bs]
            todo = {j.key for j in chunk if j.key in owned and not self.images.has(j.key)}
            advance(sum(j.key in owned for j in chunk) - len(todo))
            if not todo:
                continue
            enc = {t: model.encode_prompt(t) for t in dict.fromkeys(j.prompt.text for j in chunk)}
            lat = model.initial_latents([j.seed for j in chunk], g["height"], g["width"])
            with torch.no_grad():
                out = model.denoise(torch.cat([enc[j.prompt.text] for j in chunk]), model.empty_embedding(), lat,
                                    g["num_inference_steps"], g["guidance_scale"])
            for j, img in zip(chunk, model.decode(out)):
                if j.key in todo:
                    self.images.put(j.key, img, image_meta(j, {}, model))
            advance(len(todo))

    def sampler(self, model, target: Prompt, mitigation: Mitigation | None, ctx: Context):
        """``ctx.generate`` while an attack runs on ``target``: the deployed system (the applied mitigation, its
        ``condition`` step, the run's sampler settings) as a black box; nothing is cached."""
        g = self.generation

        def generate(prompt: Prompt, seeds: list[int], cond: Conditioning | None, latents) -> list:
            prompt = prompt or target
            if cond is None:
                cond = Conditioning(model.encode_prompt(prompt.text), model.empty_embedding(), text=prompt.text)
            lat = latents if latents is not None else model.initial_latents(seeds, g["height"], g["width"])
            cond, lat = self._conditioned(model, prompt, cond, lat.to(model.device), mitigation, ctx)
            images: list = []
            for i in range(0, len(lat), self.batch_size):
                images.extend(model.decode(self._denoise(model, cond, lat[i: i + self.batch_size], mitigation)))
            return images

        return generate

    def _conditioned(self, model, prompt: Prompt, cond: Conditioning, lat_all, mitigation: Mitigation | None,
                     ctx: Context):
        """The inference-time mitigation's ``condition`` step on ``cond`` and the initial latents of all of the
        prompt's seeds: ``(conditioning, latents)``."""
        if mitigation is None or mitigation.kind == "none":
            return cond, lat_all
        cond = boundary.call(mitigation, "condition", mitigation.condition, model, prompt, cond, lat_all, ctx,
                             expect=Conditioning)
        if cond.latents is not None:
            if tuple(cond.latents.shape) != tuple(lat_all.shape):
                raise boundary.PluginFailure(
                    mitigation, "condition", f"returned latents of shape {tuple(cond.latents.shape)} for the "
                    f"{len(lat_all)} seeds of prompt {prompt.id}; expected {tuple(lat_all.shape)} (one per seed "
                    "it received, in the same order)")
            lat_all = cond.latents.detach().to(lat_all.device, lat_all.dtype)
        return cond, lat_all

    def _denoise(self, model, cond: Conditioning, latents, mitigation: Mitigation | None):
        g = self.generation
        with torch.no_grad():
            args = (cond.prompt_embeds, cond.negative_prompt_embeds, latents, g["num_inference_steps"],
                    g["guidance_scale"])
            return (model.denoise(*args) if cond.guidance is None else  # a guidance is the mitigation's code
                    boundary.call(mitigation, "condition (its guidance)", model.denoise, *args,
                                  guidance=cond.guidance))

    def prompt(self, model, prompt: Prompt, all_jobs: list[Job], pending: list[Job], cond: Conditioning,
               mitigation: Mitigation | None, ctx: Context, advance) -> None:
        """The pending images of one prompt, in batches cut from all of its seeds. The initial latents are the
        seeds' own, or the ones an attack chose (``cond.latents``: one per seed, in seed order)."""
        g = self.generation
        lat_all = model.initial_latents([j.seed for j in all_jobs], g["height"], g["width"])
        if cond.latents is not None:
            if tuple(cond.latents.shape) != tuple(lat_all.shape):
                raise BadInput(f"attack output for prompt {prompt.id}: latents of shape {tuple(cond.latents.shape)}, "
                               f"expected {tuple(lat_all.shape)} (one per seed of the run, in seed order)")
            lat_all = cond.latents.to(lat_all.device, lat_all.dtype)
            cond = dataclasses.replace(cond, latents=None)
        cond, lat_all = self._conditioned(model, prompt, cond, lat_all, mitigation, ctx)
        todo = {j.key for j in pending}
        bs = self.batch_size
        for i in range(0, len(all_jobs), bs):
            chunk = all_jobs[i: i + bs]
            n_todo = sum(j.key in todo for j in chunk)
            if not n_todo:
                continue
            out = self._denoise(model, cond, lat_all[i: i + bs], mitigation)
            for j, img in zip(chunk, model.decode(out)):
                if j.key in todo:
                    # the conditioning trace (e.g. Wen's iterations) travels with every image it produced, so a
                    # result reads the same whether its images were generated now or found in the cache
                    self.images.put(j.key, img, image_meta(j, jsonable_trace(cond.trace), model))
            advance(n_todo)
