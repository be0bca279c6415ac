"""The attacker's budget: MR-vs-work curves and the "work to re-extract" column, from the ``budget_sweep`` record
of results run with ``memobench run --budget-sweep`` (:mod:`memobench.pipeline.budget`).

Work to re-extract: the least work, in the attack's own unit, at which the headline metric (MR) of the sweep first
exceeds its threshold (0.5); "not reached by W" when no point of the sweep reaches it (W = the largest work swept). Rows whose
result has no sweep show "—".
"""

from __future__ import annotations

from dataclasses import dataclass

from .plots import RC, _figure, _svg
from .rows import Row, _slug
from .values import fmt


@dataclass
class Sweep:
    row: Row
    param: str
    unit: str
    metric: str
    threshold: float
    points: list[tuple[float, int, float | None]]  # (work, parameter value, metric value), by work
    reached: dict | None


def sweep_of(w: Row) -> Sweep | None:
    """The row's sweep (an explicit attacked row whose result holds one)."""
    sw = w.res.data.get("budget_sweep") if w.attacked and w.scoring == "explicit" else None
    if not isinstance(sw, dict) or not sw.get("points") or not sw.get("headline_metric"):
        return None
    m = sw["headline_metric"]
    pts = sorted((float(p["budget"]), int(p["value"]), p["metrics"].get(m)) for p in sw["points"])
    return Sweep(w, str(sw["param"]), str(sw["unit"]), m, float(sw["threshold"]), pts, sw.get("work_to_reextract"))


def work_cell(w: Row) -> dict:
    """The "work to re-extract" cell: ``text`` (shown), ``v`` (sort value: not reached sorts as +inf), ``tip``."""
    s = sweep_of(w)
    if s is None:
        return {"text": "—", "v": "", "tip": "no budget sweep in this result (memobench run --budget-sweep)"}
    top = s.points[-1][0]
    curve = ", ".join(f"{s.param}={v}: {fmt(m) if m is not None else 'n/a'}" for _, v, m in s.points)
    if s.reached is None:
        return {"text": f"not reached by {top:g}", "v": "inf", "tip": f"{s.metric} never above {s.threshold:g} up to {top:g} "
                f"{s.unit}; {curve}"}
    return {"text": f"{float(s.reached['budget']):g}", "v": repr(float(s.reached["budget"])),
            "tip": f"{s.metric} first above {s.threshold:g} at {s.param}={s.reached['value']} "
                   f"({float(s.reached['budget']):g} {s.unit}); {curve}"}


def budget_plots(rows: list[Row], files: dict[str, bytes], xml: str) -> list[tuple[str, str, str]]:
    """One plot per (model, attack) with sweeps: the headline metric against the work, one line per mitigation.
    Returns (file, SVG, caption) and adds the standalone SVG files to ``files``."""
    groups: dict[tuple[str, str], list[Sweep]] = {}
    for w in rows:
        s = sweep_of(w)
        if s is not None:
            groups.setdefault((w.model, w.attack), []).append(s)
    out = []
    for (model, attack), sweeps in sorted(groups.items()):
        svg = budget_svg(model, attack, sweeps, prefix=f"bud{len(out)}")
        rel = f"plots/budget-{_slug((model, attack))}.svg"
        files[rel] = (xml + svg.replace('xlink:href="pairings/', 'xlink:href="../pairings/')).encode()
        s0 = sweeps[0]
        out.append((rel, svg, f"{model}: {s0.metric} against the attacker's work ({attack}: {s0.param}, "
                              f"{s0.unit}); dotted line: {s0.threshold:g}"))
    return out


MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*", "<", ">")
DASHES = ("-", (0, (6, 2)), (0, (2, 2)), (0, (7, 2, 1, 2)), (0, (1, 1)))


def budget_svg(model: str, attack: str, sweeps: list[Sweep], prefix: str = "bud") -> str:
    from matplotlib import rc_context

    W, H = 760, 440
    with rc_context(RC):
        fig, ax = _figure(W, H, (64, 34, 170, 48))
        s0 = sweeps[0]
        ax.set_xlabel(f"work: {s0.unit} ({attack})", parse_math=False)
        ax.set_ylabel(f"{s0.metric} ↓", parse_math=False)
        ax.set_ylim(-0.03, 1.03)
        ax.axhline(s0.threshold, color="#868e96", lw=1, ls=(0, (2, 2)))
        hover = {}
        ordered = sorted(sweeps, key=lambda s: s.row.mitigation)
        for i, s in enumerate(ordered):
            xs = [x for x, _, m in s.points if m is not None]
            ys = [m for _, _, m in s.points if m is not None]
            gid = f"{prefix}-c{i}"
            # curves often coincide (MR 1.0 at every budget): hollow markers of decreasing size and distinct
            # shapes and dash patterns keep every one of them visible where they overlap
            ms = 11.0 - 7.0 * i / max(len(ordered) - 1, 1)
            ax.plot(xs, ys, marker=MARKERS[i % len(MARKERS)], ms=ms, mfc="none", mew=1.5, lw=1.4,
                    color=f"C{i % 10}", ls=DASHES[i % len(DASHES)], gid=gid, label=s.row.mitigation[:24],
                    url=f"pairings/{s.row.slug}.html")
            cell = work_cell(s.row)
            hover[gid] = ("curve", f"{s.row.mitigation}: work to re-extract {cell['text']}; {cell['tip']}")
        for t in ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, borderaxespad=0).get_texts():
            t.set_parse_math(False)
        fig.text(64 / W, 1 - 22 / H, "one line per mitigation (coinciding curves: nested hollow markers); hover for "
                 "the work to re-extract, click for details", color="#5b6570", parse_math=False)
        return _svg(fig, W, H, f"{model}: {s0.metric} vs attacker work ({attack})", hover)


def budget_md(rows: list[Row]) -> list[str]:
    """The Markdown section: per attacked row with a sweep, the work to re-extract and the curve's values."""
    sweeps = [s for w in rows if (s := sweep_of(w)) is not None]
    if not sweeps:
        return []
    from .export import _md

    lines = ["", "## Attacker budget", "",
             "Work to re-extract: the least attacker work (in the attack's unit) at which MR first exceeds 0.5 "
             "(`memobench run --budget-sweep`); \"not reached by W\": MR stays ≤ 0.5 up to the largest work swept.", "",
             "| Model | Mitigation | Attack | Work unit | Work to re-extract | MR at each budget |", "|---|---|---|---|---:|---|"]
    for s in sweeps:
        w = s.row
        curve = "; ".join(f"{s.param}={v}: {fmt(m) if m is not None else 'n/a'}" for _, v, m in s.points)
        lines.append(f"| {_md(w.model)} | {_md(w.mitigation)} | {_md(w.attack)} | {_md(s.unit)} | "
                     f"{_md(work_cell(w)['text'])} | {_md(curve)} |")
    return lines
