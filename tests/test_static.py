"""Static check of the tree: no undefined names (pyflakes F821 via ruff). A misspelt or missing name in a code path
the tests do not execute (e.g. ``benchmarks/gpu_check.py``, run only on a GPU)
would otherwise only fail at run time."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _ruff() -> str:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert exe, "ruff is a dev dependency (pyproject [dependency-groups]); `uv run pytest` installs it"
    return exe


def test_no_undefined_names():
    dirs = [str(ROOT / d) for d in ("memobench", "plugins", "benchmarks", "tests")]
    out = subprocess.run([_ruff(), "check", "--no-cache", "--select", "F821", "--output-format", "concise", *dirs],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
