"""Exact, programmatic compositional checker for the `tiny` model's general set.

The `tiny` model's general set (:mod:`memobench_plugins.tiny.data`) is made of flat-coloured circles, squares and
triangles from a fixed palette on a light-grey background, captioned by a fixed grammar. We can therefore read a
generated image back *exactly* instead of asking a learned detector or a VLM, and score it in the spirit of the
T2I-CompBench categories (``color``, ``shape``, ``spatial``, ``count``; its ``texture``, ``complex`` and
``non-spatial`` categories have no counterpart in this grammar and are not produced).

Reading a scene (:func:`read_scene`)
------------------------------------
1. **Background.** The background colour is the per-channel median of the 2-pixel border ring of the image. If
   that median lies more than ``BG_TOLERANCE`` (60, RGB Euclidean) from the nominal ``data.BACKGROUND`` the image
   does not look like a general-set scene and the nominal colour is used instead.
2. **Foreground.** A pixel is foreground when its RGB Euclidean distance from the background exceeds
   ``FG_THRESHOLD`` (95, about 0.45 × the smallest palette-to-background distance, 213 for yellow). This is
   roughly the 50 % coverage level of an anti-aliased edge, so masks keep the objects' true size; Gaussian pixel
   noise of σ = 8 stays well below it.
3. **Components.** 8-connected components of the foreground mask (``scipy.ndimage.label``). A component whose
   interior holds two palette colours in large amounts (two touching objects of different colours) is split by
   colour: its *core* pixels (those that survive a 3×3 binary erosion of the foreground mask, i.e. away from
   anti-aliased rims, which blend towards the background and would read as other palette colours) vote for their
   nearest palette colour, every colour with at least ``SPLIT_MIN_PIXELS`` (20) core votes and at least 20 % of
   them is kept, each pixel of the component is given the nearest of the kept colours, and the connected parts
   of each colour become components of their own.
4. **Noise.** Components smaller than ``MIN_AREA`` (40 px; the smallest rendered object, a triangle of radius 8,
   covers about 120 px) are dropped, and only the ``MAX_OBJECTS`` (6) largest are kept, largest first.
5. **Per component**

   * ``color``: the per-channel median RGB of its core pixels (all of its pixels if it has no core) mapped to the
     nearest palette colour by RGB Euclidean distance. RGB is used rather than CIELAB because the palette is
     better separated in RGB (blue/purple are 100 apart in RGB but only 25 apart in ΔE76).
     ``color_margin`` = 1 − d₁/d₂ with d₁, d₂ the distances to the nearest and second-nearest palette colours.
   * ``shape``: the ideal shapes are rasterised (at pixel centres) *inside the component's bounding box*, exactly
     as the renderer inscribes them in theirs — a **circle** is the ellipse inscribed in the box, a **square**
     is the box itself, a **triangle** is the isosceles triangle with its apex at the middle of the top edge and
     its base on the bottom edge (the renderer's orientation; the apex-down version is also tried and also counts
     as a triangle). The shape is the template with the highest IoU against the component mask. On clean renders
     the right template scores ≈ 0.95 and the next best ≤ 0.8 (circle vs square: π/4), so the rule tolerates
     blur and rounded corners. ``shape_iou`` is the best IoU and ``shape_margin`` its lead over the best
     template of a different shape.
   * ``centroid``: the mean (x, y) of the component's pixels, in pixel units (x to the right, y downwards).
   * ``area``: its pixel count. ``confidence`` = min(color_margin, shape_margin / 0.2) clipped to [0, 1]
     (a 0.2 IoU lead counts as a sure shape).

Scoring a caption (:func:`score`)
---------------------------------
The caption is parsed with :func:`data.parse_caption` into n ∈ {1, 2} objects (colour, shape) and an optional
relation. **Matching:** the caption's objects are assigned to distinct detected components by trying every
injective assignment (an object may stay unassigned only when fewer components than objects were detected) and
keeping the best one under a lexicographic order: (1) most correct attributes (colour matches + shape matches);
(2) the caption's relation holds (two-object captions only; this also makes a pair of identical objects
order-free); (3) largest total area of the assigned components; a remaining tie goes to the first assignment in order of
component index (components are indexed largest first). The categories then are

* ``color``: fraction of the caption's objects whose assigned component has the caption's colour (an unassigned
  object counts as wrong);
* ``shape``: the same for shape;
* ``spatial``: two-object captions only (``None`` otherwise): with (dx, dy) = centroid(obj2) − centroid(obj1)
  for the components assigned to the caption's first and second object, the relation holds iff
  "obj1 to the left of obj2" ⇔ dx > 0 and |dx| > |dy|; "to the right of" ⇔ dx < 0 and |dx| > |dy|;
  "above" ⇔ dy > 0 and |dy| > |dx|; "below" ⇔ dy < 0 and |dy| > |dx| (image y grows downwards). 1 if it holds,
  0 otherwise or if an object is unassigned;
* ``count``: 1 if the number of detected components equals n, else 0;
* ``overall``: the mean of the category scores that are not ``None``.

An image with no foreground therefore scores 0 on color, shape, count (and spatial, for two-object captions).
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage

from memobench_plugins.tiny import data

FG_THRESHOLD = 95.0
BG_TOLERANCE = 60.0
MIN_AREA = 40
MAX_OBJECTS = 6
SPLIT_MIN_PIXELS = 20
SPLIT_MIN_FRACTION = 0.2

PALETTE_NAMES: tuple[str, ...] = tuple(data.COLORS)
PALETTE = np.array([data.COLORS[c] for c in PALETTE_NAMES], dtype=np.float64)
_EIGHT = np.ones((3, 3), dtype=bool)


# ----------------------------------------------------------------------------------------------- helpers
def _background(img: np.ndarray) -> np.ndarray:
    ring = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                           img[2:-2, :2].reshape(-1, 3), img[2:-2, -2:].reshape(-1, 3)])
    bg = np.median(ring, axis=0)
    nominal = np.array(data.BACKGROUND, dtype=np.float64)
    return bg if np.linalg.norm(bg - nominal) <= BG_TOLERANCE else nominal


def _palette_dists(rgb: np.ndarray) -> np.ndarray:
    """Euclidean RGB distance of each row of ``rgb`` (…, 3) to each palette colour → (…, n_colours)."""
    return np.linalg.norm(rgb[..., None, :] - PALETTE, axis=-1)


def _templates(h: int, w: int) -> dict[str, list[np.ndarray]]:
    """Ideal shapes inscribed in an h×w bounding box, rasterised at pixel centres (see the module docstring)."""
    v = (np.arange(h) + 0.5)[:, None] / h  # 0 at the top edge, 1 at the bottom edge
    u = (np.arange(w) + 0.5)[None, :] / w
    return {
        "circle": [(u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25],
        "square": [np.ones((h, w), dtype=bool)],
        "triangle": [np.abs(u - 0.5) <= 0.5 * v, np.abs(u - 0.5) <= 0.5 * (1 - v)],  # apex up, apex down
    }


def _classify_shape(mask: np.ndarray) -> tuple[str, float, float]:
    """Shape name, best IoU and lead over the best other shape for a boolean mask cropped to its bounding box."""
    best: dict[str, float] = {}
    for name, temps in _templates(*mask.shape).items():
        ious = []
        for t in temps:
            inter = np.logical_and(mask, t).sum()
            union = np.logical_or(mask, t).sum()
            ious.append(inter / union if union else 0.0)
        best[name] = max(ious)
    ranked = sorted(best.items(), key=lambda kv: kv[1], reverse=True)
    return ranked[0][0], float(ranked[0][1]), float(ranked[0][1] - ranked[1][1])


def _split_by_colour(comp: np.ndarray, core: np.ndarray, img: np.ndarray) -> list[np.ndarray]:
    """Split one component into single-colour parts when its core holds several palette colours in bulk."""
    pix = core & comp
    if not pix.any():
        return [comp]
    votes = np.bincount(_palette_dists(img[pix]).argmin(-1), minlength=len(PALETTE))
    keep = np.flatnonzero((votes >= SPLIT_MIN_PIXELS) & (votes >= SPLIT_MIN_FRACTION * votes.sum()))
    if len(keep) < 2:
        return [comp]
    label = np.full(comp.shape, -1)
    label[comp] = keep[_palette_dists(img[comp])[:, keep].argmin(-1)]
    parts = []
    for k in keep:
        lab, n = ndimage.label(label == k, structure=_EIGHT)
        parts.extend(lab == i for i in range(1, n + 1))
    return parts


# ----------------------------------------------------------------------------------------------- public API
def read_scene(image: np.ndarray) -> list[dict]:
    """Detected objects of a general-set image, largest first.

    Each is ``{'color', 'shape', 'centroid': (x, y), 'area', 'confidence', 'color_margin', 'shape_iou',
    'shape_margin', 'bbox': (x0, y0, x1, y1)}`` (bbox inclusive). ``image`` is H×W×3 uint8 RGB (64×64 for
    `tiny`; other sizes work, the noise threshold ``MIN_AREA`` is meant for 64×64).
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] < 3:
        raise ValueError(f"expected an H×W×3 RGB image, got shape {img.shape}")
    img = img[..., :3].astype(np.float64)
    fg = np.linalg.norm(img - _background(img), axis=-1) > FG_THRESHOLD
    core = ndimage.binary_erosion(fg, structure=_EIGHT)
    lab, n = ndimage.label(fg, structure=_EIGHT)
    comps: list[np.ndarray] = []
    for i in range(1, n + 1):
        comp = lab == i
        if comp.sum() >= MIN_AREA:
            comps.extend(_split_by_colour(comp, core, img))
    comps = sorted((c for c in comps if c.sum() >= MIN_AREA), key=lambda c: -int(c.sum()))[:MAX_OBJECTS]

    out = []
    for comp in comps:
        ys, xs = np.nonzero(comp)
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        cpix = comp & core
        rgb = np.median(img[cpix if cpix.any() else comp], axis=0)
        d = np.sort(_palette_dists(rgb))
        colour = PALETTE_NAMES[int(_palette_dists(rgb).argmin())]
        color_margin = float(1.0 - d[0] / d[1]) if d[1] > 0 else 0.0
        shape, iou, shape_margin = _classify_shape(comp[y0 : y1 + 1, x0 : x1 + 1])
        out.append({
            "color": colour,
            "shape": shape,
            "centroid": (float(xs.mean()), float(ys.mean())),
            "area": int(comp.sum()),
            "confidence": float(np.clip(min(color_margin, shape_margin / 0.2), 0.0, 1.0)),
            "color_margin": color_margin,
            "shape_iou": iou,
            "shape_margin": shape_margin,
            "bbox": (int(x0), int(y0), int(x1), int(y1)),
        })
    return out


