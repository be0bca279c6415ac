"""``memobench explain``: Wen et al.'s detection statistic, verdict and token-wise significance for one prompt, as a
Python API (:func:`explain`, :class:`Explainer`) and a picture (:func:`render_png`).

For a prompt p and seeds (default 0-3) it computes, in one pass along the guided sampling trajectory
(:func:`memobench_plugins.detect.wen.text_noise_trajectory`, METHODS §6.1):

* d(p) and the verdict against the threshold that ``memobench detect`` calibrated for this model and these detector
  settings (rule ``acc``: max balanced accuracy, or ``fpr``: the TPR@1%FPR operating point; :mod:`.roc`), with that
  threshold's TPR/FPR and AUC on the calibration sets. Without a calibration the verdict is ``uncalibrated``;
* the significance of each prompt token (BOS, EOS and padding excluded) and its share of the prompt's total;
* the generated images (one per seed, the trajectory of the statistic continued to the last step; identical to
  ``memobench run``'s images for the same seeds and generation settings);
* when the prompt belongs to a prompt set with a training image (a ``VM``/``TM`` prompt of a registered set, or a
  ``reference`` column of a prompt file), the SSCD similarity of each image to it (max over the prompt's
  references, mean over images; preset ``dori2026`` as the ``sscd_orig`` metric);
* the counterfactuals of issue 10: the top-ranked token **removed** and **replaced** (by ``replacement``, default
  "thing"), each with its own d(p), images and SSCD, and a statement of whether each edit lowered the statistic and
  the SSCD. The edits are made on token ids (the tokenizer's BOS/EOS/padding rebuilt), so "token" means a BPE
  token, which may be part of a word; the edited prompt text is the decoded ids.

Nothing is assumed: every "lowers" is a comparison of two computed numbers (strictly lower).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memobench.api import Prompt

from .bench import Session, load_calibration, make_detector, open_session, other_calibrations
from .roc import RULES
from .wen import prompt_token_positions

REFERENCE_LABELS = ("VM", "TM")  # prompts of registered sets whose references are their training images
VERDICT_MEM, VERDICT_NOT, VERDICT_NONE = "likely memorized", "not memorized", "uncalibrated"


def attribution_label(e: "Explanation") -> str:
    """What the significance differentiates with respect to, for captions: e_k is the text encoder's output row k
    (the reference) or the input embedding of token k (``attribution=token_embeds``)."""
    if (e.detector.get("params") or {}).get("attribution") == "token_embeds":
        return "e_k = input embedding of token k"
    return "e_k = text-encoder output row k"


@dataclass
class TokenScore:
    position: int  # index in the 77-token row (1 = first prompt token)
    token_id: int
    text: str
    significance: float  # mean over scored steps of ‖∂L_s/∂e[k]‖₂
    share: float  # significance / sum over the prompt's tokens
    rank: int  # 1 = most significant


@dataclass
class Ablation:
    kind: str  # "remove" | "replace"
    token: str
    position: int
    replacement: str | None
    text: str  # decoded edited prompt
    statistic: float
    sscd: list | None
    sscd_mean: float | None
    lowers_statistic: bool
    lowers_sscd: bool | None
    images: Any = field(default=None, repr=False)  # G×H×W×3 uint8


@dataclass
class Explanation:
    prompt: Prompt
    model: str
    seeds: list
    detector: dict
    statistic: float
    per_step: list
    per_image: list
    tokens: list  # TokenScore, prompt order
    threshold_rule: str
    calibration: dict | None
    threshold: float | None
    verdict: str
    note: str
    sscd: list | None
    sscd_mean: float | None
    sscd_impl: dict | None
    reference_source: str | None
    ablations: list  # Ablation
    statements: list
    images: Any = field(default=None, repr=False)
    reference: Any = field(default=None, repr=False)

    def top_tokens(self, k: int = 3) -> list[TokenScore]:
        return sorted(self.tokens, key=lambda t: t.rank)[:k]

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("images", "reference", "prompt", "ablations",
                                                                  "tokens")}
        d["prompt"] = {"id": self.prompt.id, "text": self.prompt.text, "mem_type": self.prompt.mem_type,
                       "reference_ids": list(self.prompt.reference_ids)}
        d["tokens"] = [asdict(t) for t in self.tokens]
        d["ablations"] = [{k: v for k, v in asdict(a).items() if k != "images"} for a in self.ablations]
        return d


class Explainer:
    """Loads a model once and explains prompts with it (``memobench explain`` uses one per invocation)."""

    def __init__(self, model: str = "tiny", model_params: dict | None = None, seeds=None,
                 detector_params: dict | None = None, cache_dir: str | Path | None = None, device: str = "cpu",
                 offline: bool = False, threshold_rule: str = "acc", replacement: str = "thing",
                 sscd_preset: str = "dori2026", sscd_backend: str = "auto", session: Session | None = None,
                 registry=None):
        from memobench.api import BadInput

        if threshold_rule not in RULES:
            raise BadInput(f"--threshold-rule: {threshold_rule!r} not in {RULES}")
        if not replacement.strip():
            raise BadInput("--replacement: give a word")
        params = dict(detector_params or {})
        if seeds is not None:
            params["seeds"] = tuple(int(s) for s in seeds)
        make_detector("wen", params)  # validate before the model loads
        self.session = session or open_session(model, model_params, cache_dir, device, offline, registry)
        self.detector = make_detector("wen", params, self.session.generation)
        self.threshold_rule = threshold_rule
        self.replacement = replacement.strip()
        self.sscd_preset, self.sscd_backend = sscd_preset, sscd_backend
        self._sscd = None
        self._sscd_error: str | None = None
        self._known: dict[str, tuple[Prompt, Any]] | None = None
        self.calibration = load_calibration(self.session, self.detector)

    # ------------------------------------------------------------------------------------------- lookups
    def known_prompts(self) -> dict[str, tuple[Prompt, Any]]:
        """Prompt text → (Prompt, prompt set) over the model plugin's named prompt sets (target first)."""
        if self._known is None:
            self._known = {}
            sets = type(self.session.model_plugin).prompt_sets or {}
            for role in ("target", *[r for r in sets if r != "target"]):
                name = sets.get(role)
                if not name or name not in self.session.registry.entries["prompt_set"]:
                    continue
                ps = self.session.registry.get("prompt_set", name)()
                try:
                    prompts = ps.prompts(self.session.ctx)
                except Exception:  # a set that cannot be read (e.g. data missing offline) is skipped
                    continue
                for p in prompts:
                    self._known.setdefault(p.text, (p, ps))
        return self._known

    def references(self, prompt: Prompt, prompt_set) -> tuple[list, str | None]:
        if prompt_set is None or not prompt.reference_ids:
            return [], None
        is_file = str(getattr(prompt_set, "name", "")).startswith("file:")
        if not is_file and prompt.mem_type not in REFERENCE_LABELS:
            return [], None
        refs = [r for rid in prompt.reference_ids
                if (r := prompt_set.reference_image(prompt, rid, self.session.ctx)) is not None]
        return refs, (f"{prompt_set.name}:{prompt.id}" if refs else None)

    def sscd(self):
        if self._sscd is None and self._sscd_error is None:
            from memobench.api import SSCD, SSCDUnavailableError

            try:
                self._sscd = SSCD(self.sscd_preset, backend=self.sscd_backend, cache_dir=self.session.ctx.cache_dir,
                                  offline=self.session.ctx.offline)
                self._sscd.impl  # loads the weights now, so a failure is reported once
            except (SSCDUnavailableError, OSError, ImportError) as e:
                self._sscd, self._sscd_error = None, f"SSCD unavailable: {e}"
        return self._sscd

    def _sscd_scores(self, images, refs) -> list | None:
        if not refs or self.sscd() is None:
            return None
        sim = self._sscd.similarity(list(images), refs)  # G × R
        return [float(v) for v in sim.max(axis=1)]

    # ------------------------------------------------------------------------------------------- ids
    def _row(self, token_ids: list[int]):
        """[BOS] + tokens (≤ max_length − 2) + [EOS] + padding, as the tokenizer builds a padded row."""
        import torch

        tok = self.session.model.tokenizer
        n = tok.model_max_length
        row = [tok.bos_token_id, *token_ids[: n - 2], tok.eos_token_id]
        row += [tok.pad_token_id] * (n - len(row))
        return torch.tensor([row], device=self.session.model.device)

    def _run(self, ids, significance: bool):
        import torch

        m = self.session.model
        with torch.no_grad():
            emb = m.encode_ids(ids)
        tr = self.detector.trace(m, emb, significance=significance, full=True, token_ids=ids)
        return tr, m.decode(tr.latents)

    # ------------------------------------------------------------------------------------------- explain
    def explain(self, prompt: str | Prompt, prompt_set=None, reference=None, ablate: bool = True) -> Explanation:
        """Explain one prompt. ``prompt_set`` (the set a :class:`Prompt` comes from) gives its training image;
        for a bare string the model's prompt sets are searched. ``reference`` (H×W×3 uint8 or a list) overrides."""
        import numpy as np

        if isinstance(prompt, str):
            found = self.known_prompts().get(prompt.strip()) if prompt_set is None else None
            prompt, prompt_set = found if found else (Prompt(id="prompt", text=prompt.strip()), prompt_set)
        if not prompt.text.strip():
            from memobench.api import BadInput

            raise BadInput("explain: the prompt is empty")
        m = self.session.model
        tok = m.tokenizer
        ids = m.tokenize([prompt.text])
        tr, images = self._run(ids, significance=True)
        pos = prompt_token_positions(tok, ids[0].tolist())
        sig = [float(tr.significance[k]) for k, _ in pos]
        total = sum(sig) or 1.0
        order = sorted(range(len(pos)), key=lambda i: -sig[i])
        ranks = {i: r + 1 for r, i in enumerate(order)}
        tokens = [TokenScore(k, t, tok.decode([t]).strip(), s, s / total, ranks[i])
                  for i, ((k, t), s) in enumerate(zip(pos, sig))]
        if reference is not None:
            refs = list(reference) if isinstance(reference, (list, tuple)) else [reference]
            ref_src = "given"
        else:
            refs, ref_src = self.references(prompt, prompt_set)
        sscd = self._sscd_scores(images, refs)
        sscd_mean = float(np.mean(sscd)) if sscd else None

        cal = self.calibration
        thr, verdict, note = None, VERDICT_NONE, ""
        if cal is not None:
            pt = cal["thresholds"][self.threshold_rule]
            thr = pt["threshold"]
            if thr is None:
                verdict, note = VERDICT_NOT, pt.get("note", "")
            else:
                verdict = VERDICT_MEM if tr.statistic >= thr else VERDICT_NOT
            note = (f"threshold {_f(thr)} ({self.threshold_rule}) calibrated by `memobench detect` on "
                    f"{cal['memorized']['name']} (n={cal['n_pos']}) vs {cal['nonmemorized']['name']} "
                    f"(n={cal['n_neg']}): TPR {pt['tpr']:.3f}, FPR {pt['fpr']:.3f}, AUC {cal['auc']:.3f}"
                    + (f"; {note}" if note else ""))
        else:
            others = other_calibrations(self.session, self.detector)
            hint = ""
            if others:
                hint = " (calibrations of this model exist for other detector settings: " + "; ".join(
                    _params_str(o["detector"]["params"]) for o in others[:3]) + ")"
            note = (f"no calibrated threshold for model '{self.session.model_name}' with these detector settings; "
                    f"run `memobench detect --model {self.session.model_name}` with the same --seeds first{hint}")

        ablations: list[Ablation] = []
        if ablate and tokens:
            top = min(tokens, key=lambda t: t.rank)
            i = [t.position for t in tokens].index(top.position)
            own = [t.token_id for t in tokens]
            rep_ids = tok(self.replacement, add_special_tokens=False).input_ids
            for kind, new in (("remove", own[:i] + own[i + 1:]), ("replace", own[:i] + rep_ids + own[i + 1:])):
                tr2, imgs2 = self._run(self._row(new), significance=False)
                s2 = self._sscd_scores(imgs2, refs)
                s2m = float(np.mean(s2)) if s2 else None
                ablations.append(Ablation(
                    kind, top.text, top.position, self.replacement if kind == "replace" else None,
                    tok.decode(new).strip(), tr2.statistic, s2, s2m, bool(tr2.statistic < tr.statistic),
                    None if s2m is None or sscd_mean is None else bool(s2m < sscd_mean), imgs2))
        expl = Explanation(
            prompt=prompt, model=self.session.model_name, seeds=list(self.detector.params.seeds),
            detector=self.detector.identity(), statistic=tr.statistic, per_step=tr.per_step,
            per_image=tr.per_image, tokens=tokens, threshold_rule=self.threshold_rule, calibration=cal,
            threshold=thr, verdict=verdict, note=note, sscd=sscd, sscd_mean=sscd_mean,
            sscd_impl=self._sscd.impl if (sscd is not None and self._sscd is not None) else (
                {"unavailable": self._sscd_error} if refs and self._sscd_error else None),
            reference_source=ref_src, ablations=ablations, statements=[], images=images,
            reference=refs[0] if refs else None)
        expl.statements = statements(expl)
        return expl


