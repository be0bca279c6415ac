"""The T2I-CompBench metric plugin (memobench_plugins.t2icompbench; METHODS §5.3, §9 #16–#20).

* Arithmetic: every scoring rule and every compat quirk against values computed by hand from METHODS §5.3 on
  synthetic inputs (fake parses, fake per-question probabilities, fake detections, fake depth maps).
* Real code paths: BLIP VQA (transformers ``BlipForQuestionAnswering`` + ``BlipProcessor`` with a BERT tokenizer built
  from a vocabulary file written here), the OWLv2 detector (a CLIP BPE tokenizer built from byte-level vocab/merges
  files), MiDaS-style DPT depth and open_clip CLIP, all tiny random-weight models saved to folders and loaded through
  the same ``from_pretrained`` route as real weights (the real-weights path is the ``*_weights`` parameter).
* Without weights (offline hub ids) or spaCy model the metric is ``unavailable`` with a reason, never a number.

spaCy's ``en_core_web_sm`` is not available offline, so the end-to-end tests inject the parses (``load_nlp``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import memobench_plugins.t2icompbench as t2i
from memobench_plugins.t2icompbench import scoring as S
from memobench.api import Context, Prompt, Sample

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "t2i_compbench"
D = S.Detection


def tok(spec: str) -> S.Parse:
    """``"The/DET red/ADJ hat/NOUN"`` → Parse (space-separated tokens, ``text/POS``; a token without POS is X)."""
    toks = []
    for item in spec.split():
        text, _, pos = item.rpartition("/") if "/" in item else (item, "", "X")
        toks.append(S.Token(text, pos or "X"))
    if toks:
        toks[-1] = S.Token(toks[-1].text, toks[-1].pos, "")
    return S.Parse(tuple(toks))


# ================================================================================== A. BLIP-VQA arithmetic
def test_blip_questions_drop_list_and_padding():
    p = S.Parse((), ("a red book", "the left", "a yellow vase", "top", "the side", "the right", "a cat"))
    qs = S.blip_questions(p, 8)
    assert qs == ["a red book?", "a yellow vase?", "a cat?", "", "", "", "", ""]
    assert S.blip_questions(p, 2) == ["a red book?", "a yellow vase?"]  # np_num caps the questions
    assert S.pre_question('A Red (big) "Book": #1!~?  ') == "a red big book 1?"
    assert S.pre_question(" ".join(["w"] * 60) + "?") == " ".join(["w"] * 50)


def test_blip_product_compat_rounding_and_corrected():
    # compat: 0.91234 → '0.9123' → float32; × 0.5 in float32 = 0.45615 (float32 0.456149995) → '{:.4f}' = 0.4561
    assert S.blip_image_score([0.91234, 0.5, None, None, None, None, None, None]) == 0.4561
    # corrected: float64 product of the raw probabilities
    assert S.blip_image_score([0.91234, 0.5, None], compat=False) == pytest.approx(0.45617, abs=1e-15)
    assert S.blip_image_score([None] * 8) == 1.0  # no question at all: every factor is 1
    # 3 answers: 0.8·0.7·0.6 = 0.336; rounding per answer matters: 0.66666 → 0.6667, 0.33333 → 0.3333
    assert S.blip_image_score([0.8, 0.7, 0.6]) == 0.336
    assert S.blip_image_score([0.66666, 0.33333]) == 0.2222  # 0.6667·0.3333 = 0.22221111
    assert S.blip_image_score([0.66666, 0.33333], compat=False) == pytest.approx(0.2222177778, abs=1e-10)


# ================================================================================== B. 2D spatial arithmetic
def test_reference_frame_is_torchvision_resize_479_max_480():
    assert S.reference_frame(512, 512) == (479, 479)
    assert S.reference_frame(768, 512) == (480, 320)  # long side 718 > 480 → 480, short int(480·479/718) = 320
    assert S.reference_frame(480, 640) == (360, 480)
    assert S.reference_frame(64, 64) == (479, 479)


def test_locality_first_vocab_match_and_objects():
    assert S.locality_2d("a dog on the left of a cat") == "on the left of"
    assert S.locality_2d("a cup on top of a table") == "on top of"
    assert S.locality_2d("a bee near a rose") == "near" and S.locality_2d("a linear cat") == "near"  # raw substring
    assert S.locality_2d("a dog and a cat") is None
    assert S.spatial_objects(tok("a/DET girl/NOUN on/ADP the/DET top/NOUN of/ADP a/DET frog/NOUN")) == \
        ("person", "frog")  # first/last NOUN, girl → person
    assert S.spatial_objects(tok("on/ADP the/DET left/ADJ")) == (None, None)  # no NOUN (the reference crashes)


def test_position_2d_rules_hand_computed():
    b1 = (0, 0, 100, 100)  # centre (50, 50)
    right = (300, 20, 400, 120)  # centre (350, 70): dx = 300, dy = 20, IoU 0
    assert S.position_2d("on the left of", b1, right) == 1.0
    assert S.position_2d("on the right of", b1, right) == 0.0
    # overlap: b2 = (80, 0, 180, 100): dx 80 > dy 0, IoU = 20·100 / (2·10000 − 2000) = 1/9 ≥ 0.1 → 0.1·9 = 0.9
    assert S.position_2d("on the left of", b1, (80, 0, 180, 100)) == pytest.approx(0.9)
    below = (10, 300, 110, 400)  # dy = 300 > 0: box 1 is on the top of box 2
    assert S.position_2d("on the top of", b1, below) == 1.0 and S.position_2d("on the bottom of", b1, below) == 0.0
    assert S.position_2d("on the bottom of", below, b1) == 1.0
    # 'on top of' (no "the"): compat 0 (§9 #17), corrected like 'on the top of'
    assert S.position_2d("on top of", b1, below) == 0.0
    assert S.position_2d("on top of", b1, below, compat=False) == 1.0
    # near: |dx| or |dy| < 150 → 1, else 150 / max(|dx|, |dy|)
    assert S.position_2d("near", b1, (250, 400, 350, 500)) == pytest.approx(150 / 400)  # dx 250, dy 400
    assert S.position_2d("next to", b1, (250, 100, 350, 200)) == 1.0  # dy = 100 < 150
    assert S.position_2d(None, b1, right) == 0.0


def test_spatial_2d_score_weights_and_floor():
    dets = [D("dog", 0.9, (0, 0, 100, 100)), D("cat", 0.8, (300, 20, 400, 120)), D("dog", 0.3, (300, 0, 400, 90))]
    # both: 0.25·0.9 + 0.25·0.8 + 0.5·1 = 0.925 (first 'dog' in output order is used)
    assert S.spatial_2d_score(dets, "dog", "cat", "on the left of") == pytest.approx(0.925)
    # wrong side: 0.425 < 0.5 → 0 (the 2D floor, §9 #16)
    assert S.spatial_2d_score(dets, "dog", "cat", "on the right of") == 0.0
    assert S.spatial_2d_score(dets, "dog", "cat", "on the right of", floor=0.0) == pytest.approx(0.425)
    # near at distance (300, 400)-ish: pos = 150/max → 0.225 + 0.2 + 0.5·(150/300) = 0.675
    far = [D("dog", 0.9, (0, 0, 100, 100)), D("cat", 0.8, (300, 300, 400, 400))]
    assert S.spatial_2d_score(far, "dog", "cat", "near") == pytest.approx(0.675)
    # only one object: 0.25·c < 0.5 → always floored to 0
    assert S.spatial_2d_score(dets, "dog", "horse", "near") == 0.0
    assert S.spatial_2d_score(dets, "dog", "horse", "near", floor=0.0) == pytest.approx(0.225)
    assert S.spatial_2d_score(dets, "horse", "cat", "near", floor=0.0) == pytest.approx(0.2)
    assert S.spatial_2d_score([], "dog", "cat", "near") == 0.0
    # 'on top of': compat pos 0 → 0.425 → 0; corrected 0.925
    top = [D("cup", 0.9, (0, 0, 100, 100)), D("table", 0.8, (0, 300, 100, 400))]
    assert S.spatial_2d_score(top, "cup", "table", "on top of") == 0.0
    assert S.spatial_2d_score(top, "cup", "table", "on top of", compat=False) == pytest.approx(0.925)


def test_complex_spatial_parse():
    p = tok("The/DET red/ADJ hat/NOUN was/AUX on/ADP top/NOUN of/ADP the/DET brown/ADJ coat/NOUN rack/NOUN ./PUNCT")
    assert S.complex_spatial_objects(p) == ("hat", "coat")  # nearest NOUN before, FIRST NOUN after
    p = tok("a/DET cat/NOUN near/ADP Paris/PROPN ./PUNCT")
    assert S.complex_spatial_objects(p) == ("cat", "Paris")  # no NOUN after: PROPN followed by a non-PROPN
    p = tok("a/DET cat/NOUN on/ADP the/DET left/NOUN of/ADP a/DET dog/NOUN and/CCONJ near/ADP a/DET cow/NOUN")
    assert S.complex_spatial_objects(p) == (None, None)  # four objects ≠ 2
    assert S.spatial_objects(tok("A/DET man/NOUN next/ADJ to/ADP a/DET woman/NOUN"), complex_structure=True) == \
        ("person", "person")
    assert S.remove_adjectives(tok("The/DET fluffy/ADJ cat/NOUN sat/VERB ./PUNCT")) == "The cat sat ."


# ================================================================================== C. 3D spatial arithmetic
def _depth_x(n: int = 100) -> np.ndarray:
    """Depth that grows with the column (x): D[r, c] = c / (n − 1)."""
    return np.tile(np.arange(n, dtype=np.float32) / (n - 1), (n, 1))


def test_position_3d_transposed_crop_quirk():
    d = _depth_x()
    b1, b2 = (50, 0, 90, 40), (30, 20, 70, 60)  # IoU = 400 / 2800 = 1/7
    # corrected: columns x → mean(b1) = 69.5/99, mean(b2) = 49.5/99, Δ > 0 → in front of: IoU/0.5 = 2/7
    assert S.position_3d("in front of", b1, b2, d, compat=False) == pytest.approx(2 / 7)
    assert S.position_3d("behind", b1, b2, d, compat=False) == 0.0
    # compat (§9 #18): rows ← x-range, columns ← y-range → means 19.5/99 and 39.5/99, Δ < 0
    assert S.position_3d("in front of", b1, b2, d) == 0.0
    assert S.position_3d("behind", b1, b2, d) == pytest.approx(2 / 7)
    assert S.position_3d("hidden", b1, b2, d) == pytest.approx(2 / 7)
    # large overlap → 1; no overlap → 0 (issue #23)
    assert S.position_3d("in front of", (60, 0, 99, 50), (55, 0, 95, 50), d, compat=False) == 1.0
    assert S.position_3d("in front of", (60, 0, 99, 20), (0, 0, 20, 20), d, compat=False) == 0.0
    # IoU exactly 0.5: compat 0 (strict '<' in the code), corrected IoU/0.5 = 1
    e1, e2 = (40, 0, 100, 40), (20, 0, 80, 40)  # overlap 40·40 = 1600, union 3200 → 0.5
    assert S.box_iou(e1, e2) == 0.5
    assert S.position_3d("in front of", e1, e2, np.tile(np.arange(101, dtype=np.float32), (101, 1)),
                         compat=False) == 1.0
    sq = np.tile(np.arange(101, dtype=np.float32), (101, 1)).T.copy()  # grows with the row: compat sees x as rows
    assert S.position_3d("in front of", e1, e2, sq) == 0.0


def test_spatial_3d_score_no_floor_and_match_quirk():
    d = _depth_x()
    dets = [D("dog", 0.8, (50, 0, 90, 40)), D("table", 0.6, (30, 20, 70, 60))]
    # compat: 0.2 + 0.15 + 0.5·0 = 0.35 (kept: no floor); corrected: 0.35 + 0.5·2/7
    assert S.spatial_3d_score(dets, "dog", "table", "in front of", d) == pytest.approx(0.35)
    assert S.spatial_3d_score(dets, "dog", "table", "in front of", d, compat=False) == pytest.approx(0.35 + 1 / 7)
    assert S.spatial_3d_score(dets, "dog", "horse", "in front of", d) == pytest.approx(0.2)  # one object, no floor
    # substring matching against class names, and compat's "last match before both are found"
    dets = [D("hot dog", 0.9, (0, 0, 10, 10)), D("cat", 0.5, (0, 0, 10, 10)), D("dog", 0.4, (50, 0, 90, 40)),
            D("table", 0.6, (30, 20, 70, 60))]
    # compat: obj1 'dog' matches indices 0 then 2 before 'table' (3) → index 2 (c 0.4): 0.1 + 0.15 + 0
    assert S.spatial_3d_score(dets, "dog", "table", "in front of", d) == pytest.approx(0.25)
    # corrected: first match 'hot dog' (c 0.9, box far from the table: IoU 0 → pos 0): 0.225 + 0.15
    assert S.spatial_3d_score(dets, "dog", "table", "in front of", d, compat=False) == pytest.approx(0.375)
    # a name found only across two joined labels ("hot" + "dog" → "t d") counts as not found
    assert S.spatial_3d_score([D("hot", 0.9, (0, 0, 1, 1)), D("dog", 0.5, (0, 0, 1, 1))], "t d", None, None, d) == 0


def test_depth_to_frame_quantised_png_vs_float():
    raw = np.array([[0.0, 1.0], [2.0, 7.0]], dtype=np.float32)  # min-max → 0, 1/7, 2/7, 1
    compat = S.depth_to_frame(raw, (2, 2), (2, 2))
    # ×255 = 0, 36.43, 72.86, 255 → truncated (PIL F→L) → /255
    np.testing.assert_allclose(compat, np.array([[0, 36], [72, 255]]) / 255.0, atol=1e-7)
    np.testing.assert_allclose(S.depth_to_frame(raw, (2, 2), (2, 2), compat=False), [[0, 1 / 7], [2 / 7, 1]],
                               atol=1e-6)
    up = S.depth_to_frame(raw, (4, 4), (3, 3))
    assert up.shape == (3, 3) and 0.0 <= up.min() <= up.max() <= 1.0
    assert S.depth_to_frame(np.ones((3, 3)), (3, 3), (3, 3)).max() == 0.0  # constant map: no division by zero


# ================================================================================== D. numeracy arithmetic
OBJECTS = "boy - boys\nturtle - turtles\ndog - dogs\nfish - fish\nsheep - sheep\nship - ships\n"


def test_numeracy_parse_counts_and_misalignment():
    sing, plur = S.read_objects(OBJECTS)
    assert sing[:2] == ["boy", "turtle"] and plur[:2] == ["boys", "turtles"]
    e = S.numeracy_expected(tok("two boys and one turtle"), sing, plur)
    assert (e.objects, e.counts) == (["boy", "turtle"], [2, 1])
    e = S.numeracy_expected(tok("three fish , a dog and eight sheep"), sing, plur)
    assert (e.objects, e.counts) == (["fish", "dog", "sheep"], [3, 1, 8])
    # 'a' + plural: no numeric value → count skipped in compat (misaligned), 1 in the corrected variant
    e = S.numeracy_expected(tok("a dogs and two turtles"), sing, plur)
    assert (e.objects, e.counts) == (["dog", "turtle"], [2])
    e = S.numeracy_expected(tok("a dogs and two turtles"), sing, plur, compat=False)
    assert (e.objects, e.counts) == (["dog", "turtle"], [1, 2])
    # case-sensitive number words; a trailing number word is ignored (the reference raises IndexError)
    assert S.numeracy_expected(tok("Two dogs and one"), sing, plur).objects == []


def test_merge_duplicates_inclusive_areas():
    a = D("dog", 0.9, (0, 0, 9, 9))  # inclusive area 100
    assert len(S.merge_duplicates([a, D("dog", 0.8, (0, 0, 9, 10))])) == 1  # IoU 100/110 > 0.9
    assert len(S.merge_duplicates([a, D("dog", 0.8, (1, 1, 10, 10))])) == 2  # IoU 81/119, cover 0.81
    assert len(S.merge_duplicates([D("dog", 0.9, (0, 0, 20, 20)), D("dog", 0.5, (2, 2, 5, 5))])) == 1  # inside
    assert len(S.merge_duplicates([a, D("cat", 0.8, (0, 0, 9, 9))])) == 2  # other class: kept


def test_numeracy_score_hand_computed():
    sing, plur = S.read_objects(OBJECTS)
    e = S.numeracy_expected(tok("two boys and one turtle"), sing, plur)
    p1, p2 = D("person", 0.9, (0, 0, 50, 50)), D("person", 0.8, (100, 0, 150, 50))
    dup = D("person", 0.7, (0, 0, 50, 51))  # merged into p1
    t = D("sea turtle", 0.6, (200, 0, 260, 60))  # renamed to 'turtle' (substring)
    # w = 1/2: person found + count 2 = 0.5; turtle found + count 1 = 0.5
    assert S.numeracy_score([p1, p2, dup, t], e) == pytest.approx(1.0)
    p3 = D("person", 0.6, (300, 0, 350, 50))
    assert S.numeracy_score([p1, p2, p3, t], e) == pytest.approx(0.75)  # 3 persons ≠ 2
    assert S.numeracy_score([t], e) == pytest.approx(0.5)
    assert S.numeracy_score([], e) == 0.0
    # misaligned compat counts: 'a dogs and two turtles' → dog vs count 2, turtle without a count
    mis = S.numeracy_expected(tok("a dogs and two turtles"), sing, plur)
    dets = [D("dog", 0.9, (0, 0, 10, 10)), D("turtle", 0.9, (20, 0, 30, 10)), D("turtle", 0.9, (40, 0, 50, 10))]
    assert S.numeracy_score(dets, mis) == pytest.approx(0.5)  # both found, no count matches
    fixed = S.numeracy_expected(tok("a dogs and two turtles"), sing, plur, compat=False)
    assert S.numeracy_score(dets, fixed) == pytest.approx(1.0)
    ship = S.numeracy_expected(tok("one ship"), sing, plur)
    assert S.numeracy_score([D("boat", 0.9, (0, 0, 9, 9))], ship) == 1.0  # ship → boat
    assert S.numeracy_score([D("dog", 0.9, (0, 0, 9, 9))], S.Expected()) == 0.0  # no object parsed


# ================================================================================== F. 3-in-1 arithmetic
def test_combine_3in1_hand_computed():
    assert S.combine_3in1("spatial", 0.8, 0.6, 0.3) == pytest.approx(0.7)
    assert S.combine_3in1("action", 0.8, 0.6, 0.3) == pytest.approx(0.55)
    assert S.combine_3in1("spatialaction", 0.8, 0.6, 0.3) == pytest.approx(1.7 / 3)
    assert S.complex_key("The Cat sat. On a mat.") == "the cat sat"
    assert S.complex_kind("The cat. X", ["the cat. y"], []) == "spatial"
    assert S.complex_kind("A dog runs", ["x"], ["a dog runs."]) == "action"
    assert S.complex_kind("A dog runs", ["x"], ["y"]) == "spatialaction"


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/t2i_compbench not present")
def test_complex_kinds_of_the_real_split():
    lines = {k: (SHARED / f"complex_val_{k}.txt").read_text().splitlines() for k in ("spatial", "action")}
    kinds = [S.complex_kind(p, lines["spatial"], lines["action"])
             for p in (SHARED / "complex_val.txt").read_text().splitlines()]
    assert (kinds.count("spatial"), kinds.count("action"), kinds.count("spatialaction")) == (58, 212, 30)
    sing, plur = S.read_objects((SHARED / "new_objects.txt").read_text())
    assert len(sing) == 101 and "bottle" in sing and "knives" in plur


# ================================================================================== plugin, registration, preset
def test_registration_ids_roles_and_import_is_torch_free():
    got = []
    t2i.register_metrics(got.append)
    names = [c.name for c in got]
    assert names == [f"t2icompbench_{c}" for c in ("color", "shape", "texture", "spatial", "3d_spatial", "numeracy",
                                                    "non_spatial", "complex")]
    for cls in got:
        assert cls.roles == (f"t2icompbench-{cls.category}",) and cls.info.name == cls.name
        assert cls.info.higher_is_better and "METHODS §5.3" in cls.__doc__
        params = cls.Params()
        assert params.compat is True
    assert t2i.METRICS["color"].Params().blip_weights == "Salesforce/blip-vqa-capfilt-large"
    assert t2i.METRICS["color"].Params().blip_image_size == 480 and t2i.METRICS["color"].Params().np_num == 8
    assert t2i.METRICS["spatial"].Params().floor == 0.5
    assert t2i.METRICS["non_spatial"].info.min == -1.0
    m = t2i.METRICS["spatial"](t2i.METRICS["spatial"].make_params({"compat": "false"}))
    assert m.metric_id == "t2icompbench_spatial_corrected"
    for cat, bad in (("color", {"question_token": "sep"}), ("complex", {"question_token": "x"}),
                     ("spatial", {"detector_threshold": "1.5"}), ("complex", {"batch_size": "0"})):
        with pytest.raises(ValueError, match="t2icompbench"):
            t2i.METRICS[cat].make_params(bad)
    code = "import sys, memobench_plugins.t2icompbench; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_preset_report():
    mk = lambda pid, seed: Sample(f"{pid}-{seed}", Prompt(str(pid), "x"), seed, np.zeros((2, 2, 3), np.uint8), [])
    ok = [mk(p, s) for p in range(300) for s in range(42, 52)]
    rep = t2i.preset_report(ok)
    assert rep["conforming"] and rep["deviations"] == [] and rep["seeds"] == list(range(42, 52))
    rep = t2i.preset_report([mk(0, 0), mk(0, 1)])
    assert not rep["conforming"] and len(rep["deviations"]) == 2


def _ctx(tmp_path, offline=True) -> Context:
    return Context(cache_dir=tmp_path, offline=offline, device="cpu")


def _samples(texts: list[str], seeds=(42, 43), size=(48, 40), role="t2icompbench-color") -> list[Sample]:
    rng = np.random.default_rng(0)
    return [Sample(f"k{i}-{s}", Prompt(str(i), t), s, rng.integers(0, 256, (*size, 3), dtype=np.uint8), [],
                   role=role) for i, t in enumerate(texts) for s in seeds]


def _check_impl(v, metric_id: str, n: int):
    """METHODS/issue 4 point 6: metric id, direction, implementation, weights, preset and n on every value."""
    impl = v.impl
    assert impl["metric"] == metric_id and impl["direction"] == "higher_is_better"
    assert impl["implementation"].startswith("memobench t2icompbench") and impl["preset"] == "t2icompbench"
    assert impl["n"] == n == v.n and isinstance(impl["weights"], dict)
    assert len(impl["prompt_file"]["sha256"]) == 64


@pytest.mark.parametrize("category", list(t2i.METRICS))
def test_unavailable_offline_without_weights(category, tmp_path, monkeypatch):
    """Hub ids that are not in the (empty) Hugging Face cache, offline: unavailable with a reason, never a number."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("MEMOBENCH_DATA_DIR", str(SHARED))
    monkeypatch.setattr(t2i, "load_nlp", lambda spec: (lambda text: tok("a/DET dog/NOUN"), {"model": "fake"}))
    cls = t2i.METRICS[category]
    extra = {"clip_cache_dir": str(tmp_path / "clip")} if "clip_cache_dir" in cls.Params.__dataclass_fields__ else {}
    m = cls(cls.make_params(extra))
    out = m.compute(_samples(["a dog"], role=cls.roles[0]), _ctx(tmp_path))
    v = out[cls.name]
    assert v.value is None and v.unavailable and v.n == 0
    assert "offline" in v.unavailable or "cannot" in v.unavailable or "could not" in v.unavailable
    _check_impl(v, cls.name, 0)
    assert cls.name in m.compute([], _ctx(tmp_path)) and m.compute([], _ctx(tmp_path))[cls.name].unavailable


