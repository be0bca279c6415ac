"""memobench-example: a minimal third-party memobench plugin (the worked example of ``docs/plugins.md``).

It registers one inference-time mitigation, ``example-noise``. The module imports only memobench's public plugin
API (:mod:`memobench.api`) and no torch at import time, so that ``memobench --help``,
``memobench plugins`` and ``memobench ls`` stay fast; torch is imported inside the method that needs it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from memobench.api import BadInput, Conditioning, Mitigation, hookimpl, param

__version__ = "0.1.0"


class ExampleNoise(Mitigation):
    """Adds seeded Gaussian noise (std ``scale``) to the prompt embedding at inference time.

    For each prompt, ``condition`` returns the prompt embedding (1×77×d) plus ``scale`` × N(0, I) noise drawn
    from a CPU ``torch.Generator`` seeded from ``(seed, sha256 of the prompt text)``: the same prompt always gets
    the same noise (so cached images stay valid), different prompts get different noise. The negative (empty
    prompt) embedding is left unchanged, and the noise does not depend on the image seed. ``scale = 0`` is the
    unmitigated model.

    An illustration of the plugin API (a perturbation of the text conditioning), not a published method.
    """

    name = "example-noise"
    version = "1"
    kind = "inference"  # changes the conditioning while sampling; no fit step, no weight edits

    @dataclass
    class Params:
        scale: float = param(0.1, "standard deviation of the noise, in units of the text-encoder output")
        seed: int = param(0, "base seed of the noise generator")

        def __post_init__(self):
            if self.scale < 0:
                raise BadInput(f"mitigation 'example-noise' parameter scale must be ≥ 0, got {self.scale}")

    def noise_seed(self, prompt_text: str) -> int:
        digest = hashlib.sha256(f"{self.params.seed}:{prompt_text}".encode("utf-8")).hexdigest()
        return int(digest[:15], 16)

    def condition(self, model, prompt, cond: Conditioning, latents, ctx) -> Conditioning:
        import torch

        seed = self.noise_seed(prompt.text)
        pe = cond.prompt_embeds
        noise = torch.randn(tuple(pe.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        noisy = pe + self.params.scale * noise.to(device=pe.device, dtype=pe.dtype)
        trace = {**cond.trace, "example_noise": {"seed": seed, "scale": self.params.scale}}
        return Conditioning(noisy, cond.negative_prompt_embeds, text=cond.text, trace=trace)


@hookimpl
def register_mitigations(register):
    """Called once by memobench's registry; ``register`` takes a class (and optional ``aliases``)."""
    register(ExampleNoise)
