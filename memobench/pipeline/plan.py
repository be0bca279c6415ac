"""Plan: the run's jobs (one per image), their cache keys, what is cached, and this shard's part.

A job is (role, prompt, seed, sample key). Roles: ``target`` (the attacked, mitigated targets), ``mitigated`` (the
mitigation alone on the same targets and seeds: paired scoring, when the attack is not the identity), ``baseline``
(no mitigation, no attack: for metrics that compare with it) and one per utility prompt set. A sample key holds
everything that determines the pixels (model, generation settings, mitigation, attack, prompt, seed), never batch
size or shard, so the same image is found in the cache by any run that needs it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..api import Attack, Mitigation, Prompt
from ..cache import CACHE_SCHEMA, key_of
from ..config import BadInput
from ..distributed import Shard, assign_units


@dataclass
class Job:
    role: str
    prompt: Prompt
    seed: int
    key: str


@dataclass
class Plan:
    """What a run does: its prompts, jobs, and which sample keys are cached and owned by this process."""

    prompts: list[Prompt]  # the target prompts (after --limit)
    n_original: int  # target prompts in the set before --limit
    utility: dict[str, list[Prompt]]  # role -> its prompts (after --utility-limit)
    jobs: list[Job]
    baseline_needed: bool
    cached: set[str] = field(default_factory=set)  # sample keys in the cache when the run started
    owned: set[str] = field(default_factory=set)  # sample keys this process generates
    owned_units: set[tuple[str, str]] = field(default_factory=set)  # (role, prompt id) this process generates

    @property
    def unique(self) -> set[str]:
        return {j.key for j in self.jobs}

    def of_role(self, role: str) -> list[Job]:
        return [j for j in self.jobs if j.role == role]


def sample_key(model_ident: dict, generation: dict, prompt: Prompt, seed: int, mitigation: Mitigation | None,
               attack: Attack | None) -> str:
    """Cache key of one generated image (the no-op mitigation and the identity attack count as none)."""
    return key_of({
        "schema": CACHE_SCHEMA, "model": model_ident, "generation": generation,
        "mitigation": None if mitigation is None or mitigation.kind == "none" else mitigation.identity(),
        "attack": None if attack is None or attack.is_identity else attack.identity(),
        "prompt_sha256": prompt.sha256, "seed": int(seed),
    })


def baseline_needed(needs_baseline: bool, mitigation: Mitigation, attack: Attack) -> bool:
    """Whether unmitigated, unattacked images are generated apart from the targets (they are the targets when the
    run has neither a mitigation nor an attack)."""
    return needs_baseline and (mitigation.kind != "none" or not attack.is_identity)


def build_jobs(prompts: list[Prompt], seeds: list[int], utility: dict[str, list[Prompt]], utility_seeds: list[int],
               key: Callable[..., str], mitigation: Mitigation, attack: Attack, paired: bool,
               with_baseline: bool) -> list[Job]:
    """The run's jobs in their fixed order (targets, mitigated, baseline, utility roles); ``key(prompt, seed,
    mitigation, attack)`` gives each its sample key."""
    jobs = [Job("target", p, s, key(p, s, mitigation, attack)) for p in prompts for s in seeds]
    if paired:  # the mitigation alone, on the same targets and seeds: the "no attack" half of the pairing
        jobs += [Job("mitigated", p, s, key(p, s, mitigation, None)) for p in prompts for s in seeds]
    if with_baseline:
        jobs += [Job("baseline", p, s, key(p, s, None, None)) for p in prompts for s in seeds]
    for role, ps in utility.items():
        jobs += [Job(role, p, s, key(p, s, mitigation, None)) for p in ps for s in utility_seeds]
    return jobs


def plan_shard(jobs: list[Job], shard: Shard) -> tuple[set[str], set[tuple[str, str]]]:
    """(sample keys, units) this process generates: see :mod:`memobench.distributed`. A unit is all seeds of one
    prompt in one role; a key that occurs in several units belongs to the first (in job order)."""
    if not shard.sharded:
        return {j.key for j in jobs}, {(j.role, j.prompt.id) for j in jobs}
    units: dict[tuple[str, str], list[str]] = {}
    first: dict[str, tuple[str, str]] = {}
    for j in jobs:
        u = (j.role, j.prompt.id)
        units.setdefault(u, []).append(j.key)
        first.setdefault(j.key, u)
    names = list(units)
    where = assign_units([units[u] for u in names], shard.count, groups=[u[0] for u in names])
    mine = {u for u, w in zip(names, where) if w == shard.index}
    return {k for k, u in first.items() if u in mine}, mine


def dry_run_plan(plan: Plan, shard: Shard, config_hash: str) -> dict:
    """What ``memobench run --dry-run`` prints."""
    unique, cached, owned = plan.unique, plan.cached, plan.owned
    out = {"cached": len(cached), "remaining": len(unique) - len(cached), "jobs": len(plan.jobs),
           "config_hash": config_hash}
    if shard.sharded:
        out["shard"] = {**shard.record(), "owned": len(owned), "owned_cached": len(owned & cached),
                        "owned_remaining": len(owned - cached)}
    return out


def require_complete(jobs: list[Job], has: Callable[[str], bool], no_reference: Callable[[Prompt], bool] | None,
                     cache_dir, who: str) -> None:
    """Raise :class:`BadInput` with the count of the run's samples that are not in the cache. ``no_reference``
    (given when the attack needs a reference image): targets it is True for are skipped by the attack, hence not
    expected."""
    first: dict[str, Job] = {}
    for j in jobs:
        first.setdefault(j.key, j)
    missing = [j for k, j in first.items() if not has(k)]
    if missing and no_reference is not None:
        no_ref = {j.prompt.id for j in missing if j.role == "target" and no_reference(j.prompt)}
        missing = [j for j in missing if not (j.role == "target" and j.prompt.id in no_ref)]
    if missing:
        by_role: dict[str, int] = {}
        for j in missing:
            by_role[j.role] = by_role.get(j.role, 0) + 1
        roles = ", ".join(f"{r} {n}" for r, n in by_role.items())
        raise BadInput(f"{who}: {len(missing)} of {len(first)} samples are not in the cache {cache_dir} "
                       f"({roles}); run the missing shards first (the same `memobench run` options with "
                       "--shard i/n, or the same torchrun / accelerate launch), then aggregate again")
