"""What the plugins declare about themselves, as the leaderboard needs it: which attack is the identity (no attack),
which mitigation is the baseline (``kind == "none"``), and per metric value its category (privacy / utility),
whether it is the headline (the ranking and plot metric) and whether its per-sample values are the grid score.

A metric record written by a current runner carries ``category``, ``headline`` and ``grid_score`` itself; an older
one is looked up in the plugin registry (the plugin's :class:`memobench.api.MetricInfo` describes its main value,
the id equal to its name). A plugin that is not installed declares nothing: its metrics are utility metrics, not
headline, and its attack is not the identity. The core names no plugin.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

#: label of the attack column of a no-attack row when no installed attack declares ``is_identity``
NO_ATTACK_LABEL = "no attack"


@dataclass(frozen=True)
class MetricRole:
    category: str  # "privacy" or "utility"
    headline: bool
    grid_score: bool


def _entry(kind: str, name: str) -> Any:
    """The registered class of a plugin, or None when none is installed under that name."""
    from memobench.registry import get_registry

    try:
        return get_registry().get(kind, name)
    except Exception:  # UnknownPluginError, or a registry that cannot be built: the plugin declares nothing
        return None


@lru_cache(maxsize=None)
def _metric_info(plugin: str) -> Any:
    return getattr(_entry("metric", plugin), "info", None)


@lru_cache(maxsize=None)
def _attack(name: str) -> tuple[bool, str]:
    cls = _entry("attack", name)
    if cls is None:
        return False, name
    return bool(getattr(cls, "is_identity", False)), str(getattr(cls, "name", name) or name)


@lru_cache(maxsize=None)
def _mitigation_kind(name: str) -> str | None:
    cls = _entry("mitigation", name)
    return None if cls is None else str(getattr(cls, "kind", ""))


def metric_role(name: str, rec: dict) -> MetricRole:
    """The role of metric id ``name`` (its record ``rec``): the record's own fields, else the installed plugin's
    ``MetricInfo`` when ``name`` is that plugin's main value, else a utility metric."""
    if any(k in rec for k in ("category", "headline", "grid_score")):
        return MetricRole("privacy" if rec.get("category") == "privacy" else "utility", rec.get("headline") is True,
                          rec.get("grid_score") is True)
    plugin = (rec.get("metric_plugin") or {}).get("name")
    info = _metric_info(str(plugin)) if isinstance(plugin, str) and plugin else None
    if info is None or getattr(info, "name", None) != name:
        return MetricRole("utility", False, False)
    return MetricRole("privacy" if info.category == "privacy" else "utility", bool(info.headline),
                      bool(info.grid_score))


def attack_is_identity(name: str) -> bool:
    return _attack(name)[0]


def attack_canonical(name: str) -> str:
    """The attack's registered name (an alias resolves to it); the recorded name when it is not installed."""
    return _attack(name)[1]


def identity_attack_name(recorded: list[str]) -> str:
    """The name shown for "no attack": the identity attack among ``recorded`` attack names (sorted: the first),
    else the installed one, else :data:`NO_ATTACK_LABEL`."""
    seen = sorted({attack_canonical(a) for a in recorded if attack_is_identity(a)})
    if seen:
        return seen[0]
    from memobench.registry import get_registry

    try:
        names = get_registry().names("attack")
    except Exception:
        names = []
    installed = sorted({attack_canonical(a) for a in names if attack_is_identity(a)})
    return installed[0] if installed else NO_ATTACK_LABEL


def is_baseline_mitigation(name: str, recorded_kind: Any = None) -> bool:
    """Whether the mitigation is the baseline (``kind == "none"``): as installed, else as its result records."""
    kind = _mitigation_kind(name)
    return (kind if kind is not None else recorded_kind) == "none"


def forget() -> None:
    """Drop the cached look-ups (tests that register plugins in-process)."""
    for f in (_metric_info, _attack, _mitigation_kind):
        f.cache_clear()
