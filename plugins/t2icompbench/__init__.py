"""T2I-CompBench compositional-alignment metrics (METHODS §5.3, §2.7, §9 #16–#20).

Paper: Huang, Sun, Xie, Li, Liu, "T2I-CompBench: A Comprehensive Benchmark for Open-world Compositional
Text-to-image Generation", NeurIPS 2023 (§3 "Evaluation metrics": Disentangled BLIP-VQA, UniDet-based spatial
metric, CLIPScore for non-spatial, 3-in-1 for complex), and T2I-CompBench++ (TPAMI 2025: 3D-spatial, numeracy).
Reference scorers: ``Karine-Huang/T2I-CompBench`` at 1b70949 (MIT). This module is written from METHODS §5.3 and
the behaviour of those scripts; it contains none of their code.

One metric per category, each reading the generations of the prompt-set role of the same name
(``t2icompbench-<category>``; prompt sets of ``memobench_plugins.public_sets``, the 300 ``<category>_val.txt``
prompts). Image scores are in [0, 1]; a category score is the **mean over all images** (3,000 at the preset):

| metric id | category | per-image score (METHODS §5.3) | models |
|---|---|---|---|
| ``t2icompbench_color``, ``_shape``, ``_texture`` | attributes | A: Π_n P(yes │ "<chunk n>?") | BLIP VQA, spaCy |
| ``t2icompbench_spatial`` | 2D spatial | B: 0.25·c1 + 0.25·c2 + 0.5·pos, < 0.5 → 0 | detector, spaCy |
| ``t2icompbench_3d_spatial`` | 3D spatial | C: 0.25·c1 + 0.25·c2 + 0.5·pos3d, no floor | detector, DPT, spaCy |
| ``t2icompbench_numeracy`` | numeracy | D: Σ_o w·(0.5·[o found] + 0.5·[count = n]) | detector, spaCy tokens |
| ``t2icompbench_non_spatial`` | non-spatial | E: raw cosine CLIP ViT-B/32 (image, prompt) | CLIP (``clip_score``) |
| ``t2icompbench_complex`` | complex | F: 3-in-1 of A, B (complex parse) and E (adjectives removed) | all but depth |

Arithmetic and quirks live in :mod:`.scoring` (pure functions), models in :mod:`.backends`.

**compat.** ``compat=True`` (default) reproduces the reference scorers, quirks included (METHODS §0.2 rule 4):
BLIP answers rounded to 4 decimals and multiplied in float32; ``on top of`` scores pos 0 (§9 #17); the 3D depth crop
is transposed (§9 #18) and read from an 8-bit depth PNG; 3D object matching keeps the last match seen before both
objects are found; numeracy counts misalign after ``a``/``an`` + plural. ``compat=False`` is the corrected variant and
is reported under the metric id ``<id>_corrected``. The 2D floor (§9 #16) and the 150-pixel distance threshold are
the reference's rules, kept in both modes.

**Preset ``t2icompbench``** (METHODS §1.2, §5.3): the 300 ``_val`` prompts, 10 images per prompt, seeds 42…51
identical for every prompt (run with ``--utility-seeds 42-51``). Every value records whether its samples follow the
preset (``extra["preset"]``), the pinned sha256 of its prompt file (§2.7, §9 #20: ``color_val.txt`` is the split) and
the prompts' own digest. The reference generated with SD-2-base, DDIM 30, w = 7.5, fp16 and one CUDA generator per
image; memobench generates with the run's model and its CPU generators.

**How a model opts in.** The harness generates a role's images from the prompt set the model plugin names for it:
add ``"t2icompbench-color": "t2icompbench-color"`` (etc.) to the model's ``prompt_sets`` and select the metric.

**Where memobench differs from the reference scorers** (also listed in each value's ``impl["differs_from_reference"]``):

* BLIP VQA (A, F): transformers' ``BlipForQuestionAnswering`` port (default hub id
  ``Salesforce/blip-vqa-capfilt-large``) of LAVIS/BLIP ``model_base_vqa_capfilt_large.pth``. The reference runs
  that checkpoint natively at 480 px; the port was converted at 384 px (BLIP's loader resampled the 30×30 position
  grid to 24×24), so at 480 px transformers re-interpolates it (``interpolate_pos_encoding``): two bicubic
  resamplings instead of none. P(yes) is computed as the reference's ``vqa_prob`` (first decoder token after [DEC],
  softmax over the full vocabulary, p_yes/(p_yes+p_no)) by calling the port's ``text_encoder``/``text_decoder``
  modules, with [ENC] as the question's first token (the reference; transformers' own ``generate`` keeps [CLS]). fp32
  (the reference: fp32 on CUDA). The port's ``vision_config.layer_norm_eps`` is used as shipped.
* Detector (B, C, D, F): UniDet (``Unified_learned_OCIM_RS200_6x+2x`` for 2D, ``R50`` for numeracy/3D; detectron2)
  is not installable from a package registry. memobench uses an open-vocabulary OWL-ViT/OWLv2 detector from
  transformers (default ``google/owlv2-base-patch16-ensemble``): queried with the prompt's object names
  (``"a photo of a {}"``) instead of a fixed ~700-class label space, so a class "is detected" when a box for that query
  passes the threshold; sigmoid scores (OWL) instead of softmax class scores (UniDet), so the confidences c1, c2 that
  enter the score are on a different scale; threshold ``detector_threshold`` = 0.1 (OWL's operating point; UniDet ran at
  0.5) — a memobench choice, recorded; per-class NMS at 0.5 added (detectron2's ROI-head default; OWL has none).
  Boxes are rescaled into the reference's detector frame (torchvision ``Resize(479, max_size=480)``: 512² → 479²),
  where the 150-pixel and IoU rules of the reference apply. fp32 (the reference: fp16 autocast).
* Depth (C): transformers ``DPTForDepthEstimation`` (default ``Intel/dpt-hybrid-midas``, the port of
  ``dpt_hybrid-midas-501f0c75.pt``) with the reference's transform (480², mean/std 0.5); fp32 (the reference: fp16).
* CLIP (E, F): open_clip ViT-B-32 ``openai`` through the ``clip_score`` plugin, fp32, on the generated pixels; the
  reference ran openai ``clip`` in fp16 on PNG files, and ``clip.tokenize`` fails on prompts over 77 tokens where
  open_clip truncates.
* spaCy (A, B, C, D, F): the reference's ``en_core_web_sm``, whatever version is installed (recorded). spaCy is not a
  memobench dependency; without it the parsing metrics are unavailable (``non_spatial`` needs none).
* Prompts are passed directly, not recovered from file names (the reference keeps the text before the first ``_``;
  no T2I-CompBench prompt contains ``_``); 3-in-1 pairs sub-scores per sample instead of by position (identical with
  10 images per prompt in order, which the reference assumes).
* Reference crash paths (no NOUN in a 2D prompt, no object in a numeracy prompt, a number word as the last token, a
  3D object name matched only across two joined class names) score 0 or skip the token instead of aborting.

Weights: each model's parameter takes a local folder (``save_pretrained`` layout) or a hub id; offline, a hub id must
be in the Hugging Face cache. Absent weights, library or data files give ``MetricValue(value=None,
unavailable=<reason>)``, never a number. ``impl["weights"]`` records the source, revision and sha256 of every weight
file used.

This module imports neither torch nor transformers at import time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from memobench.api import (
    BadInput, Context, DataError, Metric, MetricInfo, MetricValue, Sample, dist_version, fetch, hookimpl, param, stats,
)

from . import scoring as S
from .backends import BlipVqa, DepthModel, Unavailable, ZeroShotDetector, load_nlp

__all__ = ["CATEGORIES", "METRICS", "PRESET", "T2ICompBenchMetric"]

PRESET = {"name": "t2icompbench", "images_per_prompt": 10, "seeds": list(range(42, 52)), "prompts": 300,
          "reference_generation": "stabilityai/stable-diffusion-2-base, DDIM 30 steps, guidance 7.5, fp16, "
                                  "one CUDA generator per image seeded 42+j (GORS_finetune/inference_eval.py)"}
REFERENCE = "Karine-Huang/T2I-CompBench@1b70949"
NEW_OBJECTS_SHA256 = "f39a3d2ff6067d7738673cbf465dc659ccc750776162989a5d9916f1d5f3e231"

BLIP_DIFF = ("transformers BlipForQuestionAnswering port (converted at 384 px) run at 480 px with re-interpolated "
             "position embeddings; the reference ran the LAVIS/BLIP checkpoint natively at 480 px")
DET_DIFF = ("open-vocabulary OWL-ViT/OWLv2 queried with the prompt's object names instead of UniDet's closed label "
            "space; sigmoid confidences; its own threshold; NMS 0.5 added; boxes rescaled to the 479-px UniDet frame")
DEPTH_DIFF = "transformers DPT port of MiDaS dpt_hybrid in fp32 (the reference: fp16)"
CLIP_DIFF = "open_clip ViT-B-32 openai in fp32 on pixels (the reference: openai clip fp16 on PNG files)"


# ---------------------------------------------------------------------------------------------- params
@dataclass
class CommonParams:
    compat: bool = param(True, "reproduce the reference's quirks (False: corrected variant, id <metric>_corrected)")
    nlp: str = param("en_core_web_sm", "spaCy pipeline: package name or path of an unpacked model (the reference's)")
    hf_cache_dir: str = param("", "Hugging Face cache folder for hub ids (default: the library's)")
    batch_size: int = param(16, "images scored per batch")

    def __post_init__(self):
        if self.batch_size < 1:
            raise BadInput(f"metric 't2icompbench' parameter batch_size must be ≥ 1, got {self.batch_size}")


@dataclass
class BlipParams(CommonParams):
    blip_weights: str = param("Salesforce/blip-vqa-capfilt-large", "folder or hub id (port of "
                                                                   "model_base_vqa_capfilt_large)")
    blip_weights_sha256: str = param("", "pin: sha256 of one of its weight files ('' = record only)")
    blip_image_size: int = param(480, "the reference's configs/vqa.yaml image_size")
    np_num: int = param(8, "questions per prompt (BLIP_vqa.py --np_num default)")
    question_token: str = param("enc", "first question token: enc ([ENC], the reference) | cls (transformers' "
                                       "generate)")

    def __post_init__(self):
        super().__post_init__()
        if self.question_token not in ("enc", "cls"):
            raise BadInput(f"metric 't2icompbench' parameter question_token must be enc or cls, "
                           f"got {self.question_token!r}")
        if self.np_num < 1 or self.blip_image_size < 1:
            raise BadInput("metric 't2icompbench' parameters np_num and blip_image_size must be ≥ 1")


@dataclass
class DetectorParams(CommonParams):
    detector_weights: str = param("google/owlv2-base-patch16-ensemble", "OWL-ViT / OWLv2 folder or hub id")
    detector_weights_sha256: str = param("", "pin: sha256 of one of its weight files ('' = record only)")
    detector_threshold: float = param(0.1, "OWL score threshold (memobench choice; UniDet's confidence threshold was "
                                           "0.5)")
    nms_iou: float = param(0.5, "per-class NMS (detectron2 ROI-head default)")
    query_template: str = param("a photo of a {}", "the detector's text query per object")
    frame_size: int = param(479, "the reference's detector resize: Resize(479, max_size=480); rules apply in that "
                                 "frame")
    frame_max_size: int = param(480, "largest side of the detector frame (Resize max_size)")
    distance_threshold: float = param(150.0, "2D 'next to'/'near' rule, pixels of that frame")
    iou_threshold: float = param(0.1, "2D left/right/top/bottom soft rule")

    def __post_init__(self):
        super().__post_init__()
        if not (0.0 <= self.detector_threshold < 1.0 and 0.0 < self.nms_iou <= 1.0):
            raise BadInput("metric 't2icompbench' parameters: detector_threshold must be in [0, 1) and nms_iou in "
                           f"(0, 1], got {self.detector_threshold} and {self.nms_iou}")


@dataclass
class Spatial2DParams(DetectorParams):
    floor: float = param(0.5, "image scores below it become 0 (2D script only, METHODS §9 #16)")


@dataclass
class Spatial3DParams(DetectorParams):
    depth_weights: str = param("Intel/dpt-hybrid-midas", "folder or hub id (port of dpt_hybrid-midas-501f0c75.pt)")
    depth_weights_sha256: str = param("", "pin: sha256 of one of its weight files ('' = record only)")
    depth_size: int = param(480, "image size of the depth model's input")
    iou_threshold_3d: float = param(0.5, "IoU threshold of the 3D spatial rule")


@dataclass
class NumeracyParams(DetectorParams):
    dataset_dir: str = param("", "folder with the reference's examples/dataset files (new_objects.txt); default: "
                                 "fetched")
    merge_threshold: float = param(0.9, "duplicate-box rule of numeracy_eval.calculate_iou")


@dataclass
class ClipParams(CommonParams):
    clip_weights_path: str = param("", "open_clip checkpoint or local-dir folder (clip_score's weights_path)")
    clip_arch: str = param("", "override ViT-B-32")
    clip_pretrained: str = param("", "override the openai tag")
    clip_cache_dir: str = param("", "open_clip cache folder (clip_score's cache_dir)")


@dataclass
class ComplexParams(BlipParams, Spatial2DParams, ClipParams):
    dataset_dir: str = param("", "folder with complex_val_{spatial,action}.txt; default: fetched (pinned sha256)")


# ---------------------------------------------------------------------------------------------- metric base
def _order_key(s: Sample) -> tuple:
    pid = s.prompt.id
    return (0, int(pid), "") if str(pid).isdigit() else (1, 0, str(pid)), s.seed, s.sample_key


class T2ICompBenchMetric(Metric):
    """Base of the T2I-CompBench category metrics (Huang et al., NeurIPS 2023; METHODS §5.3). See the module
    docstring for the scoring rules, the ``compat`` switch, the preset and the differences from the reference."""

    version = "1"
    category: ClassVar[str] = ""
    section: ClassVar[str] = ""
    Params = CommonParams

    # -- identity --------------------------------------------------------------------------------------------
    @property
    def metric_id(self) -> str:
        return self.name if self.params.compat else f"{self.name}_corrected"

    def _base_impl(self) -> dict:
        from memobench_plugins.public_sets import T2I_VAL_SHA256, t2i_source

        src = t2i_source(f"{self.category}_val.txt", T2I_VAL_SHA256[self.category])
        return {
            "metric": self.metric_id, "direction": "higher_is_better", "name": self.name, "version": self.version,
            "implementation": f"memobench t2icompbench {self.category} (METHODS §5.3 {self.section}; "
                              f"reference {REFERENCE})",
            "compat": bool(self.params.compat), "preset": PRESET["name"], "category": self.category,
            "prompt_file": {"path": src.path, "sha256": src.sha256, "repository": src.repository,
                            "commit": src.commit},
            "torch": dist_version("torch"), "weights": {}, "differs_from_reference": [],
        }

    def _unavailable(self, reason: str, impl: dict | None = None) -> dict[str, MetricValue]:
        impl = {**self._base_impl(), **(impl or {})}
        impl["n"] = 0
        return {self.metric_id: MetricValue(value=None, n=0, impl=impl, unavailable=reason)}

    # -- shared services -------------------------------------------------------------------------------------
    def _nlp(self, impl: dict):
        parse, rec = load_nlp(self.params.nlp)
        impl["weights"]["nlp"] = rec
        cache: dict[str, S.Parse] = {}

        def cached(text: str) -> S.Parse:
            if text not in cache:
                cache[text] = parse(text)
            return cache[text]

        return cached

    def _dataset_file(self, name: str, sha256: str, ctx: Context) -> Path:
        from memobench_plugins.public_sets import t2i_source

        src = t2i_source(name, sha256)
        d = getattr(self.params, "dataset_dir", "")
        try:
            return fetch(src.url, sha256, ctx.cache_dir, ctx.offline, local_path=(Path(d) / name) if d else None)
        except DataError as e:
            raise Unavailable(f"T2I-CompBench data file {name}: {e}") from None

    def _device(self, ctx: Context) -> str:
        return str(ctx.device or "cpu")

    def _blip(self, ctx: Context, impl: dict) -> BlipVqa:
        p = self.params
        m = BlipVqa(p.blip_weights, ctx.offline, self._device(ctx), p.blip_image_size, p.question_token,
                    p.hf_cache_dir or None, p.batch_size, weights_sha256=p.blip_weights_sha256 or None)
        impl["weights"]["blip_vqa"] = m.record
        impl["differs_from_reference"].append(BLIP_DIFF)
        return m

    def _detector(self, ctx: Context, impl: dict) -> ZeroShotDetector:
        p = self.params
        m = ZeroShotDetector(p.detector_weights, ctx.offline, self._device(ctx), p.detector_threshold, p.nms_iou,
                             p.query_template, p.hf_cache_dir or None,
                             weights_sha256=p.detector_weights_sha256 or None)
        impl["weights"]["detector"] = m.record
        impl["detector_frame"] = f"torchvision Resize({p.frame_size}, max_size={p.frame_max_size})"
        impl["differs_from_reference"].append(DET_DIFF)
        return m

    def _frame_detections(self, det: ZeroShotDetector, image: np.ndarray, names) -> tuple[list, tuple[int, int]]:
        """Detections rescaled from image pixels into the reference's detector frame, and that frame (H', W')."""
        h, w = int(image.shape[0]), int(image.shape[1])
        fh, fw = S.reference_frame(h, w, self.params.frame_size, self.params.frame_max_size)
        sx, sy = fw / w, fh / h
        out = [S.Detection(d.label, d.score, (d.box[0] * sx, d.box[1] * sy, d.box[2] * sx, d.box[3] * sy))
               for d in det.detect(image, names)]
        return out, (fh, fw)

    def _clip_cosines(self, ctx: Context, impl: dict, images: list, texts: list[str]) -> np.ndarray:
        from memobench_plugins.clip_score import ClipScore, ClipUnavailable, raw_cosine

        p = self.params
        cs = ClipScore(ClipScore.Params(variant="nemo2024", weights_path=p.clip_weights_path, arch=p.clip_arch,
                                        pretrained=p.clip_pretrained, cache_dir=p.clip_cache_dir,
                                        batch_size=p.batch_size))
        try:
            model, preprocess, tokenizer, rec = cs.load(ctx)
        except ClipUnavailable as e:
            raise Unavailable(str(e)) from None
        impl["weights"]["clip"] = {k: rec.get(k) for k in ("library", "feature_extractor", "arch", "pretrained",
                                                          "weights", "weights_sha256", "quick_gelu", "precision",
                                                          "transform", "tokenizer")}
        impl["differs_from_reference"].append(CLIP_DIFF)
        uniq = list(dict.fromkeys(texts))
        fi, ft = cs.features(model, preprocess, tokenizer, images, uniq, self._device(ctx))
        where = {t: i for i, t in enumerate(uniq)}
        return raw_cosine(fi, ft[[where[t] for t in texts]])

    def _attribute_scores(self, samples: list[Sample], ctx: Context, impl: dict, nlp) -> tuple[list[float], dict]:
        """METHODS §5.3 A per image (the BLIP-VQA noun-phrase product) and the questions asked per prompt id."""
        questions = {s.prompt.text: S.blip_questions(nlp(s.prompt.text), self.params.np_num) for s in samples}
        blip = self._blip(ctx, impl)
        probs = blip.yes_probabilities(Sample.images(samples), [questions[s.prompt.text] for s in samples])
        asked = {s.prompt.id: [q for q in questions[s.prompt.text] if q] for s in samples}
        return [S.blip_image_score(p, self.params.compat) for p in probs], asked

    def _located_objects(self, s: Sample, nlp, det: ZeroShotDetector, locality, complex_structure: bool = False):
        """(obj1, obj2, locality, detections in the reference frame, frame) of one spatial sample."""
        o1, o2 = S.spatial_objects(nlp(s.prompt.text), complex_structure)
        dets, frame = self._frame_detections(det, s.image, [o for o in (o1, o2) if o])
        return o1, o2, locality(s.prompt.text), dets, frame

    # -- scoring ---------------------------------------------------------------------------------------------
    def score(self, samples: list[Sample], ctx: Context, impl: dict) -> tuple[list[float], dict]:
        """Image scores (in ``samples`` order) and extra records; raises :class:`Unavailable`."""
        raise NotImplementedError

    def compute(self, samples: list[Sample], ctx: Context) -> dict[str, MetricValue]:
        if not samples:
            return self._unavailable(f"no samples of role {self.roles[0]!r} to score")
        ordered = sorted(samples, key=_order_key)
        impl = self._base_impl()
        try:
            with ctx.task(f"{self.metric_id}", len(ordered)):
                scores, extra = self.score(ordered, ctx, impl)
        except Unavailable as e:
            return self._unavailable(str(e), {k: v for k, v in impl.items() if k in ("weights",)})
        per_sample = {s.sample_key: float(v) for s, v in zip(ordered, scores, strict=True)}
        by_prompt: dict[str, list[float]] = {}
        for s, v in zip(ordered, scores, strict=True):
            by_prompt.setdefault(s.prompt.id, []).append(float(v))
        value, disp = stats.summarize([float(v) for v in scores], "mean_std")
        if disp is not None:
            disp = {**disp, "over": "images"}
        impl["n"] = len(ordered)
        impl["differs_from_reference"] = list(dict.fromkeys(impl["differs_from_reference"]))
        extra = {**extra, "preset": preset_report(ordered), "n_images": len(ordered), "n_prompts": len(by_prompt),
                 "per_prompt": {k: float(np.mean(v)) for k, v in by_prompt.items()},
                 "prompts_sha256": _prompts_digest(ordered), "aggregation": "mean over images"}
        return {self.metric_id: MetricValue(value=float(value), n=len(ordered), impl=impl, dispersion=disp,
                                            groups={"all": {"value": float(value), "n": len(ordered)}},
                                            per_sample=per_sample, extra=extra)}


