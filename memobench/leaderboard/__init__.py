"""The leaderboard: a static, self-contained site built from result files, byte for byte reproducibly.

``memobench leaderboard build --results DIR --out DIR`` reads every result JSON under the results directory
(the runner's layout ``<model>/<mitigation>__<attack>/<run_id>.json``), validates it and writes:

* ``index.html`` — one static page (inline CSS and JS, nothing fetched at view time): a sortable table with one
  row per (model, mitigation, attack), the privacy columns (the headline metric first) and the utility metrics
  (direction arrow in the header, the metric implementation in the header tooltip), status / origin filters and a
  privacy–utility plot per model and utility metric (inline SVG, Pareto front marked; also ``plots/*.svg``);
* ``pairings/<slug>.html`` — one detail page per row: provenance, every metric value, an image grid
  (training original | mitigated | mitigated + attack, also written as ``img/grids/<slug>.png``), the run's own
  grids and the attack's loss curves (SVG);
* ``LEADERBOARD.md`` — the same table in Markdown, plus every value in the long format of CONVENTIONS §12;
* ``leaderboard.csv`` and ``leaderboard.parquet`` — long format, one row per metric value (and group);
* ``runs/`` — a copy of every result JSON the numbers come from; ``img/`` — every image shown;
* ``manifest.json`` — every file written with its sha256.

One module per job, in the order of the data flow:

==================  ================================================================================================
:mod:`.load`        result files and samples files: validated, migrated, local paths redacted, non-finite replaced
:mod:`.declared`    what plugins declare: identity attack, baseline mitigation, metric category / headline / grid
                    score (from the record, else the plugin registry; the core names no plugin)
:mod:`.values`      a record's value, its missing or non-finite reason, number formats, the implementation text
:mod:`.rows`        rows (explicit and derived no-attack rows), columns, mean win rate
:mod:`.images`      image sources (previous build, cache, crops of run grids by :class:`memobench.grid.GridLayout`)
                    and the comparison grid of a row
:mod:`.plots`       privacy–utility and loss-curve plots (matplotlib, deterministic SVG)
:mod:`.html`        the pages, from the jinja2 templates in ``templates/`` (autoescape: every supplied string is
                    escaped)
:mod:`.export`      LEADERBOARD.md, CSV and parquet; :func:`results_frame` (the long table as a pandas DataFrame)
:mod:`.site`        render (every file in memory), build (write what changed), check (name what is stale)
==================  ================================================================================================

Local paths and non-finite values. A result may record paths of the machine that ran it: every absolute path in a
result's strings is shown as ``<local path>/<file name>``, on the pages and in the ``runs/`` copies. A value that
was not finite is shown as such ("NaN", "+inf", "non-finite"), never as missing; the ``runs/`` copy of such a result
is strict JSON (the value becomes ``null`` and its record says ``"non_finite": "NaN"``).
"""

from __future__ import annotations

from .declared import MetricRole, metric_role
from .export import CSV_COLUMNS, csv_bytes, leaderboard_md, long_rows, parquet_bytes, results_frame
from .html import detail_html, index_html
from .images import Comparison, Images, comparison, comparison_png
from .load import MIGRATIONS, Result, clean_result, load_results, redact_paths
from .plots import _overlap as _overlap  # noqa: F401 (tests)
from .plots import (Curve, Point, axis_verdict, loss_svg, pareto, place_labels, privacy_utility_points,
                    privacy_utility_svg, smooth, smooth_half, text_width)
from .rows import _slug as _slug  # noqa: F401 (tests)
from .rows import Column, Row, collect_rows, columns_of, target_metric_names, win_rates
from .site import MANIFEST, BuildReport, Site, build, check, render
from .values import _impl_sig as _impl_sig  # noqa: F401 (tests)
from .values import (WIN_RATE, fmt, fmt_disp, impl_details, impl_summary, impl_text, missing_text,
                     nonfinite_of, value_of)

__all__ = ["CSV_COLUMNS", "MANIFEST", "MIGRATIONS", "WIN_RATE", "BuildReport", "Column", "Comparison", "Curve",
           "Images", "MetricRole", "Point", "Result", "Row", "Site", "axis_verdict", "build", "check", "clean_result",
           "collect_rows", "columns_of", "comparison", "comparison_png", "csv_bytes", "detail_html", "fmt",
           "fmt_disp", "impl_details", "impl_summary", "impl_text", "index_html", "leaderboard_md", "load_results",
           "long_rows", "loss_svg", "metric_role", "missing_text", "nonfinite_of", "pareto", "parquet_bytes",
           "place_labels", "privacy_utility_points", "privacy_utility_svg", "redact_paths", "render", "results_frame",
           "smooth",
           "smooth_half", "target_metric_names", "text_width", "value_of", "win_rates"]
