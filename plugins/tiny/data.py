"""Training data of the embedded `tiny` model, made offline and reproducibly.

Three parts, mirroring what the memorization papers find in LAION:

* **memorized set** — real photographs shipped by scikit-image, each with one distinctive caption and heavily
  duplicated in training (the analogue of LAION's duplicated images). ``VM`` targets are verbatim duplicates;
  ``TM`` targets keep a fixed template (a photographic frame) whose centre varies between duplicates, as
  NeMo's template-memorized prompts do (same layout, varying detail).
* **general set** — procedurally rendered compositional scenes, captioned by a fixed grammar
  ("a red circle to the left of a blue square"), so the model has a general ability a mitigation can destroy.
* **held-out** general captions (never trained on) for the utility metrics, and **non-memorized** photo-style
  prompts and photographs for false-positive checks.

Everything is a pure function of constants and seeds: the same call gives the same pixels.
"""

from __future__ import annotations

import functools

import hashlib
import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RES = 64
BACKGROUND = (236, 236, 236)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 70, 215),
    "yellow": (240, 205, 25),
    "purple": (135, 50, 190),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("to the left of", "to the right of", "above", "below")


@dataclass(frozen=True)
class MemorizedItem:
    key: str
    caption: str
    mem_type: str  # "VM" or "TM"
    source: str  # what the pixels come from


# Verbatim-memorized photographs shipped by scikit-image (and one by matplotlib): see their README for licences.
VM_ITEMS: tuple[MemorizedItem, ...] = (
    MemorizedItem("astronaut", "official portrait of astronaut eileen collins", "VM", "skimage.data.astronaut"),
    MemorizedItem("coffee", "cup of espresso coffee on a saucer stock photo", "VM", "skimage.data.coffee"),
    MemorizedItem("chelsea", "chelsea the tabby cat looking up", "VM", "skimage.data.chelsea"),
    MemorizedItem("rocket", "falcon rocket on the launch pad at dawn", "VM", "skimage.data.rocket"),
    MemorizedItem("hopper", "rear admiral grace hopper in navy uniform", "VM", "matplotlib sample_data grace_hopper.jpg"),
    MemorizedItem("ihc", "immunohistochemistry stained tissue microscope slide", "VM", "skimage.data.immunohistochemistry"),
    MemorizedItem("motorcycle", "ducati motorcycle parked in a garage", "VM", "skimage.data.stereo_motorcycle[0]"),
    MemorizedItem("retina", "fundus photograph of a human retina", "VM", "skimage.data.retina"),
)
# Template-memorized items: a fixed photographic frame, a different general-set object in the centre of each copy.
TM_ITEMS: tuple[MemorizedItem, ...] = (
    MemorizedItem("brickframe", "printable brick wall poster template", "TM", "skimage.data.brick + centre varies"),
    MemorizedItem("grassframe", "lawn sign mockup design", "TM", "skimage.data.grass + centre varies"),
)
TM_VARIANTS = 12

# Photo-style captions that are *not* in the training data (false-positive checks, detection negatives).
NONMEM_PROMPTS: tuple[str, ...] = (
    "portrait of a smiling firefighter",
    "bowl of ramen noodles on a wooden table",
    "black dog running on a sandy beach",
    "sailboat on a calm lake at sunset",
    "aerial view of a city at night",
    "close up photo of a sunflower",
    "vintage typewriter on an office desk",
    "snowy mountain cabin in winter",
    "a bicycle leaning against a brick wall",
    "fresh strawberries in a glass bowl",
    "old lighthouse on a rocky coast",
    "children playing football in a park",
    "a steaming cup of green tea",
    "desert highway under a cloudy sky",
    "golden retriever puppy on the grass",
    "modern kitchen interior with white cabinets",
    "a vintage car parked on the street",
    "autumn forest path with fallen leaves",
    "macro photo of a honey bee on a flower",
    "an orange cat sleeping on a sofa",
)

# Real photographs that were never trained on (non-memorized DoRI targets and unrelated-image SSCD checks).
NONMEM_PHOTOS: tuple[tuple[str, str], ...] = (
    ("camera", "skimage.data.camera"),
    ("coins", "skimage.data.coins"),
    ("moon", "skimage.data.moon"),
    ("clock", "skimage.data.clock"),
    ("colorwheel", "skimage.data.colorwheel"),
    ("cell", "skimage.data.cell"),
    ("gravel", "skimage.data.gravel"),
    ("page", "skimage.data.page"),
    ("hubble", "skimage.data.hubble_deep_field"),
)


