"""The embedded model's acceptance figures (issue 3, points 1-3; issue 4, point 5), by one command.

    python benchmarks/tiny_model_checks.py [--model-param path=DIR] [--out benchmarks/reports/tiny_model_checks]

1. memorized (VM) prompts × 10 seeds, default sampler: MR (SSCD to the training image > 0.7, offline SSCD);
2. non-memorized prompts (photo-style captions never trained on + held-out general captions): MR and mean of the
   per-image max-SSCD to any memorized training image;
3. held-out general captions: exact alignment (the tiny checker), and the checker's gap between each image's own
   caption and a shuffled caption (another held-out caption, fixed derangement) — the checker must separate them;
   the same gap on the captions' ground-truth renderings (the prompt set's first reference image) is the largest
   gap a perfect generator could reach with this checker and derangement.
Writes JSON + Markdown and prints them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from memobench.cache import ImageCache, atomic_write_text, default_cache_dir
from memobench.config import RunConfig
from memobench.runner import Runner


def _kv(items):
    return dict(x.split("=", 1) for x in items or [])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-param", action="append", help="KEY=VALUE for the tiny model plugin (e.g. path=DIR)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--results-dir", default="results/tiny_model_checks")
    ap.add_argument("--out", default="benchmarks/reports/tiny_model_checks")
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (sampling; SSCD follows memobench's choice)")
    a = ap.parse_args(argv)
    mp = _kv(a.model_param)
    t0 = time.time()
    common = dict(model="tiny", model_params=mp, output_dir=a.results_dir, cache_dir=a.cache_dir, offline=True,
                  num_inference_steps=a.steps, device=a.device)
    t = time.time()
    vm = Runner(RunConfig(**common, metrics=["mr", "sscd_orig", "tiny_alignment"])).run()
    t_vm = time.time() - t
    t = time.time()
    nm = Runner(RunConfig(**common, prompts="tiny-nonmem", metrics=["mr", "sscd_orig"])).run()
    t_nm = time.time() - t
    r1, r2 = vm.result, nm.result

    # checker gap: own caption vs a shuffled (deranged) held-out caption, on the same generated images
    from memobench_plugins.tiny import checker

    rows = [json.loads(x) for x in Path(vm.samples_path).read_text().splitlines()]
    util = sorted((x for x in rows if x["role"] == "utility"), key=lambda x: (x["prompt_id"], x["seed"]))
    cache_dir = Path(a.cache_dir) if a.cache_dir else default_cache_dir()
    cache = ImageCache(cache_dir)
    caps = [x["prompt"] for x in util]
    own, shuf, own_all, shuf_all, gt_own, gt_shuf = [], [], [], [], [], []
    full = lambda sc: float(all(v == 1.0 for k, v in sc.items() if k != "overall" and v is not None))  # noqa: E731
    from memobench.api import Context

    ctx = Context(cache_dir=cache_dir, seeds=(0,))
    heldout = ctx.plugin("prompt_set", "tiny-heldout")  # the tiny model's utility set (TinyModel.prompt_sets)
    by_text = {q.text: q for q in heldout.prompts(ctx)}
    for i, x in enumerate(util):
        img = cache.get(x["sample_key"])
        other = caps[(i + len(caps) // 2) % len(caps)]
        if other == x["prompt"]:
            other = caps[(i + 1) % len(caps)]
        so, ss = checker.score(img, x["prompt"]), checker.score(img, other)
        own.append(so["overall"]); shuf.append(ss["overall"])
        own_all.append(full(so)); shuf_all.append(full(ss))
        q = by_text[x["prompt"]]
        gt = heldout.reference_image(q, q.reference_ids[0], ctx)
        gt_own.append(checker.score(gt, x["prompt"])["overall"]); gt_shuf.append(checker.score(gt, other)["overall"])
    g = lambda rec, k: (rec.get("groups") or {}).get(k, {}).get("value")  # noqa: E731
    doc = {
        "vm": {"mr": r1["metrics"]["mr"]["value"], "sscd_orig": r1["metrics"]["sscd_orig"]["value"],
               "sscd_orig_dispersion": r1["metrics"]["sscd_orig"].get("dispersion"),
               "per_prompt_mr": r1["metrics"]["mr"].get("extra", {}).get("per_prompt"),
               "n_prompts": r1["prompt_set"]["n_effective"], "seeds": r1["seeds"]["target"],
               "result": str(vm.result_path), "grid": str(vm.grid_path), "seconds": t_vm},
        "nonmem": {"mr": r2["metrics"]["mr"]["value"], "mean_max_sscd": r2["metrics"]["sscd_orig"]["value"],
                   "mr_by_group": {k: g(r2["metrics"]["mr"], k) for k in ("NONMEM", "GENERAL")},
                   "mean_max_sscd_by_group": {k: g(r2["metrics"]["sscd_orig"], k) for k in ("NONMEM", "GENERAL")},
                   "result": str(nm.result_path), "seconds": t_nm},
        "alignment": {"tiny_alignment": r1["metrics"]["tiny_alignment"]["value"],
                      "by_category": r1["metrics"]["tiny_alignment"].get("groups"),
                      "own_caption_mean": float(np.mean(own)) if own else None,
                      "shuffled_caption_mean": float(np.mean(shuf)) if shuf else None,
                      "gap": float(np.mean(own) - np.mean(shuf)) if own else None, "n": len(own),
                      # accuracy as "the image matches the caption in every category" (binary per image)
                      "own_all_correct": float(np.mean(own_all)) if own else None,
                      "shuffled_all_correct": float(np.mean(shuf_all)) if own else None,
                      "gap_all_correct": float(np.mean(own_all) - np.mean(shuf_all)) if own else None,
                      # the same derangement on the ground-truth renderings: the checker's ceiling for the gap
                      "ground_truth_own_mean": float(np.mean(gt_own)) if gt_own else None,
                      "ground_truth_shuffled_mean": float(np.mean(gt_shuf)) if gt_own else None,
                      "ground_truth_gap": float(np.mean(gt_own) - np.mean(gt_shuf)) if gt_own else None},
        "generation": r1["generation"], "sscd_impl": r1["metrics"]["sscd_orig"].get("impl"),
        "model": r1["model"], "wall_seconds": time.time() - t0,
    }
    doc["bounds"] = {"vm_mr>=0.9": doc["vm"]["mr"] >= 0.9, "nonmem_mr<=0.05": doc["nonmem"]["mr"] <= 0.05,
                     "nonmem_mean_max_sscd<=0.3": doc["nonmem"]["mean_max_sscd"] <= 0.3,
                     "alignment>=0.6": doc["alignment"]["tiny_alignment"] >= 0.6,
                     "checker_gap>=0.4": (doc["alignment"]["gap"] or 0) >= 0.4,
                     "checker_gap_all_correct>=0.4": (doc["alignment"]["gap_all_correct"] or 0) >= 0.4}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=1, default=str))
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    md = [f"Embedded model checks (sampler: {doc['generation']['num_inference_steps']} DDIM steps, guidance "
          f"{doc['generation']['guidance_scale']}; seeds {doc['vm']['seeds']}; offline SSCD; {doc['wall_seconds']:.0f} s)",
          "", "| figure | value | bound | met |", "|---|---|---|---|",
          f"| VM MR | {f(doc['vm']['mr'])} | ≥ 0.9 | {doc['bounds']['vm_mr>=0.9']} |",
          f"| VM SSCD_orig | {f(doc['vm']['sscd_orig'])} | | |",
          f"| non-memorized MR | {f(doc['nonmem']['mr'])} | ≤ 0.05 | {doc['bounds']['nonmem_mr<=0.05']} |",
          f"| non-memorized mean max-SSCD to any memorized image | {f(doc['nonmem']['mean_max_sscd'])} | ≤ 0.3 | "
          f"{doc['bounds']['nonmem_mean_max_sscd<=0.3']} |",
          f"| exact alignment, held-out captions | {f(doc['alignment']['tiny_alignment'])} | ≥ 0.6 | "
          f"{doc['bounds']['alignment>=0.6']} |",
          f"| checker, mean category score: own − shuffled caption | {f(doc['alignment']['own_caption_mean'])} − "
          f"{f(doc['alignment']['shuffled_caption_mean'])} = {f(doc['alignment']['gap'])} | ≥ 0.4 | "
          f"{doc['bounds']['checker_gap>=0.4']} |",
          f"| checker, all-categories-correct accuracy: own − shuffled caption | "
          f"{f(doc['alignment']['own_all_correct'])} − {f(doc['alignment']['shuffled_all_correct'])} = "
          f"{f(doc['alignment']['gap_all_correct'])} | ≥ 0.4 | {doc['bounds']['checker_gap_all_correct>=0.4']} |",
          f"| checker on the captions' ground-truth renderings (ceiling of the gap): own − shuffled caption | "
          f"{f(doc['alignment']['ground_truth_own_mean'])} − {f(doc['alignment']['ground_truth_shuffled_mean'])} = "
          f"{f(doc['alignment']['ground_truth_gap'])} | | |"]
    atomic_write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
