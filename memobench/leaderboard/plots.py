"""Plots: the privacy–utility plot of a model (the headline metric under the strongest attack against a utility
metric, one point per mitigation, the Pareto front joined) and the loss curves of an attack.

Drawn with matplotlib (no pyplot, no global state) as deterministic SVG: text stays text (``svg.fonttype``
"none"), ids derive from a fixed salt, no date or creator is written, so the same results give the same bytes.
Each point and curve carries a hover title and a link (added to the SVG by the ``gid`` of its matplotlib artist);
matplotlib escapes every text it writes, and the titles are escaped here.
"""

from __future__ import annotations

import html
import io
import re
from dataclasses import dataclass
from typing import Callable

from ..grid import GridLayout
from .rows import Column, Row
from .values import _disp, _num, arrow, fmt, fmt_disp, value_of

E = html.escape
#: rcParams of every figure: deterministic SVG with text as text, sizes in px (72 dpi: 1 pt = 1 px)
RC = {"svg.hashsalt": "memobench-leaderboard", "svg.fonttype": "none", "font.family": "DejaVu Sans",
      "font.size": 11, "axes.edgecolor": "#9aa4ae", "axes.facecolor": "#fbfcfd", "grid.color": "#e3e7eb",
      "axes.labelweight": "bold", "xtick.color": "#1d232a", "ytick.color": "#1d232a"}
DPI = 72
FRONT, DOMINATED, HOLLOW = ("#d9480f", "#7a2a05"), ("#4c6ef5", "#2b3a8c"), ("#ffffff", "#2b3a8c")
R = 5.5  # point radius (px)


@dataclass
class Point:
    mitigation: str
    x: float
    y: float
    attacked: bool
    note: str
    href: str
    front: bool = False
    xdisp: tuple[float, str] | None = None  # the utility value's reported dispersion: (value, "kind over what")


def pareto(points: list[Point], x_higher: bool) -> None:
    """Mark the points no other point beats on both axes (utility in its direction, MR lower)."""
    pool = [p for p in points if p.attacked] or points

    def better_eq(a: Point, b: Point) -> bool:
        return (a.x >= b.x if x_higher else a.x <= b.x) and a.y <= b.y

    for p in pool:
        p.front = not any(better_eq(q, p) and (q.x != p.x or q.y != p.y) for q in pool if q is not p)


def axis_verdict(col: Column, points: list[Point]) -> tuple[bool, str]:
    """Whether a utility metric separates the mitigations enough to be a Pareto axis, and the sentence saying so:
    its values must span more than the largest dispersion they report (or, with none reported, differ at the
    precision shown). A metric whose values all lie within one ± of each other would draw a front out of noise."""
    xs = [p.x for p in points]
    lo, hi = min(xs), max(xs)
    n = len(points)
    span = f"{col.display} spans {fmt(lo)}–{fmt(hi)} across the {n} mitigations"
    if n < 2:
        return True, f"{col.display}: one mitigation, {fmt(lo)}."
    disps = [p.xdisp for p in points if p.xdisp is not None]
    if disps:
        d, kind = max(disps)
        if hi - lo <= d:
            return False, (f"{span}, within the largest ± its values report ({fmt_disp(d)}, {kind}): the differences "
                           f"are within that dispersion, so it is shown in the table only.")
        return True, (f"{span}: {(hi - lo) / d:.1f}× the largest ± its values report ({fmt_disp(d)}, {kind})."
                      if d > 0 else f"{span}; its values report a ± of 0.")
    if len({fmt(x) for x in xs}) < 2:
        return False, f"{span}: every mitigation has the same value at the precision shown, so the table only."
    return True, f"{span} (no ± reported)."


