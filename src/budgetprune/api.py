"""The Python API: ``prune``, ``save``, ``load``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import fx, nn

from . import io
from .budget import parse_budgets
from .errors import CheckpointError, ConfigError
from .inputs import check_inputs, check_model
from .pipeline import PruneConfig, PruneRun, resolve_device
from .seeding import isolated_rng


def prune(model: nn.Module, train_data=None, test_data=None, *, budget: float | str = 0.25, metric: str | None = None,
          method: str = "bar", teacher: nn.Module | str | os.PathLike | None = None,
          out: str | os.PathLike | None = None, resume: bool = False, log=print, **options):
    """Train and prune ``model`` under ``budget``; returns ``(compacted_model, metrics)``.

    ``budget`` is a fraction of the unpruned ``metric`` (``0.25``) or a pruning factor
    (``"4x"``), or several budgets at once (``"volume=0.25,flops=0.2"``). ``metric`` defaults to
    ``"volume"``, and to ``"nonzero"`` with ``granularity="weight"`` (single weights pruned). ``teacher`` is a trained unpruned model (module or checkpoint path); without
    one, a teacher is trained first for ``teacher_epochs`` starting from ``model``'s weights
    (``teacher_epochs=0`` uses ``model`` itself as the trained teacher). ``out`` keeps the
    run folder (checkpoints, report); without it a temporary folder is used. Other keyword
    options are the fields of :class:`~budgetprune.pipeline.PruneConfig` (``epochs``,
    ``finetune_epochs``, ``lr``, ``device``, ...). ``test_data`` defaults to ``train_data``.

    ``train_data`` may also be a dataset's name, or be left out for ``data=``: ``"demo"``,
    ``"cifar10"`` (with ``data_root=``), ``"folder:PATH"`` for your own images (with
    ``image_size=``, ``augment=``, ``workers=``); the run then loads both splits itself, as the
    command line does, and logs how a folder was split.

    Everything is checked before any training: a model that is not a classifier (output
    ``(batch, classes)``), an empty dataset, items that are not ``(input tensor, class index)``
    pairs, or an option of the wrong type raise a one-line :class:`~budgetprune.BudgetpruneError`.
    The run seeds torch's random generator from ``seed`` (default 0) and gives the caller's
    generator state back afterwards.
    """
    check_model(model)
    unknown = set(options) - set(PruneConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(sorted(unknown))}: see budgetprune.PruneConfig")
    if isinstance(train_data, str):  # a dataset's name: the run loads it (see _named_data)
        options = {**options, "data": train_data}
    if metric is None:
        metric = "nonzero" if options.get("granularity") == "weight" else "volume"
    first, *more = parse_budgets(budget, metric)
    config = PruneConfig(budget=first.fraction, metric=first.metric, method=method,
                         extra_budgets={b.metric: b.fraction for b in more}, **options)
    config.validate()
    if log is None:
        log = lambda _msg: None  # noqa: E731
    if not callable(log):
        raise ConfigError(f"log must be a function taking one line of text, or None; got a {type(log).__name__}")
    loaded = None  # the splits this call loads (from a dataset's name), closed when it ends
    if train_data is None or isinstance(train_data, str):
        loaded = _named_data(config, test_data, log)
        train_data, test_data = loaded.train, loaded.test
    test_data = test_data if test_data is not None else train_data
    check_inputs(model, train_data, test_data)
    if teacher is not None and not isinstance(teacher, (nn.Module, str, os.PathLike)):
        raise ConfigError(f"teacher must be a trained model, the path of its checkpoint, or None; got a "
                          f"{type(teacher).__name__}")
    if teacher is None and config.teacher_epochs == 0:
        teacher = model
    if isinstance(teacher, (str, os.PathLike)):
        config.teacher = str(teacher)
        example = train_data[0][0].unsqueeze(0)
        teacher = load_teacher(teacher, model, example)
    try:
        with tempfile.TemporaryDirectory(prefix="budgetprune-") as tmp, isolated_rng(resolve_device(config.device)):
            run = PruneRun(model, train_data, test_data, config, out if out is not None else tmp,
                           teacher=teacher, log=log)
            result = run.run(resume=resume)
    finally:
        if loaded is not None:
            loaded.close()  # the DataLoader workers of a folder of images
    return result.model, result.metrics


def _named_data(config: PruneConfig, test_data, log):
    """The :class:`~budgetprune.data.DataSplits` of the dataset ``config.data``, loaded as the
    command line loads them."""
    from .data import load_dataset
    if config.data is None:
        raise ConfigError("no data: pass train_data (a dataset of (input, label) pairs), or a dataset name as "
                          "train_data or data=, e.g. data='folder:path/to/images'")
    if test_data is not None:
        raise ConfigError(f"test_data is given with the dataset name '{config.data}', which brings its own test "
                          "split: pass either datasets or a name")
    splits = load_dataset(config.data, root=config.data_root, progress=config.progress,
                          image_size=config.image_size, augment=config.augment, workers=config.workers)
    if splits.note:
        log(splits.note)
    return splits


def load_teacher(path: str | os.PathLike, model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A trained unpruned teacher for ``model`` from a budgetprune model file or a state dict.

    Raises :class:`CheckpointError` when the checkpoint is for another architecture.
    """
    obj = io.torch_load(path, "teacher checkpoint")
    if isinstance(obj, dict) and obj.get("format") == io.FORMAT:
        net = io.load_file(path, fallback=model)[0]  # a plan-only file is replayed on the model
        if _shape_signature(net) != _shape_signature(model):
            raise CheckpointError(f"teacher checkpoint {path} is for another architecture "
                                  f"({_describe(net)}; the model is {_describe(model)})")
        return net
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"teacher checkpoint {path} holds neither a budgetprune model nor a state dict")
    import copy
    teacher = copy.deepcopy(model)
    try:
        teacher.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).replace("\n", " ").replace("\t", "")[:240]
        raise CheckpointError(f"teacher checkpoint {path} does not fit the model: {first}") from None
    return teacher.eval()


def _shape_signature(model: nn.Module) -> list[tuple[int, ...]]:
    """Shapes of the parameters and buffers (names and order differ between file formats)."""
    return sorted(tuple(t.shape) for k, t in model.state_dict().items() if not k.endswith("num_batches_tracked"))


def _describe(model: nn.Module) -> str:
    widths = [str(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
              for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return "widths " + "-".join(widths)


def save(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> None:
    """Save a model returned by :func:`prune` or :func:`load` (architecture + weights)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"save() takes the path of the file to write, got {_what(path)}")
    specs = getattr(model, "budgetprune_architecture", None)
    if specs is None and not isinstance(model, fx.GraphModule) and not hasattr(model, "budgetprune_plan"):
        raise ConfigError("save() takes a model returned by budgetprune.prune(), Pruner.finalize() or "
                          "budgetprune.load()")
    io.save(model, Path(path), specs, meta)


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a saved model (eval mode, CPU): without its original code from a self-contained
    file, or, given ``model`` (the architecture that was pruned, as built before pruning), by
    replaying the file's pruning plan on it — the way to load a network with operations a
    self-contained file cannot describe."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"load() takes the path of a model file, got {_what(path)}")
    if model is not None and not isinstance(model, nn.Module):
        raise CheckpointError(f"load(model=...) takes the unpruned torch.nn.Module, got {_what(model)}")
    model, specs, _ = io.load_file(path, model)
    model.budgetprune_architecture = specs
    return model


def _what(value) -> str:
    return "None" if value is None else f"a {type(value).__name__}"
