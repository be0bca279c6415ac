"""Images the site shows, content-addressed by the sha256 the samples file records: from the previous build, the
cache, or cut out of the run's grid PNG (:class:`memobench.grid.GridLayout`, the geometry the runner drew it with);
whichever has an image, the bytes are the same, because every candidate is checked against the recorded sha256.
Also the comparison grid of a row (training original | mitigation alone | mitigation + attack)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache import sha256_bytes
from ..grid import GridLayout
from .load import Result
from .rows import Row
from .values import _num

#: the runner's grid geometry (every crop is checked against the recorded sha256, so a changed layout yields "not
#: available", never a wrong image)
GRID = GridLayout()
MAX_PROMPTS = GRID.max_prompts  # prompts shown per detail page and loss plot (the runner's grid shows as many)


def _png(arr) -> bytes:
    from ..cache import png_bytes

    return png_bytes(arr)


def _decode(path: Path):
    try:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception:
        return None


def _seed(s: dict) -> int:
    return s.get("seed") if isinstance(s.get("seed"), int) else 0


class Images:
    """Images shown by the site, content-addressed: ``img/s/<image sha256>.png`` holds exactly the bytes whose sha256
    the samples file records. Sources, in order: the previous build, the cache, a crop of the run's grid PNG."""

    def __init__(self, results_dir: Path, reuse_dir: Path | None, cache_dir: Path | None):
        self.results_dir = results_dir
        self.reuse_dir = reuse_dir
        self.cache_dir = cache_dir
        self.files: dict[str, bytes] = {}
        self._grids: dict[tuple[str, str], dict] = {}
        self.refs: dict[tuple[str, str], str] = {}  # (prompt set, prompt id) → rel path of the training original

    def _verified(self, path: Path, sha: str) -> bytes | None:
        try:
            data = path.read_bytes()
        except OSError:
            return None
        return data if sha256_bytes(data) == sha else None

    def sample(self, res: Result, grid_key: str, row: dict) -> str | None:
        sha = row.get("image_sha256")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            return None
        rel = f"img/s/{sha}.png"
        if rel in self.files:
            return rel
        data = self._verified(self.reuse_dir / rel, sha) if self.reuse_dir else None
        ip = row.get("image_path")
        if data is None and self.cache_dir and isinstance(ip, str) and not Path(ip).is_absolute() \
                and ".." not in Path(ip).parts:
            data = self._verified(self.cache_dir / ip, sha)
        if data is None:
            data = self.grid(res, grid_key)["cells"].get(row.get("sample_key"))
        if data is None:
            return None
        self.files[rel] = data
        return rel

    def grid(self, res: Result, grid_key: str) -> dict:
        """Cells of a run's grid PNG (``grid_file``: target rows; ``grid_without_attack_file``: mitigated rows),
        each checked against the sha256 the samples file records: {"cells": {sample_key: png}, "refs": {…}}."""
        k = (res.rel, grid_key)
        if k in self._grids:
            return self._grids[k]
        out: dict = {"cells": {}, "refs": {}}
        self._grids[k] = out
        path = res.sibling(grid_key)
        role = "target" if grid_key == "grid_file" else "mitigated"
        rows = [s for s in res.samples or () if s.get("role") == role]
        canvas = _decode(path) if path is not None and rows else None
        if canvas is None:
            return out
        by: dict[str, list[dict]] = {}
        for s in rows:
            by.setdefault(str(s.get("prompt_id")), []).append(s)
        prompts = list(by.values())[:GRID.max_prompts]
        n_cols = 1 + min(GRID.max_seeds, max(len(r) for r in prompts))
        found = GRID.locate(canvas.shape[1], canvas.shape[0], len(prompts), n_cols)
        if found is None:
            return out
        cell, scored = found
        step = GRID.scale
        for i, r in enumerate(prompts):
            ok = False
            for j, s in enumerate(sorted(r, key=_seed)[:GRID.max_seeds]):
                x, y = GRID.origin(cell, i, 1 + j, scored)
                data = _png(canvas[y:y + cell:step, x:x + cell:step])
                if sha256_bytes(data) == s.get("image_sha256"):
                    out["cells"][s.get("sample_key")] = data
                    ok = True
            if ok and (r[0].get("n_references") or 0) > 0:  # layout confirmed on this row: the original is right
                x, y = GRID.origin(cell, i, 0, scored)
                out["refs"][str(r[0].get("prompt_id"))] = _png(canvas[y:y + cell:step, x:x + cell:step])
        return out

    def reference(self, res: Result, prompt_id: str) -> str | None:
        """The training original of a target prompt, from any grid of a result on the same prompt set."""
        pset = str((res.data.get("prompt_set") or {}).get("name"))
        return self.refs.get((pset, prompt_id))

    def collect_references(self, results: list[Result]) -> None:
        for res in results:  # sorted by path: the first grid that has an original supplies it
            pset = str((res.data.get("prompt_set") or {}).get("name"))
            for gk in ("grid_file", "grid_without_attack_file"):
                if not any(s.get("n_references") for s in res.samples or ()):
                    continue
                for pid, data in self.grid(res, gk)["refs"].items():
                    if (pset, pid) not in self.refs:
                        rel = f"img/ref/{sha256_bytes(data)}.png"
                        self.files[rel] = data
                        self.refs[(pset, pid)] = rel


