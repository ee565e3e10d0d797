"""The example scripts run as a user would run them (on the embedded demo data)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

import budgetprune

ROOT = Path(__file__).resolve().parents[1]


def test_plain_loop_example_prunes_to_its_budget_and_saves(tmp_path):
    out = tmp_path / "small.pt"
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "plain_loop.py"), "--data", "demo",
                          "--epochs", "2", "--max-steps", "25", "--budget", "flops=0.5", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    line = next(line for line in run.stdout.splitlines() if line.startswith("pruned: flops"))
    ratio = float(line.split("(")[1].split(" of it")[0])
    assert 0.8 <= ratio <= 1.0
    small = budgetprune.load(out)
    assert small(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_plain_loop_example_reports_bad_options_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "plain_loop.py"), "--budget", "2x3",
                          "--out", str(tmp_path / "m.pt")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "error" in run.stderr
