"""Model back-ends of the T2I-CompBench scorers (METHODS §5.3), each built on a library's public API.

* :class:`BlipVqa` — BLIP VQA through transformers ``BlipForQuestionAnswering`` + ``BlipProcessor`` (default
  ``Salesforce/blip-vqa-capfilt-large``, the transformers port of LAVIS/BLIP ``model_base_vqa_capfilt_large.pth``),
  answer mode ``vqa_prob``: P(yes) = p_yes / (p_yes + p_no) of the answer decoder's first-token softmax.
* :class:`ZeroShotDetector` — an OWL-ViT / OWLv2 open-vocabulary detector through transformers
  ``AutoModelForZeroShotObjectDetection`` + ``AutoProcessor`` (default ``google/owlv2-base-patch16-ensemble``),
  standing in for UniDet, which is not installable from a package registry.
* :class:`DepthModel` — MiDaS DPT through transformers ``AutoModelForDepthEstimation`` (default
  ``Intel/dpt-hybrid-midas``, the port of the reference's ``dpt_hybrid-midas-501f0c75.pt``).
* :func:`load_nlp` — spaCy (``en_core_web_sm`` by default, as the reference), turned into
  :class:`~memobench_plugins.t2icompbench.scoring.Parse` objects.
* CLIP comes from the ``clip_score`` plugin (``memobench_plugins.clip_score.ClipScore.load`` / ``features``).

Every loader takes a local folder or a hub id, honours ``offline`` (``local_files_only``) and raises
:class:`Unavailable` with the reason when the weights cannot be had; the caller reports the metric as unavailable.
Each returns a JSON-able record of what was loaded (class, source, revision, sha256 of the weight files).

Pins: a hub id may carry a revision, ``<hub id>@<commit>`` (so the existing ``*_weights`` parameters pin it); it is
passed to ``from_pretrained(revision=…)`` and checked against the snapshot actually loaded. The loaders also take
``weights_sha256`` (the sha256 of one weight file, e.g. ``model.safetensors``). The true hashes of the public
checkpoints are not known where this was written and none is invented: by default the revision and the sha256 of
every weight file loaded are recorded; a user pin that differs is refused with one line
(:class:`memobench.data.PinMismatchError`, exit 2).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memobench.api import PinMismatchError, check_pin, dist_version, file_sha256

from .scoring import Detection, Parse, Token, pre_question

__all__ = ["BlipVqa", "DepthModel", "Unavailable", "ZeroShotDetector", "load_nlp", "weights_record"]

# the reference's BLIP transform_test normalisation (BLIPvqa_eval/data/__init__.py)
BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class Unavailable(RuntimeError):
    """A scorer's weights or library cannot be loaded; the message is the reason."""


def split_source(source: str) -> tuple[str, str | None]:
    """``"<hub id>@<revision>"`` -> (hub id, revision); a local folder or a plain id -> (source, None)."""
    if "@" in source and not Path(source).expanduser().exists():
        sid, rev = source.rsplit("@", 1)
        if sid and rev:
            return sid, rev
    return source, None


