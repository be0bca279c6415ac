"""Is memorization local? DoRI's three locality diagnostics, reproducible on any memobench model.

Paper: Kowalczuk*, Hintersdorf*, Struppek*, Kersting, Dziedzic, Boenisch, "Finding DoRI: Discovery of Retained Images
in Diffusion Models", ICML 2026, arXiv 2507.16880 (v1 "Finding Dori: Memorization in Text-to-Image Diffusion Models
Is Less Local Than Assumed"), the section that tests the locality assumption behind pruning mitigations (input,
activation and weight space) and the authors' blog post. memobench specification: ``METHODS.md`` §7.4 "Locality
diagnostics" (definitions), §8.1 "Locality figures" (the paper's bars, layers 1–7), §7.1 (NeMo), §7.3 (Wanda).

Notation: x_mem is the training image of the target prompt p, e_p = encode(p) its prompt embedding (1×77×d),
DoRI(y⁽⁰⁾) the DoRI attack (METHODS §7.4, the registered ``dori`` attack) started from y⁽⁰⁾, and
``SSCD(x, x_mem)`` the cosine of SSCD descriptors (METHODS §3, preset ``dori2026``).

1. Input space (:func:`run_input_space`)
   For i = 0..N−1: y⁽⁰⁾_i ~ N(0, I) (DoRI ``init = "gaussian"``, DoRI ``seed = seed + i``, so the draw comes from
   DoRI's own generator), y_i = DoRI(y⁽⁰⁾_i) against x_mem. Generate from y_i (negative embedding e_∅) with the fixed
   generation seeds G; s_i = mean_{g∈G} SSCD(x_{i,g}, x_mem) (the ``mr`` metric's prompt-mean rule, METHODS §4.2) and
   success_i = [s_i > τ], τ = 0.7 (strict, [PAPER blog] "values above 0.7 indicate replication").
   Spread: D(Y) = { ‖vec(y_i) − vec(y_j)‖₂ : i < j } over the flattened 77×d embeddings, summarised by its mean
   (:func:`pairwise_l2`, :func:`distance_summary`), for Y_adv = {y_i}, for the non-memorized prompt embeddings
   Y_non = {e_q : q in the model's ``nonmem`` prompt set} and, for reference, for the inits and the memorized prompts.
   The paper's finding is mean D(Y_adv) > mean D(Y_non) with nearly every init succeeding. A 2-D projection (t-SNE,
   as the paper, or PCA) shows the inits, the results (coloured by s_i), e_p and Y_non.

2. Activation space (:func:`run_activation_space`) [SECONDARY definition, METHODS §7.4]
   AD_l(Y) = 2 / (n(n−1)) · Σ_{i<j} ‖a_l(y_i) − a_l(y_j)‖₂   (:func:`activation_discrepancy`)
   with a_l(y) the activation of layer l for conditioning y on one fixed noise: one conditional UNet call
   ε_θ(x_T, t, y) on the initial latent x_T of seed ``act_seed`` at the ``act_timestep_index``-th timestep of the
   generation schedule (the first, t = 981 of 50 DDIM steps on SD-1.4). Layers: NeMo's value layers l = 1..L
   (``attn2.to_v`` outputs of the down/mid blocks, METHODS §1.3/§7.1.1) and, per transformer block of those layers,
   Wanda's feed-forward layer (the ``ff.net.2`` input, METHODS §7.3 step 1). Compared for Y_mem (the model's
   memorized prompts, one embedding each) and Y_adv (adversarial embeddings that all reproduce the target).

3. Weight space (:func:`run_weight_space`) [SECONDARY definition, METHODS §7.4]
   Weight agreement WA_l(Y) = 2 / (n(n−1)) · Σ_{i<j} |W_l(y_i) ∩ W_l(y_j)| / |W_l(y_i) ∪ W_l(y_j)|
   (:func:`mean_pairwise_iou`), with W_l(y) the set NeMo (neurons of value layer l, METHODS §7.1.4 with y in place
   of e_p — ``NeMo.select_for_embedding``) or Wanda (weights of block l's ``ff.net.2``, METHODS §7.3 steps 2–5 with
   y as the one target — ``Wanda.embedding_masks``) selects, for Y_adv (and Y_mem with ``weight_mem``).
   NeMo vs Wanda: both methods are compared in one space, the weights of value layer l: NeMo's neuron i is row i
   of W_V^l (deactivating it ≡ zeroing that row, METHODS §7.1.5) and Wanda is scored on W_V^l itself (ConceptPrune's
   ``hook_module = attn_val`` option); IoU_l(y) = |rows(N_l(y)) ∩ M_l(y)| / |rows(N_l(y)) ∪ M_l(y)|, averaged over
   y ∈ Y_adv (and Y_mem).

Choices the paper does not publish (each a field of :class:`LocalityParams`, recorded in the result JSON)
--------------------------------------------------------------------------------------------------------
* ``n_inits`` 100 [SECONDARY "100 random inits per image"]; DoRI hyperparameters are the attack's defaults (§7.4)
  unless ``dori`` overrides them; ``init`` and ``seed`` are set by the analysis.
* ``mitigation`` "none": the model DoRI attacks (and generates with). Which model the paper's locality runs attacked is
  [UNPUBLISHED]; NeMo/Wanda selections are always computed on the unmitigated model (they are what those methods
  would select).
* ``gen_seeds``: the model's default seeds; ``success_level`` "mean" (the ``mr`` metric's default) or "max".
* ``min_success_rate`` 0.8: the paper says nearly every init reproduces the image; the finding counts as reproduced
  when at least this fraction succeeds and mean D(Y_adv) > mean D(Y_non) (issue #8's acceptance rule). The statement
  also gives the spread of the inits themselves: N(0, I) draws in 77×d are ≈ √(2·77·d) apart whatever DoRI does,
  so that ratio tells how much of the spread the optimisation created or removed.
* ``adv_set`` "successful": Y_adv = the results that reach success ("that all reproduce the same image"); when fewer
  than 2 succeed the analysis falls back to all N results and says so in the JSON (``adv_set_used``).
* ``activation`` "full": a_l(y) = the whole layer tensor (77×C for ``to_v``, H·W×4C for ``ff.net.2``) flattened — the
  scale of the paper's bars (≈ 10²) suggests unreduced activations; "nemo" = NeMo's Eq. 3 reduction (mean over
  tokens of |·|, one value per neuron). ``act_seed`` 0, ``act_timestep_index`` 0, conditional branch only (no CFG).
* ``wanda_layers`` "nemo_blocks": Wanda's ``ff.net.2`` of the transformer blocks that hold NeMo's value layers (on
  SD-1.4 the 7 down/mid blocks: the paper's figures show 7 layer ids for Wanda, METHODS §9 #14); or a Wanda ``layers``
  spec ("all" or indices). ``wanda_k_min`` 1: per-row candidates k = max(k_min, ⌊ρ·in⌋); ConceptPrune has no minimum,
  but ρ = 0.01 selects nothing in a layer with fewer than 100 inputs (the embedded model's 64-dim value layers).
* ``empty_iou`` 1.0: the IoU of two empty selections (nothing selected by either = agreement). The paper's near-1
  NeMo bars in some layers are this artefact (METHODS §7.4); the JSON reports the fraction of empty selections per
  layer so that it can be read off.
* ``nemo_wanda_space`` "weights" (above) or "neurons" (Wanda's selected rows vs NeMo's neurons). The JSON also
  gives ``nemo_vs_wanda_*_max`` = min(|A|, |B|) / max(|A|, |B|), the largest IoU two sets of those sizes can have: in
  "weights" a NeMo neuron is a whole row of W_V while Wanda picks at most ⌊ρ·in⌋ weights per row, so a low IoU can
  be a matter of sizes alone.
* ``weight_mem`` False: the weight-space selections run for Y_adv only (the issue's bars: NeMo vs NeMo and Wanda vs
  Wanda across adversarial embeddings, NeMo vs Wanda); ``True`` adds the paper's Y_mem bars at the cost of one more
  NeMo localization per memorized prompt. The activation space always compares Y_mem with Y_adv.
* ``workers`` 0: NeMo's localization (hundreds of small UNet calls per embedding: ≈ 40 s CPU time for one DoRI
  embedding of the embedded model) barely gains from a second torch thread, so on CPU the selections run in one
  spawned process per core with one thread each (``workers`` 1: in this process, also one thread). The selections do
  not depend on the number of processes.

Randomness: every draw is seeded explicitly and recorded — DoRI's generator (seed + i, with the prompt's sha256),
the generation seeds, the activation noise seed, NeMo's detection seed and Wanda's sampling seed (their ``seed``
params) and the projection's ``random_state`` (= ``seed``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .measures import (  # noqa: F401  (re-exported: the analysis' public statistics)
    PROJECTIONS, _as_bool, activation_discrepancy, distance_summary, iou, k_min_skill_ratio,
    mean_paired_iou, mean_pairwise_iou, neuron_mask, pairwise_iou, pairwise_l2, project_2d, rows_mask,
    success_rates,
)

__all__ = [
    "LocalityParams", "pairwise_l2", "distance_summary", "activation_discrepancy", "iou", "pairwise_iou",
    "mean_pairwise_iou", "mean_paired_iou", "rows_mask", "neuron_mask", "agreement_rows", "success_rates",
    "project_2d",
    "k_min_skill_ratio", "run_input_space", "run_activation_space", "run_weight_space",
]


@dataclass
class LocalityParams:
    """Settings of one locality analysis (defaults: METHODS §7.4; [UNPUBLISHED] choices: see the module docstring)."""

    n_inits: int = 100  # [SECONDARY] DoRI runs per image from N(0, I)
    seed: int = 0  # init i runs DoRI with seed = seed + i; also the projection's random_state
    dori: dict = field(default_factory=dict)  # overrides of the dori attack's params (not init/seed)
    mitigation: str = "none"  # the model DoRI attacks and generates with [UNPUBLISHED]
    mitigation_params: dict = field(default_factory=dict)
    gen_seeds: list | None = None  # None = the model's default seeds
    num_inference_steps: int | None = None  # None = the model's generation preset
    guidance_scale: float | None = None
    threshold: float = 0.7  # [PAPER blog] SSCD > 0.7 = replication
    min_success_rate: float = 0.8  # "nearly every init succeeds" [PAPER blog], made a number by issue #8's acceptance
    success_level: str = "mean"  # "mean" (mr's prompt-mean rule) | "max" over the generation seeds
    sscd_preset: str = "dori2026"
    sscd_backend: str = "auto"
    nonmem_set: str = ""  # "" = the model's nonmem prompt set
    n_nonmem: int = 0  # 0 = all
    mem_set: str = ""  # "" = the model's target prompt set (Y_mem; the target is looked up here)
    n_mem: int = 0  # 0 = all
    projection: str = "tsne"  # "tsne" (the paper) | "pca"
    adv_set: str = "successful"  # "successful" | "all"
    activation: str = "full"  # "full" | "nemo" (Eq. 3 reduction)
    act_seed: int = 0
    act_timestep_index: int = 0
    weights: bool = True  # run the weight-space analysis (NeMo + Wanda selections)
    weight_mem: bool = False  # also for Y_mem (the paper's Y_mem bars; one more NeMo localization per prompt)
    workers: int = 0  # processes for the NeMo + Wanda selections; 0 = one per available CPU core (CPU only)
    nemo: dict = field(default_factory=dict)  # params of the nemo mitigation
    wanda: dict = field(default_factory=dict)  # params of the wanda mitigation
    wanda_layers: str = "nemo_blocks"  # "nemo_blocks" | a wanda `layers` spec ("all", "0,1,…")
    wanda_k_min: int = 1
    empty_iou: float = 1.0
    nemo_wanda_space: str = "weights"  # "weights" | "neurons"

    def __post_init__(self):
        if self.n_inits < 2:
            raise ValueError(f"--n-inits: at least 2 (pairwise distances need two embeddings), got {self.n_inits}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"--projection: {self.projection!r} not in {PROJECTIONS}")
        choices = {"success_level": ("mean", "max"), "adv_set": ("successful", "all"),
                   "activation": ("full", "nemo"), "nemo_wanda_space": ("weights", "neurons")}
        for k, allowed in choices.items():
            if getattr(self, k) not in allowed:
                raise ValueError(f"locality {k}: {getattr(self, k)!r} not in {allowed}")
        if self.guidance_scale is not None and not 0.0 <= self.guidance_scale < float("inf"):  # NaN fails too
            raise ValueError(f"--guidance: a finite number ≥ 0, got {self.guidance_scale}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"--threshold: an SSCD cosine in [-1, 1], got {self.threshold}")
        if not 0.0 <= self.min_success_rate <= 1.0:
            raise ValueError(f"--min-success-rate: a fraction in [0, 1], got {self.min_success_rate}")
        if self.n_mem == 1:
            raise ValueError("--n-mem: at least 2 memorized prompts (or 0 = all)")
        for k in ("n_mem", "n_nonmem", "wanda_k_min", "act_timestep_index", "workers"):
            if getattr(self, k) < 0:
                raise ValueError(f"locality {k}: must be ≥ 0, got {getattr(self, k)}")
        if not 0.0 <= self.empty_iou <= 1.0:
            raise ValueError(f"locality empty_iou: in [0, 1], got {self.empty_iou}")
        bad = sorted({"init", "seed"} & set(self.dori))
        if bad:
            raise ValueError(f"--dori-param {', '.join(bad)}: set by the analysis (Gaussian inits, seed = --seed + i)")


# ================================================================================================ the analysis
@dataclass
class Setup:
    """Everything the three analyses share (built by :mod:`.cli`)."""

    model: Any  # memobench.model.DiffusionModel
    ctx: Any  # memobench.api.Context
    registry: Any
    target: Any  # memobench.api.Prompt
    reference: np.ndarray
    mem_prompts: list  # Y_mem prompts (memobench.api.Prompt)
    nonmem_texts: list[str]
    generation: dict  # num_inference_steps, guidance_scale, height, width
    gen_seeds: list[int]
    params: LocalityParams
    mitigation: Any = None  # a memobench.api.Mitigation (fitted on the target when of kind "weights")
    timing: dict = field(default_factory=dict)
    model_spec: tuple[str, dict] | None = None  # (model plugin name, params): lets worker processes load the model


@contextlib.contextmanager
def timed(timing: dict, name: str):
    """Record a phase's wall time (``<name>_s``) and the process CPU time (``<name>_cpu_s``, all threads)."""
    w, c = time.time(), time.process_time()
    try:
        yield
    finally:
        timing[f"{name}_s"] = round(time.time() - w, 3)
        timing[f"{name}_cpu_s"] = round(time.process_time() - c, 3)


