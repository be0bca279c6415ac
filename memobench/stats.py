"""Aggregation statistics of the memorization metrics (pure numpy).

* Dispersion conventions (METHODS §4.5): median ± MAD with the *raw* MAD (median |v − median v|, no 1.4826 factor,
  as NeMo's metric scripts) and mean ± population standard deviation (ddof = 0).
* Memorization rates (METHODS §4.2) with a strict ">" comparison against τ: ``MR_gen`` (generation level),
  ``MR_mean`` (prompt level on the mean over generations) and ``MR_any`` (prompt level on the max).

Detection metrics (ROC, AUC, ACC, TPR@1%FPR; METHODS §6.3) are scikit-learn's, in the detect plugin.

Every function takes plain sequences of floats and returns Python floats.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

__all__ = [
    "REDUCTIONS",
    "SET_REDUCTIONS",
    "mean_std",
    "median_mad",
    "memorization_rates",
    "mr_any",
    "mr_gen",
    "mr_mean",
    "reduce",
    "summarize",
]

REDUCTIONS = ("mean", "median", "max", "min")
SET_REDUCTIONS = ("mean_std", "median_mad", "mean")


def _arr(values: Iterable[float]) -> np.ndarray:
    a = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError("cannot aggregate an empty list of values")
    return a


def median_mad(values: Iterable[float]) -> tuple[float, float]:
    """``(median, MAD)`` with MAD = median |v − median(v)| (raw, no 1.4826 consistency factor)."""
    a = _arr(values)
    med = float(np.median(a))
    return med, float(np.median(np.abs(a - med)))


def mean_std(values: Iterable[float], ddof: int = 0) -> tuple[float, float]:
    """``(mean, std)``; population standard deviation (``ddof = 0``) by default."""
    a = _arr(values)
    return float(np.mean(a)), float(np.std(a, ddof=ddof))


def summarize(values: Iterable[float],
              kind: Literal["mean_std", "median_mad", "mean"]) -> tuple[float, dict | None]:
    """Set-level aggregate and its dispersion record (``{"kind": "std"|"mad", "value": x}``; None for ``mean``)."""
    if kind == "median_mad":
        v, d = median_mad(values)
        return v, {"kind": "mad", "value": d}
    if kind == "mean_std":
        v, d = mean_std(values)
        return v, {"kind": "std", "value": d, "ddof": 0}
    if kind == "mean":
        return float(np.mean(_arr(values))), None
    raise ValueError(f"unknown set reduction {kind!r}; valid: {', '.join(SET_REDUCTIONS)}")


def reduce(values: Iterable[float], how: Literal["mean", "median", "max", "min"]) -> float:
    """Reduce a list of similarities to one number (mean, median, max or min)."""
    a = _arr(values)
    if how == "mean":
        return float(np.mean(a))
    if how == "median":
        return float(np.median(a))
    if how == "max":
        return float(np.max(a))
    if how == "min":
        return float(np.min(a))
    raise ValueError(f"unknown reduction {how!r}; valid: {', '.join(REDUCTIONS)}")


# ---------------------------------------------------------------------------------------------- memorization rate
def _per_prompt(scores: Sequence[Sequence[float]]) -> list[np.ndarray]:
    if len(scores) == 0:
        raise ValueError("no prompts")
    return [_arr(s) for s in scores]


def mr_gen(scores: Sequence[Sequence[float]], tau: float) -> float:
    """MR_gen = 1/|P| Σ_p 1/G_p Σ_g 1[s_pg > τ]; ``scores[p]`` lists s_{p,g} of prompt p."""
    return float(np.mean([np.mean(s > tau) for s in _per_prompt(scores)]))


def mr_mean(scores: Sequence[Sequence[float]], tau: float) -> float:
    """MR_mean = 1/|P| Σ_p 1[mean_g s_pg > τ]."""
    return float(np.mean([np.mean(s) > tau for s in _per_prompt(scores)]))


def mr_any(scores: Sequence[Sequence[float]], tau: float) -> float:
    """MR_any = 1/|P| Σ_p 1[max_g s_pg > τ]."""
    return float(np.mean([np.max(s) > tau for s in _per_prompt(scores)]))


def memorization_rates(scores: Sequence[Sequence[float]], tau: float) -> dict[str, float]:
    """All three rates: ``{"gen": MR_gen, "mean": MR_mean, "any": MR_any}``."""
    return {"gen": mr_gen(scores, tau), "mean": mr_mean(scores, tau), "any": mr_any(scores, tau)}
