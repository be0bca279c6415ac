"""Seeds and determinism on CPU (CONVENTIONS §8), on the tiny random pipeline through the real ``memobench run``.

* the same seed gives bit-identical images across two runs with separate caches;
* different seeds give different images;
* the runner's denoising loop reproduces ``StableDiffusionPipeline.__call__`` with one CPU generator per image;
* batch composition: whether ``--batch-size`` changes pixels (it does not enter cache keys).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from memobench.cache import read_png
from memobench.cli import main

STEPS = 4


def _run(root: Path, name: str, tiny_args, *extra: str) -> dict:
    """One in-process ``memobench run``; returns the result, its samples and the cache dir."""
    cache, out = root / f"{name}-cache", root / f"{name}-out"
    rc = main(tiny_args(cache, out, "--steps", str(STEPS), "--no-progress", *extra))
    assert rc == 0, f"memobench run ({name}) exited with {rc}"
    (result_path,) = out.rglob("*.json")
    result = json.loads(result_path.read_text())
    rows = [json.loads(line) for line in (result_path.parent / result["samples_file"]).read_text().splitlines()]
    return {"result": result, "rows": rows, "cache": cache}


def _image(run: dict, row: dict) -> np.ndarray:
    return read_png(run["cache"] / row["image_path"])


def _by_sample(run: dict) -> dict[tuple[str, int], dict]:
    return {(r["prompt_id"], r["seed"]): r for r in run["rows"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_args):
    root = tmp_path_factory.mktemp("determinism")
    common = ("--limit", "1", "--seeds", "0-3")
    return {"a": _run(root, "a", tiny_args, *common), "b": _run(root, "b", tiny_args, *common)}


def test_same_seed_is_bit_identical_across_runs(runs):
    a, b = _by_sample(runs["a"]), _by_sample(runs["b"])
    assert a.keys() == b.keys() and len(a) == 4
    for k in a:
        assert a[k]["sample_key"] == b[k]["sample_key"]
        assert a[k]["image_sha256"] == b[k]["image_sha256"], f"seed {k[1]}: image differs between two runs"
        pa, pb = runs["a"]["cache"] / a[k]["image_path"], runs["b"]["cache"] / b[k]["image_path"]
        assert pa.read_bytes() == pb.read_bytes()
        assert np.array_equal(_image(runs["a"], a[k]), _image(runs["b"], b[k]))


def test_different_seeds_give_different_images(runs):
    rows = sorted(runs["a"]["rows"], key=lambda r: r["seed"])
    imgs = [_image(runs["a"], r) for r in rows]
    assert len({r["image_sha256"] for r in rows}) == len(rows)
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            d = np.abs(imgs[i].astype(int) - imgs[j].astype(int)).mean()
            assert d > 1.0, f"seeds {rows[i]['seed']} and {rows[j]['seed']} give nearly the same image ({d:.3f})"


def test_runner_reproduces_stable_diffusion_pipeline_call(runs, tiny_pipe):
    """The runner's loop (DDIM, η = 0, CFG, one CPU generator per image) vs diffusers' own ``__call__``."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from memobench.model import quiet_libraries

    quiet_libraries()
    result, rows = runs["a"]["result"], sorted(runs["a"]["rows"], key=lambda r: r["seed"])
    gen = result["generation"]
    assert result["model"]["scheduler"]["class"] == "DDIMScheduler"
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_pipe), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    seeds = [r["seed"] for r in rows]
    out = pipe(rows[0]["prompt"], generator=[torch.Generator().manual_seed(s) for s in seeds],
               num_images_per_prompt=len(seeds), num_inference_steps=gen["num_inference_steps"],
               guidance_scale=gen["guidance_scale"], height=gen["height"], width=gen["width"],
               output_type="np").images
    ref = (out * 255).round().astype("uint8")  # what diffusers' numpy_to_pil does
    ours = np.stack([_image(runs["a"], r) for r in rows])
    diff = np.abs(ref.astype(int) - ours.astype(int))
    print(f"\n[determinism] runner vs StableDiffusionPipeline.__call__: {int((diff > 0).sum())} of {diff.size} "
          f"uint8 values differ, max {int(diff.max())} level(s)")
    assert diff.max() <= 1, f"runner differs from the diffusers pipeline by up to {diff.max()} levels"
    assert (diff > 0).mean() < 1e-3


@pytest.fixture(scope="module")
def batch_runs(tmp_path_factory, tiny_args):
    """The same 2 prompts × 8 seeds generated one image per batch and all 8 seeds of a prompt in one batch."""
    root = tmp_path_factory.mktemp("batches")
    common = ("--limit", "2", "--seeds", "0-7")
    return {bs: _run(root, f"bs{bs}", tiny_args, *common, "--batch-size", str(bs)) for bs in (1, 8)}


def _batch_diff(batch_runs) -> np.ndarray:
    one, eight = _by_sample(batch_runs[1]), _by_sample(batch_runs[8])
    assert one.keys() == eight.keys()
    for k in one:  # batch size does not enter the sample key (CONVENTIONS §7)
        assert one[k]["sample_key"] == eight[k]["sample_key"]
    return np.stack([np.abs(_image(batch_runs[1], one[k]).astype(int) - _image(batch_runs[8], eight[k]).astype(int))
                     for k in sorted(one)])


def test_batch_size_changes_pixels_by_at_most_one_level(batch_runs):
    diff = _batch_diff(batch_runs)
    print(f"\n[determinism] --batch-size 1 vs 8: {int((diff > 0).sum())} of {diff.size} uint8 values differ in "
          f"{int((diff.reshape(len(diff), -1).max(1) > 0).sum())} of {len(diff)} images, max {int(diff.max())}")
    assert diff.max() <= 1


@pytest.mark.xfail(strict=True, reason="measured: on CPU, oneDNN picks other kernels for batch 1 vs 8, so a few "
                   "uint8 values differ by one level; batch size stays out of cache keys (CONVENTIONS §8) and "
                   "README documents it. strict: this fails if batch size stops mattering, so the note can go.")
def test_batch_size_does_not_change_pixels(batch_runs):
    """Bit-identity across batch sizes. Batch size is excluded from cache keys, so a cache filled with one batch
    size is reused by runs with another; this test fails if that reuse can change pixels (it reveals the issue,
    it does not tolerate it: see test_batch_size_changes_pixels_by_at_most_one_level for the size of it)."""
    diff = _batch_diff(batch_runs)
    n = int((diff > 0).sum())
    assert n == 0, (f"--batch-size changes pixels on this CPU: {n} of {diff.size} uint8 values differ (max "
                    f"{int(diff.max())} level) between --batch-size 1 and 8 for the same prompts and seeds")
