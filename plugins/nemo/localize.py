"""NeMo's localization algorithm (METHODS §7.1), the functions the :class:`memobench_plugins.nemo.NeMo` mitigation
and the ``nemo`` detector are built from: the layer map (cross-attention value layers) and blocking hooks, the
activation statistics and candidate sets, the memorization score (MS-SSIM of initial noise differences) and the
θ/k selection with its refinement. See the package docstring for the paper, the reference code and the deviations.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence

from memobench.api import BadInput

_BLOCKS = ("down", "mid", "up")  # the UNet parts memobench.api.transformer_blocks walks


# ---------------------------------------------------------------------------------------------- layer map
def _parse_blocks(blocks: str | Sequence[str]) -> tuple[str, ...]:
    parts = [b.strip() for b in (blocks.split(",") if isinstance(blocks, str) else blocks) if b.strip()]
    bad = sorted(set(parts) - set(_BLOCKS))
    if bad or not parts:
        raise BadInput(f"blocks: {bad or parts!r} not in {_BLOCKS}; e.g. 'down,mid'")
    return tuple(b for b in _BLOCKS if b in parts)  # forward order regardless of how they were listed


def value_layers(unet, blocks: str | Sequence[str] = "down,mid") -> list[tuple[str, Any]]:
    """``(name, attn2.to_v module)`` of every cross-attention value projection in ``blocks``, in forward order.

    On SD-1.x this is NeMo's layer map (METHODS §1.3): 6 down-block layers + 1 mid-block layer. Raises
    ``ValueError`` when fused K/V projections are active (``fuse_qkv_projections()``): hooks on ``to_v`` would
    never fire.
    """
    from memobench.api import transformer_blocks

    out = []
    for prefix, tb in transformer_blocks(unet, _parse_blocks(blocks)):
        attn2 = getattr(tb, "attn2", None)
        if attn2 is None or not getattr(attn2, "is_cross_attention", True):
            continue
        if getattr(attn2, "fused_projections", hasattr(attn2, "to_kv")):
            raise ValueError(f"nemo: fused K/V projections are active on {prefix}.attn2 (fuse_qkv_projections()); "
                             "call unet.unfuse_qkv_projections() first: hooks on attn2.to_v would never fire")
        out.append((f"{prefix}.attn2.to_v", attn2.to_v))
    if not out:
        raise BadInput("nemo: the UNet has no cross-attention value layers (attn2.to_v) in the selected blocks")
    return out


@contextlib.contextmanager
def block_neurons(layers: Sequence[tuple[str, Any]], neuron_sets: Sequence[Sequence[int]],
                  scaling_factor: float = 0.0) -> Iterator[list]:
    """Scale the output channels ``neuron_sets[l]`` of ``layers[l]`` by ``scaling_factor`` while the context is open.

    One forward hook per layer with a non-empty set returns ``out * mask`` (out-of-place, so autograd through the
    blocked model works); the handles are removed on exit, also on exceptions. Yields the list of handles.
    """
    import torch

    if len(neuron_sets) != len(layers):
        raise ValueError(f"nemo: {len(neuron_sets)} neuron sets for {len(layers)} layers")
    handles = []
    try:
        for (name, mod), idx in zip(layers, neuron_sets):
            idx = sorted({int(i) for i in idx})
            if not idx:
                continue
            width = int(mod.out_features)
            if idx[0] < 0 or idx[-1] >= width:
                raise ValueError(f"nemo: neuron index out of range for {name} (width {width}): {idx[0]}..{idx[-1]}")
            mask = torch.ones(width, dtype=mod.weight.dtype, device=mod.weight.device)
            mask[idx] = float(scaling_factor)

            def hook(module, args, out, _mask=mask):
                return out * _mask.to(dtype=out.dtype, device=out.device)

            handles.append(mod.register_forward_hook(hook))
        yield handles
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------- activations
def prompt_activations(model, layers, texts: Sequence[str], batch_size: int = 32,
                       advance: Callable | None = None) -> list:
    """a^l (N × C_l, float32): mean over the 77 token positions of |to_v(e_y)| for each text (NeMo Eq. 3).

    ``to_v`` sees only the text embedding, so this needs no UNet call; the modules' ``forward`` is called directly
    (bypassing hooks), as NeMo's statistics script does. ``advance(n)``, when given, is called with the number of
    texts of each batch done (progress).
    """
    import torch

    acts: list[list] = [[] for _ in layers]
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            emb = model.encode_prompt(list(texts[i: i + batch_size]))
            for l, a in enumerate(embedding_activations(layers, emb)):
                acts[l].append(a)
            if advance is not None:
                advance(int(emb.shape[0]))
    return [torch.cat(a) for a in acts]


def embedding_activations(layers, embeds) -> list:
    """a^l (B × C_l, float32) of conditioning embeddings ``embeds`` (B×77×d, encoded prompts or any other
    conditioning, e.g. a DoRI embedding): NeMo Eq. 3, the modules' ``forward`` called directly (bypassing hooks)."""
    import torch

    with torch.no_grad():
        return [mod.forward(embeds.to(mod.weight.dtype)).abs().float().mean(dim=1).cpu() for _, mod in layers]


