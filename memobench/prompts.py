"""Prompt files given on the command line (``--prompts my_prompts.txt``) as a prompt set.

Formats: ``.txt`` (one prompt per non-empty line), ``.csv`` (a ``prompt``/``caption``/``text`` column; optional
``id``, ``mem_type``, ``reference`` = path of the training image), ``.jsonl`` (objects with the same keys). UTF-8,
with or without a byte-order mark (stripped: it is never part of a prompt or a column name). A ``reference`` path
(absolute, or relative to the prompt file's folder) must be an image PIL can decode: checked when the file is read,
before any generation.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .api import Prompt, PromptSet
from .config import BadInput

TEXT_KEYS = ("prompt", "caption", "text", "Caption")
FILE_SUFFIXES = (".txt", ".csv", ".jsonl")


def is_prompt_file(spec: str) -> bool:
    """Whether a prompt source given on the command line names a file (a prompt-file suffix or a path separator)
    rather than a registered prompt-set name."""
    return spec.endswith(FILE_SUFFIXES) or os.sep in spec or "/" in spec


def _row_prompt(row: dict, i: int, where: str, option: str) -> Prompt:
    text = next((row[k] for k in TEXT_KEYS if k in row and row[k] is not None), None)
    if not isinstance(text, str) or not text.strip():
        raise BadInput(f"{option}: {where}: no non-empty 'prompt' (or caption/text) field; fix the file")
    ref = row.get("reference") or row.get("reference_image")
    return Prompt(id=str(row.get("id", i)), text=text.strip(), mem_type=row.get("mem_type") or None,
                  reference_ids=(str(ref),) if ref else ())


def _check_reference(prompt: Prompt, base: Path, where: str, option: str) -> None:
    """Each reference of ``prompt`` (a path, relative to ``base``) is a file PIL decodes; else one-line BadInput."""
    for ref in prompt.reference_ids:
        rp = Path(ref) if Path(ref).is_absolute() else base / ref
        if not rp.is_file():
            raise BadInput(f"{option}: {where}: reference {ref!r} not found ({rp}); fix the path (relative to the "
                           "prompt file's folder) or leave the reference empty")
        try:
            from .cache import read_png

            read_png(rp)  # what scoring does with it later: decode to RGB
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, …
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadInput(f"{option}: {where}: reference {ref!r} is not a readable image ({why}); give the path of "
                           "a PNG/JPEG training image or leave the reference empty") from None


def read_prompt_file(path: str | Path, option: str = "--prompts", accepts_names: bool = True) -> list[Prompt]:
    """Prompts of a .txt (one per line), .csv or .jsonl file; errors name ``option``, the input that gave ``path``
    (``accepts_names``: whether that input also takes a prompt-set name, which the not-found hint then offers)."""
    p = Path(path)
    if not p.is_file():
        alt = " or a prompt-set name" if accepts_names else ""
        raise BadInput(f"{option}: file not found: {p}; give an existing .txt/.csv/.jsonl file{alt}")
    try:
        text = p.read_text(encoding="utf-8-sig")  # a leading byte-order mark is dropped (any of the three formats)
    except UnicodeDecodeError:
        raise BadInput(f"{option}: {p} is not UTF-8 text; save it as UTF-8") from None
    out: list[Prompt] = []
    if p.suffix == ".txt":
        out = [Prompt(id=str(i), text=line.strip()) for i, line in enumerate(text.splitlines()) if line.strip()]
    elif p.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"{option}: {p} line {n}: invalid JSON ({e.msg}); one JSON object per line") from None
            if not isinstance(row, dict):
                raise BadInput(f"{option}: {p} line {n}: expected a JSON object with a 'prompt' key")
            out.append(_row_prompt(row, len(out), f"{p} line {n}", option))
            _check_reference(out[-1], p.parent, f"{p} line {n}", option)
    elif p.suffix == ".csv":
        try:
            dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
        except csv.Error:
            dialect = csv.excel
        reader = csv.DictReader(text.splitlines(), dialect=dialect)
        if not reader.fieldnames or not any(k in reader.fieldnames for k in TEXT_KEYS):
            raise BadInput(f"{option}: {p} has no 'prompt' (or caption/text) column; header: {reader.fieldnames}")
        for n, row in enumerate(reader, 2):
            out.append(_row_prompt(row, len(out), f"{p} line {n}", option))
            _check_reference(out[-1], p.parent, f"{p} line {n}", option)
    else:
        raise BadInput(f"{option}: unsupported file type {p.suffix!r}; use .txt, .csv or .jsonl")
    if not out:
        raise BadInput(f"{option}: {p} contains no prompts")
    ids = [q.id for q in out]
    if len(set(ids)) != len(ids):
        raise BadInput(f"{option}: {p} has duplicate ids; make the 'id' column unique")
    return out


def register_prompt_file(reg, path: str | Path) -> str:
    """Register a prompt file as a prompt set named ``file:<path>`` and return that name."""
    prompts = read_prompt_file(path)
    p = Path(path).resolve()
    digest = hashlib.sha256(p.read_bytes()).hexdigest()

    @dataclass
    class _Params:
        pass

    class FilePromptSet(PromptSet):
        """Prompts read from a user file."""

        name = f"file:{p.name}"
        version = digest[:12]
        Params = _Params

        def prompts(self, ctx):
            return prompts

        def reference_image(self, prompt, ref_id, ctx):
            from .cache import read_png

            rp = Path(ref_id) if Path(ref_id).is_absolute() else p.parent / ref_id
            return read_png(rp) if rp.is_file() else None

        def provenance(self):
            return {"path": str(p), "sha256": digest}

    from .registry import Entry

    reg.entries["prompt_set"][FilePromptSet.name] = Entry(FilePromptSet, "prompt_set", FilePromptSet.name,
                                                          "command line", None, FilePromptSet.version,
                                                          exact_origin=str(p))
    return FilePromptSet.name
