"""Small helpers with one job each, shared by the core and (through :mod:`memobench.api`) by plugins.

Each exists once: a file name from a plugin name (:func:`slug`), an installed package's version
(:func:`dist_version`), the sha256 of a file (:func:`file_sha256`), of an image (:func:`image_sha256`) and of bytes
(:func:`sha256_bytes`). Atomic writes and the cache folder live in :mod:`memobench.cache`.
"""

from __future__ import annotations

import hashlib
import math
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["dist_version", "file_sha256", "image_sha256", "sha256_bytes", "slug"]


def slug(s: str, max_len: int | None = None) -> str:
    """``s`` made safe as one file-name component: letters, digits and ``-_.`` kept, anything else ``_``
    (the names of result folders: ``<model>/<mitigation>__<attack>``); cut to ``max_len`` characters if given."""
    out = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(s))
    return out[:max_len] if max_len else out


def dist_version(dist: str) -> str | None:
    """Version of the installed distribution ``dist`` (e.g. ``"torch-fidelity"``), ``None`` when not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_FILE_SHA: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (memoised by resolved path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_SHA:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _FILE_SHA[key] = h.hexdigest()
    return _FILE_SHA[key]


def image_sha256(image: np.ndarray) -> str:
    """sha256 of an H×W×C image's shape and raw uint8 pixels (what results record as ``image_sha256`` and
    ``reference_sha256``, and the key of per-image caches)."""
    import numpy as np

    a = np.ascontiguousarray(image, dtype=np.uint8)
    return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()


def latent_elements(shape: str, what: str = "reference_latent") -> int:
    """Elements of a ``"CxHxW"`` latent shape ("4x64x64" → 16384): the reference tensor a plugin puts its norms on
    (a threshold set for SD v1.4's 64×64 latents); a BadInput naming ``what`` (e.g. "mitigation 'wen' parameter
    reference_latent") for anything else."""
    from .config import BadInput

    try:
        dims = [int(v) for v in str(shape).lower().split("x")]
    except ValueError:
        dims = []
    if len(dims) != 3 or min(dims) < 1:
        raise BadInput(f"{what}={shape!r}: must be CxHxW, e.g. 4x64x64")
    return dims[0] * dims[1] * dims[2]


def reference_scale(numel: int, reference_numel: int) -> float:
    """√(N_ref / N): multiplies an L2 norm over N elements to put it on a reference tensor of N_ref elements (the
    value that norm takes for the same root-mean-square difference); exactly 1.0 when N = N_ref."""
    return 1.0 if int(numel) == int(reference_numel) else math.sqrt(int(reference_numel) / int(numel))