def _flat(t) -> np.ndarray:
    return t.detach().float().cpu().numpy().reshape(-1)


def _mitigated(setup: Setup):
    import contextlib

    m = setup.mitigation
    if m is None or m.kind == "none":
        return contextlib.nullcontext()
    return m.apply(setup.model, setup.target, setup.ctx)


def _dori_outputs(setup: Setup) -> list[dict]:
    """DoRI from N Gaussian inits (the registered ``dori`` attack), in the runner's attack cache."""
    from memobench.api import TensorCache
    from memobench.api import generation_size, size_key_part
    from memobench.api import attack_key, cached_attack, image_sha256

    p, model, ctx = setup.params, setup.model, setup.ctx
    size = generation_size(model, ctx)  # DoRI encodes the image at the run's size: part of the key when not native
    dcls = setup.registry.get("attack", "dori")
    cache = TensorCache(ctx.cache_dir, "attacks")
    model_ident = model.identity()
    ref_sha = image_sha256(setup.reference)
    out = []
    with ctx.task(f"DoRI from {p.n_inits} Gaussian inits", p.n_inits) as advance:
        for i in range(p.n_inits):
            attack = dcls(dcls.make_params({**p.dori, "init": "gaussian", "seed": p.seed + i}))
            key = attack_key(model_ident, setup.mitigation, attack, setup.target, ref_sha, size_key_part(model, size))
            with _mitigated(setup):
                tensors, meta, cached = cached_attack(cache, key, attack, model, setup.target, setup.reference, ctx)
            out.append({"index": i, "dori_seed": p.seed + i, "y_init": tensors["y_init"].float().cpu(),
                        "y_adv": tensors["prompt_embeds"].float().cpu(), "trace": meta.get("trace", {}),
                        "attack": attack.identity(), "cache_key": key, "cached": cached})
            advance()
    return out


