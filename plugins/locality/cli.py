"""``memobench analyze locality``: the command line of :mod:`.analysis` (added through ``register_commands``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from memobench.api import BadInput, parse_kv, parse_seeds, resolve_offline, slug

SCHEMA = "memobench.locality/1"


def analyze_group(app: typer.Typer) -> typer.Typer:
    """The ``analyze`` sub-application (created once; other plugins may add their analyses to it too)."""
    for info in getattr(app, "registered_groups", []):
        if info.name == "analyze" and info.typer_instance is not None:
            return info.typer_instance
    grp = typer.Typer(help="Analyses of a model's memorization (e.g. `analyze locality`, DoRI's locality tests).",
                      no_args_is_help=True)
    app.add_typer(grp, name="analyze")
    return grp


def _params(cls, values: dict, what: str, fixed: dict | None = None):
    try:
        return cls.make_params({**values, **(fixed or {})})
    except (ValueError, TypeError) as e:
        raise BadInput(f"{what}: {e}") from None


def _texts(reg, name: str, ctx, what: str) -> list[str]:
    from memobench.api import is_prompt_file, read_prompt_file

    if is_prompt_file(name):
        return [p.text for p in read_prompt_file(name, what)]
    cls = reg.get("prompt_set", name)
    return [p.text for p in cls(_params(cls, {}, what)).prompts(ctx)]


def register(app: typer.Typer) -> None:
    grp = analyze_group(app)

    @grp.command("locality")
    def locality(
        target: str = typer.Option(..., "--target", "-t", help="The memorized prompt whose training image DoRI "
                                   "attacks: a prompt id (e.g. astronaut) or the exact prompt text of --prompts."),
        model: str = typer.Option("tiny", "--model", help="Model plugin (default: tiny, the embedded model)."),
        n_inits: int = typer.Option(100, "--n-inits", help="DoRI runs from N(0, I) inits (paper: 100; ≥ 2)."),
        seed: int = typer.Option(0, "--seed", help="Init i runs DoRI with seed SEED+i; also the t-SNE seed."),
        seeds: str = typer.Option(None, "--seeds", help="Generation seeds per embedding, e.g. 0-9 (default: the "
                                  "model's). One CPU generator per image."),
        gen_steps: int = typer.Option(None, "--gen-steps", help="Denoising steps (default: the model's)."),
        guidance: float = typer.Option(None, "--guidance", help="Guidance scale (default: the model's)."),
        threshold: float = typer.Option(0.7, "--threshold", help="Success: SSCD > THRESHOLD (DoRI: 0.7)."),
        min_success_rate: float = typer.Option(0.8, "--min-success-rate", help="The paper's finding counts as "
                                               "reproduced when at least this fraction of inits succeeds."),
        success_level: str = typer.Option("mean", "--success-level", help="mean | max SSCD over the seeds."),
        prompts: str = typer.Option(None, "--prompts", "-p", help="Memorized prompt set (Y_mem; holds the "
                                    "target). Default: the model's target set."),
        nonmem: str = typer.Option(None, "--nonmem", help="Non-memorized prompts (set name or file) for the "
                                   "distance comparison and NeMo's statistics. Default: the model's nonmem set."),
        n_mem: int = typer.Option(0, "--n-mem", help="First N memorized prompts for Y_mem (0 = all)."),
        n_nonmem: int = typer.Option(0, "--n-nonmem", help="First N non-memorized prompts in the distance "
                                     "comparison (0 = all)."),
        mitigation: str = typer.Option("none", "--mitigation", "-m", help="Model DoRI attacks and generates with "
                                       "(none, or a weights mitigation such as nemo/wanda, fitted on the target)."),
        mitigation_param: list[str] = typer.Option(None, "--mitigation-param", help="KEY=VALUE for --mitigation."),
        dori_param: list[str] = typer.Option(None, "--dori-param", help="KEY=VALUE for the dori attack (e.g. "
                                             "steps=50, lr=0.1); init and seed are set by the analysis."),
        nemo_param: list[str] = typer.Option(None, "--nemo-param", help="KEY=VALUE for NeMo's selections."),
        wanda_param: list[str] = typer.Option(None, "--wanda-param", help="KEY=VALUE for Wanda's selections."),
        projection: str = typer.Option("tsne", "--projection", help="tsne (the paper) | pca."),
        adv_set: str = typer.Option("successful", "--adv-set", help="Y_adv: successful results (fallback: all "
                                    "when < 2 succeed) | all."),
        activation: str = typer.Option("full", "--activation", help="full layer tensors | nemo (NeMo Eq. 3: "
                                       "mean |·| over tokens per neuron)."),
        act_seed: int = typer.Option(0, "--act-seed", help="Seed of the fixed noise x_T for the activations."),
        act_timestep_index: int = typer.Option(0, "--act-timestep-index", help="Timestep (index into the "
                                               "generation schedule) of the activation UNet call."),
        weight_space: bool = typer.Option(True, "--weight-space/--no-weight-space", help="Run NeMo + Wanda "
                                          "selections (analysis 3)."),
        weight_mem: bool = typer.Option(False, "--weight-mem/--no-weight-mem", help="Also select for Y_mem (the "
                                        "paper's Y_mem bars; one NeMo localization per memorized prompt)."),
        workers: int = typer.Option(0, "--workers", help="Processes for the NeMo + Wanda selections, one torch "
                                    "thread each (0 = one per CPU core; 1 = in this process)."),
        wanda_layers: str = typer.Option("nemo_blocks", "--wanda-layers", help="nemo_blocks (ff.net.2 of NeMo's "
                                         "blocks) | a wanda layers spec (all, 0,1,…)."),
        wanda_k_min: int = typer.Option(1, "--wanda-k-min", help="Wanda per-row candidates ≥ K_MIN."),
        empty_iou: float = typer.Option(1.0, "--empty-iou", help="IoU of two empty selections."),
        nemo_wanda_space: str = typer.Option("weights", "--nemo-wanda-space", help="weights (W_V entries) | "
                                             "neurons (output channels)."),
        sscd_preset: str = typer.Option("dori2026", "--sscd-preset", help="SSCD preset (memobench.sscd)."),
        sscd_backend: str = typer.Option("auto", "--sscd-backend", help="auto | onnx | torchscript."),
        model_param: list[str] = typer.Option(None, "--model-param", help="KEY=VALUE for the model plugin."),
        output_dir: Path = typer.Option(Path("results"), "--output-dir", "--out", "-o", help="Writes OUTPUT_DIR/<model>/"
                                        "locality/<target>/ (locality.json + PNG figures)."),
        cache_dir: Path = typer.Option(None, "--cache-dir", help="Cache (default: $MEMOBENCH_CACHE_DIR or "
                                       "~/.cache/memobench); DoRI results are cached like `run`'s."),
        device: str = typer.Option("cpu", "--device", help="torch device."),
        offline: bool = typer.Option(False, "--offline", help="Never touch the network."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
        as_json: bool = typer.Option(False, "--json", help="Print the result JSON instead of a summary."),
    ):
        """DoRI's locality tests for one memorized image: input, activation and weight space (JSON + figures).

        Runs DoRI from N Gaussian inits, scores each result by SSCD, compares the spread of the embeddings with
        non-memorized prompt embeddings, and measures activation discrepancy and NeMo/Wanda selection agreement
        per layer (METHODS §7.4, locality diagnostics)."""
        from memobench.api import check_device

        device = check_device(device)
        from .analysis import LocalityParams

        t_start = time.time()
        offline = resolve_offline(offline)
        gen_seeds = parse_seeds(seeds) if seeds is not None else None
        if seeds is not None and not gen_seeds:
            raise BadInput("--seeds: no seeds given; use e.g. 0-9")
        if gen_steps is not None and gen_steps < 1:
            raise BadInput(f"--gen-steps: at least 1, got {gen_steps}")
        try:
            lp = LocalityParams(
                n_inits=n_inits, seed=seed, dori=parse_kv(dori_param, "--dori-param"), mitigation=mitigation,
                mitigation_params=parse_kv(mitigation_param, "--mitigation-param"), gen_seeds=gen_seeds,
                num_inference_steps=gen_steps, guidance_scale=guidance, threshold=threshold,
                min_success_rate=min_success_rate,
                success_level=success_level, sscd_preset=sscd_preset, sscd_backend=sscd_backend,
                nonmem_set=nonmem or "", n_nonmem=n_nonmem, mem_set=prompts or "", n_mem=n_mem,
                projection=projection, adv_set=adv_set, activation=activation, act_seed=act_seed,
                act_timestep_index=act_timestep_index, weights=weight_space, weight_mem=weight_mem,
                workers=workers,
                nemo=parse_kv(nemo_param, "--nemo-param"), wanda=parse_kv(wanda_param, "--wanda-param"),
                wanda_layers=wanda_layers, wanda_k_min=wanda_k_min, empty_iou=empty_iou,
                nemo_wanda_space=nemo_wanda_space)
        except ValueError as e:
            raise BadInput(str(e)) from None
        result, paths = run_locality(lp, model, target, parse_kv(model_param, "--model-param"), output_dir,
                                     cache_dir, device, offline, progress and not as_json, t_start)
        if as_json:
            typer.echo(json.dumps(result, indent=1))
        else:
            _print_summary(result, paths)


def run_locality(lp, model_name: str, target_spec: str, model_params: dict, output_dir: Path, cache_dir, device: str,
                 offline: bool, progress: bool, t_start: float | None = None) -> tuple[dict, dict]:
    """Resolve everything (bad input fails before the model loads), run the three analyses, write JSON + PNGs."""
    from memobench.api import ProgressReporter, check_output_dir, get_registry, load_model, model_context

    from . import figures
    from .analysis import Setup, params_record, run_activation_space, run_input_space, run_weight_space, timed

    t_start = t_start or time.time()
    cpu_start = time.process_time()
    reg = get_registry()
    mcls = reg.get("model", model_name)
    missing = [f"{k} '{n}'" for k, n in (("attack", "dori"), ("mitigation", "nemo"), ("mitigation", "wanda"))
               if n not in reg.entries[k]]
    if missing:
        raise BadInput(f"analyze locality needs {', '.join(missing)} (memobench's built-in plugins); check "
                       "`memobench plugins` and MEMOBENCH_LOAD_PLUGINS")
    model_plugin = mcls(_params(mcls, model_params, "--model-param"))
    dcls = reg.get("attack", "dori")
    _params(dcls, lp.dori, "--dori-param", {"init": "gaussian", "seed": lp.seed})
    _params(reg.get("mitigation", "nemo"), lp.nemo, "--nemo-param")
    wcls = reg.get("mitigation", "wanda")
    _params(wcls, lp.wanda, "--wanda-param")
    if lp.wanda_layers != "nemo_blocks":
        _params(wcls, {**lp.wanda, "layers": lp.wanda_layers}, "--wanda-layers")
    mit_cls = reg.get("mitigation", lp.mitigation)
    mitigation = mit_cls(_params(mit_cls, lp.mitigation_params, "--mitigation-param"))
    if mitigation.kind not in ("none", "weights"):
        raise BadInput(f"--mitigation: '{lp.mitigation}' is an inference-time mitigation (kind "
                       f"'{mitigation.kind}'); the locality analysis supports none or weights mitigations")
    mem_name = lp.mem_set or mcls.prompt_sets.get("target")
    non_name = lp.nonmem_set or mcls.prompt_sets.get("nonmem")
    if not mem_name:
        raise BadInput(f"--prompts: model '{model_name}' names no target prompt set; pass --prompts NAME")
    if not non_name:
        raise BadInput(f"--nonmem: model '{model_name}' names no non-memorized prompt set; pass --nonmem NAME|FILE")
    ps_cls = reg.get("prompt_set", mem_name)
    prompt_set = ps_cls(_params(ps_cls, {}, "--prompts"))
    out_root = check_output_dir(output_dir)
    gen = dict(mcls.generation)
    if lp.num_inference_steps is not None:
        gen["num_inference_steps"] = lp.num_inference_steps
    if lp.guidance_scale is not None:
        gen["guidance_scale"] = lp.guidance_scale
    gen_seeds = list(lp.gen_seeds if lp.gen_seeds is not None else getattr(mcls, "default_seeds", range(10)))
    if lp.act_timestep_index >= gen["num_inference_steps"]:
        raise BadInput(f"--act-timestep-index: {lp.act_timestep_index} ≥ {gen['num_inference_steps']} denoising "
                       "steps")
    reporter = ProgressReporter(enabled=progress)
    ctx = model_context(mcls, cache_dir=cache_dir, device=device, offline=offline, generation=gen, registry=reg,
                        seeds=tuple(gen_seeds), progress=reporter, batch_size=16)
    mem_all = prompt_set.prompts(ctx)
    tgt = next((q for q in mem_all if q.id == target_spec), None) or next(
        (q for q in mem_all if q.text == target_spec), None)
    if tgt is None:
        ids = ", ".join(q.id for q in mem_all[:40]) + (" …" if len(mem_all) > 40 else "")
        raise BadInput(f"--target: {target_spec!r} is not a prompt id or text of prompt set '{mem_name}'; "
                       f"available: {ids or '(empty set)'}")
    reference = None
    for rid in tgt.reference_ids:
        reference = prompt_set.reference_image(tgt, rid, ctx)
        if reference is not None:
            break
    if reference is None:
        raise BadInput(f"--target: prompt '{tgt.id}' of '{mem_name}' has no training image; DoRI needs one")
    mem_prompts = mem_all[: lp.n_mem] if lp.n_mem else list(mem_all)
    non_all = _texts(reg, non_name, ctx, "--nonmem")
    if len(non_all) < 2:
        raise BadInput(f"--nonmem: '{non_name}' has {len(non_all)} prompts; at least 2 are needed")
    ctx.nonmem_prompts = non_all  # NeMo's activation statistics (all of them)
    ctx.nonmem_prompt_set = non_name
    nonmem_texts = non_all[: lp.n_nonmem] if lp.n_nonmem else non_all

    timing: dict = {}
    with timed(timing, "load"):
        model = load_model(model_plugin, ctx)
    setup = Setup(model=model, ctx=ctx, registry=reg, target=tgt, reference=reference, mem_prompts=mem_prompts,
                  nonmem_texts=nonmem_texts, generation=gen, gen_seeds=gen_seeds, params=lp, mitigation=mitigation,
                  timing=timing, model_spec=(model_name, dict(model_params)))
    folder = out_root / slug(model_name, 80) / "locality" / (slug(tgt.id, 80) or "target")
    with reporter:
        if mitigation.kind == "weights":
            with timed(timing, "fit"):
                mitigation.fit(model, [tgt], ctx)
        inp, extra = run_input_space(setup)
        with timed(timing, "activation"):
            act = run_activation_space(setup, extra)
        wts = None
        if lp.weights:
            with timed(timing, "weight"):
                wts = run_weight_space(setup, extra)

    t0, c0 = time.time(), time.process_time()
    paths = {"folder": folder}
    paths["input_space"] = figures.input_space(inp, extra["distances"], folder / "input_space.png", tgt.id)
    paths["activation_space"] = figures.activation_space(act, folder / "activation_space.png", tgt.id)
    if wts is not None:
        paths["weight_space"] = figures.weight_space(wts, folder / "weight_space.png", tgt.id)
    else:  # not a stale figure of an earlier run next to this run's JSON
        (folder / "weight_space.png").unlink(missing_ok=True)
    paths["generations"] = figures.generations(extra["runs"], extra["prompt_images"], extra["prompt_sims"], tgt,
                                               reference, folder / "generations.png", gen_seeds)
    timing["figures_s"] = round(time.time() - t0, 3)
    timing["figures_cpu_s"] = round(time.process_time() - c0, 3)
    timing["total_s"] = round(time.time() - t_start, 3)
    timing["total_cpu_s"] = round(time.process_time() - cpu_start, 3)
    from memobench.api import image_sha256, write_result

    sscd_impl = None
    try:
        from memobench.api import SSCD

        sscd_impl = SSCD(preset=lp.sscd_preset, backend=lp.sscd_backend, cache_dir=ctx.cache_dir, offline=offline).impl
    except Exception as e:  # pragma: no cover - the embedder already ran; this only describes it
        sscd_impl = {"error": f"{type(e).__name__}: {e}"}
    result = {
        "schema": SCHEMA,
        "command": "memobench analyze locality",
        "model": {"plugin": model_plugin.identity(), "weights": model.identity()},
        "target": {"id": tgt.id, "text": tgt.text, "mem_type": tgt.mem_type, "prompt_set": mem_name,
                   "reference_ids": list(tgt.reference_ids), "reference_sha256": image_sha256(reference)},
        "nonmem": {"source": non_name, "n_compared": len(nonmem_texts), "n_nemo_statistics": len(non_all)},
        "mitigation": mitigation.identity() | {"kind": mitigation.kind},
        "params": params_record(lp),
        "generation": gen,
        "seeds": {"dori": [lp.seed + i for i in range(lp.n_inits)], "generation": gen_seeds,
                  "activation_noise": lp.act_seed, "projection": lp.seed,
                  "rule": "DoRI init i: attack generator seeded from sha256(prompt sha256 | seed+i); generation: one "
                          "CPU torch.Generator().manual_seed(s) per image"},
        "sscd": sscd_impl,
        "input_space": inp, "activation_space": act, "weight_space": wts,
        "figures": {k: Path(v).name for k, v in paths.items() if k != "folder"},
        "timing": timing,
    }
    # plain JSON types first (numpy values, paths), then provenance (memobench_version, git commit, created_at, env)
    # and strict JSON written atomically
    result = json.loads(json.dumps(result, default=_json_default))
    result = write_result(folder / "locality.json", result, sort_keys=True)
    paths["json"] = folder / "locality.json"
    return result, paths


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _fmt(v, nd: int = 3) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _print_summary(r: dict, paths: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    con = Console()
    inp = r["input_space"]
    d = inp["pairwise_l2"]
    con.print(f"[bold]Locality of '{escape(r['target']['id'])}'[/bold] ({escape(r['model']['plugin']['name'])}, "
              f"{inp['n_inits']} Gaussian inits, DoRI {inp['dori']['params'].get('steps')} steps)")
    sr = inp.get("success_rates") or {}
    con.print(f"input space: {inp['n_success']}/{inp['n_inits']} inits reach SSCD > {inp['threshold']} "
              f"({inp['success_level']} over seeds: success rate {inp['success_rate']:.2f}; any seed "
              f"{_fmt(sr.get('max'), 2)}, per generation {_fmt(sr.get('generation'), 2)}; own prompt mean SSCD "
              f"{inp['prompt_sscd']['mean']:.3f}); mean pairwise "
              f"L2: DoRI {_fmt(d[inp['adversarial_set_compared']]['mean'])} vs non-memorized "
              f"{_fmt(d['nonmem_prompts']['mean'])} (inits {_fmt(d['inits']['mean'])})", highlight=False)
    con.print(f"→ {escape(inp['finding']['statement'])}", highlight=False)
    t = Table(title="activation discrepancy AD_l (mean pairwise ℓ2)")
    for c in ("family", "layer", "name", "Y_mem", "Y_adv"):
        t.add_column(c)
    for row in r["activation_space"]["layers"]:
        t.add_row(row["family"], str(row["layer"]), escape(row["name"]), _fmt(row["Y_mem"]), _fmt(row["Y_adv"]))
    con.print(t)
    w = r.get("weight_space")
    if w:
        t = Table(title=f"weight agreement (IoU; empty ∪ empty = {w['empty_iou']:g})")
        cols = ["layer", "NeMo·Y_adv", "Wanda·Y_adv", "NeMo vs Wanda·Y_adv"]
        keys = ["nemo_Y_adv", "wanda_Y_adv", "nemo_vs_wanda_Y_adv"]
        if w.get("Y_mem"):
            cols += ["NeMo·Y_mem", "Wanda·Y_mem"]
            keys += ["nemo_Y_mem", "wanda_Y_mem"]
        for c in cols + ["NeMo empty (Y_adv)"]:
            t.add_column(c)
        for row in w["layers"]:
            if row.get("layer") is None:
                continue
            t.add_row(str(row["layer"]), *[_fmt(row.get(k)) for k in keys],
                      _fmt(row.get("nemo_Y_adv_empty_fraction"), 2))
        con.print(t)
    con.print(f"result:  {paths['json']}")
    for k in ("input_space", "activation_space", "weight_space", "generations"):
        if k in paths:
            con.print(f"figure:  {paths[k]}")
    con.print(f"time:    {r['timing']['total_s']:.1f} s", highlight=False)
