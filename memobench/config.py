"""Run configuration: what determines a run, parsed from a config file and/or CLI flags.

A run = (model, prompt set, mitigation, attack, metrics, seeds, generation settings). Unset generation
settings take the model plugin's defaults; the resolved config is written into every result and hashed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class BadInput(Exception):
    """Invalid user input: the message is one line naming the input and the fix (CLI exit code 2)."""


@dataclass
class RunConfig:
    model: str = "tiny"
    model_params: dict = field(default_factory=dict)
    prompts: str | None = None  # target prompt set; None = the model's default
    prompt_params: dict = field(default_factory=dict)
    mitigation: str = "none"
    mitigation_params: dict = field(default_factory=dict)
    attack: str = "none"
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

    # fields that do not change what is computed (excluded from the config hash)
    NON_IDENTITY = ("batch_size", "output_dir", "cache_dir", "offline", "device")

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        if d.get("dtype") is None:  # unset: the hash of every run from before --dtype existed stays the same
            d.pop("dtype", None)
        return {k: v for k, v in d.items() if k not in self.NON_IDENTITY}


DTYPES = {"fp16": "fp16", "float16": "fp16", "half": "fp16", "bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32",
          "float32": "fp32", "float": "fp32"}


def parse_seeds(spec: str | list | int | None) -> list[int] | None:
    """``"0-9"``, ``"0,1,5"``, ``"0-3,10"`` or a list → sorted unique ints (≥ 0)."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, (list, tuple)):
        items = [str(s) for s in spec]
    else:
        items = [s.strip() for s in str(spec).split(",")]
    out: set[int] = set()
    for it in items:
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", it)
        if not m:
            raise BadInput(f"--seeds: cannot read {it!r}; use e.g. 0-9 or 0,1,2 (non-negative integers)")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else a
        if b < a:
            raise BadInput(f"--seeds: range {it!r} is empty; write the smaller number first (e.g. 0-9)")
        if b - a > 100_000:
            raise BadInput(f"--seeds: range {it!r} is too large (more than 100,000 seeds)")
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


def validate(cfg: RunConfig) -> None:
    def pos_int(name: str, v: Any, allow_none: bool = True) -> None:
        if v is None and allow_none:
            return
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise BadInput(f"{name.replace('_', '-')}: must be a positive integer, got {v!r}")

    for n in ("limit", "utility_limit", "num_inference_steps", "height", "width"):
        pos_int(n, getattr(cfg, n))
    pos_int("batch_size", cfg.batch_size, allow_none=False)
    if cfg.guidance_scale is not None and (not isinstance(cfg.guidance_scale, (int, float)) or cfg.guidance_scale < 0):
        raise BadInput(f"guidance-scale: must be a number ≥ 0, got {cfg.guidance_scale!r}")
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
    if not isinstance(cfg.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?|mps", cfg.device):
        raise BadInput(f"--device: unknown {cfg.device!r}; use cpu, cuda or cuda:N")
    for n in ("model_params", "prompt_params", "mitigation_params", "attack_params", "metric_params"):
        if not isinstance(getattr(cfg, n), dict):
            raise BadInput(f"{n}: must be a mapping")
