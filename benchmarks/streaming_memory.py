"""Peak memory of the scoring phase vs the number of samples (issue 25 (4): scoring streams images).

    OMP_NUM_THREADS=1 python benchmarks/streaming_memory.py [--sizes 100,2000] [--steps 1]
        [--metrics mr,sscd_orig,tiny_alignment] [--compare-rev REV] [--out benchmarks/reports/streaming_memory]

What it measures, on the embedded model ``tiny`` (shipped weights, 64×64 images):

1. *populate*: one ``Runner`` run (a subprocess, no metrics) generates the largest size's images into a temporary cache
   with the real generation path at ``--steps`` (default 1: cache keys include the step count, so these entries are
   the run's own; 1-step images are as large as 50-step ones, only their content is cruder). Samples: the 10
   prompts of ``tiny-mem`` (8 VM + 2 TM, one training image each) × S seeds plus the 30 utility prompts of
   ``tiny-heldout`` (2 reference renderings each) × U utility seeds, with U ≈ 15 % of the samples / 30 and
   S = (N − 30·U) / 10 (100 → S = 7, U = 1; 2,000 → S = 170, U = 10). Smaller sizes use a prefix of the seeds, so one
   populate serves every size.
2. *measure*, per size, in a fresh subprocess: the same ``Runner`` with the metrics (default: the model's own,
   ``mr``, ``sscd_orig`` — both SSCD int8 ONNX at 320 px — and ``tiny_alignment``); every image is cached, so the run
   loads the model, then scores: it reads and scores every image, writes the per-sample table, the grid and the
   result. When the scoring phase starts (``Runner._load_samples``), the kernel's peak-RSS mark is reset
   (``/proc/self/clear_refs`` ← 5) and a thread samples ``/proc/self/statm`` every 5 ms; at the end ``VmHWM`` (peak
   RSS since the reset = the scoring phase's peak) and ``getrusage(RUSAGE_SELF).ru_maxrss`` are read. Where the reset
   is refused, the sampled peak is used and the JSON says so.

Flat means: peak RSS of the scoring phase at the largest size ≤ 1.10 × that at the smallest. ``--compare-rev REV``
measures a ``git archive`` of another commit (e.g. the one before streaming) the same way, with its own populate (a
no-op when it computes the same cache keys), for a before/after table. ``OMP_NUM_THREADS`` and friends are passed
through (use 1 on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N_TARGET_PROMPTS = 10  # tiny-mem
N_UTILITY_PROMPTS = 30  # tiny-heldout (default n)


def layout(n: int) -> tuple[int, int]:
    """(target seeds S, utility seeds U) with 10·S + 30·U = n (n a multiple of 10, ≥ 40)."""
    u = max(1, round(n * 0.15 / N_UTILITY_PROMPTS))
    s = (n - N_UTILITY_PROMPTS * u) // N_TARGET_PROMPTS
    if s < 1 or N_TARGET_PROMPTS * s + N_UTILITY_PROMPTS * u != n:
        raise SystemExit(f"error: --sizes: {n} cannot be laid out as 10·S + 30·U; use a multiple of 10, at least 40")
    return s, u


# ---------------------------------------------------------------------------------------------- child process
CHILD = r'''
import json, os, resource, sys, threading, time
spec = json.loads(sys.argv[1])
from memobench.config import RunConfig
from memobench.runner import Runner

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def hwm_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None

state = {"peak": 0.0, "run": False}
def poll():
    while state["run"]:
        state["peak"] = max(state["peak"], rss_mb())
        time.sleep(0.005)

orig = Runner._load_samples
def marked(self, *a, **k):
    state["hwm_before"] = hwm_mb()
    state["rss_start"] = rss_mb()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        state["reset"] = True
    except OSError as e:
        state["reset"] = f"refused: {e}"
    state["t0"] = time.time()
    state["run"] = True
    state["peak"] = state["rss_start"]
    threading.Thread(target=poll, daemon=True).start()
    return orig(self, *a, **k)
Runner._load_samples = marked

cfg = RunConfig(**spec["config"])
t = time.time()
out = Runner(cfg, progress=False).run()
state["run"] = False
time.sleep(0.02)
res = {"wall_s": time.time() - t, "timing": out.result["timing"], "errors": out.result["errors"],
       "n_samples": sum(1 for _ in open(out.samples_path)),
       "metrics": {k: {"value": v.get("value"), "n": v.get("n")} for k, v in out.result["metrics"].items()}}
if "t0" in state:
    res.update({"score_phase_s": time.time() - state["t0"], "rss_at_score_start_mb": state["rss_start"],
                "peak_before_score_mb": state["hwm_before"], "score_peak_sampled_mb": state["peak"],
                "score_peak_hwm_mb": hwm_mb() if state["reset"] is True else None, "hwm_reset": state["reset"]})
res["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(res))
'''


def child(spec: dict, pythonpath: str | None, log: Path) -> dict:
    env = dict(os.environ)
    env["MEMOBENCH_LOAD_PLUGINS"] = "memobench"  # only memobench's own plugins (as the test suite)
    env["MEMOBENCH_CACHE_DIR"] = spec["config"]["cache_dir"]
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True, text=True,
                       cwd=spec["config"]["output_dir"])
    log.write_text(p.stdout + p.stderr)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"error: child run failed (exit {p.returncode}); log: {log}\n{p.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def code_tree(rev: str, work: Path) -> tuple[str, str]:
    """A ``git archive`` of ``rev`` under ``work`` and a PYTHONPATH that imports it (memobench, memobench_plugins)."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"error: --compare-rev {rev}: not a commit of {ROOT} ({commit.stderr.strip()})")
    sha = commit.stdout.strip()
    tree = work / f"code-{sha[:12]}"
    tree.mkdir(parents=True)
    arch = subprocess.run(["git", "-C", str(ROOT), "archive", sha], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=arch, check=True)
    shim = work / f"path-{sha[:12]}"
    shim.mkdir()
    (shim / "memobench").symlink_to(tree / "memobench")
    (shim / "memobench_plugins").symlink_to(tree / "plugins")
    return sha, str(shim)


