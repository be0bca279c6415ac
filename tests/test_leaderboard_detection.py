"""The detection track page of the leaderboard (issue 29): ``detection.html`` and ``DETECTION.md`` from synthetic
``memobench detect`` results — the latest result per model, its detectors with AUC, TPR@1%FPR, TPR@3%FPR and seconds
per prompt, escaped plugin-supplied text, the link from ``index.html``, redacted ``runs/`` copies, and detect results
kept out of the pairing table."""

from __future__ import annotations

import json
from pathlib import Path

from test_leaderboard import write_result

from memobench import leaderboard as lb
from memobench.leaderboard.detection import tpr_at_3fpr

EVIL = '<img src=x onerror="alert(1)">'


def _det(auc, acc, tpr1, tpr3, sec, statistic="d(p)", n=(8, 40), roc=None, key="seconds_per_prompt"):
    m = {"auc": auc, "acc": acc, "tpr_at_fpr": tpr1, "fpr_max": 0.01, "n_pos": n[0], "n_neg": n[1],
         "roc": roc or {"fpr": [0.0, 1.0], "tpr": [0.0, 1.0], "thresholds": [None, 0.0]}}
    if tpr3 is not None:
        m["tpr_at_3fpr"] = tpr3
    return {"identity": {"name": "detect-x", "version": "1", "params": {"seeds": [0, 1]}}, "statistic": statistic,
            "metrics": m, "fixed_thresholds": {}, "groups": {}, key: sec}


def write_detect(root: Path, model: str, run_id: str, created: str, detectors: dict, tmp: Path) -> Path:
    d = root / model / "detect"
    d.mkdir(parents=True, exist_ok=True)
    data = {"schema_version": 1, "kind": "detection", "run_id": run_id, "status": "complete",
            "model": {"id": "tiny", "plugin": {"name": model, "version": "1", "params": {}}},
            "memorized": {"name": "tiny-vm", "n": 8}, "nonmemorized": {"name": "tiny-nonmem", "n": 40},
            "detectors": detectors, "prompts": [], "created_at": created, "memobench_version": "0.1.0",
            "paths": {"result": str(tmp / "elsewhere" / "results" / f"{run_id}.json")}}
    p = d / f"{run_id}.json"
    p.write_text(json.dumps(data, indent=1))
    return p


def test_detection_page_lists_latest_result_escaped(tmp_path):
    r = tmp_path / "results"
    write_result(r)  # one pairing result: the site needs one
    write_detect(r, "tiny", "old0000000000000", "2026-01-01T00:00:00+00:00",
                 {"wen": _det(0.111, 0.5, 0.0, 0.0, 9.99)}, tmp_path)
    latest = write_detect(r, "tiny", "new0000000000000", "2026-02-01T00:00:00+00:00", {
        "wen": _det(0.9375, 0.875, 0.625, 0.75, 5.714, statistic="d(p) <mean>"),
        EVIL: _det(0.5, 0.55, 0.125, 0.25, 0.0712, statistic=EVIL),
    }, tmp_path)
    site = lb.render(r)
    files = site.files
    page = files["detection.html"].decode()
    assert EVIL not in page and "onerror=\"alert" not in page
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page  # the detector name and its statistic, escaped
    assert "d(p) &lt;mean&gt;" in page
    for v in ("0.938", "0.875", "0.625", "0.750", "5.71", "0.500", "0.125", "0.250", "0.07", "8 / 40"):
        assert f">{v}<" in page, v
    assert "0.111" not in page and "9.99" not in page  # the older result of the same model is not shown
    assert page.index(">wen<") < page.index("&lt;img")  # best AUC first
    assert 'href="runs/tiny/detect/new0000000000000.json"' in page
    # index links the page; the detect results are not pairings
    index = files["index.html"].decode()
    assert 'href="detection.html"' in index
    assert site.n_results == 1 and not any("detect" in k for k in files if k.startswith("pairings/"))
    # the runs/ copy: strict JSON, no local path
    copy = files["runs/tiny/detect/new0000000000000.json"]
    assert str(tmp_path).encode() not in copy
    assert json.loads(copy)["paths"]["result"] == "<local path>/new0000000000000.json"
    assert "runs/tiny/detect/old0000000000000.json" not in files
    md = files["DETECTION.md"].decode()
    assert "| wen | 0.938 | 0.875 | 0.625 | 0.750 | 5.71 | 8 / 40 |" in md
    assert EVIL not in md and '| &lt;img src=x onerror="alert(1)"&gt; | 0.500 |' in md  # escaped as LEADERBOARD.md
    assert latest.exists()


def test_no_detection_results_the_page_says_so(tmp_path):
    r = tmp_path / "results"
    write_result(r)
    files = lb.render(r).files
    assert "No <code>memobench detect</code> result" not in files["detection.html"].decode()  # escaped, not markup
    assert "No `memobench detect` result in this results folder" in files["detection.html"].decode()
    assert "<table>" not in files["detection.html"].decode()
    assert "No `memobench detect` result" in files["DETECTION.md"].decode()
    assert 'href="detection.html"' in files["index.html"].decode()
    assert not any(k.startswith("runs/") and "/detect/" in k for k in files)


def test_older_result_gets_tpr3_from_its_roc_and_seconds_key(tmp_path):
    roc = {"fpr": [0.0, 0.0, 0.02, 0.025, 0.05, 1.0], "tpr": [0.0, 0.25, 0.5, 0.625, 0.875, 1.0]}
    assert tpr_at_3fpr({"roc": roc}) == 0.625  # FPR 2.5 % < 3 %; 5 % is not
    assert tpr_at_3fpr({"roc": roc, "tpr_at_3fpr": 0.1}) == 0.1  # the recorded value wins
    r = tmp_path / "results"
    write_result(r)
    write_detect(r, "tiny", "legacy0000000000", "2025-01-01T00:00:00+00:00",
                 {"nemo": _det(0.8, 0.7, 0.25, None, 2.168, roc=roc, key="seconds_per_prompt_uncached")}, tmp_path)
    page = lb.render(r).files["detection.html"].decode()
    assert ">0.625<" in page and ">2.17<" in page


def test_a_non_detection_file_in_a_detect_folder_is_refused(tmp_path, cli_inproc):
    r = tmp_path / "results"
    write_result(r)
    (r / "tiny" / "detect").mkdir(parents=True)
    (r / "tiny" / "detect" / "x.json").write_text(json.dumps({"schema_version": 1, "kind": "other"}))
    rc, out, err = cli_inproc(["leaderboard", "build", "--results", r, "--out", tmp_path / "lb"])
    assert rc == 2 and "not a `memobench detect` result" in err