def test_missing_spacy_model_is_unavailable(tmp_path):
    m = t2i.METRICS["spatial"](t2i.METRICS["spatial"].make_params({"nlp": "no_such_spacy_model_xyz"}))
    v = m.compute(_samples(["a dog near a cat"], role="t2icompbench-spatial"), _ctx(tmp_path))["t2icompbench_spatial"]
    assert v.value is None and "spaCy" in v.unavailable


def test_spacy_adapter_on_a_hand_annotated_doc(tmp_path):
    """The spaCy route (runs where spaCy is installed; it is not a memobench dependency): a Doc annotated by hand
    gives the noun chunks, POS tags and whitespace the scorers read; a pipeline without parser/tagger (a blank
    ``en``) is refused as unavailable rather than failing at the first noun chunk."""
    spacy = pytest.importorskip("spacy")
    from spacy.tokens import Doc

    from memobench_plugins.t2icompbench.backends import Unavailable, load_nlp, parse_doc

    nlp = spacy.blank("en")
    words = ["a", "red", "book", "on", "the", "left", "of", "a", "vase"]
    doc = Doc(nlp.vocab, words=words, spaces=[True] * 8 + [False],
              pos=["DET", "ADJ", "NOUN", "ADP", "DET", "NOUN", "ADP", "DET", "NOUN"],
              heads=[2, 2, 2, 2, 5, 3, 5, 8, 6], deps=["det", "amod", "ROOT", "prep", "det", "pobj", "prep", "det",
                                                      "pobj"])
    p = parse_doc(doc)
    assert p.noun_chunks == ("a red book", "the left", "a vase")
    assert S.blip_questions(p, 3) == ["a red book?", "a vase?", ""]  # 'the left' dropped
    assert S.first_last_nouns(p) == ("book", "vase") and p.span_text(3, 6) == "on the left"
    assert [t.text for t in nlp("two boys, one turtle")] == ["two", "boys", ",", "one", "turtle"]
    nlp.to_disk(tmp_path / "blank_en")
    with pytest.raises(Unavailable, match="no parser"):
        load_nlp(str(tmp_path / "blank_en"))


