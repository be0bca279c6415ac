"""The detector shape shared by :mod:`.wen` and :mod:`.nemo`: a :class:`memobench.api.Plugin` with a per-prompt score.

A detector maps one prompt to a number, higher = more likely memorized. ``resolved(generation)`` fills the
parameters that default to the model's own generation settings (``0`` / ``-1`` sentinels), so that the identity
recorded in results and calibrations, and hashed into cache keys, names the concrete values that ran.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from memobench.api import Plugin, params_dict


class Detector(Plugin):
    """Base of the detection statistics. ``score(model, text)`` returns ``{"score": float, ...}`` (JSON-able)."""

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

    def with_params(self, **values: Any) -> "Detector":
        return type(self)(dataclasses.replace(self.params, **values))

    def score(self, model, text: str) -> dict:
        raise NotImplementedError
