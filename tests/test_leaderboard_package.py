"""The leaderboard package (issue 27 item 5): escaping in every page (templates with autoescape), deterministic
matplotlib SVG, and what plugins declare (identity attack, baseline mitigation, headline / grid score / privacy
metrics) instead of names hard-coded in the core."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_leaderboard import PROMPTS, loss_traces, matrix, rec, write_result

from memobench import leaderboard as lb

QUOTE = 'q"><img src=x onerror=alert(2)>'
SCRIPT = "<script>alert(1)</script>"


def _evil_metric(value: float) -> dict:
    r = rec("tiny_alignment", value, n=30, display=f"{SCRIPT} {QUOTE}", impl={"name": QUOTE, "note": SCRIPT})
    r["metric_plugin"] = {"name": f"plug{SCRIPT}", "version": QUOTE, "params": {"p": QUOTE}}
    return r


def test_every_supplied_string_is_escaped_in_every_page(tmp_path):
    """A plugin name (mitigation, attack, metric plugin), a metric id and display name, a prompt and a prompt id
    carrying ``<script>`` or ``"`` come out as text: no page has a tag or an attribute that a result supplied."""
    r = tmp_path / "results"
    cache = tmp_path / "cache"
    matrix(r, images=cache)
    evil_prompts = [(f"id{QUOTE}", f"{SCRIPT} {QUOTE}"), *PROMPTS[:1]]
    for att in ("none", f"atk{QUOTE}"):
        write_result(r, mitigation=f"mit{QUOTE}{SCRIPT}", attack=att, images=cache, prompts=evil_prompts,
                     dist="evil-dist", attack_dist=f"d{QUOTE}",
                     metrics={"mr": rec("mr", 0.3), "sscd_orig": rec("sscd_orig", 0.2),
                              f"m{SCRIPT}{QUOTE}": _evil_metric(0.4), "tiny_alignment": rec("tiny_alignment", 0.5)},
                     mwa={"mr": rec("mr", 0.1)} if att != "none" else None,
                     traces={f"id{QUOTE}": {"loss_curve": [1.0, 0.5, 0.25]}} if att != "none" else None)
    site = lb.render(r, cache_dir=cache)
    pages = {k: v.decode() for k, v in site.files.items() if k.endswith((".html", ".svg"))}
    assert sum(1 for k in pages if k.startswith("pairings/")) == site.n_rows
    for rel, text in pages.items():
        assert SCRIPT not in text and "alert(1)</script>" not in text, rel
        assert QUOTE not in text and "<img src=x" not in text, rel
        assert text.count("<script") == (1 if rel == "index.html" else 0), rel
        assert "onerror=" not in text or "onerror=alert(2)&gt;" in text, rel
    index = pages["index.html"]
    assert "mit" + "q&#34;&gt;&lt;img src=x onerror=alert(2)&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in index
    page = next(v for k, v in pages.items() if k.startswith("pairings/tiny__mit") and "__atk" in k)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the prompt, the metric's names, the loss legend
    assert "LEADERBOARD.md" in site.files and SCRIPT not in site.files["LEADERBOARD.md"].decode()


def test_plots_are_deterministic_svg_across_processes(tmp_path):
    """Byte-identical plots for the same results, within a process and in a fresh one (matplotlib's ids come from
    a fixed salt; no date, no creator, text kept as text)."""
    r = tmp_path / "results"
    matrix(r)
    a, b = lb.render(r).files, lb.render(r).files
    plots = sorted(k for k in a if k.startswith("plots/"))
    assert any(k.startswith("plots/privacy-utility-") for k in plots) and any("loss-" in k for k in plots)
    assert all(a[k] == b[k] for k in plots)
    code = ("import sys, json, hashlib; from memobench import leaderboard as lb; "
            "f = lb.render(sys.argv[1]).files; "
            "print(json.dumps({k: hashlib.sha256(v).hexdigest() for k, v in f.items() if k.startswith('plots/')}))")
    out = subprocess.run([sys.executable, "-c", code, str(r)], capture_output=True, text=True, check=True).stdout
    import hashlib

    assert json.loads(out.strip().splitlines()[-1]) == {k: hashlib.sha256(a[k]).hexdigest() for k in plots}
    svg = a[plots[0]].decode()
    assert "<dc:date>" not in svg and "Matplotlib v" not in svg and "<text" in svg


def test_loss_plot_marks_each_curve():
    svg, curves = lb.loss_svg(loss_traces(), "t")
    assert [c.prompt_id for c in curves] == sorted(p for p, _ in PROMPTS)
    assert svg.count('class="raw"') == svg.count('class="smooth"') == len(PROMPTS) and svg.count('class="mean"') == 1
    assert svg.startswith("<svg ") and 'width="1000" height="460"' in svg


def test_roles_come_from_what_plugins_declare(tmp_path):
    """Privacy columns, the headline (ranking, plots) and the grid score come from MetricInfo (or the record's own
    fields); the identity attack from ``is_identity`` (an alias resolves); a plugin that is not installed declares
    nothing and its result still builds."""
    r = tmp_path / "results"

    def m(u: float) -> dict:
        return {"mr": rec("mr", 0.5), "sscd_orig": rec("sscd_orig", 0.4), "tiny_alignment": rec("tiny_alignment", u),
                "unknown_metric": rec("unknown_metric", 0.2)}

    write_result(r, mitigation="nemo", attack="prompt", metrics=m(0.1))  # the alias of the identity attack
    write_result(r, mitigation="not_installed", attack="not_installed_attack", metrics=m(0.5),
                 mwa={"mr": rec("mr", 0.1)}, dist="elsewhere", attack_dist="elsewhere")
    new = {"leak": {**rec("leak", 0.7), "category": "privacy", "headline": False, "grid_score": False}}
    write_result(r, mitigation="wanda", attack="none", metrics={**m(0.9), **new})
    results = lb.load_results(r)
    assert [x.attack for x in results] == ["none", "not_installed_attack", "none"]
    targets = lb.target_metric_names(results)
    rows = lb.collect_rows(results, targets)
    assert [(w.mitigation, w.attack, w.attacked) for w in rows] == [
        ("nemo", "none", False), ("not_installed", "none", False), ("not_installed", "not_installed_attack", True),
        ("wanda", "none", False)]
    cols = lb.columns_of(rows, targets)
    assert [c.name for c in cols] == ["mr", "sscd_orig", "leak", "tiny_alignment", "unknown_metric"]
    assert [c.name for c in cols if c.role.headline] == ["mr"] and cols[1].role.grid_score
    assert lb.metric_role("mr_any", rec("mr_any", 0.1) | {"metric_plugin": {"name": "mr"}}).category == "utility"
    site = lb.render(r)
    assert site.n_rows == 4 and any(k.startswith("plots/privacy-utility-") for k in site.files)


def test_no_plugin_name_in_the_core():
    """The leaderboard package names no built-in plugin (issue 27 item 3)."""
    src = "\n".join(p.read_text() for p in Path(lb.__file__).parent.rglob("*.py"))
    for name in ('"mr"', '"sscd_orig"', '"none", "prompt"', "IDENTITY_ATTACKS", "HEADLINE_METRICS", "PLOT_Y_METRIC",
                 "NO_ATTACK =", 'attack == "none"', 'mitigation == "none"'):
        assert name not in src, name
