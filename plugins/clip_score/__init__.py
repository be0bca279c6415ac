"""CLIP score (prompt alignment) of the utility generations with open_clip (METHODS §5.1).

score(x, c) = ⟨f_I(x) / ‖f_I(x)‖, f_T(c) / ‖f_T(c)‖⟩ — the **raw cosine** of the L2-normalised image and text
features: not multiplied by 100 and not clipped at 0 (unlike torchmetrics' ``CLIPScore`` = 100·max(cos, 0)). The
text c is the sample's prompt text (``Sample.prompt.text``, the original caption), tokenised by open_clip's tokenizer
of the architecture (77 tokens, longer captions truncated).

Variants (``variant`` parameter; METHODS §5.1 table):

* ``nemo2024`` (A_CLIP; the memobench default for mitigation tables) — openai CLIP ViT-B/32 (open_clip ``ViT-B-32``,
  tag ``openai``, QuickGELU); per prompt the **median** over generations, over prompts median ± MAD (raw MAD).
  NeMo (Hintersdorf, Struppek et al., NeurIPS 2024), ``metrics/compute_prompt_alignment.py``: torch's ``median()``,
  which returns the *lower* of the two middle values for an even count (10 generations); ``median="preset"`` reproduces
  that (``"average"`` gives numpy's mean of the two). The reference code ran openai ``clip.load`` in fp16 on CUDA on
  JPEG files; memobench runs open_clip in ``precision`` (fp32) on the generated pixels (recorded in ``impl``).
* ``wen2024`` — open_clip ``ViT-g-14``, ``laion2b_s12b_b42k``; per prompt the **mean** over generations, over prompts
  the mean. Wen et al. (ICLR 2024), ``inference_mem.py`` / ``optim_utils.measure_CLIP_similarity``; MemBench
  ``run_mitigation.py``. Registered a second time as metric ``clip_score_wen2024`` so both can run in one result.

Weights: ``weights_path`` — an open_clip checkpoint file (``.safetensors`` or a tensor state dict, loaded with
``weights_only=True``; the variant's architecture and its tag's preprocessing and QuickGELU setting are used) or a
folder with ``open_clip_config.json`` + weights (open_clip's ``local-dir:`` schema) — else open_clip's cache for the
tag (Hugging Face hub cache or ``~/.cache/clip``; ``cache_dir`` overrides), else, when not offline, open_clip's
download — done by memobench itself (``huggingface_hub.hf_hub_download`` at ``revision`` for hub-hosted tags, an
atomic download into open_clip's ``~/.cache/clip`` for URL-hosted ones), so the file is checked before open_clip
loads it. When the weights cannot be had the metric returns ``MetricValue(value=None, unavailable=<reason>)``,
never a number.

Pins: ``revision`` (a Hugging Face hub commit of the tag's repository; "" = the cached or latest snapshot, whose
commit is recorded in ``impl["revision"]``) and ``weights_sha256`` (the weights file's sha256; for a ``local-dir``
folder, one of its weight files). The true sha256 of the public checkpoints is not known where this was written and
none is invented: by default the sha256 of the file used is recorded in ``impl["weights_sha256"]``; a user-given
``weights_sha256`` that differs refuses the file with one line (:class:`memobench.data.PinMismatchError`, exit 2).

This module imports neither torch nor open_clip at import time.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memobench.api import (
    BadInput, Context, Metric, MetricInfo, MetricValue, Sample, check_pin, dist_version, download_file, file_sha256,
    hookimpl, param, stats,
)

__all__ = [
    "VARIANTS",
    "ClipScore",
    "ClipScoreWen",
    "ClipUnavailable",
    "ClipVariant",
    "lower_median",
    "raw_cosine",
    "reduce_values",
    "summarize",
]


@dataclass(frozen=True)
class ClipVariant:
    """One paper's CLIP-score setup (METHODS §5.1)."""

    name: str
    arch: str  # open_clip architecture name
    pretrained: str  # open_clip pretrained tag
    quick_gelu: bool  # openai checkpoints were trained with QuickGELU
    gen_reduce: str  # per prompt over generations: mean | median
    set_reduce: str  # over prompts: median_mad | mean_std | mean
    median: str  # lower (torch.median) | average (numpy)
    source: str