def _prompts_digest(samples: list[Sample]) -> str:
    texts = sorted({s.prompt.text for s in samples})
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()


def preset_report(samples: list[Sample]) -> dict:
    """Whether the samples follow the ``t2icompbench`` preset: 300 prompts, seeds 42…51 for every prompt."""
    seeds: dict[str, list[int]] = {}
    for s in samples:
        seeds.setdefault(s.prompt.id, []).append(int(s.seed))
    want = PRESET["seeds"]
    deviations = []
    off = [pid for pid, ss in seeds.items() if sorted(ss) != want]
    if off:
        got = sorted({tuple(sorted(ss)) for ss in seeds.values()})
        deviations.append(f"{len(off)} prompt(s) not generated with exactly seeds 42-51 (seed sets: "
                          f"{[list(g) for g in got[:3]]}{' …' if len(got) > 3 else ''})")
    if len(seeds) != PRESET["prompts"]:
        deviations.append(f"{len(seeds)} prompts instead of {PRESET['prompts']}")
    return {"name": PRESET["name"], "images_per_prompt": PRESET["images_per_prompt"], "seeds": want,
            "conforming": not deviations, "deviations": deviations,
            "reference_generation": PRESET["reference_generation"]}


# ---------------------------------------------------------------------------------------------- categories
class BlipVqaMetric(T2ICompBenchMetric):
    """Attribute binding (color / shape / texture): Disentangled BLIP-VQA, METHODS §5.3 A (Huang et al., NeurIPS
    2023, §3): image score = Π over the prompt's first ``np_num`` noun chunks of P(yes | "<chunk>?")."""

    section = "A"
    Params = BlipParams

    def score(self, samples, ctx, impl):
        scores, asked = self._attribute_scores(samples, ctx, impl, self._nlp(impl))
        return scores, {"questions": asked, "rounding": "4 decimals per answer and per image, float32 product"
                        if self.params.compat else "none (float64 product)"}


