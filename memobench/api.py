"""memobench's public plugin API: the shapes a plugin implements and the value types it exchanges.

A plugin registers *classes* through the hooks in :mod:`memobench.hookspecs`. Each class carries
``name``, ``version`` and a nested ``Params`` dataclass whose defaults are the paper defaults
(``METHODS.md``); the harness instantiates ``cls(params)`` and records the expanded params in every result.

Kinds:

* :class:`ModelPlugin` — loads a :class:`memobench.model.DiffusionModel` (a diffusers SD pipeline wrapper).
* :class:`PromptSet` — prompts with memorization labels and reference (training) images.
* :class:`Mitigation` — ``kind = "weights"`` (a fit step that produces a cached artifact, applied as a
  context manager that restores the model on exit) or ``kind = "inference"`` (changes the conditioning
  during sampling).
* :class:`Attack` — receives the mitigated model with its hooks active and returns conditioning.
* :class:`Metric` — scores a set of generated samples; declares direction, range and implementation.

This module imports neither torch nor diffusers at import time.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Hashable, Iterator, Literal

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from .model import DiffusionModel

# a plugin raises BadInput for a bad parameter value or missing user input (one line naming the input and the fix:
# exit code 2 on the command line); any other exception is an error of the plugin or of memobench (exit code 1)
from .config import BadInput, check_device, check_finite  # noqa: E402

__all__ = [
    # value types, run context and plugin bases (defined here)
    "Prompt", "Conditioning", "Guidance", "AttackOutput", "Sample", "MetricInfo", "MetricValue", "Context",
    "Plugin", "ModelPlugin", "PromptSet", "Mitigation", "Attack", "Metric", "Detector",
    "params_dict", "param", "param_help", "BadInput", "check_device", "check_finite",
    # everything else a plugin may use, re-exported from the core module that owns it (imported on first use, so
    # that importing this module stays cheap): see ``_PUBLIC``
    *sorted(_PUBLIC := {
        "hookimpl": "hookspecs", "get_registry": "registry", "__version__": None,
        # helpers with one job each
        "slug": "util", "dist_version": "util", "file_sha256": "util", "image_sha256": "util",
        # content-addressed cache and atomic writes
        "key_of": "cache", "atomic_write_bytes": "cache", "atomic_write_text": "cache", "write_once_bytes": "cache",
        "default_cache_dir": "cache", "memoised": "cache", "png_bytes": "cache", "TensorCache": "cache",
        # the model wrapper and what plugins do with its UNet
        "DiffusionModel": "model", "generation_size": "model", "size_key_part": "model",
        "frozen_parameters": "model", "swapped_parameters": "model", "transformer_blocks": "model",
        "tensors_sha256": "model",
        "cross_attention": "attention", "CrossAttentionHooks": "attention", "cross_attention_layers": "attention",
        "latent_elements": "util", "reference_scale": "util",
        # SSCD (the copy detector every memorization metric uses)
        "SSCD": "sscd", "SSCDUnavailableError": "sscd", "PRESETS": "sscd", "get_preset": "sscd",
        "jpeg_roundtrip": "sscd", "short_side_size": "sscd",
        # data files pinned by sha256
        "DataError": "data", "DataNotFoundError": "data", "PinMismatchError": "data", "check_pin": "data",
        "download_file": "data", "fetch": "data", "GroundTruthStore": "data", "COCO_MANIFEST": "data",
        # prompt files
        "read_prompt_file": "prompts", "is_prompt_file": "prompts", "register_prompt_file": "prompts",
        # statistics
        "stats": None,
        # a command of a plugin that writes results as `memobench run` does: load a model into a Context, check the
        # output folder, read command-line values, show progress, write the result with its provenance
        "open_model": "session", "model_context": "session", "load_model": "session", "ModelSession": "session",
        "check_output_dir": "session", "write_result": "session", "provenance": "session", "environment": "session",
        "parse_kv": "config", "parse_seeds": "config", "resolve_offline": "config", "ProgressReporter": "progress",
        "write_grid": "grid", "caption_image_pairs": "pipeline.fit",
        "attack_key": "pipeline.attack", "cached_attack": "pipeline.attack",
    }),
]


def __getattr__(name: str) -> Any:
    """The re-exported names of ``_PUBLIC``, imported from their module on first use."""
    import importlib

    if name not in _PUBLIC:
        raise AttributeError(f"module 'memobench.api' has no attribute {name!r}")
    mod = _PUBLIC[name]
    if mod is None:  # a module or attribute of the package itself
        pkg = importlib.import_module("memobench")
        value = getattr(pkg, name) if hasattr(pkg, name) else importlib.import_module(f"memobench.{name}")
    else:
        value = getattr(importlib.import_module(f"memobench.{mod}"), name)
    globals()[name] = value
    return value


def _sha256(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------- value types
@dataclass(frozen=True)
class Prompt:
    """One prompt of a prompt set.

    ``reference_ids`` name the training (ground-truth) images of the prompt inside its prompt set; the set's
    :meth:`PromptSet.reference_image` resolves them (``None`` = recorded as missing, never a blank image).
    """

    id: str
    text: str
    mem_type: str | None = None  # "VM", "TM", "NONMEM" or None when unlabelled
    reference_ids: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def sha256(self) -> str:
        return _sha256(self.text)


@dataclass
class Conditioning:
    """What the denoiser is conditioned on for one prompt: text embeddings (1×77×d each) and, from an
    inference-time mitigation, optionally the initial latents to start from and a per-step :class:`Guidance`."""

    prompt_embeds: "torch.Tensor"
    negative_prompt_embeds: "torch.Tensor"
    text: str | None = None  # the prompt text these embeddings came from, if any
    trace: dict = field(default_factory=dict)
    # replaces the seeded initial latents ``condition`` received (same shape, same seed order): mitigations that
    # adjust or choose x_T (initial-noise adjustment, SAIL); None keeps the seeded ones
    latents: "torch.Tensor | None" = None
    # per-step control of the CFG loop (guidance schedules, step-dependent attention edits); None: plain CFG
    guidance: "Guidance | None" = None


class Guidance:
    """Per-step control of the CFG denoising loop (:meth:`memobench.model.DiffusionModel.denoise`), returned by an
    inference-time mitigation in :attr:`Conditioning.guidance`. With a guidance the loop always evaluates both
    halves (unconditional and conditional), whatever the guidance scale, and combines them as
    ``out_u + w · (out_c − out_u)`` in the model's own parameterisation, with ``w`` from :meth:`scale`.

    One instance serves one ``denoise`` call at a time: :meth:`start` is called at its beginning (reset per-sample
    state there), :meth:`before_step` before the UNet call of each step (an attention edit that depends on the step
    reads the index here)."""

    def start(self, latents: "torch.Tensor", timesteps: "torch.Tensor") -> None:
        """A denoising loop begins from ``latents`` (B×C×h×w) over ``timesteps``."""

    def before_step(self, index: int, timestep: "torch.Tensor", latents: "torch.Tensor") -> None:
        """Step ``index`` (0 = the noisiest) is about to call the UNet."""

    def scale(self, index: int, timestep: "torch.Tensor", latents: "torch.Tensor", eps_uncond: "torch.Tensor",
              eps_cond: "torch.Tensor", guidance_scale: float) -> "float | torch.Tensor":
        """The guidance weight of step ``index``: a number, or one per sample (a B-vector); ``guidance_scale`` is
        the run's. ``eps_*`` are ε predictions (converted from v for v-prediction models)."""
        return guidance_scale