def text_width(text: str, size: float = 11.0) -> float:
    """An upper estimate of the width of ``text`` in a sans-serif font (DejaVu Sans metrics, the widest common
    one), for placing labels without measuring them in a browser."""
    w = 0.0
    for ch in text:
        w += (0.30 if ch in "il.,:;|!'" else 0.45 if ch in "fjrt()[]{} -/_" else 1.0 if ch in "mwMW%@" or ord(ch) > 127
              else 0.80 if ch.isupper() or ch in "#$&" else 0.64)
    return w * size


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(items: list[tuple[float, float, str]], bounds: tuple[float, float, float, float], r: float = 5.5,
                 size: float = 11.0) -> list[tuple[float, float, str, tuple] | None]:
    """Label positions for points (x, y, text), in the order given (first = most important): for each point the
    first of eight positions around it whose box stays inside ``bounds`` (x0, y0, x1, y1) and clear of every point
    and of every label placed before; None where none fits (the point keeps its hover title).
    Returns (x, baseline y, text-anchor, box) per point."""
    asc, desc, gap = 0.82 * size, 0.25 * size, 2.0
    obstacles = [(x - r - 1, y - r - 1, x + r + 1, y + r + 1) for x, y, _ in items]
    placed: list[tuple] = []
    out: list[tuple[float, float, str, tuple] | None] = []
    for x, y, text in items:
        w = text_width(text, size)
        got = None
        for dx, dy, anchor in ((r + 3, asc / 2 - 1, "start"), (-r - 3, asc / 2 - 1, "end"),
                               (r - 1, -r - desc - 1, "start"), (-r + 1, -r - desc - 1, "end"),
                               (0, -r - desc - 2, "middle"), (r - 1, r + asc + 1, "start"),
                               (-r + 1, r + asc + 1, "end"), (0, r + asc + 2, "middle")):
            tx, ty = x + dx, y + dy
            x0 = tx if anchor == "start" else tx - w if anchor == "end" else tx - w / 2
            box = (x0 - gap / 2, ty - asc - gap / 2, x0 + w + gap / 2, ty + desc + gap / 2)
            if box[0] < bounds[0] or box[1] < bounds[1] or box[2] > bounds[2] or box[3] > bounds[3]:
                continue
            if any(_overlap(box, o) for o in obstacles) or any(_overlap(box, o) for o in placed):
                continue
            got = (tx, ty, anchor, box)
            break
        if got is not None:
            placed.append(got[3])
        out.append(got)
    return out


def smooth(vals: list[float | None], half: int) -> list[float | None]:
    """Centred moving average over ``2 * half + 1`` steps (fewer at the ends, non-finite steps skipped); None
    where the window holds no finite value."""
    out: list[float | None] = []
    for i in range(len(vals)):
        win = [v for v in vals[max(0, i - half):i + half + 1] if v is not None]
        out.append(sum(win) / len(win) if win else None)
    return out


def smooth_half(n: int) -> int:
    """Half-window of the loss-curve smoothing: a tenth of the curve (at least 2 steps), so 11 steps for DoRI's 50."""
    return max(2, n // 10)


MAX_CURVES = GridLayout.max_prompts  # curves drawn per loss plot (the runner's grid shows as many prompts)


@dataclass
class Curve:
    prompt_id: str
    raw: list[float | None]  # None: a non-finite (or missing) step
    smooth: list[float | None]
    n_nonfinite: int


def privacy_utility_points(rows: list[Row], model: str, col: Column, y_name: str,
                           href: Callable[[Row], str]) -> list[Point]:
    """One point per mitigation of ``model``: x its utility value (``col``; the no-attack row's where there is
    one), y the headline metric ``y_name`` under the strongest attack run against it (else without attack)."""
    by_mit: dict[str, list[Row]] = {}
    for w in rows:
        if w.model == model:
            by_mit.setdefault(w.mitigation, []).append(w)
    pts = []
    for mit, ws in by_mit.items():
        ux = [(w, v) for w in ws if (v := value_of(w.metrics.get(col.name))) is not None]
        if not ux:
            continue
        uw, x = min(ux, key=lambda t: (t[0].attacked, t[0].attack))  # the no-attack row's value when there is one
        xrec = uw.metrics.get(col.name) or {}
        dv, kind = _disp(xrec)
        over = (xrec.get("dispersion") or {}).get("over")
        xd = (abs(dv), kind + (f" over {over}" if isinstance(over, str) and over else "")) if dv is not None else None
        att = [(w, v) for w in ws if w.attacked and (v := value_of(w.metrics.get(y_name))) is not None]
        if att:
            w, y = max(att, key=lambda t: (t[1], [-ord(c) for c in t[0].attack]))
            pts.append(Point(mit, x, y, True, f"strongest attack: {w.attack}", href(w), xdisp=xd))
            continue
        base = next((w for w in ws if not w.attacked), None)
        y = value_of(base.metrics.get(y_name)) if base else None
        if y is not None:
            pts.append(Point(mit, x, y, False, "no attack run: without attack", href(base), xdisp=xd))
    return pts


def _figure(w: int, h: int, axes_box: tuple[float, float, float, float]):
    """A ``w`` × ``h`` px figure and its axes; ``axes_box`` = (left, top, right, bottom) margins in px."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI)
    left, top, right, bottom = axes_box
    ax = fig.add_axes((left / w, bottom / h, (w - left - right) / w, (h - top - bottom) / h))
    ax.grid(True, linewidth=0.8)
    ax.set_axisbelow(True)
    for s in ax.spines.values():
        s.set_linewidth(0.8)
    return fig, ax


def _svg(fig, w: int, h: int, label: str, hover: dict[str, tuple[str, str]]) -> str:
    """The figure as an SVG element (no XML prologue): ``width``/``height`` in px, a title and an aria label, and
    per artist gid in ``hover`` its class and hover title."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):].rstrip() + "\n"
    svg = re.sub(r'<svg ([^>]*)width="[0-9.]+pt" height="[0-9.]+pt"',
                 lambda m: f'<svg {m.group(1)}width="{w}" height="{h}" role="img" aria-label="{E(label)}"', svg, 1)
    svg = svg.replace(">", f"><title>{E(label)}</title>", 1)
    for gid, (cls, tip) in hover.items():
        svg = svg.replace(f'<g id="{gid}">', f'<g id="{gid}" class="{cls}"><title>{E(tip)}</title>', 1)
    return svg


def _limits(vals: list[float], lo: float | None = None, hi: float | None = None) -> tuple[float, float]:
    """Axis limits: the metric's full range [lo, hi] with a 5 % margin when every value lies in it, else the
    values' range with an 8 % margin."""
    a, b = min(vals), max(vals)
    if lo is not None and hi is not None and lo <= a and b <= hi and hi > lo:
        return lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)
    d = (b - a) * 0.08 if b > a else abs(a) * 0.1 or 0.1
    return a - d, b + d


