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
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import math
import os
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
    data: dict
    samples: list[dict] | None = None  # rows of the samples file (None: no samples file)

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
        r = Result(rel, p, raw, data)
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


def _disp(rec: dict | None) -> tuple[float | None, str]:
    d = (rec or {}).get("dispersion")
    if isinstance(d, dict):
        return _num(d.get("value")), str(d.get("kind") or "")
    return None, ""


def fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    a = abs(v)
    return f"{v:.3f}" if a < 10 else f"{v:.2f}" if a < 1000 else f"{v:.1f}"


def _higher(rec: dict | None) -> bool:
    return bool((rec or {}).get("higher_is_better"))


def arrow(higher: bool) -> str:
    return "↑" if higher else "↓"


IMPL_FIRST = ("name", "version", "metric_version", "feature_extractor", "checkpoint", "weights_sha256", "preset",
              "library", "backend")


def impl_text(rec: dict) -> str:
    """The implementation that produced a metric value: metric plugin, extractor, weights, library, preset."""
    parts = []
    mp = rec.get("metric_plugin") or {}
    if mp.get("name"):
        parts.append(f"metric plugin {mp.get('name')} v{mp.get('version')}"
                     + (f" {json.dumps(mp['params'], sort_keys=True)}" if mp.get("params") else ""))
    impl = rec.get("impl") or {}
    keys = [k for k in IMPL_FIRST if k in impl] + sorted(k for k in impl if k not in IMPL_FIRST)
    for k in keys:
        v = impl[k]
        if v in (None, "", [], {}):
            continue
        s = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        parts.append(f"{k}: {s[:120]}")
    return "; ".join(parts) or "implementation not recorded"


def _impl_sig(rec: dict) -> str:
    return json.dumps([rec.get("metric_plugin"), rec.get("impl")], sort_keys=True, default=str)


@dataclass
class Column:
    name: str
    display: str
    higher: bool
    impls: list[tuple[str, int]]  # (implementation text, number of rows), most common first
    main_sig: dict[str, str]  # model → most common implementation signature
    rmin: float | None = None
    rmax: float | None = None

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
        impls: dict[str, int] = {}
        sigs: dict[str, dict[str, int]] = {}
        for w, rec in recs:
            d = str(rec.get("display_name") or n)
            displays[d] = displays.get(d, 0) + 1
            t = impl_text(rec)
            impls[t] = impls.get(t, 0) + 1
            sm = sigs.setdefault(w.model, {})
            sm[_impl_sig(rec)] = sm.get(_impl_sig(rec), 0) + 1
        first = recs[0][1]
        cols.append(Column(
            name=n, display=_most_common(displays), higher=_higher(first),
            impls=sorted(impls.items(), key=lambda kv: (-kv[1], kv[0])),
            main_sig={m: _most_common(s) for m, s in sigs.items()},
            rmin=_num(first.get("min")), rmax=_num(first.get("max"))))
    return cols


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
        att = [(w, v) for w in ws if w.attack != NO_ATTACK and (v := value_of(w.metrics.get(PLOT_Y_METRIC))) is not None]
        if att:
            w, y = max(att, key=lambda t: (t[1], [-ord(c) for c in t[0].attack]))
            pts.append(Point(mit, x, y, True, f"strongest attack: {w.attack}", href(w)))
            continue
        base = next((w for w in ws if w.attack == NO_ATTACK), None)
        y = value_of(base.metrics.get(PLOT_Y_METRIC)) if base else None
        if y is not None:
            pts.append(Point(mit, x, y, False, "no attack run: MR without attack", href(base)))
    return pts