VARIANTS: dict[str, ClipVariant] = {
    v.name: v for v in (
        ClipVariant("nemo2024", "ViT-B-32", "openai", True, "median", "median_mad", "lower",
                    "NeMo metrics/compute_prompt_alignment.py: clip.load('ViT-B/32'), cosine_similarity, "
                    "torch median over generations, median ± MAD over prompts"),
        ClipVariant("wen2024", "ViT-g-14", "laion2b_s12b_b42k", False, "mean", "mean", "average",
                    "Wen inference_mem.py + optim_utils.measure_CLIP_similarity; MemBench run_mitigation.py: "
                    "mean over generations, mean over prompts"),
    )
}

SCORE = "raw cosine of L2-normalised image and text features (not x100, not clipped)"


class ClipUnavailable(RuntimeError):
    """The CLIP weights cannot be loaded; the message is the reason."""


# ---------------------------------------------------------------------------------------------- pure arithmetic
def raw_cosine(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """Row-wise raw cosine: each row of ``image_features`` ``[N, D]`` against the matching row of
    ``text_features`` ``[N, D]`` (or one text row ``[D]`` / ``[1, D]`` for all), after L2 normalisation, in float64."""
    a = np.atleast_2d(np.asarray(image_features, dtype=np.float64))
    b = np.atleast_2d(np.asarray(text_features, dtype=np.float64))
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def lower_median(values: Sequence[float]) -> float:
    """torch's ``Tensor.median()``: the lower of the two middle values for an even count."""
    a = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if a.size == 0:
        raise ValueError("cannot aggregate an empty list of values")
    return float(a[(a.size - 1) // 2])


def _median(values: Sequence[float], rule: str) -> float:
    if rule == "lower":
        return lower_median(values)
    if rule == "average":
        return stats.reduce(values, "median")
    raise ValueError(f"unknown median rule {rule!r}; valid: lower, average")


def reduce_values(values: Sequence[float], how: str, median: str = "average") -> float:
    """Per-prompt reduction over generations: ``mean`` or ``median`` (``median`` rule ``lower`` or ``average``)."""
    if how == "median":
        return _median(values, median)
    if how == "mean":
        return stats.reduce(values, "mean")
    raise ValueError(f"unknown reduction {how!r}; valid: mean, median")


def summarize(values: Sequence[float], set_reduce: str, median: str = "average") -> tuple[float, dict | None]:
    """Set-level value and dispersion: ``median_mad`` (raw MAD, METHODS §4.5), ``mean_std`` (ddof 0) or ``mean``."""
    if set_reduce == "median_mad":
        med = _median(values, median)
        mad = _median(np.abs(np.asarray(values, dtype=np.float64) - med), median)
        return med, {"kind": "mad", "value": mad, "median_rule": median}
    return stats.summarize(values, set_reduce)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- weights
def _hub_names(hf: str) -> tuple[str, list[str]]:
    """(repository, candidate file names, safetensors first as open_clip.pretrained.download_pretrained_from_hf)."""
    repo, fname = os.path.split(hf)  # open_clip's convention: 'org/name/' = default file name
    fname = fname or "open_clip_pytorch_model.bin"
    names = ["open_clip_model.safetensors"] if fname == "open_clip_pytorch_model.bin" else (
        [fname[:-4] + ".safetensors"] if fname.endswith((".bin", ".pth")) else [])
    return repo, names + [fname]


def _snapshot_revision(path: Path) -> str | None:
    """The commit of a Hugging Face cache file (``…/snapshots/<commit>/<file>``), or None."""
    parts = path.parts
    return parts[-2] if len(parts) >= 3 and parts[-3] == "snapshots" else None


def _cached_weights(cfg: dict, cache_dir: str | None, revision: str | None = None) -> Path | None:
    """open_clip's cached file for a pretrained cfg (HF hub entry first, as open_clip prefers it), or None."""
    hf = cfg.get("hf_hub", "")
    if hf:
        from huggingface_hub import try_to_load_from_cache

        repo, names = _hub_names(hf)
        for n in names:
            r = try_to_load_from_cache(repo, n, cache_dir=cache_dir or None, revision=revision or None)
            if isinstance(r, str) and os.path.isfile(r):
                return Path(r)
        if revision:
            return None  # the URL copy below is not pinned to a hub revision
    url = cfg.get("url", "")
    if url:
        p = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if p.is_file():
            return p
    return None


def _download_weights(cfg: dict, cache_dir: str | None, revision: str | None, sha256: str | None,
                      what: str) -> Path:
    """Download a tag's weights file the way open_clip would (hub first, at ``revision``; else the URL into
    ``~/.cache/clip``), before open_clip loads anything; a ``sha256`` pin is checked on the downloaded file."""
    hf, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    fix = "check the revision, or correct the clip_score parameter weights_sha256"
    if hf:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError

        repo, names = _hub_names(hf)
        last: Exception | None = None
        for n in names:
            try:
                path = Path(hf_hub_download(repo, n, revision=revision or None, cache_dir=cache_dir or None))
            except EntryNotFoundError as e:
                last = e
                continue
            check_pin(file_sha256(path), sha256, f"{what} ({path})", fix)
            return path
        raise ClipUnavailable(f"{what}: none of {', '.join(names)} in hub repository {repo} ({last})")
    if url:
        dest = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        download_file(url, dest, sha256=sha256, what=f"{what} download {url}", fix=fix)
        return dest
    raise ClipUnavailable(f"{what}: open_clip names no download source")


def _is_torchscript(path: str | Path) -> bool:
    """A TorchScript zip archive (has a ``code/`` folder), as openai's ``ViT-B-32.pt``."""
    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        return False
    with zipfile.ZipFile(p) as z:
        return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())


def _dir_weights(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir()
                  if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".npz"))


_MODELS: dict[tuple, tuple] = {}  # the last loaded (model, preprocess, tokenizer), by source identity


# ---------------------------------------------------------------------------------------------- metric
class ClipScore(Metric):
    """CLIP score: raw cosine between each utility generation and its prompt (METHODS §5.1); variants ``nemo2024``
    (NeMo, NeurIPS 2024: ViT-B/32, median over generations, median ± MAD) and ``wen2024`` (Wen et al., ICLR 2024:
    ViT-g-14 laion2b_s12b_b42k, means). ``per_sample`` maps sample keys to cosines, ``extra["per_prompt"]`` prompt
    ids to per-prompt values. See the module docstring for weights and the ``unavailable`` rule."""

    name = "clip_score"
    version = "1"
    roles = ("utility",)
    info = MetricInfo("clip_score", "CLIP score (raw cosine)", higher_is_better=True, min=-1.0, max=1.0,
                      description="raw cosine of L2-normalised CLIP image/prompt features (METHODS §5.1)")

    @dataclass
    class Params:
        variant: str = param("nemo2024", "nemo2024 | wen2024")
        weights_path: str = param("", "open_clip checkpoint file, or a local-dir folder (open_clip_config.json + "
                                      "weights)")
        arch: str = param("", "override the variant's open_clip architecture")
        pretrained: str = param("", "override the variant's pretrained tag")
        cache_dir: str = param("", "open_clip / Hugging Face cache folder (default: theirs)")
        revision: str = param("", "Hugging Face hub commit of the tag's weights ('' = cached/latest; recorded)")
        weights_sha256: str = param("", "pin of the weights file ('' = recorded, not enforced)")
        gen_reduce: str = param("preset", "mean | median | preset")
        set_reduce: str = param("preset", "median_mad | mean_std | mean | preset")
        median: str = param("preset", "lower (torch.median) | average (numpy) | preset")
        precision: str = param("fp32", "open_clip precision")
        batch_size: int = param(32, "images embedded per batch")

    # -- configuration ---------------------------------------------------------------------------------------
    @property
    def variant(self) -> ClipVariant:
        try:
            return VARIANTS[self.params.variant]
        except KeyError:
            raise BadInput(f"unknown CLIP score variant {self.params.variant!r}; valid: {', '.join(VARIANTS)}") \
                from None

    def settings(self) -> dict:
        """The resolved reductions (``preset`` replaced by the variant's values)."""
        p, v = self.params, self.variant
        pick = lambda val, pre: pre if val == "preset" else val  # noqa: E731
        return {"gen_reduce": pick(p.gen_reduce, v.gen_reduce), "set_reduce": pick(p.set_reduce, v.set_reduce),
                "median": pick(p.median, v.median)}

    def _source(self, ctx: Context) -> dict:
        """Where the weights come from: ``{model_name, pretrained, weights, weights_sha256, quick_gelu, ...}``."""
        import open_clip

        p, v = self.params, self.variant
        arch, tag = p.arch or v.arch, p.pretrained or v.pretrained
        cache_dir = p.cache_dir or None
        pin = p.weights_sha256.strip().lower() or None
        fix = "use the weights the pin names, or correct the clip_score parameter weights_sha256"
        cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
        quick_gelu = bool(cfg.get("quick_gelu", False)) if cfg else (v.quick_gelu and arch == v.arch)
        pre = {k: cfg[c] for k, c in (("image_mean", "mean"), ("image_std", "std"),
                                      ("image_interpolation", "interpolation"),
                                      ("image_resize_mode", "resize_mode")) if cfg.get(c) is not None}
        if p.weights_path:
            path = Path(p.weights_path).expanduser()
            if path.is_dir():
                if not (path / "open_clip_config.json").is_file():
                    raise ClipUnavailable(f"weights_path folder {path} has no open_clip_config.json")
                files = _dir_weights(path)
                if not files:
                    raise ClipUnavailable(f"weights_path folder {path} contains no weights file")
                try:
                    model_cfg = json.loads((path / "open_clip_config.json").read_text())["model_cfg"]
                except (ValueError, KeyError, TypeError) as e:
                    raise ClipUnavailable(f"weights_path folder {path}: unreadable open_clip_config.json ({e})") \
                        from None
                shas = {f.name: file_sha256(f) for f in files}
                if pin and pin not in shas.values():
                    check_pin(next(iter(shas.values())), pin, f"CLIP weights in {path}", fix)
                return {"model_name": f"local-dir:{path}", "pretrained": None, "arch": f"local-dir:{path}",
                        "tag": None, "weights": str(path), "quick_gelu": bool(model_cfg.get("quick_gelu", False)),
                        "preprocess": {}, "weights_sha256": shas, "revision": None}
            if not path.is_file():
                raise ClipUnavailable(f"CLIP weights_path {path} does not exist")
            return {"model_name": arch, "pretrained": str(path), "arch": arch, "tag": None, "weights": str(path),
                    "quick_gelu": quick_gelu, "preprocess": pre,
                    "weights_sha256": check_pin(file_sha256(path), pin, f"CLIP weights_path {path}", fix),
                    "preprocess_from_tag": tag if cfg else None, "revision": None}
        if not cfg:
            raise ClipUnavailable(f"open_clip has no pretrained tag {tag!r} for {arch!r} and no weights_path is set")
        cached = _cached_weights(cfg, cache_dir, p.revision or None)
        origin = "open_clip cache"
        if cached is None:
            if ctx.offline:
                where = " or ".join(x for x in (cfg.get("hf_hub"), cfg.get("url")) if x)
                at = f" at revision {p.revision}" if p.revision else ""
                raise ClipUnavailable(f"offline and the {arch}/{tag} CLIP weights ({where}){at} are not in open_clip's "
                                      f"cache; pass weights_path=<open_clip checkpoint file or local-dir folder>")
            try:
                cached = _download_weights(cfg, cache_dir, p.revision or None, pin, f"CLIP weights {arch}/{tag}")
            except OSError as e:  # network / hub errors (requests' errors are OSErrors)
                raise ClipUnavailable(f"could not download the {arch}/{tag} CLIP weights ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
            origin = "downloaded"
        sha = check_pin(file_sha256(cached), pin, f"CLIP weights {arch}/{tag} ({cached})",
                        fix + f" (or delete {cached} to download again)")
        return {"model_name": arch, "pretrained": str(cached), "arch": arch, "tag": tag,
                "weights": f"{arch}/{tag} ({origin}: {cached})", "quick_gelu": quick_gelu,
                "preprocess": pre, "weights_sha256": sha, "revision": _snapshot_revision(cached)}

    def load(self, ctx: Context) -> tuple[Any, Any, Any, dict]:
        """``(model, preprocess, tokenizer, impl)``; raises :class:`ClipUnavailable` with the reason."""
        import open_clip

        p = self.params
        src = self._source(ctx)
        device = str(ctx.device or "cpu")
        ident = (src["model_name"], src["pretrained"], src["quick_gelu"], tuple(sorted(src["preprocess"].items())),
                 p.precision, device, p.cache_dir)
        torchscript = bool(src["pretrained"]) and _is_torchscript(src["pretrained"])
        if ident not in _MODELS:
            try:
                if torchscript:
                    # openai's own JIT file (e.g. ~/.cache/clip/ViT-B-32.pt of the `clip` package, what NeMo
                    # loaded): rebuilt by open_clip from its state dict, never executed as TorchScript
                    with warnings.catch_warnings():  # recent torch marks torch.jit.load as deprecated
                        warnings.simplefilter("ignore", FutureWarning)
                        model = open_clip.load_openai_model(src["pretrained"], precision=p.precision,
                                                            device=device)
                    pre = src["preprocess"]
                    preprocess = open_clip.image_transform(
                        model.visual.image_size, is_train=False, mean=pre.get("image_mean"),
                        std=pre.get("image_std"), resize_mode=pre.get("image_resize_mode"),
                        interpolation=pre.get("image_interpolation"))
                else:
                    model, _, preprocess = open_clip.create_model_and_transforms(
                        src["model_name"], pretrained=src["pretrained"], precision=p.precision, device=device,
                        force_quick_gelu=src["quick_gelu"], cache_dir=p.cache_dir or None, weights_only=True,
                        **src["preprocess"])
                tokenizer = open_clip.get_tokenizer(src["model_name"], cache_dir=p.cache_dir or None)
            except Exception as e:  # noqa: BLE001 - download/offline/format failures become the reason
                raise ClipUnavailable(f"could not load CLIP {src['weights']}: {type(e).__name__}: {e}") from None
            model.eval()
            _MODELS.clear()  # keep one model (ViT-g-14 is ~5 GB in fp32)
            _MODELS[ident] = (model, preprocess, tokenizer)
        model, preprocess, tokenizer = _MODELS[ident]
        impl = {
            "name": self.name, "version": self.version, "variant": self.variant.name,
            "library": f"open_clip {dist_version('open_clip_torch')}", "torch": dist_version("torch"),
            "feature_extractor": f"{src['arch']} ({src['tag'] or 'weights_path'})", "arch": src["arch"],
            "pretrained": src["tag"], "weights": src["weights"], "weights_sha256": src["weights_sha256"],
            "revision": src.get("revision"), "weights_pin": "weights_sha256" if p.weights_sha256 else None,
            "quick_gelu": src["quick_gelu"], "precision": p.precision, "device": device,
            "weights_format": ("openai TorchScript archive (open_clip.load_openai_model)" if torchscript
                               else "open_clip state dict (torch.load weights_only=True / safetensors)"),
            "preprocess_from_tag": src.get("preprocess_from_tag"),
            "transform": " ".join(repr(preprocess).split()),
            "tokenizer": f"open_clip {type(tokenizer).__name__} (context_length "
                         f"{getattr(tokenizer, 'context_length', '?')}, truncating)",
            "text": "Sample.prompt.text", "score": SCORE, "source": self.variant.source, **self.settings(),
        }
        if self.variant.name == "nemo2024":
            impl["note"] = ("NeMo's code ran openai `clip` ViT-B/32 in fp16 on CUDA on JPEG files; memobench runs "
                            f"open_clip in {p.precision} on the generated pixels")
        return model, preprocess, tokenizer, impl

    # -- scoring ---------------------------------------------------------------------------------------------
    def features(self, model, preprocess, tokenizer, images: Sequence[np.ndarray], texts: Sequence[str],
                 device: str) -> tuple[np.ndarray, np.ndarray]:
        """Raw (un-normalised) image and text features as float32 arrays ``[N_img, D]``, ``[N_txt, D]``."""
        import torch
        from PIL import Image

        bs = max(1, int(self.params.batch_size))
        img_out, txt_out = [], []
        with torch.no_grad():
            for s in range(0, len(images), bs):
                batch = torch.stack([preprocess(Image.fromarray(np.ascontiguousarray(im[..., :3])))
                                     for im in images[s:s + bs]]).to(device)
                dtype = next(model.parameters()).dtype
                img_out.append(model.encode_image(batch.to(dtype)).float().cpu().numpy())
            for s in range(0, len(texts), bs):
                tok = tokenizer(list(texts[s:s + bs])).to(device)
                txt_out.append(model.encode_text(tok).float().cpu().numpy())
        return np.concatenate(img_out), np.concatenate(txt_out)

    def _unavailable(self, reason: str) -> dict[str, MetricValue]:
        v = self.variant
        impl = {"name": self.name, "version": self.version, "variant": v.name,
                "library": f"open_clip {dist_version('open_clip_torch')}",
                "arch": self.params.arch or v.arch, "pretrained": self.params.pretrained or v.pretrained,
                "weights": self.params.weights_path or None, "score": SCORE}
        return {self.name: MetricValue(value=None, n=0, impl=impl, unavailable=reason)}

    def compute(self, samples: list[Sample], ctx: Context) -> dict[str, MetricValue]:
        st = self.settings()
        if not samples:
            return self._unavailable("no utility samples to score")
        try:
            model, preprocess, tokenizer, impl = self.load(ctx)
        except ClipUnavailable as e:
            return self._unavailable(str(e))
        ordered = sorted(samples, key=lambda s: (s.prompt.id, s.seed, s.sample_key))
        texts = list(dict.fromkeys(s.prompt.text for s in ordered))
        with ctx.task(f"{self.name} ({self.variant.name})", len(ordered)):
            # a lazy sequence: features() reads one batch of images at a time (features kept, pixels dropped)
            img_f, txt_f = self.features(model, preprocess, tokenizer, Sample.images(ordered), texts,
                                         str(ctx.device or "cpu"))
        t_index = {t: i for i, t in enumerate(texts)}
        cos = raw_cosine(img_f, txt_f[[t_index[s.prompt.text] for s in ordered]])
        per_sample = {s.sample_key: float(c) for s, c in zip(ordered, cos, strict=True)}
        by_prompt: dict[str, list[float]] = {}
        labels: dict[str, str | None] = {}
        for s, c in zip(ordered, cos, strict=True):
            by_prompt.setdefault(s.prompt.id, []).append(float(c))
            labels[s.prompt.id] = s.prompt.mem_type
        per_prompt = {pid: reduce_values(v, st["gen_reduce"], st["median"]) for pid, v in by_prompt.items()}
        value, disp = summarize(list(per_prompt.values()), st["set_reduce"], st["median"])
        groups: dict[str, dict] = {}
        for g in sorted({lab for lab in labels.values() if lab}):
            ids = [pid for pid in per_prompt if labels[pid] == g]
            gv, gd = summarize([per_prompt[i] for i in ids], st["set_reduce"], st["median"])
            groups[g] = {"value": gv, "dispersion": gd, "n": len(ids)}
        groups["all"] = {"value": value, "dispersion": disp, "n": len(per_prompt)}
        extra = {**st, "per_prompt": per_prompt, "n_generations": len(ordered), "n_prompts": len(per_prompt)}
        return {self.name: MetricValue(value=value, n=len(per_prompt), impl=impl, dispersion=disp, groups=groups,
                                       per_sample=per_sample, extra=extra)}


class ClipScoreWen(ClipScore):
    """CLIP score, Wen et al. (ICLR 2024) variant by default: open_clip ViT-g-14 ``laion2b_s12b_b42k``, mean over
    generations, mean over prompts (METHODS §5.1). Same class as ``clip_score``, registered under its own id."""

    name = "clip_score_wen2024"
    info = MetricInfo("clip_score_wen2024", "CLIP score (wen2024, raw cosine)", higher_is_better=True, min=-1.0,
                      max=1.0, description="raw cosine of L2-normalised open_clip ViT-g-14 features (METHODS §5.1)")

    @dataclass
    class Params(ClipScore.Params):
        variant: str = param("wen2024", "preset of the metric: wen2024 (Wen et al.'s CLIP model and reductions) | "
                                        "nemo2024")


@hookimpl
def register_metrics(register):
    register(ClipScore)
    register(ClipScoreWen)
