"""``memobench explain`` and its Python API (issue 10) on a tiny random Stable Diffusion pipeline loaded through the
``tiny`` model plugin: tokens and significance shares, the verdict against a calibration made by ``detect``, SSCD to
the training image of a known prompt, the remove/replace counterfactuals (recomputed, never assumed), the PNG, the
batch CSV, and bad input.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from memobench_plugins.detect.bench import make_detector, open_session, run_detect  # noqa: E402
from memobench_plugins.detect.explain import (VERDICT_MEM, VERDICT_NONE, VERDICT_NOT, Explainer,  # noqa: E402
                                              explain, render_png)

SMALL = {"num_inference_steps": "4", "height": "16", "width": "16"}  # the random pipeline's native 16 px
SEEDS = [0, 1]
VM_TEXT = "official portrait of astronaut eileen collins"  # a tiny-vm prompt: its reference is a real photo


@pytest.fixture(scope="module")
def session(tiny_pipe, tmp_path_factory):
    torch.set_num_threads(1)
    return open_session("tiny", {"path": str(tiny_pipe)}, tmp_path_factory.mktemp("explain-cache"))


@pytest.fixture(scope="module")
def explainer(session):
    return Explainer(seeds=SEEDS, detector_params=SMALL, session=session)


@pytest.fixture(scope="module")
def vm_expl(explainer):
    return explainer.explain(VM_TEXT)


def test_tokens_shares_and_statistic(vm_expl, explainer, session):
    e = vm_expl
    tok = session.model.tokenizer
    words = tok(VM_TEXT, add_special_tokens=False).input_ids
    assert [t.token_id for t in e.tokens] == words  # BOS / EOS / padding excluded
    assert [t.position for t in e.tokens] == list(range(1, len(words) + 1))
    assert sum(t.share for t in e.tokens) == pytest.approx(1.0)
    assert sorted(t.rank for t in e.tokens) == list(range(1, len(words) + 1))
    top = e.top_tokens(1)[0]
    assert top.significance == max(t.significance for t in e.tokens) and top.rank == 1
    # the explained statistic is the detector's d(p) for the same seeds
    assert e.statistic == pytest.approx(explainer.detector.score(session.model, VM_TEXT)["score"], rel=1e-6)
    assert e.images.shape == (len(SEEDS), 16, 16, 3) and e.images.dtype == np.uint8
    assert e.seeds == SEEDS and e.detector["params"]["seeds"] == SEEDS


def test_known_prompt_gets_its_training_image_and_sscd(vm_expl):
    e = vm_expl
    assert e.prompt.mem_type == "VM" and e.reference_source == "tiny-vm:astronaut"
    assert e.reference is not None and e.reference.ndim == 3
    assert len(e.sscd) == len(SEEDS) and all(-1.0 <= v <= 1.0 for v in e.sscd)
    assert e.sscd_mean == pytest.approx(np.mean(e.sscd))
    assert e.sscd_impl["name"] == "sscd" and e.sscd_impl["preset"] == "dori2026"


def test_counterfactuals_are_computed(vm_expl, explainer, session):
    e = vm_expl
    top = e.top_tokens(1)[0]
    rem, rep = e.ablations
    assert (rem.kind, rep.kind) == ("remove", "replace") and rem.token == rep.token == top.text
    tok = session.model.tokenizer
    own = [t.token_id for t in e.tokens]
    i = own.index(top.token_id)
    assert tok(rem.text, add_special_tokens=False).input_ids == own[:i] + own[i + 1:]
    assert "thing" in rep.text.split()
    for a in (rem, rep):
        # recomputed from scratch on the edited text: the same number the tool reports
        assert a.statistic == pytest.approx(explainer.detector.score(session.model, a.text)["score"], rel=1e-5)
        assert a.lowers_statistic == (a.statistic < e.statistic)
        assert a.lowers_sscd == (a.sscd_mean < e.sscd_mean)
        assert a.images.shape == e.images.shape
    assert len(e.statements) == 2
    for a, s in zip(e.ablations, e.statements):
        assert ("lowers the statistic" in s) == a.lowers_statistic
        assert ("does not lower the statistic" in s) == (not a.lowers_statistic)
        assert "SSCD to the training image" in s


def test_uncalibrated_then_calibrated_verdict(session, explainer, vm_expl, tmp_path):
    assert vm_expl.verdict == VERDICT_NONE and "memobench detect" in vm_expl.note and vm_expl.threshold is None
    mem, non = tmp_path / "mem.txt", tmp_path / "non.txt"
    mem.write_text(f"{VM_TEXT}\na red square on a blue background\n")
    non.write_text("a photo of a cat\na green circle\n")
    det = make_detector("wen", {**SMALL, "seeds": "0,1"}, session.generation)
    assert det.identity() == explainer.detector.identity()
    res = run_detect(session, [det], str(mem), str(non), tmp_path / "out")
    e = Explainer(seeds=SEEDS, detector_params=SMALL, session=session).explain(VM_TEXT, ablate=False)
    thr = res["detectors"]["wen"]["metrics"]["thresholds"]["acc"]["threshold"]
    assert e.threshold == thr and e.calibration["auc"] == res["detectors"]["wen"]["metrics"]["auc"]
    assert e.verdict == (VERDICT_MEM if e.statistic >= thr else VERDICT_NOT)
    assert "calibrated by `memobench detect`" in e.note and "TPR" in e.note
    assert e.ablations == [] and e.statements == []
    # other seeds: no calibration for them, and the tool says which settings have one
    e3 = Explainer(seeds=[0, 1, 2], detector_params=SMALL, session=session).explain(VM_TEXT, ablate=False)
    assert e3.verdict == VERDICT_NONE and "seeds=0,1" in e3.note


def test_png_shows_tokens_shaded_by_significance(vm_expl):
    img = render_png(vm_expl)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[1] >= 1100
    # the top token's box carries the fully saturated shade (share / max = 1)
    assert ((img[..., 0] == 255) & (img[..., 1] == 55) & (img[..., 2] == 40)).sum() > 100
    # the first generated image is in it, after the training image, upscaled ×10 with nearest neighbour
    cell = np.kron(vm_expl.images[0], np.ones((10, 10, 1), dtype=np.uint8))
    x0 = 8 + 160 + 8
    assert any(np.array_equal(img[y:y + 160, x0:x0 + 160], cell) for y in range(img.shape[0] - 160))


def test_python_api_function(tiny_pipe, tmp_path):
    ref = np.full((32, 32, 3), 128, dtype=np.uint8)
    e = explain("a green circle above a red square", model_params={"path": str(tiny_pipe)}, seeds=[3],
                detector_params={**SMALL, "score_steps": "2"}, cache_dir=tmp_path, reference=ref, ablate=False)
    assert e.seeds == [3] and len(e.per_step) == 2 and e.reference_source == "given" and len(e.sscd) == 1
    d = e.to_dict()
    json.dumps(d)  # JSON-able
    assert d["tokens"][0]["text"] == "a" and d["prompt"]["text"] == "a green circle above a red square"


# ---------------------------------------------------------------------------------------------- CLI
def _args(tiny_pipe, tmp_path, *extra):
    small = [x for k, v in SMALL.items() for x in ("--detector-param", f"{k}={v}")]
    return ["explain", *extra, "--model", "tiny", "--model-param", f"path={tiny_pipe}", "--seeds", "0-1",
            *small, "--cache-dir", str(tmp_path / "cache"), "-o", str(tmp_path / "out")]


def test_cli_single_prompt(tiny_pipe, tmp_path, cli_inproc):
    rc, out, err = cli_inproc(_args(tiny_pipe, tmp_path, VM_TEXT))
    assert rc == 0, err
    assert "astronaut" in out and "rank" in out and "uncalibrated" in out
    assert "SSCD to the training image (tiny-vm:astronaut)" in out
    assert "Removing the top-ranked token" in out and "Replacing the top-ranked token" in out
    pngs = list((tmp_path / "out" / "tiny" / "explain").glob("*.png"))
    js = list((tmp_path / "out" / "tiny" / "explain").glob("*.json"))
    assert len(pngs) == 1 and len(js) == 1
    from memobench.cache import read_png

    assert read_png(pngs[0]).shape[1] >= 1100
    d = json.loads(js[0].read_text())
    assert d["prompt"]["mem_type"] == "VM" and d["paths"]["png"] == str(pngs[0]) and len(d["ablations"]) == 2


def test_cli_batch_csv(tiny_pipe, tmp_path, cli_inproc):
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "r.png")
    f = tmp_path / "batch.csv"
    f.write_text("id,prompt,mem_type,reference\nm0,a red square on a blue background,VM,r.png\n"
                 "n0,a photo of a cat,NONMEM,\n")
    rc, out, err = cli_inproc(_args(tiny_pipe, tmp_path, "--file", str(f), "--no-progress", "--top-k", "2"))
    assert rc == 0, err
    csv_path = tmp_path / "out" / "tiny" / "explain" / "batch.csv"
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["prompt_id"] for r in rows] == ["m0", "n0"]
    assert rows[0]["sscd"] != "" and rows[1]["sscd"] == ""  # only the row with a training image
    assert rows[0]["top_tokens"].count(";") == 1 and rows[0]["verdict"] == VERDICT_NONE
    assert rows[0]["removal_lowers_statistic"] == str(float(rows[0]["statistic_removed"]) < float(rows[0]["statistic"]))
    summary = json.loads(csv_path.with_suffix(".summary.json").read_text())
    assert summary["group"] == "VM" and summary["n"] == 1 and len(summary["prompts"]) == 2
    assert "remove lowers statistic [VM]" in out
    assert not list(csv_path.parent.glob("*.png"))  # batch mode: no PNG unless --png


def test_statements_say_when_an_edit_still_leaves_a_copy():
    """The sentences name the verdict threshold and the SSCD preset's copy threshold when an edit lowers a number
    but not below them (hand-built explanation; dori2026's τ is 0.7)."""
    from memobench.api import Prompt
    from memobench_plugins.detect.explain import Ablation, Explanation, statements

    def abl(kind, stat, sscd):
        return Ablation(kind=kind, token="a", position=1, replacement="thing" if kind == "replace" else None,
                        text="x", statistic=stat, sscd=[sscd], sscd_mean=sscd, lowers_statistic=stat < 5.0,
                        lowers_sscd=sscd < 0.9)

    e = Explanation(prompt=Prompt(id="p", text="a b"), model="tiny", seeds=[0], detector={}, statistic=5.0,
                    per_step=[], per_image=[], tokens=[], threshold_rule="acc", calibration=None, threshold=4.0,
                    verdict=VERDICT_MEM, note="", sscd=[0.9], sscd_mean=0.9, sscd_impl={"preset": "dori2026"},
                    reference_source=None, ablations=[abl("remove", 4.5, 0.8), abl("replace", 3.0, 0.1)],
                    statements=[])
    first, second = statements(e)
    assert "(5 → 4.5, still above the verdict threshold)" in first
    assert "(0.900 → 0.800, still above the copy threshold 0.7)" in first
    assert "still above" not in second and "lowers the statistic (5 → 3)" in second
    e.ablations = [abl("remove", 5.5, 0.95)]
    (only,) = statements(e)
    assert "does not lower the statistic (5 → 5.5)" in only and "still above" not in only


def test_single_explanations_under_other_detector_settings_get_their_own_files(tmp_path):
    from memobench.api import Prompt
    from memobench_plugins.detect.cli import _write_single
    from memobench_plugins.detect.explain import Explanation

    def expl(params):
        return Explanation(prompt=Prompt(id="p", text="a b"), model="tiny", seeds=[0, 1], detector={
            "name": "detect-wen", "version": "1", "params": params}, statistic=1.0, per_step=[], per_image=[],
            tokens=[], threshold_rule="acc", calibration=None, threshold=None, verdict=VERDICT_NONE, note="",
            sscd=None, sscd_mean=None, sscd_impl=None, reference_source=None, ablations=[], statements=[])

    a = _write_single(expl({"attribution": "prompt_embeds"}), tmp_path, None)
    b = _write_single(expl({"attribution": "token_embeds"}), tmp_path, None)
    assert a["json"] != b["json"] and len(list(tmp_path.glob("*.json"))) == 2
    assert json.loads(Path(b["json"]).read_text())["detector"]["params"]["attribution"] == "token_embeds"
    assert _write_single(expl({"attribution": "token_embeds"}), tmp_path, None) == b  # same settings, same file