def activation_stats(model, layers, texts: Sequence[str], batch_size: int = 32,
                     advance: Callable | None = None) -> tuple[list, list]:
    """Per-neuron mean and (unbiased) standard deviation of a^l over ``texts`` (NeMo
    ``1_compute_activations_statistics.py``). ``advance``: see :func:`prompt_activations`."""
    if len(texts) < 2:
        raise BadInput(f"nemo: activation statistics need at least 2 non-memorized prompts, got {len(texts)}")
    acts = prompt_activations(model, layers, texts, batch_size, advance)
    return [a.mean(dim=0) for a in acts], [a.std(dim=0) for a in acts]


def candidate_sets(activations, means, stds, theta: float, k: int) -> list[list[int]]:
    """B_l = {i : |a_i - μ_i| / σ_i > θ} (ascending) followed by top-k_l(a) (descending), duplicates kept, k capped at
    the layer width (reference ``initial_neuron_selection``)."""
    out = []
    for a, mu, sd in zip(activations, means, stds):
        a = a.float().cpu()
        z = (a - mu.float().cpu()).abs() / sd.float().cpu()
        idx = (z > theta).nonzero().flatten().tolist()
        kk = min(int(k), a.numel())
        if kk > 0:
            idx += a.abs().topk(k=kk).indices.tolist()
        out.append(idx)
    return out


# ---------------------------------------------------------------------------------------------- score
def minmax_normalize(x):
    """(x - min) / (max - min) per (sample, channel) plane of an N×C×H×W tensor (constant planes → 0)."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-30)


def msssim_min_size(n_scales: int, kernel_size: int) -> int:
    """Smallest height/width torchmetrics' MS-SSIM accepts for ``n_scales`` betas and ``kernel_size``."""
    div = max(1, n_scales - 1) ** 2
    return max(2 ** n_scales, kernel_size * div)


def _small_plane_plan(size: int, betas: Sequence[float], kernel_size: int, small_latent: str,
                      upsample_to: int) -> tuple[int, tuple[float, ...]]:
    """(nearest-upsampling factor, betas) for planes of ``size`` px under ``small_latent`` (see the module
    docstring of the plugin): factor 1 and all betas when the planes are large enough for torchmetrics."""
    betas = tuple(float(b) for b in betas)
    need = msssim_min_size(len(betas), kernel_size)
    if size >= need:
        return 1, betas
    if small_latent == "upsample":
        return max(math.ceil(upsample_to / size), math.ceil(need / size)), betas
    if small_latent == "fewer_scales":
        n = len(betas)
        while n > 0 and size < msssim_min_size(n, kernel_size):
            n -= 1
        if n == 0:
            raise BadInput(f"nemo: latent planes of {size}px are too small for MS-SSIM with kernel "
                           f"{kernel_size} even at one scale; use small_latent='upsample'")
        return 1, betas[:n]
    raise BadInput(f"nemo: MS-SSIM with kernel {kernel_size} and {len(betas)} scales needs planes of at "
                   f"least {need}px, got {size}px; set small_latent='upsample' or 'fewer_scales'")


def _upsample(x, f: int):
    """Nearest-neighbour upsampling by the integer factor ``f`` (every value an f×f block)."""
    return x.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1) if f > 1 else x


