"""The HTML pages, from the jinja2 templates in ``templates/`` with autoescape on: every string a plugin, a prompt
file or a result supplies reaches a page through a template variable and is escaped there. Only the SVG plots
(matplotlib's output, whose texts matplotlib escapes and whose titles :mod:`.plots` escapes) are passed as markup.

This module turns rows, columns and results into plain values (strings and numbers) for the templates: the index
(table, filters, plots, implementations) and one page per row (provenance, metrics, images, loss curves).
"""

from __future__ import annotations

import urllib.parse
from functools import lru_cache
from pathlib import Path
from typing import Any

from .images import Comparison
from .load import Result
from .plots import Curve
from .rows import Column, Row
from .values import (IMPL_NOTES, WIN_RATE, _disp, _higher, _impl_sig, _params, _seeds_text, arrow, fmt, fmt_disp, impl_details,
                     impl_summary, missing_text, nonfinite_of, value_of)

@lru_cache(maxsize=1)
def env():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def markup(svg: str) -> Any:
    """An SVG of :mod:`.plots` as markup (its strings are escaped already)."""
    from markupsafe import Markup

    return Markup(svg)


def q(rel: str) -> str:
    """A relative URL of a file of the site (``%``-quoted; the template escapes it as an attribute)."""
    return urllib.parse.quote(rel, safe="/._-~")


def value_cell(w: Row, c: Column) -> dict:
    rec = w.metrics.get(c.name)
    if rec is None:
        return {"kind": "none"}
    v = value_of(rec)
    if v is None:
        short, why = missing_text(rec)
        return {"kind": "missing", "short": short, "why": why, "nf": nonfinite_of(rec) is not None}
    d, kind = _disp(rec)
    flag = None
    if c.main_sig.get(w.model) != _impl_sig(rec):
        flag = "different implementation: " + impl_summary(rec)
    return {"kind": "value", "v": repr(v), "text": fmt(v), "disp": fmt_disp(d) if d is not None else None,
            "tip": f"n = {rec.get('n')}" + (f"; ± is the {kind}" if d is not None else ""), "flag": flag}


def source(w: Row) -> dict:
    return {"href": q(w.res.rel), "label": str(w.res.data.get("run_id") or Path(w.res.rel).stem),
            "paired": w.scoring == "paired"}


def _header(c: Column) -> dict:
    lines = [f"{c.display} ({c.name}): {'higher' if c.higher else 'lower'} is better"]
    if c.mixed:
        lines.append("MIXED implementations across rows (cells marked ≠ differ from the most common one):")
    lines += [f"implementation{'' if not c.mixed else f' ({k} rows)'}: {t}" for t, k in c.impls]
    lines += c.notes
    return {"display": c.display, "arrow": arrow(c.higher), "better": "higher" if c.higher else "lower",
            "tip": "\n".join(lines), "mixed": c.mixed, "impls": c.impls, "notes": c.notes}


def _index_row(w: Row, cols: list[Column]) -> dict:
    mit, att = w.res.data["mitigation"], w.res.data["attack"]
    return {"model": w.model, "mitigation": w.mitigation, "attack": w.attack, "slug": q(w.slug),
            "status": w.status, "origin": w.origin,
            "mit_tip": "v" + str(mit.get("version")) + " " + _params(mit.get("params")),
            "paired": None if w.scoring == "explicit" else "from the paired result of attack " + str(att.get("name")),
            "cells": [value_cell(w, c) for c in cols],
            "win_rate": f"{w.win_rate:.2f}" if w.win_rate is not None else None, "win_v": repr(w.win_rate),
            "dist": str(mit.get("dist") if w.origin == "built-in" else f"{mit.get('dist')} / {att.get('dist')}"),
            "source": source(w)}


def index_html(rows: list[Row], cols: list[Column], results: list[Result], plots: list[tuple[str, str, str, str]],
               unplotted: list[str]) -> str:
    """``plots``: (file, SVG, caption, why it is plotted) per privacy–utility plot; ``unplotted``: why not."""
    headline = next((c.display for c in cols if c.role.headline), "")
    return env().get_template("index.html").render(
        title="memobench leaderboard", rows=[_index_row(w, cols) for w in rows], cols=[_header(c) for c in cols],
        n_results=len(results), models=sorted({w.model for w in rows}),
        versions=sorted({str(r.data.get("memobench_version")) for r in results}),
        schemas=sorted({r.data["schema_version"] for r in results}),
        privacy=[_header(c) for c in cols if c.role.category == "privacy"], headline=headline,
        statuses=sorted({w.status for w in rows}), origins=sorted({w.origin for w in rows}),
        nonfinite=any(nonfinite_of(rec) for w in rows for rec in w.metrics.values()),
        win_rate=WIN_RATE, win_rate_sentence=WIN_RATE[0].upper() + WIN_RATE[1:],
        plots=[{"href": q(rel), "svg": markup(svg), "caption": cap, "why": why} for rel, svg, cap, why in plots],
        unplotted=unplotted)


