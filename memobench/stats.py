"""Aggregation statistics of the memorization and detection metrics (pure numpy).

* Dispersion conventions (METHODS §4.5): median ± MAD with the *raw* MAD (median |v − median v|, no 1.4826 factor,
  as NeMo's metric scripts) and mean ± population standard deviation (ddof = 0).
* Memorization rates (METHODS §4.2) with a strict ">" comparison against τ: ``MR_gen`` (generation level),
  ``MR_mean`` (prompt level on the mean over generations) and ``MR_any`` (prompt level on the max).
* Detection metrics (METHODS §6.3, Wen ``examples/det_mem_viz.ipynb``): the ROC over all thresholds with scikit-learn
  ``roc_curve`` semantics (a point per distinct score, descending, starting at (0, 0)), the trapezoidal AUC, the best
  balanced accuracy over thresholds and TPR at FPR strictly below 1 %.

Every function takes plain sequences of floats and returns Python floats.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "REDUCTIONS",
    "ROC",
    "SET_REDUCTIONS",
    "best_balanced_accuracy",
    "detection_metrics",
    "mean_std",
    "median_mad",
    "memorization_rates",
    "mr_any",
    "mr_gen",
    "mr_mean",
    "reduce",
    "roc_auc",
    "roc_curve",
    "summarize",
    "tpr_at_fpr",
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


# ---------------------------------------------------------------------------------------------- detection
@dataclass(frozen=True)
class ROC:
    """ROC points (increasing FPR/TPR, first point (0, 0)) and the score threshold of each (first = +inf)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def roc_curve(labels: Sequence[int | bool], scores: Sequence[float]) -> ROC:
    """ROC over all thresholds (score ≥ threshold ⇒ positive); one point per distinct score, plus (0, 0).

    Same points as scikit-learn's ``roc_curve(..., drop_intermediate=False)``; sklearn's default additionally drops
    collinear points, which changes none of AUC, best balanced accuracy or TPR@FPR.
    """
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC needs at least one positive and one negative")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_run = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last_of_run]
    fps = (last_of_run + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thr = np.r_[np.inf, s[last_of_run]]
    return ROC(fpr=fpr, tpr=tpr, thresholds=thr)


def roc_auc(roc: ROC) -> float:
    """Trapezoidal area under the ROC points."""
    return float(np.sum(np.diff(roc.fpr) * (roc.tpr[1:] + roc.tpr[:-1]) / 2.0))


def best_balanced_accuracy(roc: ROC) -> float:
    """max_k 1 − (FPR_k + (1 − TPR_k)) / 2 (Wen's ACC)."""
    return float(np.max(1.0 - (roc.fpr + (1.0 - roc.tpr)) / 2.0))


def tpr_at_fpr(roc: ROC, max_fpr: float = 0.01) -> float:
    """max {TPR_k : FPR_k < max_fpr} (strictly below); the (0, 0) point guarantees a value."""
    return float(np.max(roc.tpr[roc.fpr < max_fpr]))


def detection_metrics(labels: Sequence[int | bool], scores: Sequence[float]) -> dict[str, float]:
    """``{"auc", "acc", "tpr_at_1fpr"}`` for memorized (label 1) vs non-memorized (label 0) prompts."""
    roc = roc_curve(labels, scores)
    return {"auc": roc_auc(roc), "acc": best_balanced_accuracy(roc), "tpr_at_1fpr": tpr_at_fpr(roc, 0.01)}