def _generate(setup: Setup, emb) -> np.ndarray:
    import torch

    model, g = setup.model, setup.generation
    imgs = []
    with _mitigated(setup), torch.no_grad():
        for s in range(0, len(setup.gen_seeds), 16):
            seeds = setup.gen_seeds[s: s + 16]
            imgs.append(model.generate(emb.to(model.device, model.dtype), model.empty_embedding(), seeds,
                                       g["num_inference_steps"], g["guidance_scale"], g.get("height"), g.get("width")))
    return np.concatenate(imgs)


def run_input_space(setup: Setup) -> tuple[dict, dict]:
    """Analysis 1. Returns (the JSON section, tensors and images the other analyses and the figures need)."""
    p, model, ctx = setup.params, setup.model, setup.ctx
    with timed(setup.timing, "dori"):
        runs = _dori_outputs(setup)
    setup.timing["dori_runs_computed"] = sum(not r["cached"] for r in runs)
    setup.timing["dori_steps_per_run"] = int(runs[0]["trace"].get("steps") or 0)

    t0, c0 = time.time(), time.process_time()
    from memobench.api import SSCD

    sscd = SSCD(preset=p.sscd_preset, backend=p.sscd_backend, cache_dir=ctx.cache_dir, offline=ctx.offline)
    ref_f = sscd.embed([setup.reference])[0]
    e_p = model.encode_prompt(setup.target.text).float().cpu()
    with ctx.task(f"generate + SSCD ({len(setup.gen_seeds)} seeds per embedding)", len(runs) + 1) as advance:
        prompt_imgs = _generate(setup, e_p)
        prompt_sims = (sscd.embed(list(prompt_imgs)) @ ref_f).astype(float)
        advance()
        for r in runs:
            r["images"] = _generate(setup, r["y_adv"])
            r["sscd"] = (sscd.embed(list(r["images"])) @ ref_f).astype(float)
            advance()
    setup.timing["generate_sscd_s"] = round(time.time() - t0, 3)
    setup.timing["generate_sscd_cpu_s"] = round(time.process_time() - c0, 3)

    reduce = np.mean if p.success_level == "mean" else np.max
    for r in runs:
        r["score"] = float(reduce(r["sscd"]))
        r["success"] = bool(r["score"] > p.threshold)
    n_succ = sum(r["success"] for r in runs)
    rates = success_rates([r["sscd"] for r in runs], p.threshold)

    y_adv = np.stack([_flat(r["y_adv"]) for r in runs])
    y_init = np.stack([_flat(r["y_init"]) for r in runs])
    succ = [i for i, r in enumerate(runs) if r["success"]]
    nonmem = model.encode_prompt(setup.nonmem_texts).float().cpu() if setup.nonmem_texts else None
    y_non = nonmem.reshape(len(setup.nonmem_texts), -1).numpy() if nonmem is not None else np.zeros((0, y_adv.shape[1]))
    mem = model.encode_prompt([q.text for q in setup.mem_prompts]).float().cpu()
    y_mem = mem.reshape(len(setup.mem_prompts), -1).numpy()
    ep = _flat(e_p)

    raw = {"adversarial": pairwise_l2(y_adv), "adversarial_successful": pairwise_l2(y_adv[succ]) if len(succ) >= 2
           else None, "inits": pairwise_l2(y_init), "nonmem_prompts": pairwise_l2(y_non),
           "memorized_prompts": pairwise_l2(y_mem)}
    dist = {k: (distance_summary(v) if v is not None else None) for k, v in raw.items()}
    adv_key = "adversarial_successful" if dist["adversarial_successful"] is not None else "adversarial"
    adv_mean, non_mean = dist[adv_key]["mean"], dist["nonmem_prompts"]["mean"]
    ratio = adv_mean / non_mean if adv_mean is not None and non_mean else None
    rate = n_succ / len(runs)
    spread = bool(ratio is not None and ratio > 1)
    rate_ok = rate >= p.min_success_rate
    if rate_ok and spread:
        statement = (f"reproduced: {n_succ}/{len(runs)} Gaussian inits reach SSCD > {p.threshold} (≥ "
                     f"{p.min_success_rate:g} of them) and their embeddings are {ratio:.2f}× as far apart as "
                     "non-memorized prompt embeddings")
    else:
        why = []
        if not rate_ok:
            why.append(f"only {n_succ}/{len(runs)} Gaussian inits reach SSCD > {p.threshold} ({p.success_level} over "
                       f"the seeds; < {p.min_success_rate:g}; the target's own prompt: mean SSCD "
                       f"{float(np.mean(prompt_sims)):.3f}; other rules: any seed {rates['max']:.2f}, per generation "
                       f"{rates['generation']:.2f})")
        if not spread:
            why.append("the adversarial embeddings are not farther apart than non-memorized prompt embeddings"
                       if ratio is not None else "no non-memorized prompt distances to compare with")
        statement = "not reproduced on this model: " + "; ".join(why)
    if rate_ok and spread and adv_key == "adversarial":
        statement += " (distances over all results)"
    init_mean = dist["inits"]["mean"]
    ratio_init = adv_mean / init_mean if adv_mean is not None and init_mean else None
    if ratio_init is not None:  # the yardstick of the spread: how far apart the N(0, I) starting points were
        statement += (f"; the Gaussian inits themselves are {init_mean:.3g} apart on average (DoRI results "
                      f"{adv_mean:.3g}: {ratio_init:.2f}× the inits' spread)")

    coords, proj = project_2d(np.concatenate([y_init, y_adv, ep[None], y_non]), p.projection, p.seed)
    n = len(runs)
    proj["coords"] = {"inits": coords[:n].tolist(), "results": coords[n:2 * n].tolist(),
                      "memorized_prompt": coords[2 * n].tolist(), "nonmem_prompts": coords[2 * n + 1:].tolist()}
    proj["fitted_on"] = "inits, results, the memorized prompt embedding and the non-memorized prompt embeddings"

    section = {
        "n_inits": n, "n_success": n_succ, "success_rate": rate, "threshold": p.threshold, "comparison": ">",
        "success_level": p.success_level, "generation_seeds": list(setup.gen_seeds),
        "success_rates": rates,
        "prompt_success_rates": success_rates([prompt_sims], p.threshold),
        "prompt_sscd": {"per_seed": [float(v) for v in prompt_sims], "mean": float(np.mean(prompt_sims)),
                        "max": float(np.max(prompt_sims))},
        "pairwise_l2": dist, "adversarial_set_compared": adv_key, "ratio_adversarial_over_nonmem": ratio,
        "ratio_adversarial_over_inits": ratio_init,
        "distance_to_memorized_prompt": {
            "adversarial": distance_summary(np.linalg.norm(y_adv - ep, axis=1)),
            "nonmem_prompts": distance_summary(np.linalg.norm(y_non - ep, axis=1)),
        },
        "finding": {"min_success_rate": p.min_success_rate, "success_rate_ok": rate_ok,
                    "spread_exceeds_nonmem": spread, "reproduces_paper": bool(rate_ok and spread),
                    "statement": statement},
        "per_init": [{
            "index": r["index"], "dori_seed": r["dori_seed"], "generator_seed": r["trace"].get("generator_seed"),
            "sscd_per_seed": [float(v) for v in r["sscd"]], "score": r["score"], "success": r["success"],
            "initial_loss": r["trace"].get("initial_loss"), "final_loss": r["trace"].get("final_loss"),
            "y_adv_norm": float(np.linalg.norm(y_adv[i])),
            "y_adv_minus_init": float(np.linalg.norm(y_adv[i] - y_init[i])),
            "y_adv_minus_prompt": float(np.linalg.norm(y_adv[i] - ep)), "y_adv_sha256": r["trace"].get("y_adv_sha256"),
            "cached": r["cached"]} for i, r in enumerate(runs)],
        "dori": {"name": runs[0]["attack"]["name"], "version": runs[0]["attack"]["version"],
                 "params": {k: v for k, v in runs[0]["attack"]["params"].items() if k != "seed"},
                 "seeds": [r["dori_seed"] for r in runs]},
        "projection": proj,
    }
    extra = {"runs": runs, "e_p": e_p, "prompt_images": prompt_imgs, "prompt_sims": prompt_sims,
             "nonmem": nonmem, "mem": mem, "distances": raw}
    return section, extra