@dataclass
class AttackOutput:
    """An attack's result for one target: the conditioning to generate from, plus a JSON-able trace
    (loss curve, RNG seeds, distances) and optional tensors saved as safetensors (e.g. ``y_adv``)."""

    conditioning: Conditioning
    trace: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)


@dataclass
class Sample:
    """One generated image with everything a metric needs.

    ``image``, ``baseline_image`` and ``references`` are either held (``Sample(image=array, ...)``, as plugins and
    tests build them) or *streamed*: given as ``image_loader`` / ``baseline_loader`` / ``references_loader``
    (callables returning the array / the list), they are loaded anew on every access and never kept by the sample.
    The runner builds streamed samples (each access decodes one PNG from the image cache and checks its sha256), so
    a metric holds only the images it is working on: read ``s.image`` once into a local, process samples in batches
    (:meth:`images` gives a lazy sequence for batch loops) and keep features, not pixels. ``has_baseline_image``
    answers without loading; :meth:`replace` copies without loading (``dataclasses.replace`` would load the images
    and keep them in the copy).
    """

    sample_key: str
    prompt: Prompt
    seed: int
    image: "np.ndarray | None" = None  # H×W×3 uint8
    references: list = None  # type: ignore[assignment]  # H×W×3 uint8 arrays (empty: missing ground truth)
    role: str = "target"  # "target" (attacked/mitigated prompt) or a utility role
    baseline_image: "np.ndarray | None" = None  # unmitigated image with the same seed (SSCD_gen)
    extra: dict = field(default_factory=dict)
    image_loader: "Callable[[], np.ndarray] | None" = field(default=None, repr=False, compare=False)
    baseline_loader: "Callable[[], np.ndarray] | None" = field(default=None, repr=False, compare=False)
    references_loader: "Callable[[], list] | None" = field(default=None, repr=False, compare=False)

    @property
    def has_baseline_image(self) -> bool:
        """Whether a baseline image is held or can be loaded (without loading it)."""
        return self.__dict__.get("_baseline_image") is not None or self.baseline_loader is not None

    def replace(self, **changes: Any) -> "Sample":
        """A shallow copy with ``changes`` applied; streamed images stay streamed (nothing is loaded)."""
        out = copy.copy(self)
        for k, v in changes.items():
            if k not in _SAMPLE_FIELDS:
                raise TypeError(f"Sample has no field {k!r}")
            setattr(out, k, v)
        return out

    @staticmethod
    def images(samples: "Sequence[Sample]") -> "Sequence[np.ndarray]":
        """``[s.image for s in samples]`` as a lazy sequence: indexing or slicing loads only those images (for
        batch loops such as ``for i in range(0, len(imgs), bs): batch = imgs[i:i + bs]``)."""
        return _SampleImages(list(samples))


