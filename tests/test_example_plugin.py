"""The documented third-party plugin ``examples/memobench-example``, installed the way a user installs one.

It is built and installed (``uv pip install --no-deps --target``) from a copy of its folder into a temp
directory, which subprocesses get on ``PYTHONPATH``; memobench must discover it through its ``memobench`` entry
point, list it, and run its mitigation on the tiny random pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "memobench-example"
DIST = "memobench-example"


@pytest.fixture(scope="module")
def example_target(tmp_path_factory) -> Path:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    root = tmp_path_factory.mktemp("example-plugin")
    src = root / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "dist", "__pycache__"))
    target = root / "site"
    try:  # setuptools is in the venv: build without an isolated (downloaded) build environment
        import setuptools  # noqa: F401

        isolation = ["--no-build-isolation"]
    except ImportError:
        isolation = []
    res = subprocess.run([uv, "pip", "install", "--no-deps", *isolation, "--python", sys.executable,
                          "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert (target / "memobench_example" / "__init__.py").is_file()
    return target


def _env(target: Path) -> dict:
    pp = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH", "")) if p)
    # the suite loads only memobench's own entry points (conftest); name the example's distribution too
    return {"PYTHONPATH": pp, "MEMOBENCH_LOAD_PLUGINS": f"memobench,{DIST}"}


def test_plugins_lists_the_installed_example(cli, example_target):
    res = cli(["plugins", "--json"], env=_env(example_target))
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["failed"] == []
    (entry,) = [p for p in data["plugins"] if p["name"] == "example-noise"]
    assert (entry["kind"], entry["version"], entry["plugin"], entry["dist"]) == ("mitigation", "1", "example", DIST)
    assert entry["origin"].startswith(str(example_target / "memobench_example" / "__init__.py") + ":")
    (dist,) = [d for d in data["distributions"] if d["dist"] == DIST]
    assert (dist["name"], dist["version"], dist["hooks"]) == ("example", "0.1.0", ["register_mitigations"])

    # not loaded when MEMOBENCH_LOAD_PLUGINS leaves it out
    res = cli(["plugins", "--json"], env={**_env(example_target), "MEMOBENCH_LOAD_PLUGINS": "memobench"})
    assert "example-noise" not in {p["name"] for p in json.loads(res.stdout)["plugins"]}


def test_run_with_the_example_mitigation(cli, example_target, tiny_args, tmp_path):
    out = tmp_path / "out"
    args = tiny_args(tmp_path / "cache", out, "--mitigation", "example-noise", "--mitigation-param", "scale=0.5",
                     "--limit", "1", "--seeds", "0-1", "--steps", "2", "--no-progress")
    res = cli(args, env=_env(example_target))
    assert res.returncode == 0, res.stderr
    (path,) = out.rglob("*.json")
    assert path.parent.name == "example-noise__none"
    result = json.loads(path.read_text())
    assert result["status"] == "partial" and result["errors"] == []
    assert result["mitigation"] == {"name": "example-noise", "version": "1", "kind": "inference", "dist": DIST,
                                    "params": {"scale": 0.5, "seed": 0}, "report": {}}
    rows = [json.loads(x) for x in (path.parent / result["samples_file"]).read_text().splitlines()]
    assert len(rows) == 2 and all(r["image_sha256"] for r in rows)


def test_example_noise_condition(example_target, monkeypatch):
    """The mitigation itself: seeded per prompt, std ≈ scale, negative embedding untouched, scale 0 = identity."""
    import torch

    monkeypatch.syspath_prepend(str(example_target))
    import memobench_example as ex

    from memobench.api import Conditioning, Prompt

    pe, ne = torch.zeros(1, 77, 64), torch.ones(1, 77, 64)
    p, q = Prompt("a", "a photo of a cat"), Prompt("b", "a photo of a dog")

    def cond(prompt, **params):
        m = ex.ExampleNoise(ex.ExampleNoise.make_params(params))
        return m.condition(None, prompt, Conditioning(pe, ne, text=prompt.text), None, None)

    a1, a2, b = cond(p, scale="0.5"), cond(p, scale="0.5"), cond(q, scale="0.5")
    assert torch.equal(a1.prompt_embeds, a2.prompt_embeds) and not torch.equal(a1.prompt_embeds, b.prompt_embeds)
    assert abs(a1.prompt_embeds.std().item() - 0.5) < 0.02
    assert a1.negative_prompt_embeds is ne and a1.trace["example_noise"]["scale"] == 0.5
    assert not torch.equal(cond(p, scale="0.5", seed="1").prompt_embeds, a1.prompt_embeds)
    assert torch.equal(cond(p, scale="0").prompt_embeds, pe)
    with pytest.raises(ValueError, match="scale must be ≥ 0"):
        ex.ExampleNoise.make_params({"scale": "-0.1"})
    assert "torch" not in ex.__dict__  # the plugin module imports no torch at import time