class Spatial2DMetric(T2ICompBenchMetric):
    """2D spatial relations, METHODS §5.3 B (UniDet-based metric of Huang et al., NeurIPS 2023, §3): objects =
    first/last NOUN, locality from the prompt, score 0.25·c1 + 0.25·c2 + 0.5·pos, scores < 0.5 → 0 (§9 #16)."""

    section = "B"
    Params = Spatial2DParams

    def score(self, samples, ctx, impl):
        p = self.params
        nlp = self._nlp(impl)
        det = self._detector(ctx, impl)
        scores, parsed = [], {}
        for s in samples:
            o1, o2, loc, dets, _ = self._located_objects(s, nlp, det, S.locality_2d)
            parsed[s.prompt.id] = {"obj1": o1, "obj2": o2, "locality": loc}
            scores.append(S.spatial_2d_score(dets, o1, o2, loc, p.compat, p.iou_threshold, p.distance_threshold,
                                             p.floor))
        return scores, {"parsed": parsed}


class Spatial3DMetric(T2ICompBenchMetric):
    """3D spatial relations (T2I-CompBench++), METHODS §5.3 C: detector + MiDaS depth, score 0.25·c1 + 0.25·c2 +
    0.5·pos3d, no floor; compat keeps the transposed depth crop (§9 #18)."""

    section = "C"
    Params = Spatial3DParams

    def score(self, samples, ctx, impl):
        p = self.params
        nlp = self._nlp(impl)
        det = self._detector(ctx, impl)
        depth = DepthModel(p.depth_weights, ctx.offline, self._device(ctx), p.depth_size, p.hf_cache_dir or None,
                           weights_sha256=p.depth_weights_sha256 or None)
        impl["weights"]["depth"] = depth.record
        impl["differs_from_reference"].append(DEPTH_DIFF)
        scores, parsed = [], {}
        for s in samples:
            o1, o2, loc, dets, frame = self._located_objects(s, nlp, det, S.locality_3d)
            parsed[s.prompt.id] = {"obj1": o1, "obj2": o2, "locality": loc}
            img = s.image  # streamed samples decode on every access: once here
            dmap = S.depth_to_frame(depth.predict(img), img.shape[:2], frame, p.compat)
            scores.append(S.spatial_3d_score(dets, o1, o2, loc, dmap, p.compat, p.iou_threshold_3d))
        return scores, {"parsed": parsed}


