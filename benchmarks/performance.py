"""Where the time of a run goes: wall time, UNet calls and peak RSS per phase (issue 30).

Runs :class:`memobench.runner.Runner` in this process with light instrumentation (nothing in memobench changes):

* every UNet call goes through :meth:`memobench.model.DiffusionModel.unet_output`; the wrapper counts calls, batch
  elements (samples) and whether autograd is recording (a forward that a backward pass will follow: DoRI, advft);
* phases are the runner's: ``load+plan`` (prompts, model load, cache check), ``fit`` (the mitigation's fit),
  ``attack`` (the attack's conditioning per target, inside the target loop), ``generate targets`` (their images),
  ``generate other`` (the mitigation alone, baseline and utility images), ``score``, ``budget sweep``, and
  ``other`` (the rest: result JSON, grids, time between phases). Times are exclusive (a phase nested in another is not counted twice);
* peak RSS (``ru_maxrss``) is read when each phase ends: the process's high-water mark so far.

Modes::

    # the headline command from an empty cache, then again with everything cached
    python benchmarks/performance.py headline --mitigation nemo --attack dori --out perf_after.json
    # the matrix (every built-in mitigation × {none, dori}) in one process, cold then warm
    python benchmarks/performance.py matrix --attacks none,dori --out perf_matrix.json
    # the Markdown report from one or more measurement files (e.g. before and after a change)
    python benchmarks/performance.py report perf_before.json perf_after.json > benchmarks/reports/performance.md

Threads: torch's default (``torch.get_num_threads()``) unless ``--threads``; the number is recorded. Compare
timings only from the same machine with nothing else running.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PHASES = ("load+plan", "fit", "attack", "generate targets", "generate other", "score", "budget sweep")


class Probe:
    """Per-phase exclusive wall time, UNet calls / samples (forward-only and with autograd) and peak RSS."""

    def __init__(self):
        self.stack: list[str] = []
        self.t_enter: list[float] = []
        self.wall = defaultdict(float)
        self.calls = defaultdict(int)
        self.samples = defaultdict(int)
        self.grad_calls = defaultdict(int)
        self.grad_samples = defaultdict(int)
        self.unet_s = defaultdict(float)
        self.rss_mb = {}
        self._patches: list = []

    @property
    def phase(self) -> str:
        return self.stack[-1] if self.stack else "other (write, between phases)"

    @contextlib.contextmanager
    def enter(self, name: str):
        now = time.perf_counter()
        if self.stack:  # pause the enclosing phase
            self.wall[self.stack[-1]] += now - self.t_enter[-1]
        self.stack.append(name)
        self.t_enter.append(now)
        try:
            yield
        finally:
            now = time.perf_counter()
            self.wall[name] += now - self.t_enter.pop()
            self.stack.pop()
            if self.t_enter:
                self.t_enter[-1] = now
            self.rss_mb[name] = max(self.rss_mb.get(name, 0.0), peak_rss_mb())

    def wrap(self, owner, attr: str, phase: str) -> None:
        orig = getattr(owner, attr)
        probe = self

        def wrapped(*a, **k):
            with probe.enter(phase):
                return orig(*a, **k)

        setattr(owner, attr, wrapped)
        self._patches.append((owner, attr, orig))

    def count_unet(self, cls) -> None:
        import torch

        orig = cls.unet_output
        probe = self

        def unet_output(model, latents, t, embeds):
            ph = probe.phase
            n = int(latents.shape[0])
            grad = torch.is_grad_enabled()
            t0 = time.perf_counter()
            try:
                return orig(model, latents, t, embeds)
            finally:
                probe.unet_s[ph] += time.perf_counter() - t0
                if grad:
                    probe.grad_calls[ph] += 1
                    probe.grad_samples[ph] += n
                else:
                    probe.calls[ph] += 1
                    probe.samples[ph] += n

        cls.unet_output = unet_output
        self._patches.append((cls, "unet_output", orig))

    def install(self) -> None:
        import memobench.pipeline.budget as budget
        import memobench.runner as runner
        from memobench.model import DiffusionModel
        from memobench.pipeline.attack import AttackPhase
        from memobench.pipeline.generate import Generator

        self.count_unet(DiffusionModel)
        self.wrap(runner.Runner, "_load_and_plan", "load+plan")
        self.wrap(runner, "fit", "fit")
        self.wrap(Generator, "targets", "generate targets")
        self.wrap(AttackPhase, "output", "attack")
        self.wrap(Generator, "plain", "generate other")
        self.wrap(runner, "score", "score")
        self.wrap(budget, "sweep", "budget sweep")

    def uninstall(self) -> None:
        for owner, attr, orig in reversed(self._patches):
            setattr(owner, attr, orig)
        self._patches.clear()

    def table(self) -> dict:
        names = [p for p in PHASES if p in self.wall] + sorted(set(self.wall) - set(PHASES))
        return {p: {"wall_s": round(self.wall[p], 3), "unet_calls": self.calls[p], "unet_samples": self.samples[p],
                    "unet_grad_calls": self.grad_calls[p], "unet_grad_samples": self.grad_samples[p],
                    "unet_forward_s": round(self.unet_s[p], 3), "peak_rss_mb": round(self.rss_mb.get(p, 0.0), 1)}
                for p in names}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def git_rev() -> str:
    """The commit of the memobench that is measured (the checkout its package is imported from: this script may be
    run with another checkout's environment to measure that one)."""
    import memobench

    where = Path(memobench.__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=where).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=where).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def run_once(mitigation: str, attack: str, cache: Path, out: Path, metrics: list[str] | None,
             metric_params: dict, budget_sweep: bool, memo: dict | None = None, **overrides) -> dict:
    """One ``memobench run`` in this process, instrumented; returns the measurements and the result's figures.
    ``overrides``: further :class:`~memobench.config.RunConfig` fields (tests: a smaller run)."""
    from memobench.config import RunConfig
    from memobench.runner import Runner

    cfg = RunConfig(mitigation=mitigation, attack=attack, cache_dir=str(cache), output_dir=str(out),
                    metrics=metrics, metric_params=metric_params, budget_sweep=[] if budget_sweep else None,
                    **overrides)
    probe = Probe()
    probe.install()
    t0 = time.perf_counter()
    try:
        runner = Runner(cfg, progress=False)
        runner.model_memo = memo  # as `run --matrix` (the model loaded once per process)
        outcome = runner.run()
    finally:
        probe.uninstall()
    wall = time.perf_counter() - t0
    res = outcome.result
    figures = {k: v.get("value") for k, v in res["metrics"].items()}
    phases = probe.table()
    rest = wall - sum(p["wall_s"] for p in phases.values())
    phases["other (write, between phases)"] = {"wall_s": round(rest, 3), "unet_calls": 0, "unet_samples": 0,
                                                "unet_grad_calls": 0, "unet_grad_samples": 0, "unet_forward_s": 0.0,
                                                "peak_rss_mb": round(peak_rss_mb(), 1)}
    return {"mitigation": mitigation, "attack": attack, "wall_s": round(wall, 3), "phases": phases,
            "unet_calls": sum(p["unet_calls"] + p["unet_grad_calls"] for p in phases.values()),
            "unet_samples": sum(p["unet_samples"] + p["unet_grad_samples"] for p in phases.values()),
            "peak_rss_mb": round(peak_rss_mb(), 1), "config_hash": res["config_hash"][:16], "figures": figures,
            "figures_without_attack": {k: v.get("value") for k, v in (res.get("metrics_without_attack") or {}).items()},
            "runner_timing": {k: round(v, 3) for k, v in res["timing"].items()},
            "image_provenance": res.get("image_provenance")}


