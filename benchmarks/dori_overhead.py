"""DoRI's wall time vs the bare UNet forward+backward passes it needs (issue 30, goal B: target ratio ≤ 1.10).

DoRI (Kowalczuk*, Hintersdorf*, Struppek* et al., "Finding DoRI", ICML 2026, arXiv 2507.16880, §3; memobench
METHODS §7.4) optimises the text embedding y with ``steps`` Adam steps, each one UNet forward+backward pass over a
batch of ``batch`` noised copies of the target's training latent. Its work is therefore ``steps`` passes of
(``Model.diffusion_loss`` + ``torch.autograd.grad`` w.r.t. y); everything else (VAE encoding of the reference, prompt
encoding, random draws, Adam, bookkeeping) is overhead. For each of the first ``--prompts`` prompts of ``tiny-vm``
(the embedded ``tiny`` model) with its reference image, this times:

(a) ``DoRIAttack(params).run(model, prompt, reference, ctx)`` (default parameters unless ``--steps``/``--batch``);
(b) the bare loop: the same number of steps × [``model.diffusion_loss(z, ε, t, y)`` + ``torch.autograd.grad(loss, y)``]
    with the same batch size and latent size (z = the reference's VAE latent, encoded beforehand), t and ε drawn
    beforehand from a seeded generator, the model's parameters frozen as DoRI freezes them.

Both run under the same mitigation context (``--mitigation``, default ``none``: fitted once on the prompts, then
``with mitigation.apply(model, prompt, ctx)`` around each timed call). After one untimed warm-up of each, the
repeats are interleaved (a, b, then b, a, …); the report gives the medians per prompt, the ratio of the summed
medians ``a/b`` and the paired per-repeat ratios, the torch thread count and y_adv's sha256 of every DoRI run (they
must agree across repeats). With a ratio above ``--target`` (or ``--profile``), one DoRI run is profiled with
cProfile and the functions with the largest own time outside the UNet are reported.

    OMP_NUM_THREADS=1 uv run python benchmarks/dori_overhead.py --out dori_overhead.json
    OMP_NUM_THREADS=1 uv run python benchmarks/dori_overhead.py --mitigation nemo --out dori_overhead_nemo.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=2, help="the first N prompts of tiny-vm (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions of each side (default 3)")
    ap.add_argument("--steps", type=int, default=None, help="DoRI steps (default: DoRI's, 50)")
    ap.add_argument("--batch", type=int, default=None, help="DoRI batch (default: DoRI's, 8)")
    ap.add_argument("--mitigation", default="none", help="mitigation to attack (fitted on the prompts; default none)")
    ap.add_argument("--mitigation-param", action="append", default=[], metavar="KEY=VALUE",
                    help="a mitigation parameter (repeatable)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--target", type=float, default=1.10, help="ratio above which DoRI is profiled (default 1.10)")
    ap.add_argument("--profile", action="store_true", help="profile one DoRI run whatever the ratio")
    ap.add_argument("--seed", type=int, default=0, help="seed of the bare loop's t and ε draws (default 0)")
    ap.add_argument("--out", type=Path, default=None, help="write the measurements as JSON here")
    a = ap.parse_args(argv)
    for name in ("prompts", "repeats"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be ≥ 1")
    for name in ("steps", "batch"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            ap.error(f"--{name} must be ≥ 1")
    for kv in a.mitigation_param:
        if "=" not in kv:
            ap.error(f"--mitigation-param {kv!r}: expected KEY=VALUE")
    return a


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _bare_draws(n_steps: int, batch: int, latent_shape, t_min: int, t_max: int, seed: int):
    """The bare loop's (t, ε) per step, drawn once beforehand from one seeded CPU generator."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(t_min, t_max + 1, (batch,), generator=gen),
             torch.randn((batch, *latent_shape), generator=gen, dtype=torch.float32)) for _ in range(n_steps)]


