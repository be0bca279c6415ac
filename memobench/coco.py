"""The COCO-2014 val reference images of METHODS §5.2 (protocol ``coco10k``): :func:`coco_ids_from_annotations` (the
memobench image-id list, see there for the rule) and :func:`fetch_coco` (download, sha256 check, resume; ``memobench
data fetch coco``). Re-exported by :mod:`memobench.data`."""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .data import (MAX_IMAGE_BYTES, DataError, DataNotFoundError, PinMismatchError, _atomic_write_bytes, _one_line,
                   _url_filename, check_pin, download_file)
from .util import file_sha256

# ------------------------------------------------------------------------------------- COCO (METHODS §5.2)
COCO_IMAGE_BASE_URL = "http://images.cocodataset.org/val2014"
COCO_ANNOTATIONS_URL = "http://images.cocodataset.org/annotations/annotations_trainval2014.zip"
COCO_CAPTIONS_MEMBER = "annotations/captions_val2014.json"
COCO_IDS_FILE = "coco10k_val2014_ids.txt"
COCO_MANIFEST = "manifest.json"
MAX_ANNOTATIONS_BYTES = 1 << 30  # the 2014 train+val annotation zip is about 250 MB
COCO_ID_RULE = (
    "memobench coco10k id rule v1: for each caption of NeMo's prompts/coco2014_val_10000.csv in file order, the "
    "COCO-2014 val image ids whose captions_val2014.json caption equals it after collapsing whitespace (else after "
    "also case-folding); the smallest such id not already taken; captions without a match or whose images are all "
    "taken are skipped and counted")


def coco_file_name(image_id: int) -> str:
    """COCO-2014 val file name of an image id: ``COCO_val2014_<12-digit id>.jpg``."""
    return f"COCO_val2014_{int(image_id):012d}.jpg"


def id_list_text(ids: Iterable[int]) -> str:
    """The canonical text of an id list (one decimal id per line, ``\\n`` after each); its sha256 pins the list."""
    return "".join(f"{int(i)}\n" for i in ids)


def id_list_sha256(ids: Iterable[int]) -> str:
    return hashlib.sha256(id_list_text(ids).encode("ascii")).hexdigest()


def read_id_list(path: str | os.PathLike) -> list[int]:
    """Image ids from a text file: one integer per line; blank lines and ``#`` comments are ignored."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataNotFoundError(f"id list {p} does not exist: pass a text file with one COCO image id per line")
    ids: list[int] = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        t = line.split("#", 1)[0].strip()
        if not t:
            continue
        if not t.isdigit():
            raise DataError(f"id list {p} line {n}: {t!r} is not an image id; write one integer id per line")
        ids.append(int(t))
    if not ids:
        raise DataError(f"id list {p} holds no image ids; write one integer id per line")
    return ids


def read_sha256_file(path: str | os.PathLike) -> dict[str, str]:
    """Pins from a ``sha256sum``-format file (``<64 hex>  <file name>`` per line; ``#`` comments ignored)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataNotFoundError(f"sha256 file {p} does not exist: pass a sha256sum-format file (<sha256>  <name>)")
    pins: dict[str, str] = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        t = line.split("#", 1)[0].strip()
        if not t:
            continue
        parts = t.split(None, 1)
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-fA-F]{64}", parts[0]):
            raise DataError(f"sha256 file {p} line {n}: expected '<64 hex digits>  <file name>', got {t!r}")
        pins[Path(parts[1].lstrip("*").strip()).name] = parts[0].lower()
    return pins


def shipped_coco_ids() -> tuple[list[int], str] | None:
    """The id list shipped as package data (``memobench/data/coco10k_val2014_ids.txt``) and its sha256, or None.

    None today: NeMo's CSV carries no image ids (its ``Index`` is a row number, METHODS §2.6) and no copy of COCO's
    ``captions_val2014.json`` was reachable where this release was built, so the list could not be derived here. The
    first :func:`fetch_coco` run with the annotations writes it (with its sha256) next to the images; committed
    under ``memobench/data/`` it becomes the shipped pin."""
    from importlib import resources

    f = resources.files("memobench").joinpath("data", COCO_IDS_FILE)
    if not f.is_file():
        return None
    text = f.read_text(encoding="utf-8")
    ids = [int(t) for t in (x.split("#", 1)[0].strip() for x in text.splitlines()) if t]
    return ids, id_list_sha256(ids)


