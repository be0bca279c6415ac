"""The ``memobench`` command line (Typer + rich).

Bad input — unknown plugin, unreadable file, bad seed spec, unwritable output directory, corrupt cache entry —
prints one line ``error: …`` naming the input and the fix, and exits with code 2.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from .cache import CacheError, cache_clear, cache_info, default_cache_dir
from .config import BadInput, config_from_dict, load_config_file, parse_kv, parse_seeds, resolve_offline
from .data import DataError
from .registry import KIND_PLURAL, KINDS, PluginError, UnknownPluginError, call_hookimpl, get_registry

app = typer.Typer(
    name="memobench",
    help="Benchmark memorization mitigations × attacks for text-to-image diffusion models.\n\n"
         "Start with: memobench run --mitigation none --attack none  (the embedded `tiny` model, offline, CPU).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
cache_app = typer.Typer(help="Inspect or clear the content-addressed cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

BAD_INPUT = (BadInput, UnknownPluginError, CacheError, DataError, FileNotFoundError, PluginError)


def _click_exceptions(name: str) -> tuple[type, ...]:
    """``name`` from click and from the copy of click that recent Typer versions vendor as ``typer._click`` (its
    exceptions are not click's, so ``except click.UsageError`` alone misses Typer's usage errors)."""
    import importlib

    out = []
    for mod in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            cls = getattr(importlib.import_module(mod), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls not in out:
            out.append(cls)
    return tuple(out)


_NO_ARGS_IS_HELP = _click_exceptions("NoArgsIsHelpError")
_USAGE_ERROR = _click_exceptions("UsageError")
_CLICK_EXCEPTION = _click_exceptions("ClickException")
_EXIT = _click_exceptions("Exit")
_ABORT = _click_exceptions("Abort")


class _State:
    plugins_dir: Optional[Path] = None
    commands_added: set[str] = set()  # plugins whose register_commands hook already ran in this process


def _registry():
    return get_registry(plugins_dir=_State.plugins_dir)


@app.callback()
def _main(
    plugins_dir: Optional[Path] = typer.Option(None, "--plugins-dir", help="Also load every *.py file in DIR as a "
                                               "plugin (one-off plugins without packaging)."),
):
    if plugins_dir is not None:
        if not plugins_dir.is_dir():
            raise BadInput(f"--plugins-dir: not a directory: {plugins_dir}")
        _State.plugins_dir = plugins_dir


# ----------------------------------------------------------------------------------------------------- run
@app.command()
def run(
    mitigation: str = typer.Option(None, "--mitigation", "-m", help="Mitigation plugin (see `memobench ls "
                                   "mitigations`). Default: none."),
    attack: str = typer.Option(None, "--attack", "-a", help="Attack plugin (see `memobench ls attacks`). "
                               "Default: none (the target's own prompt)."),
    model: str = typer.Option(None, "--model", help="Model plugin (default: tiny, the embedded model)."),
    prompts: str = typer.Option(None, "--prompts", "-p", help="Prompt-set plugin name, or a prompt file "
                                "(.txt one per line, .csv with a 'prompt' column, .jsonl with 'prompt')."),
    metric: list[str] = typer.Option(None, "--metric", help="Metric plugin (repeatable). Default: the model's."),
    seeds: str = typer.Option(None, "--seeds", help="Seeds, e.g. 0-9 or 0,1,2: one CPU generator per image, "
                              "the same seeds for every prompt. Default: the model's (tiny: 0-9)."),
    limit: int = typer.Option(None, "--limit", help="Only the first N prompts (smoke test; marked partial)."),
    steps: int = typer.Option(None, "--steps", help="Denoising steps (default: the model's)."),
    guidance: float = typer.Option(None, "--guidance", help="Classifier-free guidance scale (default: model's)."),
    height: int = typer.Option(None, "--height", help="Image height in pixels, a multiple of 8 (default: the "
                               "model's). One resolution for the whole run: generation and every plugin's image "
                               "encoding, detection latents and statistics."),
    width: int = typer.Option(None, "--width", help="Image width in pixels, a multiple of 8 (default: the model's)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Images per UNet batch (does not enter cache keys)."),
    shard: str = typer.Option(None, "--shard", help="I/N: generate only part I of N (0-based) into the cache and "
                              "write no result (job arrays, no process group); then `memobench aggregate` with the "
                              "same options. Under torchrun / accelerate launch every rank takes its part itself."),
    dtype: str = typer.Option(None, "--dtype", help="fp16 | bf16 | fp32 (half types on GPU only). Part of the model "
                              "identity, hence of every cache key. Default: as the model loads."),
    device: str = typer.Option(None, "--device", help="cpu | cuda | cuda:N (default: cpu; under torchrun / accelerate "
                               "launch, cuda means cuda:LOCAL_RANK)."),
    model_param: list[str] = typer.Option(None, "--model-param", help="KEY=VALUE for the model plugin."),
    mitigation_param: list[str] = typer.Option(None, "--mitigation-param", help="KEY=VALUE for the mitigation."),
    attack_param: list[str] = typer.Option(None, "--attack-param", help="KEY=VALUE for the attack."),
    metric_param: list[str] = typer.Option(None, "--metric-param", help="METRIC.KEY=VALUE for a selected metric "
                                           "plugin (repeatable), e.g. fidelity.reference_dir=DIR (see `memobench "
                                           "ls metrics`)."),
    output_dir: Path = typer.Option(None, "--output-dir", "-o", help="Where result files go (default: results)."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Cache (default: $MEMOBENCH_CACHE_DIR or "
                                   "~/.cache/memobench)."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network: local files and caches only."),
    config: Path = typer.Option(None, "--config", help="Run settings from a .json/.toml/.yaml file; flags "
                                "override it."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (cached / remaining) and exit."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    as_json: bool = typer.Option(False, "--json", help="Print the result JSON instead of a table."),
    matrix: bool = typer.Option(False, "--matrix", help="Score every registered mitigation × attack (the "
                                "leaderboard's input); --mitigation/--attack then take comma lists to restrict it."),
    aggregate_: bool = typer.Option(False, "--aggregate", hidden=True, help="What `memobench aggregate` runs."),
):
    """Generate, attack and score one mitigation × attack pairing; write a result JSON + per-sample table.

    With an attack, the result also scores the mitigation alone on the same targets and seeds (paired scoring)."""
    from rich.console import Console

    offline = resolve_offline(offline)
    data = load_config_file(config) if config else {}
    cfg = config_from_dict(data)
    flags = {"mitigation": mitigation, "attack": attack, "model": model, "limit": limit,
             "num_inference_steps": steps, "guidance_scale": guidance, "batch_size": batch_size, "dtype": dtype,
             "device": device, "height": height, "width": width}
    for k, v in flags.items():
        if v is not None:
            setattr(cfg, k, v)
    if metric:
        cfg.metrics = list(metric)
    if seeds is not None:
        cfg.seeds = parse_seeds(seeds)
        if not cfg.seeds:
            raise BadInput("--seeds: no seeds given; use e.g. 0-9")
    cfg.model_params.update(parse_kv(model_param, "--model-param"))
    cfg.mitigation_params.update(parse_kv(mitigation_param, "--mitigation-param"))
    cfg.attack_params.update(parse_kv(attack_param, "--attack-param"))
    reg = _registry()
    for name, kv in parse_metric_params(metric_param, reg).items():
        cfg.metric_params.setdefault(name, {}).update(kv)
    if output_dir is not None:
        cfg.output_dir = str(output_dir)
    if cache_dir is not None:
        cfg.cache_dir = str(cache_dir)
    cfg.offline = offline
    if prompts is not None:
        from .prompts import is_prompt_file, register_prompt_file

        if prompts in reg.entries["prompt_set"]:
            cfg.prompts = prompts
        elif is_prompt_file(prompts):
            cfg.prompts = register_prompt_file(reg, prompts)
        else:
            reg.get("prompt_set", prompts)  # raises "unknown prompt set … did you mean"
    from .distributed import shard_from_environment

    this_shard = shard_from_environment(shard)
    if this_shard.sharded and (matrix or aggregate_):
        raise BadInput(f"--shard / torchrun: {'--matrix' if matrix else 'aggregate'} runs in one process; run each "
                       "pairing with --shard, then aggregate it without --shard in one process")
    if matrix:
        if dry_run or as_json:
            raise BadInput("--matrix: not combinable with --dry-run or --json; run one pairing for those")
        if cfg.mitigation_params or cfg.attack_params:
            raise BadInput("--matrix: runs every plugin with its default parameters; drop --mitigation-param/"
                           "--attack-param or run that pairing on its own")
        return _run_matrix(cfg, reg, mitigation, attack, progress)
    cfg_validated = config_from_dict({}, cfg)
    from .runner import Runner

    console = Console(stderr=True)
    runner = Runner(cfg_validated, registry=reg, progress=progress and not as_json and this_shard.rank == 0,
                    console=console, shard=this_shard)
    out = runner.run(dry_run=dry_run, aggregate=aggregate_)
    if dry_run:
        typer.echo(json.dumps(out, indent=1))
        return
    from .runner import ShardOutcome

    if isinstance(out, ShardOutcome):  # its samples are in the cache; rank 0 or `memobench aggregate` scores them
        where = ("rank 0 scores the run" if this_shard.array is None else
                 "when every shard is done, run `memobench aggregate` with the same options (without --shard)")
        typer.echo(f"{this_shard.describe()}: {out.generated} generated, {out.cached} already cached, "
                   f"{out.missing} missing of its {out.owned} samples; {where}", err=True)
        return
    if as_json:
        typer.echo(json.dumps(out.result, indent=1, default=str))
    else:
        _print_summary(out)
    if out.errors:
        for e in out.errors:
            typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)


def parse_metric_params(items: list[str] | None, reg) -> dict[str, dict[str, str]]:
    """``["fidelity.reference_dir=DIR", ...]`` -> ``{"fidelity": {"reference_dir": "DIR"}}``; bad syntax or a metric
    plugin that is not registered is :class:`BadInput` (one line, exit 2). Values stay strings (the plugin's Params
    coerce them); whether the metric is selected and has the parameter is checked when the run is planned."""
    out: dict[str, dict[str, str]] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        name, dot, param = key.strip().partition(".")
        if not sep or not dot or not name.strip() or not param.strip():
            raise BadInput(f"--metric-param: expected METRIC.KEY=VALUE (e.g. fidelity.reference_dir=DIR), got {item!r}")
        name, param = name.strip(), param.strip()
        if name not in reg.entries["metric"]:
            raise BadInput(f"--metric-param {item!r}: unknown metric {name!r}; valid: "
                           f"{', '.join(sorted(reg.entries['metric']))} (metric plugin names: `memobench ls metrics`)")
        out.setdefault(name, {})[param] = value.strip()
    return out


def _aggregate(**options):
    """Score a run whose samples were generated with --shard i/n (or by another process) from the cache: pass the
    run's options without --shard. Generates nothing; exits 2 naming how many samples are still missing."""
    return run(**options, shard=None, dry_run=False, matrix=False, aggregate_=True)