def relation_holds(relation: str, c1: tuple[float, float], c2: tuple[float, float]) -> bool:
    """Whether "obj1 <relation> obj2" holds for centroids c1 (obj1) and c2 (obj2), image y pointing down."""
    dx, dy = c2[0] - c1[0], c2[1] - c1[1]
    if relation == "to the left of":
        return dx > 0 and abs(dx) > abs(dy)
    if relation == "to the right of":
        return dx < 0 and abs(dx) > abs(dy)
    if relation == "above":
        return dy > 0 and abs(dy) > abs(dx)
    if relation == "below":
        return dy < 0 and abs(dy) > abs(dx)
    raise ValueError(f"unknown relation {relation!r}")


def score(image: np.ndarray, caption: str, scene: list[dict] | None = None) -> dict:
    """T2I-CompBench-style category scores of ``image`` for a general-set ``caption`` (see module docstring).

    Returns ``{'color', 'shape', 'spatial', 'count', 'overall'}``; ``spatial`` is ``None`` for single-object
    captions. ``scene`` may pass a precomputed :func:`read_scene` result.
    """
    spec = data.parse_caption(caption)
    objs, rel = spec["objects"], spec["relation"]
    dets = read_scene(image) if scene is None else scene
    n = len(objs)

    # every injective assignment of caption objects to detections (None = unassigned, only if too few detections)
    slots: list[int | None] = list(range(len(dets))) + [None] * max(0, n - len(dets))
    best_key, best = None, None
    assigns = sorted(set(itertools.permutations(slots, n)), key=lambda t: [len(dets) if a is None else a for a in t])
    for assign in assigns:  # strict '>' below: on a full tie the first in this order wins
        col = [a is not None and dets[a]["color"] == o[0] for a, o in zip(assign, objs)]
        shp = [a is not None and dets[a]["shape"] == o[1] for a, o in zip(assign, objs)]
        sp = None
        if rel is not None:
            a1, a2 = assign
            sp = a1 is not None and a2 is not None and relation_holds(rel, dets[a1]["centroid"],
                                                                      dets[a2]["centroid"])
        area = sum(dets[a]["area"] for a in assign if a is not None)
        key = (sum(col) + sum(shp), bool(sp), area)
        if best_key is None or key > best_key:
            best_key, best = key, (col, shp, sp)

    col, shp, sp = best
    res = {
        "color": sum(col) / n,
        "shape": sum(shp) / n,
        "spatial": None if rel is None else float(sp),
        "count": float(len(dets) == n),
    }
    vals = [v for v in res.values() if v is not None]
    res["overall"] = float(np.mean(vals))
    return res