def _streamed(name: str, loader: str, default: Callable[[], Any]) -> property:
    """A :class:`Sample` attribute held in ``_<name>`` or, when that is None, loaded from ``<loader>`` on access."""
    slot = f"_{name}"

    def get(self):
        v = self.__dict__.get(slot)
        if v is None:
            load = self.__dict__.get(loader)
            return load() if load is not None else default()
        return v

    def set_(self, v):
        self.__dict__[slot] = v

    return property(get, set_, doc=f"``{name}``: held, or loaded from ``{loader}`` on each access (not kept)")


# after @dataclass has read the defaults: the three image attributes become properties backed by their loaders
Sample.image = _streamed("image", "image_loader", lambda: None)  # type: ignore[assignment]
Sample.baseline_image = _streamed("baseline_image", "baseline_loader", lambda: None)  # type: ignore[assignment]
Sample.references = _streamed("references", "references_loader", list)  # type: ignore[assignment]
_SAMPLE_FIELDS = frozenset(f.name for f in dataclasses.fields(Sample))


class _SampleImages(Sequence):
    """The images of samples, loaded on indexing (see :meth:`Sample.images`)."""

    def __init__(self, samples: list):
        self._samples = samples

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [s.image for s in self._samples[i]]
        return self._samples[i].image


@dataclass(frozen=True)
class MetricInfo:
    """What a metric plugin's main value (id ``name``) is.

    ``category`` places it in summaries: ``"privacy"`` (how much of the training images comes back: the CLI's and the
    leaderboard's privacy columns) or ``"utility"``. ``headline``: the one number a pairing is ranked and plotted by
    (the memorization rate). ``grid_score``: its per-sample values are printed under each image of a run's grid
    (the similarity to the training image)."""

    name: str
    display_name: str
    higher_is_better: bool
    min: float | None = None
    max: float | None = None
    description: str = ""
    category: Literal["privacy", "utility"] = "utility"
    headline: bool = False
    grid_score: bool = False


