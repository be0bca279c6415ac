"""GridLayout: the one geometry of a run's grid PNG, used by write_grid to draw it and by the leaderboard to cut
cells back out (issue 27 item 1)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memobench.api import Prompt, Sample
from memobench.grid import GridLayout, write_grid

ROOT = Path(__file__).resolve().parents[1]


def _samples(n_prompts: int, n_seeds: int, res: int = 8, n_refs: int = 1) -> list[Sample]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n_prompts):
        p = Prompt(f"p{i}", f"prompt {i}", "VM", tuple(f"r{k}" for k in range(n_refs)))
        refs = [rng.integers(0, 256, (res, res, 3), dtype=np.uint8) for _ in range(n_refs)]
        out += [Sample(f"k{i}-{s}", p, s, rng.integers(0, 256, (res, res, 3), dtype=np.uint8), refs)
                for s in range(n_seeds)]
    return out


@pytest.mark.parametrize("n_prompts,n_seeds,scored", [(3, 2, False), (3, 2, True), (20, 11, True), (1, 1, False)])
def test_write_grid_draws_where_the_layout_says(tmp_path, n_prompts, n_seeds, scored):
    lay = GridLayout()
    samples = _samples(n_prompts, n_seeds)
    scores = {s.sample_key: 0.1 * s.seed for s in samples} if scored else None
    write_grid(samples, tmp_path / "g.png", scores=scores)
    with Image.open(tmp_path / "g.png") as im:
        canvas = np.asarray(im.convert("RGB"))
    rows, cols = min(n_prompts, lay.max_prompts), 1 + min(n_seeds, lay.max_seeds)
    cell = lay.cell(8)
    assert canvas.shape[1::-1] == lay.size(cell, rows, cols, scored)
    assert lay.locate(canvas.shape[1], canvas.shape[0], rows, cols) == (cell, scored)
    for s in samples:
        i, j = int(s.prompt.id[1:]), s.seed
        if i >= rows or j >= cols - 1:
            continue
        x, y = lay.origin(cell, i, 1 + j, scored)
        assert np.array_equal(canvas[y:y + cell:lay.scale, x:x + cell:lay.scale], s.image)
        if j == 0:
            x, y = lay.origin(cell, i, 0, scored)
            assert np.array_equal(canvas[y:y + cell:lay.scale, x:x + cell:lay.scale], s.references[0])


def test_layout_argument_and_a_size_that_fits_no_layout(tmp_path):
    lay = GridLayout(scale=3, max_seeds=2)
    samples = _samples(2, 4)
    write_grid(samples, tmp_path / "g.png", layout=lay)
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == lay.size(lay.cell(8), 2, 3, False)
    assert GridLayout().locate(101, 77, 2, 3) is None


def test_committed_grids_are_cut_by_the_layout():
    """Every committed run grid still yields its cells: each crop has the sha256 its samples file records."""
    from memobench import leaderboard as lb

    results = ROOT / "benchmarks" / "results"
    if not results.is_dir():
        pytest.skip("no committed results in this checkout")
    images = lb.Images(results, None, None)
    n = 0
    for res in lb.load_results(results):
        for key, role in (("grid_file", "target"), ("grid_without_attack_file", "mitigated")):
            if res.sibling(key) is None:
                continue
            rows = [s for s in res.samples or () if s.get("role") == role]
            by: dict[str, list] = {}
            for s in rows:
                by.setdefault(s["prompt_id"], []).append(s)
            shown = sum(min(len(v), GridLayout().max_seeds) for v in list(by.values())[:GridLayout().max_prompts])
            cells = images.grid(res, key)["cells"]
            assert len(cells) == shown, (res.rel, key)
            png = next(iter(cells.values()))
            with Image.open(io.BytesIO(png)) as im:
                assert im.size[0] == im.size[1]
            n += 1
    assert n >= 16
