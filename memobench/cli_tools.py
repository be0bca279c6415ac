"""``memobench plugins``, ``ls``, ``cache``, ``data`` and ``leaderboard``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer

from .cache import cache_clear, cache_info, default_cache_dir
from .cli_app import _registry, app, cache_app
from .config import BadInput, resolve_offline
from .registry import KIND_PLURAL, KINDS

# ----------------------------------------------------------------------------------------------------- plugins
@app.command()
def plugins(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """List registered plugins (name, kind, version, origin) and plugins that failed to load."""
    reg = _registry()
    items = [e.describe() for e in reg.all_entries()]
    if as_json:
        typer.echo(json.dumps({"plugins": items, "failed": reg.failures, "distributions": reg.plugins}, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="memobench plugins")
    for c in ("kind", "name", "version", "plugin", "origin"):
        t.add_column(c, overflow="fold")
    for e in sorted(items, key=lambda e: (e["kind"], e["name"])):
        t.add_row(e["kind"], e["name"], e["version"], f"{e['plugin']} ({e['dist'] or '-'})", e["origin"])
    con = Console()
    con.print(t)
    for f in reg.failures:
        con.print(f"[red]failed[/red] {f['name']} ({f['dist'] or '-'} {f['version'] or ''}): {f['error']}",
                  highlight=False)


@app.command("ls")
def ls_cmd(kind: str = typer.Argument(..., help="models | prompt-sets | mitigations | attacks | metrics | detectors")):
    """List registered objects of one kind with their parameters, defaults and the parameters' descriptions."""
    rev = {v: k for k, v in KIND_PLURAL.items()}
    k = rev.get(kind) or (kind if kind in KINDS else None) or rev.get(kind + "s")
    if k is None:
        raise BadInput(f"ls: unknown kind {kind!r}; use one of {', '.join(KIND_PLURAL.values())}")
    reg = _registry()
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"{KIND_PLURAL[k]}")
    for c in ("name", "version", "parameters (defaults)", "description"):
        t.add_column(c, overflow="fold")
    for name in reg.names(k):
        cls = reg.get(k, name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        if getattr(cls, "budget_param", None):  # an attack's budget (memobench run --budget-sweep)
            sweep = ",".join(str(v) for v in cls.budget_values)
            doc += f"\nbudget: {cls.budget_param} ({cls.budget_unit}); --budget-sweep default {sweep}"
        t.add_row(name, str(cls.version), _params_text(cls), escape(doc))
    Console().print(t)


def _params_text(cls: type) -> str:
    """``name=default`` of each parameter, comma-separated; when the plugin describes its parameters
    (:func:`memobench.api.param`), one per line with `` — description`` after those that have one."""
    from rich.markup import escape

    from .api import param_help

    try:
        items = [(f"{f.name}={getattr(cls.Params(), f.name)!r}", param_help(cls, f.name))
                 for f in dataclasses.fields(cls.Params)]
    except Exception:
        return "?"
    if not any(desc for _, desc in items):
        return ", ".join(text for text, _ in items)
    return "\n".join(f"{text} — {escape(desc)}" if desc else text for text, desc in items)


# ----------------------------------------------------------------------------------------------------- cache
@cache_app.command("info")
def cache_info_cmd(cache_dir: Path = typer.Option(None, "--cache-dir", help="Cache directory.")):
    """Show the cache location and size per section."""
    typer.echo(json.dumps(cache_info(cache_dir or default_cache_dir()), indent=1))


@cache_app.command("clear")
def cache_clear_cmd(
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Cache directory (default: $MEMOBENCH_CACHE_DIR or "
                                   "~/.cache/memobench). Only a folder memobench created (it holds a "
                                   ".memobench-cache marker) is cleared, and there only memobench's own sections."),
    section: str = typer.Option(None, "--section", help="One of: images, attacks, artifacts, data, sscd, fidelity, "
                                "tmp, sd-random-tokenizer (default: all of them)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
):
    """Delete memobench's cached images, attack outputs, artifacts and downloads (nothing else in the folder)."""
    from .cache import check_clearable

    d = check_clearable(cache_dir or default_cache_dir(), section)
    if not yes and not typer.confirm(f"delete memobench's {section or 'sections'} under {d}?"):
        raise typer.Exit(1)
    n = cache_clear(d, section)
    typer.echo(f"deleted {n} files from {d}")


# ----------------------------------------------------------------------------------------------------- data
data_app = typer.Typer(help="Download the real images memobench scores against (COCO-2014 val for FID, METHODS "
                            "§5.2).", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("fetch")
def data_fetch(
    dataset: str = typer.Argument(..., help="coco: the COCO-2014 val reference images of protocol coco10k."),
    out: Path = typer.Option(None, "--out", help="Folder for the images, manifest.json and the id list (default: "
                             "<cache>/data/coco/val2014)."),
    ids: Path = typer.Option(None, "--ids", help="Image-id list (one id per line) instead of memobench's list."),
    annotations: str = typer.Option(None, "--annotations", help="COCO's captions_val2014.json or "
                                    "annotations_trainval2014.zip (path or URL) to derive memobench's id list from, "
                                    "when no list ships with memobench (default: download COCO's zip)."),
    annotations_sha256: str = typer.Option(None, "--annotations-sha256", help="Pin of the annotations file."),
    base_url: str = typer.Option(None, "--base-url", help="Where the images are: <base-url>/COCO_val2014_<12-digit "
                                 "id>.jpg (default: http://images.cocodataset.org/val2014)."),
    sha256_file: Path = typer.Option(None, "--sha256-file", help="Pins: sha256sum-format lines '<sha256>  <file "
                                     "name>'; a download that differs is refused."),
    limit: int = typer.Option(None, "--limit", help="Only the first N ids of the list."),
    workers: int = typer.Option(8, "--workers", help="Parallel downloads."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Cache (default: $MEMOBENCH_CACHE_DIR or "
                                   "~/.cache/memobench)."),
    offline: bool = typer.Option(False, "--offline", help="Only verify what is already there."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
):
    """Download a reference image set with sha256 checks; resumes where an earlier fetch stopped.

    Then score FID against it: memobench run ... --metric fidelity --metric-param fidelity.reference_dir=<out>"""
    from rich.console import Console

    from . import data as d

    if dataset != "coco":
        raise BadInput(f"data fetch: unknown data set {dataset!r}; valid: coco")
    if limit is not None and limit < 1:
        raise BadInput("--limit: must be at least 1")
    offline = resolve_offline(offline)
    cache = cache_dir or default_cache_dir()
    out = out or (cache / "data" / "coco" / "val2014")
    con = Console(stderr=True)
    pins = d.read_sha256_file(sha256_file) if sha256_file else {}
    id_list, source = _coco_ids(ids, annotations, annotations_sha256, cache, offline, con)
    if limit is not None:
        id_list = id_list[:limit]
        source = {**source, "limit": limit}
    if offline:
        missing = [i for i in id_list if not (out / d.coco_file_name(i)).is_file()]
        if missing:
            raise BadInput(f"data fetch coco: {len(missing)} of {len(id_list)} images are not in {out} and offline "
                           "mode is on: run without --offline")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=con, disable=not progress) as bar:
        task = bar.add_task(f"COCO val2014 -> {out}", total=len(id_list))
        rep = d.fetch_coco(id_list, out, base_url=base_url or d.COCO_IMAGE_BASE_URL, pins=pins, workers=workers,
                           ids_source=source, on_file=lambda name, state: bar.advance(task))
    typer.echo(f"coco: {len(id_list)} images in {out} ({rep['n_present']} already there, {rep['n_downloaded']} "
               f"downloaded, {rep['n_failed']} failed); id list sha256 {rep['ids_sha256']} "
               f"({out / d.COCO_IDS_FILE}); manifest {out / d.COCO_MANIFEST}")
    typer.echo(f"score FID against it: memobench run ... --metric fidelity --metric-param fidelity.reference_dir={out}")
    if rep["n_failed"]:
        first = next(iter(rep["failed"].items()))
        typer.echo(f"error: {rep['n_failed']} downloads failed (e.g. {first[0]}: {first[1]}); run the same command "
                   "again to retry them", err=True)
        raise typer.Exit(1)


def _coco_ids(ids: Path | None, annotations: str | None, annotations_sha256: str | None, cache: Path,
              offline: bool, con) -> tuple[list[int], dict]:
    """The COCO image ids to fetch and where the list came from: ``--ids``, the list shipped with memobench, or
    derived from COCO's caption annotations (the coco10k prompt set's captions matched to image ids)."""
    from . import data as d

    if ids is not None:
        id_list = d.read_id_list(ids)
        source = {"kind": "user list (--ids)", "path": str(ids), "file_sha256": d.file_sha256(ids)}
    elif (shipped := d.shipped_coco_ids()) is not None:
        id_list, sha = shipped
        source = {"kind": "memobench package data", "file": d.COCO_IDS_FILE, "sha256": sha}
    else:
        from .api import Context

        ann_path, ann_sha = d.coco_annotations_file(annotations, cache, offline, annotations_sha256)
        cls = _registry().get("prompt_set", "coco10k")
        captions = [pr.text for pr in cls(cls.make_params({})).load(Context(cache_dir=cache, offline=offline))]
        built = d.coco_ids_from_annotations(captions, d.load_coco_captions(ann_path))
        if not built["ids"]:
            raise BadInput(f"--annotations {ann_path}: none of the {len(captions)} coco10k captions is in it; pass "
                           "COCO's captions_val2014.json (or annotations_trainval2014.zip)")
        id_list = built["ids"]
        source = {"kind": "derived from COCO annotations", "rule": built["rule"], "annotations": str(ann_path),
                  "annotations_sha256": ann_sha, "n_captions": len(captions),
                  "n_unmatched_captions": len(built["unmatched_rows"]),
                  "n_duplicate_captions": len(built["duplicate_rows"]), "rows": built["rows"]}
        con.print(f"[memobench] id list derived from {ann_path} (sha256 {ann_sha}): {len(id_list)} ids for "
                  f"{len(captions)} captions ({len(built['unmatched_rows'])} without a match, "
                  f"{len(built['duplicate_rows'])} repeats)", highlight=False, markup=False)
    return id_list, source


# ----------------------------------------------------------------------------------------------------- leaderboard
leaderboard_app = typer.Typer(help="Build the static leaderboard (HTML, Markdown, CSV, parquet) from result files.",
                              no_args_is_help=True)
app.add_typer(leaderboard_app, name="leaderboard")
_LB_RESULTS = typer.Option(Path("results"), "--results", help="Folder of result JSONs (searched recursively), as "
                           "written by `memobench run -o DIR`.")
_LB_OUT = typer.Option(Path("leaderboard"), "--out", help="Folder the leaderboard is written to (index.html, "
                       "LEADERBOARD.md, leaderboard.csv/.parquet, pairings/, img/, plots/, runs/).")
_LB_CACHE = typer.Option(None, "--cache-dir", help="Cache to take generated images from (default: "
                         "$MEMOBENCH_CACHE_DIR or ~/.cache/memobench); images are also cut from the runs' grid PNGs.")


@leaderboard_app.command("build")
def leaderboard_build(results: Path = _LB_RESULTS, out: Path = _LB_OUT, cache_dir: Path = _LB_CACHE):
    """Read every result JSON, validate it and write the leaderboard (deterministic: same results, same bytes)."""
    from .leaderboard import build

    rep = build(results, out, cache_dir=cache_dir)
    typer.echo(f"leaderboard: {rep.n_rows} rows from {rep.n_results} result files -> {out / 'index.html'} "
               f"({rep.written} files written, {rep.unchanged} unchanged, {rep.removed} removed; {rep.seconds:.2f} s)")


@leaderboard_app.command("check")
def leaderboard_check(results: Path = _LB_RESULTS, out: Path = _LB_OUT, cache_dir: Path = _LB_CACHE):
    """Exit 1 naming the stale files if OUT differs from what `leaderboard build` would write now (for CI)."""
    from .leaderboard import check

    stale = check(results, out, cache_dir=cache_dir)
    if stale:
        shown = ", ".join(stale[:8]) + (f", … ({len(stale)} files)" if len(stale) > 8 else "")
        typer.echo(f"stale: {out} does not match {results}: {shown}; rebuild with `memobench leaderboard build "
                   f"--results {results} --out {out}` and commit it", err=True)
        raise typer.Exit(1)
    typer.echo(f"up to date: {out} holds what `memobench leaderboard build` writes from {results}")

