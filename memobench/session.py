"""What every command that writes results shares with ``memobench run``: a model plugin loaded into a
:class:`memobench.api.Context` keyed by the model identity (:func:`open_model`, or :func:`model_context` then
:func:`load_model`), the output folder check, the provenance record (version, git commit, time, environment) and the
result file written as strict JSON, atomically (:func:`write_result`). Plugin commands (``memobench detect``,
``memobench analyze locality``) use these through :mod:`memobench.api` instead of a small runner of their own."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import BadInput

__all__ = ["ModelSession", "check_output_dir", "environment", "git_dirty", "git_hash", "load_model", "model_context",
           "open_model", "provenance", "write_result"]


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


def write_result(path: str | Path, record: dict, *, env_key: str = "env", env_extra: dict | None = None,
                 **dumps_kw: Any) -> dict:
    """Write a command's result ``record`` to ``path``: the :func:`provenance` fields the record does not set itself
    are added (the environment under ``env_key``, with ``env_extra``, e.g. versions of libraries the command used),
    then strict JSON (non-finite floats become null and are listed: :func:`memobench.config.dumps_strict`) written
    atomically. ``dumps_kw`` go to ``json.dumps`` (default ``indent=1``). Returns the record as written."""
    from .cache import atomic_write_text
    from .config import dumps_strict

    prov = provenance()
    prov[env_key] = {**prov.pop("env"), **(env_extra or {})}
    out = {**record, **{k: v for k, v in prov.items() if k not in record}}
    atomic_write_text(path, dumps_strict(out, **{"indent": 1, **dumps_kw}))
    return out


@dataclass
class ModelSession:
    """A model plugin's loaded model with the :class:`~memobench.api.Context` plugins compute in (``ctx.model_id``
    = the key of the weights' identity, as in ``memobench run``)."""

    registry: Any
    model_name: str
    model_plugin: Any
    model: Any  # memobench.model.DiffusionModel
    ctx: Any  # memobench.api.Context

    @property
    def generation(self) -> dict:
        """The model plugin's sampler defaults with the command's overrides (``ctx.generation``)."""
        return self.ctx.generation

    @property
    def model_identity(self) -> dict:
        """What results record as the model: the weights' identity and the plugin's (name, version, params)."""
        return {"id": self.model.model_id, **self.model.identity(), "plugin": self.model_plugin.identity()}


def model_context(model_cls: type, *, cache_dir: str | Path | None = None, device: str = "cpu",
                  offline: bool = False, generation: dict | None = None, registry: Any = None, **fields: Any):
    """The :class:`~memobench.api.Context` a model plugin class loads and computes in: ``generation`` defaults to
    the plugin's own sampler settings, the cache to :func:`memobench.cache.default_cache_dir`; ``fields`` set other
    Context fields (seeds, progress, batch_size, …)."""
    from .api import Context
    from .cache import default_cache_dir

    gen = dict(model_cls.generation if generation is None else generation)
    return Context(cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(), offline=offline, device=device,
                   generation=gen, registry=registry, **fields)


def load_model(plugin: Any, ctx: Any):
    """``plugin.load(ctx)`` with the libraries' own progress bars silenced; sets ``ctx.model_id``."""
    from .cache import key_of
    from .model import quiet_libraries

    quiet_libraries()
    model = plugin.load(ctx)
    ctx.model_id = key_of(model.identity())
    return model


def open_model(name: str, params: dict | None = None, *, registry: Any = None, what: str = "--model-param",
               **context: Any) -> ModelSession:
    """Instantiate the registered model plugin ``name`` with ``params`` (bad ones: :class:`BadInput` naming
    ``what``) and load it the way ``memobench run`` does; ``context`` goes to :func:`model_context`."""
    from .registry import get_registry

    reg = registry or get_registry()
    cls = reg.get("model", name)
    try:
        plugin = cls(cls.make_params(params or {}))
    except BadInput:
        raise
    except (TypeError, ValueError) as e:
        raise BadInput(f"{what}: {str(e).splitlines()[0]}") from None
    ctx = model_context(cls, registry=reg, **context)
    return ModelSession(reg, name, plugin, load_model(plugin, ctx), ctx)
