"""The Context a Runner hands to a mitigation's fit carries what plugins rely on: the targets' training images
(``ctx.reference_images``), the model's prompt-set roles and the run's registry (``ctx.plugin``). advft needs all
three; a refactor that dropped them once made every advft run fail only at benchmark time."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np

from memobench import hookimpl
from memobench.api import Mitigation
from memobench.config import RunConfig
from memobench.registry import register_object, unregister_object
from memobench.runner import Runner

SEEN: dict = {}


class ContextProbe(Mitigation):
    """Records what fit() receives; changes nothing."""

    name = "ctx-probe-test"
    version = "0"
    kind = "weights"

    def fit(self, model, prompts, ctx):
        SEEN["refs"] = {p.id: ctx.reference_images(p) for p in prompts}
        SEEN["prompt_sets"] = dict(ctx.model_prompt_sets)
        SEEN["attack_cls"] = type(ctx.plugin("attack", "none", {})).__name__

    @contextlib.contextmanager
    def apply(self, model, prompt, ctx):
        yield


def test_fit_context_has_references_prompt_sets_and_registry(tmp_path):
    SEEN.clear()
    plugin = SimpleNamespace(register_mitigations=hookimpl(lambda register: register(ContextProbe)))
    register_object(plugin, "ctx-probe-test")
    try:
        cfg = RunConfig(model="tiny", mitigation="ctx-probe-test", limit=1, seeds=[0], utility_limit=1,
                        num_inference_steps=2, metrics=["mr"], output_dir=str(tmp_path / "out"),
                        cache_dir=str(tmp_path / "cache"), offline=True)
        Runner(cfg, progress=False).run()
    finally:
        unregister_object("ctx-probe-test")
    (refs,) = SEEN["refs"].values()
    assert refs and isinstance(refs[0], np.ndarray) and refs[0].ndim == 3 and refs[0].dtype == np.uint8
    assert SEEN["prompt_sets"].get("regular") == "tiny-general"
    assert SEEN["attack_cls"]
