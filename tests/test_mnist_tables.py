"""benchmarks/mnist_tables.py: a paper's kept architecture becomes the right share of parameters,
every row's budget is a fraction the library takes, the page says "within 0.2 points" only when
it is, and a bad flag is one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from benchmark_scripts import BENCHMARKS, benchmark_module


@pytest.fixture(scope="module")
def tables():
    with benchmark_module("mnist_tables") as module:
        yield module


def test_lenet300_architecture_params_by_hand(tables):
    model = tables.new_model("lenet300")
    # 219 inputs -> 214 -> 100 -> 10 classes, weights and biases
    by_hand = 219 * 214 + 214 + 214 * 100 + 100 + 100 * 10 + 10
    full = 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert tables.architecture_params(model, "219-214-100") == by_hand
    assert tables.architecture_params(model, "784-300-100") == full == sum(p.numel() for p in model.parameters())
    fraction, metric = tables.row_budget(next(r for r in tables.ROWS if r.name == "lenet300-l0"))
    assert metric == "params" and fraction == pytest.approx(by_hand / full)


def test_lenet300_architecture_params_match_the_library_cost_model(tables):
    """For an MLP with gated inputs the papers' notation is the library's channel groups: the
    library's own params count of the same kept channels agrees."""
    from budgetprune.graph import ChannelGraph
    from budgetprune.resources import CostModel
    model = tables.new_model("lenet300")
    graph = ChannelGraph.build(model, torch.zeros(1, 1, 28, 28), gate_inputs=True)
    keep = {"input": 198, "features.1": 233, "features.3": 100}
    masks = {g: torch.arange(graph.groups[g].channels) < k for g, k in keep.items()}
    assert CostModel(graph, "params").hard(masks) == tables.architecture_params(model, "198-233-100")


def test_lenet5_architecture_params_by_hand(tables):
    model = tables.new_model("lenet5")
    # conv 1->20 5x5, conv 20->25 5x5, fc 45 inputs -> 462, fc 462 -> 10
    by_hand = (25 * 1 * 20 + 20) + (25 * 20 * 25 + 25) + (45 * 462 + 462) + (462 * 10 + 10)
    assert tables.architecture_params(model, "20-25-45-462") == by_hand
    assert tables.architecture_params(model, "20-50-800-500") == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError):
        tables.architecture_params(model, "20-25-45")  # one number per layer
    with pytest.raises(ValueError):
        tables.architecture_params(model, "20-60-45-462")  # more maps than the layer has


def test_every_row_has_a_budget_strictly_between_0_and_1(tables):
    assert {r.model for r in tables.ROWS} <= set(__import__("budgetprune").available_models())
    for row in tables.ROWS:
        fraction, metric = tables.row_budget(row)
        assert 0 < fraction < 1, row.name
        assert metric == "params"
        assert row.paper_error is None or 0 < row.paper_error < 5


def test_the_page_marks_within_0_2_points(tables):
    assert tables.within(1.55, 1.4) == "yes"
    assert tables.within(1.61, 1.4) == "no (worse)"
    assert tables.within(1.15, 1.4) == "no (better)"
    assert tables.within(1.0, None).startswith("—")
    rows = [r for r in tables.ROWS if r.name in ("lenet300-l0", "lenet300-cs")]

    def rec(row, seed, error):
        return {"row": row, "seed": seed, "test_error": error, "kept_fraction": 0.26, "architecture": "219-214-100",
                "teacher_error": 1.6, "seconds": 60.0,
                "epochs": {"teacher": 8, "prune": 15, "finetune": 6, "lowlr": 1, "total": 30}}
    records = [rec("lenet300-l0", 0, 1.5), rec("lenet300-l0", 1, 1.7), rec("lenet300-cs", 0, 1.9),
               {"row": "lenet300-cs", "seed": 1, "error": "ConfigError: cannot reach the budget"}]
    summary = tables.summarise(records, rows)
    assert summary[0]["within"] == "yes" and summary[0]["gap"] == pytest.approx(0.2)
    assert summary[1]["gap"] is None and summary[1]["failures"][0]["seed"] == 1
    page = tables.page({"command": "python benchmarks/mnist_tables.py", "machine": {}, "rows": summary})
    l0 = next(line for line in page.splitlines() if line.startswith("| lenet300-l0 "))
    assert "| 1.40 | 1.60 ± 0.14 | 0,1 | +0.20 | yes |" in l0 and "8+15+6+1 = 30" in l0
    assert "cannot reach the budget" in page
    summary = tables.summarise([rec("lenet300-l0", 0, 1.65)], rows[:1])
    assert summary[0]["within"] == "no (worse)"


@pytest.mark.parametrize("flags", [["--rows", "lenet7"], ["--seeds", "a"], ["--epochs-lenet5", "1,2"]])
def test_a_bad_flag_is_one_line_and_exit_2(flags, tmp_path):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "mnist_tables.py"), *flags, "--work", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "error" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing ran
