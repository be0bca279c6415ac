"""Harness overhead: memobench's Runner vs a bare diffusers loop doing the same work, side by side.

(a) ``memobench.runner.Runner(...).run()`` with a fresh cache and output dir each repetition: loads the model,
    generates every (prompt, seed) image, writes PNGs + sidecars, the per-sample table, the grid and the result
    JSON (no metrics);
(b) ``StableDiffusionPipeline.from_pretrained`` + ``__call__`` per prompt and batch, with one CPU
    ``torch.Generator().manual_seed(seed)`` per image, DDIM, the same prompts, seeds, steps, guidance, size and
    batch composition; images converted to uint8 and kept in memory (nothing written).

Repetitions are interleaved (a/b, then b/a, …) after one untimed warm-up of each, and the medians are compared:
``ratio = median(a) / median(b)`` (target ≤ 1.10). The generation phase alone (Runner ``timing.target_s`` vs the
bare loop's time after loading) is reported too. Timings on a machine shared with other jobs are noisy: compare
the paired per-repetition ratios and rerun with more ``--repeats`` before drawing conclusions.

    python benchmarks/harness_overhead.py --prompts 2 --seeds 4 --steps 10 --repeats 5 --out overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-path", default=None, help="diffusers pipeline folder (default: build a tiny random "
                    "pipeline in a temp dir; the shipped embedded model lives at plugins/tiny/weights)")
    ap.add_argument("--prompts", type=int, default=2, help="number of prompts (the first N of tiny-vm)")
    ap.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 for every prompt")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps")
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions of each side")
    ap.add_argument("--batch-size", type=int, default=16, help="images per UNet batch (memobench's default: 16)")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the tiny model's)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's); on a machine "
                    "shared with other jobs, 1 thread is often less noisy than oversubscribed cores")
    ap.add_argument("--out", type=Path, default=None, help="write the measurements as JSON here")
    a = ap.parse_args(argv)
    for name in ("prompts", "seeds", "steps", "repeats", "batch_size"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be ≥ 1")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="memobench-overhead-"))
    os.environ["MEMOBENCH_CACHE_DIR"] = str(work / "memobench-cache")  # weight-hash memo, not the user's cache

    import numpy as np
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from memobench.config import RunConfig
    from memobench.model import quiet_libraries
    from memobench.registry import get_registry
    from memobench.runner import Runner

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model_path:
        model_path = Path(args.model_path)
    else:
        from memobench_plugins.sd_random.testing import save_tiny_random_pipeline

        model_path = save_tiny_random_pipeline(work / "tiny-random-pipeline", tokenizer_dir=work / "tokenizer")

    reg = get_registry()
    tiny = reg.get("model", "tiny")
    gen = dict(tiny.generation)
    gen["num_inference_steps"] = args.steps
    if args.guidance is not None:
        gen["guidance_scale"] = args.guidance
    seeds = list(range(args.seeds))
    prompts = [p.text for p in reg.get("prompt_set", tiny.prompt_sets["target"])().prompts(None)][: args.prompts]
    if len(prompts) < args.prompts:
        print(f"note: only {len(prompts)} prompts available", file=sys.stderr)

    counter = iter(range(10**6))

    def run_memobench() -> tuple[float, dict]:
        i = next(counter)
        cfg = RunConfig(model="tiny", model_params={"path": str(model_path)}, metrics=[], seeds=seeds,
                        limit=len(prompts), num_inference_steps=args.steps, guidance_scale=gen["guidance_scale"],
                        batch_size=args.batch_size, cache_dir=str(work / f"cache-{i}"),
                        output_dir=str(work / f"out-{i}"))
        t = time.perf_counter()
        out = Runner(cfg, registry=reg, progress=False).run()
        total = time.perf_counter() - t
        assert not out.errors, out.errors
        return total, {"load_s": out.result["timing"]["load_s"], "generate_s": out.result["timing"]["target_s"]}

    def run_bare() -> tuple[float, dict]:
        t = time.perf_counter()
        pipe = StableDiffusionPipeline.from_pretrained(str(model_path), safety_checker=None,
                                                       requires_safety_checker=False, use_safetensors=True)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        t_load = time.perf_counter() - t
        images = []
        for prompt in prompts:
            for i in range(0, len(seeds), args.batch_size):
                chunk = seeds[i: i + args.batch_size]
                out = pipe(prompt, generator=[torch.Generator().manual_seed(s) for s in chunk],
                           num_images_per_prompt=len(chunk), num_inference_steps=args.steps,
                           guidance_scale=gen["guidance_scale"], height=gen["height"], width=gen["width"],
                           output_type="np").images
                images.extend((out * 255).round().astype(np.uint8))
        total = time.perf_counter() - t
        assert len(images) == len(prompts) * len(seeds)
        return total, {"load_s": t_load, "generate_s": total - t_load}

    sides = {"memobench": run_memobench, "bare_diffusers": run_bare}
    for fn in sides.values():  # warm-up (imports, lazy init, weight-hash memo): not timed
        fn()
    reps = []
    for r in range(args.repeats):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        rec = {"repeat": r, "order": order}
        for name in order:
            rec[name], rec[f"{name}_phases"] = sides[name]()
        rec["ratio"] = rec["memobench"] / rec["bare_diffusers"]
        reps.append(rec)
        print(f"repeat {r}: memobench {rec['memobench']:.3f} s, bare diffusers {rec['bare_diffusers']:.3f} s, "
              f"ratio {rec['ratio']:.3f}", file=sys.stderr)

    def med(key, phase=None):
        return statistics.median(x[key] if phase is None else x[f"{key}_phases"][phase] for x in reps)

    ratio = med("memobench") / med("bare_diffusers")
    gen_ratio = med("memobench", "generate_s") / med("bare_diffusers", "generate_s")
    summary = {
        "benchmark": "harness_overhead",
        "settings": {"model_path": str(model_path), "model_path_default": args.model_path is None,
                     "prompts": len(prompts), "seeds": len(seeds), "steps": args.steps, "repeats": args.repeats,
                     "batch_size": args.batch_size, "guidance_scale": gen["guidance_scale"],
                     "height": gen["height"], "width": gen["width"], "images_per_side": len(prompts) * len(seeds)},
        "environment": {"python": platform.python_version(), "platform": platform.platform(),
                        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                        "cpu_count": os.cpu_count(),
                        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "median_s": {"memobench": med("memobench"), "bare_diffusers": med("bare_diffusers")},
        "median_generate_s": {"memobench": med("memobench", "generate_s"),
                              "bare_diffusers": med("bare_diffusers", "generate_s")},
        "ratio": ratio,
        "ratio_generation_only": gen_ratio,
        "paired_ratio_median": statistics.median(x["ratio"] for x in reps),
        "target_ratio": 1.10,
        "repeats": reps,
        "note": "wall-clock medians of interleaved repetitions; noisy on a shared machine",
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))
    print(f"memobench {summary['median_s']['memobench']:.3f} s vs bare diffusers "
          f"{summary['median_s']['bare_diffusers']:.3f} s (median of {args.repeats}): ratio {ratio:.3f} "
          f"(generation only {gen_ratio:.3f}; target ≤ 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