def privacy_utility_svg(model: str, col: Column, y_col: Column, points: list[Point]) -> str:
    W, H = 720, 420
    pareto(points, col.higher)
    xr = _range([p.x for p in points])  # utility: the measured range (the points would crowd in [min, max])
    yr = _range([p.y for p in points], y_col.rmin, y_col.rmax)  # MR: its full range [0, 1]
    ax = _Axes(W, H, xr, yr, right=200)
    body = ax.frame(f"{col.display} {arrow(col.higher)} (utility, {'higher' if col.higher else 'lower'} is better)",
                    f"{y_col.display} under attack ↓ (worst over attacks)")
    front = sorted((p for p in points if p.front), key=lambda p: p.x)
    if len(front) > 1:
        pts = " ".join(f"{ax.x(p.x):.1f},{ax.y(p.y):.1f}" for p in front)
        body.append(f'<polyline points="{pts}" fill="none" stroke="#d9480f" stroke-width="1.5" '
                    f'stroke-dasharray="5 3"/>')
    label = len(points) <= 30
    for p in sorted(points, key=lambda p: (p.front, p.mitigation)):
        X, Y = ax.x(p.x), ax.y(p.y)
        fill = "#d9480f" if p.front else ("#4c6ef5" if p.attacked else "#ffffff")
        stroke = "#7a2a05" if p.front else "#2b3a8c"
        tip = (f"{p.mitigation}: {col.display} {fmt(p.x)}, {y_col.display} {fmt(p.y)} ({p.note})"
               + ("; Pareto front" if p.front else ""))
        body.append(f'<a href="{E(p.href)}"><title>{E(tip)}</title>'
                    f'<circle cx="{X:.1f}" cy="{Y:.1f}" r="5.5" fill="{fill}" stroke="{stroke}" stroke-width="1.5"/>'
                    + ((f'<text x="{X - 8:.1f}" y="{Y - 6:.1f}" text-anchor="end">' if X > W - 260 else
                        f'<text x="{X + 8:.1f}" y="{Y - 6:.1f}">') + f'{E(p.mitigation[:28])}</text>' if label else "")
                    + "</a>")
    lx, ly = W - 186, 30
    legend = [("#d9480f", "#7a2a05", "Pareto front"), ("#4c6ef5", "#2b3a8c", "dominated"),
              ("#ffffff", "#2b3a8c", "not attacked (MR w/o attack)")]
    for i, (f, s, t) in enumerate(legend):
        body.append(f'<circle cx="{lx}" cy="{ly + i * 18}" r="5" fill="{f}" stroke="{s}" stroke-width="1.5"/>'
                    f'<text x="{lx + 10}" y="{ly + i * 18 + 4}">{E(t)}</text>')
    body.append(f'<text x="{lx - 5}" y="{ly + 64}" fill="#5b6570">one point per mitigation;</text>'
                f'<text x="{lx - 5}" y="{ly + 78}" fill="#5b6570">hover for values, click for details</text>')
    return _svg(W, H, f"{model}: {y_col.display} under attack vs {col.display}", body)


def loss_svg(traces: dict, title: str) -> tuple[str, list[tuple[str, list[float]]]] | None:
    curves = []
    for pid in sorted(traces):
        tr = traces[pid]
        lc = tr.get("loss_curve") if isinstance(tr, dict) else None
        if isinstance(lc, list):
            vals = [_num(v) for v in lc]
            if vals and all(v is not None for v in vals):
                curves.append((str(pid), vals))
    if not curves:
        return None
    shown = curves[:MAX_PROMPTS]
    W, H = 680, 360
    n = max(len(c) for _, c in shown)
    xr = (0.0, float(max(n - 1, 1)))
    yr = _range([v for _, c in shown for v in c])
    ax = _Axes(W, H, xr, yr, right=170)
    body = ax.frame("optimisation step", "loss (batch loss before the step)", integer_x=True)
    for i, (pid, c) in enumerate(shown):
        color = PALETTE[i % len(PALETTE)]
        dash = "" if i < len(PALETTE) else ' stroke-dasharray="4 2"'
        pts = " ".join(f"{ax.x(j):.1f},{ax.y(v):.1f}" for j, v in enumerate(c))
        body.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.4"{dash}>'
                    f'<title>{E(pid)}: {fmt(c[0])} → {fmt(c[-1])}</title></polyline>')
        body.append(f'<line x1="{W - 160}" y1="{26 + i * 16}" x2="{W - 142}" y2="{26 + i * 16}" stroke="{color}" '
                    f'stroke-width="2"{dash}/><text x="{W - 136}" y="{30 + i * 16}">{E(pid[:24])}</text>')
    return _svg(W, H, title, body), curves


