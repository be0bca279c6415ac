"""Loading: every result file under the results directory, validated, migrated to the current schema, with local
paths redacted and non-finite numbers replaced (what the site shows and copies), and its samples file."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..config import BadInput
from .declared import attack_canonical, attack_is_identity

#: result schema versions this module reads, each with its migration to the current shape (additive changes only:
#: the runner's ``RESULT_SCHEMA`` must be listed here; a test checks it).
MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: lambda d: d}


@dataclass
class Result:
    """One result file."""

    rel: str  # path relative to the results directory, '/'-separated
    path: Path
    raw: bytes
    data: dict  # validated, migrated, local paths redacted, non-finite numbers replaced by null (see _clean)
    samples: list[dict] | None = None  # rows of the samples file (None: no samples file)
    copy: bytes = b""  # what runs/<rel> holds: the raw bytes, or strict JSON when _clean changed anything

    @property
    def model(self) -> str:
        return str(self.data["model"]["plugin"]["name"])

    @property
    def mitigation(self) -> str:
        return str(self.data["mitigation"]["name"])

    @property
    def attack(self) -> str:
        """The attack's name; for the identity attack its registered name (an alias such as ``prompt`` resolves)."""
        name = str(self.data["attack"]["name"])
        return attack_canonical(name) if self.is_identity else name

    @property
    def is_identity(self) -> bool:
        """Whether the attack is the identity (no attack), as its installed plugin declares (``is_identity``)."""
        return attack_is_identity(str(self.data["attack"]["name"]))

    def sibling(self, key: str) -> Path | None:
        """A file the result names (``samples_file``, ``grid_file``, …) in its own directory, if it exists."""
        name = self.data.get(key)
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
            return None
        p = self.path.parent / name
        return p if p.is_file() else None


def _need(data: dict, dotted: str, rel: str, results_dir: Path, kind: type | tuple = (str, int, float)) -> Any:
    cur: Any = data
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            cur = None
            break
        cur = cur[part]
    if cur is None or not isinstance(cur, kind) or (isinstance(cur, str) and not cur):
        raise BadInput(f"--results: {results_dir / rel} is not a complete memobench result ('{dotted}' is missing "
                       f"or invalid); re-run that pairing or move the file out of {results_dir}")
    return cur


def _series(version: str) -> str:
    """Compatibility series of a memobench version: '0.y' before 1.0 (minor bumps break), else the major."""
    parts = str(version).split(".")
    return f"0.{parts[1] if len(parts) > 1 else 0}" if parts[0] == "0" else parts[0]


def _read_samples(r: "Result") -> None:
    sp = r.sibling("samples_file")
    if sp is None:
        return
    try:
        r.samples = [json.loads(line) for line in sp.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise BadInput(f"--results: cannot read {sp} ({e}); fix or remove that file") from None
    if not all(isinstance(x, dict) for x in r.samples):
        raise BadInput(f"--results: {sp} has a line that is not a JSON object; fix or remove that file")


def _read_one(root: Path, p: Path) -> "Result":
    rel = p.relative_to(root).as_posix()
    current = max(MIGRATIONS)
    try:
        raw = p.read_bytes()
        data = json.loads(raw)
    except (OSError, ValueError) as e:
        raise BadInput(f"--results: cannot read {p} ({e}); fix or remove that file") from None
    if not isinstance(data, dict) or "schema_version" not in data:
        raise BadInput(f"--results: {p} is not a memobench result (no schema_version); move it out of {root}")
    v = data["schema_version"]
    if not isinstance(v, int) or isinstance(v, bool) or v not in MIGRATIONS:
        if isinstance(v, int) and v > current:
            raise BadInput(f"--results: {p} has result schema {v}, newer than this memobench reads "
                           f"({', '.join(map(str, sorted(MIGRATIONS)))}); upgrade memobench")
        raise BadInput(f"--results: {p} has unknown result schema {v!r} (this memobench reads "
                       f"{', '.join(map(str, sorted(MIGRATIONS)))}); re-run that pairing")
    data = MIGRATIONS[v](data)
    for key in ("model.plugin.name", "mitigation.name", "attack.name", "status"):
        _need(data, key, rel, root)
    _need(data, "metrics", rel, root, dict)
    if "metrics_without_attack" in data and not isinstance(data["metrics_without_attack"], dict):
        raise BadInput(f"--results: {p}: 'metrics_without_attack' is not an object; re-run that pairing")
    for k in ("metrics", "metrics_without_attack"):
        for name, rec in (data.get(k) or {}).items():
            if not isinstance(rec, dict):
                raise BadInput(f"--results: {p}: {k}.{name} is not a metric record; re-run that pairing")
    data, copy = clean_result(raw, data)
    r = Result(rel, p, raw, data, copy=copy)
    _read_samples(r)
    return r


def load_results(results_dir: str | Path) -> list[Result]:
    """Every result JSON under ``results_dir`` (sorted by path), validated and migrated to the current schema."""
    from .detection import is_detect_path

    root = Path(results_dir)
    if not root.is_dir():
        raise BadInput(f"--results: not a directory: {root}; pass the folder `memobench run` wrote results to")
    out: list[Result] = []
    for p in sorted(root.rglob("*.json"), key=lambda q: q.relative_to(root).as_posix()):
        rel = p.relative_to(root).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts) or not p.is_file():
            continue  # temporary files of an interrupted atomic write, hidden folders
        if is_detect_path(rel):
            continue  # `memobench detect` results (<model>/detect/): the detection track's (.detection)
        out.append(_read_one(root, p))
    if not out:
        raise BadInput(f"--results: no result JSONs under {root}; run `memobench run` (or the matrix) first")
    series: dict[str, Result] = {}
    for r in out:
        series.setdefault(_series(str(r.data.get("memobench_version", "?"))), r)
    if len(series) > 1:
        (s1, a), (s2, b) = list(series.items())[:2]
        raise BadInput(f"--results: results of incompatible memobench versions are mixed: {a.path} "
                       f"({a.data.get('memobench_version')}) and {b.path} ({b.data.get('memobench_version')}); "
                       f"re-run the older results with one memobench version, or build from separate directories")
    return out


