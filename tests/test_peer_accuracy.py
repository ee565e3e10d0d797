"""benchmarks/peer_accuracy.py's core on a few hundred demo images: BAR and a Torch-Pruning pruner
from one teacher both land at or under the FLOP target, within [0.95, 1] of it, by one counter; a bad
flag is one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmark_scripts import BENCHMARKS, benchmark_module


@pytest.fixture(scope="module")
def peer_accuracy():
    pytest.importorskip("torch_pruning")
    with benchmark_module("peer_accuracy") as module:
        yield module


def test_both_sides_meet_the_flop_target_from_one_teacher(peer_accuracy, tmp_path):
    import torch_pruning as tp
    from budgetprune.data import load_dataset

    from common import random_subset

    splits = load_dataset("demo")
    train, test = random_subset(splits.train, 300), random_subset(splits.test, 200)
    settings = peer_accuracy.Settings("demo", 300, teacher_epochs=1, prune_epochs=1, finetune_epochs=0,
                                      lowlr_epochs=0, tp_steps=1, taylor_batches=2)
    setup = peer_accuracy.prepare("lenet5", 0, train, test, splits.info, settings, tmp_path / "teacher",
                                  log=lambda _: None)
    assert setup.full["flops"] == setup.full["bp_flops"] > 0  # LeNet-5: both counters agree
    for method in ("bar", "bar-exact", "tp-magnitude-oneshot"):
        row = peer_accuracy.run_one(tp, setup, method, 8.0, settings, tmp_path / method, log=lambda _: None)
        assert 0.95 <= row["flops_over_target"] <= 1.0 and row["in_window"], row
        assert row["flops"] == row["bp_flops"] and 0.0 <= row["test_accuracy"] <= 1.0, row
        assert row["teacher_accuracy"] == setup.teacher_accuracy
        # a BAR row carries its run's own timing of the exported network (the page's deployed speedup)
        assert method.startswith("tp-") or row["deployed"]["speedup"] > 0, row
    # bar keeps the library's default widths (padded to multiples of 8), bar-exact any width
    import json
    widths = {m: json.loads((tmp_path / m / "metrics.json").read_text())["channel_multiple"] for m in ("bar", "bar-exact")}
    assert widths == {"bar": "auto", "bar-exact": 1}
    # Torch-Pruning's network is fine-tuned by the very recipe bar's fine-tune stage uses
    from dataclasses import asdict
    from budgetprune.pipeline import PruneConfig
    assert row["recipe"]["stage"] == asdict(PruneConfig().recipe("finetune")) and row["recipe"]["distill"]


def test_epochs_that_do_not_add_up_are_a_one_line_error(tmp_path):
    run = subprocess.run([sys.executable, str(BENCHMARKS / "peer_accuracy.py"), "--total-epochs", "10",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--total-epochs" in run.stderr, run.stderr


def test_redo_moves_old_rows_aside_and_a_different_teacher_is_refused(tmp_path, capsys):
    with benchmark_module("peer_accuracy") as module:
        args = ["--data", "demo", "--models", "lenet5", "--seeds", "0", "--factors", "8", "--methods", "bar",
                "--total-epochs", "3", "--teacher-epochs", "1", "--prune-epochs", "1", "--finetune-epochs", "1",
                "--lowlr-epochs", "0", "--train-subset", "256", "--out", str(tmp_path / "out"),
                "--work", str(tmp_path / "work")]
        assert module.main(args) == 0
        first = module.read(tmp_path / "out")
        assert list(first["runs"]) == ["lenet5/seed0/bar/8"] and "superseded" not in first
        assert module.main(args) == 0  # finished runs are skipped ...
        assert module.read(tmp_path / "out")["runs"] == first["runs"]
        capsys.readouterr()
        assert module.main(args + ["--redo", "bar"]) == 0  # ... unless redone: trained again, not read back
        assert "[prune] epoch 1/1" in capsys.readouterr().out
        assert (tmp_path / "work" / "lenet5" / "seed0" / "bar-8.superseded-1" / "metrics.json").is_file()
        again = module.read(tmp_path / "out")
        old = first["runs"]["lenet5/seed0/bar/8"]
        assert again["superseded"] == [{"key": "lenet5/seed0/bar/8", **old}]
        assert again["runs"]["lenet5/seed0/bar/8"]["seconds"] != old["seconds"]
        # the redo loaded the teacher: its entry keeps the time it took to train
        assert again["teachers"]["lenet5/seed0"]["teacher_seconds"] == first["teachers"]["lenet5/seed0"]["teacher_seconds"]
        page = (tmp_path / "out" / "peer_accuracy.md").read_text()
        assert "## Superseded runs" in page and f"| lenet5 | bar | 8× | {old['budgetprune']} | 0 |" in page
        # a teacher that is not the one the results came from: one line, exit 2, nothing run
        record = module.read(tmp_path / "out")
        record["teachers"]["lenet5/seed0"]["accuracy"] += 0.01
        module.io.write_json(tmp_path / "out" / "peer_accuracy.json", record)
        with pytest.raises(SystemExit) as stop:
            module.main(args + ["--redo", "bar"])
        assert stop.value.code == 2 and "would not share a teacher" in capsys.readouterr().err
        assert module.read(tmp_path / "out")["runs"] == record["runs"]  # refused before any row moved
