"""The runner: resolve plugins, generate (cached, resumable), attack, score, write the result.

Phases, each with its own cache so that a crash in one never forces redoing another:

1. *fit* — the mitigation's fit step (its artifacts are cached by the plugin under ``ctx.artifact_path``);
2. *attack* — per target prompt, the attack's conditioning (cached as safetensors + JSON trace);
3. *generate* — per (prompt, seed) image, keyed by everything that determines its pixels (not batch size or
   shard), written atomically as soon as its batch is done; a re-run prints "cached X, remaining Y" and
   generates only what is missing;
4. *score* — metrics over the cached images; one result JSON per run plus a per-sample JSONL table.

Sharded runs (``--shard i/n``, ``torchrun`` / ``accelerate launch``; :mod:`memobench.distributed`): each process
fits, attacks and generates only its units and writes them to the cache; the score phase reads the cache only —
in rank 0 after a barrier, or in ``memobench aggregate`` (:meth:`Runner.run` with ``aggregate=True``) — so the
result is the same whatever the number of shards.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as _dt
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, boundary
from .api import (
    Attack,
    AttackOutput,
    Conditioning,
    Context,
    Metric,
    MetricValue,
    Mitigation,
    ModelPlugin,
    Prompt,
    PromptSet,
    Sample,
)
from .cache import (
    CACHE_SCHEMA,
    CacheError,
    ImageCache,
    TensorCache,
    atomic_write_text,
    clean_stale_tmp,
    default_cache_dir,
    key_of,
)
from .config import BadInput, RunConfig, dumps_strict, validate
from .distributed import ProcessGroup, Shard, assign_units
from .grid import write_grid
from .model import DiffusionModel, size_key_part
from .progress import Interrupted, ProgressReporter
from .registry import Registry, UnknownPluginError, get_registry
from .session import check_output_dir, environment, git_dirty, git_hash
from .util import image_sha256, slug

RESULT_SCHEMA = 1


@dataclass
class Job:
    role: str
    prompt: Prompt
    seed: int
    key: str


@dataclass
class RunOutcome:
    result: dict
    result_path: Path
    samples_path: Path
    grid_path: Path | None
    errors: list[str] = field(default_factory=list)


@dataclass
class ShardOutcome:
    """What a process that does not score (``--shard i/n``, ranks ≠ 0) did: its samples are in the cache."""

    shard: Shard
    owned: int  # sample keys this shard is responsible for
    cached: int  # of those, already in the cache when it started
    generated: int  # of those, in the cache now that were not before
    missing: int  # of those, still not in the cache (skipped prompts, e.g. no reference image for the attack)
    errors: list[str] = field(default_factory=list)


def _instantiate(reg: Registry, kind: str, name: str, params: dict):
    cls = reg.get(kind, name)
    try:
        return cls(cls.make_params(params))
    except (ValueError, TypeError) as e:
        raise BadInput(str(e)) from None


class Runner:
    def __init__(self, cfg: RunConfig, registry: Registry | None = None, progress: bool = True, console=None,
                 shard: Shard | None = None):
        validate(cfg)
        self.cfg = cfg
        self.reg = registry or get_registry()
        self.shard = shard or Shard()
        self.progress = ProgressReporter(enabled=progress, console=console)
        self._resolve()

    # ------------------------------------------------------------------------------------------- planning
    def _resolve(self) -> None:
        cfg, reg = self.cfg, self.reg
        self.model_plugin: ModelPlugin = _instantiate(reg, "model", cfg.model, cfg.model_params)
        mcls = type(self.model_plugin)
        pname = cfg.prompts or mcls.prompt_sets.get("target")
        if not pname:
            raise BadInput(f"--prompts: model '{cfg.model}' has no default prompt set; pass --prompts NAME")
        self.prompt_set: PromptSet = _instantiate(reg, "prompt_set", pname, cfg.prompt_params)
        self.mitigation: Mitigation = _instantiate(reg, "mitigation", cfg.mitigation, cfg.mitigation_params)
        self.attack: Attack = _instantiate(reg, "attack", cfg.attack, cfg.attack_params)
        names = cfg.metrics if cfg.metrics is not None else list(getattr(mcls, "default_metrics", ()))
        unknown_mp = sorted(set(cfg.metric_params) - set(names))
        if unknown_mp:
            raise BadInput(f"metric_params: {', '.join(unknown_mp)} not among the selected metrics {names}")
        self.metrics: list[Metric] = [_instantiate(reg, "metric", n, cfg.metric_params.get(n, {})) for n in names]
        gen = dict(mcls.generation)
        for k in ("num_inference_steps", "guidance_scale", "height", "width"):
            if getattr(cfg, k) is not None:
                gen[k] = getattr(cfg, k)
        self.generation = gen
        self.seeds = list(cfg.seeds if cfg.seeds is not None else getattr(mcls, "default_seeds", range(10)))
        self.utility_seeds = list(cfg.utility_seeds if cfg.utility_seeds is not None
                                  else getattr(mcls, "default_utility_seeds", (0,)))
        roles = {r for m in self.metrics for r in m.roles}
        self.utility_sets: dict[str, PromptSet] = {}
        for role in sorted(roles - {"target"}):
            sname = mcls.prompt_sets.get(role)
            if not sname:
                raise BadInput(f"--metric: a selected metric needs a '{role}' prompt set, which model "
                               f"'{cfg.model}' does not name")
            self.utility_sets[role] = _instantiate(reg, "prompt_set", sname, {})
        self.needs_baseline = any(m.needs_baseline for m in self.metrics)
        # paired scoring: an attack's result also holds the mitigation alone on the same targets and seeds
        self.paired = not getattr(self.attack, "is_identity", False)
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        self.images = ImageCache(self.cache_dir)
        self.attack_cache = TensorCache(self.cache_dir, "attacks")

    def resolved(self) -> dict:
        """The fully resolved, hashable description of the run."""
        return {
            "config": self.cfg.identity(),
            "model": self.model_plugin.identity(),
            "prompt_set": self.prompt_set.identity(),
            "mitigation": self.mitigation.identity(),
            "attack": self.attack.identity(),
            "metrics": [m.identity() for m in self.metrics],
            "generation": self.generation,
            "seeds": self.seeds,
            "utility_seeds": self.utility_seeds if self.utility_sets else [],
            "utility_sets": {r: s.identity() for r, s in self.utility_sets.items()},
        }

    def config_hash(self) -> str:
        return key_of(self.resolved())

    # ------------------------------------------------------------------------------------------- keys
    def _sample_key(self, model_ident: dict, prompt: Prompt, seed: int, mitigation: Mitigation | None,
                    attack: Attack | None) -> str:
        return key_of({
            "schema": CACHE_SCHEMA, "model": model_ident, "generation": self.generation,
            "mitigation": None if mitigation is None or mitigation.kind == "none" else mitigation.identity(),
            "attack": None if attack is None or getattr(attack, "is_identity", False) else attack.identity(),
            "prompt_sha256": prompt.sha256, "seed": int(seed),
        })

    def _attack_key(self, model, model_ident: dict, prompt: Prompt, ref_sha: str | None) -> str:
        size = (self.generation["height"], self.generation["width"])
        return attack_key(model_ident, self.mitigation, self.attack, prompt, ref_sha, size_key_part(model, size))

    # ------------------------------------------------------------------------------------------- run
    def run(self, dry_run: bool = False, aggregate: bool = False) -> RunOutcome | ShardOutcome | dict:
        """Fit, attack, generate and score (see the module docstring).

        ``aggregate=True`` (``memobench aggregate``): fit from the cache and score what the shards wrote, generating
        nothing; a :class:`BadInput` names the count of samples that are not in the cache yet. A process of a sharded
        run that does not score returns a :class:`ShardOutcome`.

        Ctrl-C: :class:`memobench.progress.Interrupted` (a ``KeyboardInterrupt``) carrying how many of the samples
        this process planned are in the cache, and how many it planned."""
        self._planned_keys: set[str] | None = None
        try:
            return self._run(dry_run, aggregate)
        except KeyboardInterrupt as e:
            if isinstance(e, Interrupted) or self._planned_keys is None:
                raise
            keys = self._planned_keys
            raise Interrupted(sum(1 for k in keys if self.images.has(k)), len(keys)) from None

    def _run(self, dry_run: bool, aggregate: bool) -> RunOutcome | ShardOutcome | dict:
        cfg, shard = self.cfg, self.shard
        if aggregate and shard.sharded:
            raise BadInput(f"aggregate: runs in one process over the whole run, not as {shard.describe()}; drop "
                           "--shard and start it without torchrun / accelerate launch")
        out_root = check_output_dir(cfg.output_dir)
        for d in (self.cache_dir, out_root):  # temporary files that a killed run left behind (atomic writes)
            clean_stale_tmp(d)
        device = self._device()
        t_start = time.time()
        timing: dict[str, float] = {}
        ctx = Context(cache_dir=self.cache_dir, offline=cfg.offline, device=device, seeds=tuple(self.seeds),
                      progress=self.progress, generation=dict(self.generation), batch_size=cfg.batch_size,
                      model_prompt_sets=dict(type(self.model_plugin).prompt_sets),
                      registry=self.reg)
        ctx.references = lambda prompt: self._reference(prompt, ctx)
        log = self.progress.log
        t = time.time()
        nonmem = type(self.model_plugin).prompt_sets.get("nonmem")
        if nonmem and nonmem in self.reg.entries["prompt_set"]:
            try:  # e.g. NeMo's activation statistics are computed over the model's non-memorized prompts
                ctx.nonmem_prompts = [p.text for p in _instantiate(self.reg, "prompt_set", nonmem, {})
                                                  .prompts(ctx)]  # optional: failures recorded below
                ctx.nonmem_prompt_set = nonmem
            except Exception as e:  # data not available offline: plugins that need it say so themselves
                ctx.nonmem_prompts_error = f"{type(e).__name__}: {e}"
        all_prompts = boundary.call(self.prompt_set, "prompts", self.prompt_set.prompts, ctx, expect=list)
        prompts = all_prompts[: cfg.limit] if cfg.limit else all_prompts
        if not prompts:
            raise BadInput(f"--prompts: prompt set '{self.prompt_set.name}' is empty")
        utility = {role: boundary.call(s, "prompts", s.prompts, ctx, expect=list)[: cfg.utility_limit or None]
                   for role, s in self.utility_sets.items()}
        timing["prompts_s"] = time.time() - t
        t = time.time()
        model = self._cast(boundary.call(self.model_plugin, "load", self.model_plugin.load, ctx,
                                         expect=DiffusionModel))
        model_ident = model.identity()
        ctx.model_id = key_of(model_ident)
        timing["load_s"] = time.time() - t

        jobs: list[Job] = []
        for p in prompts:
            for s in self.seeds:
                jobs.append(Job("target", p, s, self._sample_key(model_ident, p, s, self.mitigation, self.attack)))
        if self.paired:  # the mitigation alone, on the same targets and seeds: the "no attack" half of the pairing
            for p in prompts:
                for s in self.seeds:
                    jobs.append(Job("mitigated", p, s, self._sample_key(model_ident, p, s, self.mitigation, None)))
        baseline_needed = self.needs_baseline and (self.mitigation.kind != "none"
                                                   or not getattr(self.attack, "is_identity", False))
        if baseline_needed:
            for p in prompts:
                for s in self.seeds:
                    jobs.append(Job("baseline", p, s, self._sample_key(model_ident, p, s, None, None)))
        for role, ps in utility.items():
            for p in ps:
                for s in self.utility_seeds:
                    jobs.append(Job(role, p, s, self._sample_key(model_ident, p, s, self.mitigation, None)))
        unique = {j.key for j in jobs}
        cached = {k for k in unique if self.images.has(k)}
        for k in cached:  # cheap: a missing/corrupt sidecar or an empty PNG fails the run now; the PNG's sha256 is
            self.images.check(k)  # checked whenever the image is read (scoring, grid), never all of them up front
        log(f"[memobench] cached {len(cached)}, remaining {len(unique) - len(cached)} "
            f"(model {cfg.model}, prompts {self.prompt_set.name} ×{len(prompts)}, mitigation {self.mitigation.name}, "
            f"attack {self.attack.name}, seeds {len(self.seeds)})")
        owned, owned_units = self._plan_shard(jobs)
        self._planned_keys = owned  # what Ctrl-C counts (see run)
        if shard.sharded:
            log(f"[memobench] {shard.describe()}: {len(owned)} samples of {len(unique)} are this shard's: cached "
                f"{len(owned & cached)}, remaining {len(owned - cached)}")
        if cfg.limit:
            log(f"[memobench] --limit {cfg.limit}: smoke test only, numbers are not comparable (status: partial)")
        if dry_run:
            plan = {"cached": len(cached), "remaining": len(unique) - len(cached), "jobs": len(jobs),
                    "config_hash": self.config_hash()}
            if shard.sharded:
                plan["shard"] = {**shard.record(), "owned": len(owned), "owned_cached": len(owned & cached),
                                 "owned_remaining": len(owned - cached)}
            return plan

        errors: list[str] = []
        if aggregate:
            self._require_complete(jobs, ctx, "aggregate")
        group = ProcessGroup(shard, device) if shard.group else None
        try:
            with self.progress:
                t = time.time()
                self._fit(model, prompts, owned_units, ctx, group)
                timing["fit_s"] = time.time() - t
                if not aggregate:
                    t = time.time()
                    self._generate_targets(model, model_ident, prompts, jobs, ctx, owned, owned_units)
                    timing["target_s"] = time.time() - t
                    t = time.time()
                    if self.paired:
                        self._generate_plain(model, [j for j in jobs if j.role == "mitigated"], self.mitigation, ctx,
                                             f"mitigated ({self.mitigation.name}, no attack)", owned)
                    if baseline_needed:
                        self._generate_plain(model, [j for j in jobs if j.role == "baseline"], None, ctx, "baseline",
                                             owned)
                    for role in utility:
                        self._generate_plain(model, [j for j in jobs if j.role == role], self.mitigation, ctx, role,
                                             owned, across_prompts=True)
                    timing["other_generation_s"] = time.time() - t
            if shard.sharded:
                now = {k for k in owned if self.images.has(k)}
                log(f"[memobench] {shard.describe()}: generated {len(now - cached)}, cached before "
                    f"{len(owned & cached)}, missing {len(owned - now)} of its {len(owned)} samples")
                if group is not None:
                    group.barrier("generation")  # every rank's samples are in the cache after this
                if not shard.writes_result:
                    return ShardOutcome(shard, len(owned), len(owned & cached), len(now - cached), len(owned - now))
                self._require_complete(jobs, ctx, f"rank {shard.rank}")
        finally:
            if group is not None:
                group.close()
        t = time.time()
        attack_traces = self._attack_traces(model, model_ident, prompts, ctx, errors)
        samples = self._load_samples(jobs, prompts, ctx, errors)
        metrics_out: dict[str, dict] = {}
        metrics_no_attack: dict[str, dict] = {}
        per_sample: dict[str, dict] = {}
        for m in self.metrics:
            subsets = [(metrics_out, [s for s in samples if s.role in m.roles], "")]
            if self.paired and "target" in m.roles:  # the same metric over the mitigation-alone generations
                subsets.append((metrics_no_attack, [s.replace(role="target") for s in samples
                                                    if s.role == "mitigated"], " (no attack)"))
            for dest, subset, label in subsets:
                try:
                    vals = boundary.call(m, "compute", m.compute, subset, ctx, expect=dict)
                    bad = [k for k, v in vals.items() if not isinstance(v, MetricValue)]
                    if bad:
                        raise boundary.PluginFailure(m, "compute", f"returned {type(vals[bad[0]]).__name__} for "
                                                     f"{bad[0]!r}, expected MetricValue")
                except (BadInput, UnknownPluginError, CacheError):
                    raise
                except Exception as e:  # any other metric failure is recorded, the rest of the run survives
                    errors.append(f"{boundary.failure(m, 'compute', e)}{label}")
                    continue
                for name, mv in vals.items():
                    if dest is metrics_no_attack and "target" not in m.roles:
                        continue
                    dest[name] = _metric_record(m, mv)
                    per_sample.setdefault(name, {}).update(mv.per_sample or {})
        timing["score_s"] = time.time() - t
        timing["total_s"] = time.time() - t_start

        status = "failed" if errors and not metrics_out else ("partial" if cfg.limit or errors else "complete")
        chash = self.config_hash()
        run_dir = out_root / slug(cfg.model) / f"{slug(self.mitigation.name)}__{slug(self.attack.name)}"
        run_id = chash[:16]
        result = {
            "schema_version": RESULT_SCHEMA,
            "memobench_version": __version__,
            "git_hash": git_hash(), "git_dirty": git_dirty(),
            "run_id": run_id,
            "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "config_hash": chash,
            "status": status,
            "errors": errors,
            "config": dataclasses.asdict(cfg),
            "model": {**model_ident, "plugin": self.model_plugin.identity(),
                      "source": _jsonable_trace(getattr(model, "source", None) or {})},
            "mitigation": {**self.mitigation.identity(), "kind": self.mitigation.kind,
                           "dist": self.reg.entry("mitigation", self.mitigation.name).dist,
                           "report": self.mitigation.report()},
            "attack": {**self.attack.identity(), "dist": self.reg.entry("attack", self.attack.name).dist},
            "prompt_set": {**self.prompt_set.identity(), "n_original": len(all_prompts),
                           "n_effective": len(prompts),
                           "content_sha256": key_of([p.text for p in prompts]),
                           "source": self.prompt_set.provenance()},
            "utility_sets": {r: {**s.identity(), "n_effective": len(utility[r]),
                                 "content_sha256": key_of([p.text for p in utility[r]]),
                                 "source": s.provenance()} for r, s in self.utility_sets.items()},
            "generation": {**self.generation, "images_per_prompt": len(self.seeds), "batch_size": cfg.batch_size,
                           "negative_prompt": ""},
            "seeds": {"target": self.seeds, "utility": self.utility_seeds if utility else [],
                      "rule": "one CPU torch.Generator().manual_seed(seed) per image; the same seeds for every "
                              "prompt (pass generator=[...] to diffusers to reproduce)"},
            "metrics": metrics_out,
            # paired scoring: when an attack ran, the same target metrics for the mitigation alone (same targets,
            # same seeds); utility metrics do not depend on the attack and live in "metrics" only
            **({"metrics_without_attack": metrics_no_attack} if self.paired else {}),
            "attack_traces": attack_traces,
            "mitigation_traces": self._condition_traces(jobs),
            "env": {**environment(), "world_size": shard.count,
                    "execution": {"shard": shard.record(), "scored_by": "memobench aggregate" if aggregate
                                  else ("rank 0 after the generation barrier" if shard.sharded else "this process")}},
            "timing": timing,
        }
        result_path = run_dir / f"{run_id}.json"
        samples_path = run_dir / f"{run_id}.samples.jsonl"
        grid = None
        try:
            grid = run_dir / f"{run_id}.grid.png"
            write_grid([s for s in samples if s.role == "target"], grid, scores=per_sample.get("sscd_orig"),
                       title=f"mitigation {self.mitigation.name} + attack {self.attack.name}")
            result["grid_file"] = grid.name
            if self.paired:
                g2 = run_dir / f"{run_id}.grid_without_attack.png"
                write_grid([s for s in samples if s.role == "mitigated"], g2, scores=per_sample.get("sscd_orig"),
                           title=f"mitigation {self.mitigation.name}, no attack")
                result["grid_without_attack_file"] = g2.name
        except CacheError:  # a corrupt image found when the grid reads it fails the run like anywhere else
            raise
        except Exception as e:  # the grid is a convenience; never lose the result over it
            errors.append(f"grid: {type(e).__name__}: {e}")
            grid = None
        rows = [_sample_row(s, per_sample) for s in samples]
        # strict JSON (here and in the result): a NaN / ±Infinity is written as null and recorded in "non_finite"
        atomic_write_text(samples_path, "".join(dumps_strict(r, sort_keys=True) + "\n" for r in rows))
        result["samples_file"] = samples_path.name
        atomic_write_text(result_path, dumps_strict(result, indent=1, sort_keys=True, default=str))
        return RunOutcome(result, result_path, samples_path, grid, errors)

    # ------------------------------------------------------------------------------------------- execution
    def _device(self) -> str:
        d = str(self.cfg.device or "cpu")
        if d.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise BadInput(f"--device {d}: no CUDA device is available here; use --device cpu")
            if d == "cuda" and self.shard.group:  # one GPU per rank under torchrun / accelerate launch
                d = f"cuda:{self.shard.local_rank}"
        return d

    def _cast(self, model):
        """Apply ``--dtype`` (the dtype is part of the model identity, hence of every sample key)."""
        want = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(self.cfg.dtype or "")
        if want is not None and model.dtype != want:
            model.set_dtype(want)
        return model

    def _plan_shard(self, jobs: list[Job]) -> tuple[set[str], set[tuple[str, str]]]:
        """(sample keys, units) this process generates: see :mod:`memobench.distributed`. A unit is all seeds of
        one prompt in one role; a key that occurs in several units belongs to the first (in job order)."""
        shard = self.shard
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

    def _fit(self, model, prompts: list[Prompt], owned_units: set[tuple[str, str]], ctx: Context,
             group: ProcessGroup | None) -> None:
        """The mitigation's fit. Sharded, a mitigation whose fit is per prompt (``fit_per_prompt``) first fits the
        targets this shard owns; then every process fits all prompts, which finds the others' artifacts in the
        cache once they are written (in a process group after a barrier; with ``--shard``, concurrent shards may
        compute an artifact twice, and the first complete file wins). Without per-prompt fits, rank 0 fits first."""
        m, shard = self.mitigation, self.shard
        if shard.sharded and getattr(m, "fit_per_prompt", False):
            mine = [p for p in prompts if ("target", p.id) in owned_units]
            if mine:
                boundary.call(m, "fit", m.fit, model, mine, ctx)
            if group is not None:
                group.barrier("fit")
            boundary.call(m, "fit", m.fit, model, prompts, ctx)
        elif group is not None:
            if shard.rank == 0:
                boundary.call(m, "fit", m.fit, model, prompts, ctx)
            group.barrier("fit")
            if shard.rank != 0:
                boundary.call(m, "fit", m.fit, model, prompts, ctx)
        else:
            boundary.call(m, "fit", m.fit, model, prompts, ctx)

    def _require_complete(self, jobs: list[Job], ctx: Context, who: str) -> None:
        """Raise :class:`BadInput` with the count of the run's samples that are not in the cache (targets the
        attack skips for want of a reference image are not expected)."""
        first: dict[str, Job] = {}
        for j in jobs:
            first.setdefault(j.key, j)
        missing = [j for k, j in first.items() if not self.images.has(k)]
        if missing and self.attack.needs_reference and not getattr(self.attack, "is_identity", False):
            no_ref = {j.prompt.id for j in missing if j.role == "target" and not self._reference(j.prompt, ctx)}
            missing = [j for j in missing if not (j.role == "target" and j.prompt.id in no_ref)]
        if missing:
            by_role: dict[str, int] = {}
            for j in missing:
                by_role[j.role] = by_role.get(j.role, 0) + 1
            roles = ", ".join(f"{r} {n}" for r, n in by_role.items())
            raise BadInput(f"{who}: {len(missing)} of {len(first)} samples are not in the cache {self.cache_dir} "
                           f"({roles}); run the missing shards first (the same `memobench run` options with "
                           "--shard i/n, or the same torchrun / accelerate launch), then aggregate again")

    # ------------------------------------------------------------------------------------------- phases
    def _reference(self, prompt: Prompt, ctx: Context) -> list[np.ndarray]:
        refs = []
        for rid in prompt.reference_ids:
            img = self.prompt_set.reference_image(prompt, rid, ctx)
            if img is not None:
                refs.append(img)
        return refs

    def _attack_output(self, model, model_ident: dict, prompt: Prompt, ctx: Context):
        """The conditioning of one target (None when the attack has no reference image for it: that is reported
        by :meth:`_attack_traces`, which reads every target's attack output from the cache for the result)."""
        if getattr(self.attack, "is_identity", False):
            emb = model.encode_prompt(prompt.text)
            return Conditioning(emb, model.empty_embedding(), text=prompt.text)
        ref = None
        if self.attack.needs_reference:
            refs = self._reference(prompt, ctx)
            if not refs:
                return None
            ref = refs[0]
        ref_sha = image_sha256(ref) if ref is not None else None
        key = self._attack_key(model, model_ident, prompt, ref_sha)
        tensors, _, _ = cached_attack(self.attack_cache, key, self.attack, model, prompt, ref, ctx)
        cond = Conditioning(tensors["prompt_embeds"].to(model.device, model.dtype),
                            tensors["negative_prompt_embeds"].to(model.device, model.dtype), text=None)
        return cond

    def _attack_traces(self, model, model_ident: dict, prompts: list[Prompt], ctx: Context,
                       errors: list[str]) -> dict:
        """Per target prompt, the attack's trace as stored in the attack cache (whichever process attacked it)."""
        if getattr(self.attack, "is_identity", False):
            return {}
        traces: dict[str, Any] = {}
        for p in prompts:
            ref_sha = None
            if self.attack.needs_reference:
                refs = self._reference(p, ctx)
                if not refs:
                    errors.append(f"attack {self.attack.name}: prompt {p.id} has no reference image; skipped")
                    continue
                ref_sha = image_sha256(refs[0])
            key = self._attack_key(model, model_ident, p, ref_sha)
            if not self.attack_cache.has(key):
                errors.append(f"attack {self.attack.name}: prompt {p.id}: no attack output in the cache ({key[:16]})")
                continue
            _, meta = self.attack_cache.get(key)
            traces[p.id] = {"attack_key": key, **meta.get("trace", {})}
        return traces

    def _generate_targets(self, model, model_ident, prompts, jobs, ctx, owned: set[str],
                          owned_units: set[tuple[str, str]]) -> None:
        by_prompt: dict[str, list[Job]] = {}
        for j in jobs:
            if j.role == "target":
                by_prompt.setdefault(j.prompt.id, []).append(j)
        total = sum(1 for j in jobs if j.role == "target" and j.key in owned)
        label = "generate" if getattr(self.attack, "is_identity", False) else f"attack {self.attack.name} + generate"
        with ctx.task(f"{label} ({self.mitigation.name})", total) as advance:
            for p in prompts:
                pj = by_prompt[p.id]
                mine = [j for j in pj if j.key in owned]
                pending = [j for j in mine if not self.images.has(j.key)]
                advance(len(mine) - len(pending))
                # a shard attacks exactly the targets whose unit it owns (their attack output is cached for the
                # result even when all their images already are)
                need_attack = bool(pending) or (("target", p.id) in owned_units
                                                and not getattr(self.attack, "is_identity", False))
                if not need_attack:
                    continue
                with boundary.context(self.mitigation, "apply", lambda: self.mitigation.apply(model, p, ctx)):
                    cond = self._attack_output(model, model_ident, p, ctx)
                    if cond is None:
                        advance(len(pending))
                        continue
                    if pending:
                        self._generate_prompt(model, p, pj, pending, cond, self.mitigation, ctx, advance)

    def _generate_plain(self, model, jobs: list[Job], mitigation: Mitigation | None, ctx: Context, role: str,
                        owned: set[str], across_prompts: bool = False) -> None:
        """``across_prompts``: several prompts per batch when the model is the same for every prompt (utility sets
        only: target prompts' images share their cache keys between runs and are always batched per prompt)."""
        with ctx.task(f"generate {role}", sum(j.key in owned for j in jobs)) as advance:
            if across_prompts and (mitigation is None or mitigation.prompt_independent):
                with (boundary.context(mitigation, "apply", lambda: mitigation.apply(model, None, ctx))
                      if mitigation is not None else contextlib.nullcontext()):
                    self._generate_across_prompts(model, jobs, owned, advance)
                return
            by_prompt: dict[str, list[Job]] = {}
            for j in jobs:
                by_prompt.setdefault(j.prompt.id, []).append(j)
            for pj in by_prompt.values():
                p = pj[0].prompt
                mine = [j for j in pj if j.key in owned]
                pending = [j for j in mine if not self.images.has(j.key)]
                advance(len(mine) - len(pending))
                if not pending:
                    continue
                cm = (boundary.context(mitigation, "apply", lambda: mitigation.apply(model, p, ctx))
                      if mitigation is not None else contextlib.nullcontext())
                with cm:
                    cond = Conditioning(model.encode_prompt(p.text), model.empty_embedding(), text=p.text)
                    self._generate_prompt(model, p, pj, pending, cond, mitigation, ctx, advance)

    def _generate_across_prompts(self, model, jobs: list[Job], owned: set[str], advance) -> None:
        """Images of several prompts per batch (a prompt-independent model). As in :meth:`_generate_prompt`, batches
        are cut at fixed boundaries of the full job list (never of the pending jobs only), so a resumed or sharded
        run computes every image in the same batch as an uninterrupted one; a batch with a cached or another
        shard's image is recomputed whole, and only this shard's missing images are written."""
        g, bs = self.generation, self.cfg.batch_size
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
                    self.images.put(j.key, img, _image_meta(j, {}))
            advance(len(todo))

    def _generate_prompt(self, model, prompt: Prompt, all_jobs: list[Job], pending: list[Job], cond: Conditioning,
                         mitigation: Mitigation | None, ctx: Context, advance) -> None:
        g = self.generation
        seeds_all = [j.seed for j in all_jobs]
        lat_all = model.initial_latents(seeds_all, g["height"], g["width"])
        if mitigation is not None and mitigation.kind != "none":
            # inference-time mitigations see the latents of all of the prompt's seeds (never only the pending
            # ones), so that what they compute does not depend on what happened to be cached
            cond = boundary.call(mitigation, "condition", mitigation.condition, model, prompt, cond, lat_all, ctx,
                                 expect=Conditioning)
        todo = {j.key for j in pending}
        bs = self.cfg.batch_size
        # Batches are cut from *all* of the prompt's seeds at fixed boundaries, never from the pending ones only:
        # CPU/GPU kernels can change a few uint8 values by one level with the batch composition, so this way a
        # resumed run computes every image in the same batch as an uninterrupted run (bit-identical resume). A
        # batch with a cached image is recomputed whole; cached images are never rewritten.
        for i in range(0, len(all_jobs), bs):
            chunk = all_jobs[i: i + bs]
            n_todo = sum(j.key in todo for j in chunk)
            if not n_todo:
                continue
            with torch.no_grad():
                out = model.denoise(cond.prompt_embeds, cond.negative_prompt_embeds, lat_all[i: i + bs],
                                    g["num_inference_steps"], g["guidance_scale"])
            imgs = model.decode(out)
            for j, img in zip(chunk, imgs):
                if j.key in todo:
                    # the conditioning trace (e.g. Wen's iterations) travels with every image it produced, so a
                    # result reads the same whether its images were generated now or found in the cache
                    self.images.put(j.key, img, _image_meta(j, _jsonable_trace(cond.trace)))
            advance(n_todo)

    def _condition_traces(self, jobs: list[Job]) -> dict:
        """Per target prompt, the inference-time mitigation's trace stored with its first image."""
        out: dict[str, dict] = {}
        for j in jobs:
            if j.role == "target" and j.prompt.id not in out and self.images.has(j.key):
                tr = self.images.meta(j.key).get("condition_trace")
                if tr:
                    out[j.prompt.id] = tr
        return out

    def _load_samples(self, jobs: list[Job], prompts: list[Prompt], ctx: Context, errors: list[str]) -> list[Sample]:
        """The run's samples, *streamed*: each holds loaders, not pixels (:class:`memobench.api.Sample`). An image
        (and its baseline) is decoded from the cache, sha256-checked, when a metric or the grid reads it and is not
        kept; a prompt's reference images are loaded about once per prompt and kept while they fit in a bounded
        store (:class:`_ReferenceStore`). Memory is then a batch of images plus features, whatever the number of
        samples."""
        refs = _ReferenceStore()
        baseline = {(j.prompt.id, j.seed): j.key for j in jobs if j.role == "baseline"}
        if not baseline and self.needs_baseline:
            baseline = {(j.prompt.id, j.seed): j.key for j in jobs if j.role == "target"}
        out = []
        for j in jobs:
            if j.role == "baseline":
                continue
            if not self.images.has(j.key):
                continue  # recorded as an error by the phase that skipped it
            if j.role in ("target", "mitigated"):
                ref_loader = functools.partial(refs.get, ("target", j.prompt.id),
                                               functools.partial(self._reference, j.prompt, ctx))
            else:
                ref_loader = functools.partial(refs.get, (j.role, j.prompt.id),
                                               functools.partial(self._utility_references, j.role, j.prompt, ctx))
            bkey = baseline.get((j.prompt.id, j.seed)) if j.role in ("target", "mitigated") else None
            out.append(Sample(sample_key=j.key, prompt=j.prompt, seed=j.seed, role=j.role,
                              image_loader=functools.partial(self.images.get, j.key),
                              references_loader=ref_loader,
                              baseline_loader=(functools.partial(self.images.get, bkey)
                                               if bkey and self.images.has(bkey) else None),
                              extra={"image_sha256": self.images.meta(j.key)["image_sha256"]}))
        return out

    def _utility_references(self, role: str, prompt: Prompt, ctx: Context) -> list[np.ndarray]:
        ps = self.utility_sets[role]
        return [x for rid in prompt.reference_ids if (x := ps.reference_image(prompt, rid, ctx)) is not None]


class _ReferenceStore:
    """Reference images by prompt, loaded on first use and kept while they fit in ``max_bytes`` (least recently used
    prompts dropped first; the prompt just loaded is always kept). Metrics visit samples prompt by prompt, so a
    prompt's references are loaded about once, and memory stays bounded whatever the number of prompts."""

    def __init__(self, max_bytes: int = 128 << 20):
        self.max_bytes = max_bytes
        self._lists: collections.OrderedDict = collections.OrderedDict()  # key -> (list, bytes)
        self._bytes = 0

    def get(self, key: tuple, load) -> list:
        if key in self._lists:
            self._lists.move_to_end(key)
            return self._lists[key][0]
        refs = load()
        size = sum(int(getattr(r, "nbytes", 0)) for r in refs)
        self._lists[key] = (refs, size)
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._lists) > 1:
            _, (_, b) = self._lists.popitem(last=False)
            self._bytes -= b
        return refs