def weights_record(source: str, cache_dir: str | None = None, revision: str | None = None,
                   weights_sha256: str | None = None) -> dict:
    """``{source, kind, revision, weights_sha256: {file: sha256}}`` for a local folder (every weight file in it) or
    a hub id (the weight files of its cached snapshot at ``revision`` or the latest, the revision = the snapshot's
    commit). Pins: a ``revision`` that names a commit must be the snapshot's; ``weights_sha256`` must be the sha256
    of one of the weight files; otherwise :class:`PinMismatchError`."""
    source, rev_in_source = split_source(source)
    revision = revision or rev_in_source
    pin = (weights_sha256 or "").strip().lower() or None
    p = Path(source).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
        rec = {"source": str(p), "kind": "local folder", "revision": None,
               "weights_sha256": {f.name: file_sha256(f) for f in files}}
        return _check_record(rec, pin)
    rec: dict[str, Any] = {"source": source, "kind": "hub id", "revision": None, "weights_sha256": {},
                           "requested_revision": revision}
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return rec
    for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"):
        r = try_to_load_from_cache(source, name, cache_dir=cache_dir, revision=revision)
        if isinstance(r, str) and os.path.isfile(r):
            snap = Path(r).parent
            rec["revision"] = snap.name  # hub cache layout: .../snapshots/<commit>/<file>
            for f in sorted(snap.iterdir()):
                if f.is_file() and f.suffix in WEIGHT_SUFFIXES:
                    rec["weights_sha256"][f.name] = file_sha256(f)
            break
    if revision and rec["revision"] and len(revision) == 40 and rec["revision"] != revision.lower():
        raise PinMismatchError(f"{source}: the loaded snapshot is commit {rec['revision']}, expected revision "
                               f"{revision} (pin): clear that snapshot from the Hugging Face cache or fix the pin")
    return _check_record(rec, pin)


def _check_record(rec: dict, pin: str | None) -> dict:
    if pin and pin not in rec["weights_sha256"].values():
        got = ", ".join(f"{k} {v}" for k, v in rec["weights_sha256"].items()) or "no weight file found"
        check_pin(got, pin, f"weights of {rec['source']}",
                  "use the checkpoint the pin names (a revision: '<hub id>@<commit>'), or correct the pin")
    if pin:
        rec["weights_pin"] = pin
    return rec


def _from_pretrained(cls, source: str, offline: bool, what: str, cache_dir: str | None, **kw):
    source, revision = split_source(source)
    if revision:
        kw["revision"] = revision
    try:
        return cls.from_pretrained(source, local_files_only=offline, cache_dir=cache_dir or None, **kw)
    except Exception as e:  # noqa: BLE001 - missing files / offline / format errors become the reason
        where = "offline and not in the Hugging Face cache" if offline and not Path(source).expanduser().is_dir() \
            else "could not be loaded"
        raise Unavailable(f"{what} weights {source!r} {where} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          f"pass a local folder (save_pretrained layout) as the weights parameter") from None


def _pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(np.asarray(image, dtype=np.uint8)[..., :3]))


# ---------------------------------------------------------------------------------------------- spaCy
_NLP: dict[str, tuple] = {}


def load_nlp(spec: str) -> tuple[Any, dict]:
    """(``parse(text) -> Parse``, record) for a spaCy pipeline (package name or path of an unpacked model).

    The reference parses with ``spacy.load("en_core_web_sm")``; its noun chunks, coarse POS tags and tokenisation
    are what the scorers read. spaCy is not a memobench dependency: without it (or without the model) the metrics
    that parse prompts are reported unavailable with the reason.
    """
    if spec not in _NLP:
        try:
            import spacy
        except ImportError:
            raise Unavailable("spaCy is not installed: the T2I-CompBench scorers parse prompts with spaCy "
                              f"{spec!r} (pip install spacy, then install the {spec} model)") from None
        try:
            nlp = spacy.load(spec)
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"spaCy model {spec!r} cannot be loaded ({type(e).__name__}: {str(e)[:160]}); install "
                              f"it or pass nlp=<path of the unpacked model>") from None
        pipes = set(getattr(nlp, "pipe_names", ()))
        if "parser" not in pipes or not pipes & {"tagger", "morphologizer"}:
            raise Unavailable(f"spaCy pipeline {spec!r} has no parser and tagger (pipes: {sorted(pipes)}); the "
                              "scorers need noun chunks and POS tags, as en_core_web_sm provides")
        meta = getattr(nlp, "meta", {}) or {}
        rec = {"library": f"spaCy {spacy.__version__}", "model": spec,
               "model_name": f"{meta.get('lang', '?')}_{meta.get('name', '?')}", "model_version": meta.get("version")}
        _NLP[spec] = (nlp, rec)
    nlp, rec = _NLP[spec]
    return (lambda text: parse_doc(nlp(text))), dict(rec)


