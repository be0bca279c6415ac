"""Rows and columns of the table: one row per (model, mitigation, attack), the derived no-attack rows of paired
results, the metric columns (privacy columns first, the headline leading), and the mean win rate.

Rows. A result with an attack other than the identity attack carries, with paired scoring,
``metrics_without_attack`` — the target metrics of the same mitigation with no attack on the same targets and
seeds. It yields two rows: (model, mitigation, attack) and the derived (model, mitigation, no attack), whose
utility metrics come from ``metrics`` (they do not depend on the attack). A derived row yields to an explicit run of
the same pairing; two explicit results for the same (model, mitigation, attack) are an error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ..config import BadInput
from .declared import MetricRole, identity_attack_name, is_baseline_mitigation, metric_role
from .load import Result
from .values import IMPL_NOTES, _higher, _impl_sig, _num, _short, impl_summary, impl_text, value_of

SAMPLE_FIELDS = frozenset({"sample_key", "role", "prompt_id", "prompt", "prompt_sha256", "mem_type", "seed",
                           "image_path", "image_sha256", "n_references", "laion_id", "gt_sha256s",
                           "attack_output_ref"})


@dataclass
class Row:
    """One leaderboard row: (model, mitigation, attack)."""

    model: str
    mitigation: str
    attack: str
    res: Result
    metrics: dict[str, dict]
    scoring: str  # "explicit" or "paired" (the no-attack half of an attack's paired result)
    role: str  # samples role holding this row's generated images: "target" or "mitigated"
    also: list[str] = field(default_factory=list)  # other results that could have supplied a derived row
    slug: str = ""
    win_rate: float | None = None
    attacked: bool = False  # an attack other than the identity: the row has loss curves and a "no attack" partner

    @property
    def key(self) -> tuple[str, str, str]:
        return self.model, self.mitigation, self.attack

    @property
    def status(self) -> str:
        return str(self.res.data.get("status"))

    @property
    def origin(self) -> str:
        dists = {self.res.data["mitigation"].get("dist"), self.res.data["attack"].get("dist")}
        return "built-in" if dists == {"memobench"} else "third-party"

    @property
    def grid_key(self) -> str:
        return "grid_file" if self.role == "target" else "grid_without_attack_file"


def _records(r: Result):
    for k in ("metrics", "metrics_without_attack"):
        yield from (r.data.get(k) or {}).items()


def target_metric_names(results: list[Result]) -> set[str]:
    """Metrics of the target prompts (they change with the attack); every other metric is a utility metric.

    Evidence: declared privacy metrics; named in some result's ``metrics_without_attack``; VM/TM groups; per-sample
    values on target rows.
    """
    names: set[str] = set()
    for r in results:
        names |= {n for n, rec in _records(r) if metric_role(n, rec).category == "privacy"}
        names |= set(r.data.get("metrics_without_attack") or {})
        for n, rec in r.data["metrics"].items():
            if set(rec.get("groups") or {}) & {"VM", "TM"}:
                names.add(n)
        for s in r.samples or ():
            if s.get("role") in ("target", "mitigated"):
                names |= {k for k, v in s.items() if k not in SAMPLE_FIELDS and isinstance(v, (int, float))}
    return names


def _explicit(results: list[Result]) -> dict[tuple, Result]:
    explicit: dict[tuple, Result] = {}
    for r in results:
        k = (r.model, r.mitigation, r.attack)
        if k in explicit:
            raise BadInput(f"--results: two results for model {k[0]} × mitigation {k[1]} × attack {k[2]}: "
                           f"{explicit[k].path} and {r.path}; keep one and move the other out of the results "
                           f"directory")
        explicit[k] = r
    return explicit


def collect_rows(results: list[Result], targets: set[str]) -> list[Row]:
    explicit = _explicit(results)
    rows = [Row(*k, res=r, metrics=dict(r.data["metrics"]), scoring="explicit", role="target",
                attacked=not r.is_identity) for k, r in explicit.items()]
    no_attack = identity_attack_name([str(r.data["attack"]["name"]) for r in results])
    derived: dict[tuple, list[Result]] = {}
    for r in results:
        if not r.is_identity and "metrics_without_attack" in r.data:
            k = (r.model, r.mitigation, no_attack)
            if k not in explicit:
                derived.setdefault(k, []).append(r)
    for k, rs in derived.items():
        r = rs[0]  # results are sorted by path: the first one supplies the row, deterministically
        metrics = {n: rec for n, rec in r.data["metrics"].items() if n not in targets}
        metrics.update(r.data["metrics_without_attack"])
        rows.append(Row(*k, res=r, metrics=metrics, scoring="paired", role="mitigated", also=[x.rel for x in rs[1:]]))
    # the baseline mitigation first, then by name; within it the no-attack row first
    rows.sort(key=lambda w: (w.model, not is_baseline_mitigation(w.mitigation, w.res.data["mitigation"].get("kind")),
                             w.mitigation, w.attacked, w.attack))
    for w in rows:
        w.slug = _slug(w.key)
    return rows


def _slug(key: tuple[str, ...]) -> str:
    safe = "__".join("".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in part)[:40]
                     for part in key)
    return f"{safe}-{hashlib.sha256(json.dumps(list(key)).encode()).hexdigest()[:8]}"


def metric_roles(rows: list[Row]) -> dict[str, MetricRole]:
    """Each metric id's role, from its first record (rows are sorted)."""
    out: dict[str, MetricRole] = {}
    for w in rows:
        for n, rec in w.metrics.items():
            if n not in out:
                out[n] = metric_role(n, rec)
    return out


