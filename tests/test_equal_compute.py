"""benchmarks/equal_compute.py: every variant spends the same total of epochs, the choice is made
on validation accuracy and never on the test accuracy, and a bad flag is one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmark_scripts import BENCHMARKS, benchmark_module


@pytest.fixture(scope="module")
def equal_compute():
    with benchmark_module("equal_compute") as module:
        yield module


def test_every_variant_spends_the_same_epochs(equal_compute):
    totals = {}
    for v in equal_compute.VARIANTS:
        totals.setdefault(equal_compute.total_epochs(v, 60), []).append(v)
    # the short and the long budget, each with several splits; Torch-Pruning's reference in both
    assert sorted(totals) == [12, 60] and len(totals[12]) > 2 and len(totals[60]) > 2, totals
    assert equal_compute.TP in totals[60] and equal_compute.total_epochs(equal_compute.TP, 12) == 12
    # a variant's words name its split
    assert equal_compute.describe("t6-p3-f3", 12).startswith("teacher 6, prune 3, fine-tune 3")


def test_torch_pruning_shares_the_teacher_of_the_default_split(equal_compute):
    for default, total in (("t8-p2-f2", 12), ("t40-p10-f10", 60)):
        assert equal_compute.teacher_epochs(equal_compute.TP, total) == \
            equal_compute.teacher_epochs(default, total), total
    assert equal_compute.describe(equal_compute.TP, 60).startswith(
        "Torch-Pruning group magnitude, one shot: teacher 40, fine-tune 20")


def test_the_best_is_chosen_on_validation_not_on_test(equal_compute):
    def run(variant, seed, val, test):
        return {"variant": variant, "seed": seed, "factor": 8.0, "val_accuracy": val, "test_accuracy": test,
                "flops_reduction": 8.0}
    runs = [run("a", s, 90.0 + 0.1 * s, 80.0) for s in range(3)] + \
           [run("b", s, 89.0 + 0.1 * s, 95.0) for s in range(3)] + \
           [run("c", s, 89.4 + 0.5 * s, 70.0) for s in range(3)] + [run("d", 0, 85.0, 85.0)]
    s = equal_compute.summarise(runs)["8"]
    assert s["best_by_validation"] == "a"  # b is better on test, never looked at for the choice
    assert s["variants"]["b"]["vs_best"] == "worse"  # 1 point apart, spread 0.1
    assert s["variants"]["c"]["vs_best"] == "tie"  # within two standard errors
    assert s["variants"]["d"]["vs_best"] == "one seed"  # no spread: neither a tie nor a loss is known
    # paired gaps: on the seeds both ran (d: seed 0 only, 85.0 against a's 90.0)
    assert s["variants"]["b"]["paired_gap"] == pytest.approx(-1.0) and s["variants"]["b"]["paired_seeds"] == [0, 1, 2]
    assert s["variants"]["d"]["paired_gap"] == pytest.approx(-5.0) and s["variants"]["d"]["paired_seeds"] == [0]
    page = equal_compute.page({"command": "x", "model": "lenet5", "data": "fashion-mnist", "total_epochs": 12,
                               "validation": 10000, "machine": {}, "jobs": 2, "results": {"8": s}})
    assert "a **(best val)**" in page and page.index("| a **") < page.index("| c |") < page.index("| b |")


def test_variants_that_do_not_add_up_are_a_one_line_error(tmp_path):
    run = subprocess.run([sys.executable, str(BENCHMARKS / "equal_compute.py"), "--total-epochs", "10",
                          "--variants", "t8-p2-f2", "--out", str(tmp_path), "--work", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "t8-p2-f2" in run.stderr, run.stderr


def test_runs_of_the_committed_page_count_as_finished_only_for_the_same_setup(equal_compute, tmp_path):
    import json
    run = {"model": "lenet5", "data": "fashion-mnist", "seed": 1, "factor": 8.0, "variant": "t40-p10-f10",
           "val_accuracy": 90.0, "test_accuracy": 89.0, "flops_reduction": 8.0}
    page = tmp_path / "equal_compute.json"
    page.write_text(json.dumps({"model": "lenet5", "data": "fashion-mnist", "total_epochs": 60, "validation": 10000,
                                "runs": [run]}))
    base = {"model": "lenet5", "data": "fashion-mnist", "validation": 10000.0, "total": 60}
    assert equal_compute.committed_runs(page, base) == {(1, "t40-p10-f10", 8.0): run}
    assert equal_compute.committed_runs(page, base | {"total": 12}) == {}  # another total: not the same runs
    assert equal_compute.committed_runs(page, base | {"validation": 5000.0}) == {}
    assert equal_compute.committed_runs(tmp_path / "none.json", base) == {}


def test_each_run_starts_when_its_own_teacher_is_ready(equal_compute):
    """Teacher (seed 0) is fast and teacher (seed 1) waits for seed 0's run to finish: with two
    workers that only completes when seed 0's run starts before seed 1's teacher is done (the
    earlier order, every teacher first, would wait forever; the timeout says so). A failed teacher
    fails its own runs only, a failed run is one line, and the others are reported."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    seed0_run_done = threading.Event()
    trained = []

    def train_teacher(job):
        trained.append(job["seed"])
        if job["seed"] == 1:
            assert seed0_run_done.wait(timeout=20), "seed 0's run did not start while seed 1's teacher trained"
        if job["seed"] == 2:
            raise RuntimeError("no data")
        return {"seed": job["seed"]}

    def run(job):
        if job["seed"] == 0 and job["factor"] == 4:
            seed0_run_done.set()
        if job["factor"] == 16:
            raise ValueError("diverged")
        return {"seed": job["seed"], "factor": job["factor"]}

    base = {"variant": "t8-p2-f2", "total": 12}
    todo = [base | {"seed": s, "factor": f} for s in (0, 1, 2) for f in (4, 16)]
    reported, failed = [], []
    with ThreadPoolExecutor(2) as pool:
        equal_compute.schedule_runs(pool, todo, lambda job, r: reported.append(r), failed, train_teacher, run)
    assert sorted(trained) == [0, 1, 2]  # each teacher once, though two runs share it
    assert sorted((r["seed"], r["factor"]) for r in reported) == [(0, 4), (1, 4)]
    assert sorted(failed) == ["t8-p2-f2 16x seed 0: ValueError: diverged",
                              "t8-p2-f2 16x seed 1: ValueError: diverged",
                              "t8-p2-f2 16x seed 2: teacher RuntimeError: no data",
                              "t8-p2-f2 4x seed 2: teacher RuntimeError: no data"]