def _adv_set(setup: Setup, runs: list[dict]) -> tuple[list[int], str]:
    succ = [i for i, r in enumerate(runs) if r["success"]]
    if setup.params.adv_set == "successful":
        if len(succ) >= 2:
            return succ, "successful"
        return list(range(len(runs))), f"all ({len(succ)} successful: fewer than 2)"
    return list(range(len(runs))), "all"


def layer_map(setup: Setup, nemo) -> list[dict]:
    """NeMo's value layers l = 1..L and the ``ff.net.2`` of their transformer blocks (``wanda_layers``)."""
    import torch

    unet = setup.model.unet
    out = []
    for l, (name, mod) in enumerate(nemo.layers(setup.model), start=1):
        ffn_name = name.replace("attn2.to_v", "ff.net.2")
        try:
            ffn = unet.get_submodule(ffn_name)
        except AttributeError:
            ffn = None
        out.append({"layer": l, "value_name": name, "value": mod, "width": int(mod.out_features),
                    "ffn_name": ffn_name if isinstance(ffn, torch.nn.Linear) else None,
                    "ffn": ffn if isinstance(ffn, torch.nn.Linear) else None})
    return out


def wanda_ffn_layers(setup: Setup, wanda, lmap: list[dict]) -> list[tuple[str, Any]]:
    """Wanda's layers l: the ``ff.net.2`` of NeMo's blocks ("nemo_blocks") or the wanda mitigation's own ``layers``
    resolution of the spec ("all", "0,3,…")."""
    spec = setup.params.wanda_layers
    if spec == "nemo_blocks":
        return [(e["ffn_name"], e["ffn"]) for e in lmap if e["ffn"] is not None]
    cls = type(wanda)
    return cls(cls.make_params({**setup.params.wanda, "layers": spec})).layers(setup.model)


