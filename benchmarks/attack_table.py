"""Every mitigation against every attack, from result files: MR (the run's headline metric) of the mitigation alone
and under each attack, DoRI's work to re-extract (``--budget-sweep``), and the extraction attack's flag rate.

    python benchmarks/attack_table.py --from-results benchmarks/results [--model tiny]
                                      [--out benchmarks/reports/attack_table]

Nothing is computed here: the numbers are read from the result JSONs that ``memobench run`` wrote (the leaderboard's
input). A missing pairing is shown as "—". Writes ``<out>.md`` and ``<out>.json``; prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from memobench.cache import atomic_write_text

ATTACKS = ("dori", "extraction", "onestep", "trigger_search")


def collect(results: Path, model: str) -> dict:
    """{mitigation: {"alone": MR, attack: {"mr", "sscd_orig", "run_id", ...}}} from ``results/<model>/*/*.json``."""
    table: dict[str, dict] = {}
    for f in sorted((results / model).glob("*__*/*.json")):
        d = json.loads(f.read_text())
        mit, att = d["mitigation"]["name"], d["attack"]["name"]
        row = table.setdefault(mit, {})
        mr = (d["metrics"].get("mr") or {}).get("value")
        if att in ("none", "prompt"):
            row["alone"] = mr
            continue
        rec = {"mr": mr, "sscd_orig": (d["metrics"].get("sscd_orig") or {}).get("value"), "run_id": d["run_id"],
               "file": str(f.relative_to(results))}
        row.setdefault("alone", (d.get("metrics_without_attack", {}).get("mr") or {}).get("value"))
        sw = d.get("budget_sweep")
        if sw:
            rec["sweep"] = {str(p["value"]): p["metrics"].get(sw["headline_metric"]) for p in sw["points"]}
            rec["work_to_reextract"] = sw["work_to_reextract"]
            rec["work_unit"] = sw["unit"]
            rec["swept_to"] = max(p["budget"] for p in sw["points"])
        traces = d.get("attack_traces") or {}
        if att == "extraction" and traces:
            rec["flagged"] = sum(bool(t.get("flagged")) for t in traces.values()) / len(traces)
        row[att] = rec
    return table


def markdown(table: dict, model: str) -> str:
    f = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"MR on `{model}` (from the committed result files), the mitigation alone and under each attack. "
             "Work to re-extract: the least DoRI work (UNet forward+backward passes, steps × batch) with MR > 0.5 "
             "(`--budget-sweep`, default steps 0, 5, 10, 25, 50); \"not reached (W)\": MR ≤ 0.5 at every budget swept, "
             "up to W passes. \"—\": not computed. An attack's MR can fall below the mitigation alone: the attack "
             "generates from its own prompts (trigger_search) or seeds, not the training caption's. Extraction "
             "flagged: share of targets whose largest clique of near-identical samples reached 10.", "",
             "| mitigation | alone | + DoRI | DoRI work to re-extract | + extraction (flagged) | + onestep | "
             "+ trigger_search |", "|---|---:|---:|---:|---:|---:|---:|"]
    order = sorted(table, key=lambda m: (m != "none", m))
    for m in order:
        r = table[m]
        dori = r.get("dori") or {}
        if "sweep" in dori:
            w = dori["work_to_reextract"]
            work = f"{w['budget']:g} (steps={w['value']})" if w else f"not reached ({dori['swept_to']:g})"
        else:
            work = "—"
        ex = r.get("extraction") or {}
        ex_s = f(ex.get("mr")) + (f" ({ex['flagged']:.2f})" if "flagged" in ex else "")
        lines.append(f"| {m} | {f(r.get('alone'))} | {f(dori.get('mr'))} | {work} | {ex_s} | "
                     f"{f((r.get('onestep') or {}).get('mr'))} | {f((r.get('trigger_search') or {}).get('mr'))} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-results", type=Path, required=True)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/reports/attack_table"))
    a = ap.parse_args(argv)
    if not (a.from_results / a.model).is_dir():
        ap.error(f"--from-results: no folder {a.from_results / a.model}; run memobench run -o {a.from_results} first")
    table = collect(a.from_results, a.model)
    md = markdown(table, a.model)
    atomic_write_text(a.out.with_suffix(".md"), md)
    atomic_write_text(a.out.with_suffix(".json"), json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
