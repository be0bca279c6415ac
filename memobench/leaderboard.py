"""The leaderboard: a static, self-contained site built from result files, byte for byte reproducibly.

``memobench leaderboard build --results DIR --out DIR`` reads every result JSON under the results directory
(the runner's layout ``<model>/<mitigation>__<attack>/<run_id>.json``), validates it and writes:

* ``index.html`` — one static page (inline CSS and JS, nothing fetched at view time): a sortable table with one
  row per (model, mitigation, attack), columns MR, SSCD_orig and the utility metrics (direction arrow in the
  header, the metric implementation in the header tooltip), status / origin filters and a privacy–utility plot
  per model and utility metric (inline SVG, Pareto front marked; also written as ``plots/*.svg``);
* ``pairings/<slug>.html`` — one detail page per row: provenance, every metric value, an image grid
  (training original | mitigated | mitigated + attack, also written as ``img/grids/<slug>.png``), the run's own
  grids and the attack's loss curves (SVG);
* ``LEADERBOARD.md`` — the same table in Markdown, plus every value in the long format of CONVENTIONS §12;
* ``leaderboard.csv`` and ``leaderboard.parquet`` — long format, one row per metric value (and group);
* ``runs/`` — a copy of every result JSON the numbers come from; ``img/`` — every image shown;
* ``manifest.json`` — every file written with its sha256.

Rows. A result with an attack other than the identity attack (``none``, alias ``prompt``) carries, with paired
scoring, ``metrics_without_attack`` — the target metrics of the same mitigation with no attack on the same
targets and seeds. It yields two rows: (model, mitigation, attack) and the derived (model, mitigation, none),
whose utility metrics come from ``metrics`` (they do not depend on the attack). A derived row yields to an
explicit run of the same pairing; two explicit results for the same (model, mitigation, attack) are an error.

Determinism. The output is a function of the results directory only: rows and metrics are sorted, no clock is
read, and images are content-addressed by the sha256 the samples file records. An image is taken from the
previous build (``--out``), from the cache, or cut out of the run's grid PNG — whichever has it, the bytes are the
same, because every candidate is checked against the recorded sha256. ``memobench leaderboard check`` renders the
site in memory and names every file that differs from ``--out``.

Every string that comes from a plugin, a prompt file or a result is escaped (``html.escape``) in HTML and SVG.
This module is core: it reads result files and never imports a plugin.

Local paths and non-finite values. A result may record paths of the machine that ran it (a cache file, a local
model folder): every absolute path in a result's strings is shown as ``<local path>/<file name>``, on the pages and
in the ``runs/`` copies, so no generated file names a folder of the machine that ran or built it. A value that was
not finite (``NaN``/``Infinity`` in a legacy result, or ``null`` with a recorded non-finite reason) is shown as such
("NaN", "+inf", "non-finite"), never as missing; the ``runs/`` copy of such a result is strict JSON
(``allow_nan=False``): the value becomes ``null`` and its record says ``"non_finite": "NaN"`` (top level
``non_finite_values``: every replaced value by JSON pointer).
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import math
import os
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .cache import atomic_write_bytes, default_cache_dir, sha256_bytes
from .config import BadInput

#: result schema versions this module reads, each with its migration to the current shape (additive changes only:
#: the runner's ``RESULT_SCHEMA`` must be listed here; a test checks it).
MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: lambda d: d}
IDENTITY_ATTACKS = frozenset({"none", "prompt"})  # the built-in no-attack attack and its alias
NO_ATTACK = "none"
HEADLINE_METRICS = ("mr", "sscd_orig")  # the privacy columns of the table (CONVENTIONS §4)
PLOT_Y_METRIC = "mr"
MANIFEST = "manifest.json"
MAX_PROMPTS = 16  # prompts shown per detail page and loss plot (the runner's grid shows as many)
SAMPLE_FIELDS = frozenset({"sample_key", "role", "prompt_id", "prompt", "prompt_sha256", "mem_type", "seed",
                           "image_path", "image_sha256", "n_references", "laion_id", "gt_sha256s",
                           "attack_output_ref"})
# layout of memobench.runner.write_grid (every crop taken from a grid is checked against the recorded sha256, so
# a changed layout yields "not available", never a wrong image)
GRID_SCALE, GRID_TOP, GRID_LABEL_H, GRID_PAD, GRID_MAX_PROMPTS, GRID_MAX_SEEDS = 2, 24, 14, 4, 16, 8
GRID_SCORE_HS = (12, 0)
CSV_COLUMNS = ("model", "prompt_set", "mitigation", "mitigation_version", "mitigation_dist", "mitigation_params",
               "attack", "attack_version", "attack_dist", "attack_params", "scoring", "metric", "display_name",
               "group", "value", "dispersion", "dispersion_kind", "n", "higher_is_better", "unavailable",
               "metric_plugin_version", "impl", "seeds", "status", "memobench_version", "schema_version", "run_id",
               "config_hash", "created_at", "source")
E = html.escape


# ================================================================================================ loading
@dataclass
class Result:
    """One result file."""

    rel: str  # path relative to the results directory, '/'-separated
    path: Path
    raw: bytes
    data: dict  # validated, migrated, local paths redacted, non-finite numbers replaced by null (see _clean)
    samples: list[dict] | None = None  # rows of the samples file (None: no samples file)
    copy: bytes = b""  # what runs/<rel> holds: the raw bytes, or strict JSON when _clean changed anything

    @property
    def model(self) -> str:
        return str(self.data["model"]["plugin"]["name"])

    @property
    def mitigation(self) -> str:
        return str(self.data["mitigation"]["name"])

    @property
    def attack(self) -> str:
        return NO_ATTACK if self.is_identity else str(self.data["attack"]["name"])

    @property
    def is_identity(self) -> bool:
        return str(self.data["attack"]["name"]) in IDENTITY_ATTACKS

    def sibling(self, key: str) -> Path | None:
        """A file the result names (``samples_file``, ``grid_file``, …) in its own directory, if it exists."""
        name = self.data.get(key)
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
            return None
        p = self.path.parent / name
        return p if p.is_file() else None


def _need(data: dict, dotted: str, rel: str, results_dir: Path, kind: type | tuple = (str, int, float)) -> Any:
    cur: Any = data
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            cur = None
            break
        cur = cur[part]
    if cur is None or not isinstance(cur, kind) or (isinstance(cur, str) and not cur):
        raise BadInput(f"--results: {results_dir / rel} is not a complete memobench result ('{dotted}' is missing "
                       f"or invalid); re-run that pairing or move the file out of {results_dir}")
    return cur


def _series(version: str) -> str:
    """Compatibility series of a memobench version: '0.y' before 1.0 (minor bumps break), else the major."""
    parts = str(version).split(".")
    return f"0.{parts[1] if len(parts) > 1 else 0}" if parts[0] == "0" else parts[0]


def load_results(results_dir: str | Path) -> list[Result]:
    """Every result JSON under ``results_dir`` (sorted by path), validated and migrated to the current schema."""
    root = Path(results_dir)
    if not root.is_dir():
        raise BadInput(f"--results: not a directory: {root}; pass the folder `memobench run` wrote results to")
    out: list[Result] = []
    current = max(MIGRATIONS)
    for p in sorted(root.rglob("*.json"), key=lambda q: q.relative_to(root).as_posix()):
        rel = p.relative_to(root).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts) or not p.is_file():
            continue  # temporary files of an interrupted atomic write, hidden folders
        try:
            raw = p.read_bytes()
            data = json.loads(raw)
        except (OSError, ValueError) as e:
            raise BadInput(f"--results: cannot read {p} ({e}); fix or remove that file") from None
        if not isinstance(data, dict) or "schema_version" not in data:
            raise BadInput(f"--results: {p} is not a memobench result (no schema_version); move it out of {root}")
        v = data["schema_version"]
        if not isinstance(v, int) or isinstance(v, bool) or v not in MIGRATIONS:
            if isinstance(v, int) and v > current:
                raise BadInput(f"--results: {p} has result schema {v}, newer than this memobench reads "
                               f"({', '.join(map(str, sorted(MIGRATIONS)))}); upgrade memobench")
            raise BadInput(f"--results: {p} has unknown result schema {v!r} (this memobench reads "
                           f"{', '.join(map(str, sorted(MIGRATIONS)))}); re-run that pairing")
        data = MIGRATIONS[v](data)
        for key in ("model.plugin.name", "mitigation.name", "attack.name", "status"):
            _need(data, key, rel, root)
        _need(data, "metrics", rel, root, dict)
        if "metrics_without_attack" in data and not isinstance(data["metrics_without_attack"], dict):
            raise BadInput(f"--results: {p}: 'metrics_without_attack' is not an object; re-run that pairing")
        for k in ("metrics", "metrics_without_attack"):
            for name, rec in (data.get(k) or {}).items():
                if not isinstance(rec, dict):
                    raise BadInput(f"--results: {p}: {k}.{name} is not a metric record; re-run that pairing")
        data, copy = clean_result(raw, data)
        r = Result(rel, p, raw, data, copy=copy)
        sp = r.sibling("samples_file")
        if sp is not None:
            try:
                r.samples = [json.loads(line) for line in sp.read_text(encoding="utf-8").splitlines() if line.strip()]
            except (OSError, ValueError) as e:
                raise BadInput(f"--results: cannot read {sp} ({e}); fix or remove that file") from None
            if not all(isinstance(x, dict) for x in r.samples):
                raise BadInput(f"--results: {sp} has a line that is not a JSON object; fix or remove that file")
        out.append(r)
    if not out:
        raise BadInput(f"--results: no result JSONs under {root}; run `memobench run` (or the matrix) first")
    series: dict[str, Result] = {}
    for r in out:
        series.setdefault(_series(str(r.data.get("memobench_version", "?"))), r)
    if len(series) > 1:
        (s1, a), (s2, b) = list(series.items())[:2]
        raise BadInput(f"--results: results of incompatible memobench versions are mixed: {a.path} "
                       f"({a.data.get('memobench_version')}) and {b.path} ({b.data.get('memobench_version')}); "
                       f"re-run the older results with one memobench version, or build from separate directories")
    return out


# ================================================================================================ cleaning
#: an absolute path inside a string: a ``file:`` URI, POSIX (``/a/b``: two components at least, not preceded by a
#: word character, ``.``, ``:`` or ``/``, so neither a URL nor ``1/d`` or ``mean/std``), home-relative (``~/a``),
#: Windows (``C:\\a``) or UNC (``\\\\server\\share``)
_ABS_PATH = re.compile(r"""file://[^\s"'<>]*|(?<![\w/.:~\\-])"""
                       r"""(?:~(?=/)|[A-Za-z]:(?=[\\/])|\\(?=\\)|(?=/[^\s/"'<>;,]+/[^\s/"'<>;,]))"""
                       r"""(?:[\\/][^\s/\\"'<>;,]+)+[\\/]?""")
