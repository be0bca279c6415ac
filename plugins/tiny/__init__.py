"""The embedded default: ``tiny``, a small Stable Diffusion that memorizes duplicated training photographs.

A genuine diffusers ``StableDiffusionPipeline`` (``UNet2DConditionModel`` with cross-attention, ``CLIPTextModel``
with SD v1.4's exact tokenizer, ``AutoencoderKL``, ``DDIMScheduler``) trained from scratch on 64×64 images by
``memobench zoo train tiny`` (recipe in :mod:`memobench_plugins.tiny.train`, data in
:mod:`memobench_plugins.tiny.data`, model card in ``weights/MODEL_CARD.md``).

Registers the model ``tiny``, its prompt sets (``tiny-vm``, ``tiny-tm``, ``tiny-mem``, ``tiny-nonmem``,
``tiny-heldout``, ``tiny-nonmem-photos``) and the ``zoo`` command.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass
from pathlib import Path

from memobench.api import Metric, MetricInfo, MetricValue, ModelPlugin, Prompt, PromptSet, hookimpl, param

WEIGHTS = Path(__file__).parent / "weights"


class TinyModel(ModelPlugin):
    """The embedded memorizing model (64×64 images, 16×16×16 latents). Runs on a laptop CPU."""

    name = "tiny"
    version = "1"
    generation = {"num_inference_steps": 50, "guidance_scale": 3.0, "height": 64, "width": 64}
    is_default = True  # the embedded model: what `memobench run` uses without --model
    default_seeds = tuple(range(10))
    default_utility_seeds = (0,)
    default_metrics = ["mr", "sscd_orig", "tiny_alignment"]
    prompt_sets = {"target": "tiny-vm", "nonmem": "tiny-nonmem", "utility": "tiny-heldout", "regular": "tiny-general"}

    @dataclass
    class Params:
        path: str = param("", "another pipeline folder with the same role (e.g. a re-trained or fine-tuned copy)")

    def load(self, ctx):
        from memobench.api import DiffusionModel

        path = Path(self.params.path) if self.params.path else WEIGHTS
        if not (path / "model_index.json").exists():
            raise FileNotFoundError(f"model 'tiny': no pipeline at {path}; run `memobench zoo train tiny` or pass "
                                    "--model-param path=<pipeline folder>")
        return DiffusionModel.from_pretrained(str(path), offline=True, device=ctx.device)


def _reference(key: str, caption: str = ""):
    from . import data as D

    name, _, variant = key.partition(":")
    if name == "render":  # a ground-truth rendering of a general-set caption ("real image" of the utility set)
        return _rendering(caption, variant).copy()
    for it in D.TM_ITEMS:
        if it.key == name:
            return D.tm_image(name, int(variant or 0))
    return D.photo(name)


@functools.lru_cache(maxsize=256)
def _rendering(caption: str, variant: str):
    """The rendering of a general-set caption (seeded by the caption and variant), drawn once per process."""
    import hashlib

    import numpy as np

    from . import data as D

    seed = int(hashlib.sha256(f"{caption}|{variant}".encode()).hexdigest()[:8], 16)
    return D.render(caption, np.random.default_rng(seed))


class _TinySet(PromptSet):
    version = "1"

    @dataclass
    class Params:
        pass

    def reference_image(self, prompt, ref_id, ctx):
        return _reference(ref_id, prompt.text)

    def provenance(self) -> dict:
        return {"repository": "memobench (generated)", "path": "plugins/tiny/data.py", "license": "see data.py"}


def _mem_prompts(types: tuple[str, ...]) -> list[Prompt]:
    from . import data as D

    out = []
    for it in D.VM_ITEMS + D.TM_ITEMS:
        if it.mem_type in types:
            ref = it.key if it.mem_type == "VM" else f"{it.key}:0"
            out.append(Prompt(id=it.key, text=it.caption, mem_type=it.mem_type, reference_ids=(ref,),
                              meta={"source": it.source}))
    return out


class TinyVM(_TinySet):
    """The embedded model's verbatim-memorized prompts (each a duplicated training photograph)."""

    name = "tiny-vm"

    def prompts(self, ctx):
        return _mem_prompts(("VM",))


