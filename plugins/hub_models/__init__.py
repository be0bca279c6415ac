"""Real Stable Diffusion checkpoints from the Hugging Face hub (or a local copy), as the papers use them.

* ``sd-v1-4`` — ``CompVis/stable-diffusion-v1-4``: the model of NeMo, Wen et al., MemBench and DoRI
  (METHODS §1.1). Defaults: preset ``nemo2024`` generation (DDIM 50 steps, guidance 7, 512×512, 10 seeds).
* ``sd-v2-0`` — ``stabilityai/stable-diffusion-2-base`` (512×512, ε-prediction), DoRI's generalization model.
  Which SD 2.0 checkpoint DoRI used is unpublished: this choice is a parameter (``path``).
* ``sd`` — any ``StableDiffusionPipeline`` folder or hub id given as ``path``.

Weights load through ``StableDiffusionPipeline.from_pretrained`` with ``use_safetensors=True`` (no pickles);
``--offline`` accepts only local folders or the local Hugging Face cache.

Pinning (``memobench.model.DiffusionModel.from_pretrained``): a hub id is first resolved to a snapshot folder at
``revision`` (a branch, tag or commit; default ``main``), and the commit it resolved to is recorded in the result
(``model.source``). The weights are identified by the sha256 of the folder's safetensors and config files — the same
online, offline, or from a local copy — and that identity enters every cache key, so a changed snapshot never reuses
cached images. ``sha256`` pins the identity: other weights are refused with one line. For reproducible papers' numbers
pass both (``--model-param revision=<commit> --model-param sha256=<identity from a result>``).
"""

from __future__ import annotations

from dataclasses import dataclass

from memobench.api import BadInput, ModelPlugin, hookimpl, param

_SD1_METRICS = ["mr", "sscd_orig"]


class _HubModel(ModelPlugin):
    generation = {"num_inference_steps": 50, "guidance_scale": 7.0, "height": 512, "width": 512}
    default_seeds = tuple(range(10))
    default_metrics = _SD1_METRICS

    @dataclass
    class Params:
        path: str = param("", "local pipeline folder or hub id to load instead of the plugin's hub id ('' = its own)")
        revision: str = param("", "hub branch, tag or commit ('' = main); the resolved commit is recorded")
        sha256: str = param("", "pin of the weights identity (sha256 of the pipeline folder's files); '' = no pin")
        dtype: str = param("float32", "float16 / bfloat16 on GPU")

    def load(self, ctx):
        import torch

        from memobench.api import DiffusionModel

        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(self.params.dtype)
        if dtype is None:
            raise BadInput(f"model '{self.name}' parameter dtype: use float32, float16 or bfloat16")
        return DiffusionModel.from_pretrained(self.params.path or self.hub_id, revision=self.params.revision or None,
                                              offline=ctx.offline, device=ctx.device, dtype=dtype,
                                              sha256=self.params.sha256 or None)


class SDv14(_HubModel):
    """Stable Diffusion v1.4 (CompVis), 512×512, CLIP ViT-L/14 text encoder."""

    name = "sd-v1-4"
    version = "1"
    hub_id = "CompVis/stable-diffusion-v1-4"
    prompt_sets = {"target": "nemo-vm", "nonmem": "nemo-nonmem", "utility": "coco10k"}


class SDv20(_HubModel):
    """Stable Diffusion 2.0 base (Stability AI), 512×512, OpenCLIP ViT-H/14 text encoder."""

    name = "sd-v2-0"
    version = "1"
    hub_id = "stabilityai/stable-diffusion-2-base"
    prompt_sets = {"target": "memattn-sd2", "nonmem": "memattn-nomem", "utility": "coco10k"}


class SDAny(_HubModel):
    """Any Stable Diffusion pipeline folder or hub id (parameter ``path``)."""

    name = "sd"
    version = "1"
    hub_id = ""
    prompt_sets = {"target": "nemo-vm", "nonmem": "nemo-nonmem", "utility": "coco10k"}

    def load(self, ctx):
        if not self.params.path:
            raise BadInput("model 'sd' needs --model-param path=<folder or hub id>")
        return super().load(ctx)


@hookimpl
def register_models(register):
    register(SDv14)
    register(SDv20)
    register(SDAny)