NONFINITE_TOKENS = {"nan": "NaN", "inf": "+inf", "+inf": "+inf", "infinity": "+inf", "+infinity": "+inf",
                    "-inf": "-inf", "-infinity": "-inf"}


def redact_paths(text: str) -> str:
    """``text`` with every absolute path replaced by ``<local path>/<last component>`` (``<local path>`` alone for a
    path of fewer than three components, whose last part may be a user name)."""
    def sub(m: re.Match) -> str:
        path = m.group(0)
        tail = path[len(path.rstrip(".:)]}'")):]  # punctuation after the path belongs to the sentence
        path = path[:len(path) - len(tail)]
        path = path.removeprefix("file://")
        parts = [q for q in re.split(r"[\\/]", path) if q and q != "~"]
        if parts and re.fullmatch(r"[A-Za-z]:", parts[0]):
            parts = parts[1:]
        return "<local path>" + (f"/{parts[-1]}" if len(parts) >= 3 else "") + tail
    return _ABS_PATH.sub(sub, text) if ("/" in text or "\\" in text) else text


def _token(v: float) -> str:
    return "NaN" if math.isnan(v) else "+inf" if v > 0 else "-inf"


def _clean(obj: Any, ptr: str, found: dict[str, str]) -> tuple[Any, bool]:
    """``obj`` with local paths redacted and non-finite floats replaced by ``None`` (each recorded in ``found`` by
    JSON pointer; a record whose ``value`` was non-finite gets ``"non_finite": token``); and whether it changed."""
    if isinstance(obj, float) and not math.isfinite(obj):
        found[ptr] = _token(obj)
        return None, True
    if isinstance(obj, str):
        t = redact_paths(obj)
        return t, t != obj
    if isinstance(obj, list):
        out, changed = [], False
        for i, x in enumerate(obj):
            y, c = _clean(x, f"{ptr}/{i}", found)
            out.append(y)
            changed |= c
        return out, changed
    if isinstance(obj, dict):
        d, changed = {}, False
        for k, x in obj.items():
            y, c = _clean(x, f"{ptr}/{str(k).replace('~', '~0').replace('/', '~1')}", found)
            d[k] = y
            changed |= c
        v = obj.get("value")
        if isinstance(v, float) and not math.isfinite(v) and "non_finite" not in obj:
            d["non_finite"] = _token(v)
        return d, changed
    return obj, False


def clean_result(raw: bytes, data: dict) -> tuple[dict, bytes]:
    """The result as the leaderboard shows it, and the bytes of its ``runs/`` copy (strict JSON)."""
    found: dict[str, str] = {}
    clean, changed = _clean(data, "", found)
    if not changed:
        return data, raw
    if found:
        clean["non_finite_values"] = {**(clean.get("non_finite_values") or {}), **found} \
            if isinstance(clean.get("non_finite_values"), dict) else found
    return clean, json.dumps(clean, indent=1, sort_keys=True, allow_nan=False).encode()


# ================================================================================================ rows
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


def target_metric_names(results: list[Result]) -> set[str]:
    """Metrics of the target prompts (they change with the attack); every other metric is a utility metric.

    Evidence: named in some result's ``metrics_without_attack``; VM/TM groups; per-sample values on target rows.
    """
    names = set(HEADLINE_METRICS)
    for r in results:
        names |= set(r.data.get("metrics_without_attack") or {})
        for n, rec in r.data["metrics"].items():
            if set(rec.get("groups") or {}) & {"VM", "TM"}:
                names.add(n)
        for s in r.samples or ():
            if s.get("role") in ("target", "mitigated"):
                names |= {k for k, v in s.items() if k not in SAMPLE_FIELDS and isinstance(v, (int, float))}
    return names


def _sort_key(name: str) -> tuple[int, str]:
    return (0 if name == NO_ATTACK else 1, name)


def collect_rows(results: list[Result], targets: set[str]) -> list[Row]:
    explicit: dict[tuple, Result] = {}
    for r in results:
        k = (r.model, r.mitigation, r.attack)
        if k in explicit:
            raise BadInput(f"--results: two results for model {k[0]} × mitigation {k[1]} × attack {k[2]}: "
                           f"{explicit[k].path} and {r.path}; keep one and move the other out of the results "
                           f"directory")
        explicit[k] = r
    rows = [Row(*k, res=r, metrics=dict(r.data["metrics"]), scoring="explicit", role="target")
            for k, r in explicit.items()]
    derived: dict[tuple, list[Result]] = {}
    for r in results:
        if not r.is_identity and "metrics_without_attack" in r.data:
            k = (r.model, r.mitigation, NO_ATTACK)
            if k not in explicit:
                derived.setdefault(k, []).append(r)
    for k, rs in derived.items():
        r = rs[0]  # results are sorted by path: the first one supplies the row, deterministically
        metrics = {n: rec for n, rec in r.data["metrics"].items() if n not in targets}
        metrics.update(r.data["metrics_without_attack"])
        rows.append(Row(*k, res=r, metrics=metrics, scoring="paired", role="mitigated", also=[x.rel for x in rs[1:]]))
    rows.sort(key=lambda w: (w.model, _sort_key(w.mitigation), _sort_key(w.attack)))
    for w in rows:
        w.slug = _slug(w.key)
    return rows


def _slug(key: tuple[str, ...]) -> str:
    safe = "__".join("".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in part)[:40]
                     for part in key)
    return f"{safe}-{hashlib.sha256(json.dumps(list(key)).encode()).hexdigest()[:8]}"


# ================================================================================================ values
def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def value_of(rec: dict | None) -> float | None:
    if not rec or rec.get("unavailable"):
        return None
    return _num(rec.get("value"))


_NONFINITE_WORDS = re.compile(r"non-?finite|\bnan\b|infinit|\binf\b", re.IGNORECASE)


def nonfinite_of(rec: Any) -> str | None:
    """What a record says about a non-finite value, or None: "NaN", "+inf", "-inf" (the value was not finite: a
    legacy result's ``NaN``/``Infinity``, or ``null`` with ``non_finite`` recorded) or "non-finite" (``unavailable``
    gives a non-finite reason)."""
    if not isinstance(rec, dict):
        return None
    v = rec.get("value")
    if isinstance(v, float) and not math.isfinite(v):
        return _token(v)
    nf = rec.get("non_finite", rec.get("nonfinite"))
    if nf not in (None, False, ""):
        return NONFINITE_TOKENS.get(str(nf).strip().lower(), "non-finite")
    why = rec.get("unavailable")
    if v is None and isinstance(why, str) and _NONFINITE_WORDS.search(why):
        return "non-finite"
    return None


def missing_text(rec: dict | None) -> tuple[str, str]:
    """(short text, explanation) for a record without a finite value: non-finite, unavailable or not recorded."""
    nf = nonfinite_of(rec)
    why = str((rec or {}).get("unavailable") or "")
    if nf is not None:
        return nf, (f"the run recorded a non-finite value ({nf})" + (f": {why}" if why else "")
                    + "; left out of sorting, win rates and plots")
    return "n/a", why or "no value recorded"


def _disp(rec: dict | None) -> tuple[float | None, str]:
    d = (rec or {}).get("dispersion")
    if isinstance(d, dict):
        return _num(d.get("value")), str(d.get("kind") or "")
    return None, ""


def fmt(v: float | None) -> str:
    """Three decimals (two from 10, one from 1000); three significant digits below 0.01, so that small values
    that differ (a kernel distance of 0.00445 and one of 0.00567) do not all read 0.004–0.006."""
    if v is None:
        return "n/a"
    a = abs(v)
    if 0 < a < 0.01:
        return f"{v:.{2 - math.floor(math.log10(a))}f}"
    return f"{v:.3f}" if a < 10 else f"{v:.2f}" if a < 1000 else f"{v:.1f}"


def fmt_disp(d: float) -> str:
    """A dispersion: as :func:`fmt`, but two significant digits below 0.01 (0.000066, not 0.000)."""
    a = abs(d)
    if 0 < a < 0.01:
        return f"{d:.{1 - math.floor(math.log10(a))}f}"
    return fmt(d)


def _higher(rec: dict | None) -> bool:
    return bool((rec or {}).get("higher_is_better"))


def arrow(higher: bool) -> str:
    return "↑" if higher else "↓"


IMPL_FIRST = ("name", "version", "metric_version", "feature_extractor", "checkpoint", "weights_sha256", "preset",
              "library", "backend")


# impl fields that describe the run's cache state, not the implementation: the same computation reads "miss" the first
# time and "hit" afterwards, so they never make two values "computed by different implementations"
RUN_STATE_IMPL_KEYS = frozenset({"reference_cache", "n_ref_extracted", "reference_cache_path"})


def impl_text(rec: dict) -> str:
    """The implementation that produced a metric value: metric plugin, extractor, weights, library, preset."""
    parts = []
    mp = rec.get("metric_plugin") or {}
    if mp.get("name"):
        parts.append(f"metric plugin {mp.get('name')} v{mp.get('version')}"
                     + (f" {json.dumps(mp['params'], sort_keys=True)}" if mp.get("params") else ""))
    impl = {k: v for k, v in (rec.get("impl") or {}).items() if k not in RUN_STATE_IMPL_KEYS}
    keys = [k for k in IMPL_FIRST if k in impl] + sorted(k for k in impl if k not in IMPL_FIRST)
    for k in keys:
        v = impl[k]
        if v in (None, "", [], {}):
            continue
        s = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        parts.append(f"{k}: {s[:120]}")
    return "; ".join(parts) or "implementation not recorded"


#: the fields of an implementation record a reader needs to know which computation made a value (the rest — cache
#: state, device, sample counts, transforms, notes — is in the details and in the result file)
IMPL_SUMMARY = ("name", "version", "metric_version", "feature_extractor", "checkpoint", "weights", "weights_sha256",
                "preset", "library", "backend")
