"""Write: the result JSON (one per run), the per-sample JSONL table and the run's grids, each written atomically.

Files go to ``<output dir>/<model>/<mitigation>__<attack>/<run id>.*``; the run id is the first 16 hex digits of the
config hash, so re-running the same configuration replaces its files.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..api import Sample
from ..cache import CacheError, atomic_write_text, key_of
from ..config import dumps_strict
from ..grid import write_grid
from ..session import environment, git_dirty, git_hash
from ..util import slug
from .generate import jsonable_trace
from .score import Scores, sample_row

RESULT_SCHEMA = 1
SEED_RULE = ("one CPU torch.Generator().manual_seed(seed) per image; the same seeds for every prompt (pass "
             "generator=[...] to diffusers to reproduce)")


@dataclass
class RunOutcome:
    result: dict
    result_path: Path
    samples_path: Path
    grid_path: Path | None
    errors: list[str] = field(default_factory=list)


def run_status(errors: list[str], scores: Scores, limit: int | None) -> str:
    return "failed" if errors and not scores.metrics else ("partial" if limit or errors else "complete")


def _prompt_sets(run: Any, plan: Any) -> dict:
    prompts = plan.prompts
    return {
        "prompt_set": {**run.prompt_set.identity(), "n_original": plan.n_original, "n_effective": len(prompts),
                       "content_sha256": key_of([p.text for p in prompts]), "source": run.prompt_set.provenance()},
        "utility_sets": {r: {**s.identity(), "n_effective": len(plan.utility[r]),
                             "content_sha256": key_of([p.text for p in plan.utility[r]]),
                             "source": s.provenance()} for r, s in run.utility_sets.items()},
    }


def assemble_result(run: Any, plan: Any, model: Any, model_ident: dict, scores: Scores, traces: dict,
                    errors: list[str], timing: dict, aggregate: bool) -> dict:
    """The result record. ``run``: the resolved run (:class:`memobench.runner.Runner`: its config, plugins,
    registry, generation settings, seeds, shard); ``traces``: ``{"attack": …, "mitigation": …}``. ``errors`` is
    the list itself (what the grid adds later is recorded too)."""
    cfg, shard, chash = run.cfg, run.shard, run.config_hash()
    scored_by = ("memobench aggregate" if aggregate
                 else ("rank 0 after the generation barrier" if shard.sharded else "this process"))
    return {
        "schema_version": RESULT_SCHEMA,
        "memobench_version": __version__,
        "git_hash": git_hash(), "git_dirty": git_dirty(),
        "run_id": chash[:16],
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "config_hash": chash,
        "status": run_status(errors, scores, cfg.limit),
        "errors": errors,
        "config": dataclasses.asdict(cfg),
        # the folder or hub id the weights came from, for readers (the cache identity is model_ident: their sha256)
        "model": {**({"id": model.model_id} if getattr(model, "model_id", None) else {}), **model_ident,
                  "plugin": run.model_plugin.identity(),
                  "source": jsonable_trace(model.source or {})},
        "mitigation": {**run.mitigation.identity(), "kind": run.mitigation.kind,
                       "dist": run.reg.entry("mitigation", run.mitigation.name).dist,
                       "report": run.mitigation.report()},
        "attack": {**run.attack.identity(), "dist": run.reg.entry("attack", run.attack.name).dist},
        **_prompt_sets(run, plan),
        "generation": {**run.generation, "images_per_prompt": len(run.seeds), "batch_size": cfg.batch_size,
                       "negative_prompt": ""},
        # where the run's images were computed (device, CPU threads): memobench.pipeline.generate.generated_with
        "image_provenance": traces.get("provenance", {}),
        "seeds": {"target": run.seeds, "utility": run.utility_seeds if plan.utility else [], "rule": SEED_RULE},
        "metrics": scores.metrics,
        # paired scoring: when an attack ran, the same target metrics for the mitigation alone (same targets,
        # same seeds); utility metrics do not depend on the attack and live in "metrics" only
        **({"metrics_without_attack": scores.without_attack} if run.paired else {}),
        "attack_traces": traces["attack"],
        "mitigation_traces": traces["mitigation"],
        "env": {**environment(), "world_size": shard.count,
                "execution": {"shard": shard.record(), "scored_by": scored_by}},
        "timing": timing,
    }


def run_dir(out_root: Path, model: str, mitigation: str, attack: str) -> Path:
    return out_root / slug(model) / f"{slug(mitigation)}__{slug(attack)}"


def write_grids(result: dict, samples: list[Sample], scores: Scores, directory: Path, mitigation: str, attack: str,
                paired: bool, errors: list[str]) -> Path | None:
    """The run's grid (training original | generated, one row per target prompt; the grid metric's value under
    each image) and, with paired scoring, the mitigation alone's; their names go into ``result``. A failure is
    recorded in ``errors`` (the grid is a convenience), except a corrupt cache entry, which fails the run."""
    run_id = result["run_id"]
    values = scores.per_sample.get(scores.grid_metric) if scores.grid_metric else None
    try:
        grid = directory / f"{run_id}.grid.png"
        write_grid([s for s in samples if s.role == "target"], grid, scores=values,
                   title=f"mitigation {mitigation} + attack {attack}")
        result["grid_file"] = grid.name
        if paired:
            g2 = directory / f"{run_id}.grid_without_attack.png"
            write_grid([s for s in samples if s.role == "mitigated"], g2, scores=values,
                       title=f"mitigation {mitigation}, no attack")
            result["grid_without_attack_file"] = g2.name
    except CacheError:
        raise
    except Exception as e:
        errors.append(f"grid: {type(e).__name__}: {e}")
        return None
    return grid


def write_result(result: dict, samples: list[Sample], per_sample: dict[str, dict], directory: Path
                 ) -> tuple[Path, Path]:
    """The per-sample table, then the result JSON (strict JSON: a NaN / ±Infinity is written as null and recorded
    in "non_finite_values"); returns their paths."""
    run_id = result["run_id"]
    result_path = directory / f"{run_id}.json"
    samples_path = directory / f"{run_id}.samples.jsonl"
    rows = [sample_row(s, per_sample) for s in samples]
    atomic_write_text(samples_path, "".join(dumps_strict(r, sort_keys=True) + "\n" for r in rows))
    result["samples_file"] = samples_path.name
    atomic_write_text(result_path, dumps_strict(result, indent=1, sort_keys=True, default=str))
    return result_path, samples_path
