"""Which memorized photo does each generation of a memorized prompt land on? (embedded model diagnosis)

    python benchmarks/vm_confusion.py RESULT.samples.jsonl [--cache-dir DIR] [--out PREFIX]

For every VM target generation in a run's samples file (e.g. the ``none__none`` run written by
``benchmarks/tiny_model_checks.py``), SSCD (offline, preset ``dori2026``) to all 8 VM training photos and the 2 TM
frames (variant 0); per prompt: the share of seeds whose nearest image is the prompt's own photo, the share that is
*another* memorized image, and the mean SSCD to the own photo. Separates two failure modes with different causes:
the caption picks the wrong photo (conditioning) vs the right photo rendered too coarsely (fidelity).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from memobench.cache import ImageCache, atomic_write_text, default_cache_dir
from memobench.sscd import SSCD


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("samples", help="a run's .samples.jsonl")
    ap.add_argument("--cache-dir", default=None, help="the image cache the run used (default: memobench's)")
    ap.add_argument("--out", default=None, help="output prefix (.json, .md); default: print only")
    a = ap.parse_args(argv)

    from memobench_plugins.tiny import data as D

    cache = ImageCache(Path(a.cache_dir) if a.cache_dir else default_cache_dir())
    if not Path(a.samples).is_file():
        raise SystemExit(f"error: samples file {a.samples} not found; pass a run's .samples.jsonl (results/<model>/...)")
    rows = [json.loads(x) for x in Path(a.samples).read_text().splitlines()]
    rows = [r for r in rows if r.get("role") == "target" and r.get("mem_type") == "VM"]
    if not rows:
        raise SystemExit(f"error: {a.samples} has no VM target samples; pass a run on the tiny-vm prompt set")
    items = D.VM_ITEMS + D.TM_ITEMS  # TM frames as references too: a generation may land on one of them
    keys = [it.key for it in items]
    by_caption = {it.caption: it.key for it in D.VM_ITEMS}
    foreign = sorted({r["prompt"] for r in rows} - set(by_caption))
    if foreign:
        raise SystemExit(f"error: {a.samples}: {foreign[0]!r} is not a tiny-vm prompt; pass a run of the tiny model")
    photos = [D.memorized_image(it, 0) for it in items]
    gens = [cache.get(r["sample_key"]) for r in rows]
    sim = SSCD("dori2026").similarity(gens, photos)  # (n_gen, 10)
    per: dict[str, list[tuple[str, float]]] = {}  # prompt key -> (nearest image key, SSCD to own photo) per seed
    for r, s in zip(rows, sim):
        k = by_caption[r["prompt"]]
        per.setdefault(k, []).append((keys[int(np.argmax(s))], float(s[keys.index(k)])))
    doc = {"samples": a.samples, "per_prompt": {}}
    for k in (k for k in by_caption.values() if k in per):
        others = [n for n, _ in per[k] if n != k]
        doc["per_prompt"][k] = {"n": len(per[k]), "nearest_own": (len(per[k]) - len(others)) / len(per[k]),
                                "nearest_other": len(others) / len(per[k]),
                                "others_drawn": {o: others.count(o) for o in sorted(set(others))},
                                "mean_sscd_own": float(np.mean([v for _, v in per[k]]))}
    tot = sum(v["n"] for v in doc["per_prompt"].values())
    doc["nearest_other_overall"] = sum(v["nearest_other"] * v["n"] for v in doc["per_prompt"].values()) / tot
    title = f"VM generations: nearest memorized image (8 VM photos, 2 TM frames; offline SSCD, dori2026) — {a.samples}"
    md = [title, "",
          "| prompt | n | nearest = own photo | nearest = another memorized image (which) | mean SSCD to own |",
          "|---|---|---|---|---|"]
    for k, v in doc["per_prompt"].items():
        which = ", ".join(f"{o} ×{c}" for o, c in v["others_drawn"].items())
        md.append(f"| {k} | {v['n']} | {v['nearest_own']:.2f} | {v['nearest_other']:.2f} ({which or '—'}) | "
                  f"{v['mean_sscd_own']:.3f} |")
    md.append("\nOverall share of VM generations nearest to another memorized image: "
              f"{doc['nearest_other_overall']:.3f}")
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=1))
        atomic_write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
