"""Fit: the mitigation's fit step (its artifacts are cached by the plugin under ``ctx.artifact_path``)."""

from __future__ import annotations

from .. import boundary
from ..api import Context, Mitigation, Prompt
from ..distributed import ProcessGroup, Shard


def fit(mitigation: Mitigation, model, prompts: list[Prompt], owned_units: set[tuple[str, str]], ctx: Context,
        shard: Shard, group: ProcessGroup | None) -> None:
    """The mitigation's fit. Sharded, a mitigation whose fit is per prompt (``fit_per_prompt``) first fits the
    targets this shard owns; then every process fits all prompts, which finds the others' artifacts in the cache
    once they are written (in a process group after a barrier; with ``--shard``, concurrent shards may compute an
    artifact twice, and the first complete file wins). Without per-prompt fits, rank 0 fits first."""
    m = mitigation

    def fit_all(ps: list[Prompt]) -> None:
        boundary.call(m, "fit", m.fit, model, ps, ctx)

    if shard.sharded and m.fit_per_prompt:
        mine = [p for p in prompts if ("target", p.id) in owned_units]
        if mine:
            fit_all(mine)
        if group is not None:
            group.barrier("fit")
        fit_all(prompts)
    elif group is not None:
        if shard.rank == 0:
            fit_all(prompts)
        group.barrier("fit")
        if shard.rank != 0:
            fit_all(prompts)
    else:
        fit_all(prompts)


def caption_image_pairs(model, ctx: Context, prompt_set: str, n: int, size: tuple[int, int], label: str):
    """Up to ``n`` (caption, latent) pairs of a prompt set with reference images: each prompt's first reference
    image, encoded (posterior mean, fp32) at ``size``, the run's generation size. The regular data that fine-tuning
    mitigations (advft, wen_train) train on beside the memorized pairs; ``label`` names the caller in the progress
    line. Returns the captions and their latents (None when no prompt has an image)."""
    import torch

    ps = ctx.plugin("prompt_set", prompt_set)
    texts, lats = [], []
    prompts = ps.prompts(ctx)[:n]
    with ctx.task(f"{label}: regular pairs (encode {len(prompts)} images)", len(prompts), transient=True) as adv:
        for q in prompts:
            for rid in q.reference_ids[:1]:
                img = ps.reference_image(q, rid, ctx)
                if img is not None:
                    texts.append(q.text)
                    lats.append(model.encode_image(img, height=size[0], width=size[1]).float())
            adv()
    return texts, (torch.cat(lats) if lats else None)