def _info(w: Row) -> list[dict]:
    d = w.res.data
    mit, att, model, ps = d["mitigation"], d["attack"], d["model"], d.get("prompt_set") or {}
    gen = d.get("generation") or {}
    attack = ({"k": "attack", "main": w.attack, "pm": "(no attack; the no-attack half of the paired result of "
                                                         f"attack {att.get('name')})"} if w.scoring == "paired" else
              {"k": "attack", "main": f"{w.attack} v{att.get('version')}",
               "pm": f"({att.get('dist')}) {_params(att.get('params'))}"})
    items = [
        {"k": "model", "main": w.model, "pm": f"{_params(model.get('plugin', {}).get('params'))}; weights "
                                              f"{str(model.get('revision_or_sha256', 'n/a'))[:16]}; {model.get('dtype', '')}"},
        {"k": "prompt set", "main": str(ps.get("name")),
         "pm": f"v{ps.get('version')}, {ps.get('n_effective')} of {ps.get('n_original')} prompts"},
        {"k": "mitigation", "main": f"{w.mitigation} v{mit.get('version')}",
         "pm": f"({mit.get('dist')}) {_params(mit.get('params'))}"},
        attack,
        {"k": "seeds", "main": _seeds_text((d.get("seeds") or {}).get("target"))},
        {"k": "generation", "main": ", ".join(f"{k} {v}" for k, v in sorted(gen.items()))},
        {"k": "status", "main": w.status, "errors": [str(e) for e in (d.get("errors") or [])[:10]]},
    ]
    return [{"pm": "", "errors": [], **it} for it in items]


def _metric(n: str, rec: dict) -> dict:
    v = value_of(rec)
    dv, kind = _disp(rec)
    groups = rec.get("groups") or {}
    gtxt = ", ".join(f"{g} {fmt(value_of(gv)) if value_of(gv) is not None else missing_text(gv)[0]}"
                     + (f" (n {gv.get('n')})" if gv.get("n") is not None else "")
                     for g, gv in sorted(groups.items()) if isinstance(gv, dict))
    short, why = missing_text(rec) if v is None else (fmt(v), "")
    impl = rec.get("impl") or {}
    return {"name": n, "display": str(rec.get("display_name") or n), "arrow": arrow(_higher(rec)),
            "value": short, "missing": v is None, "why": why, "nf": nonfinite_of(rec) is not None,
            "disp": f"{fmt_disp(dv)} {kind}" if dv is not None else "", "n": str(rec.get("n", "")), "groups": gtxt,
            "summary": impl_summary(rec),
            "notes": [(k, str(impl[k])) for k in IMPL_NOTES if isinstance(impl.get(k), str) and impl[k]],
            "details": impl_details(rec)}


def _ends(vals: list[float | None]) -> tuple[str, str]:
    fin = [v for v in vals if v is not None]
    return (fmt(fin[0]), fmt(fin[-1])) if fin else ("n/a", "n/a")


def _loss(loss: tuple[str, list[Curve]] | None, loss_rel: str | None, shown: int, window: int) -> dict | None:
    if loss is None:
        return None
    svg, curves = loss
    rows = []
    for c in curves[:shown]:
        (r0, r1), (s0, s1) = _ends(c.raw), _ends(c.smooth)
        rows.append({"prompt_id": c.prompt_id, "steps": len(c.raw), "r0": r0, "r1": r1, "s0": s0, "s1": s1,
                     "nf": c.n_nonfinite})
    return {"svg": markup(svg), "curves": rows, "n_curves": len(curves), "href": q(loss_rel or ""),
            "window": window}


def detail_html(w: Row, cols_all: list[str], cmp: Comparison | None, cmp_png: str | None,
                grids: list[tuple[str, str]], loss: tuple[str, list[Curve]] | None, loss_rel: str | None,
                score: str = "", loss_shown: int = 16, loss_window: int = 0) -> str:
    """The page of one row. ``score``: display name of the per-sample value under each image; ``loss_shown`` and
    ``loss_window``: curves drawn and the smoothing window of the loss plot (:mod:`.plots`)."""
    d = w.res.data
    order = sorted(w.metrics, key=lambda n: (n not in cols_all, cols_all.index(n) if n in cols_all else 0, n))
    cmp_ctx = None
    if cmp is not None:
        cmp_ctx = {"headers": cmp.headers, "n_prompts": cmp.n_prompts,
                   "rows": [{**r, "cells": [(q(rel) if rel else None, cap) for rel, cap in r["cells"]]}
                            for r in cmp.rows]}
    return env().get_template("pairing.html").render(
        title=f"{w.mitigation} × {w.attack} on {w.model} — memobench", w=w, info=_info(w), source=source(w),
        result_pm=f"config {str(d.get('config_hash', ''))[:16]}, memobench {d.get('memobench_version')}, "
                  f"schema {d.get('schema_version')}, {d.get('created_at', '')}",
        also=", ".join(w.also), metrics=[_metric(n, w.metrics[n]) for n in order], cmp=cmp_ctx,
        cmp_png=q(cmp_png) if cmp_png else None, score=score, grids=[(q(rel), cap) for rel, cap in grids],
        loss=_loss(loss, loss_rel, loss_shown, loss_window))