def ms_ssim(x, y, kernel_size: int = 11, betas: Sequence[float] = (0.33, 0.33, 0.33), small_latent: str = "upsample",
            upsample_to: int = 64):
    """Per-sample multi-scale SSIM of two N×C×H×W tensors (torchmetrics' functional MS-SSIM, ``reduction='none'``,
    other arguments default, as NeMo calls it). Planes smaller than torchmetrics' minimum are handled by
    ``small_latent`` (see the module docstring)."""
    import torch
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as msssim

    x, y = x.float(), y.float()
    f, betas = _small_plane_plan(min(x.shape[-2:]), betas, kernel_size, small_latent, upsample_to)
    x, y = _upsample(x, f), _upsample(y, f)
    with torch.no_grad():
        return msssim(x, y, reduction="none", kernel_size=kernel_size, betas=betas)


class MSSSIMAgainst:
    """:func:`ms_ssim` of many ``preds`` against one fixed ``target`` (N×C×H×W), with the target's side of the
    computation done once: its upsampling, padding, Gaussian-filtered mean and second moment and its range at every
    scale. NeMo's refinement compares hundreds of blocked noise differences with the same unblocked δ, so this halves
    the work of each comparison without changing what is computed: torchmetrics' functional MS-SSIM
    (``_multiscale_ssim_update`` with a Gaussian kernel of σ 1.5 / size 11, k1 0.01, k2 0.03, data range from the
    data at each scale, ``normalize="relu"``), step by step, on the same tensors (the target's per-channel filter
    responses are those of the joint depthwise convolution; checked equal to :func:`ms_ssim` in
    tests/test_nemo_wanda.py)."""

    def __init__(self, target, kernel_size: int = 11, betas: Sequence[float] = (0.33, 0.33, 0.33),
                 small_latent: str = "upsample", upsample_to: int = 64):
        import torch
        import torch.nn.functional as F
        from torchmetrics.functional.image.utils import _gaussian_kernel_2d

        if kernel_size != 11:  # torchmetrics' Gaussian size comes from σ = 1.5 (11), whatever kernel_size says
            raise BadInput(f"nemo: MS-SSIM with kernel {kernel_size}: only 11 (torchmetrics' Gaussian of σ 1.5)")
        self.factor, betas = _small_plane_plan(min(target.shape[-2:]), betas, kernel_size, small_latent, upsample_to)
        y = _upsample(target.float(), self.factor)
        self.betas = torch.tensor(betas).view(-1, 1)
        self.pad = (kernel_size - 1) // 2
        self.channels = y.shape[1]
        self.kernel = _gaussian_kernel_2d(self.channels, [kernel_size, kernel_size], [1.5, 1.5], y.dtype, y.device)
        self.scales = []  # per scale: (padded target, μ_t, E[t²], range of t)
        with torch.no_grad():
            for _ in range(len(betas)):
                yp = F.pad(y, (self.pad,) * 4, mode="reflect")
                o = F.conv2d(torch.cat((yp, yp * yp)), self.kernel, groups=self.channels).split(y.shape[0])
                self.scales.append((yp, o[0], o[1], y.max() - y.min()))
                y = F.avg_pool2d(y, (2, 2))
        self.n = target.shape[0]

    def __call__(self, preds):
        """Per-sample MS-SSIM(preds[i], target[i]) (preds: N×C×H×W, the target's shape before upsampling)."""
        import torch
        import torch.nn.functional as F

        if preds.shape[0] != self.n:
            raise ValueError(f"nemo: {preds.shape[0]} samples against a target of {self.n}")
        x = _upsample(preds.float(), self.factor)
        mcs = []
        with torch.no_grad():
            for yp, mu_t, e_tt, range_t in self.scales:
                dr = torch.maximum(x.max() - x.min(), range_t)
                c1, c2 = (0.01 * dr) ** 2, (0.03 * dr) ** 2
                xp = F.pad(x, (self.pad,) * 4, mode="reflect")
                o = F.conv2d(torch.cat((xp, xp * xp, xp * yp)), self.kernel, groups=self.channels).split(x.shape[0])
                mu_p, e_pp, e_pt = o
                mu_p_sq, mu_t_sq, mu_pt = mu_p.pow(2), mu_t.pow(2), mu_p * mu_t
                s_pp = torch.clamp(e_pp - mu_p_sq, min=0.0)
                s_tt = torch.clamp(e_tt - mu_t_sq, min=0.0)
                s_pt = e_pt - mu_pt
                upper = 2 * s_pt + c2
                lower = (s_pp + s_tt) + c2
                full = ((2 * mu_pt + c1) * upper) / ((mu_p_sq + mu_t_sq + c1) * lower)
                pd = self.pad
                cs = (upper / lower)[..., pd:-pd, pd:-pd]
                sim = torch.relu(full.reshape(full.shape[0], -1).mean(-1))
                mcs.append(torch.relu(cs.reshape(cs.shape[0], -1).mean(-1)))
                x = F.avg_pool2d(x, (2, 2))
            mcs[-1] = sim
            return torch.prod(torch.stack(mcs) ** self.betas.to(x.device), dim=0)