def measure(label: str, pythonpath: str | None, sizes: list[int], args, work: Path) -> dict:
    cache = work / "cache"  # shared: a code that computes the same keys finds its images already there
    weights = ROOT / "plugins" / "tiny" / "weights"  # the same folder (hence the same cache keys) for every code
    base = {"model": "tiny", "model_params": {"path": str(weights)}, "prompts": "tiny-mem",
            "num_inference_steps": args.steps, "cache_dir": str(cache), "offline": True, "batch_size": 16,
            "utility_limit": N_UTILITY_PROMPTS}
    s_max, u_max = layout(max(sizes))
    t = time.time()
    out_dir = work / f"out-{label}-populate"
    out_dir.mkdir()
    pop = child({"config": {**base, "seeds": list(range(s_max)), "utility_seeds": list(range(u_max)),
                            "metrics": ["tiny_alignment"], "output_dir": str(out_dir)}}, pythonpath,
                work / f"{label}-populate.log")
    populate_s = time.time() - t
    print(f"[{label}] populated {pop['n_samples']} samples in {populate_s:.0f} s", flush=True)
    runs = {}
    for n in sizes:
        s, u = layout(n)
        out_dir = work / f"out-{label}-{n}"
        out_dir.mkdir()
        r = child({"config": {**base, "seeds": list(range(s)), "utility_seeds": list(range(u)),
                              "metrics": args.metrics, "output_dir": str(out_dir)}}, pythonpath,
                  work / f"{label}-{n}.log")
        if r["n_samples"] != n:
            raise SystemExit(f"error: expected {n} samples, the run scored {r['n_samples']}")
        if r["timing"].get("target_s", 0) > 5:
            print(f"[{label}] warning: size {n} generated images in the measured run", flush=True)
        r["target_seeds"], r["utility_seeds"] = s, u
        r["score_peak_mb"] = r["score_peak_hwm_mb"] if r.get("score_peak_hwm_mb") else r["score_peak_sampled_mb"]
        runs[str(n)] = r
        print(f"[{label}] {n} samples: scoring peak {r['score_peak_mb']:.0f} MB (start {r['rss_at_score_start_mb']:.0f}"
              f" MB), scoring {r['score_phase_s']:.0f} s", flush=True)
    lo, hi = runs[str(min(sizes))]["score_peak_mb"], runs[str(max(sizes))]["score_peak_mb"]
    return {"populate_s": populate_s, "populate_timing": pop["timing"], "runs": runs,
            "peak_ratio": hi / lo, "flat_within_10pct": hi <= 1.10 * lo}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,2000", help="sample counts to compare (multiples of 10, ≥ 40)")
    ap.add_argument("--steps", type=int, default=1, help="denoising steps of the populated images (part of the keys)")
    ap.add_argument("--metrics", default="mr,sscd_orig,tiny_alignment", help="metrics of the measured runs")
    ap.add_argument("--compare-rev", default=None, help="also measure this commit (git archive), e.g. the parent of "
                    "the streaming change")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "reports" / "streaming_memory"),
                    help="writes OUT.json and OUT.md")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folder (caches, logs, results)")
    args = ap.parse_args(argv)
    sizes = sorted({int(x) for x in args.sizes.split(",") if x.strip()})
    if len(sizes) < 2:
        raise SystemExit("error: --sizes: give at least two sizes, e.g. 100,2000")
    for n in sizes:
        layout(n)
    if args.steps < 1:
        raise SystemExit("error: --steps must be ≥ 1")
    args.metrics = [m for m in args.metrics.split(",") if m]
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="memobench-streaming-"))
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    codes = {"this tree": measure("this", None, sizes, args, work)}
    compare = None
    if args.compare_rev:
        sha, path = code_tree(args.compare_rev, work)
        compare = {"rev": args.compare_rev, "commit": sha}
        codes[f"{args.compare_rev} ({sha[:10]})"] = measure("compare", path, sizes, args, work)
    wall = time.time() - t0
    cmd = "OMP_NUM_THREADS=1 python benchmarks/streaming_memory.py " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]))
    doc = {
        "what": "peak RSS of the scoring phase (Runner._load_samples to the end of Runner.run: scoring every cached "
                "image, per-sample table, grid, result) vs the number of samples, model tiny, every image cached",
        "command": cmd.strip(), "git_head": head, "git_dirty": dirty, "compare": compare,
        "sizes": sizes, "steps": args.steps, "metrics": args.metrics,
        "layout": {str(n): dict(zip(("target_seeds", "utility_seeds"), layout(n))) for n in sizes},
        "prompts": {"target": f"tiny-mem ({N_TARGET_PROMPTS})", "utility": f"tiny-heldout ({N_UTILITY_PROMPTS})"},
        "env": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "results": codes, "wall_s": wall, "work_dir": str(work) if args.keep else None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from memobench.cache import atomic_write_text

    atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=1, sort_keys=True))
    lo, hi = str(min(sizes)), str(max(sizes))
    lines = ["# Scoring-phase peak memory vs samples (issue 25 (4))", "",
             f"`{doc['command']}` — {wall:.0f} s wall in all, on {os.cpu_count()} CPUs "
             f"(OMP_NUM_THREADS={doc['env']['OMP_NUM_THREADS']}); code: {head[:10]}"
             + (" + uncommitted changes" if dirty else "")
             + (f", compared with {args.compare_rev} ({compare['commit'][:10]})" if compare else "") + ".", "",
             f"Model `tiny` (64×64), every image in the cache (populated with the real generation at {args.steps} "
             f"step(s)); metrics {', '.join(args.metrics)}; samples = 10 `tiny-mem` prompts × S seeds + 30 "
             f"`tiny-heldout` prompts × U seeds. Peak = RSS high-water mark of the scoring phase (reset when it "
             f"starts; `VmHWM`), start = RSS when it starts (model and libraries loaded).", "",
             "| code | samples (S, U) | RSS at scoring start (MB) | scoring peak (MB) | peak − start (MB) | "
             "scoring (s) | process peak, ru_maxrss (MB) |", "|---|---|---|---|---|---|---|"]
    for label, res in codes.items():
        for n in sizes:
            r = res["runs"][str(n)]
            lines.append(f"| {label} | {n} ({r['target_seeds']}, {r['utility_seeds']}) | "
                         f"{r['rss_at_score_start_mb']:.0f} | {r['score_peak_mb']:.0f} | "
                         f"{r['score_peak_mb'] - r['rss_at_score_start_mb']:.0f} | {r['score_phase_s']:.0f} | "
                         f"{max(r['ru_maxrss_mb'], r.get('peak_before_score_mb') or 0):.0f} |")
    lines.append("")
    for label, res in codes.items():
        verdict = "flat (within 10 %)" if res["flat_within_10pct"] else "NOT flat (more than 10 %)"
        lines.append(f"- {label}: scoring peak at {hi} samples = {res['peak_ratio']:.3f} × that at {lo}: {verdict}; "
                     f"populate {res['populate_s']:.0f} s.")
    lines += ["", "Scoring streams: the runner's samples decode each image from the cache (sha256-checked) when a "
              "metric reads it and do not keep it; the SSCD metrics embed a batch at a time and keep the vectors; the "
              "start of a run checks sidecars only. What still grows with the samples: the per-sample records "
              "(feature vectors: 512 floats per distinct image and metric; per-sample values; the JSONL rows)."]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({wall:.0f} s)")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if codes["this tree"]["flat_within_10pct"] else 1


if __name__ == "__main__":
    sys.exit(main())