IMPL_NOTES = ("note", "warning", "substitution")


def _short(v: Any, n: int = 90) -> str:
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, ensure_ascii=False, allow_nan=False)
    return s if len(s) <= n else s[:n - 1] + "…"


def impl_summary(rec: dict) -> str:
    """One line naming the implementation: metric plugin and version, extractor, weights (sha256 prefix), preset,
    library; a field equal to one already shown (checkpoint = feature extractor) is left out."""
    parts = []
    mp = rec.get("metric_plugin") or {}
    if mp.get("name"):
        parts.append(f"metric plugin {mp.get('name')} v{mp.get('version')}")
    impl = rec.get("impl") or {}
    seen: set[str] = set()
    for k in IMPL_SUMMARY:
        v = impl.get(k)
        if v in (None, "", [], {}) or isinstance(v, (dict, list)):
            continue
        s = str(v)
        if k == "weights_sha256" and len(s) == 64:
            s = s[:12] + "…"
        if s in seen or (k == "weights" and any(s in t for t in seen)):
            continue
        seen.add(s)
        parts.append(f"{k}: {_short(s, 120)}")
    return "; ".join(parts) or "implementation not recorded"


def impl_details(rec: dict) -> list[tuple[str, str]]:
    """Every field of the implementation record and the metric plugin's parameters, as (key, short text)."""
    mp = rec.get("metric_plugin") or {}
    out = [(f"param {k}", _short(v)) for k, v in sorted((mp.get("params") or {}).items())]
    impl = rec.get("impl") or {}
    for k in sorted(impl):
        v = impl[k]
        if v in (None, "", [], {}):
            continue
        if isinstance(v, dict):
            out += [(f"{k}.{k2}", _short(v2)) for k2, v2 in sorted(v.items()) if v2 not in (None, "", [], {})]
        else:
            out.append((k, _short(v, 1000 if k in IMPL_NOTES else 90)))
    return out


def _impl_sig(rec: dict) -> str:
    impl = rec.get("impl")
    if isinstance(impl, dict):
        impl = {k: v for k, v in impl.items() if k not in RUN_STATE_IMPL_KEYS}
    return json.dumps([rec.get("metric_plugin"), impl], sort_keys=True, default=str)


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

    @property
    def mixed(self) -> bool:
        return len(self.impls) > 1


def columns_of(rows: list[Row], targets: set[str]) -> list[Column]:
    present = {n for w in rows for n in w.metrics}
    names = [n for n in HEADLINE_METRICS if n in present] + sorted(present - targets)
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
            notes=[t for t, _ in sorted(notes.items(), key=lambda kv: (-kv[1], kv[0]))]))
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


# ================================================================================================ images
def _png(arr) -> bytes:
    from .cache import png_bytes

    return png_bytes(arr)


class Images:
    """Images shown by the site, content-addressed: ``img/s/<image sha256>.png`` holds exactly the bytes whose sha256
    the samples file records. Sources, in order: the previous build, the cache, a crop of the run's grid PNG."""

    def __init__(self, results_dir: Path, reuse_dir: Path | None, cache_dir: Path | None):
        self.results_dir = results_dir
        self.reuse_dir = reuse_dir
        self.cache_dir = cache_dir
        self.files: dict[str, bytes] = {}
        self._grids: dict[tuple[str, str], dict] = {}
        self.refs: dict[tuple[str, str], str] = {}  # (prompt set, prompt id) → rel path of the training original

    def _verified(self, path: Path, sha: str) -> bytes | None:
        try:
            data = path.read_bytes()
        except OSError:
            return None
        return data if sha256_bytes(data) == sha else None

    def sample(self, res: Result, grid_key: str, row: dict) -> str | None:
        sha = row.get("image_sha256")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            return None
        rel = f"img/s/{sha}.png"
        if rel in self.files:
            return rel
        data = self._verified(self.reuse_dir / rel, sha) if self.reuse_dir else None
        ip = row.get("image_path")
        if data is None and self.cache_dir and isinstance(ip, str) and not Path(ip).is_absolute() \
                and ".." not in Path(ip).parts:
            data = self._verified(self.cache_dir / ip, sha)
        if data is None:
            data = self.grid(res, grid_key)["cells"].get(row.get("sample_key"))
        if data is None:
            return None
        self.files[rel] = data
        return rel

    def grid(self, res: Result, grid_key: str) -> dict:
        """Cells of a run's grid PNG (``grid_file``: target rows; ``grid_without_attack_file``: mitigated rows),
        each checked against the sha256 the samples file records: {"cells": {sample_key: png}, "refs": {…}}."""
        k = (res.rel, grid_key)
        if k in self._grids:
            return self._grids[k]
        out: dict = {"cells": {}, "refs": {}}
        self._grids[k] = out
        path = res.sibling(grid_key)
        role = "target" if grid_key == "grid_file" else "mitigated"
        rows = [s for s in res.samples or () if s.get("role") == role]
        if path is None or not rows:
            return out
        try:
            import numpy as np
            from PIL import Image

            with Image.open(path) as im:
                canvas = np.asarray(im.convert("RGB"))
        except Exception:
            return out
        by: dict[str, list[dict]] = {}
        for s in rows:
            by.setdefault(str(s.get("prompt_id")), []).append(s)
        prompts = list(by.values())[:GRID_MAX_PROMPTS]
        ncols = 1 + min(GRID_MAX_SEEDS, max(len(r) for r in prompts))
        H, W = canvas.shape[:2]
        cell = (W - GRID_PAD) // ncols - GRID_PAD
        if cell <= 0 or cell % GRID_SCALE or ncols * (cell + GRID_PAD) + GRID_PAD != W:
            return out
        score_h = next((h for h in GRID_SCORE_HS
                        if len(prompts) * (cell + GRID_LABEL_H + h + 6) + GRID_TOP == H), None)
        if score_h is None:
            return out
        y = GRID_TOP
        for r in prompts:
            y += GRID_LABEL_H
            ok = False
            x = GRID_PAD + cell + GRID_PAD
            for s in sorted(r, key=lambda s: (s.get("seed") if isinstance(s.get("seed"), int) else 0))[:GRID_MAX_SEEDS]:
                data = _png(canvas[y:y + cell:GRID_SCALE, x:x + cell:GRID_SCALE])
                if sha256_bytes(data) == s.get("image_sha256"):
                    out["cells"][s.get("sample_key")] = data
                    ok = True
                x += cell + GRID_PAD
            if ok and (r[0].get("n_references") or 0) > 0:  # layout confirmed on this row: the original is right
                ref = _png(canvas[y:y + cell:GRID_SCALE, GRID_PAD:GRID_PAD + cell:GRID_SCALE])
                out["refs"][str(r[0].get("prompt_id"))] = ref
            y += cell + score_h + 6
        return out

    def reference(self, res: Result, prompt_id: str) -> str | None:
        """The training original of a target prompt, from any grid of a result on the same prompt set."""
        pset = str((res.data.get("prompt_set") or {}).get("name"))
        return self.refs.get((pset, prompt_id))

    def collect_references(self, results: list[Result]) -> None:
        for res in results:  # sorted by path: the first grid that has an original supplies it
            pset = str((res.data.get("prompt_set") or {}).get("name"))
            for gk in ("grid_file", "grid_without_attack_file"):
                if not any(s.get("n_references") for s in res.samples or ()):
                    continue
                for pid, data in self.grid(res, gk)["refs"].items():
                    if (pset, pid) not in self.refs:
                        rel = f"img/ref/{sha256_bytes(data)}.png"
                        self.files[rel] = data
                        self.refs[(pset, pid)] = rel


@dataclass
class Comparison:
    """The image grid of one row: per target prompt, the training original, the mitigation alone and (for an
    attack) the mitigation + attack, for the first common seed."""

    headers: list[str]
    rows: list[dict]  # {prompt_id, text, mem_type, seed, cells: [(rel or None, caption)]}
    n_prompts: int


def _pick(samples: list[dict], pid: str, seed: int | None) -> dict | None:
    for s in samples:
        if str(s.get("prompt_id")) == pid and s.get("seed") == seed:
            return s
    return None


def comparison(w: Row, rows_by_key: dict[tuple, Row], images: Images) -> Comparison | None:
    res = w.res
    samples = res.samples or []
    own = [s for s in samples if s.get("role") == w.role]
    if not own:
        return None
    attacked = w.attack != NO_ATTACK
    if attacked:
        mit_src: tuple[Result, str, list[dict]] | None = None
        if any(s.get("role") == "mitigated" for s in samples):
            mit_src = (res, "grid_without_attack_file", [s for s in samples if s.get("role") == "mitigated"])
        else:
            o = rows_by_key.get((w.model, w.mitigation, NO_ATTACK))
            if o is not None and o.res.samples:
                mit_src = (o.res, o.grid_key, [s for s in o.res.samples if s.get("role") == o.role])
    order: list[str] = []
    first: dict[str, dict] = {}
    for s in own:
        pid = str(s.get("prompt_id"))
        if pid not in first:
            order.append(pid)
            first[pid] = s
    headers = ["training original", f"mitigation {w.mitigation}" + (" (no attack)" if attacked else "")]
    if attacked:
        headers.append(f"mitigation {w.mitigation} + attack {w.attack}")
    out = []
    for pid in order[:MAX_PROMPTS]:
        seeds = sorted({s.get("seed") for s in own if str(s.get("prompt_id")) == pid and isinstance(s.get("seed"), int)})
        seed = seeds[0] if seeds else None
        s0 = _pick(own, pid, seed)
        ref = images.reference(res, pid)
        cells: list[tuple[str | None, str]] = [(ref, "training image" if ref else "not available")]
        gen = (images.sample(res, w.grid_key, s0) if s0 else None, _caption(s0))
        if attacked:
            m = _pick(mit_src[2], pid, seed) if mit_src else None
            mg = mit_src[0] if mit_src else None
            cells.append((images.sample(mg, mit_src[1], m) if m and mg else None,
                          _caption(m) if m else "no run of the mitigation alone"))
        cells.append(gen)
        out.append({"prompt_id": pid, "text": str(first[pid].get("prompt") or ""),
                    "mem_type": first[pid].get("mem_type"), "seed": seed, "cells": cells})
    return Comparison(headers, out, len(order))