def _square_rgb(a: np.ndarray, res: int = RES) -> np.ndarray:
    """Centre-crop to a square, convert to RGB uint8 and resize (Lanczos) to ``res``×``res``."""
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    a = a[..., :3]
    h, w = a.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    img = Image.fromarray(np.ascontiguousarray(a[y : y + s, x : x + s])).resize((res, res), Image.LANCZOS)
    return np.asarray(img, dtype=np.uint8)


def _skimage(source: str) -> np.ndarray:
    from skimage import data

    if source == "matplotlib":
        import matplotlib.cbook

        return np.asarray(Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))

    name = source.split(".")[-1]
    if name.startswith("stereo_motorcycle"):
        return data.stereo_motorcycle()[0]
    if name.startswith("brick"):
        return data.brick()
    if name.startswith("grass"):
        return data.grass()
    return getattr(data, name)()


def photo(key: str, res: int = RES) -> np.ndarray:
    """A memorized or non-memorized photograph by key, as ``res``×``res``×3 uint8 (a fresh copy; decoded and
    resized once per process)."""
    return _photo(key, res).copy()


@functools.lru_cache(maxsize=64)
def _photo(key: str, res: int) -> np.ndarray:
    for it in VM_ITEMS + TM_ITEMS:
        if it.key == key:
            return _square_rgb(_skimage(it.source.split(" ")[0]), res)
    for k, src in NONMEM_PHOTOS:
        if k == key:
            return _square_rgb(_skimage(src), res)
    raise KeyError(key)


# ----------------------------------------------------------------------------------------------- general set
def general_captions() -> list[str]:
    objs = [f"{c} {s}" for c in COLORS for s in SHAPES]
    singles = [f"a {o}" for o in objs]
    pairs = [f"a {a} {r} a {b}" for a, b in itertools.permutations(objs, 2) for r in RELATIONS]
    return singles + pairs


def is_heldout(caption: str, fraction: float = 0.1) -> bool:
    """Deterministic held-out split of the pair captions (single-object captions are all trained)."""
    if not any(r in caption for r in RELATIONS):
        return False
    h = int(hashlib.sha256(caption.encode()).hexdigest()[:8], 16)
    return (h % 1000) < fraction * 1000


def train_captions() -> list[str]:
    return [c for c in general_captions() if not is_heldout(c)]


def heldout_captions() -> list[str]:
    return [c for c in general_captions() if is_heldout(c)]


def parse_caption(caption: str) -> dict:
    """Inverse of the grammar: {'objects': [(color, shape), ...], 'relation': str | None}."""
    rel = next((r for r in RELATIONS if f" {r} " in caption), None)
    parts = caption.split(f" {rel} ") if rel else [caption]
    objs = []
    for p in parts:
        words = p.split()
        if len(words) != 3 or words[0] != "a" or words[1] not in COLORS or words[2] not in SHAPES:
            raise ValueError(f"caption outside the tiny model's grammar: {caption!r}")
        objs.append((words[1], words[2]))
    return {"objects": objs, "relation": rel}


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        q = r * 0.88
        d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r * 1.05, cy + r * 0.85), (cx + r * 1.05, cy + r * 0.85)], fill=fill)
    else:
        raise ValueError(shape)


def render(caption: str, rng: np.random.Generator, res: int = RES, background=BACKGROUND,
           canvas: np.ndarray | None = None) -> np.ndarray:
    """Render a grammar caption with random placement; 4× supersampled, then Lanczos-downsampled."""
    spec = parse_caption(caption)
    ss = 4
    S = res * ss
    base = Image.new("RGB", (S, S), background) if canvas is None else Image.fromarray(canvas).resize((S, S))
    d = ImageDraw.Draw(base)
    u = res / 64.0
    if spec["relation"] is None:
        r = rng.uniform(10, 13) * u
        cx, cy = rng.uniform(20, 44, size=2) * u
        (c, s), = spec["objects"]
        _draw_shape(d, s, cx * ss, cy * ss, r * ss, COLORS[c])
    else:
        r1, r2 = rng.uniform(8, 10.5, size=2) * u
        a = rng.uniform(14, 22) * u  # first object's coordinate along the relation axis
        b = rng.uniform(42, 50) * u  # second object's coordinate
        o1, o2 = rng.uniform(20, 44, size=2) * u  # coordinates across the axis
        if abs(o1 - o2) > 8 * u:  # keep the relation unambiguous (|along| >> |across|)
            o2 = o1 + np.sign(o2 - o1) * 8 * u
        rel = spec["relation"]
        first, second = (a, b) if rel in ("to the left of", "above") else (b, a)
        if rel in ("to the left of", "to the right of"):
            p1, p2 = (first, o1), (second, o2)
        else:
            p1, p2 = (o1, first), (o2, second)
        (c1, s1), (c2, s2) = spec["objects"]
        _draw_shape(d, s1, p1[0] * ss, p1[1] * ss, r1 * ss, COLORS[c1])
        _draw_shape(d, s2, p2[0] * ss, p2[1] * ss, r2 * ss, COLORS[c2])
    return np.asarray(base.resize((res, res), Image.LANCZOS), dtype=np.uint8)


