"""Issue 26, defects 2 and 8: `cache clear` deletes only memobench's own sections of a folder memobench created;
temporary files that a killed run left behind are cleaned."""

from __future__ import annotations

import os
import time

from memobench.cache import MARKER, clean_stale_tmp
from memobench.cli import main


def _fill(d):
    (d / "images" / "ab").mkdir(parents=True)
    (d / "images" / "ab" / "x.png").write_bytes(b"png")
    (d / "attacks").mkdir()
    (d / "attacks" / "y.safetensors").write_bytes(b"st")
    (d / "weights_sha.json").write_text("{}")
    (d / "thesis").mkdir()  # someone else's folder next to memobench's sections
    (d / "thesis" / "draft.tex").write_text("\\section{…}")


def test_clear_refuses_a_folder_memobench_did_not_create(tmp_path, capsys):
    d = tmp_path / "shared"
    d.mkdir()
    _fill(d)
    rc = main(["cache", "clear", "-y", "--cache-dir", str(d)])
    err = capsys.readouterr().err
    assert rc == 2 and "not a memobench cache" in err and len(err.strip().splitlines()) == 1
    assert (d / "thesis" / "draft.tex").exists() and (d / "images" / "ab" / "x.png").exists()


def test_clear_deletes_only_memobench_sections(tmp_path, capsys):
    d = tmp_path / "cache"
    d.mkdir()
    _fill(d)
    (d / MARKER).write_text("{}")
    assert main(["cache", "clear", "-y", "--cache-dir", str(d), "--section", "attacks"]) == 0
    assert not (d / "attacks").exists() and (d / "images").exists()
    assert main(["cache", "clear", "-y", "--cache-dir", str(d)]) == 0
    assert not (d / "images").exists() and not (d / "weights_sha.json").exists()
    assert (d / "thesis" / "draft.tex").exists()  # never memobench's to delete
    assert "deleted 2 files" in capsys.readouterr().out


def test_a_run_marks_its_cache_folder(tmp_path):
    from memobench.cache import ImageCache, is_memobench_cache

    ImageCache(tmp_path / "c")
    assert is_memobench_cache(tmp_path / "c")


def test_clean_stale_tmp(tmp_path):
    d = tmp_path / "images" / "ab"
    d.mkdir(parents=True)
    old = time.time() - 7200
    dead = d / ".k.png.tmp999999999"  # no such process
    dead.write_bytes(b"partial")
    os.utime(dead, (old, old))
    fresh = d / ".k2.png.tmp999999998"  # too recent: maybe a writer on another machine sharing the folder
    fresh.write_bytes(b"partial")
    mine = d / f".k3.png.tmp{os.getpid()}"  # a live process
    mine.write_bytes(b"partial")
    os.utime(mine, (old, old))
    other = d / "k4.png"
    other.write_bytes(b"png")
    os.utime(other, (old, old))
    assert clean_stale_tmp(tmp_path) == 1
    assert not dead.exists() and fresh.exists() and mine.exists() and other.exists()


def test_run_cleans_stale_tmp_files(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "out"
    old = time.time() - 7200
    left = []
    for p in (cache / "images" / "ab" / ".dead.png.tmp999999999", out / "tiny" / ".r.json.tmp999999999"):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
        os.utime(p, (old, old))
        left.append(p)
    rc = main(["run", "--seeds", "0", "--limit", "1", "--steps", "1", "--metric", "mr", "--cache-dir", str(cache),
               "--output-dir", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert not any(p.exists() for p in left)
