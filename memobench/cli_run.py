"""``memobench run`` (one pairing, ``--matrix``), ``memobench aggregate`` and the run summary table."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from .cli_app import _fmt, _registry, _stdout_console, app
from .config import BadInput, config_from_dict, load_config_file, parse_kv, parse_seeds, resolve_offline

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
    budget_sweep: bool = typer.Option(False, "--budget-sweep", help="Also record the target metrics (MR, SSCD) at "
                                      "several values of the attack's budget parameter (DoRI: steps 0,5,10,25,50; "
                                      "see `memobench ls attacks`), and the least work at which MR exceeds 0.5, in "
                                      "the same result. With --matrix: for every attack that declares a budget."),
    budget_values: str = typer.Option(None, "--budget-values", help="Values of the budget parameter for "
                                      "--budget-sweep, e.g. 0,10,50 (default: the attack's own)."),
    aggregate_: bool = typer.Option(False, "--aggregate", hidden=True, help="What `memobench aggregate` runs."),
):
    """Generate, attack and score one mitigation × attack pairing; write a result JSON + per-sample table.

    With an attack, the result also scores the mitigation alone on the same targets and seeds (paired scoring)."""
    offline = resolve_offline(offline)
    flags = {"mitigation": mitigation, "attack": attack, "model": model, "limit": limit,
             "num_inference_steps": steps, "guidance_scale": guidance, "batch_size": batch_size, "dtype": dtype,
             "device": device, "height": height, "width": width, "output_dir": output_dir, "cache_dir": cache_dir}
    params = {"model": model_param, "mitigation": mitigation_param, "attack": attack_param, "metric": metric_param}
    cfg, reg = _config_from_options(config, flags, metric, seeds, params, offline, prompts)
    if budget_values is not None and not budget_sweep:
        raise BadInput("--budget-values: only with --budget-sweep")
    if budget_sweep:
        cfg.budget_sweep = _budget_values(budget_values)
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
    return _run_one(cfg, reg, this_shard, progress, as_json, dry_run, aggregate_)


def _budget_values(spec: str | None) -> list[int]:
    """``--budget-values 0,10,50`` → [0, 10, 50]; unset → [] (the attack's defaults)."""
    if not spec:
        return []
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise BadInput(f"--budget-values: integers separated by commas, e.g. 0,10,50; got {spec!r}") from None


def _config_from_options(config: Path | None, flags: dict, metric: list[str] | None, seeds: str | None,
                         params: dict, offline: bool, prompts: str | None):
    """The run's :class:`~memobench.config.RunConfig` (the ``--config`` file, then the flags that are given) and the
    registry (with a prompt file given as ``--prompts`` registered in it)."""
    data = load_config_file(config) if config else {}
    cfg = config_from_dict(data)
    for k, v in flags.items():
        if v is not None:
            setattr(cfg, k, str(v) if k in ("output_dir", "cache_dir") else v)
    if metric:
        cfg.metrics = list(metric)
    if seeds is not None:
        cfg.seeds = parse_seeds(seeds)
        if not cfg.seeds:
            raise BadInput("--seeds: no seeds given; use e.g. 0-9")
    for kind in ("model", "mitigation", "attack"):
        getattr(cfg, f"{kind}_params").update(parse_kv(params[kind], f"--{kind}-param"))
    reg = _registry()
    for name, kv in parse_metric_params(params["metric"], reg).items():
        cfg.metric_params.setdefault(name, {}).update(kv)
    cfg.offline = offline
    if prompts is not None:
        from .prompts import is_prompt_file, register_prompt_file

        if prompts in reg.entries["prompt_set"]:
            cfg.prompts = prompts
        elif is_prompt_file(prompts):
            cfg.prompts = register_prompt_file(reg, prompts)
        else:
            reg.get("prompt_set", prompts)  # raises "unknown prompt set … did you mean"
    return cfg, reg


def _run_one(cfg, reg, this_shard, progress: bool, as_json: bool, dry_run: bool, aggregate: bool) -> None:
    """One pairing: the plan (``--dry-run``), this shard's report, or the result (JSON or the summary table)."""
    from rich.console import Console

    from .runner import Runner, ShardOutcome

    runner = Runner(config_from_dict({}, cfg), registry=reg, progress=progress and not as_json and this_shard.rank == 0,
                    console=Console(stderr=True), shard=this_shard)
    out = runner.run(dry_run=dry_run, aggregate=aggregate)
    if dry_run:
        typer.echo(json.dumps(out, indent=1))
        return
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
    """(mitigation, attack) pairs of the matrix: every registered mitigation (or the comma list; the one of kind
    ``"none"`` first) × the identity attack (:meth:`~memobench.registry.Registry.default`) and every non-identity
    attack (or the comma list); per mitigation the no-attack run comes first, so the attack runs find the mitigated
    images in the cache."""

    def names(kind: str, value: str | None) -> list[str]:
        if value:
            out = [x.strip() for x in value.split(",") if x.strip()]
            for n in out:
                reg.get(kind, n)  # unknown name → "did you mean …"
            return out
        return sorted(reg.entries[kind])

    mits = names("mitigation", mitigations)
    atks = names("attack", attacks)
    if not attacks:  # one identity attack (the registry's default), then the real attacks
        atks = [reg.default("attack")] + [a for a in atks if not reg.get("attack", a).is_identity]
    # the mitigation that changes nothing first (mitigations of kind "none")
    mits = sorted(mits, key=lambda m: reg.get("mitigation", m).kind != "none")
    return [(m, a) for m in mits for a in atks]


def _run_matrix(cfg, reg, mitigations: str | None, attacks: str | None, progress: bool) -> None:
    import copy

    from rich.console import Console
    from rich.markup import escape

    from .runner import Runner

    pairs = matrix_pairings(reg, mitigations, attacks)
    console = Console(stderr=True)
    con = _stdout_console()
    rows, failed = [], []
    memo: dict = {}  # the model, loaded once for every pairing (Runner._load_model)
    t0 = time.time()
    for i, (m, a) in enumerate(pairs):
        c = copy.deepcopy(cfg)
        c.mitigation, c.attack = m, a
        if c.budget_sweep is not None and reg.get("attack", a).budget_param is None:
            c.budget_sweep = None  # the sweep is for the attacks that declare a budget
        console.print(f"[bold]matrix {i + 1}/{len(pairs)}: mitigation {escape(m)} × attack {escape(a)}[/bold]")
        try:
            runner = Runner(config_from_dict({}, c), registry=reg, progress=progress, console=console)
            runner.model_memo = memo
            out = runner.run()
        except BadInput:
            raise
        except Exception as e:  # one broken pairing never loses the others
            failed.append(f"{m} × {a}: {type(e).__name__}: {e}")
            console.print(f"[red]error[/red]: {escape(failed[-1])}")
            continue
        rows.append((m, a, out))
        if out.errors:
            failed.extend(f"{m} × {a}: {e}" for e in out.errors)
    con.print(_matrix_table(rows, len(pairs), time.time() - t0))
    if failed:
        for e in failed:
            typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)


