"""budgetprune.prune / load / save with bad arguments: the project's own error, one sentence,
before any training (instead of an IndexError or a torch RuntimeError nine frames deep)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import budgetprune
from budgetprune.errors import BudgetpruneError, CheckpointError, ConfigError, DataError
from budgetprune.engine import iterate_batches

FAST = dict(teacher_epochs=0, epochs=1, finetune_epochs=0, lowlr_epochs=0, progress=False)


def images(n=8, labels=None):
    x = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, torch.arange(n) % 10 if labels is None else labels)


class Pairs(torch.utils.data.Dataset):
    """A plain map-style dataset of the given items."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """Every error here must come before the first training step."""
    import budgetprune.pipeline as pipeline

    def refuse(*a, **k):
        raise AssertionError("training started")
    monkeypatch.setattr(pipeline, "train_epoch", refuse)


def prune_error(model, train, test=None, **options):
    with pytest.raises(BudgetpruneError) as info:
        budgetprune.prune(model, train, test, budget=0.25, log=None, **{**FAST, **options})
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg and len(msg) < 300
    return info.value


def lenet():
    return budgetprune.create_model("lenet5")


def test_an_empty_training_set():
    err = prune_error(lenet(), TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long)))
    assert isinstance(err, DataError) and "train_data is empty" in str(err)
    err = prune_error(lenet(), images(), [])
    assert isinstance(err, DataError) and "test_data is empty" in str(err)


def test_a_model_whose_output_is_a_feature_map_not_an_unreachable_budget():
    conv = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU())
    err = prune_error(conv, images())
    assert isinstance(err, ConfigError) and "unreachable" not in str(err)
    assert "the model's output has shape (1, 6, 24, 24)" in str(err) and "(batch, classes)" in str(err)


def test_a_model_that_returns_a_tuple_or_fails_on_the_inputs():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(784, 10)

        def forward(self, x):
            y = self.fc(x.flatten(1))
            return y, y
    err = prune_error(Pair(), images())
    assert isinstance(err, ConfigError) and "returns a tuple of 2 items" in str(err)
    err = prune_error(nn.Sequential(nn.Flatten(), nn.Linear(100, 10)), images())
    assert isinstance(err, ConfigError) and "cannot run on one training input of shape (1, 1, 28, 28)" in str(err)


def test_float_labels_are_refused_not_truncated():
    err = prune_error(lenet(), images(labels=torch.arange(8) % 10 + 0.7))
    assert isinstance(err, DataError) and "labels must be integer class indices" in str(err)
    err = prune_error(lenet(), Pairs([(torch.randn(1, 28, 28), 3.0)] * 4))
    assert isinstance(err, DataError) and "train_data[0] has the label float 3.0" in str(err)
    # the training loop refuses them too, at whatever item they occur
    data = Pairs([(torch.randn(1, 28, 28), 1)] * 3 + [(torch.randn(1, 28, 28), 2.5)])
    with pytest.raises(DataError, match="item 3 has the label float 2.5"):
        list(iterate_batches(data, 4))


def test_labels_outside_the_models_classes():
    err = prune_error(lenet(), images(labels=torch.arange(8) + 5))  # 12 with 10 outputs
    assert isinstance(err, DataError) and "the label 12 is not a class of the model" in str(err)
    err = prune_error(lenet(), Pairs([(torch.randn(1, 28, 28), 10)] * 2))
    assert isinstance(err, DataError) and "output has 10 classes" in str(err)


def test_items_without_a_label():
    err = prune_error(lenet(), Pairs([torch.randn(1, 28, 28)] * 4))
    assert isinstance(err, DataError) and "not an (input, label) pair" in str(err)
    assert "example input shape" not in str(err)
    err = prune_error(lenet(), Pairs([(torch.randn(1, 28, 28),)] * 4))
    assert isinstance(err, DataError) and "a tuple of 1 items, not an (input, label) pair" in str(err)
    err = prune_error(lenet(), Pairs([([0.0] * 784, 1)] * 4))
    assert isinstance(err, DataError) and "input of type list, not a tensor" in str(err)


@pytest.mark.parametrize("option,value,words", [
    ("epochs", "3", "option epochs must be an int, got '3' (a str)"),
    ("epochs", 2.5, "option epochs must be an int"),
    ("batch_size", True, "option batch_size must be an int, got True (a bool)"),
    ("lr", "0.01", "option lr must be a finite number"),
    ("lr", float("nan"), "option lr must be a finite number, got nan"),
    ("lam", [1e-5], "option lam must be a finite number or None"),
    ("device", 0, "option device must be a string"),
])
def test_options_of_the_wrong_type(option, value, words):
    err = prune_error(lenet(), images(), **{option: value})
    assert isinstance(err, ConfigError) and words in str(err)


def test_model_none_and_other_non_modules():
    for model in (None, "lenet5"):
        err = prune_error(model, images())
        assert isinstance(err, ConfigError) and "model must be a torch.nn.Module" in str(err)
    err = prune_error(lenet(), images(), teacher=3)
    assert isinstance(err, ConfigError) and "teacher must be" in str(err)


def test_load_and_save_without_a_path():
    with pytest.raises(CheckpointError, match="^load\\(\\) takes the path of a model file, got None$"):
        budgetprune.load(None)
    with pytest.raises(ConfigError, match="save\\(\\) takes the path of the file to write, got None"):
        budgetprune.save(lenet(), None)


def test_a_dataset_without_len():
    err = prune_error(lenet(), iter([(torch.randn(1, 28, 28), 1)]))
    assert isinstance(err, DataError) and "has no len()" in str(err)


def test_a_budget_no_pruning_can_reach_says_how_little_is_prunable():
    """Where the prunable layers hold under 5 % of the cost, no budget under 1 can be advised:
    the error gives the prunable share instead of a "use --budget 1.05 or more"."""
    from budgetprune import Pruner
    from budgetprune.errors import BudgetError

    class WithTable(nn.Module):  # a lookup table of ten million entries, outside every prunable layer
        def __init__(self):
            super().__init__()
            self.net = budgetprune.create_model("lenet5")
            self.table = nn.Parameter(torch.zeros(10_000_000))

        def forward(self, x):
            return self.net(x) + self.table[:10]
    with pytest.raises(BudgetError) as info:
        Pruner(WithTable(), torch.randn(2, 1, 28, 28), "params=0.5", total_steps=10)
    msg = str(info.value)
    assert "\n" not in msg and "or more" not in msg, msg
    lenet_params = sum(p.numel() for p in budgetprune.create_model("lenet5").parameters())
    share = f"{lenet_params / (lenet_params + 10_000_000):.1%}"  # at most what the table leaves, less one channel each
    assert "the prunable layers hold only" in msg and "%" in msg, msg
    held = float(msg.split("hold only ")[1].split("%")[0])
    assert 0 < held <= float(share[:-1]), (msg, share)
