"""A Hugging Face ``Trainer`` callback that prunes the trained network under a budget.

    callback = BudgetPruningCallback("flops=0.25", example_inputs=batch["pixel_values"], module="backbone")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    small = callback.pruned_model

The network pruned is ``model.<module>`` (the model itself by default: name the part that
takes one input tensor when the model's forward also takes labels). The budget moves over
``total_steps`` optimizer steps (default: the run's ``max_steps``). The penalty's gradient is
added after the Trainer clips gradients (``on_pre_optimizer_step``); with fp16 keep gradient
clipping on (``max_grad_norm`` > 0, the default) so that gradients are unscaled by then. At
the end of training :attr:`pruned_model` is the physically smaller network and :attr:`report`
what was kept; during training ``callback.pruner.status()`` gives the numbers to watch.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from ..errors import ConfigError
from ..pruner import Pruner
from .driver import TrainerDriver, submodule


class BudgetPruningCallback(TrainerCallback):
    """Prune ``model.<module>`` to ``budget`` while the Trainer trains it (see the module docstring).

    Other keyword options are the :class:`~budgetprune.pruner.Pruner`'s; ``gate_lr`` is the
    learning rate of the method's gates in the Trainer's optimizer (1e-2, constant)."""

    def __init__(self, budget, example_inputs: torch.Tensor, *, module: str | None = None,
                 total_steps: int | None = None, gate_lr: float = 1e-2, replace: bool = True, **pruner_options):
        if not isinstance(example_inputs, torch.Tensor):
            raise ConfigError("BudgetPruningCallback needs one batch of inputs to the pruned network as a tensor")
        self.budget, self.example_inputs, self.module = budget, example_inputs, module
        self.total_steps, self.gate_lr, self.replace = total_steps, gate_lr, replace
        self.pruner_options = pruner_options
        self.pruner: Pruner | None = None
        self.driver: TrainerDriver | None = None
        self.pruned_model = None
        self.report: dict | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        if optimizer is None:
            raise ConfigError("the Trainer has no optimizer at the start of training")
        network = submodule(model, self.module)
        device = next((p.device for p in network.parameters()), torch.device("cpu"))
        total = self.total_steps or int(state.max_steps)
        self.pruner = Pruner(network, self.example_inputs.to(device), self.budget, total_steps=total,
                             gate_lr=self.gate_lr, **self.pruner_options)
        self.driver = TrainerDriver(self.pruner)
        self.driver.join(optimizer, self.gate_lr, [lr_scheduler] if lr_scheduler is not None else [])

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.driver.before_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.driver.after_optimizer_step()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.pruned_model, self.report = self.pruner.finalize()
        if self.replace and self.module:
            parent, _, name = self.module.rpartition(".")
            setattr(submodule(model, parent), name, self.pruned_model)