def capture_activations(setup: Setup, specs: list[tuple[str, Any, str]], embeds: list) -> list[np.ndarray]:
    """a_l(y) for every embedding: one conditional UNet call on the fixed noise x_T (seed ``act_seed``) at the
    ``act_timestep_index``-th timestep of the generation schedule; ``specs`` = (name, module, "output"|"input")."""
    import torch

    p, model, g = setup.params, setup.model, setup.generation
    lat = model.initial_latents([p.act_seed], g.get("height"), g.get("width"))
    ts = model.timesteps(g["num_inference_steps"])
    if p.act_timestep_index >= len(ts):
        raise ValueError(f"--act-timestep-index: {p.act_timestep_index} ≥ {len(ts)} denoising steps")
    t = ts[p.act_timestep_index]
    x = model.scheduler.scale_model_input(lat, t)
    store: list[list[np.ndarray]] = [[] for _ in specs]
    cur: dict[int, Any] = {}

    def reduce(a):
        a = a.detach().float()[0]  # tokens × channels
        if p.activation == "nemo":
            a = a.abs().mean(dim=0)
        return a.cpu().numpy().reshape(-1)

    handles = []
    try:
        for k, (_, mod, where) in enumerate(specs):
            if where == "output":
                handles.append(mod.register_forward_hook(lambda m, a, o, k=k: cur.__setitem__(k, reduce(o))))
            else:
                handles.append(mod.register_forward_pre_hook(lambda m, a, k=k: cur.__setitem__(k, reduce(a[0]))))
        with torch.no_grad():
            for e in embeds:
                cur.clear()
                model.eps(x, t, e.to(model.device, model.dtype).reshape(1, *e.shape[-2:]))
                for k in range(len(specs)):
                    store[k].append(cur[k])
    finally:
        for h in handles:
            h.remove()
    return [np.stack(s) for s in store]


