"""The locality statistics (pure numpy; t-SNE from scikit-learn): distances between embeddings, the activation
discrepancy, IoU of neuron/weight masks, success rates and the 2-D projection. :mod:`.analysis` runs the three
diagnostics with them (METHODS §7.4); see its docstring for the definitions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PROJECTIONS = ("tsne", "pca")


def pairwise_l2(x) -> np.ndarray:
    """D(Y): ‖x_i − x_j‖₂ for all i < j (row-major order: (0,1), (0,2), …), each row flattened; float64, computed
    from the differences themselves (no Gram-matrix cancellation)."""
    import torch

    t = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    t = t.reshape(t.shape[0], -1)
    if t.shape[0] < 2:
        return np.zeros(0)
    return torch.nn.functional.pdist(t, p=2).numpy()


def distance_summary(d) -> dict:
    """Mean, std (ddof 0), median, min, max and number of pairs of a set of distances (None when empty)."""
    d = np.asarray(d, dtype=np.float64)
    if d.size == 0:
        return {"mean": None, "std": None, "median": None, "min": None, "max": None, "n_pairs": 0}
    return {"mean": float(d.mean()), "std": float(d.std()), "median": float(np.median(d)), "min": float(d.min()),
            "max": float(d.max()), "n_pairs": int(d.size)}


def activation_discrepancy(acts) -> float | None:
    """AD_l(Y) = 2/(n(n−1)) Σ_{i<j} ‖a_l(y_i) − a_l(y_j)‖₂ for the activations ``acts`` (n × …) of one layer
    (None for n < 2)."""
    d = pairwise_l2(acts)
    return float(d.mean()) if d.size else None


def _as_bool(m) -> np.ndarray:
    try:
        import torch

        if isinstance(m, torch.Tensor):
            m = m.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(m, dtype=bool).ravel()


def iou(a, b, empty: float = 1.0) -> float:
    """|A ∩ B| / |A ∪ B| of two selections given as boolean masks of the same shape; ``empty`` when both are empty."""
    a, b = _as_bool(a), _as_bool(b)
    if a.shape != b.shape:
        raise ValueError(f"iou: masks of different sizes {a.size} and {b.size}")
    union = int(np.count_nonzero(a | b))
    return float(empty) if union == 0 else int(np.count_nonzero(a & b)) / union


def pairwise_iou(masks: Sequence, empty: float = 1.0) -> np.ndarray:
    """IoU of every pair i < j (row-major order) of a list of boolean masks (bit-packed, so that large weight masks
    stay cheap)."""
    packed = [np.packbits(_as_bool(m)) for m in masks]
    sizes = [_popcount(p) for p in packed]
    out = []
    for i in range(len(packed)):
        for j in range(i + 1, len(packed)):
            inter = _popcount(packed[i] & packed[j])
            union = sizes[i] + sizes[j] - inter
            out.append(float(empty) if union == 0 else inter / union)
    return np.asarray(out, dtype=np.float64)


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def _popcount(packed: np.ndarray) -> int:
    """Set bits of a uint8 array (``np.bitwise_count`` needs numpy ≥ 2; this works with the declared ≥ 1.26)."""
    return int(_POPCOUNT[packed].sum())


def mean_pairwise_iou(masks: Sequence, empty: float = 1.0) -> float | None:
    """WA_l(Y) = 2/(n(n−1)) Σ_{i<j} IoU(W_i, W_j) (None for n < 2)."""
    v = pairwise_iou(masks, empty)
    return float(v.mean()) if v.size else None


def mean_paired_iou(masks_a: Sequence, masks_b: Sequence, empty: float = 1.0) -> float | None:
    """1/n Σ_i IoU(A_i, B_i): the agreement of two methods on the same embeddings (None when n = 0)."""
    if len(masks_a) != len(masks_b):
        raise ValueError("mean_paired_iou: lists of different lengths")
    v = [iou(a, b, empty) for a, b in zip(masks_a, masks_b)]
    return float(np.mean(v)) if v else None


def rows_mask(neurons: Sequence[int], shape: tuple[int, int]) -> np.ndarray:
    """The weights of a Linear layer's output channels ``neurons``: rows of a (out × in) boolean mask."""
    m = np.zeros(shape, dtype=bool)
    idx = sorted({int(i) for i in neurons})
    if idx:
        m[idx, :] = True
    return m


def neuron_mask(neurons: Sequence[int], width: int) -> np.ndarray:
    m = np.zeros(width, dtype=bool)
    idx = sorted({int(i) for i in neurons})
    if idx:
        m[idx] = True
    return m


def k_min_skill_ratio(rho: float, in_features: int, k_min: int) -> float:
    """ρ' with ⌊ρ'·in⌋ = max(k_min, ⌊ρ·in⌋) (Wanda's per-row candidate count raised to k_min)."""
    if int(rho * in_features) >= k_min:
        return float(rho)
    return (k_min + 0.5) / in_features


def success_rates(sims: Sequence, threshold: float) -> dict:
    """The three MR rules of METHODS §4.2 over embeddings (rows: SSCD of each generation to the training image):
    ``mean`` = fraction of embeddings with mean_g s_g > τ (memobench's ``mr``), ``max`` = with max_g s_g > τ (MR_any,
    NeMo's VM rule), ``generation`` = fraction of all generations with s_g > τ (MR_gen)."""
    rows = [np.asarray(r, dtype=np.float64).ravel() for r in sims]
    if not rows:
        return {"mean": None, "max": None, "generation": None}
    return {"mean": float(np.mean([r.mean() > threshold for r in rows])),
            "max": float(np.mean([r.max() > threshold for r in rows])),
            "generation": float(np.mean([(r > threshold).mean() for r in rows]))}


def project_2d(points, method: str = "tsne", seed: int = 0) -> tuple[np.ndarray, dict]:
    """2-D coordinates of the flattened ``points`` (n × …): PCA (SVD of the centred points, signs fixed so that the
    largest-magnitude loading is positive) or t-SNE (scikit-learn, PCA init, ``random_state = seed``, perplexity
    min(30, (n − 1)/3))."""
    x = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    n = x.shape[0]
    if method == "pca":
        xc = x - x.mean(axis=0, keepdims=True)
        u, s, vt = np.linalg.svd(xc, full_matrices=False)
        k = min(2, vt.shape[0])
        for c in range(k):
            if vt[c, np.argmax(np.abs(vt[c]))] < 0:
                vt[c] *= -1
        coords = np.zeros((n, 2))
        coords[:, :k] = xc @ vt[:k].T
        var = s ** 2
        ratio = (var[:2] / var.sum()).tolist() if var.sum() > 0 else [0.0, 0.0]
        return coords, {"method": "pca", "explained_variance_ratio": [float(r) for r in ratio]}
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))
        if n < 3:  # t-SNE needs perplexity < n
            return project_2d(points, "pca", seed)[0], {"method": "pca", "note": "t-SNE needs ≥ 3 points"}
        ts = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
        coords = ts.fit_transform(x)
        return np.asarray(coords), {"method": "tsne", "perplexity": perplexity, "random_state": seed,
                                    "library": "scikit-learn", "kl_divergence": float(ts.kl_divergence_)}
    raise ValueError(f"projection: {method!r} not in {PROJECTIONS}")
