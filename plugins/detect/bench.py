"""The detection benchmark behind ``memobench detect``: score a memorized and a non-memorized prompt set with one or
more detectors, evaluate (METHODS §6.3, :mod:`.roc`), store the calibrated thresholds per model identity, and write
a result JSON and a ROC figure.

Caches (under the memobench cache, written atomically, keyed like every plugin artifact by the model identity — the
sha256 of :meth:`memobench.model.DiffusionModel.identity`, as the runner computes ``ctx.model_id`` — and by the
detector's name, version and fully resolved parameters):

* ``artifacts/detect-<detector>/<key>.json`` with parts ``("score", prompt sha256)``: one prompt's score, so an
  interrupted or repeated benchmark only scores what is missing;
* the same folder with part ``("calibration",)``: the latest calibration of that detector on that model (sets, n,
  AUC, ACC, TPR@1%FPR, both thresholds with their TPR/FPR). ``memobench explain`` reads it.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path
from typing import Any

from memobench.api import (
    BadInput, Detector, ModelSession, Prompt, atomic_write_bytes, atomic_write_text, get_registry, key_of, open_model,
    slug, write_result,
)

from .roc import detection_metrics, fixed_threshold_metrics

RESULT_SCHEMA = 1
Session = ModelSession  # a loaded model with its plugin and Context (memobench.api.open_model)


# ---------------------------------------------------------------------------------------------- session
def open_session(model: str = "tiny", model_params: dict | None = None, cache_dir: str | Path | None = None,
                 device: str = "cpu", offline: bool = False, registry=None) -> Session:
    """Instantiate and load a model plugin (the same way ``memobench run`` does)."""
    return open_model(model, model_params, registry=registry, cache_dir=cache_dir, device=device, offline=offline)


def detector_names(registry=None) -> list[str]:
    """The registered detectors (``register_detectors`` hook)."""
    return (registry or get_registry()).names("detector")


def make_detector(name: str, params: dict | None, generation: dict | None = None, registry=None) -> Detector:
    """Build (and validate) a registered detector; with ``generation`` (the model's defaults) also resolve it. Cheap:
    call it before loading a model so that bad parameters fail fast."""
    try:
        cls = (registry or get_registry()).get("detector", name)
    except KeyError as e:  # UnknownPluginError: lists the registered detectors
        raise BadInput(f"--detector: {e}") from None
    try:
        det = cls(cls.make_params(params or {}))
        return det if generation is None else det.resolved(generation)
    except (TypeError, ValueError) as e:
        raise BadInput(str(e).splitlines()[0]) from None


def split_detector_params(pairs: dict, names: list[str]) -> dict[str, dict]:
    """``{"key": v, "wen.key": v}`` → per-detector dicts: unprefixed keys go to every selected detector."""
    out: dict[str, dict] = {n: {} for n in names}
    for k, v in pairs.items():
        head, dot, rest = k.partition(".")
        if dot and head in detector_names():
            if head not in out:
                raise BadInput(f"--detector-param {k}: detector {head!r} is not selected (--detector)")
            out[head][rest] = v
        else:
            for n in names:
                out[n][k] = v
    return out


def check_prompt_source(registry, spec: str, what: str) -> None:
    """Fail fast (before a model loads) on an unknown prompt-set name or an unreadable prompt file."""
    if spec in registry.entries["prompt_set"]:
        return
    from memobench.api import is_prompt_file, read_prompt_file

    if is_prompt_file(spec):
        read_prompt_file(spec, what)
        return
    try:
        registry.get("prompt_set", spec)
    except KeyError as e:
        raise BadInput(f"{what}: {e}") from None


def load_prompts(session: Session, spec: str, what: str) -> tuple[dict, list[Prompt], Any]:
    """A registered prompt-set name or a prompt file (.txt/.csv/.jsonl) → (description, prompts, prompt set)."""
    reg = session.registry
    check_prompt_source(reg, spec, what)
    if spec not in reg.entries["prompt_set"]:
        from memobench.api import register_prompt_file

        spec = register_prompt_file(reg, spec)
    ps = reg.get("prompt_set", spec)()
    prompts = ps.prompts(session.ctx)
    if not prompts:
        raise BadInput(f"{what}: prompt set {spec!r} is empty")
    desc = {**ps.identity(), "n": len(prompts), "content_sha256": key_of([p.text for p in prompts]),
            "source": ps.provenance()}
    return desc, prompts, ps


# ---------------------------------------------------------------------------------------------- scoring
def score_prompts(session: Session, det: Detector, prompts: list[Prompt], progress=None) -> list[dict]:
    """Each prompt's score (cached per prompt); returns one record per prompt, in order."""
    ctx = session.ctx
    out = []
    task = progress.task(f"{det.name}: score {len(prompts)} prompts", len(prompts)) if progress else None
    with (task if task is not None else _null_task()) as advance:
        for p in prompts:
            path = ctx.artifact_path(det.scoring(), "score", p.sha256, suffix=".json")
            rec = None
            if path.exists():
                try:
                    rec = json.loads(path.read_text())
                    float(rec["score"])
                except (OSError, ValueError, KeyError, TypeError):
                    rec = None  # unreadable entry: recompute and overwrite
            if rec is None:
                t = time.time()
                rec = {**det.score(session.model, p.text), "prompt": p.text, "seconds": round(time.time() - t, 4)}
                atomic_write_text(path, json.dumps(rec, sort_keys=True))
            out.append(rec)
            advance()
    return out


class _null_task:
    def __enter__(self):
        return lambda n=1, **kw: None

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------- calibration
def calibration_path(session: Session, det: Detector) -> Path:
    return session.ctx.artifact_path(det.scoring(), "calibration", suffix=".json")


def load_calibration(session: Session, det: Detector) -> dict | None:
    path = calibration_path(session, det)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def other_calibrations(session: Session, det: Detector) -> list[dict]:
    """Calibrations of the same detector on the same model with *other* parameters (e.g. other seeds)."""
    folder = calibration_path(session, det).parent
    found = []
    for f in sorted(folder.glob("*.json")):
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if d.get("kind") == "calibration" and d.get("model_key") == session.ctx.model_id:
            found.append(d)
    return found


# ---------------------------------------------------------------------------------------------- benchmark
def run_detect(session: Session, detectors: list[Detector], memorized: str, nonmemorized: str,
               output_dir: str | Path = "results", limit: int | None = None, progress=None) -> dict:
    """Score both sets with every detector, evaluate, store the calibrations; returns the result (with paths)."""
    from memobench.api import check_output_dir

    out_root = check_output_dir(output_dir)
    t0 = time.time()
    pos_desc, pos, _ = load_prompts(session, memorized, "--memorized")
    neg_desc, neg, _ = load_prompts(session, nonmemorized, "--nonmemorized")
    if limit:
        pos, neg = pos[:limit], neg[:limit]
    overlap = {p.text for p in pos} & {p.text for p in neg}
    if overlap:
        raise BadInput(f"--memorized and --nonmemorized share {len(overlap)} prompt(s), e.g. {sorted(overlap)[0]!r}")
    rows = [{"id": p.id, "text": p.text, "mem_type": p.mem_type, "label": lab, "scores": {}}
            for lab, ps in ((1, pos), (0, neg)) for p in ps]
    dets_out: dict[str, dict] = {}
    config = {"model": session.model_identity, "memorized": pos_desc, "nonmemorized": neg_desc, "limit": limit,
              "detectors": [d.identity() for d in detectors]}
    run_id = key_of(config)[:16]
    model_dir = out_root / slug(session.model_name) / "detect"
    result_path, roc_path = model_dir / f"{run_id}.json", model_dir / f"{run_id}.roc.png"
    for det in detectors:
        t = time.time()
        recs = score_prompts(session, det, pos + neg, progress)
        for row, rec in zip(rows, recs):
            row["scores"][det.name] = rec["score"]
        s_pos = [r["score"] for r in recs[: len(pos)]]
        s_neg = [r["score"] for r in recs[len(pos):]]
        metrics = detection_metrics(s_pos, s_neg)
        fixed = {k: fixed_threshold_metrics(s_pos, s_neg, v) for k, v in det.fixed_thresholds.items()}
        groups = {}
        for mt in sorted({p.mem_type for p in pos if p.mem_type}):
            sub = [r["score"] for r, p in zip(recs, pos) if p.mem_type == mt]
            if len(sub) < len(pos):
                g = detection_metrics(sub, s_neg)
                groups[mt] = {k: g[k] for k in ("auc", "acc", "tpr_at_fpr", "tpr_at_3fpr", "n_pos", "n_neg")}
        calib = {
            "kind": "calibration", "schema": RESULT_SCHEMA, "model_key": session.ctx.model_id,
            "model": session.model_identity, "detector": det.identity(),
            "memorized": {k: pos_desc[k] for k in ("name", "n", "content_sha256")},
            "nonmemorized": {k: neg_desc[k] for k in ("name", "n", "content_sha256")},
            "n_pos": metrics["n_pos"], "n_neg": metrics["n_neg"], "auc": metrics["auc"], "acc": metrics["acc"],
            "tpr_at_fpr": metrics["tpr_at_fpr"], "fpr_max": metrics["fpr_max"], "tpr_at_3fpr": metrics["tpr_at_3fpr"],
            "thresholds": metrics["thresholds"],
            "rule": metrics["rule"], "result": str(result_path), "limit": limit,
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        cpath = calibration_path(session, det)
        atomic_write_text(cpath, json.dumps(calib, indent=1, sort_keys=True))
        dets_out[det.name] = {"identity": det.identity(), "statistic": det.statistic, "metrics": metrics,
                              "fixed_thresholds": fixed, "groups": groups, "calibration_path": str(cpath),
                              "seconds": round(time.time() - t, 3),
                              # the mean over prompts of the seconds one score took when it was computed (cached
                              # records keep their own), i.e. the detector's cost per prompt, cache reads excluded
                              "seconds_per_prompt": _mean([r.get("seconds") for r in recs])}
    result = {
        "schema_version": RESULT_SCHEMA, "kind": "detection", "run_id": run_id,
        "status": "partial" if limit else "complete", "config_hash": key_of(config),
        "model": session.model_identity, "model_key": session.ctx.model_id,
        "memorized": pos_desc, "nonmemorized": neg_desc, "limit": limit, "detectors": dets_out,
        "prompts": rows, "timing": {"total_s": round(time.time() - t0, 3)},
        "paths": {"result": str(result_path), "roc": str(roc_path)},
    }
    write_roc_png(result, roc_path)
    # provenance (memobench_version, git commit, created_at) and the environment, with the evaluation's libraries
    return write_result(result_path, result, env_key="environment", env_extra=_eval_versions())


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _eval_versions() -> dict:
    from memobench.api import dist_version

    return {k: dist_version(k) for k in ("scikit-learn", "torchmetrics")}


def write_roc_png(result: dict, path: Path) -> None:
    """One row per detector: ROC curve (linear and log FPR) and the two score distributions with the thresholds."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    dets = result["detectors"]
    fig, axes = plt.subplots(len(dets), 2, figsize=(10, 4.2 * len(dets)), squeeze=False)
    title = (f"{result['model']['plugin']['name']}: {result['memorized']['name']} (n={len(_lab(result, 1))}) vs "
             f"{result['nonmemorized']['name']} (n={len(_lab(result, 0))})")
    for (name, d), (ax_roc, ax_h) in zip(dets.items(), axes):
        m = d["metrics"]
        fpr, tpr = np.asarray(m["roc"]["fpr"]), np.asarray(m["roc"]["tpr"])
        ax_roc.plot(fpr, tpr, lw=2, label=f"AUC {m['auc']:.3f}, ACC {m['acc']:.3f}, TPR@1%FPR {m['tpr_at_fpr']:.3f}, "
                                          f"TPR@3%FPR {m['tpr_at_3fpr']:.3f}")
        ax_roc.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
        ax_roc.axvline(m["fpr_max"], ls="--", c="tab:red", lw=1, label="FPR = 1 %")
        for rule, mk in (("acc", "o"), ("fpr", "s")):
            pt = m["thresholds"][rule]
            ax_roc.plot([pt["fpr"]], [pt["tpr"]], mk, ms=7, mfc="none", mew=2,
                        label=f"threshold ({rule}) = {_fmt(pt['threshold'])}")
        ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{name}: ROC", xlim=(0, 1),
                   ylim=(0, 1.02))
        ax_roc.legend(loc="lower right", fontsize=8)
        sp = [r["scores"][name] for r in _lab(result, 1)]
        sn = [r["scores"][name] for r in _lab(result, 0)]
        bins = np.histogram_bin_edges(np.r_[sp, sn], bins=30)
        ax_h.hist(sn, bins=bins, alpha=0.6, label=f"non-memorized ({len(sn)})", color="tab:blue")
        ax_h.hist(sp, bins=bins, alpha=0.6, label=f"memorized ({len(sp)})", color="tab:orange")
        for rule, ls in (("acc", "-"), ("fpr", "--")):
            t = m["thresholds"][rule]["threshold"]
            if t is not None:
                ax_h.axvline(t, c="k", ls=ls, lw=1, label=f"threshold ({rule})")
        ax_h.set(xlabel=f"score ({d['statistic'].split(' =')[0]})", ylabel="prompts", title=f"{name}: scores")
        ax_h.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _lab(result: dict, label: int) -> list[dict]:
    return [r for r in result["prompts"] if r["label"] == label]


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"