def coco_annotations_file(source: str | None, cache_dir: str | os.PathLike, offline: bool,
                          sha256: str | None = None, on_bytes: Callable[[int], None] | None = None
                          ) -> tuple[Path, str]:
    """``(path, sha256)`` of COCO's 2014 caption annotations: a local ``captions_val2014.json`` or annotation zip
    (``source``), or the official zip (``source`` None, or any http(s) URL) downloaded once into
    ``<cache_dir>/data/coco/``. No sha256 of the official zip is known offline, so none is invented: the hash of
    what was downloaded is returned (and recorded by the caller); a user-given ``sha256`` pin is enforced."""
    src = source or COCO_ANNOTATIONS_URL
    fix = "use the official COCO-2014 annotations, or drop --annotations-sha256"
    if not src.startswith(("http://", "https://", "file://")):
        p = Path(src).expanduser()
        if not p.is_file():
            raise DataNotFoundError(f"--annotations {p} does not exist: pass captions_val2014.json or "
                                    f"annotations_trainval2014.zip, or leave it out to download {COCO_ANNOTATIONS_URL}")
        return p, check_pin(file_sha256(p), sha256, f"COCO annotations {p}", fix)
    dest = Path(cache_dir).expanduser() / "data" / "coco" / _url_filename(src)
    if dest.is_file():
        return dest, check_pin(file_sha256(dest), sha256, f"cached COCO annotations {dest}",
                               fix + f" (or delete {dest})")
    if offline:
        raise DataNotFoundError(f"COCO annotations {src} are not in {dest.parent} and offline mode is on: pass "
                                f"--annotations <captions_val2014.json or zip>, or run without --offline")
    try:
        sha = download_file(src, dest, sha256=sha256, what=f"COCO annotations download {src}", fix=fix,
                            max_bytes=MAX_ANNOTATIONS_BYTES, on_bytes=on_bytes)
    except (urllib.error.URLError, OSError) as e:
        raise DataNotFoundError(f"could not download {src} ({type(e).__name__}: {e}): pass --annotations "
                                f"<captions_val2014.json or zip>, or check the network") from e
    return dest, sha


def load_coco_captions(path: str | os.PathLike) -> dict:
    """The parsed ``captions_val2014.json`` (from the file itself or from an annotation zip that contains it)."""
    import zipfile

    p = Path(path)
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                names = [n for n in z.namelist() if n.endswith("captions_val2014.json")]
                if not names:
                    raise DataError(f"{p} has no captions_val2014.json: pass COCO's annotations_trainval2014.zip")
                data = json.loads(z.read(names[0]).decode("utf-8"))
        else:
            data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{p} is not readable COCO caption annotations ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{p} has no 'annotations' list: pass COCO's captions_val2014.json")
    return data


def _norm_caption(text: str) -> str:
    return " ".join(str(text).split())


def coco_ids_from_annotations(captions: Sequence[str], annotations: dict) -> dict:
    """The memobench ``coco10k`` reference-image id list (METHODS §5.2 step 3), derived deterministically.

    METHODS names "a pinned list of COCO-2014 val image ids"; NeMo's real-image set is unpublished and its CSV holds
    no image id (``Index`` is the row number). The list is therefore the COCO images *of NeMo's captions*: for each
    caption (file order) the COCO-2014 val image ids whose ``captions_val2014.json`` caption equals it after
    collapsing whitespace, falling back to a case-folded comparison; the smallest id not already taken is used (a
    caption written for several images, or repeated in the CSV, maps to distinct images while there are any).
    Captions without a match, or whose images are all taken, are skipped and reported. Returns ``{"ids", "rows"
    (CSV row of each id), "unmatched_rows", "duplicate_rows", "rule", "sha256"}``."""
    exact: dict[str, set[int]] = {}
    folded: dict[str, set[int]] = {}
    for a in annotations.get("annotations", []):
        try:
            n, i = _norm_caption(a["caption"]), int(a["image_id"])
        except (KeyError, TypeError, ValueError):
            continue
        exact.setdefault(n, set()).add(i)
        folded.setdefault(n.casefold(), set()).add(i)
    used: set[int] = set()
    ids: list[int] = []
    rows: list[int] = []
    unmatched: list[int] = []
    duplicate: list[int] = []
    for row, c in enumerate(captions):
        n = _norm_caption(c)
        cands = exact.get(n) or folded.get(n.casefold())
        if not cands:
            unmatched.append(row)
            continue
        free = [i for i in sorted(cands) if i not in used]
        if not free:
            duplicate.append(row)
            continue
        ids.append(free[0])
        used.add(free[0])
        rows.append(row)
    return {"ids": ids, "rows": rows, "unmatched_rows": unmatched, "duplicate_rows": duplicate, "rule": COCO_ID_RULE,
            "sha256": id_list_sha256(ids)}


