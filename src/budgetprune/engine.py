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

from .errors import TrainingDiverged


def iterate_batches(dataset: Dataset, batch_size: int, shuffle: bool = False,
                    generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(indices, images, labels)``; uses the dataset's fast ``batch()`` when it has one."""
    n = len(dataset)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    fast = hasattr(dataset, "batch")
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if fast:
            x, y = dataset.batch(idx, generator=generator)
        else:
            items = [dataset[int(i)] for i in idx]
            x = torch.stack([it[0] for it in items])
            y = torch.as_tensor([int(it[1]) for it in items])
        yield idx, x, y


def num_batches(dataset: Dataset, batch_size: int) -> int:
    return math.ceil(len(dataset) / batch_size)


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` (eval mode) on every example, in dataset order, on the CPU."""
    was = model.training
    model.eval()
    out = [model(x.to(device)).float().cpu() for _, x, _ in iterate_batches(dataset, batch_size)]
    model.train(was)
    return torch.cat(out)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 512) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` in eval mode."""
    was = model.training
    model.eval()
    correct, total, loss = 0, 0, 0.0
    for _, x, y in iterate_batches(dataset, batch_size):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        total += y.numel()
    model.train(was)
    return {"accuracy": correct / max(total, 1), "loss": loss / max(total, 1)}


LossFn = Callable[..., torch.Tensor]  # (logits, labels, indices, images) -> loss


def train_epoch(model: nn.Module, dataset: Dataset, optimizer: torch.optim.Optimizer, loss_fn: LossFn, *,
                device: torch.device, batch_size: int, generator: torch.Generator,
                step: int = 0, total_steps: int = 1,
                penalty: Callable[[float], torch.Tensor] | None = None,
                after_step: Callable[[float], None] | None = None,
                show_progress: bool = True, desc: str = "train") -> dict[str, float]:
    """One epoch. ``progress`` passed to the method is (global step) / ``total_steps``."""
    model.train()
    seen, correct, loss_sum, pen_sum = 0, 0, 0.0, 0.0
    start = time.perf_counter()
    bar = tqdm(total=num_batches(dataset, batch_size), desc=desc, leave=False, disable=not show_progress,
               dynamic_ncols=True)
    for idx, x, y in iterate_batches(dataset, batch_size, shuffle=True, generator=generator):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        progress = min(step / max(total_steps, 1), 1.0)
        logits = model(x)
        loss = loss_fn(logits, y, idx, x)
        pen = penalty(progress) if penalty is not None else None
        total = loss + pen if pen is not None else loss
        if not torch.isfinite(total):
            bar.close()
            raise TrainingDiverged(f"the loss became {float(total.detach())} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if after_step is not None:
            after_step(progress)
        step += 1
        n = y.numel()
        seen += n
        loss_sum += float(loss.detach()) * n
        pen_sum += (float(pen.detach()) if pen is not None else 0.0) * n
        correct += int((logits.detach().argmax(1) == y).sum())
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}", refresh=False)
    bar.close()
    return {"loss": loss_sum / max(seen, 1), "penalty": pen_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1), "steps": step, "seconds": time.perf_counter() - start}


def make_optimizer(params, lr: float, weight_decay: float, extra_groups: list[dict] | None = None):
    """Adam (seed 001, section 5.1: lr 1e-3, weight decay 5e-4) with the method's own groups."""
    groups = [{"params": [p for p in params if p.requires_grad], "lr": lr, "weight_decay": weight_decay,
               "name": "weights"}]
    groups += extra_groups or []
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, factor: float, base: dict[str, float]) -> None:
    """Scale every group's learning rate to ``factor`` × its base value."""
    for g in optimizer.param_groups:
        g["lr"] = base[g.get("name", "weights")] * factor
