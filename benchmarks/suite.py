"""memobench's own cost, measured side by side against the bare work in one run (issue 9): ratios and JSON.

(a) generation: ``Runner.run()`` (fresh cache and output dir per repetition, no metrics: plan, generate, PNG +
    sidecar writes, per-sample table, grid, result JSON) vs a bare diffusers loop —
    ``StableDiffusionPipeline.__call__`` per prompt and batch with one CPU ``torch.Generator().manual_seed(seed)``
    per image, DDIM, the same prompts, seeds, steps, guidance, size and batch composition, images kept in memory.
    Total and generation-only ratios (target ≤ 1.10).
(b) DoRI: ``DoRIAttack.run`` per target vs the same number of bare UNet forward+backward passes w.r.t. the
    embedding (same batch of (t, ε) draws, ``torch.autograd.grad``, no optimizer) (target ≤ 1.15).
(c) NeMo: localization time per prompt (``NeMo.localize``, paper defaults; activation statistics timed apart) and,
    as a ratio, against the bare UNet forward passes it makes (one on all G seeds, one per scored neuron set on the
    filtered seeds); the rest is NeMo's own MS-SSIM arithmetic.
(d) leaderboard: ``memobench.leaderboard.build`` over a results folder (skipped, with a message, when that module
    or the folder is absent).

Architectures: ``tiny`` (the embedded model shipped in plugins/tiny/weights) on CPU; ``sd14-random`` (SD v1.4's
full-size architecture with seeded random weights: the ``sd-random`` model plugin, ``arch=sd14``) where a
GPU is present (``--arch auto``, the default, adds it when ``torch.cuda.is_available()``), in ``--gpu-dtype``
(fp16 by default). Repetitions are interleaved (a/b, then b/a, …) after one untimed warm-up of each side; medians.

    python benchmarks/suite.py --out benchmarks/out/suite.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="auto", choices=("auto", "tiny", "sd14-random", "both"),
                    help="auto: tiny on CPU, plus sd14-random on the GPU when one is present")
    ap.add_argument("--only", default="a,b,c,d", help="comma list of the parts to run (a,b,c,d)")
    ap.add_argument("--prompts", type=int, default=2, help="(a) prompts (the first N of tiny-vm)")
    ap.add_argument("--seeds", type=int, default=4, help="(a) seeds 0..N-1 per prompt")
    ap.add_argument("--steps", type=int, default=10, help="(a) denoising steps")
    ap.add_argument("--batch-size", type=int, default=16, help="(a) images per UNet batch")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions of each side")
    ap.add_argument("--dori-steps", type=int, default=10, help="(b) DoRI optimisation steps per target")
    ap.add_argument("--dori-batch", type=int, default=8, help="(b) DoRI (t, ε) draws per step (paper: 8)")
    ap.add_argument("--nemo-prompts", type=int, default=2, help="(c) prompts localized")
    ap.add_argument("--nemo-stats-prompts", type=int, default=200, help="(c) non-memorized prompts for the stats")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="(d) result files")
    ap.add_argument("--gpu-dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="write the measurements as JSON here")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _timed(fn, device: str):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def _side_by_side(sides: dict, repeats: int, device: str, label: str) -> dict:
    """Warm each side up once, then ``repeats`` interleaved timings; returns per-side medians and the reps."""
    for fn in sides.values():
        fn()
    reps = []
    names = list(sides)
    for r in range(repeats):
        rec = {}
        for name in (names if r % 2 == 0 else names[::-1]):
            rec[name], extra = _timed(sides[name], device)
            if isinstance(extra, dict):
                rec[f"{name}_phases"] = extra
        reps.append(rec)
        print(f"  {label} repeat {r}: " + ", ".join(f"{n} {rec[n]:.3f} s" for n in names), file=sys.stderr)
    return {"median_s": {n: statistics.median(x[n] for x in reps) for n in names}, "repeats": reps}


def _paired(reps: list[dict], a: str, b: str) -> float:
    """Median over repetitions of a/b (robust to load that changes between repetitions on a shared machine)."""
    return statistics.median(x[a] / x[b] for x in reps)


# ---------------------------------------------------------------------------------------------- models
class _Arch:
    """A model for the parts: a pipeline folder (tiny) or the ``sd-random`` model plugin (sd14-random) + settings."""

    def __init__(self, name: str, device: str, dtype: str, work: Path):
        import torch

        self.name, self.device, self.dtype, self.work = name, device, dtype, work
        self.torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        self.plugin_name = "tiny" if name == "tiny" else "sd-random"
        self.model_params = {} if name == "tiny" else {"arch": "sd14"}
        self._model = None

    def pipe(self):
        """The bare diffusers pipeline: a fresh load of the folder (tiny) or a fresh build of SD v1.4's architecture
        from the same seed as the plugin's (sd14-random), in the arch's dtype."""
        import torch
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        if self.name == "tiny":
            from memobench_plugins.tiny import WEIGHTS

            pipe = StableDiffusionPipeline.from_pretrained(str(WEIGHTS), safety_checker=None, use_safetensors=True,
                                                           requires_safety_checker=False, torch_dtype=torch.float32)
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        else:
            from memobench_plugins.sd_random import build_pipeline

            pipe = build_pipeline("sd14", "full", 0, tokenizer_dir=self.work / "tokenizer", device=self.device)
            pipe.to(dtype=self.torch_dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device)

    def model(self):
        """The memobench model (built once per arch and reused by parts b and c)."""
        if self._model is not None:
            return self._model
        from memobench.model import DiffusionModel

        if self.name == "tiny":
            self._model = DiffusionModel(self.pipe(), model_id=self.name, revision="bench", device=self.device,
                                         dtype=self.torch_dtype)
        else:
            from memobench.api import Context
            from memobench_plugins.sd_random import SDRandom

            m = SDRandom(SDRandom.make_params(self.model_params)).load(Context(cache_dir=self.work, device=self.device))
            self._model = m.set_dtype(self.torch_dtype)
        return self._model

    def generation(self) -> dict:
        if self.name == "tiny":
            from memobench_plugins.tiny import TinyModel

            return dict(TinyModel.generation)
        from memobench_plugins.sd_random import SDRandom

        return dict(SDRandom.generation)

    def register(self) -> None:
        """Both archs are registered model plugins (``tiny``, ``sd-random``)."""


def _prompts(n: int) -> list:
    from memobench.registry import get_registry

    reg = get_registry()
    return reg.get("prompt_set", "tiny-vm")().prompts(None)[:n]


# ---------------------------------------------------------------------------------------------- (a)
def part_a(arch: _Arch, args, work: Path) -> dict:
    import numpy as np
    import torch

    from memobench.config import RunConfig
    from memobench.registry import get_registry
    from memobench.runner import Runner

    arch.register()
    reg = get_registry()
    gen = arch.generation()
    gen["num_inference_steps"] = args.steps
    seeds = list(range(args.seeds))
    prompts = _prompts(args.prompts)
    counter = iter(range(10**6))

    def run_memobench():
        i = next(counter)
        cfg = RunConfig(model=arch.plugin_name, model_params=dict(arch.model_params), metrics=[], seeds=seeds,
                        limit=len(prompts),
                        num_inference_steps=args.steps, guidance_scale=gen["guidance_scale"],
                        batch_size=args.batch_size, cache_dir=str(work / f"a-cache-{i}"),
                        output_dir=str(work / f"a-out-{i}"), device=arch.device,
                        dtype=arch.dtype if arch.name != "tiny" else None)
        out = Runner(cfg, registry=reg, progress=False).run()
        assert not out.errors, out.errors
        return {"load_s": out.result["timing"]["load_s"], "generate_s": out.result["timing"]["target_s"]}

    def run_bare():
        t = time.perf_counter()
        pipe = arch.pipe()
        t_load = time.perf_counter() - t
        images = []
        for p in prompts:
            for i in range(0, len(seeds), args.batch_size):
                chunk = seeds[i: i + args.batch_size]
                out = pipe(p.text, generator=[torch.Generator().manual_seed(s) for s in chunk],
                           num_images_per_prompt=len(chunk), num_inference_steps=args.steps,
                           guidance_scale=gen["guidance_scale"], height=gen["height"], width=gen["width"],
                           output_type="np").images
                images.extend((np.nan_to_num(out) * 255).round().astype(np.uint8))
        _sync(arch.device)
        assert len(images) == len(prompts) * len(seeds)
        return {"load_s": t_load, "generate_s": time.perf_counter() - t - t_load}

    res = _side_by_side({"memobench": run_memobench, "bare_diffusers": run_bare}, args.repeats, arch.device,
                        f"(a) {arch.name}")
    med = res["median_s"]
    gen_med = {n: statistics.median(x[f"{n}_phases"]["generate_s"] for x in res["repeats"]) for n in med}
    n_img = len(prompts) * len(seeds)
    return {**res, "images": n_img, "settings": {"prompts": len(prompts), "seeds": len(seeds), "steps": args.steps,
                                                  "batch_size": args.batch_size, **gen},
            "median_generate_s": gen_med,
            "images_per_s": {n: n_img / v for n, v in gen_med.items()},
            "ratio": med["memobench"] / med["bare_diffusers"],
            "ratio_generation_only": gen_med["memobench"] / gen_med["bare_diffusers"],
            "paired_ratio_median": _paired(res["repeats"], "memobench", "bare_diffusers"),
            "paired_ratio_generation_only_median": statistics.median(
                x["memobench_phases"]["generate_s"] / x["bare_diffusers_phases"]["generate_s"] for x in res["repeats"]),
            "target_ratio": 1.10}


# ---------------------------------------------------------------------------------------------- (b)
def part_b(arch: _Arch, args) -> dict:
    import torch
    import torch.nn.functional as F

    from memobench.model import frozen_parameters
    from memobench_plugins.dori import DoRIAttack, generator_seed

    model = arch.model()
    prompt = _prompts(1)[0]
    from memobench.registry import get_registry

    pset = get_registry().get("prompt_set", "tiny-vm")()
    ref = pset.reference_image(prompt, prompt.reference_ids[0], None)
    attack = DoRIAttack(DoRIAttack.Params(steps=args.dori_steps, batch=args.dori_batch))
    B, S = args.dori_batch, args.dori_steps
    z = model.encode_image(ref).float()
    e = model.encode_prompt(prompt.text).float()

    def dori():
        attack.run(model, prompt, ref, None)

    def bare():
        gen = torch.Generator().manual_seed(generator_seed(prompt.sha256, 0))
        y = e.clone().requires_grad_(True)
        zb = z.expand(B, -1, -1, -1)
        with frozen_parameters(model.unet), torch.enable_grad():
            for _ in range(S):
                t = torch.randint(0, 1000, (B,), generator=gen).to(model.device)
                eps = torch.randn((B, *z.shape[1:]), generator=gen).to(model.device)
                a = model.alphas_cumprod()[t].view(-1, 1, 1, 1)
                x = a.sqrt() * zb + (1 - a).sqrt() * eps
                pred = model.unet(x.to(model.dtype), t, encoder_hidden_states=y.to(model.dtype).expand(B, -1, -1),
                                  return_dict=False)[0]
                (g,) = torch.autograd.grad(F.mse_loss(pred.float(), model.target(zb, eps, t)), [y])

    res = _side_by_side({"dori": dori, "bare_unet_fwd_bwd": bare}, args.repeats, arch.device, f"(b) {arch.name}")
    med = res["median_s"]
    return {**res, "settings": {"steps": S, "batch": B, "dtype": arch.dtype},
            "per_target_s": med["dori"], "per_pass_s": med["bare_unet_fwd_bwd"] / max(S, 1),
            "ratio": med["dori"] / med["bare_unet_fwd_bwd"],
            "paired_ratio_median": _paired(res["repeats"], "dori", "bare_unet_fwd_bwd"), "target_ratio": 1.15}


# ---------------------------------------------------------------------------------------------- (c)
def part_c(arch: _Arch, args) -> dict:
    import torch

    from memobench.registry import get_registry
    from memobench_plugins.nemo import NeMo, activation_stats, value_layers

    model = arch.model()
    reg = get_registry()
    nonmem = [p.text for p in reg.get("prompt_set", "tiny-nonmem")().prompts(None)][: args.nemo_stats_prompts]
    nemo = NeMo()
    layers = value_layers(model.unet, nemo.params.blocks)
    t_stats, (means, stds) = _timed(lambda: activation_stats(model, layers, nonmem), arch.device)
    latents = nemo._latents(model)
    t = model.timesteps(nemo.params.num_inference_steps)[nemo.params.timestep_index]
    per = []
    prompts = _prompts(args.nemo_prompts)
    nemo.localize(model, prompts[0].text, layers, means, stds, latents, t)  # warm-up, untimed
    for p in prompts:
        dt, rec = _timed(lambda: nemo.localize(model, p.text, layers, means, stds, latents, t), arch.device)
        k = len(rec["seeds_K"])
        emb = model.encode_prompt(p.text)

        def passes():
            with torch.no_grad():
                model.eps(latents, t, emb.expand(latents.shape[0], -1, -1))
                for _ in range(rec.get("n_evaluations", 0)):
                    model.eps(latents[:k], t, emb.expand(k, -1, -1))

        bare, _ = _timed(passes, arch.device)
        per.append({"prompt_id": p.id, "seconds": dt, "memorized": rec["memorized"], "seeds_K": k,
                    "n_evaluations": rec.get("n_evaluations", 0), "bare_unet_passes_s": bare,
                    "ratio_to_unet_passes": dt / bare if bare else None,
                    "neurons": sum(len(s) for s in rec["refined"])})
        print(f"  (c) {arch.name} {p.id}: {dt:.3f} s ({per[-1]['n_evaluations']} scored sets, |K| = {k})",
              file=sys.stderr)
    secs = [x["seconds"] for x in per]
    return {"stats_s": t_stats, "stats_prompts": len(nonmem), "per_prompt": per,
            "median_s_per_prompt": statistics.median(secs),
            "ratio_to_unet_passes_median": statistics.median(x["ratio_to_unet_passes"] for x in per),
            "params": "NeMo paper defaults (samples_per_prompt 10, thresholds 0.428)"}


# ---------------------------------------------------------------------------------------------- (d)
def part_d(args, work: Path) -> dict:
    try:
        from memobench import leaderboard
    except ImportError as e:
        msg = f"skipped: memobench.leaderboard is not available ({e})"
        print(f"  (d) {msg}", file=sys.stderr)
        return {"skipped": msg}
    results = args.results
    if not results.is_dir() or not any(results.rglob("*.json")):
        # no committed results: the result file of part (a)'s first memobench run, if it ran
        results = next((p for p in sorted(work.glob("a-out-*")) if any(p.rglob("*.json"))), None)
        if results is None:
            msg = f"skipped: no result files under {args.results} (and part (a) did not run)"
            print(f"  (d) {msg}", file=sys.stderr)
            return {"skipped": msg}
    times, rep = [], None
    try:
        for i in range(args.repeats + 1):
            out = work / f"lb-{i}"
            dt, rep = _timed(lambda: leaderboard.build(results, out, cache_dir=work / "a-cache-0"), "cpu")
            if i:
                times.append(dt)
    except Exception as e:  # e.g. results the leaderboard refuses
        msg = f"skipped: leaderboard build failed on {results}: {type(e).__name__}: {e}"
        print(f"  (d) {msg}", file=sys.stderr)
        return {"skipped": msg}
    n = getattr(rep, "n_results", None)
    med = statistics.median(times)
    return {"median_s": med, "times_s": times, "n_results": n, "n_rows": getattr(rep, "n_rows", None),
            "s_per_result": med / n if n else None, "results": str(results)}


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="memobench-suite-"))
    os.environ.setdefault("MEMOBENCH_CACHE_DIR", str(work / "memobench-cache"))

    import torch

    from memobench.model import quiet_libraries

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    archs = []
    if args.arch in ("auto", "tiny", "both"):
        archs.append(_Arch("tiny", "cpu", "fp32", work))
    if args.arch in ("sd14-random", "both") or (args.arch == "auto" and cuda):
        if not cuda:
            print("sd14-random needs a GPU (torch.cuda.is_available() is False): not measured", file=sys.stderr)
        else:
            archs.append(_Arch("sd14-random", "cuda", args.gpu_dtype, work))
    only = {x.strip() for x in args.only.split(",")}
    out: dict = {"benchmark": "memobench suite (issue 9)", "parts": {},
                 "environment": {"python": platform.python_version(), "platform": platform.platform(),
                                 "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                                 "cpu_count": os.cpu_count(), "cuda": torch.version.cuda if cuda else None,
                                 "gpu": torch.cuda.get_device_name(0) if cuda else None,
                                 "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}}
    if not cuda:
        out["not_measured"] = "no GPU: the full-size SD v1.4 architecture (sd14-random) was not measured"
    for arch in archs:
        parts = out["parts"].setdefault(arch.name, {"device": arch.device, "dtype": arch.dtype})
        for key, fn in (("a_generation", lambda: part_a(arch, args, work)), ("b_dori", lambda: part_b(arch, args)),
                        ("c_nemo", lambda: part_c(arch, args))):
            if key[0] in only:
                t = time.perf_counter()
                parts[key] = fn()
                parts[key]["wall_s"] = time.perf_counter() - t
    if "d" in only:
        out["parts"]["d_leaderboard"] = part_d(args, work)
    print("\nsummary", file=sys.stderr)
    for name, parts in out["parts"].items():
        if name == "d_leaderboard":
            d = parts
            print("  (d) leaderboard build: " + (d["skipped"] if "skipped" in d else
                                                  f"{d['median_s']:.3f} s for {d['n_results']} result files"))
            continue
        if "a_generation" in parts:
            a = parts["a_generation"]
            print(f"  (a) {name}: memobench {a['median_s']['memobench']:.3f} s vs bare diffusers "
                  f"{a['median_s']['bare_diffusers']:.3f} s: ratio {a['ratio']:.3f}, "
                  f"paired {a['paired_ratio_median']:.3f} (generation only {a['ratio_generation_only']:.3f}, paired "
                  f"{a['paired_ratio_generation_only_median']:.3f}; images/s {a['images_per_s']['memobench']:.2f} vs "
                  f"{a['images_per_s']['bare_diffusers']:.2f}; target ≤ 1.10)")
        if "b_dori" in parts:
            b = parts["b_dori"]
            print(f"  (b) {name}: DoRI {b['per_target_s']:.3f} s per target ({b['settings']['steps']} steps × "
                  f"batch {b['settings']['batch']}) vs bare fwd+bwd {b['median_s']['bare_unet_fwd_bwd']:.3f} s: "
                  f"ratio {b['ratio']:.3f}, paired {b['paired_ratio_median']:.3f} (target ≤ 1.15)")
        if "c_nemo" in parts:
            c = parts["c_nemo"]
            print(f"  (c) {name}: NeMo localization {c['median_s_per_prompt']:.3f} s per prompt (median), "
                  f"{c['ratio_to_unet_passes_median']:.2f}× its bare UNet passes; statistics {c['stats_s']:.3f} s "
                  f"over {c['stats_prompts']} prompts")
    if "not_measured" in out:
        print(f"  {out['not_measured']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1, default=str))
        print(f"  JSON: {args.out}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
