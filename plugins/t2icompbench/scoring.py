"""T2I-CompBench per-image scoring rules: pure arithmetic on parses, answers and detections (METHODS §5.3).

Everything here is model-free (numpy; :func:`depth_to_frame` also uses torch and PIL for its resizes), so each
rule is unit-tested on synthetic inputs (fake parses, fake VQA probabilities, fake detections, fake depth maps). The
model code that produces those inputs lives in :mod:`memobench_plugins.t2icompbench.backends`.

``compat=True`` reproduces the reference scorers of ``Karine-Huang/T2I-CompBench`` (commit 1b70949) including the
quirks METHODS §5.3 / §9 #16–#18 list; ``compat=False`` is the corrected variant, reported under a different metric
id (METHODS §0.2 rule 4). Every quirk and every divergence from the reference's crash paths is named where it is
implemented. This module imports no model library (torch only inside :func:`depth_to_frame`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "BLIP_DROP_CHUNKS", "COMPLEX_PREPOSITIONS", "Detection", "NUMBER_WORDS", "NUMERACY_NAME_MAP", "PERSON_WORDS",
    "Parse", "SPATIAL_2D_VOCAB", "SPATIAL_3D_VOCAB", "Token", "blip_image_score", "blip_questions",
    "box_iou", "combine_3in1", "complex_kind", "complex_key", "complex_spatial_objects", "depth_to_frame",
    "first_last_nouns", "locality_2d", "locality_3d", "merge_duplicates", "numeracy_expected",
    "numeracy_score", "position_2d", "position_3d", "pre_question", "read_objects", "reference_frame",
    "remove_adjectives", "spatial_2d_score", "spatial_3d_score", "spatial_objects",
]


# ---------------------------------------------------------------------------------------------- parses
@dataclass(frozen=True)
class Token:
    """One token of a parsed prompt: text, coarse POS tag (spaCy ``pos_``) and trailing whitespace."""

    text: str
    pos: str = "X"
    ws: str = " "


@dataclass(frozen=True)
class Parse:
    """What the reference scorers read from spaCy ``en_core_web_sm``: tokens with POS, and noun chunks."""

    tokens: tuple[Token, ...]
    noun_chunks: tuple[str, ...] = ()

    def span_text(self, start: int, stop: int) -> str:
        """spaCy's ``doc[start:stop].text`` (slice clipped to the doc; inner whitespace kept, trailing dropped)."""
        toks = self.tokens[max(0, start):max(0, stop)]
        if not toks:
            return ""
        return "".join(t.text + t.ws for t in toks[:-1]) + toks[-1].text


# ---------------------------------------------------------------------------------------------- A. BLIP-VQA
BLIP_DROP_CHUNKS = ("top", "the side", "the left", "the right")  # BLIPvqa_eval/BLIP_vqa.py


def pre_question(question: str, max_words: int = 50) -> str:
    """BLIP's ``data.utils.pre_question``: lower-case, delete ``.!"()*#:;~``, strip trailing spaces, keep at most
    ``max_words`` space-separated words (the ``?`` stays)."""
    q = re.sub(r"([.!\"()*#:;~])", "", question.lower()).rstrip(" ")
    words = q.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else q


def blip_questions(parse: Parse, np_num: int = 8) -> list[str]:
    """The ``np_num`` questions of one prompt (METHODS §5.3 A.1–2): question n is ``"<noun chunk n>?"`` over the
    noun chunks not in :data:`BLIP_DROP_CHUNKS`, ``""`` when the prompt has fewer than n chunks (no question)."""
    phrases = [c for c in parse.noun_chunks if c not in BLIP_DROP_CHUNKS]
    return [f"{phrases[n]}?" if n < len(phrases) else "" for n in range(np_num)]


