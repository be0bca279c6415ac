"""The detection track of the leaderboard: ``detection.html`` and ``DETECTION.md`` from the result JSONs that
``memobench detect`` writes under ``<results>/<model>/detect/<run_id>.json``.

Per model the latest detection result (by its ``created_at``, then by path) gives one table: each detector with AUC,
ACC, TPR@1%FPR, TPR@3%FPR (FPR strictly below the level, METHODS §6.3), seconds per prompt and the number of
memorized / non-memorized prompts. The values are read from the JSON files only (the core imports no plugin): a
result written before TPR@3%FPR was recorded gets it from its stored ROC points, by the same rule; older results
named the seconds per prompt ``seconds_per_prompt_uncached``. Every table links to a ``runs/`` copy of its result
(local paths redacted, strict JSON, as :func:`.load.clean_result` makes the other copies). Every string of a result
reaches the page through the autoescaping templates (``templates/detection.html``) and the Markdown through
:mod:`.export`'s cell escaping.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import BadInput
from .export import _md
from .load import clean_result

PAGE = "detection.html"
MARKDOWN = "DETECTION.md"
FPR_3 = 0.03
NONE = "No `memobench detect` result in this results folder (`<results>/<model>/detect/<run_id>.json`)."


@dataclass
class DetectResult:
    rel: str  # path relative to the results folder
    data: dict
    copy: bytes  # the runs/ copy


def is_detect_path(rel: str) -> bool:
    """Whether a results-relative path is a detection result (``<model>/detect/<file>.json``)."""
    parts = Path(rel).parts
    return len(parts) == 3 and parts[1] == "detect" and parts[2].endswith(".json")


def load_detect_results(results_dir: str | Path) -> list[DetectResult]:
    """Every detection result under ``results_dir`` (sorted by path); a file there that is not one is an error."""
    root = Path(results_dir)
    out = []
    for p in sorted(root.glob("*/detect/*.json"), key=lambda q: q.relative_to(root).as_posix()):
        rel = p.relative_to(root).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts) or not p.is_file():
            continue
        try:
            raw = p.read_bytes()
            data = json.loads(raw)
        except (OSError, ValueError) as e:
            raise BadInput(f"--results: cannot read {p} ({e}); fix or remove that file") from None
        if not isinstance(data, dict) or data.get("kind") != "detection" or not isinstance(data.get("detectors"),
                                                                                        dict):
            raise BadInput(f"--results: {p} is not a `memobench detect` result (kind 'detection' with detectors); "
                           f"move it out of {root}")
        clean, copy = clean_result(raw, data)
        out.append(DetectResult(rel, clean, copy))
    return out


def _model(r: DetectResult) -> str:
    m = r.data.get("model") or {}
    return str((m.get("plugin") or {}).get("name") or Path(r.rel).parts[0])


def latest_per_model(results: list[DetectResult]) -> dict[str, DetectResult]:
    """The latest result of each model (``created_at``, then path)."""
    best: dict[str, DetectResult] = {}
    for r in sorted(results, key=lambda r: (str(r.data.get("created_at") or ""), r.rel)):
        best[_model(r)] = r
    return dict(sorted(best.items()))


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def tpr_at_3fpr(metrics: dict) -> float | None:
    """The recorded TPR@3%FPR, else max{TPR_k : FPR_k < 3 %} over the stored ROC points (None without them)."""
    v = _num(metrics.get("tpr_at_3fpr"))
    if v is not None:
        return v
    roc = metrics.get("roc") or {}
    pts = [(_num(f), _num(t)) for f, t in zip(roc.get("fpr") or [], roc.get("tpr") or [])]
    ok = [t for f, t in pts if f is not None and t is not None and f < FPR_3]
    return max(ok) if ok else None


def _fmt(v: float | None, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def detector_rows(r: DetectResult) -> list[dict]:
    """One row per detector of a result, best AUC first (ties by name)."""
    rows = []
    for name, d in (r.data.get("detectors") or {}).items():
        if not isinstance(d, dict):
            continue
        m = d.get("metrics") or {}
        vals = {"auc": _num(m.get("auc")), "acc": _num(m.get("acc")), "tpr1": _num(m.get("tpr_at_fpr")),
                "tpr3": tpr_at_3fpr(m),
                "sec": _num(d.get("seconds_per_prompt", d.get("seconds_per_prompt_uncached")))}
        params = (d.get("identity") or {}).get("params") or {}
        rows.append({"name": str(name), "statistic": str(d.get("statistic") or ""),
                     "params": ", ".join(f"{k}={v}" for k, v in sorted(params.items())),
                     "n": f"{m.get('n_pos', '?')} / {m.get('n_neg', '?')}",
                     **{k: _fmt(v, 2 if k == "sec" else 3) for k, v in vals.items()}, "_auc": vals["auc"]})
    rows.sort(key=lambda x: (-(x["_auc"] if x["_auc"] is not None else -1.0), x["name"]))
    return rows


def _section(model: str, r: DetectResult) -> dict:
    d = r.data
    pos, neg = d.get("memorized") or {}, d.get("nonmemorized") or {}
    return {"model": model, "rows": detector_rows(r), "run": str(d.get("run_id") or Path(r.rel).stem),
            "href": "runs/" + r.rel, "status": str(d.get("status") or ""),
            "sets": f"{pos.get('name')} ({pos.get('n')} memorized) vs {neg.get('name')} ({neg.get('n')} non-memorized)",
            "created": str(d.get("created_at") or ""), "version": str(d.get("memobench_version") or "")}


def markdown(sections: list[dict]) -> str:
    lines = ["# memobench leaderboard — detection track", "",
             "Per model, the latest `memobench detect` result: memorized vs non-memorized prompts, higher score = more "
             "likely memorized. TPR@k%FPR: the largest TPR at an FPR strictly below k %. s/prompt: mean seconds to "
             "score one prompt.", ""]
    if not sections:
        lines += [NONE, ""]
    for s in sections:
        lines += [f"## {_md(s['model'])}", "",
                  f"{_md(s['sets'])}; run {_md(s['run'])} ({_md(s['status'])}), {_md(s['created'])}, memobench "
                  f"{_md(s['version'])}; [result]({s['href']})", "",
                  "| detector | AUC | ACC | TPR@1%FPR | TPR@3%FPR | s/prompt | n pos / n neg |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {_md(w['name'])} | {w['auc']} | {w['acc']} | {w['tpr1']} | {w['tpr3']} | {w['sec']} | "
                  f"{w['n']} |" for w in s["rows"]]
        lines.append("")
    return "\n".join(lines)


def detection_files(results_dir: str | Path) -> dict[str, bytes]:
    """``detection.html``, ``DETECTION.md`` and the ``runs/`` copies of the results they show (the pages say so
    when the results folder holds no detection result: ``index.html`` always links the page)."""
    from .html import env, q

    results = load_detect_results(results_dir)
    latest = latest_per_model(results)
    sections = [_section(model, r) for model, r in latest.items()]
    html = env().get_template("detection.html").render(
        title="memobench leaderboard — detection track", sections=[{**s, "href": q(s["href"])} for s in sections],
        empty_text=NONE)
    files = {PAGE: html.encode(), MARKDOWN: markdown(sections).encode()}
    files.update({f"runs/{r.rel}": r.copy for r in latest.values()})
    return files