def max_pairwise_ms_ssim(deltas, **kw):
    """m_g = max_{g'≠g} MS-SSIM(δ_g, δ_g') over all pairs (reference ``calculate_max_pairwise_ssim``)."""
    import torch

    n = deltas.shape[0]
    if n < 2:
        raise BadInput("nemo: the seed filter needs at least 2 samples per prompt")
    pairs = torch.combinations(torch.arange(n), r=2)
    s = ms_ssim(deltas[pairs[:, 0]], deltas[pairs[:, 1]], **kw)
    return torch.stack([s[(pairs == g).any(dim=1)].max() for g in range(n)])


def noise_differences(model, embeds, latents, t, guidance_scale: float = 0.0, autocast_fp16: bool = False):
    """Min-max normalised δ = ε̂(x_T, t, e) - x_T (float32), ε̂ conditional (w = 0) or CFG with (uncond, cond)."""
    import torch

    b = latents.shape[0]
    cond = embeds.expand(b, -1, -1)
    use_cfg = guidance_scale != 0
    x = torch.cat([latents] * 2) if use_cfg else latents
    e = torch.cat([model.empty_embedding().expand(b, -1, -1), cond]) if use_cfg else cond
    ac = (torch.autocast(device_type="cuda", dtype=torch.float16) if autocast_fp16 and latents.device.type == "cuda"
          else contextlib.nullcontext())
    with torch.no_grad(), ac:
        eps = model.eps(model.scheduler.scale_model_input(x, t), t, e)
    eps = eps.float()
    if use_cfg:
        eu, ec = eps.chunk(2)
        eps = eu + guidance_scale * (ec - eu)
    return minmax_normalize(eps - latents.float())


# ---------------------------------------------------------------------------------------------- selection
def theta_k_schedule(theta_init: float = 5.0, theta_step: float = 0.25, theta_min: float = 1.0, k_init: int = 0,
                     k_max: int = 1280, use_theta: bool = True, use_top_k: bool = True) -> list[tuple[float, int]]:
    """The (θ, k) candidates the initial selection evaluates when every candidate fails (16 with the defaults:
    θ = 5 … 1.25, k = 0 … 15; 20 with Δθ = 0.2: θ = 5 … 1.2; 40 with Δθ = 0.1: θ = 5 … 1.1)."""
    out = []
    initial_selection(None, None, None, lambda sets: 1.0, threshold=-math.inf, theta_init=theta_init,
                      theta_step=theta_step, theta_min=theta_min, k_init=k_init, k_max=k_max, use_theta=use_theta,
                      use_top_k=use_top_k, _trace=out)
    return [(th, k) for th, k, _ in out]


def _score_value(v) -> float:
    try:
        return float(v.max())
    except AttributeError:
        return float(v)