# ================================================================================== tiny random models
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "yes", "no", "a", "an", "the", "red", "blue", "green",
              "book", "vase", "bench", "bowl", "dog", "cat", "and", "?", "on", "left", "of", "near", "hat", "rack"]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    """A tiny random BLIP VQA model + processor folder: BERT tokenizer from a vocab file written here, with [DEC]
    (bos) and [ENC] added as the reference's ``init_tokenizer`` does."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    root = tmp_path_factory.mktemp("tiny-blip")
    (root / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    tk = BertTokenizer(vocab=str(root / "vocab.txt"))
    tk.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    assert tk.convert_tokens_to_ids("yes") == 5 and tk.convert_tokens_to_ids("[ENC]") == len(BERT_WORDS) + 1
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(tk), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=64, bos_token_id=tk.bos_token_id,
                         pad_token_id=0, sep_token_id=3),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                           image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    model = BlipForQuestionAnswering(cfg).eval()
    folder = root / "blip"
    model.save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tk) \
        .save_pretrained(folder)
    return folder


def _blip_params(folder, **kw):
    return t2i.METRICS["color"].make_params({"blip_weights": str(folder), "blip_image_size": 40, "batch_size": 3,
                                             **kw})


COLOR_PARSES = {"a red book and a blue vase": tok("a/DET red/ADJ book/NOUN and/CCONJ a/DET blue/ADJ vase/NOUN"),
                "a green bench": tok("a/DET green/ADJ bench/NOUN"),
                "the cat": tok("the/DET cat/NOUN")}
COLOR_CHUNKS = {"a red book and a blue vase": ("a red book", "a blue vase"), "a green bench": ("a green bench",),
                "the cat": ()}


def _fake_nlp(monkeypatch, parses: dict, chunks: dict | None = None):
    def load(spec):
        def parse(text):
            p = parses[text]
            return S.Parse(p.tokens, (chunks or {}).get(text, ()))
        return parse, {"library": "fake", "model": spec}
    monkeypatch.setattr(t2i, "load_nlp", load)


def test_blip_vqa_end_to_end_on_tiny_model(tiny_blip, tmp_path, monkeypatch):
    import torch
    from transformers import BlipForQuestionAnswering, BlipProcessor

    _fake_nlp(monkeypatch, COLOR_PARSES, COLOR_CHUNKS)
    texts = list(COLOR_PARSES)
    samples = _samples(texts)
    m = t2i.METRICS["color"](_blip_params(tiny_blip))
    v = m.compute(list(reversed(samples)), _ctx(tmp_path))["t2icompbench_color"]
    assert v.unavailable is None, v.unavailable
    _check_impl(v, "t2icompbench_color", len(samples))
    rec = v.impl["weights"]["blip_vqa"]
    from memobench.data import file_sha256
    assert rec["weights_sha256"] == {"model.safetensors": file_sha256(tiny_blip / "model.safetensors")}
    assert rec["interpolate_pos_encoding"] is True and rec["image_size"] == 40 and rec["checkpoint_image_size"] == 32
    assert rec["question_first_token"] == "tokenizer [ENC]" and rec["yes_id"] == 5 and rec["no_id"] == 6
    assert v.extra["questions"]["0"] == ["a red book?", "a blue vase?"] and v.extra["questions"]["2"] == []

    # hand computation of P(yes) with the loaded modules, one image and one question at a time
    model = BlipForQuestionAnswering.from_pretrained(tiny_blip).eval()
    tk = BlipProcessor.from_pretrained(tiny_blip).tokenizer
    mean, std = np.array(t2i.backends.BLIP_MEAN, np.float32), np.array(t2i.backends.BLIP_STD, np.float32)
    from PIL import Image

    def p_yes(image, question):
        arr = np.asarray(Image.fromarray(image).resize((40, 40), Image.BICUBIC), np.float32) / 255.0
        px = torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1).copy())[None]
        with torch.no_grad():
            emb = model.vision_model(pixel_values=px, interpolate_pos_encoding=True).last_hidden_state
            ids = tk([question], return_tensors="pt").input_ids
            ids[0, 0] = tk.convert_tokens_to_ids("[ENC]")
            h = model.text_encoder(input_ids=ids, encoder_hidden_states=emb).last_hidden_state
            lg = model.text_decoder(input_ids=torch.tensor([[tk.bos_token_id]]), encoder_hidden_states=h).logits
            pr = torch.softmax(lg[0, 0].double(), 0)
        return float(pr[5] / (pr[5] + pr[6]))

    for s in samples:
        qs = [q for q in S.blip_questions(S.Parse((), COLOR_CHUNKS[s.prompt.text]), 8) if q]
        hand = [p_yes(s.image, q) for q in qs]
        expect = S.blip_image_score(hand + [None] * (8 - len(hand)))
        assert v.per_sample[s.sample_key] == pytest.approx(expect, abs=1.5e-4)  # 4-decimal rounding
        assert len(f"{v.per_sample[s.sample_key]:.10f}".rstrip("0").split(".")[1]) <= 4
        if not qs:
            assert v.per_sample[s.sample_key] == 1.0
    assert v.value == pytest.approx(np.mean(list(v.per_sample.values())))

    # corrected variant: own id, unrounded product; [CLS] instead of [ENC] changes the answers
    vc = t2i.METRICS["color"](_blip_params(tiny_blip, compat=False)).compute(samples, _ctx(tmp_path))
    assert set(vc) == {"t2icompbench_color_corrected"}
    for s in samples:
        assert vc["t2icompbench_color_corrected"].per_sample[s.sample_key] == \
            pytest.approx(v.per_sample[s.sample_key], abs=2e-4)
    cls_tok = t2i.METRICS["color"](_blip_params(tiny_blip, compat=False, question_token="cls"))
    vk = cls_tok.compute(samples, _ctx(tmp_path))["t2icompbench_color_corrected"]
    assert vk.impl["weights"]["blip_vqa"]["question_first_token"] == "[CLS] kept"
    assert any(abs(vk.per_sample[k] - vc["t2icompbench_color_corrected"].per_sample[k]) > 1e-7
               for k in vk.per_sample if vk.per_sample[k] != 1.0)


def _clip_bpe_tokenizer_files(root: Path) -> None:
    """CLIP's BPE vocabulary (vocab.json + merges.txt) rebuilt from the merges file that open_clip ships
    (``bpe_simple_vocab_16e6.txt.gz``): 256 byte tokens, their ``</w>`` forms, 48,894 merges, 2 special tokens."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    base = list(bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (root / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


