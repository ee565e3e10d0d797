"""benchmarks/methods_fashion_mnist.py's verdict: on the held-out validation images where every run
has them (the test accuracy then decides nothing), else on test; hand-made runs."""

from __future__ import annotations

import pytest

from benchmark_scripts import benchmark_module


@pytest.fixture(scope="module")
def page():
    with benchmark_module("methods_fashion_mnist") as module:
        yield module


def _run(method: str, seed: int, test: float, val: float | None = None) -> dict:
    run = {"method": method, "seed": seed, "test_accuracy": test, "unpruned_test_accuracy": 0.9,
           "accuracy_change_points": 100 * (test - 0.9), "V_over_B": 1.0, "reduction": {"flops": 8, "params": 8},
           "widths": {"conv1": 3}, "cost_before_projection_over_B": 1.0, "dropped_by_projection": 0,
           "reopened_by_fill": 0, "density": {}}
    if val is not None:
        run.update(val_accuracy=val, unpruned_val_accuracy=0.91)
    return run


def _runs(validation: bool) -> list[dict]:
    # "a" leads on test by 2 points, "b" on validation by 2: the verdict must follow the split it is made on
    a = [(0.80, 0.70), (0.81, 0.71), (0.79, 0.69)]
    b = [(0.78, 0.72), (0.79, 0.73), (0.77, 0.71)]
    return ([_run("a", s, t, v if validation else None) for s, (t, v) in enumerate(a)]
            + [_run("b", s, t, v if validation else None) for s, (t, v) in enumerate(b)])


def test_the_verdict_is_made_on_validation_where_every_run_has_it(page):
    rows = {r["method"]: r for r in page.summarise(_runs(validation=True))}
    assert rows["b"]["best"] and not rows["a"]["best"]
    assert not rows["a"]["tie_with_best"]  # 2 points apart, se 0.58 each: beyond two standard errors
    assert rows["b"]["val_accuracy"] == pytest.approx(0.72)
    assert rows["a"]["test_accuracy"] == pytest.approx(0.80)  # the test accuracy is still reported


def test_without_validation_the_verdict_is_made_on_test(page):
    rows = {r["method"]: r for r in page.summarise(_runs(validation=False))}
    assert rows["a"]["best"] and not rows["b"]["tie_with_best"]
    assert "val_accuracy" not in rows["a"]


def test_the_page_shows_both_accuracies_and_orders_by_validation(page, tmp_path):
    result = {"command": "python benchmarks/methods_fashion_mnist.py --validation 2000", "model": "resnet20",
              "data": "fashion-mnist", "epochs": {"teacher": 3, "prune": 4, "finetune": 1, "lowlr": 1},
              "machine": {}, "wall_seconds": 60, "factor": 8, "seeds": [0, 1, 2], "schedule_end": 1, "validation": 2000,
              "train_images": 12000, "rows": page.summarise(_runs(validation=True))}
    page.write_markdown(result, tmp_path)
    text = (tmp_path / "methods_fashion_mnist.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| a ") or line.startswith("| b ")]
    assert table[0].startswith("| b | 72.00 ± 1.00 % | 78.00 ± 1.00 % | best")
    assert "| a | 70.00 ± 1.00 % | 80.00 ± 1.00 % | behind" in table[1]
    assert "2000 of them held out" in text and "on validation" in text


def test_a_page_names_the_budget_s_metric(page, tmp_path):
    result = {"command": "python benchmarks/methods_fashion_mnist.py --metric params", "model": "resnet20",
              "data": "fashion-mnist", "epochs": {"teacher": 3, "prune": 4, "finetune": 1, "lowlr": 1},
              "machine": {}, "wall_seconds": 60, "factor": 8, "seeds": [0], "schedule_end": 1, "validation": 0,
              "train_images": 10000, "metric": "params", "rows": page.summarise(_runs(validation=False)[:1])}
    page.write_markdown(result, tmp_path)
    assert (tmp_path / "methods_fashion_mnist.md").read_text().startswith(
        "# Every method on fashion-mnist / resnet20 at 8× params")
    with pytest.raises(SystemExit):  # single weights are budgeted by their non-zero count only
        page.main(["--granularity", "weight", "--metric", "params", "--out", str(tmp_path)])


def test_a_methods_entry_sets_run_settings_apart_from_the_method_s_options(page):
    """schedule_end and the form are run settings (a PruneConfig field), not options of the method, which
    refuses them; the rest stay the method's."""
    method, settings, options, run = page.split_entry("bar:block=mixed:schedule_end=0.5:knee=0.9")
    assert (method, settings) == ("bar", ["block=mixed", "schedule_end=0.5", "knee=0.9"])
    assert options == {"knee": 0.9} and run == {"block": "mixed", "schedule_end": 0.5}
    cfg = page.PruneConfig(budget=0.125, method=method, method_options=options, **{"schedule_end": 1.0, **run})
    assert cfg.schedule_end == 0.5 and cfg.block == "mixed"


def test_a_page_says_its_schedule_end_holds_where_a_name_gives_none(page, tmp_path):
    runs = [{**r, "method": "bar schedule_end=0.5" if r["method"] == "b" else "bar"} for r in _runs(validation=True)]
    result = {"command": "python benchmarks/methods_fashion_mnist.py", "model": "lenet5", "data": "fashion-mnist",
              "epochs": {"teacher": 5, "prune": 4, "finetune": 1, "lowlr": 1}, "machine": {}, "wall_seconds": 60,
              "factor": 16, "seeds": [0, 1, 2], "schedule_end": 1, "validation": 2000, "train_images": 60000}
    page.write_markdown({**result, "rows": page.summarise(runs)}, tmp_path)
    assert "budget schedule end 1 (where the name gives no schedule_end)." in (tmp_path / "methods_fashion_mnist.md").read_text()
    page.write_markdown({**result, "rows": page.summarise(_runs(validation=True))}, tmp_path)
    assert "budget schedule end 1. " in (tmp_path / "methods_fashion_mnist.md").read_text()
