"""Run configuration: what determines a run, parsed from a config file and/or CLI flags.

A run = (model, prompt set, mitigation, attack, metrics, seeds, generation settings). Unset generation
settings take the model plugin's defaults; the resolved config is written into every result and hashed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class BadInput(ValueError):
    """Invalid user input: the message is one line naming the input and the fix (CLI exit code 2).

    A ``ValueError`` (so that code catching a plugin's parameter errors as ``ValueError`` keeps working), but the CLI
    gives exit code 2 only to this class: any other ``ValueError`` is an internal error (exit 1)."""


@dataclass
class RunConfig:
    model: str | None = None  # None = the model plugin that declares is_default
    model_params: dict = field(default_factory=dict)
    prompts: str | None = None  # target prompt set; None = the model's default
    prompt_params: dict = field(default_factory=dict)
    mitigation: str | None = None  # None = the mitigation of kind "none" (no mitigation)
    mitigation_params: dict = field(default_factory=dict)
    attack: str | None = None  # None = the identity attack (the target's own prompt)
    attack_params: dict = field(default_factory=dict)
    metrics: list[str] | None = None  # None = the model's default metrics
    metric_params: dict = field(default_factory=dict)  # {metric: {param: value}}
    seeds: list[int] | None = None  # None = the model's default seeds
    utility_seeds: list[int] | None = None
    limit: int | None = None
    utility_limit: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 16
    output_dir: str = "results"
    cache_dir: str | None = None
    offline: bool = False
    device: str = "cpu"
    dtype: str | None = None  # fp16 | bf16 | fp32 (GPU only for half types); None = as the model plugin loads it
    # --budget-sweep: values of the attack's budget parameter at which the target metrics are also recorded
    # ([] = the attack's defaults); None = no sweep
    budget_sweep: list[int] | None = None

    # fields that do not change what is computed (excluded from the config hash)
    NON_IDENTITY = ("batch_size", "output_dir", "cache_dir", "offline", "device")

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("dtype", "budget_sweep"):  # unset: the hash of every run from before these existed stays the same
            if d.get(k) is None:
                d.pop(k, None)
        return {k: v for k, v in d.items() if k not in self.NON_IDENTITY}


DTYPES = {"fp16": "fp16", "float16": "fp16", "half": "fp16", "bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32",
          "float32": "fp32", "float": "fp32"}


MAX_SEEDS = 100_000  # seeds of one --seeds spec, all ranges together


def parse_seeds(spec: str | list | int | None) -> list[int] | None:
    """``"0-9"``, ``"0,1,5"``, ``"0-3,10"`` or a list → sorted unique ints (≥ 0; at most ``MAX_SEEDS`` in all)."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, (list, tuple)):
        items = [str(s) for s in spec]
    else:
        items = [s.strip() for s in str(spec).split(",")]
    ranges: list[tuple[int, int]] = []
    for it in items:
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", it)
        if not m:
            raise BadInput(f"--seeds: cannot read {it!r}; use e.g. 0-9 or 0,1,2 (non-negative integers)")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else a
        if b < a:
            raise BadInput(f"--seeds: range {it!r} is empty; write the smaller number first (e.g. 0-9)")
        ranges.append((a, b))
    # the cap holds for the whole spec (counted before any range is expanded: a per-range cap let a list of
    # ranges expand to gigabytes); overlapping ranges count twice, which errs on the safe side
    total = sum(b - a + 1 for a, b in ranges)
    if total > MAX_SEEDS:
        raise BadInput(f"--seeds: {total:,} seeds in all; at most {MAX_SEEDS:,} (e.g. 0-{MAX_SEEDS - 1})")
    out: set[int] = set()
    for a, b in ranges:
        out.update(range(a, b + 1))
    return sorted(out)


def resolve_offline(flag: bool) -> bool:
    """``--offline`` or ``MEMOBENCH_OFFLINE``: also set the Hugging Face libraries' offline switches; returns it."""
    if flag or os.environ.get("MEMOBENCH_OFFLINE"):
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ[v] = "1"
        return True
    return False


def parse_kv(pairs: list[str] | None, what: str) -> dict:
    """``["k=v", ...]`` → dict (values stay strings; plugins coerce them to their Params types)."""
    out: dict = {}
    for p in pairs or []:
        if "=" not in p or not p.split("=", 1)[0].strip():
            raise BadInput(f"{what}: expected KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def load_config_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"--config: file not found: {p}; pass an existing .json/.toml/.yaml file")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        elif p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise BadInput(f"--config: unsupported file type {p.suffix!r}; use .json, .toml or .yaml")
    except BadInput:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadInput(f"--config: cannot parse {p}: {first}") from None
    if not isinstance(data, dict):
        raise BadInput(f"--config: {p} must contain a mapping of run settings")
    return data


def config_from_dict(data: dict, base: RunConfig | None = None) -> RunConfig:
    cfg = dataclasses.replace(base) if base else RunConfig()
    names = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise BadInput(f"config: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    for k, v in data.items():
        if k in ("seeds", "utility_seeds"):
            v = parse_seeds(v)
        setattr(cfg, k, v)
    validate(cfg)
    return cfg


def check_device(device: Any) -> str:
    """``device`` if this machine's torch offers it: ``cpu``; ``cuda`` / ``cuda:N`` (N < the number of CUDA devices)
    when CUDA is available; ``mps`` when ``torch.backends.mps.is_available()``. Otherwise :class:`BadInput`.
    (torch is imported only for a device other than ``cpu``.)"""
    m = re.fullmatch(r"cpu|cuda(?::(\d+))?|mps", device) if isinstance(device, str) else None
    if m is None:
        raise BadInput(f"--device: unknown {device!r}; use cpu, cuda, cuda:N or mps")
    if device == "cpu":
        return device
    import torch

    if device == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise BadInput("--device mps: Apple's MPS backend is not available here "
                           "(torch.backends.mps.is_available() is False); use --device cpu"
                           + (" or cuda" if torch.cuda.is_available() else ""))
        return device
    if not torch.cuda.is_available():
        raise BadInput(f"--device {device}: no CUDA device is available here; use --device cpu")
    n = torch.cuda.device_count()
    if m.group(1) is not None and int(m.group(1)) >= n:
        raise BadInput(f"--device {device}: this machine has {n} CUDA device{'s' if n != 1 else ''} "
                       f"(cuda:0{f' … cuda:{n - 1}' if n > 1 else ''}); use one of those or --device cuda")
    return device


def check_finite(value: Any, what: str) -> Any:
    """``value`` if it holds no NaN or infinite float (a float, or a list/tuple of them); otherwise :class:`BadInput`
    naming ``what`` (e.g. "mitigation 'wen' parameter lr")."""
    items = value if isinstance(value, (list, tuple)) else (value,)
    for v in items:
        if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral) and not math.isfinite(v):
            raise BadInput(f"{what}: must be a finite number, got {v!r}; give a finite value")
    return value


# ------------------------------------------------------------------------------------------------ strict JSON
def _non_finite_token(f: float) -> str:
    return "NaN" if f != f else ("+inf" if f > 0 else "-inf")


def make_finite(obj: Any, path: str = "") -> tuple[Any, dict[str, str]]:
    """``obj`` with every NaN / ±Infinity float replaced by ``None`` (dicts and lists in place; tuples become lists),
    and ``{JSON pointer (RFC 6901): "NaN" | "+inf" | "-inf"}`` of what was replaced. A dict whose ``value`` was
    replaced (a metric record) also gets ``"non_finite": token`` (the leaderboard reads both; see
    :mod:`memobench.leaderboard`)."""
    found: dict[str, str] = {}

    def fix(x: Any, where: str) -> Any:
        if isinstance(x, numbers.Real) and not isinstance(x, numbers.Integral):
            f = float(x)
            if not math.isfinite(f):
                found[where] = _non_finite_token(f)
                return None
            return x
        if isinstance(x, dict):
            v = x.get("value")
            for k in list(x):
                x[k] = fix(x[k], f"{where}/{str(k).replace('~', '~0').replace('/', '~1')}")
            if v is not None and x.get("value") is None and "non_finite" not in x:
                x["non_finite"] = _non_finite_token(float(v))
            return x
        if isinstance(x, list):
            for i, v in enumerate(x):
                x[i] = fix(v, f"{where}/{i}")
            return x
        if isinstance(x, tuple):
            return [fix(v, f"{where}/{i}") for i, v in enumerate(x)]
        return x

    return fix(obj, path), found


def dumps_strict(obj: Any, **kw: Any) -> str:
    """``json.dumps(obj, allow_nan=False, **kw)``: strict JSON (RFC 8259 has no NaN or Infinity).

    A non-finite float becomes ``null`` and the reason is recorded (:func:`make_finite`): when ``obj`` is a dict, in
    ``obj["non_finite_values"]`` (JSON pointer -> "NaN" / "+inf" / "-inf", merged with any already there), so a
    reader can tell a non-finite value from a missing one. ``obj`` is changed in place (dicts, lists), so the
    caller's copy equals what was written."""
    obj, found = make_finite(obj)
    if found and isinstance(obj, dict):
        old = obj.get("non_finite_values")
        obj["non_finite_values"] = {**(old if isinstance(old, dict) else {}), **found}
    return json.dumps(obj, allow_nan=False, **kw)


PLUGIN_FIELDS = ("model", "mitigation", "attack")  # unset (None): the registry's default of that kind


def resolve_defaults(cfg: RunConfig, registry) -> RunConfig:
    """``cfg`` with every unset plugin of :data:`PLUGIN_FIELDS` set (in place) to the registry's default of its kind
    (:meth:`memobench.registry.Registry.default`), before anything is hashed: a run that names the defaults and one
    that leaves them out are the same run."""
    for kind in PLUGIN_FIELDS:
        if getattr(cfg, kind) is None:
            setattr(cfg, kind, registry.default(kind))
    return cfg


def validate(cfg: RunConfig) -> None:
    def pos_int(name: str, v: Any, allow_none: bool = True) -> None:
        if v is None and allow_none:
            return
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise BadInput(f"{name.replace('_', '-')}: must be a positive integer, got {v!r}")

    for n in ("limit", "utility_limit", "num_inference_steps", "height", "width"):
        pos_int(n, getattr(cfg, n))
    pos_int("batch_size", cfg.batch_size, allow_none=False)
    g = cfg.guidance_scale
    if g is not None and (not isinstance(g, (int, float)) or isinstance(g, bool) or not math.isfinite(g) or g < 0):
        raise BadInput(f"--guidance (guidance_scale): must be a finite number ≥ 0, got {g!r}; e.g. --guidance 7.5")
    for n in ("height", "width"):
        v = getattr(cfg, n)
        if v is not None and v % 8:
            raise BadInput(f"{n}: must be a multiple of 8, got {v}")
    if cfg.dtype is not None:
        d = DTYPES.get(str(cfg.dtype).lower())
        if d is None:
            raise BadInput(f"--dtype: unknown {cfg.dtype!r}; use fp16, bf16 or fp32")
        if d in ("fp16", "bf16") and not str(cfg.device or "cpu").startswith("cuda"):
            raise BadInput(f"--dtype {d}: half precision runs on a GPU only; add --device cuda, or use --dtype fp32 "
                           "on CPU")
        cfg.dtype = d
    check_device(cfg.device)
    for n in ("model_params", "prompt_params", "mitigation_params", "attack_params", "metric_params"):
        if not isinstance(getattr(cfg, n), dict):
            raise BadInput(f"{n}: must be a mapping")