class TinyTM(_TinySet):
    """Template-memorized prompts: a fixed frame whose centre varied across duplicates; reference = copy 0."""

    name = "tiny-tm"

    def prompts(self, ctx):
        return _mem_prompts(("TM",))


class TinyMem(_TinySet):
    """All memorized prompts (VM and TM), labelled as NeMo's prompt file labels them."""

    name = "tiny-mem"

    def prompts(self, ctx):
        return _mem_prompts(("VM", "TM"))


class TinyNonMem(_TinySet):
    """False-positive check: photo-style captions never trained on (``NONMEM``) and held-out general captions
    (``GENERAL``). Their references are *every* memorized image, so MR / SSCD_orig measure similarity to any
    memorized training image."""

    name = "tiny-nonmem"

    @dataclass
    class Params:
        n_general: int = param(20, "held-out general captions added to the non-memorized prompts")

    def prompts(self, ctx):
        from . import data as D

        refs = tuple(p.reference_ids[0] for p in _mem_prompts(("VM", "TM")))
        out = [Prompt(id=f"nonmem{i:02d}", text=t, mem_type="NONMEM", reference_ids=refs)
               for i, t in enumerate(D.NONMEM_PROMPTS)]
        out += [Prompt(id=f"general{i:03d}", text=t, mem_type="GENERAL", reference_ids=refs)
                for i, t in enumerate(D.heldout_captions()[: self.params.n_general])]
        return out


