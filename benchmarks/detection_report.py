"""The detection track on the embedded model: every detector on the model's memorized vs non-memorized sets.

    OMP_NUM_THREADS=1 python benchmarks/detection_report.py [--detector NAME ...] [--results benchmarks/results]
                                                           [--cache-dir DIR] [--from-result PATH]
                                                           [--out benchmarks/reports/detection]

Runs ``memobench detect --model tiny`` with the detectors (default: wen, nemo, memattn, sail, anisotropy,
bright_ending, each at its defaults) on the model's default sets (``tiny-vm`` memorized vs ``tiny-nonmem``), writing
the result JSON under ``--results`` (``<results>/tiny/detect/<run_id>.json``, where ``memobench leaderboard build``
finds it), and writes ``<out>.md`` (the table: AUC, ACC, TPR@1%FPR, TPR@3%FPR, seconds per prompt, n memorized /
non-memorized, and the command) and ``<out>.json`` (the same numbers). ``--from-result`` only re-reads an existing
result JSON. Per-prompt scores are cached (the memobench cache), so a re-run scores only what is missing; the seconds
per prompt are those measured when each score was computed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DETECTORS = ("wen", "nemo", "memattn", "sail", "anisotropy", "bright_ending")


def detect_command(detectors, results: Path, cache_dir: str | None) -> list[str]:
    cmd = ["memobench", "detect", "--model", "tiny"]
    for d in detectors:
        cmd += ["--detector", d]
    cmd += ["--output-dir", str(results), "--no-progress", "--json"]
    if cache_dir:
        cmd += ["--cache-dir", cache_dir]
    return cmd


def run(cmd: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    exe = Path(sys.executable).parent / "memobench"
    proc = subprocess.run([str(exe) if exe.exists() else cmd[0], *cmd[1:]], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"memobench detect failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def rows_of(res: dict) -> list[dict]:
    out = []
    for name, d in res["detectors"].items():
        m = d["metrics"]
        out.append({"detector": name, "statistic": d.get("statistic", ""), "auc": m["auc"], "acc": m["acc"],
                    "tpr_at_1fpr": m["tpr_at_fpr"], "tpr_at_3fpr": m["tpr_at_3fpr"],
                    "seconds_per_prompt": d.get("seconds_per_prompt"), "n_pos": m["n_pos"], "n_neg": m["n_neg"],
                    "params": d["identity"]["params"]})
    return out


def _f(v, nd=3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def markdown(res: dict, rows: list[dict], command: str, result_rel: str) -> str:
    pos, neg = res["memorized"], res["nonmemorized"]
    lines = [
        "# Detection track on the embedded model",
        "",
        f"`memobench detect` on `{res['model']['plugin']['name']}` (weights "
        f"{str(res['model'].get('revision_or_sha256', ''))[:23]}, {res['model'].get('dtype', '')}, CPU): "
        f"{pos['n']} memorized prompts (`{pos['name']}`) vs {neg['n']} non-memorized (`{neg['name']}`); every "
        "detector at its defaults (`memobench ls detectors`). Higher score = more likely memorized. TPR@k%FPR is the "
        "largest TPR at an FPR strictly below k % (METHODS §6.3); with "
        f"{neg['n']} negatives the smallest non-zero FPR is 1/{neg['n']} = {100 / neg['n']:.1f} %, so TPR@1%FPR "
        "counts only thresholds above every non-memorized prompt. s/prompt: mean seconds one prompt's score took "
        "(one CPU thread, OMP_NUM_THREADS=1).",
        "",
        "| detector | AUC | ACC | TPR@1%FPR | TPR@3%FPR | s/prompt | n pos / n neg |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['detector']} | {_f(r['auc'])} | {_f(r['acc'])} | {_f(r['tpr_at_1fpr'])} | "
                     f"{_f(r['tpr_at_3fpr'])} | {_f(r['seconds_per_prompt'], 2)} | {r['n_pos']} / {r['n_neg']} |")
    inverted = [r for r in rows if r["auc"] is not None and r["auc"] < 0.5]
    if inverted:
        lines += [""] + [f"`{r['detector']}`: AUC {_f(r['auc'])} < 0.5 — its score ranks the two sets in the direction "
                         f"opposite to its paper's (memorized = higher); reversed, its AUC would be "
                         f"{_f(1 - r['auc'])}. The detector keeps the paper's direction." for r in inverted]
    lines += ["", "s/prompt was measured on a 2-core machine shared with other jobs; compare ratios, not absolute "
                  "times.", "", "Statistics:", ""]
    lines += [f"* `{r['detector']}`: {r['statistic']}" for r in rows]
    lines += ["", f"Command (`{result_rel}`, run {res['run_id']}, memobench {res.get('memobench_version')}, "
                  f"commit {str(res.get('git_hash') or 'n/a')[:12]}):", "", "```", command, "```", "",
              "Regenerate: `OMP_NUM_THREADS=1 uv run python benchmarks/detection_report.py` (add `--from-result "
              f"{result_rel}` to rewrite the table from the committed result without scoring).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detector", action="append", help="detectors (default: all six)")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--from-result", default=None, help="read this result JSON instead of running the benchmark")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "reports" / "detection"))
    a = ap.parse_args(argv)
    dets = tuple(a.detector or DETECTORS)
    results = Path(a.results)
    cmd = detect_command(dets, results.relative_to(ROOT) if results.is_relative_to(ROOT) else results, a.cache_dir)
    t0 = time.time()
    if a.from_result:
        res = json.loads(Path(a.from_result).read_text())
        res_path = Path(a.from_result)
    else:
        res = run(cmd)
        res_path = Path(res["paths"]["result"])
        res = json.loads((res_path if res_path.is_absolute() else ROOT / res_path).read_text())
    rp = res_path.resolve()
    result_rel = rp.relative_to(ROOT).as_posix() if rp.is_relative_to(ROOT) else str(rp)
    rows = rows_of(res)
    command = "OMP_NUM_THREADS=1 " + shlex.join(cmd)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown(res, rows, command, result_rel))
    report = {"command": command, "result": result_rel, "run_id": res["run_id"], "model": res["model"],
              "memorized": {k: res["memorized"][k] for k in ("name", "n", "content_sha256")},
              "nonmemorized": {k: res["nonmemorized"][k] for k in ("name", "n", "content_sha256")},
              "detectors": rows, "memobench_version": res.get("memobench_version"),
              "git_hash": res.get("git_hash"), "git_dirty": res.get("git_dirty"),
              "created_at": res.get("created_at")}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(out.with_suffix(".md").read_text())
    print(f"({time.time() - t0:.0f} s) wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
