"""The site: :func:`render` makes every file in memory from the results directory; :func:`build` writes the changed
ones (and removes the ones no longer produced); :func:`check` names every file that differs (CI).

Determinism. The output is a function of the results directory (and the installed plugins' declarations) only:
rows and metrics are sorted, no clock is read, images are content-addressed, plots are deterministic SVG.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..cache import atomic_write_bytes, default_cache_dir, sha256_bytes
from ..config import BadInput
from . import declared
from .budget import budget_plots
from .export import csv_bytes, leaderboard_md, long_rows, parquet_bytes
from .html import detail_html, index_html
from .images import MAX_PROMPTS, Images, comparison, comparison_png
from .load import Result, load_results
from .plots import axis_verdict, loss_svg, privacy_utility_points, privacy_utility_svg, smooth_half
from .rows import Column, Row, _slug, collect_rows, columns_of, target_metric_names, win_rates
from .detection import detection_files

MANIFEST = "manifest.json"
XML = '<?xml version="1.0" encoding="UTF-8"?>\n'


@dataclass
class Site:
    files: dict[str, bytes]
    n_rows: int
    n_results: int


def _grid_score(cols: list[Column]) -> tuple[str, str] | None:
    """(metric id, display name) of the per-sample value shown under each image: the declared grid score."""
    for c in cols:
        if c.role.grid_score:
            return c.name, c.display
    return None


def _run_grids(w: Row, files: dict[str, bytes]) -> list[tuple[str, str]]:
    grids = []
    for gk, cap in (("grid_file", "the run's grid: " + ("mitigation + attack" if w.attacked else "the mitigation")),
                    ("grid_without_attack_file", "the run's grid: the mitigation alone (no attack)")):
        if w.scoring == "paired" and gk == "grid_file":
            continue
        p = w.res.sibling(gk)
        if p is not None:
            rel = f"img/runs/{w.res.rel.rsplit('.', 1)[0]}.{gk.replace('_file', '')}.png"
            if rel not in files:
                files[rel] = p.read_bytes()
            grids.append((rel, cap + " (training original | one image per seed)"))
    return grids


def _pairing(w: Row, partner: Row | None, images: Images, col_names: list[str], score: tuple[str, str] | None,
             files: dict[str, bytes]) -> None:
    """The detail page of a row and the files only it shows (comparison PNG, run grids, loss plot)."""
    cmp = comparison(w, partner, images, score)
    cmp_rel = None
    if cmp is not None:
        png = comparison_png(cmp, images)
        if png is not None:
            cmp_rel = f"img/grids/{w.slug}.png"
            files[cmp_rel] = png
    grids = _run_grids(w, files)
    loss = loss_rel = None
    window = 0
    if w.attacked:
        loss = loss_svg(w.res.data.get("attack_traces") or {}, f"{w.attack} loss curves: {w.mitigation} on {w.model}")
        if loss is not None:
            loss_rel = f"plots/loss-{w.slug}.svg"
            files[loss_rel] = (XML + loss[0]).encode()
            window = 2 * smooth_half(max(len(c.raw) for c in loss[1][:MAX_PROMPTS])) + 1
    files[f"pairings/{w.slug}.html"] = detail_html(w, col_names, cmp, cmp_rel, grids, loss, loss_rel,
                                                   score=score[1] if score else "", loss_shown=MAX_PROMPTS,
                                                   loss_window=window).encode()


def _plots(rows: list[Row], cols: list[Column], targets: set[str],
           files: dict[str, bytes]) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """Privacy–utility plots: per model and utility column that separates the mitigations (:func:`axis_verdict`)."""
    plots: list[tuple[str, str, str, str]] = []
    unplotted: list[str] = []
    y_col = next((c for c in cols if c.role.headline), None)
    if y_col is None:
        return plots, unplotted
    for model in sorted({w.model for w in rows}):
        for c in cols:
            if c.name in targets:
                continue
            pts = privacy_utility_points(rows, model, c, y_col.name, lambda w: f"pairings/{w.slug}.html")
            if not pts:
                continue
            ok, why = axis_verdict(c, pts)
            if not ok:
                unplotted.append(f"{model}: {why}")
                continue
            slug = _slug((model, c.name))
            svg = privacy_utility_svg(model, c, y_col, pts, prefix=f"pu{len(plots)}")
            rel = f"plots/privacy-utility-{slug}.svg"
            # the standalone file links to the detail pages from its own folder
            files[rel] = (XML + svg.replace('xlink:href="pairings/', 'xlink:href="../pairings/')).encode()
            plots.append((rel, svg, f"{model}: {y_col.display} under attack vs {c.display}", why))
    return plots, unplotted


def render(results_dir: str | Path, reuse_dir: str | Path | None = None, cache_dir: str | Path | None = None) -> Site:
    """Every file of the site, in memory: {path relative to the output folder: bytes}."""
    declared.forget()
    root = Path(results_dir)
    results: list[Result] = load_results(root)
    targets = target_metric_names(results)
    rows = collect_rows(results, targets)
    cols = columns_of(rows, targets)
    win_rates(rows, cols)
    images = Images(root, Path(reuse_dir) if reuse_dir else None, Path(cache_dir) if cache_dir else None)
    images.collect_references(results)
    files: dict[str, bytes] = {f"runs/{r.rel}": r.copy for r in results}
    files.update(detection_files(root))  # the detection track: detection.html, DETECTION.md and their runs/ copies
    no_attack = {(w.model, w.mitigation): w for w in rows if not w.attacked}
    score = _grid_score(cols)
    for w in rows:
        _pairing(w, no_attack.get((w.model, w.mitigation)), images, [c.name for c in cols], score, files)
    plots, unplotted = _plots(rows, cols, targets, files)
    budget = budget_plots(rows, files, XML)
    files.update(images.files)
    records = long_rows(rows)
    files["index.html"] = index_html(rows, cols, results, plots, unplotted, budget).encode()
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
