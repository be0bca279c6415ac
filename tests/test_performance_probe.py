"""benchmarks/performance.py: the per-phase UNet call counts of a small run are the ones its plan implies."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _perf():
    spec = importlib.util.spec_from_file_location("performance", ROOT / "benchmarks" / "performance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    perf = _perf()
    tmp = tmp_path_factory.mktemp("perf")
    kw = dict(limit=2, seeds=[0, 1, 2], num_inference_steps=3, utility_limit=4, metrics=["mr", "tiny_alignment"],
              metric_params={}, budget_sweep=False)
    cold = perf.run_once("none", "none", tmp / "cache", tmp / "out", **kw)
    warm = perf.run_once("none", "none", tmp / "cache", tmp / "out2", **kw)
    return cold, warm


def test_unet_calls_per_phase_follow_the_plan(runs):
    cold, warm = runs
    ph = cold["phases"]
    # targets: 2 prompts, one batch of 3 seeds each (batch size 16), 3 steps, CFG: 3 calls of 6 samples per prompt
    assert (ph["generate targets"]["unet_calls"], ph["generate targets"]["unet_samples"]) == (6, 36)
    # utility (tiny_alignment): 4 prompts × 1 seed batched across prompts (a prompt-independent "none"): 3 calls of 8
    assert (ph["generate other"]["unet_calls"], ph["generate other"]["unet_samples"]) == (3, 24)
    assert sum(p["unet_grad_calls"] for p in ph.values()) == 0  # no attack, no fit: nothing differentiates the UNet
    assert cold["unet_calls"] == 9
    # warm: everything cached, no UNet call, the same figures
    assert warm["unet_calls"] == 0 and warm["figures"] == cold["figures"]
    assert all(p["wall_s"] >= 0 for p in ph.values()) and cold["peak_rss_mb"] > 0


def test_report_renders_both_states(runs, tmp_path, capsys):
    import json

    perf = _perf()
    cold, warm = runs
    doc = {"mode": "headline", "pairs": [["none", "none"]], "environment": {"git": "x", "torch_threads": 1,
           "date": "d", "argv": ["performance.py"]},
           "runs": {"cold": {"wall_s": cold["wall_s"], "runs": [cold], "peak_rss_mb": 1.0},
                    "warm": {"wall_s": warm["wall_s"], "runs": [warm], "peak_rss_mb": 1.0}}}
    f = tmp_path / "m.json"
    f.write_text(json.dumps(doc))
    perf.main(["report", str(f)])
    text = capsys.readouterr().out
    assert "### cold (empty cache)" in text and "### warm (everything cached)" in text
    assert "| generate targets |" in text and "6 / 36" in text


def test_nemo_utility_images_are_batched_across_prompts(tmp_path):
    """Every utility prompt gets NeMo's union set (Mitigation.apply_group): their images are denoised in one batch,
    not one UNet call per prompt and step."""
    perf = _perf()
    r = perf.run_once("nemo", "none", tmp_path / "cache", tmp_path / "out", limit=1, seeds=[0, 1, 2],
                      num_inference_steps=3, utility_limit=4, metrics=["mr", "tiny_alignment"], metric_params={},
                      budget_sweep=False)
    # the target prompt's 3 images (its own set): 3 calls of 6; the 4 utility images (the union): 3 calls of 8
    assert (r["phases"]["generate targets"]["unet_calls"], r["phases"]["generate targets"]["unet_samples"]) == (3, 18)
    assert (r["phases"]["generate other"]["unet_calls"], r["phases"]["generate other"]["unet_samples"]) == (3, 24)
    assert r["phases"]["fit"]["unet_calls"] >= 1  # NeMo localized the target prompt


def test_result_records_where_its_images_were_computed(runs):
    """Sidecars and the result record the device and CPU thread count of every image (same seed → same bytes only
    for the same thread count): a cold run's images are all this process's."""
    import torch

    cold, _ = runs
    assert cold["image_provenance"] == {f"cpu, {torch.get_num_threads()} thread(s)": 2 * 3 + 4}