def environment(threads: int) -> dict:
    import torch

    return {"git": git_rev(), "torch_threads": threads, "torch": torch.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "platform": platform.platform(), "argv": sys.argv,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def main_measure(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    work = Path(tempfile.mkdtemp(prefix="memobench-perf-"))
    cache = Path(args.cache_dir) if args.cache_dir else work / "cache"
    metric_params = json.loads(args.metric_params) if args.metric_params else {}
    metrics = args.metric or None
    if args.mode == "headline":
        pairs = [(args.mitigation, args.attack)]
    else:
        from memobench.cli_run import matrix_pairings
        from memobench.registry import get_registry

        pairs = matrix_pairings(get_registry(), args.mitigations, args.attacks)
    runs = {}
    for state in ("cold", "warm"):
        if state == "warm" and args.cold_only:
            break
        if state == "cold" and args.warm_only:
            continue
        t0 = time.perf_counter()
        rows, memo = [], ({} if args.mode == "matrix" else None)
        for m, a in pairs:
            print(f"[performance] {state}: {m} × {a}", file=sys.stderr, flush=True)
            extra = {"model_params": {"path": args.model_path}} if args.model_path else {}
            rows.append(run_once(m, a, cache, work / f"out-{state}", metrics, metric_params, args.budget_sweep, memo,
                                 **extra))
        runs[state] = {"wall_s": round(time.perf_counter() - t0, 3), "runs": rows, "peak_rss_mb": round(peak_rss_mb(), 1)}
        print(f"[performance] {state}: {runs[state]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    doc = {"mode": args.mode, "pairs": pairs, "environment": environment(threads), "runs": runs,
           "cache_dir": str(cache) if args.cache_dir else "(fresh temporary folder)"}
    text = json.dumps(doc, indent=1, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    if not args.cache_dir and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------------------------- report
def _fmt(x, nd=1):
    return "—" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def phase_table(run: dict) -> list[str]:
    lines = ["| phase | wall (s) | UNet fwd calls / samples | UNet fwd+bwd calls / samples | UNet forward (s) | "
             "peak RSS at end (MB) |", "|---|---:|---:|---:|---:|---:|"]
    order = list(PHASES) + ["other (write, between phases)"]
    for name, p in sorted(run["phases"].items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else 99, kv[0])):
        lines.append(f"| {name} | {p['wall_s']:.1f} | {p['unet_calls']} / {p['unet_samples']} | "
                     f"{p['unet_grad_calls']} / {p['unet_grad_samples']} | {p['unet_forward_s']:.1f} | "
                     f"{p['peak_rss_mb']:.0f} |")
    lines.append(f"| **total** | **{run['wall_s']:.1f}** | {run['unet_calls']} calls, {run['unet_samples']} samples "
                 f"(all) | | | {run['peak_rss_mb']:.0f} |")
    return lines


def main_report(args) -> int:
    docs = [(Path(f).name, json.loads(Path(f).read_text())) for f in args.files]
    out = ["# Performance measurements (generated by `benchmarks/performance.py report`)", ""]
    for name, d in docs:
        env = d["environment"]
        out += [f"## {name}: {d['mode']} at {env['git']}, {env['torch_threads']} torch thread(s), {env['date']}", "",
                f"Command: `{' '.join(env['argv'])}`", ""]
        for state, st in d["runs"].items():
            out.append(f"### {state} ({'empty cache' if state == 'cold' else 'everything cached'}): "
                       f"{st['wall_s']:.1f} s, peak RSS {st['peak_rss_mb']:.0f} MB")
            out.append("")
            if d["mode"] == "headline":
                out += phase_table(st["runs"][0])
                figs = st["runs"][0]["figures"]
                out += ["", "Figures: " + ", ".join(f"{k} {_fmt(v, 3)}" for k, v in sorted(figs.items())
                                                    if isinstance(v, (int, float))), ""]
            else:
                out += ["| mitigation | attack | wall (s) | UNet calls | UNet samples | slowest phase |",
                        "|---|---|---:|---:|---:|---|"]
                for r in st["runs"]:
                    slow = max(r["phases"].items(), key=lambda kv: kv[1]["wall_s"])
                    out.append(f"| {r['mitigation']} | {r['attack']} | {r['wall_s']:.1f} | {r['unet_calls']} | "
                               f"{r['unet_samples']} | {slow[0]} ({slow[1]['wall_s']:.1f} s) |")
                out.append("")
    print("\n".join(out))
    return 0


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    for mode in ("headline", "matrix"):
        p = sub.add_parser(mode)
        if mode == "headline":
            p.add_argument("--mitigation", default="nemo")
            p.add_argument("--attack", default="dori")
        else:
            p.add_argument("--mitigations", default=None, help="comma list (default: every registered one)")
            p.add_argument("--attacks", default="none,dori", help="comma list (default: none,dori)")
        p.add_argument("--metric", action="append", default=[], help="metric plugin (repeatable; default: the model's)")
        p.add_argument("--metric-params", default="", help='JSON, e.g. {"fidelity": {"feature_extractor": "sscd"}}')
        p.add_argument("--budget-sweep", action="store_true", help="with --budget-sweep (the attack's default values)")
        p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
        p.add_argument("--cache-dir", default=None, help="use this cache (default: a fresh temporary folder)")
        p.add_argument("--model-path", default="", help="the tiny model's weights folder (model param path; its "
                       "absolute path is part of the sample keys, so a cache written from another checkout is warm "
                       "only with that checkout's path)")
        p.add_argument("--cold-only", action="store_true", help="skip the warm repetition")
        p.add_argument("--warm-only", action="store_true", help="only the warm pass (with --cache-dir holding "
                       "everything the pairings need already)")
        p.add_argument("--keep", action="store_true", help="keep the temporary folder")
        p.add_argument("--out", default=None, help="write the JSON here (default: stdout)")
    r = sub.add_parser("report")
    r.add_argument("files", nargs="+")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return main_report(args) if args.mode == "report" else main_measure(args)


if __name__ == "__main__":
    sys.exit(main())
