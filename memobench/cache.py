"""Content-addressed, atomically written caches: generated images, attack outputs, plugin artifacts.

Layout under the cache directory::

    images/<key[:2]>/<key>.png       + <key>.json  (sidecar: image sha256 and what determined the pixels)
    attacks/<key[:2]>/<key>.safetensors + <key>.json
    artifacts/<plugin>/<key>.<suffix>
    features/<extractor key>/<image sha256[:2]>/<image sha256>.npy  (per-image feature vectors, e.g. SSCD)

A key is the sha256 of the canonical JSON of everything that determines the content (never batch size,
world size or shard). Every write goes to a temporary file in the same directory followed by ``os.replace``,
so a killed process leaves either the old state or the complete new file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .util import sha256_bytes

CACHE_SCHEMA = 1


class CacheError(Exception):
    """A cache entry is unreadable or does not match its recorded hash."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEMOBENCH_CACHE_DIR", Path.home() / ".cache" / "memobench"))


# A folder memobench uses as its cache holds this marker; ``cache clear`` deletes only inside a marked folder, and there
# only memobench's own sections and files (never another program's folders that share the directory).
MARKER = ".memobench-cache"
SECTIONS = ("images", "attacks", "artifacts", "features", "data", "sscd", "fidelity", "tmp", "sd-random-tokenizer")
SECTION_FILES = ("weights_sha.json", "sd-random-identity.json")


def mark_cache_dir(root: str | Path) -> Path:
    """Create ``root`` if needed and write the memobench marker in it (once)."""
    root = Path(root)
    marker = root / MARKER
    if not marker.exists():
        root.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write_text(marker, json.dumps({"memobench_cache": True, "schema": CACHE_SCHEMA,
                                                  "sections": list(SECTIONS)}, sort_keys=True) + "\n")
        except OSError:
            pass  # read-only cache: nothing to clear later either
    return root


def is_memobench_cache(root: str | Path) -> bool:
    return (Path(root) / MARKER).is_file()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_default)


