"""benchmarks/mixed_cut.py: a short run on the demo data reports, for the same masks, a mixed
volume no larger than the regular one and each stage's widths; variant names are checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmark_scripts import BENCHMARKS, benchmark_module

SCRIPT = BENCHMARKS / "mixed_cut.py"


@pytest.fixture(scope="module")
def mixed_cut():
    with benchmark_module("mixed_cut") as module:
        yield module


def test_variant_names(mixed_cut):
    assert mixed_cut.variant_options("default") == {}
    assert mixed_cut.variant_options("no_fill") == {"fill_budget": False}
    assert mixed_cut.variant_options("gate_init=0") == {"gate_init": 0.0}
    assert mixed_cut.variant_options("epochs=6") == {"epochs": 6}
    with pytest.raises(ValueError, match="unknown variant 'lr=3'"):
        mixed_cut.variant_options("lr=3")
    with pytest.raises(ValueError, match="gate_init takes a number"):
        mixed_cut.variant_options("gate_init=open")


def test_a_bad_variant_is_a_one_line_error(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--variants", "default,lr=3", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "unknown variant 'lr=3'" in run.stderr.splitlines()[-1], run.stderr


def test_stage_widths_group_layers_by_their_first_name(mixed_cut):
    kept = {"conv1": [0, 1], "layer1.0.conv1": [], "layer1.0.conv2": [3], "layer2.0.downsample.0": [1, 2, 3]}
    assert mixed_cut.stage_widths(kept) == {"conv1": [2], "layer1": [0, 1], "layer2": [3]}


def test_a_short_run_on_the_demo_data(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--data", "demo", "--teacher-epochs", "1", "--epochs", "1",
                          "--finetune-epochs", "0", "--factors", "2", "--variants", "default", "--train-subset", "512",
                          "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    record = json.loads((tmp_path / "out" / "mixed_cut.json").read_text())
    (row,) = record["rows"]
    assert row["volume_mixed"] <= row["volume_regular"]
    assert row["cut_by_mixed"] == pytest.approx(1 - row["volume_mixed"] / row["volume_regular"])
    assert row["V_over_B"] <= 1.0 and row["paper_cut"] == 0.12
    assert set(row["widths"]) == {"conv1", "layer1", "layer2", "layer3"}
    assert (tmp_path / "work" / "teacher.pt").exists()
    page = (tmp_path / "out" / "mixed_cut.md").read_text()
    assert record["command"] in page and "| 2× | default |" in page
    # the default recipe anneals one cosine schedule over the fine-tune epochs: no "at lr/10" claim of its own
    assert "fine-tune 0 + 0 (one cosine schedule over both" in page


def test_a_teacher_trained_alone_is_the_one_a_whole_run_trains(tmp_path):
    """--teacher-only writes the shared teacher and no run; runs on that --work then start from it,
    and score what one call that trains its own teacher scores (so the work can be split)."""
    common = [sys.executable, str(SCRIPT), "--data", "demo", "--teacher-epochs", "1", "--epochs", "1",
              "--finetune-epochs", "0", "--factors", "2", "--variants", "default", "--train-subset", "512"]
    alone = subprocess.run(common + ["--work", str(tmp_path / "split"), "--teacher-only", "--out", str(tmp_path / "x")],
                           capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr
    assert (tmp_path / "split" / "teacher.pt").exists() and not (tmp_path / "x").exists()
    rows = {}
    for name in ("split", "whole"):
        run = subprocess.run(common + ["--work", str(tmp_path / name), "--out", str(tmp_path / f"out-{name}")],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr
        (rows[name],) = json.loads((tmp_path / f"out-{name}" / "mixed_cut.json").read_text())["rows"]
    assert rows["split"]["teacher_accuracy"] == rows["whole"]["teacher_accuracy"]
    assert rows["split"]["test_accuracy"] == rows["whole"]["test_accuracy"]
    assert rows["split"]["widths"] == rows["whole"]["widths"]
