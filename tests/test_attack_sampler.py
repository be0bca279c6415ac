"""Attacks see the deployed system as a black box (``ctx.generate``: images under the run's mitigation) and may
choose the initial noise of the images the runner then generates and scores (``Conditioning.latents``), which is
how generate-and-filter attacks publish their picks. Checked on the embedded model with a stub attack: the
sampler's images equal the runner's images for the same seeds, and the runner's images follow the chosen noise."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from memobench import hookimpl
from memobench.api import Attack, AttackOutput, Conditioning, param
from memobench.config import RunConfig
from memobench.registry import register_object, unregister_object
from memobench.runner import Runner

SEEN: dict = {}


class PickSeeds(Attack):
    """Samples seeds 5 and 6 through ctx.generate, then publishes them in place of the run's seeds 0 and 1."""

    name = "pick-seeds-test"
    version = "0"
    budget_param = "n"
    budget_unit = "samples"

    @dataclass
    class Params:
        n: int = param(2, "samples")

    def run(self, model, prompt, reference, ctx):
        SEEN["images"] = ctx.generate(prompt, [5, 6])
        g = ctx.generation
        lat = model.initial_latents([5, 6], g["height"], g["width"])
        cond = Conditioning(model.encode_prompt(prompt.text), model.empty_embedding(), latents=lat)
        return AttackOutput(cond, trace={"picked": [5, 6]})


def test_sampler_and_chosen_latents(tmp_path):
    SEEN.clear()
    _CACHE[:] = [tmp_path / "c"]
    plugin = SimpleNamespace(register_attacks=hookimpl(lambda register: register(PickSeeds)))
    register_object(plugin, "pick-seeds-test")
    try:
        common = dict(model="tiny", limit=1, num_inference_steps=2, metrics=["mr"], cache_dir=str(tmp_path / "c"),
                      offline=True, output_dir=str(tmp_path / "out"))
        out = Runner(RunConfig(attack="pick-seeds-test", seeds=[0, 1], **common), progress=False).run()
        plain = Runner(RunConfig(attack="none", seeds=[5, 6], **common), progress=False).run()
    finally:
        unregister_object("pick-seeds-test")
    assert PickSeeds().budget() == 2.0
    attacked = [np.asarray(s) for s in _images(out)]
    reference = [np.asarray(s) for s in _images(plain)]
    assert len(SEEN["images"]) == 2 and SEEN["images"][0].dtype == np.uint8
    for a, b, c in zip(attacked, reference, SEEN["images"]):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # runner: seeds 0, 1 with the noise of 5, 6
        assert np.abs(c.astype(int) - b.astype(int)).max() <= 1  # sampler: the same images
    assert not np.array_equal(attacked[0], attacked[1])
    (trace,) = out.result["attack_traces"].values()
    assert trace["picked"] == [5, 6]


def _images(outcome):
    """The run's target images, in seed order, read from the image cache (the samples table names their paths)."""
    import json

    from PIL import Image

    rows = [json.loads(line) for line in open(outcome.samples_path)]
    rows = sorted((r for r in rows if r["role"] == "target"), key=lambda r: r["seed"])
    root = _CACHE[0]
    return [np.asarray(Image.open(root / r["image_path"]).convert("RGB")) for r in rows]


_CACHE: list = []
