"""What every command that writes results shares: the output folder check and the environment record
(versions, git commit) that makes a number reproducible."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from .config import BadInput

__all__ = ["check_output_dir", "environment", "git_dirty", "git_hash"]


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        here = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=5)
    except Exception:
        return None


def git_hash() -> str | None:
    out = _git("rev-parse", "HEAD")
    return (out.stdout.strip() or None) if out is not None else None


def git_dirty() -> bool | None:
    """Whether tracked files differ from ``git_hash`` (the result then came from uncommitted code); None outside git."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return bool(out.stdout.strip()) if out is not None and out.returncode == 0 else None


def environment() -> dict:
    import importlib.metadata as md

    def v(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    import torch

    return {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "diffusers": v("diffusers"), "transformers": v("transformers"),
        "torchvision": v("torchvision"), "open_clip": v("open_clip_torch"), "torch_fidelity": v("torch-fidelity"),
        "onnxruntime": v("onnxruntime"), "numpy": v("numpy"),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(), "world_size": 1,
    }


def check_output_dir(path: str | Path) -> Path:
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".memobench-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise BadInput(f"--output-dir: cannot write to {p} ({e.strerror or e}); choose a writable directory") from None
    return p


def provenance() -> dict:
    """What every result file records about the code and machine that computed it: memobench's version, the git
    commit (and whether the tree differed from it), the time (UTC) and :func:`environment`."""
    import datetime as _dt

    from . import __version__

    return {"memobench_version": __version__, "git_hash": git_hash(), "git_dirty": git_dirty(),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "env": environment()}