@dataclass
class Column:
    name: str
    display: str
    higher: bool
    impls: list[tuple[str, int]]  # (implementation summary, number of rows), most common first
    main_sig: dict[str, str]  # model → most common implementation signature
    rmin: float | None = None
    rmax: float | None = None
    notes: list[str] = field(default_factory=list)  # the implementations' notes and warnings (IMPL_NOTES)
    role: MetricRole = MetricRole("utility", False, False)

    @property
    def mixed(self) -> bool:
        return len(self.impls) > 1


def columns_of(rows: list[Row], targets: set[str]) -> list[Column]:
    present = {n for w in rows for n in w.metrics}
    roles = metric_roles(rows)
    privacy = sorted((n for n in present if roles[n].category == "privacy"),
                     key=lambda n: (not roles[n].headline, not roles[n].grid_score, n))
    names = privacy + sorted(present - targets - set(privacy))
    cols = []
    for n in names:
        recs = [(w, w.metrics[n]) for w in rows if n in w.metrics]
        displays: dict[str, int] = {}
        impls: dict[str, list] = {}  # full implementation text → [rows, a record]
        sigs: dict[str, dict[str, int]] = {}
        notes: dict[str, int] = {}
        for w, rec in recs:
            d = str(rec.get("display_name") or n)
            displays[d] = displays.get(d, 0) + 1
            impls.setdefault(impl_text(rec), [0, rec])[0] += 1
            sm = sigs.setdefault(w.model, {})
            sm[_impl_sig(rec)] = sm.get(_impl_sig(rec), 0) + 1
            for k in IMPL_NOTES:
                t = (rec.get("impl") or {}).get(k)
                if isinstance(t, str) and t:
                    notes[f"{k}: {t}"] = notes.get(f"{k}: {t}", 0) + 1
        variants = sorted(impls.items(), key=lambda kv: (-kv[1][0], kv[0]))
        shown = [impl_summary(rec) for _, (_, rec) in variants]
        for i, t in enumerate(shown):  # two implementations with one summary: name the fields they differ in
            same = [variants[j][1][1] for j in range(len(shown)) if shown[j] == t and j != i]
            if same:
                shown[i] = f"{t}; {_differs(variants[i][1][1], same)}"
        first = recs[0][1]
        cols.append(Column(
            name=n, display=_most_common(displays), higher=_higher(first),
            impls=[(t, v[0]) for t, (_, v) in zip(shown, variants)],
            main_sig={m: _most_common(s) for m, s in sigs.items()},
            rmin=_num(first.get("min")), rmax=_num(first.get("max")),
            notes=[t for t, _ in sorted(notes.items(), key=lambda kv: (-kv[1], kv[0]))], role=roles[n]))
    # several metrics with one display name (MR, MR_gen, MR_mean, MR_any all say "MR"): all but the headline one
    # name their metric id too, so that no two columns read the same
    seen: dict[str, list[Column]] = {}
    for c in cols:
        seen.setdefault(c.display, []).append(c)
    for same in seen.values():
        if len(same) > 1:
            for c in same:
                if not (c.role.headline and c.display.lower().replace(" ", "_") == c.name.lower()):
                    c.display = f"{c.display} ({c.name})"
    return cols


def _differs(rec: dict, others: list[dict]) -> str:
    """Which fields of ``rec``'s implementation differ from ``others`` (whose summary line reads the same)."""
    mine = rec.get("impl") or {}
    keys = {k for o in others for k in set(mine) | set(o.get("impl") or {})
            if mine.get(k) != (o.get("impl") or {}).get(k)}
    if any((rec.get("metric_plugin") or {}) != (o.get("metric_plugin") or {}) for o in others):
        keys.add("metric plugin params")
    diff = sorted(keys)
    return f"differs in {', '.join(diff[:6]) or 'details'}: " + "; ".join(
        f"{k} {_short(mine.get(k), 40)}" for k in diff[:3] if k in mine)


def _most_common(counts: dict[str, int]) -> str:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]


def win_rates(rows: list[Row], cols: list[Column]) -> None:
    """Mean win rate (HELM): per column, the share of the model's other rows this row beats (ties count half),
    averaged over the columns where it has a value."""
    from bisect import bisect_left, bisect_right

    by_model: dict[str, list[Row]] = {}
    for w in rows:
        by_model.setdefault(w.model, []).append(w)
    for group in by_model.values():
        rates: dict[int, list[float]] = {id(w): [] for w in group}
        for c in cols:
            vals = [(w, v) for w in group if (v := value_of(w.metrics.get(c.name))) is not None]
            if len(vals) < 2:
                continue
            srt = sorted(v for _, v in vals)
            n = len(srt) - 1
            for w, v in vals:
                lo, hi = bisect_left(srt, v), bisect_right(srt, v)
                worse = (len(srt) - hi) if not c.higher else lo  # rows this one beats
                rates[id(w)].append((worse + 0.5 * (hi - lo - 1)) / n)
        for w in group:
            r = rates[id(w)]
            w.win_rate = sum(r) / len(r) if r else None
