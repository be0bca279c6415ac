"""Values as the site shows them: a metric record's finite value, its non-finite or missing reason, its
dispersion, the number formats, and the implementation that produced it (one line, the details, a signature)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .load import NONFINITE_TOKENS, _token


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def value_of(rec: dict | None) -> float | None:
    if not rec or rec.get("unavailable"):
        return None
    return _num(rec.get("value"))


_NONFINITE_WORDS = re.compile(r"non-?finite|\bnan\b|infinit|\binf\b", re.IGNORECASE)


def nonfinite_of(rec: Any) -> str | None:
    """What a record says about a non-finite value, or None: "NaN", "+inf", "-inf" (the value was not finite: a
    legacy result's ``NaN``/``Infinity``, or ``null`` with ``non_finite`` recorded) or "non-finite" (``unavailable``
    gives a non-finite reason)."""
    if not isinstance(rec, dict):
        return None
    v = rec.get("value")
    if isinstance(v, float) and not math.isfinite(v):
        return _token(v)
    nf = rec.get("non_finite", rec.get("nonfinite"))
    if nf not in (None, False, ""):
        return NONFINITE_TOKENS.get(str(nf).strip().lower(), "non-finite")
    why = rec.get("unavailable")
    if v is None and isinstance(why, str) and _NONFINITE_WORDS.search(why):
        return "non-finite"
    return None


def missing_text(rec: dict | None) -> tuple[str, str]:
    """(short text, explanation) for a record without a finite value: non-finite, unavailable or not recorded."""
    nf = nonfinite_of(rec)
    why = str((rec or {}).get("unavailable") or "")
    if nf is not None:
        return nf, (f"the run recorded a non-finite value ({nf})" + (f": {why}" if why else "")
                    + "; left out of sorting, win rates and plots")
    return "n/a", why or "no value recorded"


def _disp(rec: dict | None) -> tuple[float | None, str]:
    d = (rec or {}).get("dispersion")
    if isinstance(d, dict):
        return _num(d.get("value")), str(d.get("kind") or "")
    return None, ""


def fmt(v: float | None) -> str:
    """Three decimals (two from 10, one from 1000); three significant digits below 0.01, so that small values
    that differ (a kernel distance of 0.00445 and one of 0.00567) do not all read 0.004–0.006."""
    if v is None:
        return "n/a"
    a = abs(v)
    if 0 < a < 0.01:
        return f"{v:.{2 - math.floor(math.log10(a))}f}"
    return f"{v:.3f}" if a < 10 else f"{v:.2f}" if a < 1000 else f"{v:.1f}"


def fmt_disp(d: float) -> str:
    """A dispersion: as :func:`fmt`, but two significant digits below 0.01 (0.000066, not 0.000)."""
    a = abs(d)
    if 0 < a < 0.01:
        return f"{d:.{1 - math.floor(math.log10(a))}f}"
    return fmt(d)


def _higher(rec: dict | None) -> bool:
    return bool((rec or {}).get("higher_is_better"))


def arrow(higher: bool) -> str:
    return "↑" if higher else "↓"


IMPL_FIRST = ("name", "version", "metric_version", "feature_extractor", "checkpoint", "weights_sha256", "preset",
              "library", "backend")


# impl fields that describe the run's cache state, not the implementation: the same computation reads "miss" the first
# time and "hit" afterwards, so they never make two values "computed by different implementations"
RUN_STATE_IMPL_KEYS = frozenset({"reference_cache", "n_ref_extracted", "reference_cache_path"})


def impl_text(rec: dict) -> str:
    """The implementation that produced a metric value: metric plugin, extractor, weights, library, preset."""
    parts = []
    mp = rec.get("metric_plugin") or {}
    if mp.get("name"):
        parts.append(f"metric plugin {mp.get('name')} v{mp.get('version')}"
                     + (f" {json.dumps(mp['params'], sort_keys=True)}" if mp.get("params") else ""))
    impl = {k: v for k, v in (rec.get("impl") or {}).items() if k not in RUN_STATE_IMPL_KEYS}
    keys = [k for k in IMPL_FIRST if k in impl] + sorted(k for k in impl if k not in IMPL_FIRST)
    for k in keys:
        v = impl[k]
        if v in (None, "", [], {}):
            continue
        s = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        parts.append(f"{k}: {s[:120]}")
    return "; ".join(parts) or "implementation not recorded"


#: the fields of an implementation record a reader needs to know which computation made a value (the rest — cache
#: state, device, sample counts, transforms, notes — is in the details and in the result file)
IMPL_SUMMARY = ("name", "version", "metric_version", "feature_extractor", "checkpoint", "weights", "weights_sha256",
                "preset", "library", "backend")
IMPL_NOTES = ("note", "warning", "substitution")


def _short(v: Any, n: int = 90) -> str:
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, ensure_ascii=False, allow_nan=False)
    return s if len(s) <= n else s[:n - 1] + "…"


def impl_summary(rec: dict) -> str:
    """One line naming the implementation: metric plugin and version, extractor, weights (sha256 prefix), preset,
    library; a field equal to one already shown (checkpoint = feature extractor) is left out."""
    parts = []
    mp = rec.get("metric_plugin") or {}
    if mp.get("name"):
        parts.append(f"metric plugin {mp.get('name')} v{mp.get('version')}")
    impl = rec.get("impl") or {}
    seen: set[str] = set()
    for k in IMPL_SUMMARY:
        v = impl.get(k)
        if v in (None, "", [], {}) or isinstance(v, (dict, list)):
            continue
        s = str(v)
        if k == "weights_sha256" and len(s) == 64:
            s = s[:12] + "…"
        if s in seen or (k == "weights" and any(s in t for t in seen)):
            continue
        seen.add(s)
        parts.append(f"{k}: {_short(s, 120)}")
    return "; ".join(parts) or "implementation not recorded"


def impl_details(rec: dict) -> list[tuple[str, str]]:
    """Every field of the implementation record and the metric plugin's parameters, as (key, short text)."""
    mp = rec.get("metric_plugin") or {}
    out = [(f"param {k}", _short(v)) for k, v in sorted((mp.get("params") or {}).items())]
    impl = rec.get("impl") or {}
    for k in sorted(impl):
        v = impl[k]
        if v in (None, "", [], {}):
            continue
        if isinstance(v, dict):
            out += [(f"{k}.{k2}", _short(v2)) for k2, v2 in sorted(v.items()) if v2 not in (None, "", [], {})]
        else:
            out.append((k, _short(v, 1000 if k in IMPL_NOTES else 90)))
    return out


def _impl_sig(rec: dict) -> str:
    impl = rec.get("impl")
    if isinstance(impl, dict):
        impl = {k: v for k, v in impl.items() if k not in RUN_STATE_IMPL_KEYS}
    return json.dumps([rec.get("metric_plugin"), impl], sort_keys=True, default=str)


def _params(p: Any) -> str:
    return json.dumps(p, sort_keys=True, ensure_ascii=False) if p else "{}"


def _seeds_text(seeds: Any) -> str:
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        return json.dumps(seeds)
    s = sorted(seeds)
    if s == list(range(s[0], s[-1] + 1)) and len(s) > 2:
        return f"{s[0]}-{s[-1]}"
    return ",".join(map(str, s))


WIN_RATE = ("win rate: the share of the same model's other rows that a row beats, per metric column in the "
            "column's direction (a tie counts half), averaged over the columns where the row has a value — 1.00 "
            "beats every other row on every metric, 0.50 is the middle.")