def _aggregate_signature():
    """``run``'s options (annotations evaluated: this module's are strings) less the ones aggregate fixes."""
    import inspect
    import typing

    skip = {"shard", "dry_run", "matrix", "aggregate_"}
    sig, hints = inspect.signature(run), typing.get_type_hints(run)
    return sig.replace(parameters=[p.replace(annotation=hints.get(p.name, p.annotation))
                                   for p in sig.parameters.values() if p.name not in skip], return_annotation=None)


_aggregate.__signature__ = _aggregate_signature()
app.command("aggregate")(_aggregate)


def matrix_pairings(reg, mitigations: str | None = None, attacks: str | None = None) -> list[tuple[str, str]]:
    """(mitigation, attack) pairs of the matrix: every registered mitigation (or the comma list) × the identity
    attack ``none`` and every non-identity attack (or the comma list); per mitigation the no-attack run comes first,
    so the attack runs find the mitigated images in the cache."""

    def names(kind: str, value: str | None) -> list[str]:
        if value:
            out = [x.strip() for x in value.split(",") if x.strip()]
            for n in out:
                reg.get(kind, n)  # unknown name → "did you mean …"
            return out
        return sorted(reg.entries[kind])

    mits = names("mitigation", mitigations)
    atks = names("attack", attacks)
    if not attacks:  # one identity attack ("none"), then the real attacks
        atks = ["none"] + [a for a in atks if not getattr(reg.get("attack", a), "is_identity", False)]
    if "none" in mits:
        mits = ["none"] + [m for m in mits if m != "none"]
    return [(m, a) for m in mits for a in atks]


