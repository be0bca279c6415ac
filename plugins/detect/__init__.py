"""Memorization detection and prompt explanation: ``memobench detect`` and ``memobench explain``.

One module per paper, each a detector (a :class:`memobench.api.Detector`: a per-prompt score, higher = more likely
memorized), registered through the ``register_detectors`` hook (other plugins may add their own):

* :mod:`.wen` — Wen et al., ICLR 2024: d(p), the text-conditional noise magnitude along the sampling trajectory,
  and its token-wise significance (METHODS §6.1); detector ``wen`` (default).
* :mod:`.nemo` — Hintersdorf, Struppek et al., NeurIPS 2024 (NeMo): the memorization score m(p), the max pairwise
  MS-SSIM of the initial noise differences (METHODS §6.2); detector ``nemo``.

Detectors of other papers live in their paper's plugin module and register themselves there: ``memattn`` (Ren et al.,
ECCV 2024: cross-attention entropy, :mod:`memobench_plugins.memattn`), ``sail`` (Jeon et al., ICML 2025: sharpness at
the start of sampling, :mod:`memobench_plugins.sail`), ``anisotropy`` (Asthana & Belagiannis, ICLR 2026: norm +
angle on pure noise, :mod:`memobench_plugins.anisotropy`), ``bright_ending`` (Chen et al., ICLR 2025: the BE-masked
magnitude, :mod:`memobench_plugins.bright_ending`).

Evaluation (:mod:`.roc`, METHODS §6.3): AUC, ACC (best balanced accuracy), TPR@1%FPR and TPR@3%FPR with
scikit-learn's ROC, two calibrated thresholds (max-ACC, the default verdict threshold, and the TPR@1%FPR operating
point), stored per model identity and detector settings in the memobench cache, and each detector's seconds per
prompt (:mod:`.bench`). :mod:`.explain` is the Python API of ``memobench explain`` (:func:`.explain.explain`,
:class:`.explain.Explainer`).

Commands, through the ``register_commands`` hook::

    memobench detect  [--model tiny] [--memorized tiny-vm] [--nonmemorized tiny-nonmem] [--detector NAME]...
    memobench explain "PROMPT" | --file prompts.txt | --prompt-set tiny-vm  [--model tiny] [--seeds 0-3]

This module imports neither torch nor diffusers at import time.
"""

from __future__ import annotations

from memobench.api import hookimpl


@hookimpl
def register_detectors(register):
    from .nemo import NeMoDetector
    from .wen import WenDetector

    register(WenDetector)
    register(NeMoDetector)


@hookimpl
def register_commands(app):
    from .cli import register

    register(app)
