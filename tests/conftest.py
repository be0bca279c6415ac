"""Shared fixtures: environment isolation, a tiny random Stable Diffusion pipeline, temp caches, CLI runners.

* Every test runs with ``MEMOBENCH_CACHE_DIR`` pointing at a session temp dir and with
  ``MEMOBENCH_LOAD_PLUGINS=memobench``, so only memobench's own entry points (the built-ins declared in its
  ``pyproject.toml``) load — never whatever else happens to be installed (CONVENTIONS §2.6). The other plugin
  switches are cleared. Subprocesses inherit this environment.
* ``OMP_NUM_THREADS`` defaults to 1: the suite runs on 2 cores shared with other work, where two spinning
  OpenMP threads per process are slower than one. (Pixels are compared only between runs with the same setting.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported anywhere in this process

MEMOBENCH_EXE = shutil.which("memobench", path=str(Path(sys.executable).parent)) or shutil.which("memobench")
PLUGIN_SWITCHES = ("MEMOBENCH_STRICT_PLUGINS", "MEMOBENCH_DISABLE_PLUGIN_AUTOLOAD", "MEMOBENCH_PLUGINS_DIR",
                   "MEMOBENCH_TRACE_PLUGINS", "MEMOBENCH_OFFLINE")


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    """Session-wide environment isolation (see the module docstring); yields the session cache dir."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("memobench-env-cache")
    mp.setenv("MEMOBENCH_CACHE_DIR", str(cache))
    mp.setenv("MEMOBENCH_LOAD_PLUGINS", "memobench")
    for var in PLUGIN_SWITCHES:
        mp.delenv(var, raising=False)
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    from memobench import registry

    registry.get_registry(reload=True)
    try:
        yield cache
    finally:
        mp.undo()
        registry._REGISTRY = None


@pytest.fixture(scope="session")
def tiny_pipe(tmp_path_factory) -> Path:
    """A tiny random ``StableDiffusionPipeline`` folder (built once per session, no download)."""
    from memobench_plugins.sd_random.testing import save_tiny_random_pipeline

    root = tmp_path_factory.mktemp("tiny-random")
    return save_tiny_random_pipeline(root / "pipe", tokenizer_dir=root / "tokenizer")


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    """A fresh, empty cache directory for one test."""
    d = tmp_path / "cache"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def no_metrics_config(tmp_path_factory) -> Path:
    """``--config`` file selecting no metrics (generation only)."""
    p = tmp_path_factory.mktemp("configs") / "no_metrics.json"
    p.write_text(json.dumps({"metrics": []}))
    return p


@pytest.fixture(scope="session")
def tiny_args(tiny_pipe, no_metrics_config):
    """``memobench run`` arguments for the tiny random pipeline: ``tiny_args(cache, out, *extra)``."""

    def args(cache: Path, out: Path, *extra: str) -> list[str]:
        return ["run", "--model", "tiny", "--model-param", f"path={tiny_pipe}", "--config", str(no_metrics_config),
                "--cache-dir", str(cache), "-o", str(out), *extra]

    return args


def run_cli(args: list[str], env: dict | None = None, timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    """Run the ``memobench`` console script (the installed entry point) in a subprocess."""
    assert MEMOBENCH_EXE, "the memobench console script is not installed"
    full_env = {**os.environ, **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    return subprocess.run([MEMOBENCH_EXE, *args], env=full_env, capture_output=True, text=True, timeout=timeout,
                          **kw)


@pytest.fixture(scope="session")
def memobench_exe() -> str:
    """Path of the ``memobench`` console script."""
    assert MEMOBENCH_EXE, "the memobench console script is not installed"
    return MEMOBENCH_EXE


@pytest.fixture(scope="session")
def cli():
    """The CLI as a subprocess: ``cli(args, env=None) -> CompletedProcess`` (env values of None unset a var)."""
    return run_cli


@pytest.fixture
def cli_inproc(capsys):
    """The CLI in this process (``memobench.cli.main``): ``cli_inproc(args) -> (exit code, stdout, stderr)``."""
    from memobench.cli import main

    def call(args: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out, err

    return call



@pytest.fixture(scope="session")
def sd14_random_model(tmp_path_factory):
    """A tiny random pipeline with SD v1.4's UNet layout (its block structure and value-layer order) as a
    :class:`memobench.model.DiffusionModel` (shared by the NeMo / Wanda tests)."""
    from memobench_plugins.sd_random.testing import tiny_random_pipeline

    from memobench.model import DiffusionModel

    tok = tmp_path_factory.getbasetemp() / "sd-tokenizer"
    return DiffusionModel(tiny_random_pipeline(sd14_layout=True, tokenizer_dir=tok), "tiny-random-sd14")