class NumeracyMetric(T2ICompBenchMetric):
    """Numeracy (T2I-CompBench++), METHODS §5.3 D: expected (object, count) pairs from the prompt and
    ``new_objects.txt``; per object 0.5·w if detected, +0.5·w if the (de-duplicated) count matches."""

    section = "D"
    Params = NumeracyParams

    def score(self, samples, ctx, impl):
        p = self.params
        path = self._dataset_file("new_objects.txt", NEW_OBJECTS_SHA256, ctx)
        sing, plur = S.read_objects(path.read_text(encoding="utf-8"))
        impl["objects_file"] = {"name": "new_objects.txt", "sha256": NEW_OBJECTS_SHA256, "pairs": len(sing)}
        nlp = self._nlp(impl)
        det = self._detector(ctx, impl)
        scores, parsed = [], {}
        for s in samples:
            exp = S.numeracy_expected(nlp(s.prompt.text), sing, plur, p.compat)
            parsed[s.prompt.id] = {"objects": exp.objects, "counts": exp.counts}
            names = [S.NUMERACY_NAME_MAP.get(o, o) for o in exp.objects]
            dets, _ = self._frame_detections(det, s.image, names)
            scores.append(S.numeracy_score(dets, exp, p.merge_threshold))
        return scores, {"parsed": parsed}


