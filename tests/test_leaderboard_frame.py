"""`memobench.leaderboard.results_frame`: the committed long table (leaderboard.csv) as a pandas DataFrame."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from memobench.leaderboard import CSV_COLUMNS, results_frame

ROOT = Path(__file__).resolve().parent.parent


def test_frame_equals_the_committed_csv():
    if not (ROOT / "benchmarks" / "results").is_dir():
        pytest.skip("no committed results in this checkout")
    df = results_frame(ROOT / "benchmarks" / "results")
    with open(ROOT / "leaderboard" / "leaderboard.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(df.columns) == list(CSV_COLUMNS) and len(df) == len(rows) > 0
    assert df["value"].dtype.kind == "f"
    for (_, got), want in zip(df.iterrows(), rows):
        assert (got["model"], got["mitigation"], got["attack"], got["metric"], got["group"]) == \
            (want["model"], want["mitigation"], want["attack"], want["metric"], want["group"])
        v = float(want["value"]) if want["value"] else math.nan
        assert (math.isnan(v) and math.isnan(got["value"])) or got["value"] == v
    # the notebook use of the docstring: MR per mitigation × attack
    mr = df[(df.metric == "mr") & (df.group == "all")].pivot_table(index="mitigation", columns="attack",
                                                                     values="value")
    assert "none" in mr.index and mr.notna().any().any()
