"""The ``memobench detect`` and ``memobench explain`` commands (added through the ``register_commands`` hook)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Optional

import typer

from memobench.api import BadInput, parse_kv, parse_seeds, resolve_offline, slug

CSV_FIELDS = ("prompt_id", "prompt", "mem_type", "statistic", "verdict", "threshold", "top_tokens", "top_token",
              "top_share", "statistic_removed", "statistic_replaced", "sscd", "sscd_removed", "sscd_replaced",
              "removal_lowers_statistic", "removal_lowers_sscd", "replacement_lowers_statistic",
              "replacement_lowers_sscd", "png")


def _seeds(spec: str | None) -> list[int] | None:
    if spec is None:
        return None
    s = parse_seeds(spec)
    if not s:
        raise BadInput("--seeds: no seeds given; use e.g. 0-3")
    return s


def _console():
    from rich.console import Console

    return Console()


def _fmt(v, nd: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _progress(enabled: bool):
    from memobench.api import ProgressReporter

    return ProgressReporter(enabled=enabled)


def _has_param(detector: str, name: str) -> bool:
    """Whether the registered detector has a parameter ``name`` (False for an unknown detector: reported later)."""
    import dataclasses

    from memobench.api import get_registry

    try:
        cls = get_registry().get("detector", detector)
    except KeyError:
        return False
    return any(f.name == name for f in dataclasses.fields(cls.Params))


def register(app: typer.Typer) -> None:
    @app.command()
    def detect(
        model: str = typer.Option("tiny", "--model", help="Model plugin (default: tiny, the embedded model)."),
        memorized: str = typer.Option(None, "--memorized", help="Memorized prompts (positives): a prompt-set name "
                                      "or a .txt/.csv/.jsonl file. Default: the model's target set."),
        nonmemorized: str = typer.Option(None, "--nonmemorized", help="Non-memorized prompts (negatives). Default: "
                                         "the model's nonmem set."),
        detector: list[str] = typer.Option(None, "--detector", "-d", help="A registered detector (`memobench ls "
                                           "detectors`): wen (default; Wen et al.'s d(p)), nemo, memattn, sail, "
                                           "anisotropy, bright_ending, …; repeatable."),
        detector_param: list[str] = typer.Option(None, "--detector-param", help="[DETECTOR.]KEY=VALUE, e.g. "
                                                 "score_steps=1 or nemo.samples=10."),
        seeds: str = typer.Option(None, "--seeds", help="Generations of the detectors with a 'seeds' parameter "
                                  "(wen, memattn, bright_ending), e.g. 0-3 — one CPU generator per image, the same "
                                  "for every prompt."),
        model_param: list[str] = typer.Option(None, "--model-param", help="KEY=VALUE for the model plugin."),
        limit: int = typer.Option(None, "--limit", help="Only the first N prompts of each set (smoke test)."),
        output_dir: Path = typer.Option(Path("results"), "--output-dir", "-o", help="Result folder."),
        cache_dir: Path = typer.Option(None, "--cache-dir", help="Cache (default: $MEMOBENCH_CACHE_DIR or "
                                       "~/.cache/memobench)."),
        device: str = typer.Option("cpu", "--device", help="torch device."),
        offline: bool = typer.Option(False, "--offline", help="Never touch the network."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
        as_json: bool = typer.Option(False, "--json", help="Print the result JSON instead of a table."),
    ):
        """Detection benchmark: AUC, ACC, TPR@1%FPR, TPR@3%FPR, seconds per prompt and calibrated thresholds on
        memorized vs non-memorized prompts.

        Writes a result JSON and a ROC PNG; the thresholds are stored per model for `memobench explain`."""
        from memobench.api import check_device

        device = check_device(device)
        from .bench import check_prompt_source, make_detector, open_session, run_detect, split_detector_params

        names = list(dict.fromkeys(detector or ["wen"]))
        if limit is not None and limit < 1:
            raise BadInput(f"--limit: must be a positive integer, got {limit}")
        per = split_detector_params(parse_kv(detector_param, "--detector-param"), names)
        s = _seeds(seeds)
        if s is not None:
            with_seeds = [n for n in names if _has_param(n, "seeds")]
            if not with_seeds:
                raise BadInput("--seeds applies to detectors with a 'seeds' parameter (wen, memattn, bright_ending); "
                               "for nemo use --detector-param nemo.seed=N (and nemo.samples=N)")
            for n in with_seeds:
                per[n]["seeds"] = ",".join(map(str, s))
        for n in names:
            make_detector(n, per[n])  # unknown detector or parameter: fail before the model loads
        from memobench.api import check_output_dir, get_registry

        reg = get_registry()
        mcls = reg.get("model", model)
        pos = memorized or mcls.prompt_sets.get("target")
        neg = nonmemorized or mcls.prompt_sets.get("nonmem")
        if not pos or not neg:
            raise BadInput(f"model '{model}' names no default target/nonmem prompt sets; pass --memorized and "
                           "--nonmemorized")
        check_prompt_source(reg, pos, "--memorized")
        check_prompt_source(reg, neg, "--nonmemorized")
        check_output_dir(output_dir)
        session = open_session(model, parse_kv(model_param, "--model-param"), cache_dir, device,
                               resolve_offline(offline), reg)
        dets = [make_detector(n, per[n], session.generation) for n in names]
        with _progress(progress and not as_json) as pr:
            res = run_detect(session, dets, pos, neg, output_dir, limit, pr)
        if as_json:
            typer.echo(json.dumps(res, indent=1))
            return
        _print_detect(res)

    @app.command()
    def explain(
        prompt: str = typer.Argument(None, help="The prompt to explain (or use --file / --prompt-set)."),
        file: Path = typer.Option(None, "--file", "-f", help="Batch mode: a .txt/.csv/.jsonl prompt file (a CSV "
                                  "'reference' column names training images) → one CSV row per prompt."),
        prompt_set: str = typer.Option(None, "--prompt-set", help="Batch mode over a registered prompt set (e.g. "
                                       "tiny-vm): its training images give SSCD."),
        model: str = typer.Option("tiny", "--model", help="Model plugin (default: tiny)."),
        seeds: str = typer.Option(None, "--seeds", help="Generations, e.g. 0-3 (default). The verdict needs a "
                                  "calibration made by `memobench detect` with the same seeds."),
        detector_param: list[str] = typer.Option(None, "--detector-param", help="KEY=VALUE for the wen detector "
                                                 "(score_steps, guidance_scale, significance, …); "
                                                 "attribution=token_embeds credits the input words instead of the "
                                                 "text-encoder output rows (the reference)."),
        model_param: list[str] = typer.Option(None, "--model-param", help="KEY=VALUE for the model plugin."),
        threshold_rule: str = typer.Option("acc", "--threshold-rule", help="acc: max balanced accuracy "
                                           "(default) | fpr: the TPR@1%FPR operating point."),
        replacement: str = typer.Option("thing", "--replacement", help="Word that replaces the top token in the "
                                        "counterfactual."),
        ablation: bool = typer.Option(True, "--ablation/--no-ablation", help="Also remove / replace the top "
                                      "token and recompute the statistic and SSCD."),
        top_k: int = typer.Option(3, "--top-k", help="Top tokens listed in the CSV."),
        png: Optional[bool] = typer.Option(None, "--png/--no-png", help="Write the PNG (default: on for one "
                                           "prompt, off in batch mode)."),
        limit: int = typer.Option(None, "--limit", help="Batch mode: only the first N prompts."),
        csv_path: Path = typer.Option(None, "--csv", help="Batch mode: CSV path (default: OUTPUT_DIR/<model>/"
                                      "explain/<source>.csv)."),
        output_dir: Path = typer.Option(Path("results"), "--output-dir", "-o", help="Result folder."),
        cache_dir: Path = typer.Option(None, "--cache-dir", help="Cache directory."),
        device: str = typer.Option("cpu", "--device", help="torch device."),
        offline: bool = typer.Option(False, "--offline", help="Never touch the network."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars (batch)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    ):
        """Explain a prompt: memorization statistic, verdict and the tokens that trigger it (Wen et al.).

        Prints a token table, writes a PNG (tokens shaded by significance next to the generated images) and a JSON,
        and reports what removing / replacing the top token does to the statistic and the SSCD."""
        from memobench.api import check_device

        device = check_device(device)
        from memobench.api import check_output_dir

        from .explain import Explainer, render_png

        sources = [x for x in (prompt, file, prompt_set) if x is not None]
        if len(sources) != 1:
            raise BadInput("explain: give exactly one of PROMPT, --file or --prompt-set")
        if prompt is not None and not prompt.strip():
            raise BadInput("explain: the prompt is empty")
        if top_k < 1:
            raise BadInput(f"--top-k: must be ≥ 1, got {top_k}")
        if limit is not None and limit < 1:
            raise BadInput(f"--limit: must be a positive integer, got {limit}")
        out_root = check_output_dir(output_dir)
        if file is not None:
            from memobench.api import read_prompt_file

            read_prompt_file(file, "--file", accepts_names=False)  # bad file → one error line before the model loads
        ex = Explainer(model=model, model_params=parse_kv(model_param, "--model-param"), seeds=_seeds(seeds),
                       detector_params=parse_kv(detector_param, "--detector-param"), cache_dir=cache_dir,
                       device=device, offline=resolve_offline(offline), threshold_rule=threshold_rule,
                       replacement=replacement)
        folder = out_root / slug(model) / "explain"
        if prompt is not None:
            e = ex.explain(prompt, ablate=ablation)
            paths = _write_single(e, folder, render_png if png is not False else None)
            if as_json:
                typer.echo(json.dumps({**e.to_dict(), "paths": paths}, indent=1))
            else:
                _print_explain(e, paths)
            return
        from .bench import load_prompts

        desc, prompts, ps = load_prompts(ex.session, str(file) if file is not None else prompt_set,
                                         "--file" if file is not None else "--prompt-set")
        prompts = prompts[:limit] if limit else prompts
        stem = slug(Path(str(file)).stem if file is not None else prompt_set, 48)
        out_csv = Path(csv_path) if csv_path else folder / f"{stem}.csv"
        rows, expls = [], []
        with _progress(progress and not as_json) as pr, pr.task(f"explain {len(prompts)} prompts",
                                                                len(prompts)) as advance:
            for p in prompts:
                e = ex.explain(p, prompt_set=ps, ablate=ablation)
                paths = _write_single(e, folder, render_png) if png else {}
                rows.append(_csv_row(e, top_k, paths.get("png")))
                expls.append(e)
                _write_csv(out_csv, rows)
                advance()
        summary = _summary(expls, desc, out_csv)
        from memobench.api import atomic_write_text

        spath = out_csv.with_suffix(".summary.json")
        atomic_write_text(spath, json.dumps({**summary, "prompts": [x.to_dict() for x in expls]}, indent=1))
        if as_json:
            typer.echo(json.dumps(summary, indent=1))
        else:
            _print_batch(expls, summary, out_csv, spath)


# ---------------------------------------------------------------------------------------------- output
def _write_single(e, folder: Path, render) -> dict:
    from memobench.api import atomic_write_bytes, atomic_write_text, key_of, png_bytes

    # prompt, seeds, and a short key of the detector's identity (steps, guidance, significance, attribution, …),
    # so that explaining one prompt under other settings never overwrites the earlier files
    base = folder / (f"{slug(e.prompt.text, 48)}-{e.prompt.sha256[:8]}-s{'_'.join(map(str, e.seeds))[:24]}"
                     f"-d{key_of(e.detector)[:6]}")
    paths = {"json": str(base.with_suffix(".json"))}
    if render is not None:
        paths["png"] = str(base.with_suffix(".png"))
        atomic_write_bytes(paths["png"], png_bytes(render(e)))
    atomic_write_text(paths["json"], json.dumps({**e.to_dict(), "paths": paths}, indent=1))
    return paths


def _abl(e, kind: str):
    return next((a for a in e.ablations if a.kind == kind), None)


def _csv_row(e, top_k: int, png: str | None) -> dict:
    rem, rep = _abl(e, "remove"), _abl(e, "replace")
    top = e.top_tokens(top_k)
    return {
        "prompt_id": e.prompt.id, "prompt": e.prompt.text, "mem_type": e.prompt.mem_type or "",
        "statistic": e.statistic, "verdict": e.verdict, "threshold": e.threshold,
        "top_tokens": "; ".join(f"{t.text} ({100 * t.share:.1f}%)" for t in top),
        "top_token": top[0].text if top else "", "top_share": top[0].share if top else None,
        "statistic_removed": rem.statistic if rem else None, "statistic_replaced": rep.statistic if rep else None,
        "sscd": e.sscd_mean, "sscd_removed": rem.sscd_mean if rem else None,
        "sscd_replaced": rep.sscd_mean if rep else None,
        "removal_lowers_statistic": rem.lowers_statistic if rem else None,
        "removal_lowers_sscd": rem.lowers_sscd if rem else None,
        "replacement_lowers_statistic": rep.lowers_statistic if rep else None,
        "replacement_lowers_sscd": rep.lowers_sscd if rep else None, "png": png or "",
    }


def _write_csv(path: Path, rows: list[dict]) -> None:
    from memobench.api import atomic_write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def _frac(xs: list) -> dict:
    xs = [x for x in xs if x is not None]
    return {"fraction": (sum(bool(x) for x in xs) / len(xs)) if xs else None, "n": len(xs)}


def _summary(expls: list, desc: dict, out_csv: Path) -> dict:
    """Fractions over the VM prompts when the set has VM labels, else over all prompts."""
    vm = [e for e in expls if e.prompt.mem_type == "VM"]
    group, sub = ("VM", vm) if vm else ("all", expls)
    out = {"source": {k: desc.get(k) for k in ("name", "n", "content_sha256")}, "group": group, "n": len(sub),
           "csv": str(out_csv),
           "verdict_memorized": _frac([e.verdict == "likely memorized" if e.threshold is not None else None
                                       for e in sub])}
    for kind in ("remove", "replace"):
        abl = [_abl(e, kind) for e in sub]
        out[f"{kind}_lowers_statistic"] = _frac([a.lowers_statistic if a else None for a in abl])
        out[f"{kind}_lowers_sscd"] = _frac([a.lowers_sscd if a else None for a in abl])
        out[f"{kind}_lowers_both"] = _frac([(a.lowers_statistic and a.lowers_sscd)
                                            if a and a.lowers_sscd is not None else None for a in abl])
    return out


def _print_detect(res: dict) -> None:
    from rich.table import Table

    con = _console()
    t = Table(title=f"detection · {res['model']['plugin']['name']} · {res['memorized']['name']} vs "
                    f"{res['nonmemorized']['name']} · {res['status']}")
    for c in ("detector", "AUC", "ACC", "TPR@1%FPR", "TPR@3%FPR", "s/prompt", "memorized", "non-mem."):
        t.add_column(c, no_wrap=True)
    for name, d in res["detectors"].items():
        m = d["metrics"]
        t.add_row(name, _fmt(m["auc"]), _fmt(m["acc"]), _fmt(m["tpr_at_fpr"]), _fmt(m["tpr_at_3fpr"]),
                  _fmt(d.get("seconds_per_prompt"), 2), str(m["n_pos"]), str(m["n_neg"]))
        for g, gv in d["groups"].items():
            t.add_row(f"  {name}[{g}]", _fmt(gv["auc"]), _fmt(gv["acc"]), _fmt(gv["tpr_at_fpr"]),
                      _fmt(gv["tpr_at_3fpr"]), "", str(gv["n_pos"]), str(gv["n_neg"]))
    con.print(t)
    label = {"acc": "max balanced accuracy (explain's default)", "fpr": "TPR@1%FPR operating point"}
    for name, d in res["detectors"].items():
        for rule, pt in d["metrics"]["thresholds"].items():
            con.print(f"{name} threshold ({rule}: {label[rule]}) = {_fmt(pt['threshold'], 4)} → TPR {pt['tpr']:.3f}, "
                      f"FPR {pt['fpr']:.3f}", highlight=False, soft_wrap=True)
        for k, fx in d["fixed_thresholds"].items():
            con.print(f"{name} at fixed threshold {fx['threshold']} ({k}): accuracy {_fmt(fx['accuracy'])}, "
                      f"TPR {_fmt(fx['tpr'])}, FPR {_fmt(fx['fpr'])}", highlight=False, soft_wrap=True)
        con.print(f"calibration ({name}): {d['calibration_path']}", highlight=False, soft_wrap=True)
    con.print(f"result: {res['paths']['result']}", highlight=False, soft_wrap=True)
    con.print(f"roc:    {res['paths']['roc']}", highlight=False, soft_wrap=True)


def _print_explain(e, paths: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from .explain import attribution_label, seeds_label

    con = _console()
    t = Table(title=escape(f'"{e.prompt.text}"'), caption="significance = mean over steps of ‖∂L_s/∂e_k‖₂ "
              f"({attribution_label(e)}; Wen et al.); BOS/EOS/padding excluded")
    for c, j in (("#", "right"), ("token", "left"), ("significance", "right"), ("share", "right"), ("", "left"),
                 ("rank", "right")):
        t.add_column(c, justify=j)
    smax = max((x.share for x in e.tokens), default=1.0) or 1.0
    for x in e.tokens:
        bar = "█" * max(1, round(20 * x.share / smax))
        style = "bold red" if x.rank == 1 else ""
        t.add_row(str(x.position), escape(x.text), f"{x.significance:.4g}", f"{100 * x.share:.1f}%",
                  f"[red]{bar}[/red]", str(x.rank), style=style)
    con.print(t)
    vcol = {"likely memorized": "bold red", "not memorized": "bold green"}.get(e.verdict, "yellow")
    con.print(f"d(p) = {e.statistic:.4g} (model {escape(e.model)}, seeds {seeds_label(e.seeds)}) → "
              f"[{vcol}]{e.verdict}[/{vcol}]", highlight=False)
    con.print(escape(e.note), highlight=False, soft_wrap=True)
    if e.sscd_mean is not None:
        con.print(f"SSCD to the training image ({escape(e.reference_source or '')}): mean {e.sscd_mean:.3f} "
                  f"(per image {', '.join(f'{v:.3f}' for v in e.sscd)})", highlight=False)
    elif e.sscd_impl and e.sscd_impl.get("unavailable"):
        con.print(escape(e.sscd_impl["unavailable"]), highlight=False)
    for s in e.statements:
        con.print(escape(s), highlight=False, soft_wrap=True)
    for k, v in paths.items():
        con.print(f"{k}: {v}", highlight=False, soft_wrap=True)


def _print_batch(expls: list, summary: dict, out_csv: Path, spath: Path) -> None:
    from rich.markup import escape
    from rich.table import Table

    con = _console()
    t = Table(title=f"explain · {summary['source']['name']} · {len(expls)} prompts")
    for c in ("id", "type", "d(p)", "verdict", "top tokens", "d removed", "SSCD", "SSCD removed"):
        t.add_column(c, overflow="fold")
    for e in expls:
        rem = _abl(e, "remove")
        t.add_row(escape(e.prompt.id), e.prompt.mem_type or "", f"{e.statistic:.4g}", e.verdict,
                  escape("; ".join(f"{x.text} {100 * x.share:.0f}%" for x in e.top_tokens(3))),
                  _fmt(rem.statistic if rem else None, 4), _fmt(e.sscd_mean), _fmt(rem.sscd_mean if rem else None))
    con.print(t)
    g = summary["group"]
    for k in ("verdict_memorized", "remove_lowers_statistic", "remove_lowers_sscd", "remove_lowers_both",
              "replace_lowers_statistic", "replace_lowers_sscd", "replace_lowers_both"):
        v = summary[k]
        con.print(f"{k.replace('_', ' ')} [{g}]: {_fmt(v['fraction'])} (n={v['n']})", highlight=False)
    con.print(f"csv: {out_csv}", highlight=False, soft_wrap=True)
    con.print(f"summary: {spath}", highlight=False, soft_wrap=True)