def _labels(fig, ax, points: list[Point], prefix: str, w: int, h: int) -> tuple[int, dict]:
    """Point labels where they fit (:func:`place_labels`, in SVG px): Pareto front first, then attacked points."""
    order = sorted(points, key=lambda p: (not p.front, not p.attacked, p.mitigation))
    disp = ax.transData.transform([(p.x, p.y) for p in order])
    x0, y0, x1, y1 = ax.get_window_extent().extents
    spots = place_labels([(float(x), h - float(y), p.mitigation[:28]) for (x, y), p in zip(disp, order)],
                         (x0 + 1, h - y1 + 1, x1 - 1, h - y0 - 1), r=R)
    hover = {}
    for i, (p, sp) in enumerate(zip(order, spots)):
        if sp is None:
            continue
        ha = {"start": "left", "end": "right", "middle": "center"}[sp[2]]
        fig.text(sp[0] / w, 1 - sp[1] / h, p.mitigation[:28], ha=ha, va="baseline", url=p.href,
                 gid=f"{prefix}-lab{i}", parse_math=False)
        hover[f"{prefix}-lab{i}"] = ("pl", p.mitigation)
    return sum(s is not None for s in spots), hover


def privacy_utility_svg(model: str, col: Column, y_col: Column, points: list[Point], prefix: str = "pu") -> str:
    """The plot as an SVG element; ``prefix`` makes its element ids unique on a page."""
    from matplotlib import rc_context
    from matplotlib.lines import Line2D

    W, H = 640, 440
    pareto(points, col.higher)
    with rc_context(RC):
        fig, ax = _figure(W, H, (64, 56, 16, 48))
        ax.set_xlim(*_limits([p.x for p in points]))
        ax.set_ylim(*_limits([p.y for p in points], y_col.rmin, y_col.rmax))
        ax.set_xlabel(f"{col.display} {arrow(col.higher)} (utility, {'higher' if col.higher else 'lower'} is better)",
                      parse_math=False)
        ax.set_ylabel(f"{y_col.display} under attack ↓ (worst over attacks)", parse_math=False)
        front = sorted((p for p in points if p.front), key=lambda p: p.x)
        if len(front) > 1:
            ax.plot([p.x for p in front], [p.y for p in front], ls=(0, (5, 3)), color=FRONT[0], lw=1.5)
        hover = {}
        for i, p in enumerate(sorted(points, key=lambda p: (p.front, p.mitigation))):
            face, edge = FRONT if p.front else DOMINATED if p.attacked else HOLLOW
            ax.plot([p.x], [p.y], ls="none", marker="o", ms=2 * R, mfc=face, mec=edge, mew=1.5, url=p.href,
                    gid=f"{prefix}-pt{i}", clip_on=False)
            kind = "front" if p.front else "dominated" if p.attacked else "unattacked"
            hover[f"{prefix}-pt{i}"] = (f"pt {kind}", f"{p.mitigation}: {col.display} {fmt(p.x)}, {y_col.display} "
                                        f"{fmt(p.y)} ({p.note})" + ("; Pareto front" if p.front else ""))
        n_lab, lab_hover = _labels(fig, ax, points, prefix, W, H)
        legend = [Line2D([], [], ls="none", marker="o", ms=10, mfc=f, mec=e, mew=1.5, label=t) for (f, e), t in
                  ((FRONT, "Pareto front"), (DOMINATED, "dominated"),
                   (HOLLOW, f"not attacked ({y_col.display} w/o attack)"))]
        fig.legend(handles=legend, loc="upper left", bbox_to_anchor=(58 / W, 1), ncol=3, frameon=False,
                   handletextpad=0.2, columnspacing=1.2, borderaxespad=0.2)
        fig.text(64 / W, 1 - 44 / H, "one point per mitigation" + (
            f" ({n_lab} of {len(points)} labelled: the rest did not fit)" if n_lab < len(points) else "")
            + "; hover for name and values, click for details", color="#5b6570", parse_math=False)
        return _svg(fig, W, H, f"{model}: {y_col.display} under attack vs {col.display}", {**hover, **lab_hover})