class NonSpatialMetric(T2ICompBenchMetric):
    """Non-spatial relations, METHODS §5.3 E (CLIPScore of Huang et al., NeurIPS 2023, §3): raw cosine between
    openai CLIP ViT-B/32 features of the image and of the prompt."""

    section = "E"
    Params = ClipParams

    def score(self, samples, ctx, impl):
        cos = self._clip_cosines(ctx, impl, Sample.images(samples), [s.prompt.text for s in samples])
        return [float(c) for c in cos], {"text": "the prompt"}


class ComplexMetric(T2ICompBenchMetric):
    """Complex compositions, METHODS §5.3 F (3-in-1 of Huang et al., NeurIPS 2023, §3): attribute = BLIP-VQA
    product, spatial = 2D rule with the complex parse (floor 0.5), action = CLIP with adjectives removed; combined
    by the prompt's kind from ``complex_val_{spatial,action}.txt``."""

    section = "F"
    Params = ComplexParams

    def score(self, samples, ctx, impl):
        from memobench_plugins.public_sets import T2I_COMPLEX_PARTS_SHA256

        p = self.params
        lines = {k: self._dataset_file(f"complex_val_{k}.txt", T2I_COMPLEX_PARTS_SHA256[k], ctx)
                 .read_text(encoding="utf-8").splitlines() for k in ("spatial", "action")}
        impl["kind_files"] = {f"complex_val_{k}.txt": T2I_COMPLEX_PARTS_SHA256[k] for k in ("spatial", "action")}
        nlp = self._nlp(impl)
        attribute, _ = self._attribute_scores(samples, ctx, impl, nlp)
        action = self._clip_cosines(ctx, impl, Sample.images(samples),
                                    [S.remove_adjectives(nlp(s.prompt.text)) for s in samples])
        det = self._detector(ctx, impl)
        scores, parts, kinds = [], {}, {}
        for s, attr, act in zip(samples, attribute, action, strict=True):
            o1, o2, loc, dets, _ = self._located_objects(s, nlp, det, S.locality_2d, complex_structure=True)
            sp = S.spatial_2d_score(dets, o1, o2, loc, p.compat, p.iou_threshold, p.distance_threshold, p.floor)
            kind = S.complex_kind(s.prompt.text, lines["spatial"], lines["action"])
            kinds[s.prompt.id] = kind
            scores.append(S.combine_3in1(kind, attr, sp, float(act)))
            parts[s.sample_key] = {"attribute": attr, "spatial": sp, "action": float(act), "kind": kind}
        counts = {k: sum(1 for v in kinds.values() if v == k) for k in ("spatial", "action", "spatialaction")}
        return scores, {"sub_scores": parts, "kinds": counts}