def blip_image_score(probs: Sequence[float | None], compat: bool = True) -> float:
    """Image score = Π_n P_n over the questions (METHODS §5.3 A.3–4); ``None`` (no question) contributes 1.

    compat (``BLIP_vqa.py`` + ``blip_vqa.vqa_prob``): each P_n is written as ``'{:.4f}'`` text and read back into a
    float32 tensor, the product runs in float32, and the image score is again ``'{:.4f}'``-rounded. Corrected: the
    float64 product of the unrounded probabilities.
    """
    if compat:
        acc = np.float32(1.0)
        first = True
        for p in probs:
            v = np.float32(1.0) if p is None else np.float32(float(f"{float(np.float32(p)):.4f}"))
            acc = v if first else np.float32(acc * v)
            first = False
        return float(f"{float(acc):.4f}")
    return float(np.prod([1.0 if p is None else float(p) for p in probs], dtype=np.float64))


# ---------------------------------------------------------------------------------------------- geometry
def reference_frame(height: int, width: int, size: int = 479, max_size: int = 480) -> tuple[int, int]:
    """(H', W') of torchvision ``Resize(size=479, max_size=480)``, the image size UniDet saw in the reference (its
    boxes, and so the 150-pixel distance threshold, live in this frame; 512×512 → 479×479)."""
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = size, int(size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if height <= width else (new_long, new_short)


def box_iou(b1: Sequence[float], b2: Sequence[float]) -> float:
    """IoU of two (x0, y0, x1, y1) boxes with continuous areas, as ``determine_position`` computes it (0 when the
    union is empty, where the reference would divide by zero)."""
    ix = max(0.0, min(b1[2], b2[2]) - max(b1[0], b2[0]))
    iy = max(0.0, min(b1[3], b2[3]) - max(b1[1], b2[1]))
    inter = ix * iy
    union = (b1[2] - b1[0]) * (b1[3] - b1[1]) + (b2[2] - b2[0]) * (b2[3] - b2[1]) - inter
    return inter / union if union > 0 else 0.0


def _centres(b1, b2) -> tuple[float, float]:
    dx = (b2[0] + b2[2]) / 2 - (b1[0] + b1[2]) / 2
    dy = (b2[1] + b2[3]) / 2 - (b1[1] + b1[3]) / 2
    return dx, dy


@dataclass(frozen=True)
class Detection:
    """One detection: class label, confidence and (x0, y0, x1, y1) box in pixels (y downward)."""

    label: str
    score: float
    box: tuple[float, float, float, float]


# ---------------------------------------------------------------------------------------------- B. 2D spatial
SPATIAL_2D_VOCAB = ("on side of", "next to", "near", "on the left of", "on the right of", "on the bottom of",
                    "on the top of", "on top of")  # 2D_spatial_eval.py, in this order
PERSON_WORDS = ("girl", "boy", "man", "woman")


def locality_2d(prompt: str) -> str | None:
    """First entry of :data:`SPATIAL_2D_VOCAB` contained (as a raw substring) in the prompt."""
    return next((w for w in SPATIAL_2D_VOCAB if w in prompt), None)


def position_2d(locality: str | None, box1, box2, compat: bool = True, iou_threshold: float = 0.1,
                distance_threshold: float = 150.0) -> float:
    """``determine_position`` of ``2D_spatial_eval.py`` (METHODS §5.3 B.5): dx = cx2 − cx1, dy = cy2 − cy1.

    compat: ``on top of`` (without "the") is in the vocabulary but has no branch → 0 (§9 #17). Corrected:
    ``on top of`` is scored like ``on the top of``.
    """
    if not compat and locality == "on top of":
        locality = "on the top of"
    dx, dy = _centres(box1, box2)
    iou = box_iou(box1, box2)
    soft = 1.0 if iou < iou_threshold else iou_threshold / iou
    if locality in ("next to", "on side of", "near"):
        if abs(dx) < distance_threshold or abs(dy) < distance_threshold:
            return 1.0
        return distance_threshold / max(abs(dx), abs(dy))
    if locality == "on the right of":
        return soft if dx < 0 and abs(dx) > abs(dy) else 0.0
    if locality == "on the left of":
        return soft if dx > 0 and abs(dx) > abs(dy) else 0.0
    if locality == "on the bottom of":
        return soft if dy < 0 and abs(dy) > abs(dx) else 0.0
    if locality == "on the top of":
        return soft if dy > 0 and abs(dy) > abs(dx) else 0.0
    return 0.0


def first_last_nouns(parse: Parse) -> tuple[str | None, str | None]:
    """obj1 = first, obj2 = last ``NOUN`` token (simple-structure prompts). The reference raises IndexError on a
    prompt without any NOUN; here both are ``None`` (score 0)."""
    nouns = [t.text for t in parse.tokens if t.pos == "NOUN"]
    return (nouns[0], nouns[-1]) if nouns else (None, None)


COMPLEX_PREPOSITIONS = ("on top of", "on bottom of", "on the left", "on the right", "next to", "on side of", "near")


def complex_spatial_objects(parse: Parse) -> tuple[str | None, str | None]:
    """``2D_spatial_eval.py --complex``: for every preposition of :data:`COMPLEX_PREPOSITIONS` (matched on 3-, 2- or
    1-token spans), the nearest NOUN/PROPN before it and the first NOUN after it (if none up to the end: the first
    PROPN followed by a non-PROPN). Exactly two objects in total → (obj1, obj2), else (None, None)."""
    toks, n = parse.tokens, len(parse.tokens)
    objects: list[str] = []
    for i in range(n):
        t3, t2, t1 = parse.span_text(i, i + 3), parse.span_text(i, i + 2), parse.span_text(i, i + 1)
        if not (t3 in COMPLEX_PREPOSITIONS or t2 in COMPLEX_PREPOSITIONS or t1 in COMPLEX_PREPOSITIONS):
            continue
        k = 3 if t3 in COMPLEX_PREPOSITIONS else (2 if t2 in COMPLEX_PREPOSITIONS else 1)
        for j in range(i - 1, -1, -1):
            if toks[j].pos in ("NOUN", "PROPN"):
                objects.append(toks[j].text)
                break
        reached_end = False
        for j in range(i + k, n):
            if toks[j].pos == "NOUN":
                objects.append(toks[j].text)
                break
            if j == n - 1:
                reached_end = True
        if reached_end:
            for j in range(i + k, n):
                if j + 1 < n and toks[j].pos == "PROPN" and toks[j + 1].pos != "PROPN":
                    objects.append(toks[j].text)
                    break
    return (objects[0], objects[1]) if len(objects) == 2 else (None, None)


def spatial_objects(parse: Parse, complex_structure: bool = False) -> tuple[str | None, str | None]:
    """(obj1, obj2) with ``girl``/``boy``/``man``/``woman`` → ``person`` (METHODS §5.3 B.2, F.1)."""
    o1, o2 = complex_spatial_objects(parse) if complex_structure else first_last_nouns(parse)
    return (("person" if o1 in PERSON_WORDS else o1), ("person" if o2 in PERSON_WORDS else o2))


def spatial_2d_score(detections: Sequence[Detection], obj1: str | None, obj2: str | None, locality: str | None,
                     compat: bool = True, iou_threshold: float = 0.1, distance_threshold: float = 150.0,
                     floor: float = 0.5) -> float:
    """METHODS §5.3 B.4–6. ``detections`` in detector output order (the first detection of a class is used, matched
    by exact label). Both objects: 0.25·c1 + 0.25·c2 + 0.5·pos; one: 0.25·c; none: 0; then score < ``floor`` → 0
    (§9 #16: the 2D script applies this floor, the 3D and numeracy scripts do not)."""
    labels = [d.label for d in detections]
    found1 = obj1 is not None and obj1 in labels
    found2 = obj2 is not None and obj2 in labels
    if found1 and found2:
        d1, d2 = detections[labels.index(obj1)], detections[labels.index(obj2)]
        score = 0.25 * d1.score + 0.25 * d2.score + position_2d(
            locality, d1.box, d2.box, compat, iou_threshold, distance_threshold) / 2
    elif found1:
        score = 0.25 * detections[labels.index(obj1)].score
    elif found2:
        score = 0.25 * detections[labels.index(obj2)].score
    else:
        score = 0.0
    return 0.0 if score < floor else float(score)


# ---------------------------------------------------------------------------------------------- C. 3D spatial
SPATIAL_3D_VOCAB = ("in front of", "behind", "hidden")


def locality_3d(prompt: str) -> str | None:
    return next((w for w in SPATIAL_3D_VOCAB if w in prompt), None)


def depth_to_frame(depth: np.ndarray, image_hw: tuple[int, int], frame_hw: tuple[int, int],
                   compat: bool = True) -> np.ndarray:
    """The depth map the reference crops (METHODS §5.3 C.1): min-max normalise the predicted map, bilinear
    (align_corners) to the image size; compat: stored as an 8-bit PNG (``255·d`` truncated, as PIL's F→L
    conversion does) and resized to the detector frame by PIL bilinear, then /255. Corrected: the float map is
    resized to the detector frame directly (no 8-bit quantisation). Returns a float array of shape ``frame_hw``."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    d = torch.as_tensor(np.asarray(depth, dtype=np.float32))
    rng = float(d.max() - d.min())
    d = (d - d.min()) / rng if rng > 0 else torch.zeros_like(d)
    if compat:
        d = F.interpolate(d[None, None], size=tuple(image_hw), mode="bilinear", align_corners=True)[0, 0]
        u8 = np.clip(np.trunc(255.0 * d.numpy()), 0, 255).astype(np.uint8)
        im = Image.fromarray(u8).resize((frame_hw[1], frame_hw[0]), Image.BILINEAR)
        return np.asarray(im, dtype=np.float32) / 255.0
    d = F.interpolate(d[None, None], size=tuple(frame_hw), mode="bilinear", align_corners=True)[0, 0]
    return d.numpy().astype(np.float32)


def _crop_mean(depth: np.ndarray, box, transposed: bool) -> float:
    x0, y0, x1, y1 = (int(v) for v in box)
    crop = depth[x0:x1, y0:y1] if transposed else depth[y0:y1, x0:x1]
    return float(crop.mean()) if crop.size else math.nan  # the reference's empty-crop mean is NaN too


def position_3d(locality: str | None, box1, box2, depth: np.ndarray, compat: bool = True,
                iou_threshold_3d: float = 0.5) -> float:
    """pos3d of ``3D_spatial_eval.determine_position`` (METHODS §5.3 C.4): Δ = mean depth in box 1 − in box 2
    (MiDaS inverse depth: larger = nearer). ``in front of``: IoU > 0.5 and Δ > 0 → 1; 0 < IoU < 0.5 and Δ > 0 →
    IoU/0.5; else 0. ``behind``/``hidden``: the same with Δ < 0.

    compat: the crop indexes rows with the x-range and columns with the y-range (§9 #18), boxes truncated by
    ``int()``; IoU exactly 0.5 falls in neither branch → 0 (the code's strict ``<``; METHODS writes ≤). Corrected:
    rows = y, columns = x, and 0 < IoU ≤ 0.5 → IoU/0.5.
    """
    if locality not in SPATIAL_3D_VOCAB:
        return 0.0
    iou = box_iou(box1, box2)
    delta = _crop_mean(depth, box1, compat) - _crop_mean(depth, box2, compat)  # NaN compares False, as in torch
    ok = delta > 0 if locality == "in front of" else delta < 0
    if iou > iou_threshold_3d:
        return 1.0 if ok else 0.0
    if 0 < iou < iou_threshold_3d or (not compat and 0 < iou <= iou_threshold_3d):
        return iou / iou_threshold_3d if ok else 0.0
    return 0.0


def _substring_positions(labels: list[str], obj1: str, obj2: str, compat: bool) -> tuple[int | None, int | None]:
    """Indices of the detections matched to obj1/obj2 by substring of the class name (``3D_spatial_eval.py``).
    compat: one pass that overwrites each index on every match and stops when both are set, so obj1 may get a later
    detection than its first. Corrected: the first matching detection of each."""
    p1 = p2 = None
    if compat:
        for i, lab in enumerate(labels):
            if obj1 in lab:
                p1 = i
            if obj2 in lab:
                p2 = i
            if p1 is not None and p2 is not None:
                break
        return p1, p2
    p1 = next((i for i, lab in enumerate(labels) if obj1 in lab), None)
    p2 = next((i for i, lab in enumerate(labels) if obj2 in lab), None)
    return p1, p2


def spatial_3d_score(detections: Sequence[Detection], obj1: str | None, obj2: str | None, locality: str | None,
                     depth: np.ndarray, compat: bool = True, iou_threshold_3d: float = 0.5) -> float:
    """METHODS §5.3 C.2–3: objects matched by substring against the class names joined by spaces; both found:
    0.25·c1 + 0.25·c2 + 0.5·pos3d; one: 0.25·c (first match); none: 0. No 0.5 floor (§9 #16). A name found only
    across two joined class names (the reference then fails on a ``None`` index) counts as not found."""
    labels = [d.label for d in detections]
    joined = " ".join(labels)
    in1 = obj1 is not None and obj1 in joined
    in2 = obj2 is not None and obj2 in joined
    if in1 and in2:
        p1, p2 = _substring_positions(labels, obj1, obj2, compat)
        if p1 is not None and p2 is not None:
            d1, d2 = detections[p1], detections[p2]
            return float(0.25 * d1.score + 0.25 * d2.score
                         + position_3d(locality, d1.box, d2.box, depth, compat, iou_threshold_3d) / 2)
        in1, in2 = p1 is not None, p2 is not None
    for obj, found in ((obj1, in1), (obj2, in2)):
        if found:
            i = next((i for i, lab in enumerate(labels) if obj in lab), None)
            if i is not None:
                return float(0.25 * detections[i].score)
    return 0.0


# ---------------------------------------------------------------------------------------------- D. numeracy
NUMBER_WORDS = ("a", "an", "one", "two", "three", "four", "five", "six", "seven", "eight")
_NUMBER_VALUES = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}
NUMERACY_NAME_MAP = {"boy": "person", "girl": "person", "man": "person", "woman": "person", "ship": "boat",
                     "telivision": "tv", "goldfish": "fish", "painting": "picture"}


def read_objects(text: str) -> tuple[list[str], list[str]]:
    """``new_objects.txt`` (``singular - plural`` per line) → (singulars, plurals), lower-cased and stripped."""
    pairs = [line.split(" - ") for line in text.splitlines() if line.strip()]
    return [p[0].strip().lower() for p in pairs], [p[1].strip().lower() for p in pairs]


@dataclass
class Expected:
    """Parsed numeracy prompt: the objects (singular form) and their counts. In compat mode ``counts`` can be
    shorter than ``objects`` (a count the reference failed to parse is not appended), misaligning later pairs."""

    objects: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)


def numeracy_expected(parse: Parse, singulars: Sequence[str], plurals: Sequence[str],
                      compat: bool = True) -> Expected:
    """METHODS §5.3 D.2 (``numeracy_eval.py``): every token in :data:`NUMBER_WORDS` (case-sensitive) followed by a
    known object (two tokens first, then one; singular or plural) yields (object in singular, n).

    Reference behaviours kept in compat: ``a``/``an`` before a *plural* has no numeric value (word2number raises,
    the count is skipped → misaligned counts); a bigram object is taken as written after ``a``/``an``/``one``.
    Reference crash paths, replaced by documented choices in both modes: a number word as the last token is
    ignored (IndexError); a singular-only word after a number ≥ 2 keeps the word itself (ValueError).
    Corrected: ``a``/``an`` count 1 everywhere, so counts stay aligned.
    """
    toks = [t.text for t in parse.tokens]
    n = len(toks)
    out = Expected()

    def value(word: str) -> int | None:
        return _NUMBER_VALUES.get(word, None if compat else 1)

    for i, w in enumerate(toks):
        if w not in NUMBER_WORDS:
            continue
        bigram = f"{toks[i + 1]} {toks[i + 2]}" if i + 2 < n else None
        if i < n - 2 and (bigram in singulars or bigram in plurals):
            if bigram in plurals and w not in ("a", "an", "one"):
                out.objects.append(singulars[plurals.index(bigram)])
                v = value(w)
                if v is not None:
                    out.counts.append(v)
            else:
                out.counts.append(1)
                out.objects.append(bigram)
        elif i + 1 < n and (toks[i + 1] in singulars or toks[i + 1] in plurals):
            nxt = toks[i + 1]
            if nxt in singulars and w in ("a", "an", "one"):
                out.counts.append(1)
                out.objects.append(nxt)
            else:
                out.objects.append(singulars[plurals.index(nxt)] if nxt in plurals else nxt)
                v = value(w)
                if v is not None:
                    out.counts.append(v)
    return out


def _merge_iou(b1, b2, thresh: float = 0.9) -> bool:
    """``numeracy_eval.calculate_iou``: inclusive pixel areas (+1); duplicate when IoU > 0.9 or the intersection
    covers > 90 % of either box."""
    ix = max(0.0, min(b1[2], b2[2]) - max(b1[0], b2[0]) + 1)
    iy = max(0.0, min(b1[3], b2[3]) - max(b1[1], b2[1]) + 1)
    inter = ix * iy
    a1 = (b1[2] - b1[0] + 1) * (b1[3] - b1[1] + 1)
    a2 = (b2[2] - b2[0] + 1) * (b2[3] - b2[1] + 1)
    iou = inter / float(a1 + a2 - inter)
    return iou > thresh or inter / float(a1) > thresh or inter / float(a2) > thresh


def merge_duplicates(detections: Sequence[Detection], thresh: float = 0.9) -> list[Detection]:
    """METHODS §5.3 D.1: in output order, drop a detection whose class equals a kept one's and whose box duplicates
    it (:func:`_merge_iou`)."""
    kept: list[Detection] = []
    for d in detections:
        if not any(d.label == k.label and _merge_iou(d.box, k.box, thresh) for k in kept):
            kept.append(d)
    return kept


def numeracy_score(detections: Sequence[Detection], expected: Expected, merge_thresh: float = 0.9) -> float:
    """METHODS §5.3 D.3–4: w = 1/#objects; per expected (o, n): name mapping (:data:`NUMERACY_NAME_MAP`); if o is not
    a detected class, every detected class containing o is renamed to o (the rename persists for later objects);
    +0.5·w if o is detected, +0.5·w more if its count equals n. No floor. A prompt without any parsed object (the
    reference divides by zero) scores 0; a count missing through misalignment never matches."""
    if not expected.objects:
        return 0.0
    names = [d.label for d in merge_duplicates(detections, merge_thresh)]
    w = 1.0 / len(expected.objects)
    score = 0.0
    for i, obj in enumerate(expected.objects):
        obj = NUMERACY_NAME_MAP.get(obj, obj)
        if obj not in names:
            names = [obj if obj in name else name for name in names]
        if obj in names:
            score += 0.5 * w
            if i < len(expected.counts) and names.count(obj) == expected.counts[i]:
                score += 0.5 * w
    return score


# ---------------------------------------------------------------------------------------------- E/F. CLIP, complex
def remove_adjectives(parse: Parse) -> str:
    """The complex category's action text: the prompt's tokens without spaCy ``ADJ``, joined by single spaces."""
    return " ".join(t.text for t in parse.tokens if t.pos != "ADJ")


def complex_key(prompt: str) -> str:
    """``3_in_1.py``'s prompt key: lower-cased text before the first ``.``."""
    return prompt.split(".")[0].lower()


def complex_kind(prompt: str, spatial_lines: Sequence[str], action_lines: Sequence[str]) -> str:
    """``spatial`` if the prompt's key is a key of ``complex_val_spatial.txt``, else ``action`` if one of
    ``complex_val_action.txt``, else ``spatialaction`` (METHODS §5.3 F.2)."""
    key = complex_key(prompt)
    if key in {complex_key(s) for s in spatial_lines}:
        return "spatial"
    if key in {complex_key(a) for a in action_lines}:
        return "action"
    return "spatialaction"


def combine_3in1(kind: str, attribute: float, spatial: float, action: float) -> float:
    """METHODS §5.3 F.2: spatial → (spatial + attribute)·0.5; action → (action + attribute)·0.5; otherwise
    (attribute + spatial + action)/3."""
    if kind == "spatial":
        return (spatial + attribute) * 0.5
    if kind == "action":
        return (action + attribute) * 0.5
    return (attribute + spatial + action) / 3