def _run_matrix(cfg, reg, mitigations: str | None, attacks: str | None, progress: bool) -> None:
    import copy

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .runner import Runner

    pairs = matrix_pairings(reg, mitigations, attacks)
    console = Console(stderr=True)
    con = _stdout_console()
    rows, failed = [], []
    t0 = time.time()
    for i, (m, a) in enumerate(pairs):
        c = copy.deepcopy(cfg)
        c.mitigation, c.attack = m, a
        console.print(f"[bold]matrix {i + 1}/{len(pairs)}: mitigation {escape(m)} × attack {escape(a)}[/bold]")
        try:
            out = Runner(config_from_dict({}, c), registry=reg, progress=progress, console=console).run()
        except BadInput:
            raise
        except Exception as e:  # one broken pairing never loses the others
            failed.append(f"{m} × {a}: {type(e).__name__}: {e}")
            console.print(f"[red]error[/red]: {escape(failed[-1])}")
            continue
        rows.append((m, a, out))
        if out.errors:
            failed.extend(f"{m} × {a}: {e}" for e in out.errors)
    t = Table(title=f"matrix: {len(rows)} of {len(pairs)} pairings in {time.time() - t0:.0f} s")
    for col in ("mitigation", "attack", "MR (no attack)", "MR", "SSCD_orig", "utility", "result"):
        t.add_column(col, overflow="fold")  # a narrow terminal wraps a cell, never clips a name or a path
    for m, a, out in rows:
        r = out.result
        met, paired = r["metrics"], r.get("metrics_without_attack") or {}
        util = [f"{k} {_fmt(v['value'])}" for k, v in met.items() if k not in ("mr", "mr_gen", "mr_mean", "mr_any",
                                                                               "sscd_orig", "sscd_gen", "diversity")]
        t.add_row(escape(m), escape(a), _fmt((paired.get("mr") or {}).get("value")) if paired else "",
                  _fmt((met.get("mr") or {}).get("value")), _fmt((met.get("sscd_orig") or {}).get("value")),
                  escape(", ".join(util)), escape(str(out.result_path)))
    con.print(t)
    if failed:
        for e in failed:
            typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


