"""FID / KID of the utility generations against real images, computed by torch-fidelity (METHODS §5.2).

One registered metric, ``fidelity`` (``roles = ("utility",)``), computes both distances with
``torch_fidelity.calculate_metrics`` (FID: Heusel et al., NeurIPS 2017; KID: Bińkowski et al., ICLR 2018) between

* the generated images of the utility prompt set, passed **in memory** as a ``torch.utils.data.Dataset`` of uint8 CHW
  tensors (sorted by ``sample_key``; no temp-folder copies, CONVENTIONS §11; each image is read when torch-fidelity's
  loader asks for its batch, so only a batch of pixels is held), and
* the reference images: the union of ``Sample.references`` of those samples, deduplicated by content hash
  (:func:`memobench.api.image_sha256`) and ordered by it, or — with the ``reference_dir`` parameter — every image file
  (png/jpg/jpeg/webp/bmp, not recursive, deduplicated by file sha256) of a folder of real images (e.g. the COCO-2014 val
  images of METHODS §5.2 for Stable Diffusion).

Both sides are centre-cropped to a square and resized to ``image_size`` (512, PIL bicubic) before feature extraction
(METHODS §5.2 step 3, a project decision); images already 512×512 are passed through unchanged.

Feature extractor and metric ids (``feature_extractor`` parameter):

* ``inception-v3-compat`` (what ``auto`` means) — torch-fidelity's TF-Inception port, pool3 2048-d; metric ids
  ``fid`` and ``kid``. Weights, in this order: ``weights_path`` (torch-fidelity's ``feature_extractor_weights_path``);
  memobench's own download ``<cache_dir>/fidelity/weights/weights-inception-2015-12-05-6726825d.pth``;
  torch-fidelity's cached copy (``<torch hub dir>/checkpoints/…``); else, when not offline, memobench downloads
  torch-fidelity's file (``torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3``) itself, atomically, into
  its cache. Every file is checked with ``torch.load(weights_only=True)`` before torch-fidelity sees it (torch-fidelity
  unpickles with ``weights_only=False``) and its sha256 is recorded in ``impl["weights_sha256"]``. Pin:
  ``inception_sha256``. The true sha256 of torch-fidelity's file is not known where this was written (the
  ``6726825d`` in its name follows torch hub's sha256-prefix convention, but torch-fidelity downloads without
  ``check_hash``, so memobench does not rely on it), and none is invented: by default the sha256 of the downloaded
  file is recorded next to it (``….sha256``) and every later use must match it; a user-given ``inception_sha256`` is
  enforced on every source. A mismatch raises :class:`memobench.data.PinMismatchError` (one line, exit 2).
  **Without Inception weights** (offline and none given, or the download failing) ``fid``/``kid`` are
  ``unavailable`` with the reason: ``auto`` never switches to another feature space.
* ``sscd`` — only when asked for (``feature_extractor=sscd``): the SSCD copy-detection descriptor (Pizzi et al.,
  CVPR 2022; :mod:`memobench.sscd`, int8 ONNX ``sscd_disc_mixup``, 512-d, L2-normalised, preset ``sscd_preset``)
  registered with torch-fidelity as ``memobench-sscd``. Metric ids ``fd_sscd`` / ``kd_sscd`` — **never** ``fid``:
  these are Fréchet/kernel distances in another feature space, not comparable with any published FID. (Until
  version 1 of this plugin, ``auto`` fell back to it offline; the committed tiny-model leaderboard's ``fd_sscd``
  columns come from that and are labelled "FD (SSCD features)".)
* any other name registered with torch-fidelity (e.g. ``dinov2-vit-l-14``): ids ``fd_<name>`` / ``kd_<name>``.

COCO reference images (protocol ``coco10k``): ``memobench data fetch coco`` downloads them into a folder with a
``manifest.json`` (id list sha256, per-file sha256); ``reference_dir=<that folder>`` (from the CLI:
``--metric-param fidelity.reference_dir=DIR``) scores against it and records the manifest's id-list sha256 in
``impl["reference"]``.

KID uses torch-fidelity's polynomial kernel (degree 3, γ = 1/d, coef0 = 1) with ``kid_subsets`` = 100 subsets of size
min(``kid_subset_size`` = 1000, n_gen, n_ref) (METHODS §5.2 step 5); its ``dispersion`` is the std over subsets.
Fewer than 2048 images on either side gives a warning string in ``impl["warning"]`` (FID is biased upwards at small
n and not comparable across n); fewer than 2 makes both values ``unavailable``.

Reference-feature cache (CONVENTIONS §7): keyed by a content hash of the reference images (sorted image digests or file
sha256s) + extractor identity (name, weights sha256 or URL, feature layers, preprocessing, torch-fidelity version);
stored as ``<cache_dir>/fidelity/ref-<key>.npz`` (``keys``, per-layer ``features``, FID ``mu``/``sigma``, ``meta``;
written atomically, read with ``allow_pickle=False``). On a hit the extractor is not run on the reference images:
the cached features are fed back into ``calculate_metrics`` through a memoising extractor wrapper
(``memobench-memo+<name>``) that answers by image content. torch-fidelity's own cache (pickled ``.pt``) is disabled.

This module imports neither torch nor torch-fidelity at import time.
"""