def fetch_coco(ids: Sequence[int], out_dir: str | os.PathLike, *, base_url: str = COCO_IMAGE_BASE_URL,
               pins: dict[str, str] | None = None, workers: int = 8, timeout: float = 60.0,
               ids_source: dict | None = None, on_file: Callable[[str, str], None] | None = None) -> dict:
    """Download the COCO-2014 val images ``ids`` into ``out_dir`` as ``COCO_val2014_<12-digit id>.jpg``.

    * ``<base_url>/<file name>`` per image (``base_url`` default: COCO's own server; tests use 127.0.0.1);
    * every file is written atomically (temporary file, sha256 checked, ``os.replace``): a file in ``out_dir`` is
      always complete, so an interrupted fetch **resumes** by skipping the files already there;
    * pins: ``pins`` (file name -> sha256, e.g. from ``--sha256-file``) and, for a file downloaded before, the
      sha256 recorded then in ``out_dir/manifest.json``; a download whose hash differs from its pin is refused with
      :class:`PinMismatchError` (nothing written for it); a file on disk that differs is downloaded again;
    * ``manifest.json`` (written atomically, also when interrupted) records the id list's sha256 and source, the
      sha256 of every file and the failures; ``coco10k_val2014_ids.txt`` is the list itself.

    Failed downloads (HTTP errors, timeouts) are recorded and the others continue. ``on_file(name, state)`` is
    called per image (``present``, ``downloaded``, ``failed``). Returns the manifest plus counts."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    ids = [int(i) for i in ids]
    manifest_path = out / COCO_MANIFEST
    try:
        old = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
    except (OSError, ValueError):
        old = {}
    recorded: dict[str, str] = dict(old.get("files") or {})
    pins = {k: v.strip().lower() for k, v in (pins or {}).items()}
    _atomic_write_bytes(out / COCO_IDS_FILE, id_list_text(ids).encode("ascii"))
    failed: dict[str, str] = {}
    files, todo = _present_files(ids, out, pins, recorded, on_file)
    present = len(files)
    base = base_url.rstrip("/")

    def one(i: int) -> tuple[str, str]:
        name = coco_file_name(i)
        url = f"{base}/{name}"
        pinned_by = "--sha256-file" if name in pins else "manifest.json (first download)"
        return name, download_file(
            url, out / name, sha256=pins.get(name) or recorded.get(name), timeout=timeout, max_bytes=MAX_IMAGE_BYTES,
            what=f"COCO image {name} downloaded from {url}",
            fix=f"the server sent other bytes than the image pinned by {pinned_by}: check --base-url, or correct the "
                f"pin if the upstream file really changed")

    manifest: dict[str, Any] = {}

    def write_manifest() -> None:
        nonlocal manifest
        manifest = {"version": 1, "dataset": "coco2014-val", "base_url": base, "n_ids": len(ids),
                    "ids_file": COCO_IDS_FILE, "ids_sha256": id_list_sha256(ids), "ids_source": ids_source or {},
                    "files": {**recorded, **files}, "failed": failed}
        _atomic_write_bytes(manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8"))

    try:
        downloaded = _download_all(todo, one, workers, files, failed, on_file)
    finally:
        write_manifest()
    return {**manifest, "out_dir": str(out), "n_present": present, "n_downloaded": downloaded,
            "n_failed": len(failed)}


def _present_files(ids: list[int], out: Path, pins: dict[str, str], recorded: dict[str, str],
                   on_file: Callable[[str, str], None] | None) -> tuple[dict[str, str], list[int]]:
    """(file name -> sha256 of the images already in ``out`` that match their pin, or have none; the ids to
    download)."""
    files: dict[str, str] = {}
    todo: list[int] = []
    for i in ids:
        name = coco_file_name(i)
        p = out / name
        if p.is_file():
            got = file_sha256(p)
            want = pins.get(name) or recorded.get(name)
            if not want or got == want:
                files[name] = got
                if on_file is not None:
                    on_file(name, "present")
                continue
        todo.append(i)
    return files, todo


def _download_all(todo: list[int], one: Callable[[int], tuple[str, str]], workers: int, files: dict[str, str],
                  failed: dict[str, str], on_file: Callable[[str, str], None] | None) -> int:
    """Download ``todo`` with ``one(id) -> (name, sha256)`` in ``workers`` threads, recording each in ``files`` or
    ``failed``; a pin mismatch stops everything. Returns the number downloaded."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    downloaded = 0
    ex = ThreadPoolExecutor(max_workers=max(1, int(workers)))
    try:
        futs = {ex.submit(one, i): i for i in todo}
        for f in as_completed(futs):
            name = coco_file_name(futs[f])
            try:
                _, sha = f.result()
            except PinMismatchError:
                raise
            except (urllib.error.URLError, OSError, DataError, ValueError) as e:
                failed[name] = _one_line(f"{type(e).__name__}: {e}")
                if on_file is not None:
                    on_file(name, "failed")
                continue
            files[name] = sha
            failed.pop(name, None)
            downloaded += 1
            if on_file is not None:
                on_file(name, "downloaded")
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
    return downloaded
