"""The leaderboard's attacker-budget view: a result with a ``budget_sweep`` gives a "work to re-extract" cell, an
MR-vs-work plot per (model, attack) with one line per mitigation, a Markdown section and long CSV rows; plugin-
supplied text (mitigation names) is escaped in the page and the SVG."""

from __future__ import annotations

import csv
import io

from memobench import leaderboard as lb
from test_leaderboard import rec, write_result


def _sweep(mrs, unit="UNet forward+backward passes (steps × batch)"):
    pts = [{"value": v, "budget": 8.0 * v, "config_hash": "x" * 64, "attack_params": {"steps": v},
            "metrics": {"mr": m}, "metrics_without_attack": {"mr": 0.0}} for v, m in mrs]
    reached = next(({"value": p["value"], "budget": p["budget"]} for p in pts if p["metrics"]["mr"] > 0.5), None)
    return {"param": "steps", "unit": unit, "values": [v for v, _ in mrs], "headline_metric": "mr", "threshold": 0.5,
            "points": pts, "work_to_reextract": reached}


def test_budget_column_plot_md_and_csv(tmp_path):
    root = tmp_path / "results"
    mwa = {"mr": rec("mr", 0.0), "sscd_orig": rec("sscd_orig", 0.2)}
    write_result(root, mitigation="none", attack="dori", mwa=mwa, extra={"budget_sweep": _sweep(
        [(0, 0.0), (5, 0.25), (10, 0.625), (50, 1.0)])})
    write_result(root, mitigation="<b>evil</b>", attack="dori", mwa=mwa, extra={"budget_sweep": _sweep(
        [(0, 0.0), (50, 0.375)])})
    site = lb.render(root)
    html = site.files["index.html"].decode()
    assert "work to re-extract" in html
    assert 'data-v="80.0"' in html and ">80<" in html  # none: MR first > 0.5 at 10 steps × 8
    assert 'data-v="inf"' in html and "not reached by 400" in html
    assert "<b>evil</b>" not in html and "&lt;b&gt;evil&lt;/b&gt;" in html
    svgs = [k for k in site.files if k.startswith("plots/budget-")]
    assert len(svgs) == 1
    svg = site.files[svgs[0]].decode()
    assert "<b>evil" not in svg and "&lt;b&gt;evil" in svg
    md = site.files["LEADERBOARD.md"].decode()
    assert "## Attacker budget" in md and "steps=10: 0.625" in md
    rows = list(csv.DictReader(io.StringIO(site.files["leaderboard.csv"].decode())))
    work = {r["mitigation"]: r["value"] for r in rows if r["metric"] == "work_to_reextract"}
    assert work["none"] == "80.0" and work["<b>evil</b>"] == ""
    pts = [(r["group"], r["value"]) for r in rows if r["metric"] == "budget:mr" and r["mitigation"] == "none"]
    assert pts == [("steps=0", "0.0"), ("steps=5", "0.25"), ("steps=10", "0.625"), ("steps=50", "1.0")]


def test_no_sweep_no_budget_view(tmp_path):
    root = tmp_path / "results"
    write_result(root, mitigation="none", attack="dori", mwa={"mr": rec("mr", 0.0)})
    site = lb.render(root)
    assert "work to re-extract" not in site.files["index.html"].decode()
    assert not [k for k in site.files if k.startswith("plots/budget-")]