@dataclass
class Comparison:
    """The image grid of one row: per target prompt, the training original, the mitigation alone and (for an
    attack) the mitigation + attack, for the first common seed."""

    headers: list[str]
    rows: list[dict]  # {prompt_id, text, mem_type, seed, cells: [(rel or None, caption)]}
    n_prompts: int


def _pick(samples: list[dict], pid: str, seed: int | None) -> dict | None:
    for s in samples:
        if str(s.get("prompt_id")) == pid and s.get("seed") == seed:
            return s
    return None


def comparison(w: Row, partner: Row | None, images: Images, score: tuple[str, str] | None) -> Comparison | None:
    """``partner``: the row of the same mitigation without attack (its images fill the middle column when the
    result has no mitigated samples of its own); ``score``: (metric id, display name) of the per-sample value
    shown under each image (the grid score the plugins declare)."""
    res = w.res
    samples = res.samples or []
    own = [s for s in samples if s.get("role") == w.role]
    if not own:
        return None
    mit_src: tuple[Result, str, list[dict]] | None = None
    if w.attacked and any(s.get("role") == "mitigated" for s in samples):
        mit_src = (res, "grid_without_attack_file", [s for s in samples if s.get("role") == "mitigated"])
    elif w.attacked and partner is not None and partner.res.samples:
        mit_src = (partner.res, partner.grid_key, [s for s in partner.res.samples if s.get("role") == partner.role])
    order: list[str] = []
    first: dict[str, dict] = {}
    for s in own:
        pid = str(s.get("prompt_id"))
        if pid not in first:
            order.append(pid)
            first[pid] = s
    headers = ["training original", f"mitigation {w.mitigation}" + (" (no attack)" if w.attacked else "")]
    if w.attacked:
        headers.append(f"mitigation {w.mitigation} + attack {w.attack}")
    out = []
    for pid in order[:MAX_PROMPTS]:
        seeds = sorted({s.get("seed") for s in own if str(s.get("prompt_id")) == pid and isinstance(s.get("seed"), int)})
        seed = seeds[0] if seeds else None
        s0 = _pick(own, pid, seed)
        ref = images.reference(res, pid)
        cells: list[tuple[str | None, str]] = [(ref, "training image" if ref else "not available")]
        if w.attacked:
            m = _pick(mit_src[2], pid, seed) if mit_src else None
            cells.append((images.sample(mit_src[0], mit_src[1], m) if m and mit_src else None,
                          _caption(m, score) if m else "no run of the mitigation alone"))
        cells.append((images.sample(res, w.grid_key, s0) if s0 else None, _caption(s0, score)))
        out.append({"prompt_id": pid, "text": str(first[pid].get("prompt") or ""),
                    "mem_type": first[pid].get("mem_type"), "seed": seed, "cells": cells})
    return Comparison(headers, out, len(order))


def _caption(s: dict | None, score: tuple[str, str] | None) -> str:
    if not s:
        return "not available"
    v = _num(s.get(score[0])) if score else None
    return f"seed {s.get('seed')}" + (f" · {score[1]} {v:.2f}" if score and v is not None else "")


def comparison_png(cmp: Comparison, images: Images) -> bytes | None:
    """The comparison as one PNG: a column per header, a row per prompt."""
    import numpy as np
    from PIL import Image, ImageDraw

    decoded: dict[str, Any] = {}
    res = None
    for r in cmp.rows:
        for rel, _ in r["cells"]:
            if rel and rel not in decoded:
                with Image.open(io.BytesIO(images.files[rel])) as im:
                    decoded[rel] = im.convert("RGB")
                res = res or decoded[rel].size[1]
    if res is None:
        return None
    cell = res * max(1, 128 // res) if res <= 128 else 256
    colw = max(cell, 150)
    label_h, head_h, pad = 14, 30, 6
    W = pad + len(cmp.headers) * (colw + pad)
    H = head_h + len(cmp.rows) * (label_h + cell + label_h + pad) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    for i, h in enumerate(cmp.headers):
        d.text((pad + i * (colw + pad), 8), h[:40], fill=(0, 0, 0))
    y = head_h
    for r in cmp.rows:
        d.text((pad, y), f"[{r['mem_type'] or '-'}] {r['text']}"[: W // 6], fill=(60, 60, 60))
        y += label_h
        for i, (rel, cap) in enumerate(r["cells"]):
            x = pad + i * (colw + pad)
            if rel:
                im = decoded[rel]
                canvas.paste(im.resize((cell, cell), Image.NEAREST if cell % im.size[1] == 0 else Image.BICUBIC),
                             (x, y))
            else:
                d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(238, 238, 238), outline=(180, 180, 180))
                d.text((x + 6, y + cell // 2 - 6), "not available", fill=(120, 120, 120))
            d.text((x, y + cell + 1), cap[:30], fill=(0, 0, 0))
        y += cell + label_h + pad
    return _png(np.asarray(canvas))
