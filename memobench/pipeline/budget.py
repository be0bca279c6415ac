"""Budget sweep (``memobench run --budget-sweep``): the run's target metrics at several values of the attack's budget
parameter, recorded in the run's own result.

An attack declares the parameter that sets the attacker's work (:attr:`memobench.api.Attack.budget_param`), its
unit and default sweep values. Each point of the sweep is the same run with only that parameter changed: a sub-run
with the target-role metrics (the utility metrics do not depend on the attack), sharing the run's caches, so the
mitigation alone, the baseline and any point that was run before are read back, not recomputed. A point records its
parameter value, the work in the attack's unit (:meth:`memobench.api.Attack.budget`), the metric values and the
config hash of the sub-run (``memobench run`` with ``--attack-param <param>=<value>`` reproduces it).

"Work to re-extract": the least work at which the headline metric (the memorization rate: the metric whose
:class:`~memobench.api.MetricInfo` says ``headline``) first exceeds :data:`REEXTRACT_THRESHOLD`; ``None`` when no
point of the sweep reaches it.
"""

from __future__ import annotations

import dataclasses

from ..config import BadInput

REEXTRACT_THRESHOLD = 0.5


def check_sweep(attack, values: list[int] | None) -> list[int]:
    """The sweep's values: ``values`` or the attack's defaults; a one-line :class:`BadInput` when the attack declares
    no budget or a value is not a non-negative integer."""
    if attack.is_identity or attack.budget_param is None:
        raise BadInput(f"--budget-sweep: attack {attack.name!r} declares no budget parameter; sweep an attack that "
                       "does (e.g. --attack dori)")
    vals = list(values) if values else list(attack.budget_values)
    if not vals:
        raise BadInput(f"--budget-sweep: attack {attack.name!r} has no default sweep; pass --budget-values 0,10,50")
    for v in vals:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise BadInput(f"--budget-values: values of {attack.budget_param} must be integers ≥ 0, got {v!r}")
    return sorted(set(vals))


def sweep(runner, values: list[int], progress=None) -> dict:
    """Run every point of the sweep of ``runner`` (a :class:`memobench.runner.Runner`) and return the record."""
    from ..runner import Runner

    attack = runner.attack
    param = attack.budget_param
    target_metrics = [m.name for m in runner.metrics if m.roles == ("target",)]
    if not target_metrics:
        raise BadInput("--budget-sweep: none of the selected metrics scores the attacked targets; add e.g. --metric mr")
    headline = next((m.info.name for m in runner.metrics if m.info.headline and m.name in target_metrics), None)
    points = []
    for v in values:
        cfg = dataclasses.replace(runner.cfg, attack_params={**runner.cfg.attack_params, param: v},
                                  metrics=target_metrics,
                                  metric_params={k: p for k, p in runner.cfg.metric_params.items()
                                                 if k in target_metrics},
                                  budget_sweep=None)
        sub = Runner(cfg, registry=runner.reg, progress=False)
        if progress is not None:
            progress.log(f"[memobench] budget sweep: {param}={v} ({sub.attack.budget():g} {attack.budget_unit})")
        scores = sub.score_only()
        points.append({"value": v, "budget": sub.attack.budget(), "config_hash": sub.config_hash(),
                       "attack_params": sub.attack.identity()["params"],
                       "metrics": {k: rec["value"] for k, rec in scores.metrics.items()},
                       "metrics_without_attack": {k: rec["value"] for k, rec in scores.without_attack.items()}})
    return {"param": param, "unit": attack.budget_unit, "values": values, "headline_metric": headline,
            "threshold": REEXTRACT_THRESHOLD, "points": points,
            "work_to_reextract": work_to_reextract(points, headline)}


def work_to_reextract(points: list[dict], metric: str | None, threshold: float = REEXTRACT_THRESHOLD) -> dict | None:
    """The first point (in increasing work) whose ``metric`` exceeds ``threshold``: ``{"value", "budget"}``."""
    if metric is None:
        return None
    for p in sorted(points, key=lambda p: (p["budget"], p["value"])):
        v = p["metrics"].get(metric)
        if v is not None and v > threshold:
            return {"value": p["value"], "budget": p["budget"]}
    return None
