"""The real path at SD v1.4 size on one GPU (issue 25): one script, a JSON report, ≤ 8 minutes on one H100.

On ``sd-random`` (SD v1.4's full-size architecture with seeded random weights, built on the GPU; fp16; 512×512):

1. images/s through memobench (``Runner.run``, generation phase) vs a bare diffusers loop
   (``StableDiffusionPipeline.__call__``, same prompts, seeds, steps, guidance, batch) — ``benchmarks/suite.py`` (a);
2. DoRI's time per target vs the bare UNet forward+backward passes it needs — suite (b);
3. NeMo: localization seconds per prompt and its ratio to its bare UNet passes — suite (c);
4. Wen et al.'s inference-time mitigation: seconds per prompt (``condition`` on the prompt's G latents);
5. advft: peak GPU memory (``torch.cuda.max_memory_allocated``) and wall time of its fit at SD size, with a small
   budget (1 epoch, 2 steps, DoRI 2 steps) — the memory of a training step does not depend on the budget;
6. the whole real code path through the CLI: ``memobench run --model sd-random --mitigation nemo --attack dori``
   at 512 px, fp16, 2 steps, one prompt, one seed (exit code and wall time).

Every part runs in its own try-block; a failed part is recorded with its error and the rest still runs. The report
(JSON) goes to ``--out`` (default ``$OUT/gpu_check.json`` when ``$OUT`` is set, else ``benchmarks/measurements``).

    python benchmarks/gpu_check.py --out gpu_check.json
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
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _parts(args, work: Path, report: dict) -> None:
    import torch

    import suite

    sargs = suite.parse_args(["--arch", "sd14-random", "--prompts", "2", "--seeds", "4", "--steps", str(args.steps),
                              "--batch-size", "4", "--repeats", str(args.repeats), "--dori-steps", "10",
                              "--dori-batch", "8", "--nemo-prompts", "2", "--nemo-stats-prompts", "20",
                              "--gpu-dtype", args.dtype])
    arch = suite._Arch("sd14-random", "cuda", args.dtype, work)

    def part(name, fn):
        t = time.perf_counter()
        print(f"[gpu_check] {name} …", file=sys.stderr, flush=True)
        try:
            torch.cuda.reset_peak_memory_stats()
            out = fn()
            out["wall_s"] = time.perf_counter() - t
            out["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            report["parts"][name] = out
        except Exception as e:  # record and go on: the other parts still run
            report["parts"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:],
                                     "wall_s": time.perf_counter() - t}
        print(f"[gpu_check] {name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        _write(args.out, report)

    part("1_generation_images_per_s", lambda: suite.part_a(arch, sargs, work))
    part("2_dori_vs_bare_fwd_bwd", lambda: suite.part_b(arch, sargs))
    part("3_nemo_per_prompt", lambda: suite.part_c(arch, sargs))
    part("4_wen_per_prompt", lambda: _wen(arch, args))
    arch._model = None
    torch.cuda.empty_cache()
    part("5_advft_peak_memory", lambda: _advft(args, work))
    part("6_cli_nemo_dori", lambda: _cli(args, work))


def _wen(arch, args) -> dict:
    import torch

    from memobench.api import Conditioning, Context
    from memobench.registry import get_registry

    model = arch.model()
    reg = get_registry()
    wen_cls = reg.get("mitigation", "wen")
    wen = wen_cls()
    gen = dict(arch.generation())
    ctx = Context(cache_dir=arch.work, device="cuda", settings={"generation": gen, "batch_size": 10})
    prompts = reg.get("prompt_set", "tiny-vm")().prompts(None)[:3]
    per = []
    for i, p in enumerate(prompts):
        lat = model.initial_latents(list(range(10)), gen["height"], gen["width"])
        cond = Conditioning(model.encode_prompt(p.text), model.empty_embedding(), text=p.text)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = wen.condition(model, p, cond, lat, ctx)
        torch.cuda.synchronize()
        per.append({"prompt_id": p.id, "seconds": time.perf_counter() - t, "warm_up": i == 0,
                    "trace": {k: v for k, v in (out.trace or {}).items() if not isinstance(v, (list, dict))}})
    timed = [x["seconds"] for x in per if not x["warm_up"]]
    return {"per_prompt": per, "median_s_per_prompt": sorted(timed)[len(timed) // 2], "G": 10,
            "params": wen.identity()["params"]}


def _advft(args, work: Path) -> dict:
    import torch

    from memobench.config import RunConfig
    from memobench.runner import Runner

    params = {"epochs": 1, "steps_per_epoch": 2, "dori_steps": 2, "n_regular": 8, "surrogate_tries": 1,
              "inits": "prompt", "surrogate_params": "stats_limit=8"}
    cfg = RunConfig(model="sd-random", model_params={"arch": "sd14"}, mitigation="advft", mitigation_params=params,
                    attack="none", metrics=[], seeds=[0], limit=1, num_inference_steps=2, device="cuda",
                    dtype=args.dtype, cache_dir=str(work / "advft-cache"), output_dir=str(work / "advft-out"))
    torch.cuda.reset_peak_memory_stats()
    out = Runner(cfg, progress=False).run()
    return {"errors": out.errors, "timing": out.result["timing"], "params": params, "dtype": args.dtype,
            "peak_gpu_mem_gib_fit": torch.cuda.max_memory_allocated() / 2**30,
            "report": out.result["mitigation"].get("report", {})}


def _cli(args, work: Path) -> dict:
    cmd = [sys.executable, "-m", "memobench", "run", "--model", "sd-random", "--model-param", "arch=sd14",
           "--mitigation", "nemo", "--attack", "dori", "--mitigation-param", "stats_limit=20", "--height", "512",
           "--width", "512", "--steps", "2", "--seeds", "0", "--limit", "1", "--device", "cuda", "--dtype", args.dtype,
           "--metric", "mr", "--metric", "sscd_orig", "--cache-dir", str(work / "cli-cache"), "--output-dir",
           str(work / "cli-out"), "--no-progress", "--json"]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.cli_timeout)
    out = {"command": " ".join(cmd[1:]), "exit_code": p.returncode, "wall_s": time.perf_counter() - t,
           "stderr_tail": p.stderr[-2000:]}
    if p.returncode == 0:
        res = json.loads(p.stdout)
        out.update(timing=res["timing"], metrics={k: v.get("value") for k, v in res["metrics"].items()},
                   sscd_impl=res["metrics"].get("sscd_orig", {}).get("impl"))
    return out


def _write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else \
        HERE / "measurements" / "gpu_check.json"
    ap.add_argument("--out", type=Path, default=default_out)
    ap.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    ap.add_argument("--steps", type=int, default=20, help="denoising steps of part 1")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cli-timeout", type=int, default=180)
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("error: benchmarks/gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="memobench-gpu-check-"))
    os.environ.setdefault("MEMOBENCH_CACHE_DIR", str(work / "memobench-cache"))
    from memobench.model import quiet_libraries

    quiet_libraries()
    report = {"benchmark": "memobench gpu_check (issue 25)", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "environment": {"python": platform.python_version(), "torch": torch.__version__,
                              "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0),
                              "gpu_mem_gib": torch.cuda.get_device_properties(0).total_memory / 2**30},
              "model": "sd-random arch=sd14 size=full (SD v1.4 architecture, random weights)", "dtype": args.dtype,
              "parts": {}}
    t = time.perf_counter()
    _parts(args, work, report)
    report["total_wall_s"] = time.perf_counter() - t
    _write(args.out, report)
    failed = [k for k, v in report["parts"].items() if "error" in v]
    print(f"[gpu_check] done in {report['total_wall_s']:.0f} s; report {args.out}; failed parts: {failed or 'none'}",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