_WIDE = 1000  # console width for a pipe or file: no terminal to fit, so a table is as wide as its content


def _stdout_console():
    """A rich console on stdout. A terminal keeps its width; without one (a pipe, a file, CI logs) rich would assume
    80 columns and clip table cells, so the width is set wide: tables are then as wide as their content."""
    from rich.console import Console

    con = Console()
    return con if con.is_terminal else Console(width=_WIDE)


def _print_summary(out) -> None:
    from rich.markup import escape
    from rich.table import Table

    r = out.result
    con = _stdout_console()
    t = Table(title=f"{r['model']['plugin']['name']} · mitigation {r['mitigation']['name']} · "
                    f"attack {r['attack']['name']} · {r['status']}")
    paired = r.get("metrics_without_attack")
    cols = ["metric"] + (["no attack", f"+ {r['attack']['name']}"] if paired is not None else ["value"])
    for c in cols + ["±", "n", "better", "implementation"]:
        t.add_column(escape(c), overflow="fold")  # a narrow terminal wraps a cell, never clips a metric name
    for name, m in r["metrics"].items():
        disp = m.get("dispersion") or {}
        impl = m.get("impl") or {}
        impl_s = ", ".join(dict.fromkeys(str(impl[k]) for k in ("name", "checkpoint", "feature_extractor", "preset")
                                         if impl.get(k)))  # each part once (checkpoint = feature extractor for SSCD)
        val = _fmt(m["value"]) if not m.get("unavailable") else f"unavailable: {m['unavailable']}"
        vals = [val] if paired is None else [_fmt((paired.get(name) or {}).get("value")) if name in paired else "",
                                             val]
        t.add_row(escape(name), *vals, f"{_fmt(disp.get('value'))} ({disp.get('kind')})" if disp else "", str(m["n"]),
                  "↑" if m["higher_is_better"] else "↓", escape(impl_s))
        for g, gv in (m.get("groups") or {}).items():
            pg = ((paired or {}).get(name) or {}).get("groups", {}).get(g, {})
            gvals = [_fmt(gv.get("value"))] if paired is None else [_fmt(pg.get("value")) if pg else "",
                                                                     _fmt(gv.get("value"))]
            t.add_row(escape(f"  {name}[{g}]"), *gvals, "", str(gv.get("n", "")), "", "")
    con.print(t)
    for line in substitution_lines(r):
        con.print(line, highlight=False, markup=False, soft_wrap=True)
    kw = {"highlight": False, "markup": False, "soft_wrap": True}  # paths are never wrapped or read as markup
    con.print(f"result:  {out.result_path}", **kw)
    con.print(f"samples: {out.samples_path}", **kw)
    if out.grid_path:
        con.print(f"grid:    {out.grid_path}  (training original | generated, one row per prompt)", **kw)
        if r.get("grid_without_attack_file"):
            con.print(f"         {out.grid_path.parent / r['grid_without_attack_file']}  (the mitigation alone)", **kw)