@dataclass
class MetricValue:
    """A metric's result. ``impl`` names the implementation, library, feature extractor, weights
    identifier (sha256 or hub id) and preset that produced the number."""

    value: float | None
    n: int
    impl: dict
    dispersion: dict | None = None  # {"kind": "std"|"mad"|"ci", "value": float}
    groups: dict = field(default_factory=dict)  # e.g. {"VM": {...}, "TM": {...}}
    per_sample: dict = field(default_factory=dict)  # sample_key -> float (or per prompt id)
    extra: dict = field(default_factory=dict)
    unavailable: str | None = None  # reason, when the metric could not be computed
    # this metric id's own name, when one plugin returns several ids that differ in kind (e.g. "FID" vs
    # "FD (SSCD features)"); None = the plugin's ``MetricInfo.display_name``
    display_name: str | None = None


# ---------------------------------------------------------------------------------------------- run context
@dataclass
class Context:
    """Services the harness hands to plugins: caches, seeds, progress and what the run was asked to do.

    The run's fields are typed; a plugin reads e.g. ``ctx.generation["height"]`` (or
    :func:`memobench.api.generation_size`) and ``ctx.batch_size``. A context a plugin builds itself (a command of its
    own, a test) sets only what it needs."""

    cache_dir: Any  # pathlib.Path
    offline: bool = False
    device: str = "cpu"
    seeds: tuple[int, ...] = (0,)
    progress: Any = None  # memobench.progress.ProgressReporter
    model_id: str = ""  # identity of the (unmitigated) model weights
    registry: Any = None  # memobench.registry.Registry of the run (use ``plugin()``)
    references: Any = None  # callable(prompt) -> list of training images (use ``reference_images()``)
    # the run's sampler settings: num_inference_steps, guidance_scale, height, width (the model plugin's defaults with
    # the run's overrides); empty = the model's own
    generation: dict = field(default_factory=dict)
    batch_size: int | None = None  # images denoised together (--batch-size); None = the plugin's own choice
    model_prompt_sets: dict = field(default_factory=dict)  # the model plugin's ``prompt_sets`` (role -> set name)
    # texts of the model's non-memorized prompt set (its ``prompt_sets["nonmem"]``), e.g. NeMo's activation statistics;
    # None when the model names none or it could not be read (``nonmem_prompts_error`` says why)
    nonmem_prompts: list | None = None
    nonmem_prompt_set: str | None = None
    nonmem_prompts_error: str | None = None
    # the runner's black-box sampler (set while an attack runs): callable(prompt, seeds, conditioning=None) -> images
    sampler: Any = None

    def generate(self, prompt: "Prompt", seeds: "Sequence[int]", conditioning: "Conditioning | None" = None,
                 latents: "torch.Tensor | None" = None) -> list:
        """The deployed system as a black box (for attacks): H×W×3 uint8 images of ``prompt`` (or of
        ``conditioning``) for ``seeds`` (or from ``latents``, one per image), under the run's mitigation, its
        ``condition`` step included, and the run's sampler settings. Nothing is cached."""
        if self.sampler is None:
            raise RuntimeError("generate(): this context has no sampler (the runner provides one while attacking)")
        return self.sampler(prompt, list(seeds), conditioning, latents)

    def plugin(self, kind: str, name: str, params: dict | None = None):
        """An instance of another registered plugin (e.g. a mitigation building on an attack), with ``params``."""
        if self.registry is None:
            from .registry import get_registry

            self.registry = get_registry()
        cls = self.registry.get(kind, name)
        return cls(cls.make_params(params or {}))

    def reference_images(self, prompt: "Prompt") -> list:
        """The training image(s) of a target prompt of the run (H×W×3 uint8 arrays; empty when none is known)."""
        if self.references is None:
            raise RuntimeError("reference_images(): this context has no prompt set (only the runner provides one)")
        return list(self.references(prompt))

    def artifact_path(self, plugin: "Plugin", *parts: str, suffix: str = ".safetensors"):
        """Content-addressed path for a plugin artifact keyed by model identity, plugin params and ``parts``."""
        from .cache import artifact_path

        return artifact_path(self.cache_dir, self.model_id, plugin, parts, suffix)

    def task(self, description: str, total: int | None, transient: bool = False):
        """A progress bar (a context manager yielding ``advance(n=1)``); ``transient`` ones vanish when done."""
        if self.progress is None:
            return contextlib.nullcontext(lambda n=1, **kw: None)
        return self.progress.task(description, total, transient=transient)