def _instantiate(setup: Setup, name: str, values: dict):
    cls = setup.registry.get("mitigation", name)
    return cls(cls.make_params(values))


def _selectors(setup: Setup):
    """The registered ``nemo`` and ``wanda`` mitigations (analysis params), NeMo's layer map and Wanda's layers."""
    p = setup.params
    nemo = _instantiate(setup, "nemo", p.nemo)
    wanda = _instantiate(setup, "wanda", p.wanda)
    lmap = layer_map(setup, nemo)
    return nemo, wanda, lmap, wanda_ffn_layers(setup, wanda, lmap)


def run_activation_space(setup: Setup, extra: dict) -> dict:
    """Analysis 2: AD_l(Y_mem) and AD_l(Y_adv) per NeMo value layer and per Wanda feed-forward layer."""
    p, model, ctx = setup.params, setup.model, setup.ctx
    runs = extra["runs"]
    adv_idx, adv_used = _adv_set(setup, runs)
    nemo, wanda, lmap, ffn = _selectors(setup)
    specs = [(e["value_name"], e["value"], "output") for e in lmap] + [(n, m, "input") for n, m in ffn]
    mem_emb = [extra["mem"][i: i + 1] for i in range(len(setup.mem_prompts))]
    adv_emb = [runs[i]["y_adv"] for i in adv_idx]
    with ctx.task("activations (fixed noise)", 2) as advance:
        a_mem = capture_activations(setup, specs, mem_emb)
        advance()
        a_adv = capture_activations(setup, specs, adv_emb)
        advance()
    ts = model.timesteps(setup.generation["num_inference_steps"])
    rows = []
    for k, (name, mod, where) in enumerate(specs):
        fam = "nemo" if where == "output" else "wanda"
        layer = next((e["layer"] for e in lmap if name in (e["value_name"], e["ffn_name"])), None)
        rows.append({"family": fam, "layer": layer, "name": name, "tensor": "to_v output" if fam == "nemo"
                     else "ff.net.2 input (GEGLU output)", "size": int(a_mem[k].shape[1]),
                     "Y_mem": activation_discrepancy(a_mem[k]), "Y_adv": activation_discrepancy(a_adv[k])})
    return {
        "definition": "AD_l(Y) = 2/(n(n-1)) sum_{i<j} ||a_l(y_i) - a_l(y_j)||_2 (METHODS §7.4)",
        "activation": p.activation, "noise_seed": p.act_seed, "timestep_index": p.act_timestep_index,
        "timestep": int(ts[p.act_timestep_index]), "branch": "conditional (no CFG)",
        "Y_mem": {"prompt_ids": [q.id for q in setup.mem_prompts], "n": len(setup.mem_prompts)},
        "Y_adv": {"init_indices": adv_idx, "n": len(adv_idx), "set": p.adv_set, "adv_set_used": adv_used},
        "layers": rows,
    }


