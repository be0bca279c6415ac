"""Detection evaluation: ROC, AUC, ACC, TPR@1%FPR, TPR@3%FPR and the calibrated thresholds (METHODS §6.3).

Follows Wen et al.'s evaluation notebook (``examples/det_mem_viz.ipynb`` of ``YuxinWenRick/diffusion_memorization``),
which scores with scikit-learn:

1. ROC points (FPR_k, TPR_k) over all thresholds: ``sklearn.metrics.roc_curve`` with ``drop_intermediate=False``
   (every distinct score is a threshold; the first point is (0, 0) at threshold +inf). A prompt is called
   memorized when its score is **≥** the threshold (scikit-learn's rule); higher score = more likely memorized.
2. AUC = trapezoidal area under those points (``sklearn.metrics.auc``).
3. ACC = max_k [1 − (FPR_k + (1 − TPR_k)) / 2], the best balanced accuracy over thresholds.
4. TPR@1%FPR = max{TPR_k : FPR_k < 0.01} (strictly below 1 %).
5. TPR@3%FPR = max{TPR_k : FPR_k < 0.03}, by the same rule (strictly below 3 %): the second operating point that
   Ren et al. (``detect.py``), Jeon et al. and Asthana & Belagiannis (``detect_eval.py``) report. Those scripts take
   the ROC point whose FPR is *closest* to the level instead, which can lie above it; the strict rule never does.

Calibrated thresholds (what ``memobench explain`` uses for its verdict), both stored:

* ``acc`` (default): the threshold at which ACC is attained, i.e. max TPR − FPR (Youden's J; balanced accuracy is
  (1 + J)/2). METHODS defines ACC at the best threshold, so this is the threshold behind the reported ACC. Ties go
  to the highest threshold (fewest false positives).
* ``fpr``: the operating point of TPR@1%FPR: among the points with FPR < 1 % the one with the largest TPR, ties to
  the highest threshold. When only the (0, 0) point qualifies its threshold is +inf (nothing is ever called
  memorized); it is then stored as ``None`` with a note.

Balanced accuracies that differ only by floating-point rounding (< 1e-12) count as ties.

Also computed, for scores with a published fixed cut-off (NeMo τ_mem, App. B.4's 0.5): plain accuracy, TPR and FPR
at a fixed threshold, with the rule ``score > threshold``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

FPR_MAX = 0.01
FPR_MAX_3 = 0.03
RULES = ("acc", "fpr")


def tpr_below(fpr, tpr, level: float) -> float:
    """max{TPR_k : FPR_k < level} over ROC points (the (0, 0) point always qualifies)."""
    fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    return float(tpr[fpr < level].max(initial=0.0))


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def detection_metrics(pos: Sequence[float], neg: Sequence[float], fpr_max: float = FPR_MAX) -> dict:
    """AUC, ACC, TPR@``fpr_max`` and both calibrated thresholds for positive (memorized) and negative scores."""
    from sklearn.metrics import auc, roc_curve

    pos = np.asarray(pos, dtype=np.float64).ravel()
    neg = np.asarray(neg, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"detection metrics need memorized and non-memorized prompts; got {pos.size} memorized "
                         f"and {neg.size} non-memorized")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("detection metrics: a score is NaN or infinite")
    y = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    s = np.r_[pos, neg]
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    bal = 1.0 - (fpr + (1.0 - tpr)) / 2.0
    k_acc = int(np.flatnonzero(bal >= bal.max() - 1e-12)[0])  # first maximum (rounding-tolerant) = highest threshold
    ok = np.flatnonzero(fpr < fpr_max)  # never empty: the (0, 0) point
    best_tpr = tpr[ok].max()
    k_fpr = int(ok[np.flatnonzero(tpr[ok] == best_tpr)[0]])

    def point(k: int) -> dict:
        t = _finite(thr[k])
        d = {"threshold": t, "tpr": float(tpr[k]), "fpr": float(fpr[k]), "balanced_accuracy": float(bal[k])}
        if t is None:
            d["note"] = "only the (0, 0) ROC point qualifies: no finite threshold, nothing is called memorized"
        return d

    return {
        "auc": float(auc(fpr, tpr)),
        "acc": float(bal[k_acc]),
        "tpr_at_fpr": float(best_tpr),
        "fpr_max": fpr_max,
        "tpr_at_3fpr": tpr_below(fpr, tpr, FPR_MAX_3),
        "fpr_max_3": FPR_MAX_3,
        "n_pos": int(pos.size),
        "n_neg": int(neg.size),
        "thresholds": {"acc": point(k_acc), "fpr": point(k_fpr)},
        "rule": "memorized iff score >= threshold (scikit-learn roc_curve)",
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": [_finite(t) for t in thr]},
        "impl": {"library": "scikit-learn", "functions": "roc_curve(drop_intermediate=False), auc",
                 "spec": "METHODS §6.3 (Wen det_mem_viz.ipynb)"},
    }


def fixed_threshold_metrics(pos: Sequence[float], neg: Sequence[float], threshold: float) -> dict:
    """Plain accuracy, TPR and FPR when ``score > threshold`` is called memorized."""
    pos = np.asarray(pos, dtype=np.float64).ravel()
    neg = np.asarray(neg, dtype=np.float64).ravel()
    tp = int((pos > threshold).sum())
    fp = int((neg > threshold).sum())
    n = pos.size + neg.size
    return {"threshold": float(threshold), "rule": "memorized iff score > threshold",
            "accuracy": (tp + (neg.size - fp)) / n if n else None,
            "tpr": tp / pos.size if pos.size else None, "fpr": fp / neg.size if neg.size else None}