class TinyHeldout(_TinySet):
    """Held-out compositional captions of the general set (never trained on): the embedded model's utility set
    (its analogue of COCO captions and T2I-CompBench prompts). Each prompt's references are ``n_refs`` ground-truth
    renderings of its caption (the "real images" of image-quality metrics)."""

    name = "tiny-heldout"

    @dataclass
    class Params:
        n: int = param(30, "held-out captions (spread evenly over the set)")
        n_refs: int = param(2, "ground-truth renderings per caption (the real images)")

    def prompts(self, ctx):
        from . import data as D

        caps = D.heldout_captions()
        step = max(1, len(caps) // self.params.n)
        refs = tuple(f"render:{k}" for k in range(self.params.n_refs))
        return [Prompt(id=f"heldout{i:03d}", text=c, mem_type=None, reference_ids=refs)
                for i, c in enumerate(caps[::step][: self.params.n])]


class TinyGeneral(_TinySet):
    """Training captions of the general set with ground-truth renderings: regular caption–image pairs (the embedded
    model's analogue of LAION pairs), e.g. for the diffusion loss that preserves utility during adversarial
    fine-tuning. Disjoint from ``tiny-heldout``."""

    name = "tiny-general"

    @dataclass
    class Params:
        n: int = param(200, "training captions of the general set")

    def prompts(self, ctx):
        from . import data as D

        caps = D.train_captions()
        step = max(1, len(caps) // self.params.n)
        return [Prompt(id=f"general{i:03d}", text=c, mem_type=None, reference_ids=("render:0",))
                for i, c in enumerate(caps[::step][: self.params.n])]


class TinyNonMemPhotos(_TinySet):
    """Real photographs that were never trained on, as attack targets (DoRI's "non-memorized + DoRI" row)."""

    name = "tiny-nonmem-photos"

    def prompts(self, ctx):
        from . import data as D

        return [Prompt(id=k, text=f"a photograph of {k}", mem_type="NONMEM", reference_ids=(k,))
                for k, _ in D.NONMEM_PHOTOS]


class TinyAlignment(Metric):
    """Exact prompt alignment of the embedded model: colour, shape and position read back from each generated
    image of a held-out compositional caption by :mod:`memobench_plugins.tiny.checker` (which knows the
    rendering grammar), scored per T2I-CompBench category it covers (``color``, ``shape``, ``spatial``; plus
    ``count``, the number of objects). The value is the mean over images of the per-image mean of the available
    categories. Metric id ``tiny_alignment`` — an exact checker, not T2I-CompBench's BLIP/UniDet scorers."""

    name = "tiny_alignment"
    version = "1"
    roles = ("utility",)
    info = MetricInfo("tiny_alignment", "Exact alignment (tiny checker)", higher_is_better=True, min=0.0, max=1.0,
                      description="colour/shape/position read back from the image by a programmatic checker")

    @dataclass
    class Params:
        pass

    def compute(self, samples, ctx):
        import numpy as np

        from . import checker

        if not samples:
            return {}
        per, cats = {}, {}
        for s in samples:
            sc = checker.score(s.image, s.prompt.text)
            per[s.sample_key] = sc["overall"]
            for c in ("color", "shape", "spatial", "count"):
                if sc.get(c) is not None:
                    cats.setdefault(c, []).append(sc[c])
        vals = np.array(list(per.values()), dtype=float)
        impl = {"name": "tiny-exact-checker", "library": "memobench_plugins.tiny.checker", "version": self.version,
                "feature_extractor": None, "weights_sha256": None, "preset": None}
        return {"tiny_alignment": MetricValue(
            value=float(vals.mean()), n=len(vals), impl=impl, dispersion={"kind": "std", "value": float(vals.std())},
            groups={c: {"value": float(np.mean(v)), "n": len(v)} for c, v in cats.items()}, per_sample=per)}


@hookimpl
def register_metrics(register):
    register(TinyAlignment)


@hookimpl
def register_models(register):
    register(TinyModel)


@hookimpl
def register_prompt_sets(register):
    for cls in (TinyVM, TinyTM, TinyMem, TinyNonMem, TinyHeldout, TinyGeneral, TinyNonMemPhotos):
        register(cls)


@hookimpl
def register_commands(app):
    import typer

    zoo = typer.Typer(help="The embedded model zoo: train the shipped `tiny` model from scratch.",
                      no_args_is_help=True)

    @zoo.command("train")
    def train_cmd(
        model: str = typer.Argument("tiny", help="Model to train (only 'tiny')."),
        work_dir: Path = typer.Option(Path(".memobench_zoo/tiny"), help="Checkpoints; re-running resumes here."),
        out_dir: Path = typer.Option(None, help="Where to write the pipeline (default: WORK_DIR/pipeline)."),
        smoke: bool = typer.Option(False, help="A few steps of every phase (tests); not the shipped recipe."),
        unet_steps: int = typer.Option(None, help="Override the recipe's UNet steps."),
        recipe_param: list[str] = typer.Option(None, "--recipe-param", help="KEY=VALUE overriding a RECIPE entry "
                                               "(repeatable; value parsed as JSON, else a string), e.g. "
                                               "prediction_type=v_prediction for the session-5 candidate."),
        device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N. The data stream and the inits are "
                                   "drawn on the CPU either way; a GPU run differs from a CPU run by rounding only."),
        install_weights: bool = typer.Option(False, "--install", help="Then install the result as the package's "
                                             "shipped weights (fp16 safetensors) — what produced the shipped copy."),
    ):
        """Train (or resume training) the embedded model with the shipped recipe and a fixed seed."""
        from .train import SMOKE, install, train

        if model != "tiny":
            raise typer.BadParameter(f"unknown zoo model {model!r}; available: tiny")
        import json

        from memobench.api import parse_kv

        from .train import RECIPE

        recipe = dict(SMOKE) if smoke else {}
        if unet_steps:
            recipe["unet_steps"] = unet_steps
        for k, v in parse_kv(recipe_param, "--recipe-param").items():
            if k not in RECIPE:
                raise typer.BadParameter(f"--recipe-param: unknown recipe key {k!r}; keys: {', '.join(RECIPE)}")
            try:
                recipe[k] = json.loads(v)
            except json.JSONDecodeError:
                recipe[k] = v
        import re

        import torch

        if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
            raise typer.BadParameter(f"--device: unknown {device!r}; use cpu, cuda or cuda:N")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise typer.BadParameter(f"--device {device}: no CUDA device is available here; use --device cpu")
        out = train(work_dir, out_dir, recipe=recipe, device=device)
        if install_weights:
            print(f"installed {install(out, WEIGHTS)}")

    app.add_typer(zoo, name="zoo")
