"""Issue 25: every built-in mitigation and attack, end to end through the CLI, on the SD v1.4 and SD 2 *layouts*
(``--model sd-random --model-param size=reduced``: every block, layer, head and the 77×768 / 77×1024 text embeddings
as in the real checkpoints, UNet/VAE widths / 8), asserting the shapes the hooks saw.

Plugin parameters are cut to the smallest budgets that still run every phase (fit, attack, generate, score); the
full-size, default-budget runs are described in README "Real models"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memobench.cli import main

# the smallest budgets that still run every phase of each plugin
FAST = {
    "nemo": ["stats_limit=3", "samples_per_prompt=2"],
    "wanda": ["num_inference_steps=4", "timesteps=2"],
    "wanda10": ["num_inference_steps=4", "timesteps=2"],
    "advft": ["epochs=1", "steps_per_epoch=1", "dori_steps=2", "dori_batch=2", "n_regular=4", "regular_batch=2",
              "surrogate_tries=1", "inits=prompt", "surrogate_params=stats_limit=3;samples_per_prompt=2"],
    "cfg_switch": [],  # no budget: its dynamic default runs as is (a guidance in the loop, no optimisation)
    "init_noise": ["max_iters=2"],
    "memattn": [],  # no budget: one logit edit per cross-attention call
    "wen_train": ["steps=1", "batch=2", "mem_fraction=0.5", "n_regular=2"],
    "sail": ["max_steps=2", "max_rounds=1"],
    "bright_ending": ["max_iters=2"],
}
ATTACK_FAST = {"dori": ["steps=3", "batch=2"], "extraction": ["samples=3", "tiles=4"],
               "onestep": ["candidates=3", "mode=blackbox", "edge_size=0"],
               "trigger_search": ["proposals=2", "candidates=3", "init_prompt=a photo of a dog"]}
SIZE = 64  # pixels: 8×8 latents


@pytest.fixture
def shapes(monkeypatch):
    """Record what the cross-attention value projections, the FFN output layers and the UNet saw in every run."""
    import memobench.model as M

    seen = {"to_v": {}, "ff": set(), "unet_sample": set(), "embeds": set(), "pred_type": set(), "proj_in": set()}
    orig = M.DiffusionModel.__init__

    def init(self, pipe, *a, **kw):
        orig(self, pipe, *a, **kw)
        seen["pred_type"].add(self.prediction_type)
        for name, mod in self.unet.named_modules():
            if name.endswith("attn2.to_v"):
                mod.register_forward_pre_hook(lambda m, args, n=name: seen["to_v"].setdefault(n, set()).add(
                    tuple(args[0].shape[1:])))
            elif name.endswith("ff.net.2"):
                mod.register_forward_pre_hook(lambda m, args, n=name: seen["ff"].add(n))
            elif name.endswith("proj_in"):
                seen["proj_in"].add(type(mod).__name__)
        def unet_hook(m, args, kwargs):
            seen["unet_sample"].add(tuple(args[0].shape[1:]))
            seen["embeds"].add(tuple(kwargs["encoder_hidden_states"].shape[1:]))

        self.unet.register_forward_pre_hook(unet_hook, with_kwargs=True)

    monkeypatch.setattr(M.DiffusionModel, "__init__", init)
    return seen


def _run(tmp_path, arch, mitigation, attack, capsys):
    args = ["run", "--model", "sd-random", "--model-param", f"arch={arch}", "--model-param", "size=reduced",
            "--mitigation", mitigation, "--attack", attack, "--height", str(SIZE), "--width", str(SIZE),
            "--steps", "2", "--seeds", "0", "--limit", "1", "--metric", "mr", "--metric", "sscd_orig",
            "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--json"]
    for kv in FAST.get(mitigation, []):
        args += ["--mitigation-param", kv]
    for kv in ATTACK_FAST.get(attack, []):
        args += ["--attack-param", kv]
    rc = main(args)
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    return json.loads(out.out)


def _check_layout(seen, arch):
    d = 768 if arch == "sd14" else 1024
    assert len(seen["to_v"]) == 16  # 16 cross-attention layers, every one reached
    assert all(s == {(77, d)} for s in seen["to_v"].values()), seen["to_v"]
    assert len([n for n in seen["to_v"] if n.startswith(("down_blocks", "mid_block"))]) == 7  # NeMo's value layers
    assert len(seen["ff"]) == 16
    assert seen["embeds"] == {(77, d)}
    assert seen["unet_sample"] == {(4, SIZE // 8, SIZE // 8)}  # one resolution for every phase: the run's
    assert seen["pred_type"] == {"epsilon" if arch == "sd14" else "v_prediction"}
    assert seen["proj_in"] == ({"Conv2d"} if arch == "sd14" else {"Linear"})


@pytest.mark.parametrize("mitigation", ["none", "nemo", "wanda", "wanda10", "wen", "rta", "rna", "advft",
                                        "cfg_switch", "init_noise", "sail", "memattn", "bright_ending", "wen_train"])
def test_every_mitigation_sd14_layout(tmp_path, shapes, capsys, mitigation):
    res = _run(tmp_path, "sd14", mitigation, "none", capsys)
    assert res["mitigation"]["name"] == mitigation and res["metrics"]["mr"]["n"] == 1
    assert res["generation"]["height"] == SIZE and res["model"]["revision_or_sha256"].startswith("sha256:")
    _check_layout(shapes, "sd14")


@pytest.mark.parametrize("attack", ["prompt", "dori", "extraction", "onestep", "trigger_search"])
def test_every_attack_sd14_layout(tmp_path, shapes, capsys, attack):
    res = _run(tmp_path, "sd14", "nemo", attack, capsys)
    assert res["config"]["attack"] == attack
    assert "mr" in res["metrics"]
    if attack != "prompt":  # a real attack: the result pairs it with the mitigation alone
        assert "mr" in res["metrics_without_attack"] and res["attack_traces"]
    _check_layout(shapes, "sd14")


@pytest.mark.parametrize("mitigation,attack", [("nemo", "dori"), ("wen", "none")])
def test_sd2_layout(tmp_path, shapes, capsys, mitigation, attack):
    res = _run(tmp_path, "sd2", mitigation, attack, capsys)
    assert res["model"]["plugin"]["params"]["arch"] == "sd2"
    _check_layout(shapes, "sd2")


def test_sd_random_weights_seeded_and_identified(tmp_path):
    """Same seed, same weights and identity; another seed, other weights (so never the same cache keys)."""
    from memobench.api import Context
    from memobench.registry import get_registry

    cls = get_registry().get("model", "sd-random")
    ctx = Context(cache_dir=Path(tmp_path))
    a = cls(cls.make_params({"size": "reduced"})).load(ctx)
    b = cls(cls.make_params({"size": "reduced"})).load(ctx)
    c = cls(cls.make_params({"size": "reduced", "seed": "1"})).load(ctx)
    assert a.identity()["revision_or_sha256"] == b.identity()["revision_or_sha256"]
    assert a.identity()["revision_or_sha256"] != c.identity()["revision_or_sha256"]
    with pytest.raises(ValueError, match="arch"):
        cls(cls.make_params({"arch": "sd3"}))


def test_attack_cache_is_per_resolution(tmp_path, shapes, capsys):
    """DoRI encodes the training image at the run's size: a 128-px run must not reuse the 64-px run's embedding."""
    global SIZE
    a = _run(tmp_path, "sd14", "none", "dori", capsys)
    old, SIZE = SIZE, 128
    try:
        shapes["unet_sample"].clear()
        b = _run(tmp_path, "sd14", "none", "dori", capsys)  # same cache folder
    finally:
        SIZE = old
    (pa,) = a["attack_traces"]
    assert a["attack_traces"][pa]["attack_key"] != b["attack_traces"][pa]["attack_key"]
    assert (4, 16, 16) in shapes["unet_sample"]  # the attack ran again, at 16×16 latents


# the smallest settings that still run every part of each detector, at SIZE (nemo has no size: the model's 512 px)
DETECT_FAST = {
    "wen": {"seeds": "0", "num_inference_steps": "2"},
    "nemo": {"samples": "2"},
    "memattn": {"num_inference_steps": "2"},
    "sail": {"samples": "1"},
    "anisotropy": {},
    "bright_ending": {"seeds": "0", "num_inference_steps": "2"},
}


@pytest.mark.parametrize("detector", list(DETECT_FAST))
def test_every_detector_sd14_layout(tmp_path, shapes, detector):
    """Each detector scores one prompt on the SD v1.4 layout: every cross-attention layer sees 77×768 embeddings."""
    import math

    from memobench.api import open_model
    from memobench_plugins.detect.bench import make_detector

    session = open_model("sd-random", {"arch": "sd14", "size": "reduced"}, cache_dir=tmp_path / "cache")
    params = dict(DETECT_FAST[detector])
    if detector != "nemo":
        params.update(height=str(SIZE), width=str(SIZE))
    det = make_detector(detector, params, session.generation)
    out = det.score(session.model, "a photo of a cat sitting on a red mat")
    assert math.isfinite(out["score"])
    assert len(shapes["to_v"]) == 16 and all(s == {(77, 768)} for s in shapes["to_v"].values()), shapes["to_v"]
    assert shapes["embeds"] == {(77, 768)} and len(shapes["ff"]) == 16 and shapes["pred_type"] == {"epsilon"}
    side = 64 if detector == "nemo" else SIZE // 8
    assert shapes["unet_sample"] == {(4, side, side)}