def _make(category: str, base: type[T2ICompBenchMetric], display: str) -> type[T2ICompBenchMetric]:
    name = f"t2icompbench_{category}"
    low = {NonSpatialMetric: -1.0, ComplexMetric: -0.5}.get(base, 0.0)  # raw CLIP cosines can be negative
    info = MetricInfo(name, f"T2I-CompBench {display}", higher_is_better=True, min=low, max=1.0,
                      description=f"T2I-CompBench {display} (METHODS §5.3 {base.section}), mean image score over "
                                  "the category's _val prompts")
    doc = (f"T2I-CompBench ``{category}`` (Huang et al., NeurIPS 2023; METHODS §5.3 {base.section}). "
           + (base.__doc__ or ""))
    cls_name = "T2ICompBench" + "".join(part.capitalize() for part in category.split("_"))
    return type(cls_name, (base,), {"__doc__": doc, "__module__": __name__, "name": name, "category": category,
                                    "info": info, "roles": (f"t2icompbench-{category}",)})


CATEGORIES: dict[str, tuple[type[T2ICompBenchMetric], str]] = {
    "color": (BlipVqaMetric, "color (BLIP-VQA)"),
    "shape": (BlipVqaMetric, "shape (BLIP-VQA)"),
    "texture": (BlipVqaMetric, "texture (BLIP-VQA)"),
    "spatial": (Spatial2DMetric, "2D spatial"),
    "3d_spatial": (Spatial3DMetric, "3D spatial"),
    "numeracy": (NumeracyMetric, "numeracy"),
    "non_spatial": (NonSpatialMetric, "non-spatial (CLIP)"),
    "complex": (ComplexMetric, "complex (3-in-1)"),
}
METRICS: dict[str, type[T2ICompBenchMetric]] = {c: _make(c, b, d) for c, (b, d) in CATEGORIES.items()}


@hookimpl
def register_metrics(register):
    for cls in METRICS.values():
        register(cls)