# ---------------------------------------------------------------------------------------------- plugin bases
class Plugin:
    """Base of every registered class: ``name``, ``version`` and a ``Params`` dataclass."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "0"
    kind_label: ClassVar[str] = "plugin"

    @dataclass
    class Params:
        pass

    def __init__(self, params: Any = None, **overrides: Any):
        if params is None:
            params = self.Params()
        if overrides:
            params = dataclasses.replace(params, **overrides)
        self.params = params

    @classmethod
    def make_params(cls, values: dict | None) -> Any:
        """Build ``Params`` from a dict of overrides, rejecting unknown names with the valid ones and any NaN or
        infinite float (:class:`BadInput`)."""
        values = dict(values or {})
        names = {f.name: f for f in dataclasses.fields(cls.Params)}
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise BadInput(f"{cls.kind_label} '{cls.name}' has no parameter {', '.join(unknown)}; "
                           f"valid: {', '.join(names) or '(none)'}")
        conv = {}
        for k, v in values.items():
            default = getattr(cls.Params(), k)
            what = f"{cls.kind_label} '{cls.name}' parameter {k}"
            conv[k] = check_finite(_coerce(v, default, what), what)
        return cls.Params(**conv)

    def identity(self) -> dict:
        return {"name": self.name, "version": self.version, "params": params_dict(self.params)}


def _coerce(v: Any, default: Any, what: str) -> Any:
    if not isinstance(v, str) or isinstance(default, str) or default is None:
        return v
    try:
        if isinstance(default, bool):
            if v.lower() in ("1", "true", "yes"):
                return True
            if v.lower() in ("0", "false", "no"):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(v)
        if isinstance(default, float):
            return float(v)
        if isinstance(default, (tuple, list)):
            return type(default)(type(default[0])(x) if default else x for x in v.split(","))
    except ValueError:
        raise BadInput(f"{what}: cannot read {v!r} as {type(default).__name__}") from None
    return v


def param(default: Any, help: str) -> Any:
    """A ``Params`` field with its description (``memobench ls`` prints it):
    ``steps: int = param(50, "optimization steps (DoRI §3.2)")``. Lists and dicts are copied per instance."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def param_help(cls: type, name: str) -> str:
    """The description of parameter ``name`` of plugin class ``cls`` ("" when it has none)."""
    for f in dataclasses.fields(cls.Params):
        if f.name == name:
            return str(f.metadata.get("help", ""))
    return ""


def params_dict(params: Any) -> dict:
    """Fully expanded, JSON-able parameters."""
    if params is None:
        return {}
    if dataclasses.is_dataclass(params):
        d = dataclasses.asdict(params)
    else:
        d = dict(params)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


class ModelPlugin(Plugin):
    """Loads a model. ``generation`` holds the model's default sampler settings; ``prompt_sets`` names the
    default target set and the utility sets scored with it (by role)."""

    kind_label = "model"
    generation: ClassVar[dict] = {"num_inference_steps": 50, "guidance_scale": 7.5, "height": 512, "width": 512}
    prompt_sets: ClassVar[dict] = {}  # {"target": "...", "nonmem": "...", "utility": "..."}
    default_seeds: ClassVar[tuple[int, ...]] = tuple(range(10))  # target seeds when --seeds is not given
    default_utility_seeds: ClassVar[tuple[int, ...]] = (0,)  # seeds of the utility prompt sets
    default_metrics: ClassVar[tuple[str, ...]] = ()  # metrics when --metric is not given
    # the model ``memobench run`` uses when --model is not given (exactly one registered model declares it)
    is_default: ClassVar[bool] = False

    def load(self, ctx: Context) -> "DiffusionModel":
        raise NotImplementedError