def initial_selection(activations, means, stds, score: Callable, threshold: float = 0.428,
                      refinement_threshold: float = 0.428, theta_init: float = 5.0, theta_step: float = 0.25,
                      theta_min: float = 1.0, k_init: int = 0, k_max: int = 1280, use_theta: bool = True,
                      use_top_k: bool = True, _trace: list | None = None, advance: Callable | None = None) -> dict:
    """NeMo's initial selection loop (METHODS §7.1.4 step 3, reference ``3_detect_memorized_neurons.py``).

    ``score(sets)`` returns M(B) (a float or a per-sample tensor whose max is M). With ``activations`` None the
    candidate sets are not built (``sets`` = the (θ, k) pair), which :func:`theta_k_schedule` uses.
    ``advance()``, when given, is called after each candidate set is scored (progress; at most
    ``len(theta_k_schedule(...))`` calls). Returns ``{sets, score, tau_ref, theta, k, n_candidates}``.
    """
    # θ is counted in whole steps: θ_i = θ_init − i·Δθ, computed from i (never by repeated subtraction), and it has
    # reached θ_min at step i_min = ⌈(θ_init − θ_min)/Δθ⌉ (with a 1e-9 tolerance on the quotient). The reference
    # decrements a float and stops on θ == θ_min exactly, which holds for Δθ = 0.25 but never for 0.2 or 0.1
    # (5 − 0.2 − … ends at 0.9999999999999978): its loop then runs on to k = k_max (1280 candidate sets instead of
    # 20 or 40). For steps that divide θ_init − θ_min this is the reference's schedule exactly (θ values rounded to
    # 12 decimals); otherwise the last θ evaluated is the smallest one above θ_min.
    if use_theta:
        if not theta_step > 0:
            raise BadInput(f"nemo: theta_step must be > 0, got {theta_step}")
        i_min = max(0, math.ceil((theta_init - theta_min) / theta_step - 1e-9))
    else:
        i_min = -1  # θ = ∞ never reaches θ_min
    i = 0

    def theta_at(i: int) -> float:
        return round(theta_init - i * theta_step, 12) if use_theta else math.inf

    theta = theta_at(0)
    k = k_init if use_top_k else 0
    tau_ref = refinement_threshold
    n = 0
    while True:
        sets = (theta, k) if activations is None else candidate_sets(activations, means, stds, theta, k)
        s = _score_value(score(sets))
        n += 1
        if advance is not None:
            advance()
        if _trace is not None:
            _trace.append((theta, k, s))
        last_theta, last_k, last_i = theta, k, i
        if s > threshold:
            if use_theta and i < i_min:  # θ > θ_min: one step down
                i += 1
                theta = theta_at(i)
            if use_top_k:
                k += 1
            if (i, k) == (last_i, last_k):  # neither θ nor k can move (both ablated): the loop would spin
                tau_ref = s
                break
        if (use_theta and i >= i_min) or k >= k_max:  # θ has reached θ_min, or k its cap
            tau_ref = s
            break
        if s <= threshold:
            break
    return {"sets": sets, "score": s, "tau_ref": tau_ref, "theta": last_theta, "k": last_k, "n_candidates": n}


def refine(sets: Sequence[Sequence[int]], score: Callable, threshold: float, rel_threshold: float = 0.0,
           advance: Callable | None = None) -> list:
    """Layer-wise then neuron-wise refinement (METHODS §7.1.4 steps 4-5, reference ``neuron_refinement``).

    For l from the last layer to the first: drop layer l's neurons if M(B without layer l) < ``threshold``; then for
    each neuron i of each remaining layer (last layer first, stored order): drop i if M(B \\ {i}) < ``threshold``.
    ``rel_threshold`` > 0 replaces M by max_g |(s_g - s_g^all) / (|s_g^all| + 1e-9)| (``--rel_threshold_refinement``),
    s^all = the per-sample scores of the input set, and compares it with ``rel_threshold``.
    ``advance(n=1)``, when given, counts the work done (progress): :func:`refine_total` units in all, one per layer
    test and one per neuron test (a dropped layer's neurons at once).
    """
    import torch

    blocking = [list(s) for s in sets]
    if rel_threshold:
        base = torch.as_tensor(score(blocking), dtype=torch.float64).flatten()
        threshold = rel_threshold

        def value(v):
            v = torch.as_tensor(v, dtype=torch.float64).flatten()
            return float(((v - base) / (base.abs() + 1e-9)).abs().max())
    else:
        value = _score_value
    for l in reversed(range(len(blocking))):
        if not blocking[l]:
            continue
        cand = [list(s) for s in blocking]
        cand[l] = []
        if value(score(cand)) < threshold:
            if advance is not None:
                advance(len(blocking[l]))  # its neurons are not tested one by one
            blocking[l] = []
        if advance is not None:
            advance()
    for l in reversed(range(len(blocking))):
        for neuron in list(blocking[l]):
            cand = [list(s) for s in blocking]
            cand[l].remove(neuron)
            if value(score(cand)) < threshold:
                blocking[l].remove(neuron)
            if advance is not None:
                advance()
    return blocking


def refine_total(sets: Sequence[Sequence[int]]) -> int:
    """The units of work :func:`refine` reports for ``sets``: one per non-empty layer plus one per neuron."""
    return sum(1 for s in sets if len(s)) + sum(len(s) for s in sets)