def bare_passes(model, z, y0, draws) -> float:
    """``len(draws)`` passes of diffusion_loss + autograd.grad w.r.t. y (no optimiser): the work DoRI cannot avoid.
    Returns the sum of the losses (so nothing is optimised away)."""
    import torch

    from memobench.api import frozen_parameters

    y = y0.clone().requires_grad_(True)
    zb = z.expand(draws[0][1].shape[0], -1, -1, -1)
    total = 0.0
    with frozen_parameters(model.unet, model.text_encoder, model.vae), torch.enable_grad():
        for t, eps in draws:
            loss = model.diffusion_loss(zb, eps, t, y)
            torch.autograd.grad(loss, [y])
            total += float(loss.detach())
    return total


def _profile_dori(attack, model, prompt, ref, ctx, mit_ctx, top: int = 20) -> dict:
    """cProfile one DoRI run: the total, the time inside the UNet (``UNet2DConditionModel.forward`` and autograd's
    backward, which ``torch.autograd.grad`` runs) and the top functions by own time."""
    prof = cProfile.Profile()
    with mit_ctx():
        prof.enable()
        attack.run(model, prompt, ref, ctx)
        prof.disable()
    st = pstats.Stats(prof)
    total = max(v[3] for v in st.stats.values())  # the outermost cumulative time
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({fn})", "calls": nc, "own_s": round(tt, 4),
                     "cumulative_s": round(ct, 4)})
    by_name = {r["function"]: r for r in rows}

    def cum(pred) -> float:
        return max((r["cumulative_s"] for k, r in by_name.items() if pred(k)), default=0.0)

    unet_fwd = cum(lambda k: "unet_2d_condition.py" in k and "(forward)" in k)
    grad = cum(lambda k: k.endswith("(grad)") and "__init__.py" in k)  # torch.autograd.grad
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    parts = {  # DoRI's own work besides the passes, cumulative seconds
        "encode_image (VAE, once)": cum(lambda k: "model.py" in k and "(encode_image)" in k),
        "encode_prompt (text encoder)": sum(r["cumulative_s"] for k, r in by_name.items()
                                            if "model.py" in k and "(encode_prompt)" in k),
        "Adam step": cum(lambda k: "adam.py" in k and "(step)" in k),
        "diffusion_loss outside the UNet forward": round(cum(lambda k: "model.py" in k and "(diffusion_loss)" in k)
                                                         - unet_fwd, 4),
    }
    return {"total_s": round(total, 4), "unet_forward_cumulative_s": unet_fwd,
            "autograd_grad_cumulative_s": grad,
            "outside_forward_and_grad_s": round(total - unet_fwd - grad, 4), "parts_s": parts,
            "top_own_time": sorted(rows, key=lambda r: -r["own_s"])[:top], "pstats": s.getvalue()}


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="memobench-dori-overhead-"))
    os.environ.setdefault("MEMOBENCH_CACHE_DIR", str(work / "memobench-cache"))

    import torch
    from memobench_plugins.dori import DoRIAttack

    import memobench
    from memobench.api import Context, generation_size
    from memobench.model import quiet_libraries
    from memobench.registry import get_registry

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    reg = get_registry()
    cls = reg.get("model", "tiny")
    plugin = cls(cls.make_params({}))
    ctx = Context(cache_dir=work / "cache", device="cpu", generation=dict(cls.generation), registry=reg,
                  model_prompt_sets=dict(cls.prompt_sets))
    nonmem = cls.prompt_sets.get("nonmem")
    if nonmem:  # as the runner does: e.g. NeMo's activation statistics
        ps_cls = reg.get("prompt_set", nonmem)
        ctx.nonmem_prompts = [p.text for p in ps_cls(ps_cls.make_params({})).prompts(ctx)]
        ctx.nonmem_prompt_set = nonmem
    t0 = time.perf_counter()
    model = plugin.load(ctx)
    load_s = time.perf_counter() - t0

    ps_cls = reg.get("prompt_set", "tiny-vm")
    pset = ps_cls(ps_cls.make_params({}))
    prompts = pset.prompts(ctx)[: args.prompts]
    refs = {}
    for p in prompts:
        imgs = [x for rid in p.reference_ids if (x := pset.reference_image(p, rid, ctx)) is not None]
        if not imgs:
            raise SystemExit(f"prompt {p.id} has no reference image")
        refs[p.id] = imgs[0]

    mparams = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.mitigation_param)}
    m_cls = reg.get("mitigation", args.mitigation)
    mitigation = m_cls(m_cls.make_params(mparams))
    t0 = time.perf_counter()
    mitigation.fit(model, prompts, ctx)
    fit_s = time.perf_counter() - t0

    a_params = {}
    if args.steps is not None:
        a_params["steps"] = args.steps
    if args.batch is not None:
        a_params["batch"] = args.batch
    attack = DoRIAttack(DoRIAttack.make_params(a_params))
    P = attack.params
    height, width = generation_size(model, ctx)

    per_prompt = []
    for p in prompts:
        ref = refs[p.id]

        def mit_ctx(p=p):
            return mitigation.apply(model, p, ctx)

        with torch.no_grad():
            z = model.encode_image(ref, height=height, width=width).float()
            y0 = model.encode_prompt(p.text).float()
        draws = _bare_draws(P.steps, P.batch, tuple(z.shape[1:]), P.t_min, P.t_max, args.seed)

        def run_a(p=p, ref=ref, mit_ctx=mit_ctx):
            with mit_ctx():
                t = time.perf_counter()
                out = attack.run(model, p, ref, ctx)
                return time.perf_counter() - t, out.trace["y_adv_sha256"], out.trace["final_loss"]

        def run_b(mit_ctx=mit_ctx, z=z, y0=y0, draws=draws):
            with mit_ctx():
                t = time.perf_counter()
                bare_passes(model, z, y0, draws)
                return time.perf_counter() - t

        run_a(), run_b()  # warm-up
        ta, tb, shas, finals = [], [], [], []
        for r in range(args.repeats):
            order = ("a", "b") if r % 2 == 0 else ("b", "a")
            for side in order:
                if side == "a":
                    dt, sha, fl = run_a()
                    ta.append(dt)
                    shas.append(sha)
                    finals.append(fl)
                else:
                    tb.append(run_b())
        row = {"prompt_id": p.id, "latent_shape": [P.batch, *z.shape[1:]], "dori_s": ta, "bare_s": tb,
               "dori_median_s": statistics.median(ta), "bare_median_s": statistics.median(tb),
               "ratio": statistics.median(ta) / statistics.median(tb),
               "paired_ratios": [a / b for a, b in zip(ta, tb)], "y_adv_sha256": sorted(set(shas)),
               "final_loss": sorted(set(finals)), "deterministic": len(set(shas)) == 1}
        per_prompt.append(row)
        print(f"{p.id}: DoRI {row['dori_median_s']:.3f} s, bare {row['bare_median_s']:.3f} s, "
              f"ratio {row['ratio']:.3f}, y_adv {row['y_adv_sha256'][0][:16]}", flush=True)

    sum_a = sum(r["dori_median_s"] for r in per_prompt)
    sum_b = sum(r["bare_median_s"] for r in per_prompt)
    ratio = sum_a / sum_b
    out = {
        "benchmark": "dori_overhead", "memobench_version": getattr(memobench, "__version__", None),
        "model": "tiny", "prompt_set": "tiny-vm", "mitigation": args.mitigation, "mitigation_params": mparams,
        "attack_params": {"steps": P.steps, "batch": P.batch, "lr": P.lr, "objective": P.objective},
        "passes_per_run": P.steps, "images_per_pass": P.batch, "generation_size": [height, width],
        "repeats": args.repeats, "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
        "python": sys.version.split()[0], "platform": platform.platform(), "processor": platform.processor(),
        "model_load_s": load_s, "mitigation_fit_s": fit_s, "per_prompt": per_prompt,
        "dori_median_sum_s": sum_a, "bare_median_sum_s": sum_b, "ratio": ratio, "target": args.target,
        "within_target": ratio <= args.target,
    }
    print(f"total: DoRI {sum_a:.3f} s, bare {sum_b:.3f} s, ratio {ratio:.3f} (target ≤ {args.target}), "
          f"threads {out['threads']}")
    if ratio > args.target or args.profile:
        p = prompts[0]
        prof = _profile_dori(attack, model, p, refs[p.id], ctx, lambda: mitigation.apply(model, p, ctx))
        out["profile"] = {k: v for k, v in prof.items() if k != "pstats"}
        print(prof["pstats"])
        print({k: v for k, v in prof.items() if k not in ("pstats", "top_own_time")})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