def curves_of(traces: dict) -> list[Curve]:
    """The attack's loss curves (one per prompt with a finite step), smoothed (:func:`smooth_half`)."""
    curves: list[Curve] = []
    for pid in sorted(traces):
        tr = traces[pid]
        lc = tr.get("loss_curve") if isinstance(tr, dict) else None
        if isinstance(lc, list) and lc:
            vals = [_num(v) for v in lc]
            if any(v is not None for v in vals):
                curves.append(Curve(str(pid), vals, [], sum(v is None for v in vals)))
    if curves:
        half = smooth_half(max(len(c.raw) for c in curves[:MAX_CURVES]))
        for c in curves:
            c.smooth = smooth(c.raw, half)
    return curves


def _nan(vals: list[float | None]) -> list[float]:
    return [float("nan") if v is None else v for v in vals]


def loss_svg(traces: dict, title: str, prefix: str = "loss") -> tuple[str, list[Curve]] | None:
    """The attack's loss curves: each prompt's raw curve faint, its centred moving average (the trend) bold, and
    the mean trend over the prompts in black (a non-finite step is a gap)."""
    from matplotlib import rc_context
    from matplotlib.ticker import MaxNLocator

    curves = curves_of(traces)
    if not curves:
        return None
    shown = curves[:MAX_CURVES]
    n = max(len(c.raw) for c in shown)
    half = smooth_half(n)
    W, H = 1000, 460
    palette = [f"C{i}" for i in range(10)]
    with rc_context(RC):
        fig, ax = _figure(W, H, (64, 34, 180, 48))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0, max(n - 1, 1))
        ax.set_xlabel("optimisation step")
        ax.set_ylabel("loss (batch loss before the step)")
        hover = {}
        for i, c in enumerate(shown):
            color, dash = palette[i % 10], "-" if i < 10 else (0, (4, 2))
            tip = f"{c.prompt_id}: trend {fmt(next((v for v in c.smooth if v is not None), None))} → " \
                  f"{fmt(next((v for v in reversed(c.smooth) if v is not None), None))}" + (
                      f"; {c.n_nonfinite} non-finite steps" if c.n_nonfinite else "")
            ax.plot(_nan(c.raw), color=color, lw=1, alpha=0.25, gid=f"{prefix}-raw{i}")
            ax.plot(_nan(c.smooth), color=color, lw=1.7, ls=dash, gid=f"{prefix}-smooth{i}",
                    label=c.prompt_id[:24])
            hover[f"{prefix}-raw{i}"] = ("raw", tip)
            hover[f"{prefix}-smooth{i}"] = ("smooth", tip)
        if len(shown) > 1:
            mean = [sum(vs) / len(vs) if (vs := [c.smooth[j] for c in shown if j < len(c.smooth)
                                                 and c.smooth[j] is not None]) else None for j in range(n)]
            ax.plot(_nan(mean), color="#111111", lw=3, gid=f"{prefix}-mean", label="mean trend")
            hover[f"{prefix}-mean"] = ("mean", "mean trend over the prompts")
        for t in ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, borderaxespad=0).get_texts():
            t.set_parse_math(False)
        fig.text(64 / W, 1 - 22 / H, f"faint: the loss at each step; bold: its moving average over {2 * half + 1} "
                 f"steps (the trend); black: the mean trend over the {len(shown)} prompts"
                 + ("; gaps: non-finite steps" if any(c.n_nonfinite for c in shown) else ""), color="#5b6570")
        return _svg(fig, W, H, title, hover), curves
