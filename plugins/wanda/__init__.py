"""Wanda pruning of the memorization subspace (mitigations ``wanda`` and ``wanda10``, kind ``"weights"``).

Paper: Chavhan, Bohdal, Zong, Li, Hospedales, "Memorized Images in Diffusion Models share a Subspace that can be
Located and Deleted", arXiv 2406.18566 (abstract: memorized prompts activate a common subspace of the UNet
feed-forward layers, found by contrasting memorized and non-memorized activations and deleted by pruning). Score:
Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models", Eq. 1),
S_ij = |W_ij| · ‖X_j‖₂. Algorithm = the authors' ConceptPrune implementation (``ruchikachavhan/concept-prune``:
``wanda/wanda.py``, ``neuron_receivers/wanda_receiver.py``, ``wanda/save_union_over_time.py``,
``configs/wanda_config.yaml``), as specified in METHODS §7.3 (steps 1-6) and §9 #14/#15.

Steps
-----
1. Layers: the ``ff.net.2`` linears of the UNet's transformer blocks (W^l ∈ R^{C×4C}; 16 on SD-1.x), resolved from
   the module structure in forward order (down, mid, up; equal to the alphabetical order ConceptPrune sorts by);
   their input X is the GEGLU output h ⊙ GELU(g) (captured by a forward pre-hook on ``ff.net.2``).
2. For the target prompts and the base prompt "": full DDIM sampling with CFG from one seed (re-seeded for every
   run), one prompt per run. At denoising step t < τ_T and layer l every input row (both CFG halves, every spatial
   token) is L2-normalised and the column sums of squares are accumulated separately for targets and base:
   N_j^{t,l} = sqrt(Σ_rows x_rj²). ConceptPrune runs the base prompt once per target prompt (identical runs); here
   it runs once and its sums of squares are multiplied by the number of target prompts (the same norms, without the
   repeated runs). Steps ≥ τ_T never enter the mask, so sampling stops after τ_T steps (identical statistics).
3. S_target^{t,l} = |W^l| ⊙ N_target^{t,l} (broadcast over rows); S_base^{t,l} likewise.
4. M^{t,l}_ij = 1 iff j is among the top ⌊ρ·4C⌋ columns of row i by S_target and S_target,ij > S_base,ij.
5. Prune W_ij iff Σ_{t<τ_T} M^{t,l}_ij > select_ratio · τ_T (τ_T = 10, select_ratio 0: the union over time).
6. Pruned weights are zeroed inside :meth:`Wanda.apply`: each selected layer's ``weight`` Parameter is swapped for a
   new Parameter ``where(mask, 0, W)`` (out-of-place; the model stays differentiable w.r.t. its inputs, and graphs
   built inside the context keep referencing the pruned tensor) and the *original Parameter object* is put back on
   exit, also on exceptions, so the weights are bit-identical afterwards.

Choices where METHODS is silent or marked [UNPUBLISHED] (each a ``Params`` field, recorded in every result)
------------------------------------------------------------------------------------------------------------
* ``skill_ratio`` ρ = 0.01 (ConceptPrune default); mitigation ``wanda10`` is the same method with ρ = 0.1, DoRI's
  "Wanda 10 %" ablation (the mapping of "10 %" to ρ is assumed, METHODS §7.3).
* ``layers``: "all" (16 on SD-1.x, §9 #14) or a comma list of 0-based forward-order indices of the ``ff.net.2``
  layers (DoRI's figures show 7 layer ids for Wanda; which ones is [UNPUBLISHED]).
* ``group_size``: 0 (default) = one mask from all target prompts of the run; g > 0 = consecutive groups of g prompts
  (ConceptPrune's ``memorize_<i>`` files hold 10-40 prompts), one mask each. A fitted prompt is generated with its
  group's mask; prompts that were not fitted (utility prompts, ``mem_type`` None, ``prompt`` None) with the union of
  all group masks (with one group: the mask itself, i.e. "the pruned model").
* Sampling for the statistics: ``num_inference_steps`` 50 and ``guidance_scale`` 7.5 (the diffusers pipeline
  defaults ConceptPrune relies on), ``seed`` 0, negative prompt "", at the run's generation size
  (``ctx.generation`` height/width, :func:`memobench.model.generation_size`; ConceptPrune samples at
  the pipeline's default, SD's native 512 px, which is also where its masks are used): the activation statistics
  come from the resolution at which the pruned model generates. A non-native size enters the masks' cache key.
  The initial latent comes from memobench's per-image CPU generator (``torch.Generator().manual_seed(seed)``), not
  from ConceptPrune's global-RNG pipeline call.
* Precision: ConceptPrune ran the pipeline in fp16 and normalised rows in fp16 on the CPU; here the UNet runs in the
  model's dtype and normalisation/accumulation is in float32.
* Ties in the per-row top-k are broken by a stable descending sort (lower column index first); ConceptPrune's
  unstable ``torch.sort`` leaves them implementation-defined.
* Prompts are batched for the statistics runs (``ctx.batch_size``, default 8): every sample's rows are
  independent, so only floating-point summation order changes.

Artifacts: one safetensors file of boolean masks (``mask.<layer name>``) per prompt group, keyed by model identity,
parameters and the group's prompt texts.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from memobench.api import BadInput, Context, Mitigation, Prompt, hookimpl, param

__all__ = ["Wanda", "Wanda10", "ffn_layers", "column_sq_sums", "wanda_step_mask", "wanda_mask", "prune_weights"]



def ffn_layers(unet, layers: str = "all") -> list[tuple[str, Any]]:
    """``(name, ff.net.2 Linear)`` of every transformer block's feed-forward output layer, in forward order (down,
    mid, up blocks); ``layers`` = "all" or a comma list of indices into that list."""
    import torch

    from memobench.api import transformer_blocks

    out = []
    for prefix, tb in transformer_blocks(unet):
        net = getattr(getattr(tb, "ff", None), "net", None)
        if net is None or len(net) < 3 or not isinstance(net[2], torch.nn.Linear):
            continue
        out.append((f"{prefix}.ff.net.2", net[2]))
    if not out:
        raise ValueError("wanda: the UNet has no transformer feed-forward layers (ff.net.2)")
    if str(layers).strip().lower() in ("", "all"):
        return out
    try:
        idx = [int(x) for x in str(layers).split(",") if x.strip()]
    except ValueError:
        raise BadInput(f"wanda parameter layers: {layers!r}; use 'all' or comma-separated indices") from None
    bad = [i for i in idx if not 0 <= i < len(out)]
    if bad:
        raise BadInput(f"wanda parameter layers: indices {bad} out of range 0..{len(out) - 1}")
    return [out[i] for i in sorted(set(idx))]


class _Stop(Exception):
    pass


def column_sq_sums(model, layers, texts: Sequence[str], timesteps: int, num_inference_steps: int,
                   guidance_scale: float, seed: int, batch_size: int = 8, embeds=None,
                   size: tuple[int, int] | None = None, advance: Callable | None = None) -> list[list]:
    """Σ over rows of x_rj² with every input row x_r of ``ff.net.2`` L2-normalised (both CFG halves, all spatial
    tokens, all ``texts``), per denoising step t < ``timesteps`` and layer: ``out[t][l]`` (float32, length 4C).
    ``embeds`` (N×77×d), when given, replaces the encoded ``texts`` (conditioning embeddings that are not texts).
    ``size``: (height, width) in pixels of the sampling runs (default: the model's native resolution).
    ``advance(n)``, when given, is called after each denoising step with the batch's number of prompts (progress:
    :func:`statistics_total` units in all)."""
    import torch

    sums = [[torch.zeros(int(m.in_features), dtype=torch.float32, device=model.device) for _, m in layers]
            for _ in range(timesteps)]
    state = {"t": 0, "n": 0}
    handles = []

    def make_hook(l):
        def pre_hook(module, args):
            if state["t"] < timesteps:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                x = torch.nn.functional.normalize(x, p=2, dim=1)
                sums[state["t"]][l] += (x * x).sum(dim=0)
        return pre_hook

    def on_step(info):
        state["t"] = info.index + 1
        if advance is not None and state["t"] <= timesteps:
            advance(state["n"])
        if state["t"] >= timesteps:
            raise _Stop

    try:
        for l, (_, mod) in enumerate(layers):
            handles.append(mod.register_forward_pre_hook(make_hook(l)))
        n = len(texts) if embeds is None else int(embeds.shape[0])
        for i in range(0, n, batch_size):
            state["t"] = 0
            if embeds is None:
                pe = model.encode_prompt(list(texts[i: i + batch_size]))
            else:
                pe = embeds[i: i + batch_size].to(model.device, model.dtype)
            state["n"] = int(pe.shape[0])
            lat = model.initial_latents([seed] * int(pe.shape[0]), *(size or (None, None)))
            try:
                with torch.no_grad():
                    model.denoise(pe, model.empty_embedding(), lat, num_inference_steps, guidance_scale,
                                  on_step=on_step)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return [[s.cpu() for s in row] for row in sums]


def statistics_total(n_prompts: int, timesteps: int) -> int:
    """The units :func:`column_sq_sums` reports for ``n_prompts`` prompts: prompt × denoising step."""
    return int(n_prompts) * int(timesteps)


def _ctx_task(ctx, description: str, total: int | None):
    """``ctx.task(description, total, transient=True)`` (a progress bar under the current one), or a no-op without a
    context (direct calls, tests)."""
    if ctx is None or not hasattr(ctx, "task"):
        return contextlib.nullcontext(lambda n=1, **kw: None)
    return ctx.task(description, total, transient=True)


def wanda_step_mask(weight_abs, norm_target, norm_base, skill_ratio: float):
    """M_ij = [j among the top ⌊ρ·4C⌋ of row i by S_target] ∧ [S_target,ij > S_base,ij], S = |W| ⊙ N (one step)."""
    import torch

    s_t = weight_abs * norm_target.reshape(1, -1)
    s_b = weight_abs * norm_base.reshape(1, -1)
    k = int(skill_ratio * weight_abs.shape[1])
    top = torch.zeros_like(s_t, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(s_t, dim=1, descending=True, stable=True).indices[:, :k]
        top.scatter_(1, idx, True)
    return top & (s_t > s_b)


def wanda_mask(weight, norms_target: Sequence, norms_base: Sequence, skill_ratio: float, timesteps: int,
               select_ratio: float = 0.0):
    """Pruning mask of one layer: Σ_{t<τ_T} M^t > select_ratio·τ_T (select_ratio 0 = the union over time)."""
    import torch

    w = weight.detach().float().abs().cpu()
    count = torch.zeros(w.shape, dtype=torch.int32)
    for t in range(timesteps):
        count += wanda_step_mask(w, norms_target[t].float().cpu(), norms_base[t].float().cpu(), skill_ratio)
    return count > select_ratio * timesteps


@contextlib.contextmanager
def prune_weights(layers: Sequence[tuple[str, Any]], masks: dict) -> Iterator[None]:
    """Zero ``masks[name]`` (bool, shaped like the weight) of each layer's weight while the context is open.

    The weight Parameter is replaced by a new one (``where(mask, 0, W)``, out-of-place) and the original Parameter
    object is restored on exit, also on exceptions."""
    import torch

    saved = []
    try:
        for name, mod in layers:
            m = masks.get(name)
            if m is None or not bool(m.any()):
                continue
            orig = mod.weight
            if tuple(m.shape) != tuple(orig.shape):
                raise ValueError(f"wanda: mask for {name} has shape {tuple(m.shape)}, weight {tuple(orig.shape)}")
            pruned = torch.where(m.to(orig.device), torch.zeros((), dtype=orig.dtype, device=orig.device),
                                 orig.detach())
            saved.append((mod, orig))
            mod.weight = torch.nn.Parameter(pruned, requires_grad=orig.requires_grad)
        yield
    finally:
        for mod, orig in reversed(saved):
            mod.weight = orig


class Wanda(Mitigation):
    """Wanda pruning of the FFN subspace that memorized prompts activate (Chavhan et al., ConceptPrune code)."""

    name = "wanda"
    version = "1"
    kind = "weights"

    @dataclass
    class Params:
        skill_ratio: float = param(0.01, "ρ: fraction of each row's 4C inputs considered per step")
        timesteps: int = param(10, "τ_T: the first τ_T denoising steps enter the union")
        select_ratio: float = param(0.0, "prune iff the mask count over τ_T steps > select_ratio·τ_T")
        layers: str = param("all", "'all' or comma-separated forward-order indices of the ff.net.2 layers")
        group_size: int = param(0, "0 = one mask from all target prompts [UNPUBLISHED for DoRI]")
        base_prompt: str = param("", "the prompt whose activations are the base of the comparison ('' = the empty "
                                     "prompt)")
        seed: int = param(0, "seed of the initial latents of the activation statistics")
        num_inference_steps: int = param(50, "denoising steps of the activation statistics run")
        guidance_scale: float = param(7.5, "guidance scale of the activation statistics run")

        def __post_init__(self):
            if not 0.0 <= self.skill_ratio <= 1.0:
                raise BadInput(f"mitigation 'wanda' parameter skill_ratio: {self.skill_ratio} not in [0, 1]")
            if self.timesteps < 1:
                raise BadInput("mitigation 'wanda' parameter timesteps: at least 1")
            if self.timesteps > self.num_inference_steps:
                raise BadInput(f"mitigation 'wanda' parameter timesteps: {self.timesteps} > num_inference_steps "
                               f"{self.num_inference_steps}")

    def __init__(self, params: Any = None, **overrides: Any):
        super().__init__(params, **overrides)
        self._groups: list[dict] | None = None  # [{prompts: [sha], masks: {name: bool tensor}, file}]
        self._by_prompt: dict[str, int] = {}
        self._union: dict | None = None
        self._layers: list[tuple[str, tuple[int, int]]] = []
        self._size: tuple[int, int] | None = None  # (height, width) of the statistics runs of the last fit

    def fit(self, model, prompts: list[Prompt], ctx: Context) -> None:
        import torch
        from safetensors.torch import load_file, save

        from memobench.api import generation_size, key_of, size_key_part, tensors_sha256, write_once_bytes


        p = self.params
        layers = ffn_layers(model.unet, p.layers)
        self._layers = [(n, tuple(m.weight.shape)) for n, m in layers]
        g = p.group_size if p.group_size > 0 else max(1, len(prompts))
        groups = [prompts[i: i + g] for i in range(0, len(prompts), g)]
        bs = int(ctx.batch_size or 8)
        size = generation_size(model, ctx)  # statistics at the run's resolution
        self._size = size
        run = dict(timesteps=p.timesteps, num_inference_steps=p.num_inference_steps,
                   guidance_scale=p.guidance_scale, seed=p.seed, size=size)
        # a non-native size enters the masks' cache key (the native size keeps the keys of earlier versions)
        size_part = size_key_part(model, size)
        base = None
        self._groups, self._by_prompt = [], {}
        with ctx.task(f"wanda: masks ({len(prompts)} prompts, {len(groups)} group(s))", len(prompts)) as advance:
            for gi, grp in enumerate(groups):
                path = ctx.artifact_path(self, "masks", key_of([q.sha256 for q in grp]), *size_part)
                if path.exists():
                    t = load_file(str(path))
                    masks = {n: t[f"mask.{n}"] for n, _ in layers}
                else:
                    n_stat = statistics_total(len(grp) + (base is None), p.timesteps)
                    with _ctx_task(ctx, f"wanda: statistics, group {gi + 1}/{len(groups)} ({len(grp)} prompts × "
                                        f"{p.timesteps} steps)", n_stat) as adv:
                        tgt = column_sq_sums(model, layers, [q.text for q in grp], batch_size=bs, advance=adv, **run)
                        if base is None:
                            base = column_sq_sums(model, layers, [p.base_prompt], batch_size=1, advance=adv, **run)
                    masks = {}
                    for l, (n, mod) in enumerate(layers):
                        nt = [tgt[t][l].sqrt() for t in range(p.timesteps)]
                        nb = [(base[t][l] * len(grp)).sqrt() for t in range(p.timesteps)]
                        masks[n] = wanda_mask(mod.weight, nt, nb, p.skill_ratio, p.timesteps, p.select_ratio)
                    # processes of a sharded run may compute a group's masks at once: the first complete file wins
                    # and every process uses the masks on disk
                    if not write_once_bytes(path, save({f"mask.{n}": m.contiguous() for n, m in masks.items()},
                                                       metadata={"prompts": json.dumps([q.id for q in grp])})):
                        t = load_file(str(path))
                        masks = {n: t[f"mask.{n}"] for n, _ in layers}
                self._groups.append({"prompts": [q.id for q in grp], "masks": masks, "file": str(path),
                                     "mask_sha256": tensors_sha256(masks)})
                for q in grp:
                    self._by_prompt[q.sha256] = gi
                advance(len(grp))
        union = {}
        for n, _ in layers:
            union[n] = torch.zeros(self._groups[0]["masks"][n].shape, dtype=torch.bool) if self._groups else None
            for grp in self._groups:
                union[n] |= grp["masks"][n]
        self._union = union
        pruned = {n: torch.where(union[n].to(m.weight.device), torch.zeros((), dtype=m.weight.dtype,
                                                                          device=m.weight.device), m.weight.detach())
                  for n, m in layers}
        self._pruned_sha = tensors_sha256(pruned)
        self._original_sha = tensors_sha256({n: m.weight.detach() for n, m in layers})

    def layers(self, model) -> list[tuple[str, Any]]:
        """``(name, ff.net.2 Linear)`` of the layers this mitigation prunes (``params.layers``), forward order."""
        return ffn_layers(model.unet, self.params.layers)

    def embedding_masks(self, model, prompt_embeds, layers: Sequence[tuple[str, Any]] | None = None,
                        skill_ratio: float | dict | None = None, size: tuple[int, int] | None = None,
                        ctx: Context | None = None) -> dict:
        """Wanda masks (METHODS §7.3 steps 2-5) with one conditioning embedding (1×77×d, e.g. a DoRI adversarial
        embedding) as the target, against ``base_prompt``: what :meth:`fit` computes for a group of one prompt, with
        the embedding in place of the encoded prompt text. ``layers``: the ``(name, Linear)`` pairs to score (default:
        this mitigation's ``ff.net.2`` layers); the statistic hooks any Linear's input, so ConceptPrune's other
        ``hook_module`` choices (e.g. the ``attn2.to_v`` value projections) work too. ``skill_ratio``: a float or
        ``{layer name: float}`` in place of ``params.skill_ratio``. ``size``: (height, width) of the sampling runs;
        default the run's generation size when ``ctx`` is given, else the size of the last :meth:`fit` (the run's),
        else the model's native one. Returns ``{layer name: bool mask shaped like the weight}``; the fitted masks and
        :meth:`apply` are untouched. The base statistics are memoised per layer list and size.
        """
        p = self.params
        layers = list(layers) if layers is not None else self.layers(model)
        if size is None and ctx is not None:
            from memobench.api import generation_size

            size = generation_size(model, ctx)
        size = tuple(size or self._size or (model.resolution, model.resolution))
        run = dict(timesteps=p.timesteps, num_inference_steps=p.num_inference_steps,
                   guidance_scale=p.guidance_scale, seed=p.seed, size=size)
        memo = self.__dict__.setdefault("_embedding_base", {})
        key = (tuple(n for n, _ in layers), size)
        fresh = key not in memo or memo[key][0] is not model
        with _ctx_task(ctx, f"wanda: statistics (embedding × {p.timesteps} steps)",
                       statistics_total(1 + fresh, p.timesteps)) as adv:
            if fresh:
                memo[key] = (model, column_sq_sums(model, layers, [p.base_prompt], batch_size=1, advance=adv, **run))
            base = memo[key][1]
            emb = prompt_embeds.reshape(1, *prompt_embeds.shape[-2:])
            tgt = column_sq_sums(model, layers, [], batch_size=1, embeds=emb, advance=adv, **run)
        out = {}
        for l, (n, mod) in enumerate(layers):
            rho = skill_ratio.get(n, p.skill_ratio) if isinstance(skill_ratio, dict) else (
                p.skill_ratio if skill_ratio is None else float(skill_ratio))
            nt = [tgt[t][l].sqrt() for t in range(p.timesteps)]
            nb = [base[t][l].sqrt() for t in range(p.timesteps)]
            out[n] = wanda_mask(mod.weight, nt, nb, rho, p.timesteps, p.select_ratio)
        return out

    @property
    def prompt_independent(self) -> bool:  # one mask for every prompt unless group_size > 0
        return self.params.group_size == 0

    def apply_group(self, prompt: Prompt):
        """Prompts with the same mask (their group's, or the union for prompts outside every group) share one model."""
        if self.prompt_independent:
            return ""
        if self._groups is None:
            raise RuntimeError(f"mitigation '{self.name}': fit() must run before apply()")
        gi = self._by_prompt.get(prompt.sha256)
        return ("group", gi) if gi is not None else ("union",)

    def masks_for(self, prompt: Prompt | None) -> dict:
        if self._groups is None:
            raise RuntimeError(f"mitigation '{self.name}': fit() must run before apply()")
        gi = self._by_prompt.get(prompt.sha256) if prompt is not None else None
        return self._groups[gi]["masks"] if gi is not None else (self._union or {})

    @contextlib.contextmanager
    def apply(self, model, prompt: Prompt | None, ctx: Context) -> Iterator[None]:
        masks = self.masks_for(prompt)
        layers = ffn_layers(model.unet, self.params.layers)
        if [(n, tuple(m.weight.shape)) for n, m in layers] != self._layers:
            raise RuntimeError(f"mitigation '{self.name}': the model's FFN layers differ from the fitted ones")
        with prune_weights(layers, masks):
            yield

    def report(self) -> dict:
        if self._groups is None:
            return {}
        per_layer = {}
        for n, shape in self._layers:
            u = self._union[n]
            per_layer[n] = {"shape": list(shape), "pruned": int(u.sum()), "density": float(u.float().mean()),
                            "k_per_row_per_step": int(self.params.skill_ratio * shape[1])}
        total = sum(v["pruned"] for v in per_layer.values())
        size = sum(s[0] * s[1] for _, s in self._layers)
        return {
            "n_groups": len(self._groups), "group_prompts": [g["prompts"] for g in self._groups],
            "pruned_weights": total, "layer_weights": size, "pruned_fraction": total / size if size else 0.0,
            "per_layer": per_layer, "files": [g["file"] for g in self._groups],
            "per_group_pruned": [int(sum(int(m.sum()) for m in g["masks"].values())) for g in self._groups],
            "mask_sha256": [g["mask_sha256"] for g in self._groups],
            "layers_sha256_original": self._original_sha, "layers_sha256_pruned_union": self._pruned_sha,
            "statistics_size": list(self._size) if self._size else None,
            "edit": "weight Parameter swapped for where(mask, 0, W) inside apply(); original restored on exit",
        }


class Wanda10(Wanda):
    """Wanda with ρ = 0.1 per row (DoRI's "Wanda 10 %" ablation; mapping assumed, METHODS §7.3)."""

    name = "wanda10"

    @dataclass
    class Params(Wanda.Params):
        skill_ratio: float = param(0.1, "ρ: fraction of each row's 4C inputs considered per step (Wanda10: 0.1)")


@hookimpl
def register_mitigations(register):
    register(Wanda)
    register(Wanda10)
