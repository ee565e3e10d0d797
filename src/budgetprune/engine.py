"""The training loop: batches, one epoch of training, evaluation.

Knows nothing about any pruning method: a method contributes through the ``penalty`` and
``after_step`` callables the caller passes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from . import distributed
from .errors import DataError, TrainingDiverged
from .precision import autocast


def iterate_batches(dataset: Dataset, batch_size: int, shuffle: bool = False,
                    generator: torch.Generator | None = None, *, workers: int | None = None,
                    pin_memory: bool = False, shard: bool = False, part: bool = False
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(indices, images, labels)`` in a random (``shuffle``) or the dataset's order.

    With ``shard`` under torch.distributed, each process takes its part of every global batch of
    ``batch_size`` (:func:`budgetprune.distributed.shard`; the same ``generator`` seed on every
    rank gives the same global batches). With ``part`` each process takes every world-size-th
    example instead, none twice (the ranks' parts together are the dataset: evaluation), in
    batches of ``batch_size``.

    How a batch of indices becomes tensors depends on the dataset: one ``batch()`` call for data
    held in memory (:class:`~budgetprune.data.ImageDataset`); a DataLoader with ``workers``
    processes (default: the dataset's) and ``pin_memory`` for data streamed from disk
    (:class:`~budgetprune.data.streaming.StreamedDataset`); item by item otherwise.
    """
    n = len(dataset)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if part:
        order = order[distributed.rank()::distributed.world_size()]
    chunks = [order[start:start + batch_size] for start in range(0, n, batch_size)]
    if shard:
        chunks = [distributed.shard(c) for c in chunks]
    if streams(dataset):
        batches = dataset.stream(chunks, generator, workers=workers, pin_memory=pin_memory)
    elif hasattr(dataset, "batch"):
        batches = (dataset.batch(idx, generator=generator) for idx in chunks)
    else:
        batches = (_collate_items(dataset, idx) for idx in chunks)
    for idx, (x, y) in zip(chunks, batches):
        yield idx, x, y


