"""``benchmarks/gate_init.py``: the results page, and a reused run folder checked against its options."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from benchmark_scripts import benchmark_module


@pytest.fixture(scope="module")
def gate_init():
    with benchmark_module("gate_init") as module:
        yield module


def _run(gate_init_value, seed, val, test, epochs, factor=4.0):
    return {"factor": factor, "gate_init": gate_init_value, "seed": seed, "folder": f"runs/{gate_init_value}_{seed}", "val_accuracy": val,
            "test_accuracy": test, "val_accuracy_after_prune": epochs[-1], "prune_epochs_val_accuracy": epochs,
            "unpruned_test_accuracy": 0.92, "flops_over_budget": 0.98}


def test_the_page_gives_mean_and_std_over_seeds_and_whether_they_tie(gate_init):
    record = {"command": "python benchmarks/gate_init.py", "git": "abc", "uncommitted_src": [], "teacher": "t.pt",
              "model": "resnet20", "teachers": {"0": "t.pt", "1": "t.pt"}, "factors": [4.0], "epochs": 3,
              "shock": [{"gate_init": None, "accuracy": 0.93, "agreement": 1.0},
                        {"gate_init": 0.0, "accuracy": 0.13, "agreement": 0.14},
                        {"gate_init": 3.0, "accuracy": 0.85, "agreement": 0.88}],
              "runs": [_run(0.0, 0, 0.91, 0.90, [0.1, 0.8]), _run(3.0, 0, 0.93, 0.92, [0.85, 0.9]),
                       _run(0.0, 1, 0.92, 0.91, [0.1, 0.8]), _run(3.0, 1, 0.94, 0.93, [0.86, 0.9])]}
    page = gate_init.markdown(record)
    assert "| 0 | 13.0 % | 14.0 % |" in page and "| no gates | 93.0 % | 100.0 % |" in page
    assert "teacher `t.pt` (test 92.00 %)" in page and "read back" not in page
    record["runs"][0].update(read_back=True, finished="2026-12-01 10:00")
    record["runs"][1].update(read_back=True, finished="2026-12-02 11:00")
    assert "2 of 4 runs were read back from folders an earlier invocation finished (2026-12-01 10:00 to " \
           "2026-12-02 11:00 UTC), with the code of that time" in gate_init.markdown(record)
    # 91 and 92 → 91.50 ± 0.71; 93 and 94 → 93.50 ± 0.71: a gap of 2 against 2·SE = 2·0.71 = 1.41
    assert "| 0 | 0, 1 | 10.0 / 80.0 (seed 0) | 80.00 ± 0.00 | 91.50 ± 0.71 | 90.50 ± 0.71 | 0.980, 0.980 |" in page
    assert "Best final validation: log α 3; log α 0: behind by more than two standard errors." in page


def test_the_page_has_a_table_per_factor_and_names_per_seed_teachers(gate_init):
    record = {"command": "python benchmarks/gate_init.py --model lenet5", "git": "abc", "uncommitted_src": [],
              "teacher": "a/t.pt", "model": "lenet5", "teachers": {"0": "a/t.pt", "1": "b/t.pt"},
              "factors": [8.0, 16.0], "epochs": 2, "shock": [{"gate_init": None, "accuracy": 0.96, "agreement": 1.0}],
              "runs": [_run(g, s, v, v, [0.8, 0.9], f) for f in (8.0, 16.0) for s in (0, 1)
                       for g, v in ((0.0, 0.90 + 0.001 * s), (3.0, 0.899 + 0.002 * s))]}
    page = gate_init.markdown(record)
    assert "# Where BAR's gates start on a trained LeNet-5" in page
    assert "one teacher per seed, trained on the seed's own split" in page
    assert "**The runs at 8×**" in page and "**The runs at 16×**" in page
    # 90.0 / 90.1 against 89.9 / 90.1: within two standard errors
    assert page.count("Best final validation: log α 0; log α 3: a tie.") == 2


def test_a_run_folder_made_with_other_options_is_refused(gate_init, tmp_path):
    args = SimpleNamespace(model="resnet20", epochs=3)
    expected = gate_init.expected_config(args, 4.0, 3.0, 0)
    (tmp_path / "config.json").write_text(json.dumps({**expected, "validation": 5000.0}))
    gate_init.check_run(tmp_path, expected)  # the same options (a float 5000.0 is 5000)
    (tmp_path / "config.json").write_text(json.dumps({**expected, "epochs": 10}))
    with pytest.raises(SystemExit, match="ran with other options \\(epochs=10\\)"):
        gate_init.check_run(tmp_path, expected)