from __future__ import annotations

import functools
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from memobench.api import (
    COCO_MANIFEST, BadInput, Context, Metric, MetricInfo, MetricValue, SSCDUnavailableError, Sample,
    atomic_write_bytes, check_pin, dist_version, download_file, file_sha256, hookimpl, image_sha256, key_of, param,
)

__all__ = [
    "CACHE_SCHEMA",
    "FD_MIN_N",
    "INCEPTION",
    "INCEPTION_URL_FILE",
    "SSCD_EXTRACTOR",
    "Fidelity",
    "FidelityUnavailable",
    "metric_ids",
    "register_extractors",
]

INCEPTION = "inception-v3-compat"
INCEPTION_URL_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch_fidelity.feature_extractor_inceptionv3
SSCD_EXTRACTOR = "memobench-sscd"
FD_MIN_N = 2048
CACHE_SCHEMA = 1
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class FidelityUnavailable(RuntimeError):
    """The metric cannot be computed (weights, references or images missing); the message is the reason."""


def _id_part(name: str) -> str:
    """An extractor name as part of a metric id: lower case, every run of other characters one ``_``. Not
    :func:`memobench.api.slug` (a file-name rule that keeps case and ``-.``): metric ids are identifiers in results,
    grids and leaderboards (``fd_dinov2_vit_l14``), and the ids of existing extractors must not change."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower()


def metric_ids(extractor: str, inception_name: str = INCEPTION) -> tuple[str, str]:
    """Metric ids for a feature extractor: ``("fid", "kid")`` only for Inception; ``("fd_sscd", "kd_sscd")``;
    ``("fd_<name>", "kd_<name>")`` for any other torch-fidelity extractor."""
    if extractor == inception_name:
        return "fid", "kid"
    if extractor in ("sscd", SSCD_EXTRACTOR):
        return "fd_sscd", "kd_sscd"
    return f"fd_{_id_part(extractor)}", f"kd_{_id_part(extractor)}"


def display_names(ids: tuple[str, str], extractor: str) -> tuple[str, str]:
    """Column names that say which features produced a distance: "FID"/"KID" only for Inception."""
    if ids == ("fid", "kid"):
        return "FID", "KID"
    feats = "SSCD" if ids == ("fd_sscd", "kd_sscd") else extractor
    return f"FD ({feats} features)", f"KD ({feats} features)"


def register_extractors() -> str:
    """Register memobench's SSCD extractor with torch-fidelity (idempotent) and return its name, ``memobench-sscd``.

    Afterwards ``torch_fidelity.calculate_metrics(..., feature_extractor="memobench-sscd")`` works on its own."""
    from . import _torch

    return _torch.ensure_sscd_extractor()


_SAFE_WEIGHTS: set[str] = set()


def _check_plain_state_dict(path: Path, sha: str) -> None:
    """Refuse a weights file that is not loadable with ``torch.load(weights_only=True)``: torch-fidelity loads
    ``feature_extractor_weights_path`` with ``weights_only=False`` (arbitrary unpickling)."""
    if sha in _SAFE_WEIGHTS or path.suffix == ".safetensors":
        return
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not a plain tensor state dict"
        raise FidelityUnavailable(
            f"weights_path {path} is not a plain tensor state dict (torch.load(weights_only=True) failed: "
            f"{type(e).__name__}); torch-fidelity would unpickle it with weights_only=False, so it is refused"
        ) from None
    _SAFE_WEIGHTS.add(sha)


def _sample_image(s: Sample) -> np.ndarray:
    return s.image  # type: ignore[return-value]


def _nth_reference(s: Sample, i: int) -> np.ndarray:
    return s.references[i]


# ---------------------------------------------------------------------------------------------- the metric
class Fidelity(Metric):
    """FID/KID (or FD/KD in SSCD feature space) of the utility generations vs real images (METHODS §5.2).

    Protocol ``coco10k`` of METHODS §5.2: the 10,000 COCO captions of NeMo (Hintersdorf, Struppek et al., NeurIPS 2024,
    §4), one image per caption per seed, against real COCO images (``reference_dir``), Inception pool features, KID
    subset size min(1000, n) with 100 subsets. NeMo used clean-fid; memobench computes with torch-fidelity
    (``impl["library"]``): values from different libraries/resizers are not comparable (METHODS §5.2 step 6).
    See the module docstring for extractor selection, metric ids and the reference cache.
    """

    name = "fidelity"
    version = "2"  # 2: auto = Inception only (unavailable without weights), never SSCD features
    roles = ("utility",)
    info = MetricInfo("fidelity", "FID / KID", higher_is_better=False, min=None, max=None,
                      description="Fréchet / kernel distance of utility generations to real images, torch-fidelity "
                                  "(METHODS §5.2); ids fid/kid with Inception, fd_sscd/kd_sscd with SSCD features")
    inception_name: ClassVar[str] = INCEPTION  # torch-fidelity registry name treated as "the Inception extractor"
    inception_url: ClassVar[str] = ""  # "" = torch_fidelity's URL_INCEPTION_V3 (tests point it at 127.0.0.1)
    inception_file: ClassVar[str] = INCEPTION_URL_FILE

    @dataclass
    class Params:
        feature_extractor: str = param("auto", "auto (= Inception) | inception-v3-compat | sscd | <torch-fidelity "
                                               "name>")
        weights_path: str = param("", "feature_extractor_weights_path (Inception .pth; SSCD .onnx)")
        inception_sha256: str = param("", "pin of the Inception weights; '' = the sha256 recorded at download is "
                                          "enforced")
        reference_dir: str = param("", "folder of real images; empty = union of Sample.references")
        kid_subsets: int = param(100, "KID subsets drawn (torch-fidelity's kid_subsets)")
        kid_subset_size: int = param(1000, "capped at min(n_gen, n_ref)")
        image_size: int = param(512, "centre-crop to square, resize (METHODS §5.2 step 3, project decision)")
        resample: str = param("bicubic", "PIL filter of that resize [UNPUBLISHED]")
        sscd_preset: str = param("sscd_default", "memobench.sscd preset of the SSCD extractor's resize")
        batch_size: int = param(64, "images per feature-extraction batch")
        rng_seed: int = param(2020, "torch-fidelity's default seed of the KID subset draws")

    # -- extractor resolution ----------------------------------------------------------------------------------
    def _inception_weights(self, ctx: Context) -> dict | None:
        """``{"path", "weights", "weights_sha256", "weights_origin", "weights_pin"}`` of verified Inception weights, or
        None when there are none (offline and nothing given or cached). Raises :class:`PinMismatchError` on a pin
        mismatch and :class:`FidelityUnavailable` when a given file is missing/unsafe or the download fails."""
        p = self.params
        pin = p.inception_sha256.strip().lower() or None
        fix = "use the weights the pin names, or correct the fidelity parameter inception_sha256"

        def verified(path: Path, origin: str, what: str, record: Path | None = None) -> dict:
            sha = file_sha256(path)
            recorded = record.read_text().strip().lower() if record is not None and record.is_file() else None
            if pin:
                check_pin(sha, pin, what, fix)
            elif recorded:
                check_pin(sha, recorded, f"{what} (sha256 recorded at its download in {record})",
                          f"the file changed since it was downloaded: delete {path} and {record} to download it again")
            _check_plain_state_dict(path, sha)
            return {"path": str(path), "weights": str(path), "weights_sha256": sha, "weights_origin": origin,
                    "weights_pin": "inception_sha256" if pin else ("sha256 recorded at download" if recorded else None)}

        if p.weights_path:
            path = Path(p.weights_path).expanduser()
            if not path.is_file():
                raise FidelityUnavailable(f"Inception weights_path {path} does not exist")
            return verified(path, "weights_path", f"Inception weights_path {path}")
        own = Path(ctx.cache_dir) / "fidelity" / "weights" / self.inception_file if ctx.cache_dir is not None else None
        record = own.with_name(own.name + ".sha256") if own is not None else None
        if own is not None and own.is_file():
            return verified(own, "memobench download (cache)", f"cached Inception weights {own}", record)
        if self.inception_name == INCEPTION:
            import torch

            hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL_FILE
            if hub.is_file():
                return verified(hub, "torch-fidelity cache (torch hub)", f"Inception weights {hub}")
        if ctx.offline or own is None:
            return None
        url = self.inception_url
        if not url:
            from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

            url = URL_INCEPTION_V3
        try:
            sha = download_file(url, own, sha256=pin, what=f"Inception weights download {url}", fix=fix)
        except OSError as e:  # URLError, HTTP errors, timeouts
            raise FidelityUnavailable(f"could not download the Inception weights {url} ({type(e).__name__}: {e}); "
                                      f"pass weights_path=<{self.inception_file}>") from None
        tmp = record.with_name(record.name + ".tmp")
        tmp.write_text(sha + "\n")
        tmp.replace(record)
        out = verified(own, f"memobench download of {url}", f"downloaded Inception weights {own}", record)
        out["weights_pin"] = "inception_sha256" if pin else "sha256 recorded at this download"
        return out

    def _resolve(self, ctx: Context) -> dict:
        """The extractor to run: ``{"kind": inception|sscd|other, "inner": torch-fidelity name, "path": weights file
        for torch-fidelity or None, "weights", "weights_sha256", ...}``."""
        p = self.params
        fe = p.feature_extractor
        if fe in ("auto", self.inception_name):
            w = self._inception_weights(ctx)
            if w is None:
                raise FidelityUnavailable(
                    f"no Inception weights offline (fid/kid need {self.inception_file}): pass "
                    f"weights_path=<{self.inception_file}> or run online to download it; feature_extractor=sscd "
                    f"computes fd_sscd/kd_sscd instead (another feature space, never reported as FID)")
            return {"kind": "inception", "inner": self.inception_name, **w}
        if fe in ("sscd", SSCD_EXTRACTOR):
            return {"kind": "sscd", "inner": SSCD_EXTRACTOR, "path": p.weights_path or None}
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        if fe not in FEATURE_EXTRACTORS_REGISTRY:
            raise BadInput(f"fidelity feature_extractor {fe!r} is not registered with torch-fidelity; valid: auto, "
                           f"{INCEPTION}, sscd, {', '.join(sorted(FEATURE_EXTRACTORS_REGISTRY))}")
        path = p.weights_path or None
        if path and not Path(path).is_file():
            raise FidelityUnavailable(f"weights_path {path} does not exist")
        return {"kind": "other", "inner": fe, "path": path, "weights": path or "torch-fidelity default",
                "weights_sha256": file_sha256(path) if path else None}

    # -- references ----------------------------------------------------------------------------------------------
    def _references(self, samples: list[Sample]) -> tuple[list, list[str], dict]:
        """(items, content ids, description): arrays from the samples or files of ``reference_dir``."""
        p = self.params
        if p.reference_dir:
            root = Path(p.reference_dir).expanduser()
            if not root.is_dir():
                raise FidelityUnavailable(f"reference_dir {root} is not a folder")
            files = sorted(f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
            seen: dict[str, Path] = {}
            for f in files:
                seen.setdefault(file_sha256(f), f)
            if not seen:
                raise FidelityUnavailable(f"reference_dir {root} contains no {'/'.join(IMAGE_EXTS)} files")
            ids = sorted(seen)
            desc = {"source": "reference_dir", "reference_dir": str(root), "content_hash": "sha256 of file bytes",
                    "n_files": len(files)}
            manifest = root / COCO_MANIFEST
            if manifest.is_file():  # written by `memobench data fetch coco`
                try:
                    m = json.loads(manifest.read_text(encoding="utf-8"))
                    desc.update({"id_list_sha256": m.get("ids_sha256"), "n_ids": m.get("n_ids"),
                                 "id_list_source": m.get("ids_source"), "n_failed": len(m.get("failed") or {})})
                except (OSError, ValueError):
                    desc["manifest"] = f"{manifest} unreadable"
            return [seen[k] for k in ids], ids, desc
        refs: dict[str, Any] = {}  # digest -> a loader of the image (streamed samples: the pixels are not kept)
        n_listed = 0
        for s in samples:
            for i, r in enumerate(s.references or []):
                n_listed += 1
                refs.setdefault(image_sha256(r), functools.partial(_nth_reference, s, i))
        if not refs:
            raise FidelityUnavailable("no reference images: the utility samples carry no Sample.references and "
                                      "no reference_dir is set")
        ids = sorted(refs)
        return [refs[k] for k in ids], ids, {"source": "Sample.references (union, deduplicated)",
                                             "content_hash": "memobench.api.image_sha256", "n_listed": n_listed}

    # -- cache -----------------------------------------------------------------------------------------------------
    @staticmethod
    def _cache_path(ctx: Context, key: str) -> Path | None:
        if ctx.cache_dir is None:
            return None
        return Path(ctx.cache_dir) / "fidelity" / f"ref-{key}.npz"

    @staticmethod
    def _load_cache(path: Path | None, n_layers: int) -> tuple[list[str], list[np.ndarray]] | None:
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = [str(k) for k in z["keys"]]
                feats = [np.asarray(z[f"features_{i}"]) for i in range(n_layers)]
        except Exception:  # noqa: BLE001 - an unreadable entry is recomputed and overwritten
            return None
        if any(f.shape[0] != len(keys) for f in feats):
            return None
        return keys, feats

    @staticmethod
    def _save_cache(path: Path, keys: list[str], feats: list[np.ndarray], stats: dict, meta: dict) -> None:
        buf = io.BytesIO()
        arrays = {f"features_{i}": np.ascontiguousarray(f, dtype=np.float32) for i, f in enumerate(feats)}
        np.savez(buf, keys=np.array(keys, dtype="U64"), mu=np.asarray(stats["mu"]), sigma=np.asarray(stats["sigma"]),
                 meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
        atomic_write_bytes(path, buf.getvalue())

    # -- compute ---------------------------------------------------------------------------------------------------
    def _unavailable(self, ids: tuple[str, str], reason: str, impl: dict, n: int = 0) -> dict[str, MetricValue]:
        return {k: MetricValue(value=None, n=n, impl=impl, unavailable=reason) for k in ids}

    def compute(self, samples: list[Sample], ctx: Context) -> dict[str, MetricValue]:
        p = self.params
        base_impl = {"name": self.name, "version": self.version,
                     "library": f"torch-fidelity {dist_version('torch-fidelity')}",
                     "requested_feature_extractor": p.feature_extractor}
        fe = p.feature_extractor
        guess_ids = metric_ids(fe if fe != "auto" else self.inception_name, self.inception_name)
        try:
            sel = self._resolve(ctx)
        except FidelityUnavailable as e:
            return self._unavailable(guess_ids, str(e), {**base_impl, "feature_extractor": fe})
        ids = metric_ids(sel["inner"], self.inception_name)
        try:
            return self._compute(samples, ctx, sel, ids, base_impl)
        except (FidelityUnavailable, SSCDUnavailableError) as e:
            return self._unavailable(ids, str(e), {**base_impl, "feature_extractor": sel["inner"]})

    def _compute(self, samples: list[Sample], ctx: Context, sel: dict, ids: tuple[str, str],
                 base_impl: dict) -> dict[str, MetricValue]:
        p = self.params
        gens = sorted(samples, key=lambda s: s.sample_key)
        refs, ref_ids, ref_desc = self._references(samples)
        n_gen, n_ref = len(gens), len(refs)
        impl: dict[str, Any] = {**base_impl, "n_gen": n_gen, "n_ref": n_ref, "reference": ref_desc}
        if n_gen < 2 or n_ref < 2:
            raise FidelityUnavailable(f"FD/KD need at least 2 generated and 2 reference images "
                                      f"(KID subsets, covariance); got n_gen={n_gen}, n_ref={n_ref}")

        import torch
        import torch_fidelity

        from . import _torch

        inner = sel["inner"]
        extra_kwargs: dict[str, Any] = {}
        if sel["kind"] == "sscd":
            _torch.ensure_sscd_extractor()
            extra_kwargs["memobench_sscd_preset"] = p.sscd_preset
            sscd_fe = _torch.SSCDFeatureExtractor(SSCD_EXTRACTOR, ["512"], sel["path"], p.sscd_preset)
            sscd_impl = sscd_fe.impl
            sel = {**sel, "weights": sscd_impl["checkpoint"], "weights_sha256": sscd_impl["weights_sha256"],
                   "sscd": {k: sscd_impl[k] for k in ("checkpoint", "backend", "library", "transform", "preset")}}
            del sscd_fe
        memo_name = _torch.ensure_memo_extractor(inner)
        layer_fid, layer_kid = _torch.feature_layer(inner, "fid"), _torch.feature_layer(inner, "kid")
        layers = sorted({layer_fid, layer_kid})
        cuda = sel["kind"] != "sscd" and str(ctx.device).startswith("cuda") and torch.cuda.is_available()

        identity = {"schema": CACHE_SCHEMA, "plugin": f"{self.name}/{self.version}", "extractor": inner,
                    "weights": sel.get("weights_sha256") or sel.get("weights"), "layers": layers,
                    "image_size": p.image_size, "resample": p.resample,
                    "sscd_preset": p.sscd_preset if sel["kind"] == "sscd" else None,
                    "torch_fidelity": dist_version("torch-fidelity")}
        ref_key = key_of({"references": ref_ids, "extractor": identity})
        cache_path = self._cache_path(ctx, ref_key)
        memo = _torch.FeatureMemo()
        cached = self._load_cache(cache_path, len(layers))
        if cached is not None:
            memo.preload(*cached)

        kid_size = min(int(p.kid_subset_size), n_gen, n_ref)
        # loaders, not pixels: torch-fidelity's DataLoader reads a batch at a time (features kept, images dropped)
        gen_ds = _torch.ImageDataset([functools.partial(_sample_image, s) for s in gens], p.image_size, p.resample)
        ref_ds = _torch.ImageDataset(refs, p.image_size, p.resample)
        with ctx.task(f"{self.name}: {ids[0]}/{ids[1]} ({n_gen} gen, {n_ref} ref)", None):
            # Inception weights are always a verified local file here (memobench downloads them itself), so
            # torch-fidelity never downloads or unpickles an unchecked file
            out = torch_fidelity.calculate_metrics(
                input1=gen_ds, input2=ref_ds, fid=True, kid=True, feature_extractor=memo_name,
                feature_layer_fid=layer_fid, feature_layer_kid=layer_kid,
                feature_extractor_weights_path=sel.get("path"), kid_subsets=int(p.kid_subsets),
                kid_subset_size=kid_size, rng_seed=int(p.rng_seed), batch_size=int(p.batch_size), cuda=cuda,
                cache=False, save_cpu_ram=True, verbose=False, memobench_memo=memo, **extra_kwargs)

        ref_keys = [k for k in ref_ds.keys]
        if any(k is None for k in ref_keys):  # pragma: no cover - torch-fidelity visits every item
            raise RuntimeError("torch-fidelity did not visit every reference image")
        n_ref_extracted = sum(1 for k in set(ref_keys) if k in memo.computed)
        cache_state = "disabled" if cache_path is None else ("hit" if cached is not None and n_ref_extracted == 0
                                                             else "miss")
        if cache_path is not None and cache_state == "miss":
            feats = [memo.stack(ref_keys, layers.index(layer)) for layer in layers]
            stats = _torch.fid_statistics(feats[layers.index(layer_fid)])
            self._save_cache(cache_path, ref_keys, feats, stats,
                             {"identity": identity, "n_ref": n_ref, "reference": ref_desc, "key": ref_key})

        warn = []
        if min(n_gen, n_ref) < FD_MIN_N:
            warn.append(f"small sample: n_gen={n_gen}, n_ref={n_ref} < {FD_MIN_N}; Fréchet distances are biased "
                        f"upwards at small n and not comparable with values computed on other n "
                        f"(METHODS §5.2 uses 10,000 COCO images)")
        if kid_size < int(p.kid_subset_size):
            warn.append(f"KID subset size reduced from {p.kid_subset_size} to min(n_gen, n_ref) = {kid_size}")
        fe_desc = (inner if sel["kind"] != "sscd"
                   else f"sscd ({SSCD_EXTRACTOR}: {sel['weights']}, preset {p.sscd_preset})")
        impl.update({
            "weights_pin": sel.get("weights_pin"),
            "feature_extractor": fe_desc,
            "torch_fidelity_extractor": memo_name,
            "feature_layer": layer_fid,
            "weights": sel.get("weights"),
            "weights_sha256": sel.get("weights_sha256"),
            "weights_origin": sel.get("weights_origin"),
            "kid_subsets": int(p.kid_subsets),
            "kid_subset_size": kid_size,
            "kid_subset_size_requested": int(p.kid_subset_size),
            "kid_kernel": "poly (degree 3, gamma 1/d, coef0 1; torch-fidelity defaults)",
            "rng_seed": int(p.rng_seed),
            "transform": f"centre-crop to square, resize to {p.image_size}x{p.image_size} (PIL {p.resample}) unless "
                         f"already that size; then the extractor's own preprocessing",
            "device": "cuda" if cuda else "cpu",
            "reference_sha256": ref_key,
            "reference_cache": cache_state,
            "reference_cache_path": str(cache_path) if cache_path else None,
            "n_ref_extracted": n_ref_extracted,
            "warning": "; ".join(warn) or None,
        })
        if sel["kind"] == "sscd":
            impl["sscd"] = sel["sscd"]
            impl["note"] = ("Fréchet/kernel distances in SSCD feature space (L2-normalised copy-detection "
                            "descriptors): not FID/KID, not comparable with published values")
        elif sel["kind"] == "inception" and self.inception_name == INCEPTION:
            impl["comparability"] = ("torch-fidelity inception-v3-compat; not interchangeable with clean-fid "
                                     "(NeMo) or pytorch-fid values (METHODS §5.2 step 6)")
        extra = {"n_ref": n_ref, "warning": impl["warning"]}
        fd = float(out[torch_fidelity.KEY_METRIC_FID])
        kd, kd_std = float(out[torch_fidelity.KEY_METRIC_KID_MEAN]), float(out[torch_fidelity.KEY_METRIC_KID_STD])
        names = display_names(ids, sel.get("inner") or sel["kind"])
        return {
            ids[0]: MetricValue(value=fd, n=n_gen, impl=dict(impl), extra=dict(extra), display_name=names[0]),
            ids[1]: MetricValue(value=kd, n=n_gen, impl=dict(impl), extra=dict(extra), display_name=names[1],
                                dispersion={"kind": "std", "value": kd_std, "over": f"{p.kid_subsets} KID subsets"}),
        }


@hookimpl
def register_metrics(register):
    register(Fidelity)
