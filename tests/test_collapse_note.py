"""The note a run gives when pruning left its network no better than guessing
(:func:`budgetprune.report.collapse_note`), on hand-made metrics (a run records its classes:
tests/test_cli.py::test_prune_end_to_end_meets_budget)."""

import pytest

from budgetprune.report import collapse_note, write_report

# sensitivity's third seed at 16x volume on ResNet-20: at chance from the third prune epoch on
HISTORY = [{"stage": "teacher", "epoch": 1, "test_accuracy": 0.05},  # a teacher's first epoch is not pruning
           {"stage": "prune", "epoch": 2, "test_accuracy": 0.2686},
           {"stage": "prune", "epoch": 3, "test_accuracy": 0.0926},
           {"stage": "finetune", "epoch": 1, "test_accuracy": 0.1}]


def metrics(accuracy=0.1, unpruned=0.8547, classes=10, method="sensitivity", **extra):
    return {"method": method, "test_accuracy": accuracy, "unpruned_test_accuracy": unpruned, "classes": classes,
            **extra}


def test_a_result_at_chance_gets_a_note_with_where_it_fell_and_what_to_change():
    note = collapse_note(metrics(), HISTORY)
    assert note.startswith("note: the pruned network scores 10.0 % on the test set, about what guessing among "
                           "10 classes scores (10.0 %; unpruned 85.5 %)")
    assert "had fallen that low by prune epoch 3: history.json" in note
    assert note.endswith("a larger budget, a longer prune stage (--epochs) or another method (e.g. --method bar)")
    bar = collapse_note(metrics(method="bar"), [])
    assert bar.endswith("or another method") and "history.json" not in bar  # no history: no epoch named


@pytest.mark.parametrize("m", [
    metrics(accuracy=0.16),             # above 1.5 / 10: worse, but not guessing
    metrics(unpruned=0.29),             # the unpruned network was hardly better than guessing itself
    metrics(classes=None),              # a run that could not tell its classes
    metrics(classes=1),
])
def test_no_note_where_the_result_beats_guessing_or_the_classes_are_unknown(m):
    assert collapse_note(m, HISTORY) is None


def test_the_report_says_so_under_its_test_accuracy(tmp_path):
    m = {**metrics(), "metric": "volume", "budget_fraction": 0.0625, "budget": 1.0, "budget_ratio": 0.996,
         "full": {"volume": 16.0}, "pruned": {"volume": 1.0}, "reduction_factor": {"volume": 16.0}, "widths": {},
         "accuracy_change": -0.7547,
         "cost_before_projection": 1.68, "channels_dropped_by_projection": 44, "compaction_max_abs_diff": 0.0,
         "model": "resnet20", "data": "fashion-mnist"}
    write_report(tmp_path, m, HISTORY)
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert lines[2].startswith("- Test accuracy: **0.1000**")
    assert lines[3].startswith("- **The pruned network scores 10.0 % on the test set") and "prune epoch 3" in lines[3]
    write_report(tmp_path, {**m, "test_accuracy": 0.8, "accuracy_change": -0.05}, HISTORY)
    assert "guessing" not in (tmp_path / "report.md").read_text()
