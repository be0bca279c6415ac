"""How low can NeMo's blocked-vs-unblocked score go on a model? (METHODS §7.1.3–7.1.4)

    python benchmarks/nemo_score_floor.py [--model-param path=DIR] [--nemo-param small_latent=fewer_scales] [--seeds 2]
                                          [--out benchmarks/reports/nemo_score_floor]

NeMo stops its initial selection as soon as M(B) ≤ τ (0.428): M(B) is the max over the seed set K of the MS-SSIM
between each seed's second-step noise difference δ = ε̂(x_T, t_1, e_y) − x_T unblocked and with the neurons B
deactivated. If M(B) stays above τ even when B is *every* neuron of a layer group, no candidate set can meet the
criterion, and NeMo always ends at its fallback (the last candidate set, θ = 1.25 and k = 15 with the defaults, with
τ_ref = its score). This script blocks whole layer groups of NeMo's value layers (`down_blocks.0`, `down_blocks.1`, all
down blocks, the mid block, down + mid = all of NeMo's neurons) and reports, per VM prompt of the embedded model:

* ``pairwise_max`` and ``K``: NeMo's detection score and seed set (NeMo's defaults: seed 1, 10 latents);
* per group: ``M`` = M(B) on the seed set K (all 10 seeds when K is empty) and ``sscd`` = mean SSCD to the training
  photo of the images generated with the group blocked (the model's default sampler, seeds 0..N-1), ``mr`` = share of
  them above 0.7.

It uses the NeMo plugin's own functions and its default parameters (latents, timestep, τ, MS-SSIM settings), as
``benchmarks/nemo_score_distribution.py`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from memobench.api import Context
from memobench.cache import atomic_write_text, default_cache_dir
from memobench.config import BadInput, parse_kv
from memobench.registry import get_registry
from memobench.sscd import SSCD

GROUPS = {"down_blocks.0": ["down_blocks.0"], "down_blocks.1": ["down_blocks.1"], "down": ["down_blocks"],
          "mid": ["mid_block"], "down+mid (all NeMo neurons)": ["down_blocks", "mid_block"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-param", action="append", help="KEY=VALUE for the tiny model plugin (e.g. path=DIR)")
    ap.add_argument("--nemo-param", action="append",
                    help="KEY=VALUE overriding a NeMo default (e.g. small_latent=fewer_scales); recorded in the JSON")
    ap.add_argument("--seeds", type=int, default=2, help="generation seeds 0..N-1 per prompt and group")
    ap.add_argument("--out", default="benchmarks/reports/nemo_score_floor", help="writes OUT.json and OUT.md")
    a = ap.parse_args(argv)
    from memobench_plugins.nemo import (
        NeMo,
        block_neurons,
        max_pairwise_ms_ssim,
        ms_ssim,
        noise_differences,
        value_layers,
    )
    from memobench_plugins.tiny import data as D

    t0 = time.time()
    try:  # bad --model-param / --nemo-param values: one line naming the input, exit 2
        mp = parse_kv(a.model_param, "--model-param")
        np_ = parse_kv(a.nemo_param, "--nemo-param")
        nemo = NeMo(NeMo.make_params(np_))
        cls = get_registry().get("model", "tiny")
        model = cls(cls.make_params(mp)).load(Context(cache_dir=default_cache_dir(), offline=True, device="cpu"))
    except (BadInput, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sscd = SSCD(preset="dori2026", backend="auto", cache_dir=default_cache_dir(), offline=True)
    p = nemo.params
    layers = value_layers(model.unet, p.blocks)
    widths = [int(m.out_features) for _, m in layers]
    lat = nemo._latents(model)
    t = model.timesteps(p.num_inference_steps)[p.timestep_index]
    kw = {"kernel_size": p.msssim_kernel, "betas": p.msssim_betas, "small_latent": p.small_latent,
          "upsample_to": p.upsample_to}
    gen = {"num_inference_steps": cls.generation["num_inference_steps"],
           "guidance_scale": cls.generation["guidance_scale"]}
    neg, seeds = model.empty_embedding(), list(range(a.seeds))
    rows = {}
    for it in D.VM_ITEMS:
        e = model.encode_prompt(it.caption)
        d0 = noise_differences(model, e, lat, t, p.detect_guidance_scale)
        pm = max_pairwise_ms_ssim(d0, **kw)
        K = (pm > p.pairwise_threshold).nonzero().flatten().tolist()
        idx = K or list(range(len(lat)))
        ref = D.photo(it.key, model.resolution)
        row = {"pairwise_max": round(float(pm.max()), 3), "K": K, "groups": {}}
        base = sscd.similarity(model.generate(e, neg, seeds, **gen), [ref])[:, 0]
        row["unblocked"] = {"sscd": round(float(base.mean()), 3), "mr": float((base > 0.7).mean())}
        for g, prefixes in GROUPS.items():
            sets = [list(range(w)) if any(n.startswith(p) for p in prefixes) else [] for (n, _), w in zip(layers, widths)]
            with block_neurons(layers, sets, p.scaling_factor):
                db = noise_differences(model, e, lat[idx], t, p.detect_guidance_scale)
                s = sscd.similarity(model.generate(e, neg, seeds, **gen), [ref])[:, 0]
            row["groups"][g] = {"n_blocked": sum(map(len, sets)),
                                "M": round(float(ms_ssim(d0[idx], db, **kw).max()), 3),
                                "sscd": round(float(s.mean()), 3), "mr": float((s > 0.7).mean())}
        rows[it.key] = row
        print(it.key, json.dumps(row), flush=True)
    doc = {"model_params": mp, "nemo_params": np_, "seeds": seeds, "tau": p.initial_threshold, "layers": dict(zip([n for n, _ in layers], widths)),
           "prompts": rows, "wall_s": round(time.time() - t0, 1)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=1))
    lines = [(f"NeMo score floor on `tiny` {mp or '(shipped weights)'}{f', NeMo {np_}' if np_ else ''}: M(B) with whole layer groups blocked "
             f"(τ = {doc['tau']}), and mean SSCD / MR of the images generated with them blocked (seeds {seeds}); "
             f"{doc['wall_s']:.0f} s. `python benchmarks/nemo_score_floor.py`"), "",
             "| prompt | pairwise max (K) | unblocked SSCD | " + " | ".join(f"{g}: M / SSCD" for g in GROUPS) + " |",
             "|---" * (3 + len(GROUPS)) + "|"]
    for k, r in rows.items():
        lines.append(f"| {k} | {r['pairwise_max']:.3f} ({len(r['K'])}) | {r['unblocked']['sscd']:.3f} | "
                     + " | ".join(f"{r['groups'][g]['M']:.3f} / {r['groups'][g]['sscd']:.3f}" for g in GROUPS) + " |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