def substitution_lines(result: dict) -> list[str]:
    """One ``substitution: …`` line per distinct ``impl["substitution"]`` of the result's metrics (a model other than
    the one the preset names, CPU instead of the run's device, a failed download), naming the metrics it concerns."""
    seen: dict[str, list[str]] = {}
    for block in (result.get("metrics") or {}, result.get("metrics_without_attack") or {}):
        for name, m in block.items():
            text = ((m or {}).get("impl") or {}).get("substitution")
            if text and name not in seen.setdefault(str(text), []):
                seen[str(text)].append(name)
    return [f"substitution ({', '.join(names)}): {text}" for text, names in seen.items()]


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
def ls_cmd(kind: str = typer.Argument(..., help="models | prompt-sets | mitigations | attacks | metrics")):
    """List registered objects of one kind with their parameters and defaults."""
    rev = {v: k for k, v in KIND_PLURAL.items()}
    k = rev.get(kind) or (kind if kind in KINDS else None) or rev.get(kind + "s")
    if k is None:
        raise BadInput(f"ls: unknown kind {kind!r}; use one of {', '.join(KIND_PLURAL.values())}")
    reg = _registry()
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{KIND_PLURAL[k]}")
    for c in ("name", "version", "parameters (defaults)", "description"):
        t.add_column(c, overflow="fold")
    for name in reg.names(k):
        cls = reg.get(k, name)
        try:
            params = ", ".join(f"{f.name}={getattr(cls.Params(), f.name)!r}" for f in dataclasses.fields(cls.Params))
        except Exception:
            params = "?"
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        t.add_row(name, str(cls.version), params, doc)
    Console().print(t)


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
    from .cache import SECTIONS, is_memobench_cache

    d = cache_dir or default_cache_dir()
    if section and section not in SECTIONS:
        raise BadInput(f"--section: unknown section {section!r}; use one of {', '.join(SECTIONS)}")
    if d.exists() and not is_memobench_cache(d):
        raise BadInput(f"--cache-dir {d}: not a memobench cache (no .memobench-cache marker); nothing deleted. Point "
                       "--cache-dir at memobench's cache, or delete that folder yourself")
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


# ----------------------------------------------------------------------------------------------------- main
def _add_plugin_commands() -> None:
    """Call every plugin's ``register_commands(app)`` hook once per process (failure-tolerant)."""
    reg = _registry()  # PluginError (strict mode) propagates
    for impl in reg.pm.hook.register_commands.get_hookimpls():
        if impl.plugin_name in _State.commands_added:
            continue
        _State.commands_added.add(impl.plugin_name)
        try:
            call_hookimpl("register_commands", impl, app=app)
        except Exception as e:
            p = next((q for q in reg.plugins if q["name"] == impl.plugin_name), {})
            reg.failures.append({"name": impl.plugin_name, "dist": p.get("dist"), "version": p.get("version"),
                                 "error": f"register_commands: {type(e).__name__}: {e}"})
            print(f"warning: plugin {impl.plugin_name} failed to add commands: {type(e).__name__}: {e}",
                  file=sys.stderr)


