"""``benchmarks/short_prune.py``: the results page (one seed shows its value, several their mean,
std and ties) and its flags."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmark_scripts import BENCHMARKS, benchmark_module


@pytest.fixture(scope="module")
def short_prune():
    with benchmark_module("short_prune") as module:
        yield module


def _record(runs, teachers):
    return {"command": "python benchmarks/short_prune.py", "git": "abc1234", "train_images": 2500,
            "holdout_images": 5000, "prune_steps": 80, "teacher_epochs": 8, "factor": 8.0, "teachers": teachers,
            "runs": [{"gate_lr": lr, "gate_init": init, "seed": seed, "holdout_after_prune": after,
                      "holdout_final": final, "v_over_b_after_prune": vb, "noted": noted}
                     for lr, init, seed, after, final, vb, noted in runs]}


def test_several_seeds_give_mean_std_the_best_and_ties(short_prune):
    page = short_prune.markdown(_record([
        (None, None, 0, 0.75, 0.62, 7.95, True), (None, None, 1, 0.78, 0.64, 7.95, True),
        (0.1, None, 0, 0.20, 0.44, 0.49, False), (0.1, None, 1, 0.18, 0.46, 0.37, False),
        (None, 0.0, 0, 0.10, 0.50, 7.95, True), (None, 0.0, 1, 0.11, 0.70, 7.95, False)], {"0": 0.82, "1": 0.84}))
    rows = {line.split(" | ")[0]: line for line in page.splitlines() if line.startswith("| gate lr")}
    default = rows["| gate lr 1e-2 (default), log α₀ 3 (default)"]
    assert "| 0,1 | 76.50 ± 2.12 | **63.00 ± 1.41** | 7.95–7.95 | yes |" in default
    assert "45.00 ± 1.41 |" in rows["| gate lr 0.1, log α₀ 3 (default)"]  # 18 points behind: no tie
    assert "60.00 ± 14.14 (tie) | 7.95–7.95 | some |" in rows["| gate lr 1e-2 (default), log α₀ 0"]
    assert "83.00 ± 1.41 %" in page and "80 prune steps" in page and "abc1234" in page


def test_one_seed_shows_its_value_without_a_spread(short_prune):
    page = short_prune.markdown(_record([(None, None, 0, 0.754, 0.6228, 7.95, True)], {"0": 0.8266}))
    assert "| 0 | 75.40 (n = 1) | 62.28 (n = 1) | 7.95–7.95 | yes |" in page and "82.66 (n = 1) %" in page
    assert "±" not in page.split("|---")[-1]


@pytest.mark.parametrize("flags, words", [(["--variants", "0/d"], "gate lr must be above 0"),
                                           (["--variants", "x"], "GATE_LR/GATE_INIT"),
                                           (["--factor", "1"], "--factor above 1"),
                                           (["--train-subset", "59000", "--holdout", "5000"], "more than")])
def test_bad_flags_are_one_line_and_exit_2(flags, words, tmp_path):
    run = subprocess.run([sys.executable, str(BENCHMARKS / "short_prune.py"), "--data-root", str(tmp_path), *flags],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and words in run.stderr, run.stderr