def statements(e: Explanation) -> list[str]:
    """The sentences the tool prints about the counterfactual edits (each a comparison of computed numbers)."""
    from memobench.api import PRESETS

    preset = PRESETS.get((e.sscd_impl or {}).get("preset", ""))
    tau = preset.threshold if preset is not None else None
    out = []
    for a in e.ablations:
        what = (f"Removing the top-ranked token '{a.token}'" if a.kind == "remove"
                else f"Replacing the top-ranked token '{a.token}' by '{a.replacement}'")
        parts = [f"{'lowers' if a.lowers_statistic else 'does not lower'} the statistic "
                 f"({e.statistic:.4g} → {a.statistic:.4g}"
                 + (", still above the verdict threshold" if a.lowers_statistic and e.threshold is not None
                    and a.statistic > e.threshold else "") + ")"]
        if a.sscd_mean is not None and e.sscd_mean is not None:
            parts.append(f"{'lowers' if a.lowers_sscd else 'does not lower'} the SSCD to the training image "
                         f"({e.sscd_mean:.3f} → {a.sscd_mean:.3f}"
                         + (f", still above the copy threshold {tau:g}" if a.lowers_sscd and tau is not None
                            and a.sscd_mean > tau else "") + ")")
        out.append(f"{what} {' and '.join(parts)}.")
    return out


