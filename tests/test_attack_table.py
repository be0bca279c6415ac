"""benchmarks/attack_table.py reads MR per mitigation × attack, DoRI's work to re-extract and extraction's flag rate
from result files (nothing computed); a missing pairing is "—"."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from test_leaderboard import rec, write_result
from test_leaderboard_budget import _sweep

SPEC = importlib.util.spec_from_file_location("attack_table", Path(__file__).parents[1] / "benchmarks/attack_table.py")
attack_table = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(attack_table)


def test_table_from_results(tmp_path):
    root = tmp_path / "results"
    mwa = {"mr": rec("mr", 0.5)}
    write_result(root, mitigation="nemo", attack="dori", metrics={"mr": rec("mr", 1.0)}, mwa=mwa,
                 extra={"budget_sweep": _sweep([(0, 0.5), (10, 0.75), (50, 1.0)])})
    write_result(root, mitigation="nemo", attack="extraction", metrics={"mr": rec("mr", 0.875)}, mwa=mwa,
                 traces={"a": {"flagged": True}, "b": {"flagged": False}})
    table = attack_table.collect(root, "tiny")
    assert table["nemo"]["alone"] == 0.5
    assert table["nemo"]["dori"]["work_to_reextract"] == {"value": 10, "budget": 80.0}
    assert table["nemo"]["extraction"]["flagged"] == 0.5
    md = attack_table.markdown(table, "tiny")
    assert "| nemo | 0.500 | 1.000 | 80 (steps=10) | 0.875 (0.50) | — | — |" in md