def _collate_items(dataset: Dataset, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Items ``idx`` of a plain map-style dataset, stacked; each label checked as a class index."""
    items = [dataset[int(i)] for i in idx]
    x = torch.stack([it[0] for it in items])
    y = torch.as_tensor([class_index(it[1], f"item {int(i)}") for it, i in zip(items, idx)], dtype=torch.long)
    return x, y


def streams(dataset: Dataset) -> bool:
    """Whether ``dataset`` is read from disk batch by batch rather than held in memory."""
    return bool(getattr(dataset, "streamed", False))


def class_index(label, where: str) -> int:
    """``label`` as a class index: an int or an integer 0-d tensor; a float is refused, not truncated."""
    if torch.is_tensor(label) and label.numel() == 1 and not label.is_floating_point() \
            and not label.is_complex() and label.dtype != torch.bool:
        return int(label.reshape(()))
    if isinstance(label, int) and not isinstance(label, bool):
        return label
    if hasattr(label, "dtype") and getattr(label, "shape", None) == () and "int" in str(label.dtype):
        return int(label)  # a numpy integer
    if torch.is_tensor(label):
        shown = (f"{label.item():g} (a {str(label.dtype).replace('torch.', '')} tensor)" if label.numel() == 1
                 and not label.is_complex() else f"tensor of dtype {label.dtype} and shape {tuple(label.shape)}")
    else:
        shown = f"{type(label).__name__} {label!r:.40}"
    raise DataError(f"{where} has the label {shown}: labels must be integer class indices "
                    "(an int or an integer 0-d tensor; convert float labels with .long() if they are whole)")


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Raise :class:`DataError` when a label is not a class of a ``num_classes``-way output."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise DataError(f"the label {bad} is not a class of the model, whose output has {num_classes} classes "
                        f"(labels must lie in 0..{num_classes - 1}): give the model one output per class")


def num_batches(dataset: Dataset, batch_size: int) -> int:
    return math.ceil(len(dataset) / batch_size)


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 512, *,
                   workers: int | None = None, split: bool = False) -> torch.Tensor:
    """Logits of ``model`` (eval mode) on every example, in dataset order, on the CPU. With
    ``split`` under torch.distributed each process computes every N-th example's and the parts
    are gathered, so each gets the whole table at 1/N of the work."""
    split = split and len(dataset) >= distributed.world_size()  # every process has a part
    was = model.training
    model.eval()
    out = [model(x.to(device)).float().cpu()
           for _, x, _ in iterate_batches(dataset, batch_size, workers=workers, pin_memory=device.type == "cuda",
                                          part=split)]
    model.train(was)
    logits = torch.cat(out)
    return distributed.gather_parts(logits, len(dataset), device) if split else logits


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 512, *,
             workers: int | None = None, split: bool = False) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` in eval mode (``workers``: see :func:`iterate_batches`).

    With ``split`` under torch.distributed every process evaluates its part of ``dataset`` and the
    counts are summed over the processes, so each gets the whole dataset's figures (``model``
    must then be a plain module, not a DistributedDataParallel replica: the ranks' parts may
    differ by one batch)."""
    was = model.training
    model.eval()
    correct, total, loss = 0, 0, 0.0
    for _, x, labels in iterate_batches(dataset, batch_size, workers=workers, pin_memory=device.type == "cuda",
                                        part=split):
        x, y = x.to(device), labels.to(device)
        logits = model(x)
        check_labels(labels, logits.shape[1])
        loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        total += y.numel()
    model.train(was)
    if split:
        correct, total, loss = distributed.sum_values([correct, total, loss], device)
    return {"accuracy": correct / max(total, 1), "loss": loss / max(total, 1)}


LossFn = Callable[..., torch.Tensor]  # (logits, labels, indices, images) -> loss


class DivergenceCheck:
    """Decides when training has diverged (raises :class:`TrainingDiverged`, one line).

    Training has diverged when

    1. the task loss or the method's penalty of a batch is NaN or infinite;
    2. the task loss of a batch exceeds ``factor`` (1000) × the *reference*: the task loss of
       the first batch the check saw (the pipeline keeps one check per stage and stores the
       reference in its checkpoints), floored at 1 nat so that a well-fitted start does not make
       the limit tiny. A cross-entropy or distillation loss a thousand times its start means
       logits of absurd size: ``--lr 1e6`` takes the loss from 2.3 to ~1e30 in one step;
    3. a parameter or floating-point buffer is NaN or infinite at the end of an epoch (an
       overflowing step), so that no such weights reach a checkpoint.

    The penalty is checked for finiteness only: a barrier (BAR's f(V, a, b)) is legitimately
    large near its wall and is not compared with its start.
    """

    def __init__(self, factor: float = 1e3, reference: float | None = None):
        self.factor = float(factor)
        self.reference = reference

    def check_loss(self, loss: float, penalty: float | None, step: int) -> None:
        if not math.isfinite(loss) or (penalty is not None and not math.isfinite(penalty)):
            bad = loss if not math.isfinite(loss) else penalty
            what = "loss" if not math.isfinite(loss) else "method's penalty"
            raise TrainingDiverged(f"the {what} became {bad} at step {step}")
        if self.reference is None:
            self.reference = loss
        limit = self.factor * max(self.reference, 1.0)
        if loss > limit:
            raise TrainingDiverged(f"the loss exploded to {loss:.3g} at step {step} (more than {self.factor:g}x "
                                   f"its start, {self.reference:.3g})")

    @staticmethod
    def check_weights(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        names = {id(p): n for n, p in model.named_parameters()}
        tensors = [(names.get(id(p), f"of the optimizer group '{g.get('name', i)}'"), p)
                   for i, g in enumerate(optimizer.param_groups) for p in g["params"]]
        tensors += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        for name, t in tensors:
            if not bool(torch.isfinite(t.detach()).all()):
                raise TrainingDiverged(f"the weights {name} became NaN or infinite by step {step}")


def train_epoch(model: nn.Module, dataset: Dataset, optimizer: torch.optim.Optimizer, loss_fn: LossFn, *,
                device: torch.device, batch_size: int, generator: torch.Generator,
                step: int = 0,
                penalty: Callable[[], torch.Tensor] | None = None,
                after_step: Callable[[], None] | None = None,
                before_step: Callable[[int], None] | None = None,
                show_progress: bool = True, desc: str = "train",
                divergence: DivergenceCheck | None = None, workers: int | None = None,
                precision: str = "fp32", scaler: torch.amp.GradScaler | None = None,
                shard: bool = False) -> dict[str, float]:
    """One epoch: ``penalty()`` is added to each batch's loss and ``after_step()`` called after
    each optimiser step (a :class:`~budgetprune.pruner.Pruner`'s, which keeps its own step count);
    ``before_step(step)`` before each, with the batch's global step (the learning-rate schedule,
    :func:`budgetprune.recipe.stage_schedule`); ``step`` is the global step of the epoch's first batch;
    ``workers`` the DataLoader processes of streamed data (see :func:`iterate_batches`).

    ``precision`` (``fp32``, ``bf16``, ``fp16``) runs the forward pass under autocast; the loss is
    computed in float32 from the logits, and ``scaler`` (a :func:`~budgetprune.precision.grad_scaler`,
    needed for ``fp16``) scales it for the backward pass.

    ``shard``: ``model`` is a DistributedDataParallel replica and this process trains on its part
    of each global batch; the losses the divergence check and the returned numbers see are the
    means over all processes, so every rank decides alike.

    Raises :class:`TrainingDiverged` as ``divergence`` decides (a fresh :class:`DivergenceCheck`,
    referenced to this epoch's first batch, when None); the step that diverged is not applied.
    """
    divergence = divergence if divergence is not None else DivergenceCheck()
    model.train()
    seen, correct, loss_sum, pen_sum = 0, 0, 0.0, 0.0
    start = time.perf_counter()
    with tqdm(total=num_batches(dataset, batch_size), desc=desc, leave=False, disable=not show_progress,
              dynamic_ncols=True) as bar:
        for idx, x, labels in iterate_batches(dataset, batch_size, shuffle=True, generator=generator,
                                              workers=workers, pin_memory=device.type == "cuda", shard=shard):
            x, y = x.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(x)
            logits = logits.float()
            check_labels(labels, logits.shape[1])
            loss = loss_fn(logits, y, idx, x)
            pen = penalty() if penalty is not None else None
            total = loss + pen if pen is not None else loss
            loss_value = float(loss.detach())
            pen_value = float(pen.detach()) if pen is not None else None
            if shard and distributed.active():
                loss_value = distributed.sum_values([loss_value])[0] / distributed.world_size()
            divergence.check_loss(loss_value, pen_value, step)
            optimizer.zero_grad(set_to_none=True)
            if before_step is not None:
                before_step(step)
            if scaler is None:
                total.backward()
                optimizer.step()
            else:
                scaler.scale(total).backward()
                scaler.step(optimizer)
                scaler.update()
            if after_step is not None:
                after_step()
            step += 1
            n = y.numel()
            seen += n
            loss_sum += loss_value * n
            pen_sum += (pen_value or 0.0) * n
            correct += int((logits.detach().argmax(1) == y).sum())
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}", refresh=False)
    divergence.check_weights(model, optimizer, step)
    if shard:
        seen, correct, loss_sum, pen_sum = distributed.sum_values([seen, correct, loss_sum, pen_sum])
    return {"loss": loss_sum / max(seen, 1), "penalty": pen_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1), "steps": step, "seconds": time.perf_counter() - start}
