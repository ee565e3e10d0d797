"""benchmarks/throughput.py runs as a user would run it: its smoke run times every method's step
and a compacted network's inference, and a bad flag is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from budgetprune.methods import available_methods

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


def test_quick_run_times_every_method_and_the_compacted_network(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    record = json.loads((tmp_path / "throughput.json").read_text())
    (model,) = record["models"]
    rows = {row["method"]: row for row in model["training"]}
    assert list(rows) == ["plain", *available_methods(), "bar/batch"]
    assert all("error" not in row and row["images_per_s"] > 0 for row in rows.values()), rows
    assert rows["plain"]["ratio"] == 1.0 and all(row["ratio"] > 0 for row in rows.values())
    inference = model["inference"]
    assert inference["speedup"] > 0 and inference["V_over_B"] <= 1.0 and inference["flop_reduction"] > 1.0
    page = (tmp_path / "throughput.md").read_text()
    assert "| plain (teacher step) |" in page and "| bar |" in page and record["command"] in page
    assert "| bar, gates per batch |" in page and "with gates sampled per batch, the BAR step is" in page


def test_a_bad_flag_is_a_one_line_error(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "tpu", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--device" in run.stderr, run.stderr