# ================================================================================================ cleaning
#: an absolute path inside a string: a ``file:`` URI, POSIX (``/a/b``: two components at least, not preceded by a
#: word character, ``.``, ``:`` or ``/``, so neither a URL nor ``1/d`` or ``mean/std``), home-relative (``~/a``),
#: Windows (``C:\\a``) or UNC (``\\\\server\\share``)
_ABS_PATH = re.compile(r"""file://[^\s"'<>]*|(?<![\w/.:~\\-])"""
                       r"""(?:~(?=/)|[A-Za-z]:(?=[\\/])|\\(?=\\)|(?=/[^\s/"'<>;,]+/[^\s/"'<>;,]))"""
                       r"""(?:[\\/][^\s/\\"'<>;,]+)+[\\/]?""")
NONFINITE_TOKENS = {"nan": "NaN", "inf": "+inf", "+inf": "+inf", "infinity": "+inf", "+infinity": "+inf",
                    "-inf": "-inf", "-infinity": "-inf"}


def redact_paths(text: str) -> str:
    """``text`` with every absolute path replaced by ``<local path>/<last component>`` (``<local path>`` alone for a
    path of fewer than three components, whose last part may be a user name)."""
    def sub(m: re.Match) -> str:
        path = m.group(0)
        tail = path[len(path.rstrip(".:)]}'")):]  # punctuation after the path belongs to the sentence
        path = path[:len(path) - len(tail)]
        path = path.removeprefix("file://")
        parts = [q for q in re.split(r"[\\/]", path) if q and q != "~"]
        if parts and re.fullmatch(r"[A-Za-z]:", parts[0]):
            parts = parts[1:]
        return "<local path>" + (f"/{parts[-1]}" if len(parts) >= 3 else "") + tail
    return _ABS_PATH.sub(sub, text) if ("/" in text or "\\" in text) else text


def _token(v: float) -> str:
    return "NaN" if math.isnan(v) else "+inf" if v > 0 else "-inf"


def _clean(obj: Any, ptr: str, found: dict[str, str]) -> tuple[Any, bool]:
    """``obj`` with local paths redacted and non-finite floats replaced by ``None`` (each recorded in ``found`` by
    JSON pointer; a record whose ``value`` was non-finite gets ``"non_finite": token``); and whether it changed."""
    if isinstance(obj, float) and not math.isfinite(obj):
        found[ptr] = _token(obj)
        return None, True
    if isinstance(obj, str):
        t = redact_paths(obj)
        return t, t != obj
    if isinstance(obj, list):
        out, changed = [], False
        for i, x in enumerate(obj):
            y, c = _clean(x, f"{ptr}/{i}", found)
            out.append(y)
            changed |= c
        return out, changed
    if isinstance(obj, dict):
        d, changed = {}, False
        for k, x in obj.items():
            y, c = _clean(x, f"{ptr}/{str(k).replace('~', '~0').replace('/', '~1')}", found)
            d[k] = y
            changed |= c
        v = obj.get("value")
        if isinstance(v, float) and not math.isfinite(v) and "non_finite" not in obj:
            d["non_finite"] = _token(v)
        return d, changed
    return obj, False


def clean_result(raw: bytes, data: dict) -> tuple[dict, bytes]:
    """The result as the leaderboard shows it, and the bytes of its ``runs/`` copy (strict JSON)."""
    found: dict[str, str] = {}
    clean, changed = _clean(data, "", found)
    if not changed:
        return data, raw
    if found:
        clean["non_finite_values"] = {**(clean.get("non_finite_values") or {}), **found} \
            if isinstance(clean.get("non_finite_values"), dict) else found
    return clean, json.dumps(clean, indent=1, sort_keys=True, allow_nan=False).encode()