@pytest.fixture(scope="module")
def tiny_owl(tmp_path_factory) -> Path:
    import torch
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, \
        Owlv2Processor

    root = tmp_path_factory.mktemp("tiny-owl")
    _clip_bpe_tokenizer_files(root)
    tk = CLIPTokenizer(vocab=str(root / "vocab.json"), merges=str(root / "merges.txt"))
    from open_clip.tokenizer import SimpleTokenizer

    ids = tk("a photo of a Giraffe").input_ids  # the same ids as open_clip's own CLIP tokenizer
    assert len(tk) == 49408 and ids == [49406, *SimpleTokenizer().encode("a photo of a giraffe"), 49407]
    cfg = Owlv2Config(text_config=dict(vocab_size=len(tk), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=64),
                      vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=64, patch_size=16), projection_dim=32)
    torch.manual_seed(0)
    folder = root / "owl"
    Owlv2ForObjectDetection(cfg).eval().save_pretrained(folder)
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tk) \
        .save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dpt(tmp_path_factory) -> Path:
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation

    torch.manual_seed(0)
    cfg = DPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=32,
                    patch_size=8, backbone_out_indices=[0, 1], neck_hidden_sizes=[16, 32], fusion_hidden_size=16,
                    reassemble_factors=[4, 2], head_in_index=-1)
    folder = tmp_path_factory.mktemp("tiny-dpt") / "dpt"
    DPTForDepthEstimation(cfg).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random open_clip CLIP in open_clip's ``local-dir`` layout (as tests/test_clip_score.py)."""
    import open_clip
    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    folder = tmp_path_factory.mktemp("tiny-clip") / "local"
    folder.mkdir()
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in CLIP(**cfg).state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": cfg, "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                                             "std": list(open_clip.OPENAI_DATASET_STD),
                                             "interpolation": "bicubic", "resize_mode": "shortest"}}))
    return folder