def _default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def key_of(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def memoised(path: str | Path, key: str, compute) -> str:
    """``compute()`` memoised under ``key`` in the JSON file ``path`` (a dict of strings, rewritten atomically; an
    unreadable or unwritable memo only costs recomputation)."""
    path = Path(path)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if key not in known:
        known[key] = compute()
        try:
            atomic_write_text(path, json.dumps(known, indent=1, sort_keys=True))
        except OSError:
            pass
    return known[key]


def write_once_bytes(path: str | Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` atomically unless it already exists; True if this call created it.

    For artifacts that several processes (ranks, shards) may compute at the same time: the first complete file
    wins and is never replaced, so every process that then reads the file uses the same bytes even where the
    computation is not bit-reproducible (GPU kernels). The file appears whole (``os.link`` of a finished temporary
    file); on file systems without hard links it falls back to ``os.replace`` (atomic, last writer wins)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return False
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here
        if path.exists():
            return False
        os.replace(tmp, path)
        return True
    finally:
        if tmp.exists():
            tmp.unlink()


def png_bytes(image: np.ndarray, compress_level: int = 6) -> bytes:
    """Lossless PNG bytes (``compress_level`` 0-9, zlib's; PIL's default 6). The pixels do not depend on it."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG",
                                                                      compress_level=int(compress_level))
    return buf.getvalue()


def read_png(path: str | Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


class ImageCache:
    """Generated images keyed by sample key."""

    def __init__(self, root: str | Path):
        self.root = mark_cache_dir(root) / "images"

    def paths(self, key: str) -> tuple[Path, Path]:
        d = self.root / key[:2]
        return d / f"{key}.png", d / f"{key}.json"

    def has(self, key: str) -> bool:
        png, side = self.paths(key)
        return png.exists() and side.exists()

    def put(self, key: str, image: np.ndarray, meta: dict) -> str:
        png, side = self.paths(key)
        data = png_bytes(image)
        digest = sha256_bytes(data)
        atomic_write_bytes(png, data)
        atomic_write_text(side, json.dumps({**meta, "sample_key": key, "image_sha256": digest}, sort_keys=True))
        return digest

    def _fix(self, key: str) -> str:
        png, side = self.paths(key)
        return f"delete this one entry ({png} and {side}) and re-run: it is regenerated"

    def meta(self, key: str) -> dict:
        _, side = self.paths(key)
        try:
            return json.loads(side.read_text())
        except (OSError, ValueError) as e:
            raise CacheError(f"corrupt cache entry {side}: {e}; {self._fix(key)}") from None

    def _checked_bytes(self, key: str) -> bytes:
        png, _ = self.paths(key)
        meta = self.meta(key)
        try:
            data = png.read_bytes()
        except OSError as e:
            raise CacheError(f"corrupt cache entry {png}: {e}; {self._fix(key)}") from None
        if sha256_bytes(data) != meta.get("image_sha256"):
            raise CacheError(f"corrupt cache entry {png}: sha256 differs from its sidecar; {self._fix(key)}")
        return data

    def check(self, key: str) -> dict:
        """The cheap check of an entry that :meth:`has` found, without reading its PNG: the sidecar parses and records
        an image sha256, and the PNG is not empty. Returns the sidecar. (The PNG's bytes are checked against that
        sha256 whenever the image is read, by :meth:`get`; :meth:`verify` does it now.)"""
        png, side = self.paths(key)
        meta = self.meta(key)
        sha = meta.get("image_sha256") if isinstance(meta, dict) else None
        if not isinstance(sha, str) or len(sha) != 64:
            raise CacheError(f"corrupt cache entry {side}: no image_sha256 recorded; {self._fix(key)}")
        try:
            size = png.stat().st_size
        except OSError as e:
            raise CacheError(f"corrupt cache entry {png}: {e}; {self._fix(key)}") from None
        if size == 0:
            raise CacheError(f"corrupt cache entry {png}: empty file; {self._fix(key)}")
        return meta

    def verify(self, key: str) -> None:
        """Raise :class:`CacheError` unless the entry's PNG matches the sha256 recorded in its sidecar."""
        self._checked_bytes(key)

    def get(self, key: str) -> np.ndarray:
        """The image, decoded from its PNG after checking the bytes against the sidecar's sha256 (a one-line
        :class:`CacheError` naming the file otherwise)."""
        data = self._checked_bytes(key)
        try:
            return read_png(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - matching hash but undecodable: written corrupt
            png, _ = self.paths(key)
            raise CacheError(f"corrupt cache entry {png}: cannot decode ({type(e).__name__}); "
                             f"{self._fix(key)}") from None


class TensorCache:
    """Safetensors blobs (attack outputs, fitted artifacts) with a JSON sidecar."""

    def __init__(self, root: str | Path, kind: str):
        self.root = mark_cache_dir(root) / kind

    def paths(self, key: str) -> tuple[Path, Path]:
        d = self.root / key[:2]
        return d / f"{key}.safetensors", d / f"{key}.json"

    def has(self, key: str) -> bool:
        a, b = self.paths(key)
        return a.exists() and b.exists()

    def put(self, key: str, tensors: dict, meta: dict) -> None:
        from safetensors.torch import save

        a, b = self.paths(key)
        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        atomic_write_bytes(a, data)
        atomic_write_text(b, json.dumps({**meta, "sha256": sha256_bytes(data)}, sort_keys=True))

    def get(self, key: str) -> tuple[dict, dict]:
        from safetensors.torch import load

        a, b = self.paths(key)
        fix = f"delete this one entry ({a} and {b}) and re-run: it is recomputed"
        try:
            meta = json.loads(b.read_text())
            data = a.read_bytes()
        except (OSError, ValueError) as e:
            raise CacheError(f"corrupt cache entry {a}: {e}; {fix}") from None
        if sha256_bytes(data) != meta.get("sha256"):
            raise CacheError(f"corrupt cache entry {a}: sha256 differs from its sidecar; {fix}")
        return load(data), meta


class FeatureCache:
    """Per-image feature vectors of one feature extractor: ``<cache>/features/<key of the extractor's identity>/``,
    one ``.npy`` (float32/64, no pickle) per image sha256, written atomically. Sound only for extractors whose output
    for an image does not depend on the other images of its batch (checked for the onnx SSCD:
    tests/test_sscd.py); a corrupt or unreadable entry reads as missing and is recomputed."""

    def __init__(self, root: str | Path, extractor: dict):
        self.root = mark_cache_dir(root) / "features" / key_of(extractor)[:32]

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}.npy"

    def get(self, digest: str) -> np.ndarray | None:
        try:
            return np.load(self.path(digest), allow_pickle=False)
        except (OSError, ValueError):
            return None

    def put(self, digest: str, vector: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, np.asarray(vector), allow_pickle=False)
        atomic_write_bytes(self.path(digest), buf.getvalue())


def artifact_path(cache_dir: str | Path, model_id: str, plugin: Any, parts: tuple[str, ...], suffix: str) -> Path:
    """Path of a plugin artifact keyed by model identity + plugin name/version/params + ``parts``."""
    ident = plugin.identity() if hasattr(plugin, "identity") else {"name": str(plugin)}
    key = key_of({"schema": CACHE_SCHEMA, "model": model_id, "plugin": ident, "parts": list(parts)})
    p = mark_cache_dir(cache_dir) / "artifacts" / ident["name"] / f"{key}{suffix}"
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def cache_info(cache_dir: str | Path) -> dict:
    root = Path(cache_dir)
    out = {"path": str(root), "exists": root.exists(), "sections": {}}
    if root.exists():
        for sec in sorted(p for p in root.iterdir() if p.is_dir()):
            files = [f for f in sec.rglob("*") if f.is_file()]
            out["sections"][sec.name] = {"files": len(files), "bytes": sum(f.stat().st_size for f in files)}
    return out


def check_clearable(cache_dir: str | Path, section: str | None = None) -> Path:
    """``cache_dir`` as a :class:`~pathlib.Path` if ``cache clear`` may delete ``section`` (None = all sections) there:
    ``section`` is one of :data:`SECTIONS`, and an existing folder carries memobench's marker. Otherwise a one-line
    :class:`CacheError` naming the fix (called before ``memobench cache clear`` asks for confirmation)."""
    root = Path(cache_dir)
    if section is not None and section not in SECTIONS:
        raise CacheError(f"--section: unknown section {section!r}; use one of {', '.join(SECTIONS)}")
    if root.exists() and not is_memobench_cache(root):
        raise CacheError(f"--cache-dir {root}: not a memobench cache (no {MARKER} marker); nothing deleted. Point "
                         "--cache-dir at memobench's cache, or delete that folder yourself")
    return root


def cache_clear(cache_dir: str | Path, section: str | None = None) -> int:
    """Delete memobench's sections (all, or ``section``) of a memobench cache folder; returns the number of files.
    A folder without memobench's marker is refused (:func:`check_clearable`): nothing of another program is deleted,
    and in a marked folder only :data:`SECTIONS` and :data:`SECTION_FILES` are."""
    root = check_clearable(cache_dir, section)
    if not root.exists():
        return 0
    n = 0
    for name in ([section] if section else list(SECTIONS)):
        t = root / name
        if t.is_dir():
            n += sum(1 for f in t.rglob("*") if f.is_file())
            shutil.rmtree(t)
    if section is None:
        for name in SECTION_FILES:
            f = root / name
            if f.is_file():
                f.unlink()
                n += 1
    return n


_TMP_NAME = re.compile(r"^\..+\.tmp(\d+)$")


def clean_stale_tmp(root: str | Path, min_age_s: float = 3600.0) -> int:
    """Delete the temporary files of atomic writes (``.<name>.tmp<pid>``) that a killed process left under ``root``:
    those whose process is not running here and that are older than ``min_age_s`` (a write never takes that long, so
    a writer on another machine sharing the folder is never disturbed). Returns how many were deleted."""
    import time

    root = Path(root)
    if not root.is_dir():
        return 0
    now, n = time.time(), 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            m = _TMP_NAME.match(name)
            if not m:
                continue
            p = Path(dirpath) / name
            try:
                if now - p.stat().st_mtime < min_age_s or _pid_alive(int(m.group(1))):
                    continue
                p.unlink()
                n += 1
            except OSError:
                continue
    return n


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True