def agreement_rows(layers: list[dict], ffn_names: Sequence[str], selections: dict[str, list[dict]],
                   space: str = "weights", empty: float = 1.0) -> list[dict]:
    """The weight-space table (one row per NeMo layer, then one per extra Wanda layer) from the selections.

    ``layers``: per NeMo layer l (1-based) ``{"layer", "value_name", "width", "value_shape", "ffn_name"}``;
    ``ffn_names``: Wanda's ``ff.net.2`` layers; ``selections[g]``: per embedding of group g (``Y_adv``, ``Y_mem``)
    ``{"nemo": {"refined": [neuron indices per NeMo layer]}, "wanda": {layer name: bool mask shaped like its
    weight}}`` (Wanda's masks for the ``ff.net.2`` layers and for the value layers). Per row and group:
    ``nemo_<g>`` = WA_l over NeMo's neuron sets, ``wanda_<g>`` = WA_l over Wanda's ``ff.net.2`` masks of block l,
    ``nemo_vs_wanda_<g>`` = 1/n Σ_i IoU(NeMo_l(y_i), Wanda_l(y_i)) on value layer l in ``space`` ("weights": NeMo
    neuron i = row i of W_V; "neurons": Wanda's rows with any selected weight), with
    ``nemo_vs_wanda_<g>_max`` = 1/n Σ_i min(|A_i|, |B_i|) / max(|A_i|, |B_i|), the largest IoU the two set sizes
    allow; plus the fraction of empty selections and the mean set sizes."""
    ffn_set = set(ffn_names)
    out = []
    for e in layers:
        l, vname, width, wshape = e["layer"], e["value_name"], e["width"], tuple(e["value_shape"])
        fname = e.get("ffn_name") if e.get("ffn_name") in ffn_set else None
        row = {"layer": l, "value_name": vname, "ffn_name": fname, "width": width}
        for g, items in selections.items():
            nm = [neuron_mask(it["nemo"]["refined"][l - 1], width) for it in items]
            row[f"nemo_{g}"] = mean_pairwise_iou(nm, empty)
            row[f"nemo_{g}_empty_fraction"] = _empty_fraction(nm)
            row[f"nemo_{g}_mean_size"] = _mean_size(nm)
            if fname is not None:
                wm = [it["wanda"][fname] for it in items]
                row[f"wanda_{g}"] = mean_pairwise_iou(wm, empty)
                row[f"wanda_{g}_empty_fraction"] = _empty_fraction(wm)
                row[f"wanda_{g}_mean_size"] = _mean_size(wm)
            wv = [_as_bool(it["wanda"][vname]).reshape(wshape) for it in items]
            if space == "weights":
                a, b = [rows_mask(it["nemo"]["refined"][l - 1], wshape) for it in items], wv
            else:
                a, b = nm, [m.any(axis=1) for m in wv]
            row[f"nemo_vs_wanda_{g}"] = mean_paired_iou(a, b, empty)
            # both selections empty: IoU = ``empty`` by convention
            row[f"nemo_vs_wanda_{g}_empty_fraction"] = (
                float(np.mean([not x.any() and not y.any() for x, y in zip(a, b)])) if a else None)
            row[f"nemo_vs_wanda_{g}_max"] = (float(np.mean([_size_bound(x, y, empty) for x, y in zip(a, b)]))
                                             if a else None)
            row[f"nemo_vs_wanda_{g}_mean_sizes"] = [_mean_size(a), _mean_size(b)]  # |A| (NeMo), |B| (Wanda)
            row[f"wanda_value_{g}_mean_size"] = _mean_size(wv)
        out.append(row)
    for n in [n for n in ffn_names if n not in {e.get("ffn_name") for e in layers}]:
        row = {"layer": None, "value_name": None, "ffn_name": n}  # Wanda layers beyond NeMo's blocks
        for g, items in selections.items():
            wm = [it["wanda"][n] for it in items]
            row[f"wanda_{g}"] = mean_pairwise_iou(wm, empty)
            row[f"wanda_{g}_empty_fraction"] = _empty_fraction(wm)
        out.append(row)
    return out


def _empty_fraction(masks) -> float | None:
    return float(np.mean([not _as_bool(m).any() for m in masks])) if len(masks) else None


def _mean_size(masks) -> float | None:
    return float(np.mean([np.count_nonzero(_as_bool(m)) for m in masks])) if len(masks) else None


def _size_bound(a, b, empty: float) -> float:
    na, nb = np.count_nonzero(_as_bool(a)), np.count_nonzero(_as_bool(b))
    return float(empty) if max(na, nb) == 0 else min(na, nb) / max(na, nb)


def select_embedding(model, ctx, nemo, wanda, layers, ratios: dict, label: str, emb) -> dict:
    """NeMo's neuron sets and Wanda's masks (``layers``, per-layer ``ratios``) for one conditioning embedding."""
    rec = nemo.select_for_embedding(model, emb, ctx, label=label)
    masks = wanda.embedding_masks(model, emb, layers=layers, skill_ratio=ratios, ctx=ctx)  # at the run's size, as NeMo
    return {"label": label, "nemo": rec, "wanda": {n: m.cpu().numpy() for n, m in masks.items()}}


def n_workers(requested: int, device: str, n_tasks: int) -> int:
    """Processes for the selections: ``requested``, or (0) one per CPU core this process may use; 1 on an accelerator
    (one device) and never more than there are embeddings."""
    import os

    if device != "cpu":
        return 1
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(requested or avail, n_tasks))


