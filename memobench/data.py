"""Verified data files and the ground-truth image store (METHODS §2, CONVENTIONS §7 and §13).

Two services for prompt-set plugins:

* :func:`fetch` — a local, sha256-verified copy of a pinned data file (a prompt list at a repository commit).
  Lookup order: an explicit ``local_path``; a file of the same name in the folder(s) named by
  ``MEMOBENCH_DATA_DIR`` (searched recursively); the download cache ``<cache_dir>/data/<sha[:2]>/<sha>-<name>``;
  a download (only when not offline). Every copy is checked against the pinned sha256 before it is used.
* :class:`GroundTruthStore` — training (reference) images downloaded once, stored under their content sha256,
  with a ``key -> sha256`` index. Failed downloads are recorded as *missing*; a placeholder image is never
  substituted (a blank reference would silently turn a copy into a non-copy).
* :func:`download_file` / :func:`check_pin` — one download (atomic, streamed, sha256 computed on the way) and the pin
  check used for every weights file memobench downloads itself (SSCD TorchScript, torch-fidelity's Inception).
  A file whose sha256 differs from a pin is refused with :class:`PinMismatchError` (a :class:`BadInput`: one line
  naming the file, the expected and the actual hash and the fix; the CLI exits with code 2).
* The COCO-2014 val reference images of METHODS §5.2 (protocol ``coco10k``) are in :mod:`memobench.coco`
  (re-exported here).

Errors are :class:`DataError` with a one-line message that names the source and the fix. This module imports
neither torch nor (at import time) numpy/PIL.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import BadInput
from .util import file_sha256

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["DataError", "DataNotFoundError", "DATA_DIR_ENV", "PinMismatchError", "check_pin", "download_file",
           "fetch", "file_sha256", "GroundTruthStore"]  # and, imported on first use, the COCO names (_COCO_NAMES)

DATA_DIR_ENV = "MEMOBENCH_DATA_DIR"
USER_AGENT = "memobench-data/1 (python urllib)"
DOWNLOAD_TIMEOUT_S = 60.0
MAX_DATA_BYTES = 256 << 20  # prompt files are a few MB; refuse anything absurd
MAX_IMAGE_BYTES = 64 << 20
_CHUNK = 1 << 20


class DataError(ValueError):
    """A data file or image could not be obtained or failed verification (one-line message with the fix; the CLI
    prints it and exits with code 2)."""

    def __init__(self, message: str):
        super().__init__(_one_line(message))


class DataNotFoundError(DataError, FileNotFoundError):
    """The data file is absent and cannot be downloaded (offline, missing local path, network failure)."""


class PinMismatchError(DataError, BadInput):
    """A file's sha256 differs from its pin (a user-given one or the one recorded at its first download). A
    :class:`memobench.config.BadInput`, so a run stops with one ``error:`` line and exit code 2 instead of scoring
    with other weights or images than the pinned ones."""


def pin_message(what: str, expected: str, got: str, fix: str) -> str:
    """The one-line refusal: names the file, the expected (pinned) and the actual sha256, and the fix."""
    return f"{what} has sha256 {got}, expected {expected} (pin): {fix}"


def check_pin(got: str, expected: str | None, what: str, fix: str) -> str:
    """``got`` if it equals the pin ``expected`` (no pin: ``got``); else :class:`PinMismatchError`."""
    exp = (expected or "").strip().lower()
    if exp and got.lower() != exp:
        raise PinMismatchError(pin_message(what, exp, got, fix))
    return got


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


# --------------------------------------------------------------------------------------------------- helpers
def _url_filename(url: str) -> str:
    """The last path component of ``url`` (percent-decoded), made safe for a file name."""
    name = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name)
    return name or "data"


def _data_dirs() -> list[Path]:
    raw = os.environ.get(DATA_DIR_ENV, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


def _candidates(name: str) -> list[Path]:
    """Files called ``name`` in the ``MEMOBENCH_DATA_DIR`` folder(s): direct children first, then sub-folders."""
    found: list[Path] = []
    for d in _data_dirs():
        if not d.is_dir():
            continue
        direct = d / name
        if direct.is_file():
            found.append(direct)
        found.extend(p for p in sorted(d.rglob(name)) if p.is_file() and p != direct)
    return found


def _open_url(url: str, timeout: float, headers: dict | None = None):
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
    return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 (http(s) and file URLs are intended)


def _read_url(url: str, timeout: float, max_bytes: int) -> bytes:
    with _open_url(url, timeout) as resp:
        data = resp.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DataError(f"{url} is larger than {max_bytes} bytes")
    return data


def _atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` via a temporary file in the same folder and ``os.replace``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix="-" + target.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def download_file(url: str, dest: str | os.PathLike, *, sha256: str | None = None, what: str | None = None,
                  fix: str = "check the source, or drop the pin to accept the new file",
                  timeout: float = DOWNLOAD_TIMEOUT_S, max_bytes: int | None = None,
                  on_bytes: Callable[[int], None] | None = None, headers: dict | None = None) -> str:
    """Download ``url`` to ``dest`` atomically and return the file's sha256.

    The bytes are streamed into a temporary file in ``dest``'s folder while hashed; only a complete file whose sha256
    matches the pin ``sha256`` (when given) replaces ``dest`` (``os.replace``). A mismatch deletes the temporary file
    and raises :class:`PinMismatchError` naming ``what`` (default: the URL). Network errors propagate (``OSError``
    / ``urllib.error.URLError``); ``on_bytes(n)`` is called for every chunk written (progress)."""
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix="-" + target.name + ".part")
    h = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out, _open_url(url, timeout, headers) as resp:
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise DataError(f"{url} is larger than {max_bytes} bytes")
                h.update(chunk)
                out.write(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
        got = check_pin(h.hexdigest(), sha256, what or f"download {url}", fix)
        os.replace(tmp, target)
        return got
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------------------------ fetch
def fetch(url: str, sha256: str, cache_dir: str | os.PathLike, offline: bool,
          local_path: str | os.PathLike | None = None) -> Path:
    """A verified local copy of the file at ``url`` whose content has hex digest ``sha256``.

    * ``local_path`` given: that file is used (it must exist and match ``sha256``; nothing is downloaded).
    * otherwise a file with the URL's file name under ``$MEMOBENCH_DATA_DIR`` (``os.pathsep``-separated folders,
      searched recursively) is used if one matches ``sha256``; if such files exist but none matches, that is an
      error rather than a silent download (the configured copy differs from the pinned version).
    * otherwise the cached copy ``<cache_dir>/data/<sha256[:2]>/<sha256>-<name>`` (re-verified);
    * otherwise the file is downloaded once (unless ``offline``), verified and moved into the cache atomically.

    Raises :class:`DataError` (:class:`DataNotFoundError` when absent) with a one-line message.
    """
    sha256 = sha256.strip().lower()
    name = _url_filename(url)

    if local_path is not None:
        p = Path(local_path).expanduser()
        if not p.is_file():
            raise DataNotFoundError(f"local data file {p} does not exist (expected {name}, sha256 {sha256}, "
                                    f"from {url}): fix the path or drop it to use the download cache")
        got = file_sha256(p)
        if got != sha256:
            raise DataError(f"local data file {p} has sha256 {got}, expected {sha256} ({url}): use the file "
                            f"at the pinned commit, or pin the sha256 of your copy")
        return p

    found = _candidates(name)
    if found:
        hashes = {p: file_sha256(p) for p in found}
        for p, got in hashes.items():
            if got == sha256:
                return p
        first = found[0]
        raise DataError(f"{first} (found via {DATA_DIR_ENV}) has sha256 {hashes[first]}, expected {sha256} "
                        f"({url}): put the file from the pinned commit there, or unset {DATA_DIR_ENV}")

    target = Path(cache_dir).expanduser() / "data" / sha256[:2] / f"{sha256}-{name}"
    if target.is_file():
        if file_sha256(target) == sha256:
            return target
        target.unlink(missing_ok=True)  # corrupted cache entry: fetch again below

    if offline:
        raise DataNotFoundError(f"{name} (sha256 {sha256}) is not in the cache and offline mode is on: "
                                f"set {DATA_DIR_ENV} to a folder holding {name}, or run without --offline "
                                f"(source: {url})")
    _download(url, sha256, target, name)
    return target


def _download(url: str, sha256: str, target: Path, name: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix="-" + name)
    h = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out, _open_url(url, DOWNLOAD_TIMEOUT_S) as resp:
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                size += len(chunk)
                if size > MAX_DATA_BYTES:
                    raise DataError(f"{url} is larger than {MAX_DATA_BYTES} bytes; expected {name} "
                                    f"(sha256 {sha256})")
                h.update(chunk)
                out.write(chunk)
        got = h.hexdigest()
        if got != sha256:
            raise DataError(f"downloaded {url} has sha256 {got}, expected {sha256}: the upstream file changed "
                            f"or the download was corrupted; set {DATA_DIR_ENV} to a folder holding the pinned {name}")
        os.replace(tmp, target)
    except DataError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:  # URLError/HTTPError/timeouts are OSErrors
        raise DataNotFoundError(f"could not download {url} ({type(e).__name__}: {e}): set {DATA_DIR_ENV} to a "
                                f"folder holding {name} (sha256 {sha256}) or check the network") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------------------------------- ground-truth store
def _decode_image(data: bytes) -> "np.ndarray":
    """Decode image bytes to H×W×3 uint8 RGB (first frame; alpha dropped). Raises ValueError if not an image."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise ValueError(f"not a decodable image ({type(e).__name__}: {e})") from e
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image has unusable shape {arr.shape}")
    return arr