class PromptSet(Plugin):
    kind_label = "prompt set"

    def prompts(self, ctx: Context) -> list[Prompt]:
        raise NotImplementedError

    def reference_image(self, prompt: Prompt, ref_id: str, ctx: Context) -> "np.ndarray | None":
        """The training image ``ref_id`` of ``prompt`` as H×W×3 uint8, or ``None`` if it is missing."""
        return None

    def provenance(self) -> dict:
        """``{repository, path, commit, license, sha256, url}`` of the underlying file(s)."""
        return {}


class Mitigation(Plugin):
    """A memorization mitigation.

    ``fit`` computes (and caches) what the mitigation needs for a set of prompts; ``apply`` is a context
    manager active while one prompt is generated or attacked (it must restore the model exactly on exit and
    stay differentiable); ``condition`` may replace the conditioning at inference time (it receives the initial
    latents of the generation). Weight-editing mitigations implement ``fit``/``apply``; inference-time ones
    ``condition``.
    """

    kind_label = "mitigation"
    # "none" marks the mitigation that changes nothing (the default of ``memobench run``, exactly one is registered)
    kind: ClassVar[Literal["weights", "inference", "none"]] = "none"
    # True when what ``fit`` computes for a prompt depends on that prompt only (cached per prompt): a sharded run
    # then fits each target in the shard that owns it, and every shard reads the others' artifacts from the cache
    fit_per_prompt: ClassVar[bool] = False
    # True when ``apply`` edits the model the same way whatever the prompt and ``condition`` is the identity: the
    # runner may then denoise several prompts' images in one batch (utility sets, one image per prompt)
    prompt_independent: ClassVar[bool] = False

    def fit(self, model: "DiffusionModel", prompts: list[Prompt], ctx: Context) -> None:
        return None

    @contextlib.contextmanager
    def apply(self, model: "DiffusionModel", prompt: Prompt | None, ctx: Context) -> Iterator[None]:
        yield

    def condition(self, model: "DiffusionModel", prompt: Prompt, cond: Conditioning,
                  latents: "torch.Tensor", ctx: Context) -> Conditioning:
        return cond

    def apply_group(self, prompt: Prompt) -> Hashable | None:
        """Prompts with the same non-None group get the same model from ``apply`` (and ``condition`` is the identity
        for them): the runner may denoise their images in one batch under one ``apply`` context (utility sets, one
        image per prompt). None (the default unless :attr:`prompt_independent`): ``prompt`` is generated alone.
        E.g. NeMo blocks the same union of neurons for every prompt without a fitted set of its own."""
        return "" if self.prompt_independent else None

    def report(self) -> dict:
        """Summary of the fitted artifact (e.g. neurons per prompt) recorded in the result."""
        return {}


class Attack(Plugin):
    """Produces the conditioning for one target under the (already applied) mitigation.

    The conditioning may set :attr:`Conditioning.latents` (one initial latent per seed of the run, in seed order):
    a black-box attack that chose which of its samples to publish hands their initial noise back, and the runner
    generates (and scores) exactly those. ``ctx.generate(prompt, seeds)`` is the deployed system as a black box:
    images under the run's mitigation and sampler settings.

    **Budget.** An attack declares the parameter that sets the attacker's work (:attr:`budget_param`, e.g. DoRI's
    ``steps``), what one unit of work is (:attr:`budget_unit`) and the default values of ``memobench run
    --budget-sweep`` (:attr:`budget_values`); :meth:`budget` converts its parameters into units (DoRI: steps ×
    batch UNet forward+backward passes)."""

    kind_label = "attack"
    needs_reference: ClassVar[bool] = False  # True: the attack uses the target's training image
    # True for the attack that is no attack (the prompt's own conditioning): the default of ``memobench run``; a run
    # with any other attack also scores the mitigation alone on the same targets and seeds
    is_identity: ClassVar[bool] = False
    budget_param: ClassVar[str | None] = None  # the parameter --budget-sweep varies (None: no budget)
    budget_unit: ClassVar[str] = ""  # one unit of the attacker's work, e.g. "UNet forward+backward passes"
    budget_values: ClassVar[tuple[int, ...]] = ()  # default values of budget_param for --budget-sweep
    # True when the output depends on the run's sampler settings and number of seeds (the attack samples the
    # deployed system with ``ctx.generate`` or publishes one initial latent per seed): its cache key then includes
    # num_inference_steps, guidance_scale and the number of seeds, besides the generation size every key has
    depends_on_sampler: ClassVar[bool] = False

    def budget(self) -> float:
        """The attacker's work at these parameters, in :attr:`budget_unit` (default: the budget parameter itself)."""
        if self.budget_param is None:
            return 0.0
        return float(getattr(self.params, self.budget_param))

    def run(self, model: "DiffusionModel", prompt: Prompt, reference: "np.ndarray | None",
            ctx: Context) -> AttackOutput:
        raise NotImplementedError