@contextlib.contextmanager
def single_thread():
    """One torch thread while selections run in this process, as in each worker process: NeMo's localization is
    hundreds of small UNet calls that gain little from a second thread (measured on the embedded model: 434 s CPU
    time on one thread, 408 s wall on two), and the selections then do not depend on the number of processes."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


_WORKER: dict = {}


def _worker_init(spec: dict) -> None:
    """A worker process: one torch thread, the model, the ``nemo`` and ``wanda`` selectors and the layers."""
    from pathlib import Path

    import torch

    from memobench.api import Context
    from memobench.api import key_of
    from memobench.api import get_registry

    torch.set_num_threads(1)
    reg = get_registry()
    mcls = reg.get("model", spec["model"])
    ctx = Context(cache_dir=Path(spec["cache_dir"]), offline=spec["offline"], device=spec["device"],
                  generation=dict(spec["generation"]), batch_size=spec["batch_size"],
                  nonmem_prompts=spec["nonmem_prompts"], nonmem_prompt_set=spec["nonmem_prompt_set"])
    model = mcls(mcls.make_params(spec["model_params"])).load(ctx)
    ctx.model_id = key_of(model.identity())
    sel = {}
    for name in ("nemo", "wanda"):
        cls = reg.get("mitigation", name)
        sel[name] = cls(cls.make_params(spec[name]))
    layers = [(n, model.unet.get_submodule(n)) for n in spec["layers"]]
    _WORKER.update(model=model, ctx=ctx, layers=layers, ratios=spec["ratios"], **sel)


def _worker_select(label: str, emb: np.ndarray) -> dict:
    import torch

    w = _WORKER
    return select_embedding(w["model"], w["ctx"], w["nemo"], w["wanda"], w["layers"], w["ratios"], label,
                            torch.from_numpy(emb))


def _parallel_selections(spec: dict, items: list, workers: int, advance) -> list[dict]:
    """:func:`select_embedding` for every ``(label, embedding)`` in ``workers`` spawned processes (each loads the
    model once); results in input order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(spec,)) as ex:
        futures = [ex.submit(_worker_select, label, emb.detach().float().cpu().numpy()) for label, emb in items]
        for f in as_completed(futures):
            f.result()  # raise a worker's error at once
            advance()
        return [f.result() for f in futures]


def run_weight_space(setup: Setup, extra: dict) -> dict:
    """Analysis 3: NeMo and Wanda selections per embedding; WA_l for Y_adv (and Y_mem); NeMo-vs-Wanda IoU."""
    p, model, ctx = setup.params, setup.model, setup.ctx
    runs = extra["runs"]
    adv_idx, adv_used = _adv_set(setup, runs)
    nemo, wanda, lmap, ffn = _selectors(setup)
    value = [(e["value_name"], e["value"]) for e in lmap]
    rho = wanda.params.skill_ratio
    ratios = {n: k_min_skill_ratio(rho, int(m.in_features), p.wanda_k_min) for n, m in ffn + value}
    groups = {"Y_adv": [(f"init{runs[i]['index']}", runs[i]["y_adv"]) for i in adv_idx]}
    if p.weight_mem:
        groups["Y_mem"] = [(q.id, extra["mem"][i: i + 1]) for i, q in enumerate(setup.mem_prompts)]
    tasks = [(g, label, emb) for g, items in groups.items() for label, emb in items]
    workers = n_workers(p.workers, ctx.device, len(tasks)) if setup.model_spec is not None else 1
    with ctx.task(f"NeMo + Wanda selections ({len(tasks)} embeddings, {workers} process(es))", len(tasks)) as adv:
        if workers == 1:
            with single_thread():
                out = []
                for _, label, emb in tasks:
                    out.append(select_embedding(model, ctx, nemo, wanda, ffn + value, ratios, label, emb))
                    adv()
        else:
            spec = {"model": setup.model_spec[0], "model_params": setup.model_spec[1], "cache_dir": str(ctx.cache_dir),
                    "offline": ctx.offline, "device": ctx.device, "generation": dict(ctx.generation), "batch_size": ctx.batch_size,
                    "nonmem_prompts": ctx.nonmem_prompts, "nonmem_prompt_set": ctx.nonmem_prompt_set, "nemo": p.nemo,
                    "wanda": p.wanda, "layers": [n for n, _ in ffn + value], "ratios": ratios}
            out = _parallel_selections(spec, [(label, emb) for _, label, emb in tasks], workers, adv)
    sel: dict[str, list[dict]] = {g: [] for g in groups}
    for (g, _, _), res in zip(tasks, out):
        sel[g].append(res)
    layers = agreement_rows(
        [{"layer": e["layer"], "value_name": e["value_name"], "width": e["width"],
          "value_shape": tuple(e["value"].weight.shape), "ffn_name": e["ffn_name"]} for e in lmap],
        [n for n, _ in ffn], sel, p.nemo_wanda_space, p.empty_iou)
    return {
        "definition": "WA_l(Y) = 2/(n(n-1)) sum_{i<j} |W_l(y_i) ∩ W_l(y_j)| / |W_l(y_i) ∪ W_l(y_j)| (METHODS §7.4); "
                      "nemo_vs_wanda = 1/n sum_i IoU(NeMo_l(y_i), Wanda_l(y_i)) in the space nemo_wanda_space; "
                      "nemo_vs_wanda_*_max = 1/n sum_i min(|A_i|,|B_i|)/max(|A_i|,|B_i|), the largest IoU the set "
                      "sizes allow",
        "empty_iou": p.empty_iou, "nemo_wanda_space": p.nemo_wanda_space,
        "nemo": nemo.identity(), "wanda": wanda.identity(),
        "wanda_layers": p.wanda_layers, "wanda_k_min": p.wanda_k_min,
        "wanda_skill_ratio_per_layer": ratios, "processes": workers, "torch_threads_per_process": 1,
        "Y_adv": {"init_indices": adv_idx, "n": len(adv_idx), "adv_set_used": adv_used},
        "Y_mem": {"prompt_ids": [q.id for q in setup.mem_prompts]} if p.weight_mem else None,
        "layers": layers,
        "selections": {g: [{"label": it["label"], "nemo_refined": it["nemo"]["refined"],
                            "nemo_memorized": it["nemo"].get("memorized"),
                            "nemo_refined_score": it["nemo"].get("refined_score"),
                            "wanda_selected": {n: int(m.sum()) for n, m in it["wanda"].items()}}
                           for it in items] for g, items in sel.items()},
    }


def params_record(p: LocalityParams) -> dict:
    d = dataclasses.asdict(p)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

