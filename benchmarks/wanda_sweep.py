"""Why Wanda misses issue 5/6's bound on the embedded model: MR and utility as the pruned share grows.

    python benchmarks/wanda_sweep.py [--ratios 0.01,0.1,0.3,0.5] [--cache-dir DIR] [--out benchmarks/reports/wanda_sweep]

Runs ``memobench run --mitigation wanda --mitigation-param skill_ratio=ρ --attack none`` on the model's memorized
(VM) targets for each ρ (ρ = 0.01 is ConceptPrune's default, 0.1 DoRI's "Wanda 10 %"; larger values are outside the
method's published range and are here only to locate where, if anywhere, pruning the FFN subspace removes the
replication). Reports per ρ: MR, SSCD_orig, the share of ``ff.net.2`` weights pruned (union mask, per layer),
exact alignment and FD on SSCD features, each relative to ``none``. Writes JSON + Markdown; prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from memobench.cache import atomic_write_text
from memobench.config import RunConfig, parse_kv
from memobench.runner import Runner

UTILITY = ("tiny_alignment", "fd_sscd")


def _val(rec):
    return None if not rec or rec.get("unavailable") else rec.get("value")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--model-param", action="append", help="KEY=VALUE for the model plugin (e.g. path=DIR)")
    ap.add_argument("--ratios", default="0.01,0.1,0.3,0.5")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--results-dir", default="results/wanda_sweep")
    ap.add_argument("--out", default="benchmarks/reports/wanda_sweep")
    a = ap.parse_args(argv)
    ratios = [float(x) for x in a.ratios.split(",") if x.strip()]
    if not ratios or min(ratios) <= 0 or max(ratios) > 1:
        raise SystemExit(f"error: --ratios: values in (0, 1], got {a.ratios!r}")
    t0 = time.time()
    rows = []
    for mit, params in [("none", {})] + [("wanda", {"skill_ratio": r}) for r in ratios]:
        print(f"[wanda_sweep] {mit} {params or ''}", file=sys.stderr, flush=True)
        cfg = RunConfig(model=a.model, model_params=parse_kv(a.model_param, "--model-param"), mitigation=mit, mitigation_params=params, attack="none",
                        metrics=["mr", "sscd_orig", "tiny_alignment", "fidelity"], output_dir=a.results_dir,
                        metric_params={"fidelity": {"feature_extractor": "sscd"}},  # FD on SSCD features
                        cache_dir=a.cache_dir, offline=True)
        t = time.time()
        out = Runner(cfg).run()
        r = out.result
        rep = (r.get("mitigation") or {}).get("report") or {}
        rows.append({"mitigation": mit, "skill_ratio": params.get("skill_ratio"), "mr": _val(r["metrics"].get("mr")),
                     "sscd_orig": _val(r["metrics"].get("sscd_orig")),
                     "utility": {u: _val(r["metrics"].get(u)) for u in UTILITY if u in r["metrics"]},
                     "pruned_fraction": rep.get("pruned_fraction"),
                     "per_layer": {k: v.get("density") for k, v in (rep.get("per_layer") or {}).items()},
                     "result": str(out.result_path), "seconds": time.time() - t})
    base = rows[0]["utility"]
    for x in rows:
        x["utility_rel_to_none"] = {k: (v / base[k] if base.get(k) and v is not None else None)
                                    for k, v in x["utility"].items()}
    doc = {"model": a.model, "rows": rows, "wall_seconds": time.time() - t0}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=1, default=str))
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    layers = list(rows[1]["per_layer"]) if len(rows) > 1 else []
    md = [f"Wanda (ConceptPrune) sweep of the pruned share ρ on `{a.model}`'s VM targets, no attack "
          f"({doc['wall_seconds']:.0f} s; `python benchmarks/wanda_sweep.py`). MR τ = 0.7 (prompt mean of 10 seeds); "
          "utility relative to `none` in brackets; pruned = share of all `ff.net.2` weights in the union mask.", "",
          "| mitigation | ρ | MR | SSCD_orig | pruned | " + " | ".join(f"{u} (× none)" for u in UTILITY)
          + " | " + " | ".join(f"`{n}` pruned" for n in layers) + " |",
          "|---|---|---|---|---|" + "---|" * (len(UTILITY) + len(layers))]
    for x in rows:
        util = " | ".join(f"{f(x['utility'].get(u))} ({f(x['utility_rel_to_none'].get(u))})" for u in UTILITY)
        dens = " | ".join(f(x["per_layer"].get(n)) for n in layers)
        md.append(f"| {x['mitigation']} | {x['skill_ratio'] if x['skill_ratio'] is not None else '–'} | "
                  f"{f(x['mr'])} | {f(x['sscd_orig'])} | {f(x['pruned_fraction'])} | {util} | {dens} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