class Metric(Plugin):
    """Scores samples. ``roles`` lists the sample roles it reads (``target`` = memorized prompts; other roles
    are utility prompt sets generated with the mitigation only)."""

    kind_label = "metric"
    info: ClassVar[MetricInfo]
    roles: ClassVar[tuple[str, ...]] = ("target",)
    needs_baseline: ClassVar[bool] = False

    def compute(self, samples: list[Sample], ctx: Context) -> dict[str, MetricValue]:
        raise NotImplementedError


class Detector(Plugin):
    """A memorization detector: one prompt -> a score, higher = more likely memorized (``memobench detect``).

    ``score(model, text)`` returns ``{"score": float, ...}`` (JSON-able). ``resolved(generation)`` fills parameters
    that default to the model's own generation settings (``0`` / ``-1`` sentinels), so that the identity recorded in
    results and calibrations, and hashed into cache keys, names the concrete values that ran."""

    kind_label = "detector"
    #: Published fixed cut-offs of the score, reported next to the calibrated thresholds (name -> value).
    fixed_thresholds: ClassVar[dict[str, float]] = {}
    #: One line naming the statistic, for tables.
    statistic: ClassVar[str] = ""
    #: Parameters that change only the explanation, never the score: left out of the calibration key, so that a
    #: calibration serves every explanation setting.
    explanation_params: ClassVar[tuple[str, ...]] = ()

    def identity(self) -> dict:
        # "detect-<name>" keeps artifact folders apart from the mitigation of the same paper (artifacts/<name>/…)
        return {"name": f"detect-{self.name}", "version": self.version, "params": params_dict(self.params)}

    def scoring(self) -> "Detector":
        """This detector with its explanation-only parameters at their defaults (the calibration's key)."""
        if not self.explanation_params:
            return self
        defaults = type(self).Params()
        return self.with_params(**{k: getattr(defaults, k) for k in self.explanation_params})

    def resolved(self, generation: dict) -> "Detector":
        return self

    def with_generation(self, generation: dict) -> "Detector":
        """This detector with the generation parameters it leaves to the model at their sentinels filled from
        ``generation`` (the model's defaults): ``num_inference_steps`` 0, ``guidance_scale`` < 0, ``height`` /
        ``width`` 0. Parameters a detector does not have are skipped."""
        p, vals = self.params, {}
        if getattr(p, "num_inference_steps", None) == 0:
            vals["num_inference_steps"] = int(generation.get("num_inference_steps", 50))
        if getattr(p, "guidance_scale", 0) < 0:
            vals["guidance_scale"] = float(generation.get("guidance_scale", 7.5))
        for k in ("height", "width"):
            if getattr(p, k, None) == 0 and generation.get(k):
                vals[k] = int(generation[k])
        return self.with_params(**vals) if vals else self

    def with_params(self, **values: Any) -> "Detector":
        return type(self)(dataclasses.replace(self.params, **values))

    def score(self, model: "DiffusionModel", text: str) -> dict:
        raise NotImplementedError
