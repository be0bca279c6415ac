"""NeMo: localize and deactivate memorization neurons (mitigation ``nemo``, kind ``"weights"``).

Paper: Hintersdorf*, Struppek*, Kersting, Dziedzic, Boenisch, "Finding NeMo: Localizing Neurons Responsible For
Memorization in Diffusion Models", NeurIPS 2024, arXiv 2406.02366 (§3 value layers, §4 Eq. 3 activations and OOD
statistics, Alg. 1/2 initial selection and refinement, App. B.3/C). Reference code:
``ml-research/localizing_memorization_in_diffusion_models`` (``utils/activation_detection.py``,
``1_compute_activations_statistics.py``, ``3_detect_memorized_neurons.py``, ``hooks/block_activations.py``).
memobench specification: METHODS §7.1 (algorithm), §6.2 (score), §1.3 (layer map), §9 #1-#6 (paper vs code).
Where paper and code differ, this follows the code (METHODS §0.2).

What it does
------------
* **Layers** (§7.1.1): the cross-attention value projections ``attn2.to_v`` of the UNet's down and mid blocks, in
  forward order, resolved from the module structure (:func:`value_layers`); on SD-1.4 exactly NeMo's layers 1-7
  (320, 320, 640, 640, 1280, 1280, 1280 neurons). Fused K/V projections are refused (hooks would never fire).
* **Activation statistics** (§7.1.2, Eq. 3): a_i^l(y) = mean over the 77 token positions of |W_V^l e_y|_i; per-neuron
  mean μ and unbiased std σ over a set of non-memorized prompts, cached as safetensors under
  ``ctx.artifact_path``. OOD score z = |a - μ| / σ (the code's absolute value, §9 #3).
* **Memorization score** (§7.1.3): δ_g(y, B) = ε_θ(x_T^(g), t_1, e_y | B blocked) - x_T^(g) for ``samples_per_prompt``
  initial latents of seed ``seed``, evaluated at the *second* DDIM timestep on the unchanged initial latent (§9 #2),
  without CFG; each (sample, channel) plane is min-max normalised. The latents have the run's generation size
  (``ctx.generation`` height/width, :func:`memobench.model.generation_size`; the model's native size
  without a run context), so that neurons are localized on the latents the run denoises (NeMo: 64×64 latents of
  512-px SD-1.4 generations). A non-native size enters the cache key of the neuron sets. Similarity = torchmetrics' functional multi-scale
  SSIM (kernel 11, betas (0.33, 0.33, 0.33), other arguments default) (§9 #1).
* **Seed filter** K = {g : max_{g'≠g} MS-SSIM(δ_g, δ_g') > τ_pair}; K = ∅ ⇒ not memorized, no neurons.
* **Initial selection** (§7.1.4 step 3; §9 #4): θ from ``theta_init`` down by ``theta_step``, top-k growing by one per
  failed round; stop when M(B) ≤ τ_init or when θ reaches ``theta_min`` / k reaches ``k_max`` (then τ_ref = the last
  score). The order of the checks is the reference code's (see :func:`initial_selection`).
* **Refinement** (steps 4-5): layer-wise, then neuron-wise, layers from last to first, keep a removal when
  M(B') < τ_ref (:func:`refine`).
* **Deactivation** (§7.1.5): forward hooks on the selected ``to_v`` modules returning ``out * mask`` (out-of-place,
  autograd-safe; mask = 1 except ρ = ``scaling_factor`` at the selected channels) on every UNet call, i.e. all
  timesteps and *both CFG halves* (the unconditional embedding passes through the same hook, as in NeMo). Installed
  by :meth:`NeMo.apply` and removed on exit, also on exceptions.

Choices where METHODS is silent or marked [UNPUBLISHED] (each a ``Params`` field, recorded in every result)
------------------------------------------------------------------------------------------------------------
* ``blocking`` ("per_prompt" | "union"): DoRI's "pruned model" per image or a union is [UNPUBLISHED]; default
  per-image S(y) (NeMo's own evaluation), option: the union of all fitted sets for every prompt.
* ``utility_blocking`` ("union" | "none"): prompts without an own fitted set (utility prompts, ``mem_type`` None,
  ``prompt`` None) get the union of all fitted sets (default: a deployed "pruned model") or no blocking.
* ``stats_prompts``: where the non-memorized statistics prompts come from. "" (default) = the run setting
  ``ctx.nonmem_prompts`` (a list of texts or :class:`memobench.api.Prompt`; the harness may fill it from
  the model plugin's ``prompt_sets["nonmem"]``); otherwise a prompt file path (.txt/.csv/.jsonl) or the name of a
  registered prompt set. NeMo used 50,000 held-out LAION prompts; ``stats_limit`` > 0 keeps only the first N.
  ``stats_file`` may name a safetensors file with ``mean.<l>`` / ``std.<l>`` tensors (l = 0-based layer index)
  computed elsewhere.
* ``small_latent`` ("upsample" | "fewer_scales" | "error"): torchmetrics' MS-SSIM with kernel 11 and 3 scales needs
  latent planes of at least 44×44; SD-1.4's at 512 px are 64×64 and are never changed. Smaller latents (the
  embedded ``tiny`` model: 16×16; SD-1.4 at 256 px: 32×32) are, by default, nearest-neighbour upsampled by the smallest integer factor f with
  f·size ≥ ``upsample_to`` (64, SD-1.4's latent size). Integer nearest upsampling replicates every latent value into
  an f×f block, so the coarsest of the 3 scales (two 2×2 average poolings) sees the original plane exactly when
  f = 4. "fewer_scales" instead drops scales (betas truncated) until the size is valid; "error" refuses.
* ``latent_rule`` ("nemo" | "per_image"): "nemo" (default) = one CPU draw of shape (G, C, h, w) after
  ``manual_seed(seed)``, as NeMo's ``prepare_diffusion_inputs`` (preset ``nemo2024-detect``); "per_image" = memobench's
  native one generator per image with seeds seed, seed+1, ..., seed+G-1.
* Precision: NeMo ran under fp16 autocast; memobench computes in the model's dtype (the statistics and δ in float32
  after the UNet call). ``autocast_fp16=True`` wraps the detection UNet calls in CUDA fp16 autocast.
* ``detect_guidance_scale`` ≠ 0 (an ablation) uses the evident intent (uncond, cond) order, not the reference's
  swapped chunks (§9 #6).
* Duplicates: the reference keeps OOD ∪ top-k as a list with duplicates; refinement here uses the same list
  semantics (removing one occurrence at a time, so a duplicated neuron is effectively tested at its last
  occurrence), with scores memoised per *set*, so duplicates cost no UNet calls. Exported sets are deduplicated in
  stored order.
* ``theta_min`` also serves as the stop value (the code compares θ with the literal 1, the ``--min_theta`` default);
  ``k_max`` = 1280 is the code's literal (SD-1.4's widest layer).
* θ schedule robust to float steps: θ_i = θ_init − i·Δθ is computed from the step count i, and the loop stops
  once θ has reached θ_min (i = ⌈(θ_init − θ_min)/Δθ⌉), not on float equality. The reference's ``theta == 1``
  test holds only for steps exactly representable in binary (0.25, 0.5): with Δθ = 0.2 or 0.1 its θ never equals
  1 and the loop runs on to k = 1280, up to 80× more candidate sets than the 16 / 20 / 40 of Δθ = 0.25 / 0.2 /
  0.1 (θ = 5 … θ_min + Δθ). Identical schedules for the defaults (and advft's θ_min = 0).
* Constant δ planes (max = min) would divide by zero in the reference; here they map to 0.
* ``neurons_file``: an exported neuron-set JSON (:meth:`NeMo.export`) whose sets are used for the prompts it contains
  (matched by prompt text) instead of localizing them again.

Artifacts: activation statistics (safetensors), one JSON per prompt with its seed set, initial and refined neuron
sets and scores, and one JSON per fitted prompt list (path in :meth:`NeMo.report`, format of :meth:`NeMo.export`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from memobench.api import BadInput, Context, Mitigation, Prompt, hookimpl, param, params_dict

__all__ = [
    "NeMo", "value_layers", "block_neurons", "activation_stats", "prompt_activations", "embedding_activations",
    "candidate_sets", "theta_k_schedule", "initial_selection", "refine", "minmax_normalize", "ms_ssim",
    "msssim_min_size", "max_pairwise_ms_ssim", "noise_differences", "MSSSIMAgainst",
]

from .localize import (  # noqa: F401  (re-exported: the plugin's public functions)
    _parse_blocks, _score_value, activation_stats, block_neurons, candidate_sets, embedding_activations,
    MSSSIMAgainst, initial_selection, max_pairwise_ms_ssim, minmax_normalize, ms_ssim, msssim_min_size,
    noise_differences,
    prompt_activations, refine, refine_total, theta_k_schedule, value_layers,
)


def _ctx_task(ctx, description: str, total: int | None):
    """``ctx.task(description, total, transient=True)`` (a progress bar under the current one), or a no-op without a
    context (direct calls, tests)."""
    if ctx is None or not hasattr(ctx, "task"):
        return contextlib.nullcontext(lambda n=1, **kw: None)
    return ctx.task(description, total, transient=True)


def _dedup(sets) -> list[list[int]]:
    return [list(dict.fromkeys(int(i) for i in s)) for s in sets]


class _Ident:
    """A light identity for artifacts that depend on only some of the plugin's parameters."""

    def __init__(self, name: str, version: str, params: dict):
        self.name, self.version, self.params = name, version, params

    def identity(self) -> dict:
        return {"name": self.name, "version": self.version, "params": self.params}


