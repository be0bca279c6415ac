"""The embedded default: ``tiny``, a small Stable Diffusion that memorizes duplicated training photographs.

A genuine diffusers ``StableDiffusionPipeline`` (``UNet2DConditionModel`` with cross-attention, ``CLIPTextModel``
with SD v1.4's exact tokenizer, ``AutoencoderKL``, ``DDIMScheduler``) trained from scratch on 64×64 images by
``memobench zoo train tiny`` (recipe in :mod:`memobench_plugins.tiny.train`, data in
:mod:`memobench_plugins.tiny.data`, model card in ``weights/MODEL_CARD.md``).

Registers the model ``tiny``, its prompt sets (``tiny-vm``, ``tiny-tm``, ``tiny-mem``, ``tiny-nonmem``,
``tiny-heldout``, ``tiny-nonmem-photos``) and the ``zoo`` command.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memobench.api import ModelPlugin, Prompt, PromptSet
from memobench.hookspecs import hookimpl

WEIGHTS = Path(__file__).parent / "weights"


class TinyModel(ModelPlugin):
    """The embedded memorizing model (64×64 images, 16×16×4 latents). Runs on a laptop CPU."""

    name = "tiny"
    version = "1"
    generation = {"num_inference_steps": 50, "guidance_scale": 3.0, "height": 64, "width": 64}
    default_seeds = tuple(range(10))
    default_utility_seeds = (0, 1)
    default_metrics = ["mr", "sscd_orig"]
    prompt_sets = {"target": "tiny-vm", "nonmem": "tiny-nonmem", "utility": "tiny-heldout"}

    @dataclass
    class Params:
        path: str = ""  # another pipeline folder with the same role (e.g. a re-trained or fine-tuned copy)

    def load(self, ctx):
        from memobench.model import DiffusionModel

        path = Path(self.params.path) if self.params.path else WEIGHTS
        if not (path / "model_index.json").exists():
            raise FileNotFoundError(f"model 'tiny': no pipeline at {path}; run `memobench zoo train tiny` or pass "
                                    "--model-param path=<pipeline folder>")
        return DiffusionModel.from_pretrained(str(path), offline=True, device=ctx.device)


def _reference(key: str):
    from . import data as D

    name, _, variant = key.partition(":")
    for it in D.TM_ITEMS:
        if it.key == name:
            return D.tm_image(name, int(variant or 0))
    return D.photo(name)


class _TinySet(PromptSet):
    version = "1"

    @dataclass
    class Params:
        pass

    def reference_image(self, prompt, ref_id, ctx):
        return _reference(ref_id)

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
        n_general: int = 20

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
    (its analogue of COCO captions and T2I-CompBench prompts)."""

    name = "tiny-heldout"

    @dataclass
    class Params:
        n: int = 60

    def prompts(self, ctx):
        from . import data as D

        caps = D.heldout_captions()
        step = max(1, len(caps) // self.params.n)
        return [Prompt(id=f"heldout{i:03d}", text=c, mem_type=None) for i, c in enumerate(caps[::step][: self.params.n])]


class TinyNonMemPhotos(_TinySet):
    """Real photographs that were never trained on, as attack targets (DoRI's "non-memorized + DoRI" row)."""

    name = "tiny-nonmem-photos"

    def prompts(self, ctx):
        from . import data as D

        return [Prompt(id=k, text=f"a photograph of {k}", mem_type="NONMEM", reference_ids=(k,))
                for k, _ in D.NONMEM_PHOTOS]


@hookimpl
def register_models(register):
    register(TinyModel)


@hookimpl
def register_prompt_sets(register):
    for cls in (TinyVM, TinyTM, TinyMem, TinyNonMem, TinyHeldout, TinyNonMemPhotos):
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
    ):
        """Train (or resume training) the embedded model with the shipped recipe and a fixed seed."""
        from .train import SMOKE, train

        if model != "tiny":
            raise typer.BadParameter(f"unknown zoo model {model!r}; available: tiny")
        recipe = dict(SMOKE) if smoke else {}
        if unet_steps:
            recipe["unet_steps"] = unet_steps
        train(work_dir, out_dir, recipe=recipe)

    app.add_typer(zoo, name="zoo")