# ================================================================================================ HTML
CSS = """
:root{--fg:#1d232a;--muted:#5b6570;--line:#d7dce1;--accent:#0b5cad;--zebra:#f6f8fa;--head:#eef1f4}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg);margin:0 auto;
max-width:1240px;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:30px 0 8px;border-bottom:1px solid var(--line);
padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
a{color:var(--accent)}.muted{color:var(--muted)}code{font-size:12.5px;background:#f2f4f6;padding:1px 4px;border-radius:3px}
table{border-collapse:collapse;width:100%}th,td{padding:5px 8px;border-bottom:1px solid var(--line);text-align:left;
vertical-align:top}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
#lb thead th{position:sticky;top:0;background:var(--head);cursor:pointer;user-select:none;white-space:nowrap}
#lb thead th:hover{background:#e2e7ec}#lb thead th:focus{outline:2px solid var(--accent);outline-offset:-2px}
th[aria-sort=ascending]::after{content:" \\25B4";color:var(--accent)}
th[aria-sort=descending]::after{content:" \\25BE";color:var(--accent)}
tbody tr:nth-child(even){background:var(--zebra)}
.pm{color:var(--muted);font-size:12px}.tag{display:inline-block;padding:0 5px;border-radius:3px;background:#e8eef6;
font-size:11px;color:#234;margin-left:4px}.warn{color:#b35c00}
.st-partial{color:#b35c00}.st-failed{color:#c92a2a}
.filters{display:flex;gap:22px;flex-wrap:wrap;margin:10px 0}.filters label{margin-right:10px}
.plots{display:flex;flex-wrap:wrap;gap:16px}.plots figure{margin:0}.plots figcaption{color:var(--muted);font-size:12px;
max-width:680px}
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
        why = rec.get("unavailable") or "no value recorded"
        return f'<td class="num muted" data-v="" title="{_attr(str(why))}">n/a</td>'
    d, kind = _disp(rec)
    flag = ""
    if c.main_sig.get(w.model) != _impl_sig(rec):
        flag = f' <span class="warn" title="{_attr("different implementation: " + impl_text(rec))}">≠</span>'
    tip = f"n = {rec.get('n')}" + (f"; ± is the {kind}" if d is not None else "")
    return (f'<td class="num" data-v="{v!r}" title="{_attr(tip)}">{fmt(v)}'
            + (f' <span class="pm">± {fmt(d)}</span>' if d is not None else "") + f"{flag}</td>")


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
    warn = ' <span class="warn">≠</span>' if c.mixed else ""
    return (f'<th class="num" data-type="num" data-better="{"higher" if c.higher else "lower"}" '
            f'title="{_attr(chr(10).join(lines))}">{E(c.display)} {arrow(c.higher)}{warn}</th>')


def index_html(rows: list[Row], cols: list[Column], results: list[Result], plots: list[tuple[str, str, str]]) -> str:
    statuses = sorted({w.status for w in rows})
    origins = sorted({w.origin for w in rows})
    models = sorted({w.model for w in rows})
    head = ('<th data-type="text">Model</th><th data-type="text">Mitigation</th><th data-type="text">Attack</th>'
            + "".join(_header_cell(c) for c in cols)
            + '<th class="num" data-type="num" data-better="higher" title="Mean win rate: per metric column, the '
              'share of this model&#39;s other rows this row beats (ties count half), averaged over the columns '
              'where it has a value.">win rate ↑</th>'
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
    plot_html = "".join(f'<figure>{svg}<figcaption>{E(cap)} (<a href="{_q(rel)}">SVG</a>)</figcaption></figure>'
                        for rel, svg, cap in plots)
    impl_list = "".join(f"<li><b>{E(c.display)}</b> {arrow(c.higher)} — "
                        + "; ".join(f"{E(t)}" + (f" <span class='muted'>({k} rows)</span>" if c.mixed else "")
                                    for t, k in c.impls) + "</li>" for c in cols)
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
most common one. Every number links to its result file under <code>runs/</code>.</p>
<h2>Privacy–utility</h2>
{plot_html or '<p class="muted">No plot: the results have no utility metric or no MR.</p>'}
<p class="pm">MR under the strongest attack (the highest MR over the attacks run against the mitigation) against
a utility metric, one point per mitigation; the dashed line joins the Pareto front (no other mitigation is at least
as good on both axes and better on one). Hollow points: no attack was run against that mitigation, so its MR is
the MR without attack; they are left out of the front when attacked points exist.</p>
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
        gtxt = ", ".join(f"{g} {fmt(value_of(gv) if isinstance(gv, dict) else None)}"
                         + (f" (n {gv.get('n')})" if isinstance(gv, dict) and gv.get("n") is not None else "")
                         for g, gv in sorted(groups.items()))
        val = fmt(v) if v is not None else f"n/a <span class='pm'>{E(str(rec.get('unavailable') or ''))}</span>"
        mrows.append(f"<tr><td>{E(str(rec.get('display_name') or n))} <span class='pm'>{E(n)}</span></td>"
                     f"<td>{arrow(_higher(rec))}</td><td class='num'>{val}</td>"
                     f"<td class='num'>{fmt(dv) + ' ' + E(kind) if dv is not None else ''}</td>"
                     f"<td class='num'>{E(str(rec.get('n', '')))}</td><td class='pm'>{E(gtxt)}</td>"
                     f"<td class='pm'>{E(impl_text(rec))}</td></tr>")
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
            parts.append(f"<p class='muted'>One curve per target prompt (first {min(len(curves), MAX_PROMPTS)} of "
                         f"{len(curves)}), from the attack trace of the result. <a href='../{_q(loss_rel)}'>SVG</a></p>"
                         + svg)
            parts.append("<table><thead><tr><th>prompt</th><th class='num'>steps</th><th class='num'>first loss</th>"
                         "<th class='num'>last loss</th></tr></thead><tbody>"
                         + "".join(f"<tr><td>{E(pid)}</td><td class='num'>{len(c)}</td><td class='num'>{fmt(c[0])}"
                                   f"</td><td class='num'>{fmt(c[-1])}</td></tr>" for pid, c in curves[:MAX_PROMPTS])
                         + "</tbody></table>")
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
            cells.append("—" if rec is None else "n/a" if v is None else
                         fmt(v) + (f" ± {fmt(d)}" if d is not None else "") + flag)
        cells.append(f"{w.win_rate:.2f}" if w.win_rate is not None else "—")
        cells.append(_md(w.status))
        cells.append(f"[{_md(w.res.data.get('run_id') or Path(w.res.rel).stem)}](runs/{urllib.parse.quote(w.res.rel)})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "± is the dispersion each metric reports; ≠ marks a value computed by another implementation than "
                  "the column's most common one. (paired): the no-attack half of an attack's result.", "",
              "## Metric implementations", ""]
    for c in cols:
        lines.append(f"- **{_md(c.display)}** ({_md(c.name)}, {'higher' if c.higher else 'lower'} is better): "
                     + "; ".join(_md(t) + (f" ({k} rows)" if c.mixed else "") for t, k in c.impls))
    lines += ["", "## Every value", "", "| Model | Mitigation | Attack | Metric | ↑/↓ | Value | ± | n |",
              "|---|---|---|---|---|---:|---:|---:|"]
    for w in rows:
        for n in sorted(w.metrics):
            rec = w.metrics[n]
            v = value_of(rec)
            d, kind = _disp(rec)
            lines.append(f"| {_md(w.model)} | {_md(w.mitigation)} | {_md(w.attack)} | {_md(n)} | "
                         f"{arrow(_higher(rec))} | {fmt(v) if v is not None else 'n/a'} | "
                         f"{fmt(d) + ' ' + _md(kind) if d is not None else ''} | {_md(rec.get('n', ''))} |")
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
                    "higher_is_better": _higher(rec), "unavailable": str(rec.get("unavailable") or ""),
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
        files[f"runs/{r.rel}"] = r.raw
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
    y_col = next((c for c in cols if c.name == PLOT_Y_METRIC), None)
    if y_col is not None:
        for model in sorted({w.model for w in rows}):
            for c in cols:
                if c.name in targets:
                    continue
                pts = privacy_utility_points(rows, model, c, lambda w: f"pairings/{w.slug}.html")
                if not pts:
                    continue
                svg = privacy_utility_svg(model, c, y_col, pts)
                rel = f"plots/privacy-utility-{_slug((model, c.name))}.svg"
                # the standalone file links to the detail pages from its own folder
                files[rel] = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                              + svg.replace('href="pairings/', 'href="../pairings/') + "\n").encode()
                plots.append((rel, svg, f"{model}: {y_col.display} under attack vs {c.display}"))
    files.update(images.files)
    records = long_rows(rows)
    files["index.html"] = index_html(rows, cols, results, plots).encode()
    files["LEADERBOARD.md"] = leaderboard_md(rows, cols, len(results)).encode()
    files["leaderboard.csv"] = csv_bytes(records)
    files["leaderboard.parquet"] = parquet_bytes(files["leaderboard.csv"])
    manifest = {"generator": "memobench leaderboard build", "rows": len(rows), "results": len(results),
                "files": {k: sha256_bytes(v) for k, v in sorted(files.items())}}
    files[MANIFEST] = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
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