def parse_doc(doc) -> Parse:
    """A spaCy ``Doc`` → :class:`Parse` (token text, ``pos_``, ``whitespace_``; ``noun_chunks`` texts)."""
    return Parse(tuple(Token(t.text, t.pos_, t.whitespace_) for t in doc), tuple(c.text for c in doc.noun_chunks))


# ---------------------------------------------------------------------------------------------- BLIP VQA
class BlipVqa:
    """BLIP VQA in the reference's ``vqa_prob`` answer mode (``BLIPvqa_eval/models/blip_vqa.py``):

    1. image: PIL bicubic resize to ``image_size``² (480), ``ToTensor``, the CLIP mean/std (``transform_test``);
    2. question: ``pre_question`` text, BERT tokens (``padding='longest'``, ``truncation``, ``max_length=35``), the
       first token ([CLS]) replaced by [ENC] (``question_token="enc"``, the reference; ``"cls"`` keeps [CLS], as
       transformers' ``BlipForQuestionAnswering.generate`` does);
    3. the text encoder cross-attends the ViT tokens; the answer decoder gets the single [DEC] (bos) token;
    4. P(yes) = softmax(first-token logits)[yes] / (softmax[yes] + softmax[no]).

    ``image_size`` differing from the checkpoint's ``vision_config.image_size`` runs the ViT with
    ``interpolate_pos_encoding=True``.
    """

    def __init__(self, source: str, offline: bool, device: str = "cpu", image_size: int = 480,
                 question_token: str = "enc", cache_dir: str | None = None, batch_size: int = 16,
                 weights_sha256: str | None = None):
        import torch
        from transformers import BlipForQuestionAnswering, BlipProcessor

        self.torch = torch
        self.processor = _from_pretrained(BlipProcessor, source, offline, "BLIP VQA processor", cache_dir)
        self.model = _from_pretrained(BlipForQuestionAnswering, source, offline, "BLIP VQA", cache_dir)
        self.model.eval().to(device)
        self.device, self.image_size, self.batch_size = device, int(image_size), max(1, int(batch_size))
        tok = self.processor.tokenizer
        self.tokenizer = tok
        tcfg = self.model.config.text_config
        unk = tok.unk_token_id
        self.yes_id, self.no_id = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
        if unk is not None and unk in (self.yes_id, self.no_id):
            raise Unavailable(f"BLIP tokenizer of {source!r} has no 'yes'/'no' token")
        self.bos_id = int(tcfg.bos_token_id)
        if question_token == "enc":
            enc = tok.convert_tokens_to_ids("[ENC]")
            # the reference tokenizer adds [DEC] then [ENC] to bert-base-uncased: 30522, 30523; transformers'
            # processor does not always carry [ENC], whose embedding row is still in the converted weights
            self.enc_rule = "tokenizer [ENC]" if enc is not None and enc != unk else "bos_token_id + 1"
            self.enc_id = int(enc) if self.enc_rule == "tokenizer [ENC]" else self.bos_id + 1
            if self.enc_id >= tcfg.vocab_size:
                raise Unavailable(f"BLIP [ENC] id {self.enc_id} is outside the vocabulary ({tcfg.vocab_size})")
        elif question_token == "cls":
            self.enc_id, self.enc_rule = None, "[CLS] kept"
        else:
            raise ValueError(f"question_token must be enc or cls, got {question_token!r}")
        self.interpolate = self.image_size != int(self.model.config.vision_config.image_size)
        self.record = {"class": "transformers.BlipForQuestionAnswering + BlipProcessor (tokenizer)",
                       "library": f"transformers {dist_version('transformers')}",
                       **weights_record(source, cache_dir, weights_sha256=weights_sha256),
                       "image_size": self.image_size, "checkpoint_image_size": int(
                           self.model.config.vision_config.image_size),
                       "interpolate_pos_encoding": self.interpolate, "yes_id": int(self.yes_id),
                       "no_id": int(self.no_id), "bos_id": self.bos_id, "question_first_token": self.enc_rule,
                       "enc_id": self.enc_id, "answer_mode": "vqa_prob: p_yes/(p_yes+p_no), first decoder token",
                       "transform": f"PIL bicubic {self.image_size}x{self.image_size}, CLIP mean/std",
                       "precision": "fp32"}

    def pixel_values(self, images: Sequence[np.ndarray]):
        from PIL import Image

        torch = self.torch
        s = self.image_size
        arr = np.stack([np.asarray(_pil(im).resize((s, s), Image.BICUBIC), dtype=np.float32) / 255.0
                        for im in images])
        arr = (arr - np.asarray(BLIP_MEAN, np.float32)) / np.asarray(BLIP_STD, np.float32)
        return torch.from_numpy(arr.transpose(0, 3, 1, 2).copy()).to(self.device)

    def yes_probabilities(self, images: Sequence[np.ndarray], questions: Sequence[Sequence[str]]) \
            -> list[list[float | None]]:
        """P(yes) per image and question; ``None`` where the question is ``""`` (no question asked)."""
        torch = self.torch
        out: list[list[float | None]] = [[None] * len(q) for q in questions]
        with torch.no_grad():
            for s in range(0, len(images), self.batch_size):
                idx = list(range(s, min(len(images), s + self.batch_size)))
                emb = self.model.vision_model(pixel_values=self.pixel_values([images[i] for i in idx]),
                                              interpolate_pos_encoding=self.interpolate).last_hidden_state
                n_q = max(len(questions[i]) for i in idx)
                for n in range(n_q):
                    rows = [(r, i) for r, i in enumerate(idx) if n < len(questions[i]) and questions[i][n]]
                    if not rows:
                        continue
                    texts = [pre_question(questions[i][n]) for _, i in rows]
                    tok = self.tokenizer(texts, padding="longest", truncation=True, max_length=35,
                                         return_tensors="pt").to(self.device)
                    ids = tok.input_ids.clone()
                    if self.enc_id is not None:
                        ids[:, 0] = self.enc_id
                    img = emb[[r for r, _ in rows]]
                    q_states = self.model.text_encoder(
                        input_ids=ids, attention_mask=tok.attention_mask, encoder_hidden_states=img,
                        encoder_attention_mask=torch.ones(img.shape[:-1], dtype=torch.long, device=img.device),
                    ).last_hidden_state
                    start = torch.full((len(rows), 1), self.bos_id, dtype=torch.long, device=self.device)
                    logits = self.model.text_decoder(input_ids=start, encoder_hidden_states=q_states,
                                                     encoder_attention_mask=tok.attention_mask).logits[:, 0, :]
                    prob = torch.softmax(logits.float(), dim=1)
                    p = prob[:, self.yes_id] / (prob[:, self.yes_id] + prob[:, self.no_id])
                    for (_, i), v in zip(rows, p.tolist(), strict=True):
                        out[i][n] = float(v)
        return out


