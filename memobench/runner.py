"""The runner: resolve the plugins of a configuration, then run its phases in data-flow order.

plan → fit → attack → generate → score → write, one module each in :mod:`memobench.pipeline`; every phase has its
own cache, so that a crash in one never forces redoing another:

1. *plan* (:mod:`~memobench.pipeline.plan`) — the jobs (one per image) and their sample keys, what is cached, this
   shard's part; ``--dry-run`` stops here;
2. *fit* (:mod:`~memobench.pipeline.fit`) — the mitigation's fit step (artifacts cached under ``ctx.artifact_path``);
3. *attack* (:mod:`~memobench.pipeline.attack`) — per target prompt, the attack's conditioning (cached as
   safetensors + JSON trace);
4. *generate* (:mod:`~memobench.pipeline.generate`) — per (prompt, seed) image, keyed by everything that determines
   its pixels (not batch size or shard), written atomically as soon as its batch is done; a re-run prints
   "cached X, remaining Y" and generates only what is missing;
5. *score* (:mod:`~memobench.pipeline.score`) — metrics over the cached images, streamed;
6. *write* (:mod:`~memobench.pipeline.write`) — one result JSON per run, a per-sample JSONL table and the grids.

Sharded runs (``--shard i/n``, ``torchrun`` / ``accelerate launch``; :mod:`memobench.distributed`): each process
fits, attacks and generates only its units and writes them to the cache; the score phase reads the cache only —
in rank 0 after a barrier, or in ``memobench aggregate`` (:meth:`Runner.run` with ``aggregate=True``) — so the
result is the same whatever the number of shards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import boundary
from .api import Attack, Context, Metric, Mitigation, ModelPlugin, Prompt, PromptSet, Sample
from .cache import ImageCache, TensorCache, clean_stale_tmp, default_cache_dir, key_of
from .config import BadInput, RunConfig, resolve_defaults, validate
from .distributed import ProcessGroup, Shard
from .grid import write_grid  # noqa: F401  (re-exported: memobench.runner.write_grid)
from .model import DiffusionModel
from .pipeline import budget as _budget
from .pipeline import plan as _plan
from .pipeline.attack import AttackPhase, attack_key, cached_attack  # noqa: F401  (re-exported)
from .pipeline.fit import fit
from .pipeline.generate import Generator
from .pipeline.plan import Job, Plan
from .pipeline.score import condition_traces, image_provenance, load_samples, score
from .pipeline.write import RESULT_SCHEMA, RunOutcome, assemble_result, run_dir, write_grids, write_result  # noqa: F401
from .progress import Interrupted, ProgressReporter
from .registry import Registry, get_registry
from .session import check_output_dir, environment  # noqa: F401  (re-exported for callers of the old location)
from .util import image_sha256  # noqa: F401  (re-exported: plugins imported it from here before memobench.api)


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


def weights_fingerprint(model: DiffusionModel) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every parameter and buffer of the model's modules, and
    over their hooks and attention processors (what a mitigation may install and must remove)."""
    import hashlib

    h = hashlib.sha256()
    for part in ("unet", "text_encoder", "vae"):
        module = getattr(model, part, None)
        if module is None:
            continue
        for name, t in module.state_dict().items():
            t = t.detach().contiguous()
            h.update(f"{part}.{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        for name, m in module.named_modules():
            hooks = (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            proc = type(getattr(m, "processor", None)).__name__
            h.update(f"{part}.{name}|{hooks}|{proc}|{m.training}".encode())
    return h.hexdigest()


class Runner:
    def __init__(self, cfg: RunConfig, registry: Registry | None = None, progress: bool = True, console=None,
                 shard: Shard | None = None):
        validate(cfg)
        self.reg = registry or get_registry()
        self.cfg = resolve_defaults(cfg, self.reg)  # unset model / mitigation / attack: the registry's defaults
        self.shard = shard or Shard()
        self.model_memo: dict | None = None  # see _load_model (set by `run --matrix`)
        self.progress = ProgressReporter(enabled=progress, console=console)
        self._resolve()

    # ------------------------------------------------------------------------------------------- resolution
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
        names = cfg.metrics if cfg.metrics is not None else list(mcls.default_metrics)
        unknown_mp = sorted(set(cfg.metric_params) - set(names))
        if unknown_mp:
            raise BadInput(f"metric_params: {', '.join(unknown_mp)} not among the selected metrics {names}")
        self.metrics: list[Metric] = [_instantiate(reg, "metric", n, cfg.metric_params.get(n, {})) for n in names]
        gen = dict(mcls.generation)
        for k in ("num_inference_steps", "guidance_scale", "height", "width"):
            if getattr(cfg, k) is not None:
                gen[k] = getattr(cfg, k)
        self.generation = gen
        self.seeds = list(cfg.seeds if cfg.seeds is not None else mcls.default_seeds)
        self.utility_seeds = list(cfg.utility_seeds if cfg.utility_seeds is not None else mcls.default_utility_seeds)
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
        self.paired = not self.attack.is_identity
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

    # ------------------------------------------------------------------------------------------- run
    def run(self, dry_run: bool = False, aggregate: bool = False) -> RunOutcome | ShardOutcome | dict:
        """Plan, fit, attack, generate, score and write (see the module docstring).

        ``aggregate=True`` (``memobench aggregate``): fit from the cache and score what the shards wrote, generating
        nothing; a :class:`BadInput` names the count of samples that are not in the cache yet. A process of a sharded
        run that does not score returns a :class:`ShardOutcome`; ``dry_run`` returns the plan (a dict).

        Ctrl-C: :class:`memobench.progress.Interrupted` (a ``KeyboardInterrupt``) carrying how many of the samples
        this process planned are in the cache, and how many it planned."""
        self._planned_keys: set[str] | None = None
        self._score_only = False
        if self.cfg.budget_sweep is not None:
            if self.shard.sharded or aggregate:
                raise BadInput("--budget-sweep: runs in one process; drop --shard / aggregate")
            _budget.check_sweep(self.attack, self.cfg.budget_sweep)
        try:
            return self._run(dry_run, aggregate)
        except KeyboardInterrupt as e:
            if isinstance(e, Interrupted) or self._planned_keys is None:
                raise
            keys = self._planned_keys
            raise Interrupted(sum(1 for k in keys if self.images.has(k)), len(keys)) from None

    def _run(self, dry_run: bool, aggregate: bool) -> RunOutcome | ShardOutcome | dict:
        if aggregate and self.shard.sharded:
            raise BadInput(f"aggregate: runs in one process over the whole run, not as {self.shard.describe()}; "
                           "drop --shard and start it without torchrun / accelerate launch")
        out_root = check_output_dir(self.cfg.output_dir)
        for d in (self.cache_dir, out_root):  # temporary files that a killed run left behind (atomic writes)
            clean_stale_tmp(d)
        device = self._device()
        timing: dict[str, float] = {}
        t_start = time.time()
        ctx = self._context(device)
        model, model_ident, plan = self._load_and_plan(ctx, timing)
        self._planned_keys = plan.owned  # what Ctrl-C counts (see run)
        if dry_run:
            return _plan.dry_run_plan(plan, self.shard, self.config_hash())
        if aggregate:
            self._require_complete(plan.jobs, ctx, "aggregate")
        attacks = AttackPhase(self.attack, self.mitigation, self.attack_cache, self.generation,
                              lambda prompt: self._reference(prompt, ctx), n_seeds=len(ctx.seeds))
        shard_done = self._fit_and_generate(model, model_ident, plan, ctx, attacks, device, aggregate, timing)
        if shard_done is not None:
            return shard_done
        errors: list[str] = []
        t = time.time()
        traces = {"attack": attacks.traces(model, model_ident, plan.prompts, errors)}
        samples = self._load_samples(plan.jobs, plan.prompts, ctx, errors)
        scores = score(self.metrics, samples, ctx, self.paired, errors)
        timing["score_s"] = time.time() - t
        if self._score_only:
            return scores
        if self.cfg.budget_sweep is not None:
            t = time.time()
            sweep = _budget.sweep(self, _budget.check_sweep(self.attack, self.cfg.budget_sweep), self.progress)
            timing["budget_sweep_s"] = time.time() - t
        timing["total_s"] = time.time() - t_start
        traces["mitigation"] = condition_traces(plan.jobs, self.images)
        traces["provenance"] = image_provenance(plan.jobs, self.images)
        result = assemble_result(self, plan, model, model_ident, scores, traces, errors, timing, aggregate)
        if self.cfg.budget_sweep is not None:
            result["budget_sweep"] = sweep
        directory = run_dir(out_root, self.cfg.model, self.mitigation.name, self.attack.name)
        grid = write_grids(result, samples, scores, directory, self.mitigation.name, self.attack.name, self.paired,
                           errors)
        result_path, samples_path = write_result(result, samples, scores.per_sample, directory)
        return RunOutcome(result, result_path, samples_path, grid, errors)

    def score_only(self):
        """Fit, attack, generate (what is not cached) and score, without writing a result: the run's
        :class:`memobench.pipeline.score.Scores` (a budget sweep's points)."""
        self._planned_keys, self._score_only = None, True
        try:
            return self._run(False, False)
        finally:
            self._score_only = False

    # ------------------------------------------------------------------------------------------- phases
    def _context(self, device: str) -> Context:
        """The plugins' context; the model's non-memorized prompts when it names a set of them."""
        ctx = Context(cache_dir=self.cache_dir, offline=self.cfg.offline, device=device, seeds=tuple(self.seeds),
                      progress=self.progress, generation=dict(self.generation), batch_size=self.cfg.batch_size,
                      model_prompt_sets=dict(type(self.model_plugin).prompt_sets), registry=self.reg)
        ctx.references = lambda prompt: self._reference(prompt, ctx)
        nonmem = type(self.model_plugin).prompt_sets.get("nonmem")
        if nonmem and nonmem in self.reg.entries["prompt_set"]:
            try:  # e.g. NeMo's activation statistics are computed over the model's non-memorized prompts
                ctx.nonmem_prompts = [p.text for p in _instantiate(self.reg, "prompt_set", nonmem, {})
                                                  .prompts(ctx)]  # optional: failures recorded below
                ctx.nonmem_prompt_set = nonmem
            except Exception as e:  # data not available offline: plugins that need it say so themselves
                ctx.nonmem_prompts_error = f"{type(e).__name__}: {e}"
        return ctx

    def _load_and_plan(self, ctx: Context, timing: dict) -> tuple[DiffusionModel, dict, Plan]:
        """Read the prompts, load the model and plan the jobs (logging what is cached and what remains)."""
        cfg, log = self.cfg, self.progress.log
        t = time.time()
        all_prompts = boundary.call(self.prompt_set, "prompts", self.prompt_set.prompts, ctx, expect=list)
        prompts = all_prompts[: cfg.limit] if cfg.limit else all_prompts
        if not prompts:
            raise BadInput(f"--prompts: prompt set '{self.prompt_set.name}' is empty")
        utility = {role: boundary.call(s, "prompts", s.prompts, ctx, expect=list)[: cfg.utility_limit or None]
                   for role, s in self.utility_sets.items()}
        timing["prompts_s"] = time.time() - t
        t = time.time()
        model = self._load_model(ctx)
        model_ident = model.identity()
        ctx.model_id = key_of(model_ident)
        timing["load_s"] = time.time() - t

        def key(p: Prompt, s: int, mitigation: Mitigation | None, attack: Attack | None) -> str:
            return _plan.sample_key(model_ident, self.generation, p, s, mitigation, attack)

        with_baseline = _plan.baseline_needed(self.needs_baseline, self.mitigation, self.attack)
        jobs = _plan.build_jobs(prompts, self.seeds, utility, self.utility_seeds, key, self.mitigation, self.attack,
                                self.paired, with_baseline)
        plan = Plan(prompts, len(all_prompts), utility, jobs, with_baseline)
        unique = plan.unique
        plan.cached = {k for k in unique if self.images.has(k)}
        for k in plan.cached:  # cheap: a missing/corrupt sidecar or an empty PNG fails the run now; the PNG's sha256
            self.images.check(k)  # is checked whenever the image is read (scoring, grid), never all of them up front
        cached = plan.cached
        log(f"[memobench] cached {len(cached)}, remaining {len(unique) - len(cached)} "
            f"(model {cfg.model}, prompts {self.prompt_set.name} ×{len(prompts)}, mitigation {self.mitigation.name}, "
            f"attack {self.attack.name}, seeds {len(self.seeds)})")
        plan.owned, plan.owned_units = _plan.plan_shard(jobs, self.shard)
        owned = plan.owned
        if self.shard.sharded:
            log(f"[memobench] {self.shard.describe()}: {len(owned)} samples of {len(unique)} are this shard's: "
                f"cached {len(owned & cached)}, remaining {len(owned - cached)}")
        if cfg.limit:
            log(f"[memobench] --limit {cfg.limit}: smoke test only, numbers are not comparable (status: partial)")
        return model, model_ident, plan

    def _fit_and_generate(self, model, model_ident: dict, plan: Plan, ctx: Context, attacks: AttackPhase,
                          device: str, aggregate: bool, timing: dict) -> ShardOutcome | None:
        """Fit, then (unless aggregating) attack and generate this process's jobs; a sharded process waits for the
        others, and one that does not score returns its :class:`ShardOutcome`."""
        shard = self.shard
        group = ProcessGroup(shard, device) if shard.group else None
        try:
            with self.progress:
                t = time.time()
                fit(self.mitigation, model, plan.prompts, plan.owned_units, ctx, shard, group)
                timing["fit_s"] = time.time() - t
                if not aggregate:
                    gen = Generator(self.images, self.generation, self.cfg.batch_size)
                    gen.all_roles(model, model_ident, plan, ctx, attacks, self.paired, timing)
            if not shard.sharded:
                return None
            owned, cached = plan.owned, plan.cached
            now = {k for k in owned if self.images.has(k)}
            self.progress.log(f"[memobench] {shard.describe()}: generated {len(now - cached)}, cached before "
                              f"{len(owned & cached)}, missing {len(owned - now)} of its {len(owned)} samples")
            if group is not None:
                group.barrier("generation")  # every rank's samples are in the cache after this
            if not shard.writes_result:
                return ShardOutcome(shard, len(owned), len(owned & cached), len(now - cached), len(owned - now))
            self._require_complete(plan.jobs, ctx, f"rank {shard.rank}")
            return None
        finally:
            if group is not None:
                group.close()

    # ------------------------------------------------------------------------------------------- helpers
    def _device(self) -> str:
        """The device of this process (``--device`` is checked by :func:`memobench.config.validate`): under torchrun /
        accelerate launch, ``cuda`` means this rank's GPU."""
        d = str(self.cfg.device or "cpu")
        if d == "cuda" and self.shard.group:  # one GPU per rank
            d = f"cuda:{self.shard.local_rank}"
        return d

    def _load_model(self, ctx: Context) -> DiffusionModel:
        """The model plugin's model, cast to ``--dtype``. With :attr:`model_memo` (``run --matrix``: one process, many
        pairings) a model loaded by an earlier run with the same plugin identity, device and dtype is reused when its
        weights are still bit-identical to how they were loaded (:func:`weights_fingerprint`; a mitigation must
        restore what it changes): loading is then paid once per matrix, not once per pairing."""
        memo = self.model_memo
        key = key_of([self.model_plugin.identity(), str(ctx.device), self.cfg.dtype]) if memo is not None else None
        if memo is not None and key in memo:
            model, fingerprint = memo[key]
            if weights_fingerprint(model) == fingerprint:
                return model
            del memo[key]
            self.progress.log("[memobench] the model's weights changed during the previous pairing (a mitigation did "
                              "not restore them); loading it again")
        model = self._cast(boundary.call(self.model_plugin, "load", self.model_plugin.load, ctx,
                                         expect=DiffusionModel))
        if memo is not None:
            memo[key] = (model, weights_fingerprint(model))
        return model

    def _cast(self, model):
        """Apply ``--dtype`` (the dtype is part of the model identity, hence of every sample key)."""
        want = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(self.cfg.dtype or "")
        if want is not None and model.dtype != want:
            model.set_dtype(want)
        return model

    def _require_complete(self, jobs: list[Job], ctx: Context, who: str) -> None:
        """:class:`BadInput` naming the count of the run's samples not in the cache (targets the attack skips for
        want of a reference image are not expected)."""
        no_ref = ((lambda p: not self._reference(p, ctx))
                  if self.attack.needs_reference and not self.attack.is_identity else None)
        _plan.require_complete(jobs, self.images.has, no_ref, self.cache_dir, who)

    def _reference(self, prompt: Prompt, ctx: Context) -> list[np.ndarray]:
        refs = []
        for rid in prompt.reference_ids:
            img = self.prompt_set.reference_image(prompt, rid, ctx)
            if img is not None:
                refs.append(img)
        return refs

    def _utility_references(self, role: str, prompt: Prompt, ctx: Context) -> list[np.ndarray]:
        ps = self.utility_sets[role]
        return [x for rid in prompt.reference_ids if (x := ps.reference_image(prompt, rid, ctx)) is not None]

    def _load_samples(self, jobs: list[Job], prompts: list[Prompt], ctx: Context, errors: list[str]) -> list[Sample]:
        """The run's streamed samples (:func:`memobench.pipeline.score.load_samples`): where the score phase starts."""
        return load_samples(jobs, self.images, self.needs_baseline, lambda p: self._reference(p, ctx),
                            lambda role, p: self._utility_references(role, p, ctx))