def _det_params(cls, owl, **kw):
    return cls.make_params({"detector_weights": str(owl), "detector_threshold": 0.0, **kw})


def test_detector_end_to_end_on_tiny_owlv2(tiny_owl):
    from memobench_plugins.t2icompbench.backends import ZeroShotDetector

    det = ZeroShotDetector(str(tiny_owl), offline=True, threshold=0.0)
    img = np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    out = det.detect(img, ["dog", "cat", "dog"])
    assert out and {d.label for d in out} <= {"dog", "cat"}
    assert [d.score for d in out] == sorted((d.score for d in out), reverse=True)  # detectron2 output order
    for d in out:
        assert 0 <= d.box[0] <= d.box[2] <= 40 and 0 <= d.box[1] <= d.box[3] <= 48  # clipped to the image
    for i, a in enumerate(out):  # per-label NMS at 0.5
        assert all(S.box_iou(a.box, b.box) <= 0.5 for b in out[i + 1:] if b.label == a.label)
    assert det.record["model_type"] == "owlv2" and "model.safetensors" in det.record["weights_sha256"]
    assert det.detect(img, []) == []


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/t2i_compbench not present")
def test_spatial_numeracy_3d_end_to_end(tiny_owl, tiny_dpt, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOBENCH_DATA_DIR", str(SHARED))
    parses = {"a dog on the left of a cat": tok("a/DET dog/NOUN on/ADP the/DET left/NOUN of/ADP a/DET cat/NOUN"),
              "a girl near a dog": tok("a/DET girl/NOUN near/ADP a/DET dog/NOUN"),
              "two dogs and one cat": tok("two/NUM dogs/NOUN and/CCONJ one/NUM cat/NOUN"),
              "a dog in front of a cat": tok("a/DET dog/NOUN in/ADP front/NOUN of/ADP a/DET cat/NOUN")}
    _fake_nlp(monkeypatch, parses)
    from memobench_plugins.t2icompbench.backends import ZeroShotDetector

    det = ZeroShotDetector(str(tiny_owl), offline=True, threshold=0.0)
    ctx = _ctx(tmp_path)

    # 2D: per-image score = the rule applied to the detector's boxes in the 479-px frame
    cls = t2i.METRICS["spatial"]
    samples = _samples(["a dog on the left of a cat", "a girl near a dog"], role=cls.roles[0])
    v = cls(_det_params(cls, tiny_owl, floor=0.0)).compute(samples, ctx)["t2icompbench_spatial"]
    assert v.unavailable is None, v.unavailable
    _check_impl(v, "t2icompbench_spatial", 4)
    assert v.extra["parsed"]["1"] == {"obj1": "person", "obj2": "dog", "locality": "near"}
    for s in samples:
        o1, o2 = v.extra["parsed"][s.prompt.id]["obj1"], v.extra["parsed"][s.prompt.id]["obj2"]
        fh, fw = S.reference_frame(48, 40)
        dets = [D(d.label, d.score, (d.box[0] * fw / 40, d.box[1] * fh / 48, d.box[2] * fw / 40, d.box[3] * fh / 48))
                for d in det.detect(s.image, [o1, o2])]
        want = S.spatial_2d_score(dets, o1, o2, S.locality_2d(s.prompt.text), floor=0.0)
        assert v.per_sample[s.sample_key] == pytest.approx(want)
        assert want > 0  # with threshold 0 both objects are found: the position rule ran on real boxes
    assert v.impl["weights"]["detector"]["threshold"] == 0.0 and "479" in v.impl["detector_frame"]

    # numeracy: new_objects.txt read from the pinned file (sha256-checked)
    cls = t2i.METRICS["numeracy"]
    samples = _samples(["two dogs and one cat"], role=cls.roles[0])
    v = cls(_det_params(cls, tiny_owl)).compute(samples, ctx)["t2icompbench_numeracy"]
    assert v.unavailable is None, v.unavailable
    assert v.extra["parsed"]["0"] == {"objects": ["dog", "cat"], "counts": [2, 1]}
    assert v.impl["objects_file"]["sha256"] == t2i.NEW_OBJECTS_SHA256
    for s in samples:
        fh, fw = S.reference_frame(48, 40)
        dets = [D(d.label, d.score, (d.box[0] * fw / 40, d.box[1] * fh / 48, d.box[2] * fw / 40, d.box[3] * fh / 48))
                for d in det.detect(s.image, ["dog", "cat"])]
        assert v.per_sample[s.sample_key] == pytest.approx(S.numeracy_score(dets, S.Expected(["dog", "cat"], [2, 1])))
        assert v.per_sample[s.sample_key] >= 0.25  # threshold 0: at least one of the queried classes is found

    # 3D: detector + DPT depth in the detector frame
    cls = t2i.METRICS["3d_spatial"]
    samples = _samples(["a dog in front of a cat"], role=cls.roles[0])
    for compat in (True, False):
        out = cls(_det_params(cls, tiny_owl, depth_weights=str(tiny_dpt), depth_size=32, compat=compat)) \
            .compute(samples, ctx)
        v = out["t2icompbench_3d_spatial" + ("" if compat else "_corrected")]
        assert v.unavailable is None, v.unavailable
        assert all(0.0 <= x <= 1.0 for x in v.per_sample.values())
        assert "model.safetensors" in v.impl["weights"]["depth"]["weights_sha256"]
        assert v.extra["parsed"]["0"]["locality"] == "in front of"


def test_non_spatial_clip_end_to_end(tiny_clip, tmp_path):
    import memobench_plugins.clip_score as cs

    cls = t2i.METRICS["non_spatial"]
    samples = _samples(["a dog chasing a ball", "a man reading a book"], role=cls.roles[0])
    v = cls(cls.make_params({"clip_weights_path": str(tiny_clip)})).compute(samples, _ctx(tmp_path))[cls.name]
    assert v.unavailable is None, v.unavailable
    _check_impl(v, cls.name, 4)
    ref = cs.ClipScore(cs.ClipScore.Params(weights_path=str(tiny_clip))).compute(
        [Sample(s.sample_key, s.prompt, s.seed, s.image, [], role="utility") for s in samples], _ctx(tmp_path))
    for k, c in v.per_sample.items():  # per image: the clip_score plugin's raw cosine
        assert c == pytest.approx(ref["clip_score"].per_sample[k], abs=1e-6)
    assert v.value == pytest.approx(np.mean(list(ref["clip_score"].per_sample.values())), abs=1e-6)
    assert "open_clip_model.safetensors" in v.impl["weights"]["clip"]["weights_sha256"]


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/t2i_compbench not present")
def test_complex_3in1_end_to_end(tiny_blip, tiny_owl, tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOBENCH_DATA_DIR", str(SHARED))
    lines = (SHARED / "complex_val.txt").read_text().splitlines()
    spatial_p = "The red hat was on top of the brown coat rack."
    assert spatial_p in lines
    action_p = next(p for p in lines if S.complex_kind(
        p, (SHARED / "complex_val_spatial.txt").read_text().splitlines(),
        (SHARED / "complex_val_action.txt").read_text().splitlines()) == "action")
    parses = {spatial_p: tok("The/DET red/ADJ hat/NOUN was/AUX on/ADP top/NOUN of/ADP the/DET brown/ADJ coat/NOUN "
                             "rack/NOUN ./PUNCT"),
              action_p: tok(" ".join(f"{w}/NOUN" for w in action_p.split()))}
    chunks = {spatial_p: ("The red hat", "the brown coat rack"), action_p: ()}
    _fake_nlp(monkeypatch, parses, chunks)
    cls = t2i.METRICS["complex"]
    samples = _samples([spatial_p, action_p], role=cls.roles[0])
    params = cls.make_params({"blip_weights": str(tiny_blip), "blip_image_size": 32, "detector_weights": str(tiny_owl),
                              "detector_threshold": 0.0, "clip_weights_path": str(tiny_clip)})
    v = cls(params).compute(samples, _ctx(tmp_path))[cls.name]
    assert v.unavailable is None, v.unavailable
    _check_impl(v, cls.name, 4)
    assert v.extra["kinds"] == {"spatial": 1, "action": 1, "spatialaction": 0}
    assert set(v.impl["weights"]) == {"nlp", "blip_vqa", "clip", "detector"}
    for s in samples:
        sub = v.extra["sub_scores"][s.sample_key]
        assert v.per_sample[s.sample_key] == pytest.approx(
            S.combine_3in1(sub["kind"], sub["attribute"], sub["spatial"], sub["action"]))
        if s.prompt.text == spatial_p:  # 'on top of' → pos 0 in compat: 0.25·(c1 + c2) ≤ 0.5, below 0.5 floored
            assert sub["kind"] == "spatial" and sub["spatial"] in (0.0, 0.5)
    assert v.value == pytest.approx(np.mean(list(v.per_sample.values())))


# ================================================================================== through the runner
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/t2i_compbench not present")
def test_result_file_records_impl_through_the_runner(tiny_pipe, tiny_clip, tmp_path, monkeypatch):
    """A model that names the ``t2icompbench-non_spatial`` role: the result JSON's metric record carries the metric
    id, direction, implementation, weights, preset and n (issue 4, acceptance 6)."""
    from types import SimpleNamespace

    from memobench.config import RunConfig
    from memobench.hookspecs import hookimpl
    from memobench.registry import register_object, unregister_object
    from memobench.runner import Runner
    from memobench_plugins.tiny import TinyModel

    monkeypatch.setenv("MEMOBENCH_DATA_DIR", str(SHARED))

    class T2IModel(TinyModel):
        name = "tiny-t2i-test"
        prompt_sets = {**TinyModel.prompt_sets, "t2icompbench-non_spatial": "t2icompbench-non_spatial"}
        default_utility_seeds = (42, 43)

    plugin = SimpleNamespace(register_models=hookimpl(lambda register: register(T2IModel)))
    register_object(plugin, "t2i-test-model")
    try:
        cfg = RunConfig(model="tiny-t2i-test", model_params={"path": str(tiny_pipe)}, limit=1, seeds=[0],
                        metrics=["t2icompbench_non_spatial"], utility_limit=2, num_inference_steps=2,
                        metric_params={"t2icompbench_non_spatial": {"clip_weights_path": str(tiny_clip)}},
                        output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), offline=True)
        outcome = Runner(cfg, progress=False).run()
    finally:
        unregister_object("t2i-test-model")
    rec = json.loads(Path(outcome.result_path).read_text())["metrics"]["t2icompbench_non_spatial"]
    assert rec.get("unavailable") is None and rec["n"] == 4 and rec["higher_is_better"] is True
    impl = rec["impl"]
    assert impl["metric"] == "t2icompbench_non_spatial" and impl["direction"] == "higher_is_better"
    assert impl["preset"] == "t2icompbench" and impl["n"] == 4 and impl["implementation"]
    assert impl["weights"]["clip"]["weights_sha256"]
    assert rec["extra"]["preset"]["conforming"] is False  # 2 prompts × seeds 42–43, not 300 × 42–51
    assert -1.0 <= rec["value"] <= 1.0



def test_blip_weights_sha256_pin_is_a_metric_parameter(tiny_blip, tmp_path, monkeypatch):
    """Issue 25 (1): the backends' weight pins reach the metric's parameters; a wrong pin is refused with one line."""
    from memobench.config import BadInput

    _fake_nlp(monkeypatch, COLOR_PARSES, COLOR_CHUNKS)
    samples = _samples(list(COLOR_PARSES))
    m = t2i.METRICS["color"](_blip_params(tiny_blip, blip_weights_sha256="0" * 64))
    with pytest.raises(BadInput) as e:
        m.compute(samples, _ctx(tmp_path))
    assert "\n" not in str(e.value) and "0" * 16 in str(e.value)
    for name in ("blip_weights_sha256", "detector_weights_sha256", "depth_weights_sha256"):
        assert any(name in f.name for cls in t2i.METRICS.values() for f in __import__("dataclasses").fields(cls.Params))