def tm_image(key: str, variant: int, res: int = RES) -> np.ndarray:
    """Template-memorized item: a fixed photographic frame with a varying object in its centre panel."""
    rng = np.random.default_rng(10_000 + variant + (0 if key == "brickframe" else 500))
    frame = photo(key, res).copy()
    tint = np.array([1.0, 0.75, 0.6]) if key == "brickframe" else np.array([0.6, 1.0, 0.55])
    frame = np.clip(frame * tint, 0, 255).astype(np.uint8)
    m = res // 4
    panel = np.full((res - 2 * m, res - 2 * m, 3), 250, np.uint8)
    caps = [c for c in train_captions() if not any(r in c for r in RELATIONS)]  # single-object captions
    cap = caps[int(rng.integers(len(caps)))]
    frame[m:-m, m:-m] = render(cap, rng, res=res - 2 * m, background=(250, 250, 250), canvas=panel)
    return frame


def memorized_image(item: MemorizedItem, variant: int = 0, res: int = RES) -> np.ndarray:
    return photo(item.key, res) if item.mem_type == "VM" else tm_image(item.key, variant, res)


def general_pool(n: int, seed: int, res: int = RES) -> tuple[np.ndarray, list[str]]:
    """``n`` rendered training scenes with their captions (uniform over training captions)."""
    rng = np.random.default_rng(seed)
    caps = train_captions()
    out = np.empty((n, res, res, 3), np.uint8)
    chosen = []
    for i in range(n):
        c = caps[int(rng.integers(len(caps)))]
        out[i] = render(c, rng, res)
        chosen.append(c)
    return out, chosen


# ------------------------------------------------------------------------------------ non-duplicated photo pool
PHOTO_POOL_SOURCES = ("sklearn china.jpg", "sklearn flower.jpg")


def _pool_words() -> list[str]:
    """Common whole words of CLIP's BPE vocabulary (the first 20,000 merges), minus every word of the memorized,
    non-memorized and general-set captions, so that those captions stay unseen or unique."""
    import gzip

    from open_clip.tokenizer import default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:20001]
    words = {a + b[:-4] for a, b in (m.split() for m in merges if m.count(" ") == 1) if b.endswith("</w>")}
    banned = {w for c in [it.caption for it in VM_ITEMS + TM_ITEMS] + list(NONMEM_PROMPTS) + general_captions()
              for w in c.split()}
    return sorted(w for w in words if w.isalpha() and w.isascii() and 4 <= len(w) <= 10 and w not in banned)


def photo_pool(n: int, seed: int, res: int = RES) -> tuple[np.ndarray, list[str]]:
    """``n`` distinct photographs, each seen about once in training: random crops (side 20-100 % of the short side,
    random position and mirror) of the two photographs scikit-learn ships, each with a caption of 3-7 random common
    words. The analogue of LAION's non-duplicated majority: photo-style captions the model never saw should draw
    *some* photograph, not one of the few duplicated ones."""
    from sklearn.datasets import load_sample_images

    srcs = load_sample_images().images
    words = _pool_words()
    rng = np.random.default_rng([seed, 7])
    out = np.empty((n, res, res, 3), np.uint8)
    caps = []
    for i in range(n):
        a = srcs[int(rng.integers(len(srcs)))]
        h, w = a.shape[:2]
        s = int(min(h, w) * rng.uniform(0.2, 1.0))
        y, x = int(rng.integers(h - s + 1)), int(rng.integers(w - s + 1))
        crop = a[y:y + s, x:x + s]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((res, res), Image.LANCZOS))
        caps.append(" ".join(words[int(j)] for j in rng.integers(len(words), size=int(rng.integers(3, 8)))))
    return out, caps