def _pre_parse_plugins_dir(argv: list[str]) -> None:
    for i, a in enumerate(argv):
        if a == "--plugins-dir" and i + 1 < len(argv):
            _State.plugins_dir = Path(argv[i + 1])
        elif a.startswith("--plugins-dir="):
            _State.plugins_dir = Path(a.split("=", 1)[1])


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def _invoke(argv: list[str]):
    """``app(args=argv, standalone_mode=False)``, except that a ``KeyboardInterrupt`` reaches :func:`main`: Typer
    turns one into a bare exit code 130, which printed nothing and lost the counts a run attaches to it."""
    import typer.main

    cmd = typer.main.get_command(app)
    with cmd.make_context("memobench", list(argv)) as ctx:
        return cmd.invoke(ctx)


def _pacify_std_streams() -> None:
    """Silence the flush of a closed stdout/stderr at exit (what Typer does on a broken pipe)."""
    try:
        from click.utils import PacifyFlushWrapper
    except ImportError:
        return
    sys.stdout = PacifyFlushWrapper(sys.stdout)
    sys.stderr = PacifyFlushWrapper(sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _State.plugins_dir = None  # main() may be called more than once in a process (tests, notebooks)
    try:
        _pre_parse_plugins_dir(argv)
        if _State.plugins_dir is not None and not _State.plugins_dir.is_dir():
            raise BadInput(f"--plugins-dir: not a directory: {_State.plugins_dir}")
        _add_plugin_commands()
        rv = _invoke(argv)
        return int(rv or 0)
    except BAD_INPUT as e:  # memobench's own bad-input errors only: any other ValueError is an internal error below
        print(f"error: {_one_line(e) or type(e).__name__}", file=sys.stderr)
        return 2
    except _EXIT as e:
        return int(getattr(e, "exit_code", 0) or 0)
    except (*_ABORT, EOFError):
        print("error: aborted", file=sys.stderr)
        return 1
    except _NO_ARGS_IS_HELP as e:  # `memobench` / `memobench cache` without a sub-command: show the help
        text = e.format_message()  # (Typer's rich help has already been printed; plain help is returned)
        if text.strip():
            print(text)
        return 0
    except _USAGE_ERROR as e:  # wrong option, missing argument, value of the wrong type
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "memobench"
        print(f"error: {_one_line(e.format_message())} (see `{where} --help`)", file=sys.stderr)
        return 2
    except _CLICK_EXCEPTION as e:
        print(f"error: {_one_line(e.format_message())}", file=sys.stderr)
        return int(getattr(e, "exit_code", 1))
    except KeyboardInterrupt as e:  # Ctrl-C; a run's (memobench.progress.Interrupted) carries the sample counts
        from .progress import interrupted_message

        print(interrupted_message(e), file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `memobench plugins | head -1`: the reader went away
        _pacify_std_streams()
        return 1
    except Exception as e:
        from .distributed import DistributedError

        if isinstance(e, DistributedError):
            print(f"error: {_one_line(e)}", file=sys.stderr)  # another rank died: not bad input, but one line
            return 1
        import os

        if os.environ.get("MEMOBENCH_DEBUG", "") not in ("", "0"):
            raise  # the full traceback (exit code 1)
        from .boundary import PluginFailure

        if isinstance(e, PluginFailure):  # names the plugin, its hook and the exception
            print(f"error: {_one_line(e)} (a fault of that plugin, not of your input; rerun with MEMOBENCH_DEBUG=1 "
                  "for the traceback)", file=sys.stderr)
            return 1
        # not bad input: a fault of memobench or of a plugin. One line, exit code 1; the traceback on request
        first = str(e).strip().splitlines()[0][:500] if str(e).strip() else "(no message)"
        print(f"error: internal error: {type(e).__name__}: {first} (not a problem with your input; rerun with "
              "MEMOBENCH_DEBUG=1 for the traceback and report it)", file=sys.stderr)
        return 1


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