def explain(prompt: str | Prompt, model: str = "tiny", seeds=None, **kw) -> Explanation:
    """Explain one prompt (loads the model; for many prompts use one :class:`Explainer`)."""
    ablate = kw.pop("ablate", True)
    reference = kw.pop("reference", None)
    return Explainer(model=model, seeds=seeds, **kw).explain(prompt, reference=reference, ablate=ablate)


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def _params_str(params: dict) -> str:
    keys = ("seeds", "score_steps", "guidance_scale", "num_inference_steps")
    return ", ".join(f"{k}={seeds_label(v) if k == 'seeds' else v}" for k, v in params.items() if k in keys)


# ---------------------------------------------------------------------------------------------- picture
def _font(size: int):
    """DejaVu Sans (shipped with matplotlib, full Unicode: ‖ ∂ → ₂); Pillow's default font otherwise."""
    import os

    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: bitmap font only
            return ImageFont.load_default()


def _shade(x: float) -> tuple[int, int, int]:
    """0 → white, 1 → saturated red."""
    x = min(max(x, 0.0), 1.0)
    return (255, int(round(255 - 200 * x)), int(round(255 - 215 * x)))


def render_png(e: Explanation, cell: int = 160, width: int = 1100) -> "Any":
    """The explanation as an image (H×W×3 uint8): header, token strip shaded by significance, the training image
    (if any) next to the generated images, and one row per counterfactual edit."""
    import numpy as np
    from PIL import Image, ImageDraw

    f_txt, f_small, f_tok = _font(14), _font(12), _font(16)
    n_img = len(e.images) + (1 if e.reference is not None else 0)
    W = max(width, 16 + n_img * (cell + 8))
    pad = 8

    def wrap(text: str, font, maxw: int) -> list[str]:
        words, lines, cur = text.split(" "), [], ""
        d = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        for w in words:
            cand = (cur + " " + w).strip()
            if d.textlength(cand, font=font) <= maxw or not cur:
                cur = cand
            else:
                lines.append(cur)
                cur = w
        return lines + [cur]

    head = [(f'prompt: "{e.prompt.text}"', f_txt)]
    head.append((f"model {e.model} · seeds {seeds_label(e.seeds)} · d(p) = {e.statistic:.4g} · verdict: "
                 f"{e.verdict.upper()}", f_txt))
    head.append((e.note, f_small))
    if e.sscd_mean is not None:
        head.append((f"SSCD to the training image ({e.reference_source}): mean {e.sscd_mean:.3f} over "
                     f"{len(e.sscd)} images (max {max(e.sscd):.3f})", f_small))
    lines = [(ln, f) for t, f in head for ln in wrap(t, f, W - 2 * pad)]
    legend = wrap(f"token-wise significance ‖∂L/∂e_k‖₂ ({attribution_label(e)}), mean over steps (Wen et al.): "
                  "shade ∝ significance / max; % = share of the prompt's total; # = rank. BOS/EOS/padding excluded.",
                  f_small, W - 2 * pad)

    # token boxes
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    smax = max((t.share for t in e.tokens), default=1.0) or 1.0
    boxes, x, y, bh = [], pad, 0, 44
    for t in e.tokens:
        label, sub = t.text, f"{100 * t.share:.0f}% · #{t.rank}"
        w = int(max(probe.textlength(label, font=f_tok), probe.textlength(sub, font=f_small))) + 14
        if x + w > W - pad:
            x, y = pad, y + bh + 6
        boxes.append((x, y, w, t, label, sub))
        x += w + 4
    strip_h = (y + bh + 6) if e.tokens else 20
    line_h = 19
    H = pad + len(lines) * line_h + 4 + 18 * len(legend) + strip_h + 24 + (cell + 40) * (1 + len(e.ablations)) + 90 * len(e.ablations)
    img = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(img)
    yy = pad
    vcol = {VERDICT_MEM: (190, 0, 0), VERDICT_NOT: (0, 120, 0)}.get(e.verdict, (160, 110, 0))
    for ln, f in lines:
        d.text((pad, yy), ln, fill=vcol if "verdict:" in ln and ln.startswith("model ") else (0, 0, 0), font=f)
        yy += line_h
    yy += 4
    for ln in legend:
        d.text((pad, yy), ln, fill=(90, 90, 90), font=f_small)
        yy += 18
    for bx, by, w, t, label, sub in boxes:
        d.rectangle([bx, yy + by, bx + w, yy + by + bh], fill=_shade(t.share / smax), outline=(120, 120, 120))
        d.text((bx + 7, yy + by + 3), label, fill=(0, 0, 0), font=f_tok)
        d.text((bx + 7, yy + by + 25), sub, fill=(40, 40, 40), font=f_small)
    yy += strip_h + 4

    def tile(a) -> Image.Image:
        im = Image.fromarray(np.ascontiguousarray(a[..., :3]).astype(np.uint8))
        s = min(im.size)
        im = im.crop(((im.width - s) // 2, (im.height - s) // 2, (im.width - s) // 2 + s, (im.height - s) // 2 + s))
        return im.resize((cell, cell), Image.NEAREST if s < cell else Image.LANCZOS)

    def image_row(y0: int, images, sscd, title: str) -> int:
        d.text((pad, y0), title, fill=(0, 0, 0), font=f_small)
        y0 += 18
        xx = pad
        if e.reference is not None:
            img.paste(tile(e.reference), (xx, y0))
            d.rectangle([xx - 1, y0 - 1, xx + cell, y0 + cell], outline=(0, 120, 0), width=2)
            d.text((xx, y0 + cell + 2), "training image", fill=(0, 110, 0), font=f_small)
            xx += cell + 8
        for g, a in enumerate(images):
            img.paste(tile(a), (xx, y0))
            lab = f"seed {e.seeds[g]}" + (f" · SSCD {sscd[g]:.2f}" if sscd else "")
            d.text((xx, y0 + cell + 2), lab, fill=(170, 0, 0) if sscd and sscd[g] > 0.7 else (0, 0, 0),
                   font=f_small)
            xx += cell + 8
        return y0 + cell + 22

    yy = image_row(yy, e.images, e.sscd, "generated images (one per seed)")
    for a, st in zip(e.ablations, e.statements):
        yy += 6
        for ln in wrap(st, f_small, W - 2 * pad):
            d.text((pad, yy), ln, fill=(0, 0, 0), font=f_small)
            yy += 15
        yy = image_row(yy, a.images, a.sscd, f'edited prompt: "{a.text}" · d(p) = {a.statistic:.4g}')
    return np.asarray(img.crop((0, 0, W, min(H, yy + pad))))


def seeds_label(seeds) -> str:
    """0,1,2,3 → '0-3'; otherwise comma-separated."""
    s = sorted(seeds)
    if s and s == list(range(s[0], s[-1] + 1)) and len(s) > 2:
        return f"{s[0]}-{s[-1]}"
    return ",".join(str(v) for v in s)
