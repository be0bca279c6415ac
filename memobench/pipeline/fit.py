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