# ---------------------------------------------------------------------------------------------- the plugin
class NeMo(Mitigation):
    """NeMo (NeurIPS 2024): per-prompt memorization neurons in the cross-attention value layers, blocked by hooks."""

    name = "nemo"
    version = "1"
    kind = "weights"
    fit_per_prompt = True  # one neuron-set artifact per prompt: sharded runs localize each target once

    @dataclass
    class Params:
        blocks: str = param("down,mid", "value layers: down and mid blocks (§7.1.1); 'up' may be added (App. C.8)")
        # activation statistics (§7.1.2)
        stats_prompts: str = param("", "'' = ctx.nonmem_prompts; else a prompt file or prompt-set name")
        stats_limit: int = param(0, "first N statistics prompts (0 = all)")
        stats_file: str = param("", "precomputed safetensors with mean.<l>/std.<l>")
        # memorization score (§7.1.3)
        seed: int = param(1, "seed of the initial noises of the memorization score")
        samples_per_prompt: int = param(10, "initial noises per prompt of the memorization score")
        num_inference_steps: int = param(50, "fixes the DDIM timestep values only")
        timestep_index: int = param(1, "the second DDIM timestep (t_1 = 961 for SD-1.4)")
        detect_guidance_scale: float = param(0.0, "guidance of the memorization score's noise prediction (0 = "
                                                  "conditional only)")
        latent_rule: str = param("nemo", "'nemo' | 'per_image' [UNPUBLISHED for non-SD models]")
        msssim_kernel: int = param(11, "MS-SSIM Gaussian kernel size")
        msssim_betas: tuple = param((0.33, 0.33, 0.33), "MS-SSIM weights of its three scales")
        small_latent: str = param("upsample", "'upsample' | 'fewer_scales' | 'error'")
        upsample_to: int = param(64, "side (latent pixels) small latents are nearest-upsampled to "
                                     "(small_latent=upsample)")
        autocast_fp16: bool = param(False, "compute the memorization score under fp16 autocast")
        # thresholds and selection (§7.1.4, §7.1.6)
        pairwise_threshold: float = param(0.428, "τ_pair")
        initial_threshold: float = param(0.428, "τ_init")
        refinement_threshold: float = param(0.428, "τ_ref")
        rel_threshold_refinement: float = param(0.0, "0 = off")
        theta_init: float = param(5.0, "initial z-score threshold θ of the candidate selection")
        theta_step: float = param(0.25, "decrement of θ per selection step")
        theta_min: float = param(1.0, "θ at which the selection stops")
        k_init: int = param(0, "initial top-k neurons per layer of the candidate selection")
        k_max: int = param(1280, "largest k before the selection stops")
        use_theta: bool = param(True, "False = the --no_theta ablation")
        use_top_k: bool = param(True, "False = the --no_top_k ablation")
        # deactivation (§7.1.5)
        scaling_factor: float = param(0.0, "ρ: the activations of blocked neurons are multiplied by ρ (0 = switched "
                                           "off)")
        blocking: str = param("per_prompt", "'per_prompt' | 'union' [UNPUBLISHED for DoRI]")
        utility_blocking: str = param("union", "'union' | 'none': prompts without an own fitted set")
        neurons_file: str = param("", "exported neuron sets to use instead of localizing")

        def __post_init__(self):
            choices = {"latent_rule": ("nemo", "per_image"), "small_latent": ("upsample", "fewer_scales", "error"),
                       "blocking": ("per_prompt", "union"), "utility_blocking": ("union", "none")}
            for k, allowed in choices.items():
                if getattr(self, k) not in allowed:
                    raise BadInput(f"mitigation 'nemo' parameter {k}: {getattr(self, k)!r} not in {allowed}")
            _parse_blocks(self.blocks)
            if self.samples_per_prompt < 2:
                raise BadInput("mitigation 'nemo' parameter samples_per_prompt: at least 2 (seed filter)")
            self.msssim_betas = tuple(float(b) for b in self.msssim_betas)

    def __init__(self, params: Any = None, **overrides: Any):
        super().__init__(params, **overrides)
        self._records: dict[str, dict] | None = None  # prompt sha256 -> record
        self._layers: list[tuple[str, int]] = []
        self._files: dict[str, str] = {}
        self._size: tuple[int, int] | None = None  # (height, width) of the detection latents of the last fit

    # ------------------------------------------------------------------------------------------- fit
    def _stats_texts(self, ctx: Context) -> tuple[list[str], str]:
        src = self.params.stats_prompts
        if not src:
            raw = ctx.nonmem_prompts
            if not raw:
                raise BadInput("mitigation 'nemo': no non-memorized prompts for the activation statistics; pass "
                               "--mitigation-param stats_prompts=<prompt file or prompt-set name> (NeMo used 50k "
                               "held-out LAION prompts) or set ctx.nonmem_prompts")
            texts = [p.text if isinstance(p, Prompt) else str(p) for p in raw]
            label = "ctx.nonmem_prompts"
        elif Path(src).is_file():
            from memobench.api import read_prompt_file

            texts, label = [p.text for p in read_prompt_file(src, "stats_prompts")], f"file {src}"
        else:
            from memobench.api import get_registry

            cls = get_registry().get("prompt_set", src)
            texts, label = [p.text for p in cls().prompts(ctx)], f"prompt set {src}"
        if self.params.stats_limit:
            texts = texts[: self.params.stats_limit]
        return texts, label

    def _statistics(self, model, layers, ctx: Context):
        from safetensors.torch import load_file, save

        from memobench.api import key_of, write_once_bytes

        if self.params.stats_file:
            t = load_file(self.params.stats_file)
            means = [t[f"mean.{l}"].float() for l in range(len(layers))]
            stds = [t[f"std.{l}"].float() for l in range(len(layers))]
            self._files["stats"] = self.params.stats_file
        else:
            texts, label = self._stats_texts(ctx)
            ident = _Ident(self.name, self.version, {"artifact": "activation_stats", "blocks": self.params.blocks,
                                                      "dtype": str(model.dtype)})
            path = ctx.artifact_path(ident, "stats", key_of(texts))
            if not path.exists():
                # several processes of a sharded run may compute this at once: the first complete file wins and
                # every process reads the statistics back from it
                with _ctx_task(ctx, f"nemo: activation statistics ({len(texts)} prompts)", len(texts)) as adv:
                    means, stds = activation_stats(model, layers, texts, advance=adv)
                write_once_bytes(path, save({**{f"mean.{l}": m.contiguous() for l, m in enumerate(means)},
                                             **{f"std.{l}": s.contiguous() for l, s in enumerate(stds)}},
                                            metadata={"n_prompts": str(len(texts)), "source": label,
                                                      "layers": json.dumps([n for n, _ in layers])}))
            t = load_file(str(path))
            means = [t[f"mean.{l}"] for l in range(len(layers))]
            stds = [t[f"std.{l}"] for l in range(len(layers))]
            self._files["stats"] = str(path)
            self._stats_source = {"source": label, "n_prompts": len(texts)}
        for (name, mod), m in zip(layers, means):
            if m.numel() != mod.out_features:
                raise ValueError(f"nemo: statistics for {name} have {m.numel()} neurons, the layer has "
                                 f"{mod.out_features}")
        return [m.float() for m in means], [s.float() for s in stds]

    def _latents(self, model, size: tuple[int, int] | None = None):
        """The G detection latents x_T^(g) at ``size`` (height, width in pixels; default the model's native)."""
        p = self.params
        h, w = size or (model.resolution, model.resolution)
        if p.latent_rule == "nemo":
            return model.joint_latents(p.samples_per_prompt, p.seed, h, w)
        return model.initial_latents(list(range(p.seed, p.seed + p.samples_per_prompt)), h, w)

    def _selection_ident(self, stats_key: str, model=None, size: tuple[int, int] | None = None) -> _Ident:
        from memobench.api import size_key_part

        d = params_dict(self.params)
        for k in ("blocking", "utility_blocking", "neurons_file"):
            d.pop(k)
        d["stats"] = stats_key
        part = size_key_part(model, size) if size is not None and model is not None else ()
        if part:  # nothing at the native size: its keys stay those of earlier versions
            d["size"] = part[0]
        return _Ident(self.name, self.version, d)

    def localize(self, model, prompt_text: str, layers, means, stds, latents, t, ctx: Context | None = None,
                 name: str | None = None) -> dict:
        """Steps 1-6 of METHODS §7.1.4 for one prompt; returns the JSON-able record. ``ctx``/``name``: see
        :meth:`localize_embedding`."""
        return self.localize_embedding(model, model.encode_prompt(prompt_text), layers, means, stds, latents, t,
                                       label=prompt_text, ctx=ctx, name=name)

    def localize_embedding(self, model, emb, layers, means, stds, latents, t, label: str | None = None,
                           ctx: Context | None = None, name: str | None = None) -> dict:
        """Steps 1-6 of METHODS §7.1.4 for one conditioning embedding ``emb`` (1×77×d): the encoded prompt in
        :meth:`localize`, or any other embedding (e.g. a DoRI adversarial one). ``label`` goes into the record's
        ``prompt`` field. With ``ctx``, the rounds are shown as progress (``ctx.task``): the candidate sets of the
        initial selection, then the refinement's layer and neuron tests; ``name`` (e.g. the prompt id) names
        them."""
        p = self.params
        kw = {"kernel_size": p.msssim_kernel, "betas": p.msssim_betas, "small_latent": p.small_latent,
              "upsample_to": p.upsample_to}
        emb = emb.to(model.device, model.dtype)
        d0 = noise_differences(model, emb, latents, t, p.detect_guidance_scale, p.autocast_fp16)
        m = max_pairwise_ms_ssim(d0, **kw)
        keep = (m > p.pairwise_threshold).nonzero().flatten().tolist()
        names = [n for n, _ in layers]
        rec = {"prompt": label, "layers": names, "pairwise_max": [round(float(v), 6) for v in m],
               "seeds_K": keep, "memorized": bool(keep)}
        if not keep:
            empty = [[] for _ in layers]
            rec.update(initial=empty, initial_score=0.0, refined=empty, refined_score=0.0, tau_ref=None,
                       theta=None, k=None, n_evaluations=0)
            return rec
        lat_k, d0_k = latents[keep], d0[keep]
        memo: dict = {}
        # MS-SSIM(δ_unblocked, δ_blocked) with the unblocked side computed once (bit-identical to ms_ssim)
        against = (MSSSIMAgainst(d0_k, **kw) if p.msssim_kernel == 11
                   else (lambda db: ms_ssim(d0_k, db, **kw)))

        def score(sets):
            key = tuple(tuple(sorted(set(s))) for s in sets)
            if key not in memo:
                with block_neurons(layers, key, p.scaling_factor):
                    db = noise_differences(model, emb, lat_k, t, p.detect_guidance_scale, p.autocast_fp16)
                memo[key] = against(db).cpu()
            return memo[key]

        acts = [a[0] for a in embedding_activations(layers, emb)]
        what = f"nemo {name or (label or 'embedding')[:40]}"
        sched = dict(theta_init=p.theta_init, theta_step=p.theta_step, theta_min=p.theta_min, k_init=p.k_init,
                     k_max=p.k_max, use_theta=p.use_theta, use_top_k=p.use_top_k)
        n_sched = len(theta_k_schedule(**sched)) if ctx is not None else None  # the most candidates it may score
        with _ctx_task(ctx, f"{what}: initial selection (candidate sets)", n_sched) as adv:
            init = initial_selection(acts, means, stds, score, threshold=p.initial_threshold,
                                     refinement_threshold=p.refinement_threshold, advance=adv, **sched)
        with _ctx_task(ctx, f"{what}: refinement (layer and neuron tests)", refine_total(init["sets"])) as adv:
            refined = refine(init["sets"], score, init["tau_ref"], p.rel_threshold_refinement, advance=adv)
        rec.update(initial=_dedup(init["sets"]), initial_score=float(init["score"]), refined=_dedup(refined),
                   refined_score=_score_value(score(refined)), tau_ref=float(init["tau_ref"]),
                   theta=init["theta"], k=init["k"], n_candidates=init["n_candidates"], n_evaluations=len(memo))
        return rec

    def fit(self, model, prompts: list[Prompt], ctx: Context) -> None:
        from memobench.api import generation_size, key_of, write_once_bytes


        p = self.params
        layers = value_layers(model.unet, p.blocks)
        self._layers = [(n, int(m.out_features)) for n, m in layers]
        size = generation_size(model, ctx)  # detection latents at the run's resolution
        self._size = size
        given = self._load_neurons_file(p.neurons_file) if p.neurons_file else {}
        todo = [q for q in prompts if q.sha256 not in given]
        records: dict[str, dict] = {}
        stats_key = ""
        if todo:
            means, stds = self._statistics(model, layers, ctx)
            stats_key = key_of([[round(float(v), 7) for v in m] for m in means + stds])
            ident = self._selection_ident(stats_key, model, size)
            latents = self._latents(model, size)
            t = model.timesteps(p.num_inference_steps)[p.timestep_index]
        with ctx.task(f"nemo: localize neurons ({len(prompts)} prompts)", len(prompts)) as advance:
            for q in prompts:
                if q.sha256 in given:
                    records[q.sha256] = {**given[q.sha256], "prompt_id": q.id, "source": p.neurons_file}
                    advance()
                    continue
                path = ctx.artifact_path(ident, "neurons", q.sha256, suffix=".json")
                rec = None
                if path.exists():
                    try:
                        rec = json.loads(path.read_text())
                    except ValueError:
                        rec = None
                if rec is None:
                    rec = self.localize(model, q.text, layers, means, stds, latents, t, ctx=ctx, name=q.id)
                    # first complete record wins (concurrent shards): every process uses the one on disk
                    if not write_once_bytes(path, json.dumps(rec, sort_keys=True).encode()):
                        rec = json.loads(path.read_text())
                records[q.sha256] = {**rec, "prompt_id": q.id, "mem_type": q.mem_type}
                advance()
        self._records = records
        export = ctx.artifact_path(self, "neurons-run", key_of(sorted(records)), suffix=".json")
        self.export(export)
        self._files["neurons"] = str(export)

    def layers(self, model) -> list[tuple[str, Any]]:
        """``(name, module)`` of the value layers this mitigation selects neurons in (``blocks``), forward order."""
        return value_layers(model.unet, self.params.blocks)

    def select_for_embedding(self, model, prompt_embeds, ctx: Context, label: str | None = None) -> dict:
        """NeMo's localization (METHODS §7.1.4 steps 1-6) for an arbitrary conditioning embedding (1×77×d) in place
        of an encoded prompt — e.g. a DoRI adversarial embedding — with the same activation statistics, detection
        latents, timestep and thresholds as :meth:`fit`. Returns the record :meth:`localize` returns (``refined``
        and ``initial``: one list of neuron indices per layer of :meth:`layers`; ``memorized``; scores). Nothing is
        written to the cache or to the fitted sets; the statistics are computed (or read from the cache) once per
        instance and model."""
        from memobench.api import generation_size

        p = self.params
        layers = self.layers(model)
        size = generation_size(model, ctx)
        state = getattr(self, "_embedding_state", None)
        if state is None or state[0] is not model or state[5] != size:
            means, stds = self._statistics(model, layers, ctx)
            t = model.timesteps(p.num_inference_steps)[p.timestep_index]
            state = (model, means, stds, self._latents(model, size), t, size)
            self._embedding_state = state
        _, means, stds, latents, t, _ = state
        return self.localize_embedding(model, prompt_embeds, layers, means, stds, latents, t, label=label, ctx=ctx)

    # ------------------------------------------------------------------------------------------- neuron sets
    def _load_neurons_file(self, path: str) -> dict[str, dict]:
        import hashlib

        data = json.loads(Path(path).read_text())
        recs = data.get("prompts", data) if isinstance(data, dict) else data
        out = {}
        for r in recs:
            if "refined" not in r or "prompt" not in r:
                raise BadInput(f"nemo: {path}: every record needs 'prompt' and 'refined' (see NeMo.export)")
            if len(r["refined"]) != len(self._layers):
                raise BadInput(f"nemo: {path}: {len(r['refined'])} layers in the file, the model has "
                               f"{len(self._layers)}")
            out[hashlib.sha256(r["prompt"].encode("utf-8")).hexdigest()] = r
        return out

    def export(self, path: str | Path) -> Path:
        """Write the fitted neuron sets as JSON: ``{layers: [{name, width}], params, prompts: [record, ...]}``;
        each record holds ``prompt``, ``prompt_id``, ``seeds_K``, ``initial``, ``refined`` (one list of channel
        indices per layer), their scores and ``tau_ref``."""
        from memobench.api import atomic_write_text

        if self._records is None:
            raise RuntimeError("nemo: fit() has not run")
        doc = {"method": "nemo", "version": self.version, "params": params_dict(self.params),
               "layers": [{"name": n, "width": w} for n, w in self._layers],
               "prompts": list(self._records.values())}
        atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True))
        return Path(path)

    @property
    def neuron_sets(self) -> dict[str, list[list[int]]]:
        """prompt sha256 -> refined neuron set (one list per layer)."""
        if self._records is None:
            return {}
        return {k: [list(s) for s in r["refined"]] for k, r in self._records.items()}

    def union_set(self) -> list[list[int]]:
        n = len(self._layers)
        sets: list[set] = [set() for _ in range(n)]
        for r in (self._records or {}).values():
            for l, s in enumerate(r["refined"]):
                sets[l].update(int(i) for i in s)
        return [sorted(s) for s in sets]

    def sets_for(self, prompt: Prompt | None) -> list[list[int]]:
        """The neuron set applied while ``prompt`` is generated (see ``blocking`` / ``utility_blocking``)."""
        if self._records is None:
            raise RuntimeError("mitigation 'nemo': fit() must run before apply()")
        if self.params.blocking == "union":
            return self.union_set()
        rec = self._records.get(prompt.sha256) if prompt is not None else None
        if rec is not None:
            return [list(s) for s in rec["refined"]]
        if self.params.utility_blocking == "union":
            return self.union_set()
        return [[] for _ in self._layers]

    def apply_group(self, prompt: Prompt) -> tuple:
        """Prompts with the same blocked neurons (e.g. every utility prompt under the union) share one model: their
        images may be denoised in one batch."""
        return tuple(tuple(sorted(set(s))) for s in self.sets_for(prompt))

    # ------------------------------------------------------------------------------------------- apply
    @contextlib.contextmanager
    def apply(self, model, prompt: Prompt | None, ctx: Context) -> Iterator[None]:
        sets = self.sets_for(prompt)
        layers = value_layers(model.unet, self.params.blocks)
        if [(n, int(m.out_features)) for n, m in layers] != self._layers:
            raise RuntimeError("mitigation 'nemo': the model's value layers differ from the fitted ones")
        with block_neurons(layers, sets, self.params.scaling_factor):
            yield

    def report(self) -> dict:
        import statistics

        if self._records is None:
            return {}
        recs = list(self._records.values())
        counts = [sum(len(s) for s in r["refined"]) for r in recs]
        mem = [c for c, r in zip(counts, recs) if r.get("memorized", True)]
        union = self.union_set()
        thr = self.params.initial_threshold
        crit = {k: (None if r.get("initial_score") is None or not r.get("memorized", True)
                    else bool(r["initial_score"] <= thr)) for k, r in self._records.items()}
        per_layer_total = {n: sum(len(r["refined"][l]) for r in recs) for l, (n, _) in enumerate(self._layers)}
        return {
            "n_prompts": len(recs),
            "n_memorized": sum(1 for r in recs if r.get("memorized", True)),
            "median_neurons_per_prompt": statistics.median(counts) if counts else None,
            "median_neurons_per_memorized_prompt": statistics.median(mem) if mem else None,
            "neurons_per_layer": per_layer_total,
            "union_per_layer": {n: len(u) for (n, _), u in zip(self._layers, union)},
            "union_size": sum(len(u) for u in union),
            "layers": [{"name": n, "width": w} for n, w in self._layers],
            "total_neurons": sum(w for _, w in self._layers),
            "blocking": self.params.blocking, "utility_blocking": self.params.utility_blocking,
            "hook": "forward hook on attn2.to_v returning out * mask (both CFG halves, every step)",
            "stats": {**getattr(self, "_stats_source", {}), "file": self._files.get("stats")},
            "neurons_file": self._files.get("neurons"),
            "detection_size": list(getattr(self, "_size", ()) or ()) or None,
            # whether the initial selection met its criterion M(B) <= initial_threshold (METHODS §7.1.4 step 3b) or
            # ran out of (θ, k) candidates and fell back to the last set with τ_ref = its score (step 3d); None for
            # prompts without a seed set and for records from a neurons file that lacks the scores
            "criterion": {"threshold": thr, "n_met": sum(v is True for v in crit.values()),
                          "n_fallback": sum(v is False for v in crit.values())},
            "per_prompt": {r.get("prompt_id", k[:12]): {"n": c, "refined_score": r.get("refined_score"),
                                                         "initial_score": r.get("initial_score"),
                                                         "criterion_met": crit[k], "seeds_K": r.get("seeds_K")}
                           for (k, r), c in zip(self._records.items(), counts)},
        }


@hookimpl
def register_mitigations(register):
    register(NeMo)