# ---------------------------------------------------------------------------------------------- detector
class ZeroShotDetector:
    """Open-vocabulary detection with OWL-ViT / OWLv2 (transformers), queried with the object names of the prompt.

    Per image: ``processor(text=[[template.format(name) ...]], images=...)``; the processor's
    ``post_process_grounded_object_detection`` (sigmoid of each box's best query logit, ``threshold``); boxes in
    image pixels (OWLv2 pads to a square at the bottom/right: boxes are scaled to that square and clipped to the
    image, as detectron2 clips UniDet's); then per-label NMS at ``nms_iou`` (detectron2's ROI-head default 0.5;
    OWL's post-processing has none) and sorting by decreasing score (detectron2's output order).
    """

    SUPPORTED = ("owlvit", "owlv2")

    def __init__(self, source: str, offline: bool, device: str = "cpu", threshold: float = 0.1,
                 nms_iou: float = 0.5, template: str = "a photo of a {}", cache_dir: str | None = None,
                 weights_sha256: str | None = None):
        import torch
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.torch = torch
        self.processor = _from_pretrained(AutoProcessor, source, offline, "detector processor", cache_dir)
        self.model = _from_pretrained(AutoModelForZeroShotObjectDetection, source, offline, "detector", cache_dir)
        mtype = getattr(self.model.config, "model_type", "?")
        if mtype not in self.SUPPORTED:
            raise Unavailable(f"detector {source!r} is a {mtype!r} model; supported: {', '.join(self.SUPPORTED)}")
        self.model.eval().to(device)
        self.device, self.threshold, self.nms_iou, self.template = device, float(threshold), float(nms_iou), template
        self.pads_square = mtype == "owlv2"
        self.record = {"class": f"transformers {type(self.model).__name__} + {type(self.processor).__name__}",
                       "library": f"transformers {dist_version('transformers')}", "model_type": mtype,
                       **weights_record(source, cache_dir, weights_sha256=weights_sha256),
                       "threshold": self.threshold, "nms_iou": self.nms_iou,
                       "query_template": template, "precision": "fp32",
                       "vocabulary": "open: queried with the prompt's object names"}

    def detect(self, image: np.ndarray, names: Sequence[str]) -> list[Detection]:
        """Detections of ``names`` (labels are the names) in image pixels, by decreasing score."""
        torch = self.torch
        from torchvision.ops import batched_nms

        names = list(dict.fromkeys(n for n in names if n))
        if not names:
            return []
        h, w = int(image.shape[0]), int(image.shape[1])
        inputs = self.processor(text=[[self.template.format(n) for n in names]], images=[_pil(image)],
                                return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        side = max(h, w)
        target = [(side, side)] if self.pads_square else [(h, w)]
        res = self.processor.post_process_grounded_object_detection(outputs, threshold=self.threshold,
                                                                    target_sizes=target)[0]
        boxes, scores, labels = res["boxes"].float(), res["scores"].float(), res["labels"].long()
        if boxes.numel() == 0:
            return []
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        keep = batched_nms(boxes, scores, labels, self.nms_iou)  # indices by decreasing score
        return [Detection(names[int(labels[k])], float(scores[k]), tuple(float(v) for v in boxes[k].tolist()))
                for k in keep.tolist()]


# ---------------------------------------------------------------------------------------------- depth
class DepthModel:
    """MiDaS DPT relative inverse depth (larger = nearer), with the reference's ``model_bank_3d`` transform:
    ``Resize([size, size])`` (PIL bilinear), ``ToTensor``, ``Normalize(0.5, 0.5)``."""

    def __init__(self, source: str, offline: bool, device: str = "cpu", size: int = 480,
                 cache_dir: str | None = None, weights_sha256: str | None = None):
        import torch
        from transformers import AutoModelForDepthEstimation

        self.torch = torch
        self.model = _from_pretrained(AutoModelForDepthEstimation, source, offline, "depth", cache_dir)
        self.model.eval().to(device)
        self.device, self.size = device, int(size)
        self.record = {"class": f"transformers {type(self.model).__name__}",
                       "library": f"transformers {dist_version('transformers')}",
                       **weights_record(source, cache_dir, weights_sha256=weights_sha256),
                       "transform": f"PIL bilinear {self.size}x{self.size}, mean 0.5, std 0.5", "precision": "fp32"}

    def predict(self, image: np.ndarray) -> np.ndarray:
        from PIL import Image

        torch = self.torch
        arr = np.asarray(_pil(image).resize((self.size, self.size), Image.BILINEAR), dtype=np.float32) / 255.0
        x = torch.from_numpy(((arr - 0.5) / 0.5).transpose(2, 0, 1).copy())[None].to(self.device)
        with torch.no_grad():
            d = self.model(pixel_values=x).predicted_depth
        return d.reshape(d.shape[-2], d.shape[-1]).float().cpu().numpy()
