"""Tests of the `tiny` general-set checker (memobench_plugins.tiny.checker) on freshly rendered scenes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from memobench_plugins.tiny import checker, data

N_CAPTIONS = 300
NOISE_SIGMA = 8.0  # 8/255 of the range, in uint8 units
BLUR_SIGMA = 0.7  # pixels


def _degrade(img: np.ndarray, seed: int) -> np.ndarray:
    """Slight Gaussian blur (spatial only) plus Gaussian pixel noise, back to uint8."""
    f = ndimage.gaussian_filter(img.astype(np.float64), sigma=(BLUR_SIGMA, BLUR_SIGMA, 0))
    f += np.random.default_rng(seed).normal(0.0, NOISE_SIGMA, img.shape)
    return np.clip(np.round(f), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def accuracies() -> dict[str, float]:
    caps = data.general_captions()
    rng = np.random.default_rng(0)
    chosen = [caps[int(i)] for i in rng.choice(len(caps), N_CAPTIONS, replace=False)]
    clean, noisy, shuffled = [], [], []
    for k, cap in enumerate(chosen):
        img = data.render(cap, np.random.default_rng(1000 + k))
        scene = checker.read_scene(img)
        clean.append(checker.score(img, cap, scene=scene)["overall"])
        noisy.append(checker.score(_degrade(img, 5000 + k), cap)["overall"])
        other = cap
        while other == cap:
            other = caps[int(rng.integers(len(caps)))]
        shuffled.append(checker.score(img, other, scene=scene)["overall"])
    acc = {"correct": float(np.mean(clean)), "noisy": float(np.mean(noisy)), "shuffled": float(np.mean(shuffled))}
    print(f"\n[tiny checker] n={N_CAPTIONS} mean overall: correct={acc['correct']:.4f} "
          f"noisy(blur {BLUR_SIGMA}px + σ={NOISE_SIGMA:g})={acc['noisy']:.4f} shuffled={acc['shuffled']:.4f} "
          f"gap={acc['correct'] - acc['shuffled']:.4f}")
    return acc


def test_accuracy_on_clean_renders(accuracies):
    assert accuracies["correct"] >= 0.97


def test_accuracy_under_noise_and_blur(accuracies):
    assert accuracies["noisy"] >= 0.9


def test_shuffled_captions_score_much_lower(accuracies):
    assert accuracies["correct"] - accuracies["shuffled"] >= 0.4


def test_empty_background_scores_zero():
    blank = np.full((64, 64, 3), data.BACKGROUND, np.uint8)
    assert checker.read_scene(blank) == []
    for cap in ("a red circle", "a yellow triangle to the left of a blue circle"):
        s = checker.score(blank, cap)
        assert s["color"] == 0 and s["shape"] == 0 and s["count"] == 0 and s["overall"] == 0
    assert checker.score(blank, "a red circle")["spatial"] is None
    assert checker.score(blank, "a yellow triangle to the left of a blue circle")["spatial"] == 0


def _hand_made() -> np.ndarray:
    """A red circle (centre 18, 30, radius 9) left of a blue square (centre 46, 34, side 20), 4× supersampled."""
    ss = 4
    im = Image.new("RGB", (64 * ss, 64 * ss), data.BACKGROUND)
    d = ImageDraw.Draw(im)
    d.ellipse([(18 - 9) * ss, (30 - 9) * ss, (18 + 9) * ss, (30 + 9) * ss], fill=data.COLORS["red"])
    d.rectangle([(46 - 10) * ss, (34 - 10) * ss, (46 + 10) * ss, (34 + 10) * ss], fill=data.COLORS["blue"])
    return np.asarray(im.resize((64, 64), Image.LANCZOS), dtype=np.uint8)


def test_read_scene_hand_made():
    scene = checker.read_scene(_hand_made())
    assert [(o["color"], o["shape"]) for o in scene] == [("blue", "square"), ("red", "circle")]  # largest first
    (bx, by), (rx, ry) = scene[0]["centroid"], scene[1]["centroid"]
    assert abs(rx - 17.5) < 1 and abs(ry - 29.5) < 1 and abs(bx - 45.5) < 1 and abs(by - 33.5) < 1
    assert abs(scene[1]["area"] - np.pi * 81) < 25 and abs(scene[0]["area"] - 20 * 20) < 40
    assert all(0.5 < o["confidence"] <= 1 for o in scene)


@pytest.mark.parametrize("caption, expected", [
    ("a red circle to the left of a blue square", dict(color=1.0, shape=1.0, spatial=1.0, count=1.0, overall=1.0)),
    ("a blue square to the right of a red circle", dict(color=1.0, shape=1.0, spatial=1.0, count=1.0, overall=1.0)),
    ("a blue square to the left of a red circle", dict(color=1.0, shape=1.0, spatial=0.0, count=1.0, overall=0.75)),
    ("a red circle above a blue square", dict(color=1.0, shape=1.0, spatial=0.0, count=1.0, overall=0.75)),
    # colours kept, shapes swapped: the colour-consistent assignment ties with the shape-consistent one on
    # attributes (2 each) and wins on the relation
    ("a red square to the left of a blue circle", dict(color=1.0, shape=0.0, spatial=1.0, count=1.0, overall=0.75)),
    ("a green triangle to the left of a blue square",
     dict(color=0.5, shape=0.5, spatial=1.0, count=1.0, overall=0.75)),
    ("a red circle", dict(color=1.0, shape=1.0, spatial=None, count=0.0, overall=2 / 3)),
    ("a green triangle", dict(color=0.0, shape=0.0, spatial=None, count=0.0, overall=0.0)),
])
def test_score_hand_made(caption, expected):
    got = checker.score(_hand_made(), caption)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k] == pytest.approx(v) if v is not None else got[k] is None, (k, got)


def test_relation_rule():
    assert checker.relation_holds("to the left of", (10, 30), (40, 35))
    assert not checker.relation_holds("to the left of", (10, 10), (20, 40))  # mostly vertical
    assert checker.relation_holds("to the right of", (40, 30), (10, 35))
    assert checker.relation_holds("above", (30, 10), (33, 40))
    assert checker.relation_holds("below", (30, 40), (33, 10))


def test_single_object_render_exact():
    img = data.render("a purple triangle", np.random.default_rng(3))
    assert checker.score(img, "a purple triangle") == dict(color=1.0, shape=1.0, spatial=None, count=1.0,
                                                          overall=1.0)


def test_touching_objects_of_different_colours_are_split():
    img = np.full((64, 64, 3), data.BACKGROUND, np.uint8)
    img[20:40, 10:30] = data.COLORS["red"]
    img[22:38, 30:46] = data.COLORS["blue"]  # shares an edge with the red square
    scene = checker.read_scene(img)
    assert [(o["color"], o["shape"], o["area"]) for o in scene] == [("red", "square", 400), ("blue", "square", 256)]
    assert checker.score(img, "a red square to the left of a blue square")["overall"] == 1.0