def _caption(s: dict | None) -> str:
    if not s:
        return "not available"
    v = _num(s.get("sscd_orig"))
    return f"seed {s.get('seed')}" + (f" · SSCD {v:.2f}" if v is not None else "")


def comparison_png(cmp: Comparison, images: Images) -> bytes | None:
    """The comparison as one PNG: a column per header, a row per prompt."""
    import numpy as np
    from PIL import Image, ImageDraw

    decoded: dict[str, Any] = {}
    res = None
    for r in cmp.rows:
        for rel, _ in r["cells"]:
            if rel and rel not in decoded:
                with Image.open(io.BytesIO(images.files[rel])) as im:
                    decoded[rel] = im.convert("RGB")
                res = res or decoded[rel].size[1]
    if res is None:
        return None
    cell = res * max(1, 128 // res) if res <= 128 else 256
    colw = max(cell, 150)
    label_h, head_h, pad = 14, 30, 6
    W = pad + len(cmp.headers) * (colw + pad)
    H = head_h + len(cmp.rows) * (label_h + cell + label_h + pad) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    for i, h in enumerate(cmp.headers):
        d.text((pad + i * (colw + pad), 8), h[:40], fill=(0, 0, 0))
    y = head_h
    for r in cmp.rows:
        d.text((pad, y), f"[{r['mem_type'] or '-'}] {r['text']}"[: W // 6], fill=(60, 60, 60))
        y += label_h
        for i, (rel, cap) in enumerate(r["cells"]):
            x = pad + i * (colw + pad)
            if rel:
                im = decoded[rel]
                canvas.paste(im.resize((cell, cell), Image.NEAREST if cell % im.size[1] == 0 else Image.BICUBIC),
                             (x, y))
            else:
                d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(238, 238, 238), outline=(180, 180, 180))
                d.text((x + 6, y + cell // 2 - 6), "not available", fill=(120, 120, 120))
            d.text((x, y + cell + 1), cap[:30], fill=(0, 0, 0))
        y += cell + label_h + pad
    return _png(np.asarray(canvas))


# ================================================================================================ SVG
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    t = math.ceil(lo / step - 1e-9) * step
    out = []
    while t <= hi + 1e-9 * step:
        out.append(round(t, 12))
        t += step
    return out


def _tick_label(v: float) -> str:
    s = f"{v:.4g}"
    return "0" if s in ("-0", "0") else s


def _range(vals: list[float], lo: float | None = None, hi: float | None = None) -> tuple[float, float]:
    a, b = min(vals), max(vals)
    if lo is not None and hi is not None and lo <= a and b <= hi:
        return lo, hi
    if a == b:
        d = abs(a) * 0.1 or 0.1
        return a - d, b + d
    d = (b - a) * 0.08
    return a - d, b + d


class _Axes:
    def __init__(self, w: int, h: int, xr: tuple[float, float], yr: tuple[float, float], left=64, right=20, top=20,
                 bottom=48):
        self.w, self.h, self.xr, self.yr = w, h, xr, yr
        self.l, self.r, self.t, self.b = left, right, top, bottom

    def x(self, v: float) -> float:
        return self.l + (v - self.xr[0]) / (self.xr[1] - self.xr[0]) * (self.w - self.l - self.r)

    def y(self, v: float) -> float:
        return self.h - self.b - (v - self.yr[0]) / (self.yr[1] - self.yr[0]) * (self.h - self.t - self.b)

    def frame(self, xlabel: str, ylabel: str, integer_x: bool = False) -> list[str]:
        s = [f'<rect x="{self.l}" y="{self.t}" width="{self.w - self.l - self.r}" '
             f'height="{self.h - self.t - self.b}" fill="#fbfcfd" stroke="#9aa4ae"/>']
        for v in _ticks(*self.xr):
            if integer_x and v != int(v):
                continue
            X = self.x(v)
            s.append(f'<line x1="{X:.1f}" y1="{self.t}" x2="{X:.1f}" y2="{self.h - self.b}" stroke="#e3e7eb"/>'
                     f'<text x="{X:.1f}" y="{self.h - self.b + 15}" text-anchor="middle">{_tick_label(v)}</text>')
        for v in _ticks(*self.yr):
            Y = self.y(v)
            s.append(f'<line x1="{self.l}" y1="{Y:.1f}" x2="{self.w - self.r}" y2="{Y:.1f}" stroke="#e3e7eb"/>'
                     f'<text x="{self.l - 6}" y="{Y + 4:.1f}" text-anchor="end">{_tick_label(v)}</text>')
        s.append(f'<text x="{(self.l + self.w - self.r) / 2:.1f}" y="{self.h - 10}" text-anchor="middle" '
                 f'font-weight="600">{E(xlabel)}</text>')
        s.append(f'<text transform="translate(16 {(self.t + self.h - self.b) / 2:.1f}) rotate(-90)" '
                 f'text-anchor="middle" font-weight="600">{E(ylabel)}</text>')
        return s


def _svg(w: int, h: int, label: str, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
            f'aria-label="{E(label)}" font-family="system-ui, sans-serif" font-size="11">'
            f'<title>{E(label)}</title>' + "".join(body) + "</svg>")


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


def privacy_utility_points(rows: list[Row], model: str, col: Column, href: Callable[[Row], str]) -> list[Point]:
    by_mit: dict[str, list[Row]] = {}
    for w in rows:
        if w.model == model:
            by_mit.setdefault(w.mitigation, []).append(w)
    pts = []
    for mit, ws in by_mit.items():
        ux = [(w, v) for w in ws if (v := value_of(w.metrics.get(col.name))) is not None]
        if not ux:
            continue
        uw, x = min(ux, key=lambda t: _sort_key(t[0].attack))  # the no-attack row's value when there is one
        xrec = uw.metrics.get(col.name) or {}
        dv, kind = _disp(xrec)
        over = (xrec.get("dispersion") or {}).get("over")
        xd = (abs(dv), kind + (f" over {over}" if isinstance(over, str) and over else "")) if dv is not None else None
        att = [(w, v) for w in ws if w.attack != NO_ATTACK and (v := value_of(w.metrics.get(PLOT_Y_METRIC))) is not None]
        if att:
            w, y = max(att, key=lambda t: (t[1], [-ord(c) for c in t[0].attack]))
            pts.append(Point(mit, x, y, True, f"strongest attack: {w.attack}", href(w), xdisp=xd))
            continue
        base = next((w for w in ws if w.attack == NO_ATTACK), None)
        y = value_of(base.metrics.get(PLOT_Y_METRIC)) if base else None
        if y is not None:
            pts.append(Point(mit, x, y, False, "no attack run: MR without attack", href(base), xdisp=xd))
    return pts


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


def privacy_utility_svg(model: str, col: Column, y_col: Column, points: list[Point]) -> str:
    W, H = 640, 440
    pareto(points, col.higher)
    xr = _range([p.x for p in points])  # utility: the measured range (the points would crowd in [min, max])
    yr = _range([p.y for p in points], y_col.rmin, y_col.rmax)  # MR: its full range [0, 1] …
    if (y_col.rmin, y_col.rmax) == yr:  # … with a margin, so that points at 0 or 1 do not sit on the frame
        yr = (yr[0] - 0.05 * (yr[1] - yr[0]), yr[1] + 0.05 * (yr[1] - yr[0]))
    ax = _Axes(W, H, xr, yr, top=48, right=16)
    body = ax.frame(f"{col.display} {arrow(col.higher)} (utility, {'higher' if col.higher else 'lower'} is better)",
                    f"{y_col.display} under attack ↓ (worst over attacks)")
    front = sorted((p for p in points if p.front), key=lambda p: p.x)
    if len(front) > 1:
        pts = " ".join(f"{ax.x(p.x):.1f},{ax.y(p.y):.1f}" for p in front)
        body.append(f'<polyline points="{pts}" fill="none" stroke="#d9480f" stroke-width="1.5" '
                    f'stroke-dasharray="5 3"/>')
    # labels: Pareto front first, then attacked points, each where it fits; the rest are named on hover
    order = sorted(points, key=lambda p: (not p.front, not p.attacked, p.mitigation))
    spots = place_labels([(ax.x(p.x), ax.y(p.y), p.mitigation[:28]) for p in order],
                         (ax.l + 1, ax.t + 1, W - ax.r - 1, H - ax.b - 1))
    label = {id(p): s for p, s in zip(order, spots)}
    for p in sorted(points, key=lambda p: (p.front, p.mitigation)):
        X, Y = ax.x(p.x), ax.y(p.y)
        fill = "#d9480f" if p.front else ("#4c6ef5" if p.attacked else "#ffffff")
        stroke = "#7a2a05" if p.front else "#2b3a8c"
        tip = (f"{p.mitigation}: {col.display} {fmt(p.x)}, {y_col.display} {fmt(p.y)} ({p.note})"
               + ("; Pareto front" if p.front else ""))
        body.append(f'<a href="{E(p.href)}"><title>{E(tip)}</title>'
                    f'<circle cx="{X:.1f}" cy="{Y:.1f}" r="5.5" fill="{fill}" stroke="{stroke}" stroke-width="1.5"/>'
                    + "</a>")
    for p in order:  # labels above every point (drawn last)
        sp = label[id(p)]
        if sp is not None:
            anchor = "" if sp[2] == "start" else f' text-anchor="{sp[2]}"'
            body.append(f'<a href="{E(p.href)}"><title>{E(p.mitigation)}</title><text class="pl" x="{sp[0]:.1f}" '
                        f'y="{sp[1]:.1f}"{anchor}>{E(p.mitigation[:28])}</text></a>')
    n_lab = sum(s is not None for s in spots)
    legend = [("#d9480f", "#7a2a05", "Pareto front"), ("#4c6ef5", "#2b3a8c", "dominated"),
              ("#ffffff", "#2b3a8c", "not attacked (MR w/o attack)")]
    lx = ax.l
    for f, s_, t in legend:
        body.append(f'<circle cx="{lx + 5}" cy="16" r="5" fill="{f}" stroke="{s_}" stroke-width="1.5"/>'
                    f'<text x="{lx + 14}" y="20">{E(t)}</text>')
        lx += 14 + text_width(t) + 12
    body.append(f'<text x="{ax.l}" y="38" fill="#5b6570">one point per mitigation'
                + (f" ({n_lab} of {len(points)} labelled: the rest did not fit)" if n_lab < len(points) else "")
                + "; hover for name and values, click for details</text>")
    return _svg(W, H, f"{model}: {y_col.display} under attack vs {col.display}", body)


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


def _polylines(ax: _Axes, vals: list[float | None]) -> list[str]:
    """``points`` attributes of the finite runs of a curve (a non-finite step breaks the line)."""
    runs, cur = [], []
    for j, v in enumerate(vals):
        if v is None:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(f"{ax.x(j):.1f},{ax.y(v):.1f}")
    if cur:
        runs.append(cur)
    return [" ".join(r) for r in runs]


@dataclass
class Curve:
    prompt_id: str
    raw: list[float | None]  # None: a non-finite (or missing) step
    smooth: list[float | None]
    n_nonfinite: int


def loss_svg(traces: dict, title: str) -> tuple[str, list[Curve]] | None:
    """The attack's loss curves: each prompt's raw curve faint, its centred moving average (the trend) bold, and
    the mean trend over the prompts in black."""
    curves: list[Curve] = []
    for pid in sorted(traces):
        tr = traces[pid]
        lc = tr.get("loss_curve") if isinstance(tr, dict) else None
        if isinstance(lc, list) and lc:
            vals = [_num(v) for v in lc]
            if any(v is not None for v in vals):
                curves.append(Curve(str(pid), vals, [], sum(v is None for v in vals)))
    if not curves:
        return None
    shown = curves[:MAX_PROMPTS]
    n = max(len(c.raw) for c in shown)
    half = smooth_half(n)
    for c in curves:
        c.smooth = smooth(c.raw, half)
    W, H = 1000, 460
    xr = (0.0, float(max(n - 1, 1)))
    yr = _range([v for c in shown for v in c.raw if v is not None])
    ax = _Axes(W, H, xr, yr, right=180, top=34)
    body = ax.frame("optimisation step", "loss (batch loss before the step)", integer_x=True)
    body.append(f'<text x="{ax.l}" y="22" fill="#5b6570">faint: the loss at each step; bold: its moving average '
                f'over {2 * half + 1} steps (the trend); black: the mean trend over the {len(shown)} prompts'
                + ("; gaps: non-finite steps" if any(c.n_nonfinite for c in shown) else "") + "</text>")
    for i, c in enumerate(shown):
        color = PALETTE[i % len(PALETTE)]
        dash = "" if i < len(PALETTE) else ' stroke-dasharray="4 2"'
        first = next((v for v in c.smooth if v is not None), None)
        last = next((v for v in reversed(c.smooth) if v is not None), None)
        tip = f"{c.prompt_id}: trend {fmt(first)} → {fmt(last)}" + (
            f"; {c.n_nonfinite} non-finite steps" if c.n_nonfinite else "")
        for pts in _polylines(ax, c.raw):
            body.append(f'<polyline class="raw" points="{pts}" fill="none" stroke="{color}" stroke-width="1" '
                        f'stroke-opacity="0.25"><title>{E(tip)}</title></polyline>')
        for pts in _polylines(ax, c.smooth):
            body.append(f'<polyline class="smooth" points="{pts}" fill="none" stroke="{color}" stroke-width="1.7"'
                        f'{dash}><title>{E(tip)}</title></polyline>')
        ly = ax.t + 6 + i * 16
        body.append(f'<line x1="{W - 170}" y1="{ly}" x2="{W - 150}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>'
                    f'<text x="{W - 144}" y="{ly + 4}">{E(c.prompt_id[:24])}</text>')
    mean = []
    for j in range(n):
        vs = [c.smooth[j] for c in shown if j < len(c.smooth) and c.smooth[j] is not None]
        mean.append(sum(vs) / len(vs) if vs else None)
    if len(shown) > 1:
        for pts in _polylines(ax, mean):
            body.append(f'<polyline class="mean" points="{pts}" fill="none" stroke="#111" stroke-width="3">'
                        f'<title>mean trend over the prompts</title></polyline>')
        ly = ax.t + 6 + len(shown) * 16
        body.append(f'<line x1="{W - 170}" y1="{ly}" x2="{W - 150}" y2="{ly}" stroke="#111" stroke-width="3"/>'
                    f'<text x="{W - 144}" y="{ly + 4}">mean trend</text>')
    return _svg(W, H, title, body), curves


# ================================================================================================ HTML
CSS = """
:root{--fg:#1d232a;--muted:#5b6570;--line:#d7dce1;--accent:#0b5cad;--zebra:#f6f8fa;--head:#eef1f4}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg);margin:0 auto;
max-width:1320px;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:30px 0 8px;border-bottom:1px solid var(--line);
padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
a{color:var(--accent)}.muted{color:var(--muted)}code{font-size:12.5px;background:#f2f4f6;padding:1px 4px;border-radius:3px}
table{border-collapse:collapse;width:100%}th,td{padding:5px 8px;border-bottom:1px solid var(--line);text-align:left;
vertical-align:top}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
#lb{width:auto;min-width:100%}#lb td{white-space:nowrap}#lb th.num{white-space:normal;min-width:5.5em}
#lb thead th{position:sticky;top:0;background:var(--head);cursor:pointer;user-select:none;vertical-align:bottom}
#lb th,#lb td{padding:5px 7px}.nf{color:#c92a2a;font-weight:600}
#lb thead th:hover{background:#e2e7ec}#lb thead th:focus{outline:2px solid var(--accent);outline-offset:-2px}
th[aria-sort=ascending]::after{content:" \\25B4";color:var(--accent)}
th[aria-sort=descending]::after{content:" \\25BE";color:var(--accent)}
tbody tr:nth-child(even){background:var(--zebra)}
.pm{color:var(--muted);font-size:12px}.tag{display:inline-block;padding:0 5px;border-radius:3px;background:#e8eef6;
font-size:11px;color:#234;margin-left:4px}.warn{color:#b35c00}
.st-partial{color:#b35c00}.st-failed{color:#c92a2a}
.filters{display:flex;gap:22px;flex-wrap:wrap;margin:10px 0}.filters label{margin-right:10px}
.plots{display:flex;flex-wrap:wrap;gap:16px}.plots figure{margin:0;flex:1 1 560px;max-width:652px}
.plots figcaption{color:var(--muted);font-size:12px}
td.impl{font-size:12px}td.impl details{margin-top:2px}td.impl summary{cursor:pointer;color:var(--accent)}
td.impl dl.kv{margin:4px 0;font-size:11.5px}
svg{max-width:100%;height:auto;background:#fff}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:3px 14px;margin:0}dl.kv dt{color:var(--muted)}
dl.kv dd{margin:0;word-break:break-word}
table.cmp td{text-align:center}table.cmp td.p{text-align:left;max-width:260px}
table.cmp img{width:128px;height:128px;image-rendering:pixelated;border:1px solid var(--line)}
.na{display:inline-block;width:128px;height:128px;line-height:128px;background:#eee;color:#888;font-size:12px}
.cap{font-size:11.5px;color:var(--muted)}img.grid{max-width:100%;border:1px solid var(--line)}
"""

JS = """
(function(){
var table=document.getElementById('lb');if(!table)return;
var tbody=table.tBodies[0],heads=table.tHead.rows[0].cells,state={col:-1,dir:1};
function key(td,type){var v=td.getAttribute('data-v');
 if(type==='num'){return (v===null||v==='')?null:parseFloat(v);}return (v!==null?v:td.textContent).toLowerCase();}
function sortBy(i,dir){var type=heads[i].getAttribute('data-type'),rows=Array.prototype.slice.call(tbody.rows);
 rows.sort(function(a,b){var x=key(a.cells[i],type),y=key(b.cells[i],type),o=a.getAttribute('data-i')-b.getAttribute('data-i');
  if(x===null&&y===null)return o;if(x===null)return 1;if(y===null)return -1;
  var c=type==='num'?x-y:x.localeCompare(y);return c!==0?dir*c:o;});
 rows.forEach(function(r){tbody.appendChild(r);});
 for(var j=0;j<heads.length;j++)heads[j].removeAttribute('aria-sort');
 heads[i].setAttribute('aria-sort',dir>0?'ascending':'descending');}
Array.prototype.forEach.call(heads,function(h,i){if(!h.getAttribute('data-type'))return;h.tabIndex=0;
 h.addEventListener('click',function(){var dir=state.col===i?-state.dir:(h.getAttribute('data-better')==='higher'?-1:1);
  state={col:i,dir:dir};sortBy(i,dir);});
 h.addEventListener('keydown',function(e){if(e.key==='Enter'||e.key===' '){e.preventDefault();h.click();}});});
var boxes=document.querySelectorAll('input[data-filter]');
function apply(){var shown=0;Array.prototype.forEach.call(tbody.rows,function(r){var hide=false;
 Array.prototype.forEach.call(boxes,function(b){if(!b.checked&&r.getAttribute('data-'+b.getAttribute('data-filter'))===b.value)hide=true;});
 r.hidden=hide;if(!hide)shown++;});document.getElementById('shown').textContent=shown;}
Array.prototype.forEach.call(boxes,function(b){b.addEventListener('change',apply);});
})();
"""


def _page(title: str, body: str, css_extra: str = "") -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src 'self' file: data:; "
            "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">\n"
            f"<title>{E(title)}</title>\n<style>{CSS}{css_extra}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _attr(text: str) -> str:
    """An attribute value: escaped, with line breaks kept (tooltips)."""
    return E(text).replace("\n", "&#10;")


def _q(rel: str) -> str:
    return E(urllib.parse.quote(rel, safe="/._-~"))


def _params(p: Any) -> str:
    return json.dumps(p, sort_keys=True, ensure_ascii=False) if p else "{}"


def _cell(w: Row, c: Column) -> str:
    rec = w.metrics.get(c.name)
    if rec is None:
        return '<td class="num muted" data-v="">—</td>'
    v = value_of(rec)
    if v is None:
        short, why = missing_text(rec)
        return (f'<td class="num {"nf" if nonfinite_of(rec) else "muted"}" data-v="" title="{_attr(why)}">'
                f'{E(short)}</td>')
    d, kind = _disp(rec)
    flag = ""
    if c.main_sig.get(w.model) != _impl_sig(rec):
        flag = f' <span class="warn" title="{_attr("different implementation: " + impl_summary(rec))}">≠</span>'
    tip = f"n = {rec.get('n')}" + (f"; ± is the {kind}" if d is not None else "")
    return (f'<td class="num" data-v="{v!r}" title="{_attr(tip)}">{fmt(v)}'
            + (f' <span class="pm">± {fmt_disp(d)}</span>' if d is not None else "") + f"{flag}</td>")


def _source_link(w: Row, prefix: str) -> str:
    label = w.res.data.get("run_id") or Path(w.res.rel).stem
    extra = " · no-attack half" if w.scoring == "paired" else ""
    return f'<a href="{prefix}runs/{_q(w.res.rel)}">{E(str(label))}</a>{E(extra)}'


def _header_cell(c: Column) -> str:
    lines = [f"{c.display} ({c.name}): {'higher' if c.higher else 'lower'} is better"]
    if c.mixed:
        lines.append("MIXED implementations across rows (cells marked ≠ differ from the most common one):")
    for t, k in c.impls:
        lines.append(f"implementation{'' if not c.mixed else f' ({k} rows)'}: {t}")
    lines += c.notes
    warn = ' <span class="warn">≠</span>' if c.mixed else ""
    return (f'<th class="num" data-type="num" data-better="{"higher" if c.higher else "lower"}" '
            f'title="{_attr(chr(10).join(lines))}">{E(c.display)} {arrow(c.higher)}{warn}</th>')


WIN_RATE = ("win rate: the share of the same model's other rows that a row beats, per metric column in the "
            "column's direction (a tie counts half), averaged over the columns where the row has a value — 1.00 "
            "beats every other row on every metric, 0.50 is the middle.")


def index_html(rows: list[Row], cols: list[Column], results: list[Result], plots: list[tuple[str, str, str, str]],
               unplotted: list[str]) -> str:
    statuses = sorted({w.status for w in rows})
    origins = sorted({w.origin for w in rows})
    models = sorted({w.model for w in rows})
    head = ('<th data-type="text">Model</th><th data-type="text">Mitigation</th><th data-type="text">Attack</th>'
            + "".join(_header_cell(c) for c in cols)
            + f'<th class="num" data-type="num" data-better="higher" title="{_attr(WIN_RATE)}">win rate ↑</th>'
              '<th data-type="text">Status</th><th data-type="text">Origin</th><th data-type="text">Source</th>')
    body_rows = []
    for i, w in enumerate(rows):
        mit = w.res.data["mitigation"]
        att = w.res.data["attack"]
        att_cell = (E(w.attack) if w.scoring == "explicit"
                    else f'{E(w.attack)}<span class="tag" title="{_attr("from the paired result of attack " + str(att.get("name")))}">paired</span>')
        dist = mit.get("dist") if w.origin == "built-in" else f"{mit.get('dist')} / {att.get('dist')}"
        body_rows.append(
            f'<tr data-i="{i}" data-status="{E(w.status)}" data-origin="{E(w.origin)}">'
            f'<td>{E(w.model)}</td>'
            f'<td><a href="pairings/{_q(w.slug)}.html" title="{_attr("v" + str(mit.get("version")) + " " + _params(mit.get("params")))}">{E(w.mitigation)}</a></td>'
            f'<td>{att_cell}</td>'
            + "".join(_cell(w, c) for c in cols)
            + (f'<td class="num" data-v="{w.win_rate!r}">{w.win_rate:.2f}</td>' if w.win_rate is not None
               else '<td class="num muted" data-v="">—</td>')
            + f'<td class="st-{E(w.status)}">{E(w.status)}</td><td title="{_attr(str(dist))}">{E(w.origin)}</td>'
            f'<td>{_source_link(w, "")}</td></tr>')
    filters = ['<div class="filters"><div><b>status</b> ']
    filters += [f'<label><input type="checkbox" data-filter="status" value="{E(s)}" checked> {E(s)}</label>'
                for s in statuses]
    filters += ['</div><div><b>origin</b> ']
    filters += [f'<label><input type="checkbox" data-filter="origin" value="{E(o)}" checked> {E(o)}</label>'
                for o in origins]
    filters += [f'</div><div class="muted">showing <span id="shown">{len(rows)}</span> of {len(rows)} rows</div></div>']
    schemas = sorted({r.data["schema_version"] for r in results})
    versions = sorted({str(r.data.get("memobench_version")) for r in results})
    nf_note = (' <span class="nf">NaN</span>, <span class="nf">+inf</span>, <span class="nf">non-finite</span>: '
               'the run recorded a value that is not a finite number (hover it for the reason); n/a: no value.'
               if any(nonfinite_of(rec) for w in rows for rec in w.metrics.values()) else "")
    plot_html = "".join(f'<figure>{svg}<figcaption>{E(cap)} (<a href="{_q(rel)}">SVG</a>). {E(why)}</figcaption>'
                        f'</figure>' for rel, svg, cap, why in plots)
    if plot_html:
        plot_html = f'<div class="plots">{plot_html}</div>'
    plot_html += "".join(f'<p class="pm">Not plotted: {E(t)}</p>' for t in unplotted)
    impl_list = "".join(f"<li><b>{E(c.display)}</b> {arrow(c.higher)} — "
                        + "; ".join(f"{E(t)}" + (f" <span class='muted'>({k} rows)</span>" if c.mixed else "")
                                    for t, k in c.impls)
                        + "".join(f"<div class='pm'>{E(t)}</div>" for t in c.notes) + "</li>" for c in cols)
    body = f"""<header>
<h1>memobench leaderboard</h1>
<p class="muted">Memorization mitigations × attacks for text-to-image diffusion models. {len(rows)} rows
(one per model × mitigation × attack) from {len(results)} result files; model{'s' if len(models) > 1 else ''}
{E(", ".join(models))}; results of memobench {E(", ".join(versions))}, result schema {E(", ".join(map(str, schemas)))}.
MR: memorization rate, SSCD_orig: similarity of generations to the training image (both lower is better);
hover a column header for the metric's implementation. A row marked <span class="tag">paired</span> is the
no-attack half of an attack's result (same targets and seeds).</p>
</header>
<h2>Table</h2>
{"".join(filters)}
<table id="lb"><thead><tr>{head}</tr></thead><tbody>
{chr(10).join(body_rows)}
</tbody></table>
<p class="pm">Click a column header to sort (first click: best first). ± is the dispersion the metric reports
(hover a value for its kind and n). ≠ marks a value computed by a different implementation than the column's
most common one.{nf_note} Every number links to its result file under <code>runs/</code>.</p>
<p class="pm">{E(WIN_RATE[0].upper() + WIN_RATE[1:])}</p>
<h2>Privacy–utility</h2>
{plot_html or '<p class="muted">No plot: the results have no utility metric or no MR.</p>'}
<p class="pm">MR under the strongest attack (the highest MR over the attacks run against the mitigation) against
a utility metric, one point per mitigation; the dashed line joins the Pareto front (no other mitigation is at least
as good on both axes and better on one). Hollow points: no attack was run against that mitigation, so its MR is
the MR without attack; they are left out of the front when attacked points exist. A label is drawn where it fits;
hover a point for its name and values. A utility metric is plotted only where it separates the mitigations: when
its values span more than the largest dispersion (±) they report, or, without a reported ±, differ at the
precision shown; each caption says by how much.</p>
<h2>Metric implementations</h2>
<ul>{impl_list}</ul>
<footer class="pm"><p>Generated by <code>memobench leaderboard build</code> from result files; the same table is in
<a href="LEADERBOARD.md">LEADERBOARD.md</a>, every value in <a href="leaderboard.csv">leaderboard.csv</a> /
<code>leaderboard.parquet</code> (long format). No file of this page is fetched from the network.</p></footer>
<script>{JS}</script>"""
    return _page("memobench leaderboard", body)


def _kv(items: list[tuple[str, str]]) -> str:
    return '<dl class="kv">' + "".join(f"<dt>{E(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def _seeds_text(seeds: Any) -> str:
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        return json.dumps(seeds)
    s = sorted(seeds)
    if s == list(range(s[0], s[-1] + 1)) and len(s) > 2:
        return f"{s[0]}-{s[-1]}"
    return ",".join(map(str, s))


def detail_html(w: Row, cols_all: list[str], cmp: Comparison | None, cmp_png: str | None, grids: list[tuple[str, str]],
                loss: tuple[str, list] | None, loss_rel: str | None) -> str:
    d = w.res.data
    mit, att, model, ps = d["mitigation"], d["attack"], d["model"], d.get("prompt_set") or {}
    gen = d.get("generation") or {}
    seeds = (d.get("seeds") or {}).get("target")
    info = [
        ("model", f"{E(w.model)} <span class='pm'>{E(_params(model.get('plugin', {}).get('params')))}; weights "
                  f"{E(str(model.get('revision_or_sha256', 'n/a'))[:16])}; {E(str(model.get('dtype', '')))}</span>"),
        ("prompt set", f"{E(str(ps.get('name')))} <span class='pm'>v{E(str(ps.get('version')))}, "
                       f"{E(str(ps.get('n_effective')))} of {E(str(ps.get('n_original')))} prompts</span>"),
        ("mitigation", f"{E(w.mitigation)} v{E(str(mit.get('version')))} <span class='pm'>"
                       f"({E(str(mit.get('dist')))}) {E(_params(mit.get('params')))}</span>"),
        ("attack", (f"{E(w.attack)} <span class='pm'>(no attack; the no-attack half of the paired result of attack "
                    f"{E(str(att.get('name')))})</span>") if w.scoring == "paired" else
                   f"{E(w.attack)} v{E(str(att.get('version')))} <span class='pm'>({E(str(att.get('dist')))}) "
                   f"{E(_params(att.get('params')))}</span>"),
        ("seeds", E(_seeds_text(seeds))),
        ("generation", E(", ".join(f"{k} {v}" for k, v in sorted(gen.items())))),
        ("status", f"<span class='st-{E(w.status)}'>{E(w.status)}</span>"
                   + "".join(f"<br><span class='pm'>{E(str(e))}</span>" for e in (d.get("errors") or [])[:10])),
        ("result", f"{_source_link(w, '../')} <span class='pm'>config {E(str(d.get('config_hash', ''))[:16])}, "
                   f"memobench {E(str(d.get('memobench_version')))}, schema {E(str(d.get('schema_version')))}, "
                   f"{E(str(d.get('created_at', '')))}</span>"),
    ]
    if w.also:
        info.append(("also paired in", E(", ".join(w.also))))
    mrows = []
    for n in sorted(w.metrics, key=lambda n: (n not in cols_all, cols_all.index(n) if n in cols_all else 0, n)):
        rec = w.metrics[n]
        v = value_of(rec)
        dv, kind = _disp(rec)
        groups = rec.get("groups") or {}
        gtxt = ", ".join(f"{g} {fmt(value_of(gv)) if value_of(gv) is not None else missing_text(gv)[0]}"
                         + (f" (n {gv.get('n')})" if gv.get("n") is not None else "")
                         for g, gv in sorted(groups.items()) if isinstance(gv, dict))
        if v is not None:
            val = fmt(v)
        else:
            short, why = missing_text(rec)
            val = (f"<span class='{'nf' if nonfinite_of(rec) else 'muted'}' title='{_attr(why)}'>{E(short)}</span>"
                   f"<div class='pm'>{E(why)}</div>")
        impl = rec.get("impl") or {}
        notes = "".join(f"<div class='pm'>{E(k)}: {E(str(impl[k]))}</div>" for k in IMPL_NOTES
                        if isinstance(impl.get(k), str) and impl[k])
        det = impl_details(rec)
        more = (f"<details><summary>implementation record: {len(det)} fields</summary>"
                + _kv([(k, E(t)) for k, t in det]) + "</details>") if det else ""
        mrows.append(f"<tr><td>{E(str(rec.get('display_name') or n))} <span class='pm'>{E(n)}</span></td>"
                     f"<td>{arrow(_higher(rec))}</td><td class='num'>{val}</td>"
                     f"<td class='num'>{fmt_disp(dv) + ' ' + E(kind) if dv is not None else ''}</td>"
                     f"<td class='num'>{E(str(rec.get('n', '')))}</td><td class='pm'>{E(gtxt)}</td>"
                     f"<td class='impl'>{E(impl_summary(rec))}{notes}{more}</td></tr>")
    parts = ['<p><a href="../index.html">← leaderboard</a></p>',
             f"<h1>{E(w.mitigation)} × {E(w.attack)} <span class='muted'>on {E(w.model)}</span></h1>",
             _kv(info), "<h2>Metrics</h2>",
             "<table><thead><tr><th>metric</th><th></th><th class='num'>value</th><th class='num'>±</th>"
             "<th class='num'>n</th><th>groups</th><th>implementation</th></tr></thead><tbody>"
             + ("".join(mrows) or "<tr><td colspan='7' class='muted'>no metric values in this result</td></tr>")
             + "</tbody></table>", "<h2>Images</h2>"]
    if cmp is not None:
        parts.append(f"<p class='muted'>Per target prompt (first {len(cmp.rows)} of {cmp.n_prompts}), the first "
                     f"seed: the training image, what the mitigated model generates from the prompt"
                     + (", and what it generates from the attack's conditioning" if len(cmp.headers) > 2 else "")
                     + ". The number is the SSCD similarity to the training image when the run computed it."
                     + (f" <a href='../{_q(cmp_png)}'>As one PNG</a>." if cmp_png else "") + "</p>")
        head = "".join(f"<th>{E(h)}</th>" for h in cmp.headers)
        trs = []
        for r in cmp.rows:
            tds = []
            for rel, cap in r["cells"]:
                img = (f"<img src='../{_q(rel)}' alt='{_attr(cap)}'>" if rel
                       else f"<span class='na'>{E(cap if cap == 'not available' else 'not available')}</span>")
                tds.append(f"<td>{img}<div class='cap'>{E(cap)}</div></td>")
            trs.append(f"<tr><td class='p'><span class='tag'>{E(str(r['mem_type'] or '-'))}</span> {E(r['text'])}"
                       f"<div class='pm'>{E(r['prompt_id'])}</div></td>{''.join(tds)}</tr>")
        parts.append(f"<table class='cmp'><thead><tr><th>prompt</th>{head}</tr></thead><tbody>{''.join(trs)}"
                     f"</tbody></table>")
    else:
        parts.append("<p class='muted'>No per-sample table (samples file) for this result: no image grid.</p>")
    for rel, cap in grids:
        parts.append(f"<h3>{E(cap)}</h3><p><a href='../{_q(rel)}'><img class='grid' src='../{_q(rel)}' "
                     f"alt='{_attr(cap)}'></a></p>")
    if w.attack != NO_ATTACK:
        parts.append("<h2>Attack loss curves</h2>")
        if loss is not None:
            svg, curves = loss
            half = smooth_half(max(len(c.raw) for c in curves[:MAX_PROMPTS]))

            def ends(vals: list[float | None]) -> tuple[str, str]:
                fin = [v for v in vals if v is not None]
                return (fmt(fin[0]), fmt(fin[-1])) if fin else ("n/a", "n/a")

            def cells(c: Curve) -> str:
                (r0, r1), (s0, s1) = ends(c.raw), ends(c.smooth)
                nf = (f"<span class='nf'>{c.n_nonfinite}</span>" if c.n_nonfinite else "0")
                return (f"<tr><td>{E(c.prompt_id)}</td><td class='num'>{len(c.raw)}</td><td class='num'>{r0}</td>"
                        f"<td class='num'>{r1}</td><td class='num'>{s0}</td><td class='num'>{s1}</td>"
                        f"<td class='num'>{nf}</td></tr>")
            parts.append(f"<p class='muted'>One curve per target prompt (first {min(len(curves), MAX_PROMPTS)} of "
                         f"{len(curves)}), from the attack trace of the result: the loss of each step is noisy (a "
                         f"random timestep and noise per step), so each curve is drawn faint with its centred moving "
                         f"average over {2 * half + 1} steps on top, and the mean of those trends in black. "
                         f"<a href='../{_q(loss_rel)}'>SVG</a></p>" + svg)
            parts.append("<table><thead><tr><th>prompt</th><th class='num'>steps</th><th class='num'>first loss</th>"
                         "<th class='num'>last loss</th><th class='num'>trend: first</th>"
                         "<th class='num'>trend: last</th><th class='num'>non-finite steps</th></tr></thead><tbody>"
                         + "".join(cells(c) for c in curves[:MAX_PROMPTS]) + "</tbody></table>")
        else:
            parts.append("<p class='muted'>The attack recorded no loss curve in its trace.</p>")
    return _page(f"{w.mitigation} × {w.attack} on {w.model} — memobench", "\n".join(parts))


# ================================================================================================ tables
def _md(s: Any) -> str:
    out = str(s)
    for a, b in (("\\", "\\\\"), ("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|"), ("`", "\\`"),
                 ("*", "\\*"), ("_", "\\_"), ("[", "\\["), ("]", "\\]"), ("\n", " ")):
        out = out.replace(a, b)
    return out


def leaderboard_md(rows: list[Row], cols: list[Column], n_results: int) -> str:
    lines = ["# memobench leaderboard", "",
             f"{len(rows)} rows (model × mitigation × attack) from {n_results} result files. Generated by "
             "`memobench leaderboard build`; do not edit by hand. Interactive version with image grids and loss "
             "curves: `index.html` in this folder.", ""]
    head = ["Model", "Mitigation", "Attack"] + [f"{_md(c.display)} {arrow(c.higher)}" for c in cols] + \
           ["win rate ↑", "Status", "Source"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(cols) + 1) + ["---"] * 2) + "|")
    for w in rows:
        cells = [_md(w.model), f"[{_md(w.mitigation)}](pairings/{urllib.parse.quote(w.slug)}.html)",
                 _md(w.attack) + (" (paired)" if w.scoring == "paired" else "")]
        for c in cols:
            rec = w.metrics.get(c.name)
            v = value_of(rec)
            d, _ = _disp(rec)
            flag = " ≠" if rec is not None and v is not None and c.main_sig.get(w.model) != _impl_sig(rec) else ""
            cells.append("—" if rec is None else _md(missing_text(rec)[0]) if v is None else
                         fmt(v) + (f" ± {fmt_disp(d)}" if d is not None else "") + flag)
        cells.append(f"{w.win_rate:.2f}" if w.win_rate is not None else "—")
        cells.append(_md(w.status))
        cells.append(f"[{_md(w.res.data.get('run_id') or Path(w.res.rel).stem)}](runs/{urllib.parse.quote(w.res.rel)})")
        lines.append("| " + " | ".join(cells) + " |")
    nf = any(nonfinite_of(rec) for w in rows for rec in w.metrics.values())
    lines += ["", "± is the dispersion each metric reports; ≠ marks a value computed by another implementation than "
                  "the column's most common one. (paired): the no-attack half of an attack's result."
              + (" NaN, +inf, -inf, non-finite: the run recorded a value that is not a finite number; n/a: no value."
                 if nf else ""), "", _md(WIN_RATE[0].upper() + WIN_RATE[1:]), "",
              "## Metric implementations", ""]
    for c in cols:
        lines.append(f"- **{_md(c.display)}** ({_md(c.name)}, {'higher' if c.higher else 'lower'} is better): "
                     + "; ".join(_md(t) + (f" ({k} rows)" if c.mixed else "") for t, k in c.impls)
                     + "".join(f" — {_md(t)}" for t in c.notes))
    lines += ["", "## Every value", "", "| Model | Mitigation | Attack | Metric | ↑/↓ | Value | ± | n |",
              "|---|---|---|---|---|---:|---:|---:|"]
    for w in rows:
        for n in sorted(w.metrics):
            rec = w.metrics[n]
            v = value_of(rec)
            d, kind = _disp(rec)
            lines.append(f"| {_md(w.model)} | {_md(w.mitigation)} | {_md(w.attack)} | {_md(n)} | "
                         f"{arrow(_higher(rec))} | {fmt(v) if v is not None else _md(missing_text(rec)[0])} | "
                         f"{fmt_disp(d) + ' ' + _md(kind) if d is not None else ''} | {_md(rec.get('n', ''))} |")
    return "\n".join(lines) + "\n"


def long_rows(rows: list[Row]) -> list[dict]:
    out = []
    for w in rows:
        d = w.res.data
        mit, att = d["mitigation"], d["attack"]
        base = {
            "model": w.model, "prompt_set": str((d.get("prompt_set") or {}).get("name", "")),
            "mitigation": w.mitigation, "mitigation_version": str(mit.get("version", "")),
            "mitigation_dist": str(mit.get("dist") or ""), "mitigation_params": _params(mit.get("params")),
            "attack": w.attack,
            "attack_version": str(att.get("version", "")) if w.scoring == "explicit" else "",
            "attack_dist": str(att.get("dist") or "") if w.scoring == "explicit" else "",
            "attack_params": _params(att.get("params")) if w.scoring == "explicit" else "{}",
            "scoring": w.scoring if w.scoring == "explicit" else f"paired:{att.get('name')}",
            "seeds": _seeds_text((d.get("seeds") or {}).get("target")), "status": w.status,
            "memobench_version": str(d.get("memobench_version", "")), "schema_version": int(d["schema_version"]),
            "run_id": str(d.get("run_id", "")), "config_hash": str(d.get("config_hash", "")),
            "created_at": str(d.get("created_at", "")), "source": w.res.rel,
        }
        for n in sorted(w.metrics):
            rec = w.metrics[n]
            mrec = {"metric": n, "display_name": str(rec.get("display_name") or n),
                    "higher_is_better": _higher(rec),
                    "unavailable": (f"non-finite value in the result ({nonfinite_of(rec)})" if nonfinite_of(rec)
                                    else str(rec.get("unavailable") or "")),
                    "metric_plugin_version": str((rec.get("metric_plugin") or {}).get("version", "")),
                    "impl": impl_text(rec)}
            groups = [("", rec)] + [(str(g), gv) for g, gv in sorted((rec.get("groups") or {}).items())
                                    if isinstance(gv, dict)]
            for g, gv in groups:
                dv, kind = _disp(gv)
                n_ = gv.get("n")
                out.append({**base, **mrec, "group": g or "overall",
                            "value": None if g == "" and rec.get("unavailable") else _num(gv.get("value")),
                            "dispersion": dv, "dispersion_kind": kind,
                            "n": n_ if isinstance(n_, int) and not isinstance(n_, bool) else None})
    return out


def csv_bytes(records: list[dict]) -> bytes:
    buf = io.StringIO()
    wr = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    wr.writeheader()
    for r in records:
        wr.writerow({k: ("" if r[k] is None else repr(r[k]) if isinstance(r[k], float) else r[k])
                     for k in CSV_COLUMNS})
    return buf.getvalue().encode("utf-8")


def parquet_bytes(csv_data: bytes) -> bytes:
    """The long table as parquet, parsed from the CSV by pyarrow's reader (the same rows and values; building arrays
    from Python objects would import pandas, a second of the build)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    types = {"value": pa.float64(), "dispersion": pa.float64(), "n": pa.int64(), "higher_is_better": pa.bool_(),
             "schema_version": pa.int64()}
    table = pcsv.read_csv(
        io.BytesIO(csv_data), read_options=pcsv.ReadOptions(use_threads=False),
        parse_options=pcsv.ParseOptions(newlines_in_values=True),
        convert_options=pcsv.ConvertOptions(column_types={k: types.get(k, pa.string()) for k in CSV_COLUMNS},
                                            strings_can_be_null=False, true_values=["True"], false_values=["False"]))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


# ================================================================================================ render
@dataclass
class Site:
    files: dict[str, bytes]
    n_rows: int
    n_results: int


def render(results_dir: str | Path, reuse_dir: str | Path | None = None, cache_dir: str | Path | None = None) -> Site:
    """Every file of the site, in memory: {path relative to the output folder: bytes}."""
    root = Path(results_dir)
    results = load_results(root)
    targets = target_metric_names(results)
    rows = collect_rows(results, targets)
    cols = columns_of(rows, targets)
    win_rates(rows, cols)
    images = Images(root, Path(reuse_dir) if reuse_dir else None, Path(cache_dir) if cache_dir else None)
    images.collect_references(results)
    files: dict[str, bytes] = {}
    by_key = {w.key: w for w in rows}
    col_names = [c.name for c in cols]
    for r in results:
        files[f"runs/{r.rel}"] = r.copy
    for w in rows:
        cmp = comparison(w, by_key, images)
        cmp_rel = None
        if cmp is not None:
            png = comparison_png(cmp, images)
            if png is not None:
                cmp_rel = f"img/grids/{w.slug}.png"
                files[cmp_rel] = png
        grids = []
        for gk, cap in (("grid_file", "the run's grid: " + ("mitigation + attack" if w.attack != NO_ATTACK
                                                              else "the mitigation")),
                        ("grid_without_attack_file", "the run's grid: the mitigation alone (no attack)")):
            if w.scoring == "paired" and gk == "grid_file":
                continue
            p = w.res.sibling(gk)
            if p is not None:
                rel = f"img/runs/{w.res.rel.rsplit('.', 1)[0]}.{gk.replace('_file', '')}.png"
                if rel not in files:
                    files[rel] = p.read_bytes()
                grids.append((rel, cap + " (training original | one image per seed)"))
        loss = None
        loss_rel = None
        if w.attack != NO_ATTACK:
            loss = loss_svg(w.res.data.get("attack_traces") or {}, f"{w.attack} loss curves: {w.mitigation} on {w.model}")
            if loss is not None:
                loss_rel = f"plots/loss-{w.slug}.svg"
                files[loss_rel] = ('<?xml version="1.0" encoding="UTF-8"?>\n' + loss[0] + "\n").encode()
        files[f"pairings/{w.slug}.html"] = detail_html(w, col_names, cmp, cmp_rel, grids, loss, loss_rel).encode()
    plots = []
    unplotted: list[str] = []
    y_col = next((c for c in cols if c.name == PLOT_Y_METRIC), None)
    if y_col is not None:
        for model in sorted({w.model for w in rows}):
            for c in cols:
                if c.name in targets:
                    continue
                pts = privacy_utility_points(rows, model, c, lambda w: f"pairings/{w.slug}.html")
                if not pts:
                    continue
                ok, why = axis_verdict(c, pts)
                if not ok:
                    unplotted.append(f"{model}: {why}")
                    continue
                svg = privacy_utility_svg(model, c, y_col, pts)
                rel = f"plots/privacy-utility-{_slug((model, c.name))}.svg"
                # the standalone file links to the detail pages from its own folder
                files[rel] = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                              + svg.replace('href="pairings/', 'href="../pairings/') + "\n").encode()
                plots.append((rel, svg, f"{model}: {y_col.display} under attack vs {c.display}", why))
    files.update(images.files)
    records = long_rows(rows)
    files["index.html"] = index_html(rows, cols, results, plots, unplotted).encode()
    files["LEADERBOARD.md"] = leaderboard_md(rows, cols, len(results)).encode()
    files["leaderboard.csv"] = csv_bytes(records)
    files["leaderboard.parquet"] = parquet_bytes(files["leaderboard.csv"])
    manifest = {"generator": "memobench leaderboard build", "rows": len(rows), "results": len(results),
                "files": {k: sha256_bytes(v) for k, v in sorted(files.items())}}
    files[MANIFEST] = (json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
    return Site(files, len(rows), len(results))


# ================================================================================================ write / check
def _read_manifest(out: Path) -> dict | None:
    try:
        m = json.loads((out / MANIFEST).read_text())
        return m if isinstance(m, dict) and isinstance(m.get("files"), dict) else None
    except (OSError, ValueError):
        return None


def _replace(path: Path, data: bytes) -> None:
    """Atomic replace (temporary file in the same folder, then ``os.replace``) without an fsync per file: the site
    is regenerated from the results at will, and 1,000 fsyncs cost 4 s on the development machine. The manifest,
    written last, goes through :func:`memobench.cache.atomic_write_bytes` (with fsync)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _same(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


@dataclass
class BuildReport:
    out: Path
    n_rows: int
    n_results: int
    written: int
    unchanged: int
    removed: int
    seconds: float


def _check_out(out: Path) -> dict | None:
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out: {out} is a file; pass a directory")
    old = _read_manifest(out) if out.is_dir() else None
    if out.is_dir() and old is None and any(out.iterdir()):
        raise BadInput(f"--out: {out} is not empty and holds no leaderboard ({MANIFEST} missing); choose an empty "
                       f"or new directory")
    return old


def build(results_dir: str | Path, out_dir: str | Path, cache_dir: str | Path | None = None) -> BuildReport:
    """Render the site and write it to ``out_dir``: unchanged files are left alone, files of the previous build
    that are no longer produced are removed, the manifest is written last."""
    t0 = time.time()
    out = Path(out_dir)
    old = _check_out(out)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    site = render(results_dir, reuse_dir=out if out.is_dir() else None, cache_dir=cache)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".memobench-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise BadInput(f"--out: cannot write to {out} ({e.strerror or e}); choose a writable directory") from None
    written = unchanged = removed = 0
    for rel, data in sorted(site.files.items()):
        if rel == MANIFEST:
            continue
        p = out / rel
        if _same(p, data):
            unchanged += 1
            continue
        _replace(p, data)
        written += 1
    for rel in sorted(set((old or {}).get("files", {})) - set(site.files)):
        p = out / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            continue
        try:
            p.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        for parent in p.parents:
            if parent == out or not parent.is_relative_to(out):
                break
            try:
                parent.rmdir()
            except OSError:
                break
    if not _same(out / MANIFEST, site.files[MANIFEST]):
        atomic_write_bytes(out / MANIFEST, site.files[MANIFEST])
        written += 1
    else:
        unchanged += 1
    return BuildReport(out, site.n_rows, site.n_results, written, unchanged, removed, time.time() - t0)


def check(results_dir: str | Path, out_dir: str | Path, cache_dir: str | Path | None = None) -> list[str]:
    """Files of ``out_dir`` that differ from what ``build`` would write now (empty: up to date)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out: {out} is a file; pass the leaderboard directory")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    site = render(results_dir, reuse_dir=out if out.is_dir() else None, cache_dir=cache)
    if not out.is_dir():
        return [f"{out.as_posix()}/ (missing: never built)"]
    stale = []
    for rel, data in sorted(site.files.items()):
        p = out / rel
        if not p.is_file():
            stale.append(f"{rel} (missing)")
        elif not _same(p, data):
            stale.append(f"{rel} (differs)")
    if out.is_dir():
        for p in sorted(out.rglob("*")):
            rel = p.relative_to(out).as_posix()
            if p.is_file() and rel not in site.files:
                stale.append(f"{rel} (not produced by the build)")
    return stale