def _headline_ids(metrics: dict) -> tuple[str | None, str | None]:
    """The ids of a result's headline metric and of its grid-score metric (``MetricInfo.headline`` / ``grid_score``,
    recorded with each metric), or None."""
    headline = next((k for k, v in metrics.items() if v.get("headline")), None)
    grid = next((k for k, v in metrics.items() if v.get("grid_score")), None)
    return headline, grid


def _matrix_table(rows: list, n_pairs: int, seconds: float):
    """One row per pairing: the headline metric without and with the attack, the grid-score metric, the utility
    metrics (``category == "utility"``) and the result file."""
    from rich.markup import escape
    from rich.table import Table

    ids = [_headline_ids(out.result["metrics"]) for _, _, out in rows]
    headline = next((h for h, _ in ids if h), None)
    grid = next((g for _, g in ids if g), None)

    def label(name: str | None, default: str) -> str:
        rec = next((out.result["metrics"][name] for _, _, out in rows if name in out.result["metrics"]), None)
        return (rec or {}).get("display_name") or name or default

    head = label(headline, "headline")
    t = Table(title=f"matrix: {len(rows)} of {n_pairs} pairings in {seconds:.0f} s")
    for col in ("mitigation", "attack", f"{head} (no attack)", head, label(grid, "grid score"), "utility", "result"):
        t.add_column(escape(col), overflow="fold")  # a narrow terminal wraps a cell, never clips a name or a path

    def value(block: dict, name: str | None) -> str:
        return _fmt((block.get(name) or {}).get("value")) if name else "n/a"

    for m, a, out in rows:
        met, paired = out.result["metrics"], out.result.get("metrics_without_attack") or {}
        util = [f"{k} {_fmt(v['value'])}" for k, v in met.items() if v.get("category") == "utility"]
        t.add_row(escape(m), escape(a), value(paired, headline) if paired else "", value(met, headline),
                  value(met, grid), escape(", ".join(util)), escape(str(out.result_path)))
    return t


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
    if r.get("budget_sweep"):
        con.print(_sweep_table(r["budget_sweep"]))
    for line in substitution_lines(r):
        con.print(line, highlight=False, markup=False, soft_wrap=True)
    kw = {"highlight": False, "markup": False, "soft_wrap": True}  # paths are never wrapped or read as markup
    con.print(f"result:  {out.result_path}", **kw)
    con.print(f"samples: {out.samples_path}", **kw)
    if out.grid_path:
        con.print(f"grid:    {out.grid_path}  (training original | generated, one row per prompt)", **kw)
        if r.get("grid_without_attack_file"):
            con.print(f"         {out.grid_path.parent / r['grid_without_attack_file']}  (the mitigation alone)", **kw)


def _sweep_table(sw: dict):
    from rich.markup import escape
    from rich.table import Table

    w = sw.get("work_to_reextract")
    title = (f"budget sweep of {sw['param']} ({sw['unit']}): work to re-extract (MR > {sw['threshold']}) = "
             + (f"{w['budget']:g} ({sw['param']}={w['value']})" if w else "not reached"))
    t = Table(title=escape(title))
    names = list(sw["points"][0]["metrics"]) if sw["points"] else []
    for c in [sw["param"], "work"] + names:
        t.add_column(escape(c))
    for p in sw["points"]:
        t.add_row(str(p["value"]), f"{p['budget']:g}", *(_fmt(p["metrics"].get(n)) for n in names))
    return t


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