def _is_permanent(exc: BaseException) -> bool:
    """Whether a download failure should be remembered across runs (dead link, not an image) or retried
    next time (timeouts, connection errors, server errors, rate limits)."""
    if isinstance(exc, urllib.error.HTTPError):
        return 400 <= exc.code < 500 and exc.code not in (408, 425, 429)
    if isinstance(exc, urllib.error.URLError):
        return isinstance(exc.reason, FileNotFoundError)  # file:// URL to a missing file
    if isinstance(exc, (DataError, ValueError)):  # too large, not an image, unknown URL type
        return True
    return False


class GroundTruthStore:
    """Training images downloaded once and kept under ``<cache_dir>/groundtruth/``.

    * images: ``objects/<sha[:2]>/<sha>`` — the downloaded bytes, named by their content sha256;
    * ``index.json``: ``{"version": 1, "items": {key: {"url", "sha256", "bytes", "height", "width"}},
      "missing": {key: {"url", "reason", "time"}}}``, written atomically (merged with the file on disk,
      so concurrent processes lose at most a cache entry, never images).

    :meth:`get` returns the image as H×W×3 uint8 or ``None``. A failure is recorded in :attr:`missing` with its
    reason; dead links and undecodable content are remembered in the index (not retried unless
    ``retry_missing=True``), transient failures and offline misses only for this session. A blank or
    placeholder image is never returned in place of a missing one.
    """

    INDEX_VERSION = 1

    def __init__(self, cache_dir: str | os.PathLike, offline: bool = False, *, retry_missing: bool = False,
                 timeout: float = 30.0, max_bytes: int = MAX_IMAGE_BYTES):
        self.root = Path(cache_dir).expanduser() / "groundtruth"
        self.index_path = self.root / "index.json"
        self.offline = bool(offline)
        self.retry_missing = retry_missing
        self.timeout = timeout
        self.max_bytes = max_bytes
        idx = self._read_index()
        self._items: dict[str, dict] = idx["items"]
        self._failed: dict[str, dict] = idx["missing"]
        self._session: dict[str, dict] = {}  # not persisted: offline misses and transient failures

    # ------------------------------------------------------------------------------------------- index
    def _read_index(self) -> dict:
        try:
            idx = json.loads(self.index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"items": {}, "missing": {}}
        except (OSError, ValueError) as e:
            raise DataError(f"ground-truth index {self.index_path} is unreadable ({e}): delete it to rebuild "
                            "(images are kept and re-indexed on the next download)") from e
        return {"items": dict(idx.get("items", {})), "missing": dict(idx.get("missing", {}))}

    def _save(self, changed: str) -> None:
        """Write the index, taking the on-disk version and replacing only entry ``changed``."""
        disk = self._read_index()
        for table, mine in (("items", self._items), ("missing", self._failed)):
            if changed in mine:
                disk[table][changed] = mine[changed]
            else:
                disk[table].pop(changed, None)
        # every change is saved at once, so the merged table is also this process's view (adopting entries
        # that other processes recorded meanwhile)
        self._items, self._failed = disk["items"], disk["missing"]
        payload = {"version": self.INDEX_VERSION, "items": disk["items"], "missing": disk["missing"]}
        _atomic_write_bytes(self.index_path, json.dumps(payload, indent=1, sort_keys=True).encode("utf-8"))

    def _blob(self, sha: str) -> Path:
        return self.root / "objects" / sha[:2] / sha

    # --------------------------------------------------------------------------------------------- api
    def sha256(self, key: str) -> str | None:
        """Content sha256 of the stored image for ``key`` (``None`` if not stored)."""
        item = self._items.get(key)
        return item["sha256"] if item else None

    def path(self, key: str) -> Path | None:
        """File holding the stored bytes of ``key`` (``None`` if not stored)."""
        sha = self.sha256(key)
        if sha is None:
            return None
        p = self._blob(sha)
        return p if p.is_file() else None

    @property
    def missing(self) -> list[dict]:
        """Known missing images: ``[{"key", "url", "reason", "persistent"}]`` sorted by key."""
        out = {k: {"key": k, "url": v.get("url"), "reason": v.get("reason"), "persistent": True}
               for k, v in self._failed.items()}
        out.update({k: {"key": k, "url": v.get("url"), "reason": v.get("reason"), "persistent": False}
                    for k, v in self._session.items()})
        return [out[k] for k in sorted(out)]

    def get(self, key: str, url: str) -> "np.ndarray | None":
        """The image for ``key`` (downloaded from ``url`` on first use), or ``None`` when it is missing."""
        item = self._items.get(key)
        if item is not None and item.get("url") == url:
            p = self._blob(item["sha256"])
            if p.is_file():
                data = p.read_bytes()
                if hashlib.sha256(data).hexdigest() == item["sha256"]:
                    return _decode_image(data)
            # blob deleted or corrupted: fall through and fetch again

        failed = self._failed.get(key)
        if failed is not None and failed.get("url") == url and not self.retry_missing:
            return None

        if self.offline:
            self._session[key] = {"url": url, "reason": "offline and not in the ground-truth store"}
            return None

        try:
            data = _read_url(url, self.timeout, self.max_bytes)
            img = _decode_image(data)
        except Exception as e:  # noqa: BLE001 — every failure becomes a recorded missing item
            reason = _one_line(f"{type(e).__name__}: {e}")
            if _is_permanent(e):
                self._failed[key] = {"url": url, "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
                self._items.pop(key, None)
                self._session.pop(key, None)
                self._save(key)
            else:
                self._session[key] = {"url": url, "reason": reason}
            return None

        sha = hashlib.sha256(data).hexdigest()
        blob = self._blob(sha)
        if not blob.is_file():
            _atomic_write_bytes(blob, data)
        self._items[key] = {"url": url, "sha256": sha, "bytes": len(data),
                            "height": int(img.shape[0]), "width": int(img.shape[1])}
        self._failed.pop(key, None)
        self._session.pop(key, None)
        self._save(key)
        return img


# the COCO helpers live in memobench.coco (imported on first use, so that `from memobench.data import fetch_coco`
# and `memobench.data.COCO_MANIFEST` keep working)
_COCO_NAMES = ("COCO_IMAGE_BASE_URL", "COCO_ANNOTATIONS_URL", "COCO_CAPTIONS_MEMBER", "COCO_IDS_FILE", "COCO_MANIFEST",
               "MAX_ANNOTATIONS_BYTES", "COCO_ID_RULE", "coco_file_name", "id_list_text", "id_list_sha256",
               "read_id_list", "read_sha256_file", "shipped_coco_ids", "coco_annotations_file", "load_coco_captions",
               "coco_ids_from_annotations", "fetch_coco")


def __getattr__(name: str) -> Any:
    if name in _COCO_NAMES:
        from . import coco

        return getattr(coco, name)
    raise AttributeError(f"module 'memobench.data' has no attribute {name!r}")
