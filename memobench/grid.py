"""The image grid of a run: per prompt, the training original and one generation per seed.

:func:`write_grid` draws it (``<run_id>.grid.png`` beside each result); :class:`GridLayout` is its geometry, the one
place that knows where each cell is, used to draw a grid and to cut cells back out of one (the leaderboard).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .api import Sample

__all__ = ["write_grid"]


def write_grid(samples: list[Sample], path: Path, max_prompts: int = 16, max_seeds: int = 8, scale: int = 2,
               scores: dict | None = None, title: str = "") -> None:
    """Training original | generations, one row per prompt (a picture a person can check by eye)."""
    from PIL import Image, ImageDraw

    from .cache import atomic_write_bytes, png_bytes
    from .model import to_model_resolution

    by: dict[str, list[Sample]] = {}
    for s in samples:
        by.setdefault(s.prompt.id, []).append(s)
    rows = list(by.values())[:max_prompts]
    if not rows:
        return
    res = rows[0][0].image.shape[0]
    cell = res * scale
    label_h = 14
    multi = any(len(r[0].references) > 1 for r in rows)  # e.g. non-memorized prompts vs every memorized image
    score_h = 12 if scores or multi else 0
    n_gen = max(len(r) for r in rows)
    ncols = 1 + min(max_seeds, n_gen)
    W = ncols * (cell + 4) + 4
    H = len(rows) * (cell + label_h + score_h + 6) + 24
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    d.text((4, 4), (f"{title}: " if title else "") + "training original | generated, one per seed"
           + (f" (the first {max_seeds} of {n_gen})" if n_gen > max_seeds else "")
           + (" (number: SSCD to the original; the max over them where a prompt has several)" if scores else ""),
           fill=(0, 0, 0))
    y = 24
    for r in rows:
        p = r[0].prompt
        d.text((4, y), f"[{p.mem_type or '-'}] {p.text[:110]}", fill=(0, 0, 0))
        y += label_h
        x = 4
        if r[0].references:
            ref = to_model_resolution(r[0].references[0], res)
            canvas.paste(Image.fromarray(ref).resize((cell, cell), Image.NEAREST), (x, y))
            if len(r[0].references) > 1:
                d.text((x + 2, y + cell + 1), f"1 of {len(r[0].references)} references", fill=(0, 0, 0))
        else:
            d.rectangle([x, y, x + cell - 1, y + cell - 1], outline=(200, 0, 0))
            d.text((x + 4, y + cell // 2), "missing", fill=(200, 0, 0))
        x += cell + 4
        for s in sorted(r, key=lambda s: s.seed)[:max_seeds]:
            canvas.paste(Image.fromarray(s.image).resize((cell, cell), Image.NEAREST), (x, y))
            if scores and s.sample_key in scores:
                v = scores[s.sample_key]
                d.text((x + 2, y + cell + 1), f"seed {s.seed}: {v:.2f}", fill=(170, 0, 0) if v > 0.7 else (0, 0, 0))
            x += cell + 4
        y += cell + score_h + 6
    atomic_write_bytes(path, png_bytes(np.asarray(canvas)))
