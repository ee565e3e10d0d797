"""Driving a :class:`~budgetprune.pruner.Pruner` from a trainer's hooks (Lightning, Hugging Face).

A trainer computes and backpropagates its own loss; its callbacks cannot add a term to it. The
gradient of (task loss + penalty) is the gradient of the loss plus the gradient of the penalty,
so :meth:`TrainerDriver.before_optimizer_step` backpropagates the penalty alone right before the
optimizer steps, once per optimizer step (after gradient accumulation, and after the trainer
has unscaled mixed-precision gradients). The method's parameter groups join the trainer's
optimizer, and their learning rate is held constant whatever the trainer's scheduler does to
the other groups: the gates must keep learning until the budget is reached.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..pruner import Pruner


def submodule(model: nn.Module, path: str | None) -> nn.Module:
    """``model`` itself (``path`` None or empty) or its submodule at the dotted ``path`` (the network
    to prune inside a wrapper that also computes the loss)."""
    if not path:
        return model
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ConfigError(f"the model has no submodule '{path}' to prune: name the network with module=...") from None


class TrainerDriver:
    """One pruner, its optimizer groups and its step count, for a trainer's hooks."""

    def __init__(self, pruner: Pruner):
        self.pruner = pruner
        self.joined: torch.optim.Optimizer | None = None
        self.groups: list[dict] = []
        self.rates: list[float] = []

    def join(self, optimizer: torch.optim.Optimizer, lr: float, schedulers=()) -> None:
        """Add the method's parameter groups (gates) to ``optimizer``, once; ``schedulers`` already
        made for it learn of the new groups (their per-group lists grow, as torch's schedulers
        require one entry per group)."""
        if self.joined is optimizer:
            return
        added = self.pruner.method_parameters(lr)
        for group in added:
            optimizer.add_param_group(group)
            group = optimizer.param_groups[-1]
            group.setdefault("initial_lr", group["lr"])
            for scheduler in schedulers:
                for name in ("base_lrs", "_last_lr"):
                    if isinstance(getattr(scheduler, name, None), list):
                        getattr(scheduler, name).append(group["lr"])
                if isinstance(getattr(scheduler, "lr_lambdas", None), list):
                    scheduler.lr_lambdas.append(scheduler.lr_lambdas[-1])
        self.groups = optimizer.param_groups[len(optimizer.param_groups) - len(added):]
        self.rates = [group["lr"] for group in self.groups]
        self.joined = optimizer

    def before_optimizer_step(self) -> None:
        """Accumulate the penalty's gradient into the parameters' gradients; the gates' rate back
        to its constant value (a scheduler may have scaled every group)."""
        for group, lr in zip(self.groups, self.rates):
            group["lr"] = lr
        penalty = self.pruner.penalty()
        if penalty.requires_grad:
            penalty.backward()

    def after_optimizer_step(self) -> None:
        self.pruner.step()
