"""Checks of the model and data handed to a run, before any training.

Each problem raises a one-line :class:`~budgetprune.errors.ConfigError` (the model) or
:class:`~budgetprune.errors.DataError` (the data) naming it and the fix, instead of an
exception from deep inside torch once training has started.
"""

from __future__ import annotations

import torch
from torch import nn

from .engine import check_labels, class_index
from .errors import ConfigError, DataError, first_line


def check_model(model, name: str = "model") -> None:
    """``model`` must be a ``torch.nn.Module``."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{name} must be a torch.nn.Module, got {_kind(model)}: pass the network itself")


def check_dataset(data, name: str) -> None:
    """``data`` must be a non-empty indexable dataset whose item 0 is (input tensor, class index)."""
    try:
        n = len(data)
    except TypeError:
        raise DataError(f"{name} ({_kind(data)}) has no len(): pass a dataset of (input, label) pairs, "
                        "e.g. a torch.utils.data.TensorDataset") from None
    if n == 0:
        raise DataError(f"{name} is empty: pass at least one (input, label) pair")
    try:
        item = data[0]
    except DataError:
        raise  # already one line naming the problem (an unreadable image file)
    except Exception as exc:  # noqa: BLE001 - the user's dataset: any failure is reported in one line
        raise DataError(f"{name}[0] cannot be read ({first_line(exc)}): {name} must support len() and "
                        "indexing with an int") from None
    check_item(item, f"{name}[0]")


def check_item(item, where: str) -> None:
    """One dataset item: a pair (input tensor, integer class index)."""
    if torch.is_tensor(item) or not isinstance(item, (tuple, list)) or len(item) != 2:
        raise DataError(f"{where} is {_kind(item)}, not an (input, label) pair: each item must be "
                        "(input tensor, class index), e.g. TensorDataset(images, labels)")
    x, y = item
    if not torch.is_tensor(x):
        raise DataError(f"{where} has an input of type {type(x).__name__}, not a tensor: convert the inputs "
                        "to tensors (e.g. torchvision.transforms.ToTensor)")
    class_index(y, where)


def check_classifier(model: nn.Module, example: torch.Tensor) -> int:
    """Run ``model`` (eval mode) on one input of shape (1, ...); its output must be (1, classes).

    Returns the number of classes.
    """
    device = next((p.device for p in model.parameters()), example.device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example.to(device))
    except Exception as exc:  # noqa: BLE001 - the user's model: any failure is reported in one line
        raise ConfigError(f"the model cannot run on one training input of shape {tuple(example.shape)} "
                          f"({first_line(exc)}): give a model that takes the dataset's inputs") from None
    finally:
        model.train(was)
    if not torch.is_tensor(out):
        raise ConfigError(f"the model returns {_kind(out)}, not a tensor of shape (batch, classes): "
                          "budgetprune.prune trains classifiers; make forward() return the logits only")
    if out.dim() != 2 or out.shape[0] != example.shape[0]:
        raise ConfigError(f"the model's output has shape {tuple(out.shape)}; budgetprune.prune trains classifiers "
                          "whose output is (batch, classes): end the model with a flatten and a linear layer")
    if out.shape[1] < 2:
        raise ConfigError(f"the model's output has shape {tuple(out.shape)}, a single class; training uses "
                          "cross-entropy over classes: give the model one output per class (2 for a yes/no task)")
    if not out.is_floating_point():
        raise ConfigError(f"the model's output is of dtype {out.dtype}; logits must be floating point")
    return int(out.shape[1])


def check_labels_fit(data, name: str, num_classes: int) -> None:
    """The labels of ``data`` must be classes of the model: item 0's always, all of them where the
    dataset holds them as one tensor (``labels``, ``targets`` or a TensorDataset's second tensor)."""
    labels = _label_tensor(data)
    if labels is not None and (labels.is_floating_point() or labels.dtype == torch.bool):
        raise DataError(f"{name} holds labels of dtype {labels.dtype}: labels must be integer class indices "
                        "(convert them with .long() if they are whole numbers)")
    if labels is None:
        labels = torch.tensor([class_index(data[0][1], f"{name}[0]")])
    try:
        check_labels(labels.reshape(-1), num_classes)
    except DataError as exc:
        raise DataError(f"{name}: {exc}") from None


def check_inputs(model, train_data, test_data=None) -> int:
    """Every check above, in the order a user would fix them; returns the number of classes."""
    check_model(model)
    check_dataset(train_data, "train_data")
    if test_data is not None and test_data is not train_data:
        check_dataset(test_data, "test_data")
    num_classes = check_classifier(model, train_data[0][0].unsqueeze(0))
    check_labels_fit(train_data, "train_data", num_classes)
    if test_data is not None and test_data is not train_data:
        check_labels_fit(test_data, "test_data", num_classes)
    return num_classes


def _label_tensor(data) -> torch.Tensor | None:
    for attr in ("labels", "targets"):
        value = getattr(data, attr, None)
        if torch.is_tensor(value) and value.dim() == 1 and len(value) == len(data):
            return value
    tensors = getattr(data, "tensors", None)  # torch.utils.data.TensorDataset
    if isinstance(tensors, tuple) and len(tensors) == 2 and torch.is_tensor(tensors[1]):
        return tensors[1]
    return None


def _kind(value) -> str:
    if value is None:
        return "None"
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"

