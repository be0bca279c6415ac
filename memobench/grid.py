"""The image grid of a run: per prompt, the training original and one generation per seed.

:func:`write_grid` draws it (``<run_id>.grid.png`` beside each result); :class:`GridLayout` is its geometry, the one
place that knows where each cell is, used to draw a grid and to cut cells back out of one (the leaderboard).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .api import Sample

__all__ = ["GridLayout", "write_grid"]


@dataclass(frozen=True)
class GridLayout:
    """Where everything of a grid PNG is, in pixels. A grid has a title line, then per prompt a label line, a row
    of cells (the training original, then one generation per seed, each ``scale`` times the model's resolution) and,
    where scores are printed, a score line under the cells."""

    scale: int = 2  # each image is drawn scale × scale (nearest neighbour)
    pad: int = 4  # left margin and the gap between two cells
    title_h: int = 24  # the title line above the first row
    label_h: int = 14  # the prompt's label line above its cells
    score_h: int = 12  # the score line under the cells, where one is drawn
    row_gap: int = 6  # below each row
    max_prompts: int = 16  # rows: the first prompts
    max_seeds: int = 8  # generated cells per row: the lowest seeds

    def cell(self, res: int) -> int:
        """Side of a cell for images of ``res`` pixels."""
        return res * self.scale

    def row_h(self, cell: int, scored: bool) -> int:
        return self.label_h + cell + (self.score_h if scored else 0) + self.row_gap

    def size(self, cell: int, n_rows: int, n_cols: int, scored: bool) -> tuple[int, int]:
        """(width, height) of a grid of ``n_rows`` prompts and ``n_cols`` cells per row (original included)."""
        return n_cols * (cell + self.pad) + self.pad, n_rows * self.row_h(cell, scored) + self.title_h

    def origin(self, cell: int, row: int, col: int, scored: bool) -> tuple[int, int]:
        """Top-left pixel of the cell in ``row`` (0: first prompt) and ``col`` (0: the original, 1: first seed)."""
        return self.pad + col * (cell + self.pad), self.title_h + row * self.row_h(cell, scored) + self.label_h

    def label_origin(self, cell: int, row: int, scored: bool) -> tuple[int, int]:
        return self.pad, self.title_h + row * self.row_h(cell, scored)

    def locate(self, width: int, height: int, n_rows: int, n_cols: int) -> tuple[int, bool] | None:
        """The inverse of :meth:`size`: (cell side, whether a score line is drawn) of a grid PNG of that size with
        that many rows and columns, or None when no cell side and score setting give that size."""
        cell = (width - self.pad) // n_cols - self.pad
        if cell <= 0 or cell % self.scale or self.size(cell, n_rows, n_cols, False)[0] != width:
            return None
        for scored in (True, False):
            if self.size(cell, n_rows, n_cols, scored)[1] == height:
                return cell, scored
        return None


def _rows(samples: list[Sample], max_prompts: int) -> list[list[Sample]]:
    by: dict[str, list[Sample]] = {}
    for s in samples:
        by.setdefault(s.prompt.id, []).append(s)
    return list(by.values())[:max_prompts]


def write_grid(samples: list[Sample], path: Path, max_prompts: int = 16, max_seeds: int = 8, scale: int = 2,
               scores: dict | None = None, title: str = "", layout: GridLayout | None = None) -> None:
    """Training original | generations, one row per prompt (a picture a person can check by eye). ``scores``
    (sample key → value) are printed under the generations; ``layout`` overrides ``max_prompts``, ``max_seeds`` and
    ``scale``."""
    from PIL import Image, ImageDraw

    from .cache import atomic_write_bytes, png_bytes
    from .model import to_model_resolution

    lay = layout or GridLayout(scale=scale, max_prompts=max_prompts, max_seeds=max_seeds)
    rows = _rows(samples, lay.max_prompts)
    if not rows:
        return
    res = rows[0][0].image.shape[0]
    cell = lay.cell(res)
    multi = any(len(r[0].references) > 1 for r in rows)  # e.g. non-memorized prompts vs every memorized image
    scored = bool(scores) or multi
    n_gen = max(len(r) for r in rows)
    canvas = Image.new("RGB", lay.size(cell, len(rows), 1 + min(lay.max_seeds, n_gen), scored), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    d.text((lay.pad, lay.pad), (f"{title}: " if title else "") + "training original | generated, one per seed"
           + (f" (the first {lay.max_seeds} of {n_gen})" if n_gen > lay.max_seeds else "")
           + (" (number: SSCD to the original; the max over them where a prompt has several)" if scores else ""),
           fill=(0, 0, 0))
    for i, r in enumerate(rows):
        p = r[0].prompt
        d.text(lay.label_origin(cell, i, scored), f"[{p.mem_type or '-'}] {p.text[:110]}", fill=(0, 0, 0))
        x, y = lay.origin(cell, i, 0, scored)
        if r[0].references:
            ref = to_model_resolution(r[0].references[0], res)
            canvas.paste(Image.fromarray(ref).resize((cell, cell), Image.NEAREST), (x, y))
            if len(r[0].references) > 1:
                d.text((x + 2, y + cell + 1), f"1 of {len(r[0].references)} references", fill=(0, 0, 0))
        else:
            d.rectangle([x, y, x + cell - 1, y + cell - 1], outline=(200, 0, 0))
            d.text((x + 4, y + cell // 2), "missing", fill=(200, 0, 0))
        for j, s in enumerate(sorted(r, key=lambda s: s.seed)[:lay.max_seeds]):
            x, y = lay.origin(cell, i, 1 + j, scored)
            canvas.paste(Image.fromarray(s.image).resize((cell, cell), Image.NEAREST), (x, y))
            if scores and s.sample_key in scores:
                v = scores[s.sample_key]
                d.text((x + 2, y + cell + 1), f"seed {s.seed}: {v:.2f}", fill=(170, 0, 0) if v > 0.7 else (0, 0, 0))
    atomic_write_bytes(path, png_bytes(np.asarray(canvas), compress_level=1))  # fast: a grid is rewritten per run
