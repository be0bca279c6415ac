"""Kill-and-resume (CONVENTIONS §7): SIGKILL ``memobench run`` mid-generation, re-run it, compare with an
uninterrupted run.

(a) the re-run reports ``cached X`` with X ≥ the images complete at kill time;
(b) none of those images is rewritten (PNG and sidecar bytes and mtimes unchanged);
(c) the final result equals an uninterrupted run's in a separate cache/output dir, volatile fields aside, and so
    do the per-sample tables (image sha256 of every sample): resuming must not change a pixel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from memobench.cli import main

N_PROMPTS, N_SEEDS, BATCH, STEPS = 2, 12, 2, 4
TOTAL = N_PROMPTS * N_SEEDS
VOLATILE = ("created_at", "timing", "env", "git_hash")
VOLATILE_CONFIG = ("cache_dir", "output_dir")


def _args(tiny_args, cache: Path, out: Path) -> list[str]:
    return tiny_args(cache, out, "--limit", str(N_PROMPTS), "--seeds", f"0-{N_SEEDS - 1}",
                     "--batch-size", str(BATCH), "--steps", str(STEPS))


def _complete_entries(cache: Path) -> dict[str, dict]:
    """Cache entries with both PNG and sidecar: key -> {path: (mtime_ns, bytes)}."""
    out = {}
    for side in (cache / "images").glob("*/*.json"):
        png = side.with_suffix(".png")
        if png.exists():
            out[side.stem] = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (png, side)}
    return out


def _result(out: Path) -> tuple[dict, list[dict]]:
    (path,) = out.rglob("*.json")
    result = json.loads(path.read_text())
    rows = [json.loads(x) for x in (path.parent / result["samples_file"]).read_text().splitlines()]
    return result, rows


def _stable(result: dict) -> dict:
    r = {k: v for k, v in result.items() if k not in VOLATILE}
    r["config"] = {k: v for k, v in r["config"].items() if k not in VOLATILE_CONFIG}
    return r


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_args):
    """(result, sample rows) of the same run, uninterrupted, in its own cache and output dir."""
    root = tmp_path_factory.mktemp("uninterrupted")
    assert main([*_args(tiny_args, root / "cache", root / "out"), "--no-progress"]) == 0
    return _result(root / "out")


def test_kill_and_resume(tmp_path, tiny_args, cli_inproc, memobench_exe, uninterrupted):
    cache, out = tmp_path / "cache", tmp_path / "out"
    args = _args(tiny_args, cache, out)
    # the killed run is another process: give it this process's thread count (other tests set torch's to 1), since
    # CPU kernels may round differently with another number of threads, and resuming must not change a pixel
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([memobench_exe, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        deadline = time.monotonic() + 240
        n = 0
        while time.monotonic() < deadline and proc.poll() is None:
            n = len(list((cache / "images").glob("*/*.json"))) if (cache / "images").exists() else 0
            if n >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, (f"memobench run ended (rc {proc.returncode}) before it could be interrupted "
                                     f"({n} of {TOTAL} images); stderr: {proc.stderr.read()[-2000:]}")
        assert n >= 3, "no image appeared within the time limit"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = _complete_entries(cache)
    assert 0 < len(at_kill) < TOTAL, f"{len(at_kill)} of {TOTAL} images at kill time: not a partial run"
    assert not list(out.rglob("*.json")), "a result was written although the run was killed"

    time.sleep(0.05)  # so that a rewrite would show in mtime_ns even on coarse clocks
    rc, _, err = cli_inproc(args)  # the re-run (in this process: saves a second ~20 s torch/diffusers import)
    assert rc == 0, err
    m = re.search(r"\[memobench\] cached (\d+), remaining (\d+)", err)
    assert m, f"no '[memobench] cached X, remaining Y' line in the re-run's log: {err[-2000:]}"
    cached, remaining = int(m.group(1)), int(m.group(2))
    print(f"\n[resume] killed with {len(at_kill)} of {TOTAL} images complete; re-run: cached {cached}, "
          f"remaining {remaining}")
    # (a)
    assert cached >= len(at_kill)
    assert cached + remaining == TOTAL
    # (b)
    after = _complete_entries(cache)
    assert len(after) == TOTAL
    for key, files in at_kill.items():
        assert after[key] == files, f"cache entry {key} was rewritten by the re-run"
    # (c)
    result, rows = _result(out)
    ref_result, ref_rows = uninterrupted
    assert result["status"] == ref_result["status"] == "partial"  # --limit
    assert result["errors"] == []
    assert _stable(result) == _stable(ref_result)
    assert rows == ref_rows  # every sample's image sha256 included


def test_resume_after_a_partly_written_batch_is_bit_identical(tmp_path, tiny_args, cli_inproc):
    """A kill can land between the image writes of one batch. Here a batch of 12 was cut after its 7th image:
    the re-run must compute the other 5 in the batch an uninterrupted run uses, not in a batch of its own — on
    CPU the batch composition can change a few uint8 values by one level (on the machine this was written on,
    a batch of 5 gives 3 values that differ from the same seeds inside the batch of 12)."""
    args = ("--limit", "1", "--seeds", "0-11", "--batch-size", "12", "--steps", str(STEPS), "--no-progress")
    ref_cache, ref_out = tmp_path / "ref-cache", tmp_path / "ref-out"
    rc, _, err = cli_inproc(tiny_args(ref_cache, ref_out, *args))
    assert rc == 0, err
    ref_result, ref_rows = _result(ref_out)
    cache, out = tmp_path / "cache", tmp_path / "out"
    shutil.copytree(ref_cache, cache)
    removed = {}
    for r in ref_rows:
        if r["seed"] >= 7:
            png = cache / r["image_path"]
            removed[png] = png.read_bytes()
            png.unlink()
            png.with_suffix(".json").unlink()
    kept = _complete_entries(cache)
    rc, _, err = cli_inproc(tiny_args(cache, out, *args))
    assert rc == 0, err
    assert "cached 7, remaining 5" in err
    assert all(_complete_entries(cache)[k] == v for k, v in kept.items()), "a cached image was rewritten"
    changed = [png.name for png, data in removed.items() if png.read_bytes() != data]
    assert not changed, f"{len(changed)} of {len(removed)} regenerated images differ from the uninterrupted run's"
    result, rows = _result(out)
    assert rows == ref_rows and _stable(result) == _stable(ref_result)


def test_stale_temp_files_are_not_cache_entries(tmp_path):
    """A write killed before ``os.replace`` leaves only a hidden temp file, which never counts as cached."""
    from memobench.cache import ImageCache

    cache = ImageCache(tmp_path)
    key = "ab" + "0" * 62
    png, side = cache.paths(key)
    png.parent.mkdir(parents=True)
    png.with_name(f".{png.name}.tmp12345").write_bytes(b"partial")
    assert not cache.has(key)
    png.write_bytes(b"png without its sidecar")  # killed between the two writes
    assert not cache.has(key)