def _metric_record(m: Metric, mv: MetricValue) -> dict:
    info = m.info
    rec = {
        "value": mv.value, "n": mv.n, "dispersion": mv.dispersion, "groups": mv.groups,
        "higher_is_better": info.higher_is_better, "min": info.min, "max": info.max,
        "display_name": mv.display_name or info.display_name, "metric_plugin": m.identity(), "impl": mv.impl,
        "extra": mv.extra,
    }
    if mv.unavailable:
        rec["unavailable"] = mv.unavailable
    return rec


def _sample_row(s: Sample, per_sample: dict[str, dict]) -> dict:
    row = {"sample_key": s.sample_key, "role": s.role, "prompt_id": s.prompt.id, "prompt": s.prompt.text,
           "prompt_sha256": s.prompt.sha256, "mem_type": s.prompt.mem_type, "seed": s.seed,
           "image_path": f"images/{s.sample_key[:2]}/{s.sample_key}.png",
           "image_sha256": s.extra.get("image_sha256"), "n_references": len(s.references)}
    for name, ps in per_sample.items():
        if s.sample_key in ps:
            row[name] = ps[s.sample_key]
    return row


def _image_meta(job: Job, condition_trace: dict) -> dict:
    """The sidecar of a generated image."""
    return {"prompt_id": job.prompt.id, "prompt_sha256": job.prompt.sha256, "seed": job.seed, "role": job.role,
            "condition_trace": condition_trace}


def _jsonable_trace(trace: dict) -> dict:
    return json.loads(json.dumps(trace or {}, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def attack_key(model_ident: dict, mitigation: Mitigation | None, attack: Attack, prompt: Prompt,
               ref_sha: str | None, size_part: tuple[str, ...] = ()) -> str:
    """Cache key of one attack output: the model, the mitigation it attacked (None = no mitigation), the attack
    (with its params), the target prompt and its reference image, and the size the attack encoded the image at
    (``size_part``: :func:`memobench.model.size_key_part`, empty at the native size). The Runner and analyses such
    as ``memobench analyze locality`` share these entries."""
    rec = {"schema": CACHE_SCHEMA, "model": model_ident,
           "mitigation": None if mitigation is None or mitigation.kind == "none" else mitigation.identity(),
           "attack": attack.identity(), "prompt_sha256": prompt.sha256, "reference": ref_sha}
    if size_part:
        rec["size"] = list(size_part)
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
    meta = {"trace": out.trace, "prompt_id": prompt.id, "attack": attack.identity()}
    cache.put(key, tensors, meta)
    return tensors, meta, False
