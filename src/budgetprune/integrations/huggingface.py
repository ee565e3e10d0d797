"""A Hugging Face ``Trainer`` callback that prunes the trained network under a budget.

    callback = BudgetPruningCallback("flops=0.25", example_inputs=batch["pixel_values"], module="backbone")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    small = callback.pruned_model

The network pruned is ``model.<module>`` (the model itself by default: name the part that
takes one input tensor when the model's forward also takes labels). The budget moves over
``total_steps`` optimizer steps (default: the run's ``max_steps``). The penalty's gradient is
added after the Trainer clips gradients (``on_pre_optimizer_step``). The pruner's state is
written into each checkpoint folder (``budgetprune_pruner.pt``) and read back when training
resumes from one; ``fp16`` (a gradient scaler) is refused, ``bf16`` works. At
the end of training :attr:`pruned_model` is the physically smaller network and :attr:`report`
what was kept; during training ``callback.pruner.status()`` gives the numbers to watch.
With ``gate_survival`` the gates' start is measured when training begins, on the first
``gate_start_images`` examples of the training DataLoader: the whole model runs on each batch
without its labels (``args.label_names``, else the label arguments of the model's forward as the
Trainer finds them, and ``labels``, ``label``, ``label_ids``), and the first tensor of its output
(the logits) is compared.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from transformers import TrainerCallback
from transformers.utils import find_labels

from .. import io
from ..errors import ConfigError
from .driver import PruningCallback, submodule

#: The pruner's state in each of the Trainer's checkpoint folders.
STATE_FILE = "budgetprune_pruner.pt"


class BudgetPruningCallback(PruningCallback, TrainerCallback):
    """Prune ``model.<module>`` to ``budget`` while the Trainer trains it (see the module docstring).

    Other keyword options are the :class:`~budgetprune.pruner.Pruner`'s; ``gate_lr`` is the
    learning rate of the method's gates (their own Adam, constant; 1e-2); ``gate_survival``
    (instead of ``gate_init``, for a trained network) starts the Hard Concrete gates at the lowest
    log α whose noise keeps the model's answer on that fraction of ``gate_start_images`` training
    examples (:meth:`~budgetprune.pruner.Pruner.choose_gate_start`; ``gate_agree(output,
    reference)`` gives a per-example bool tensor where the first tensor of the model's output is not
    (batch, classes) logits)."""

    def __init__(self, budget, example_inputs: torch.Tensor, *, module: str | None = None,
                 total_steps: int | None = None, gate_lr: float = 1e-2, replace: bool = True,
                 gate_survival: float | None = None, gate_start_images: int = 1024, gate_agree=None,
                 **pruner_options):
        if not isinstance(example_inputs, torch.Tensor):
            raise ConfigError("BudgetPruningCallback needs one batch of inputs to the pruned network as a tensor")
        self._settings(budget, example_inputs, module, total_steps, gate_lr, replace, gate_survival,
                       gate_start_images, gate_agree, pruner_options)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.fp16:
            raise ConfigError("BudgetPruningCallback does not support fp16 (a gradient scaler): use bf16 or 32-bit")
        network = submodule(model, self.module)
        device = next((p.device for p in network.parameters()), torch.device("cpu"))
        self._start(network, self.example_inputs.to(device), state.max_steps)
        if state.global_step > 0:  # resumed from a checkpoint folder
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
            if not os.path.isfile(path):
                raise ConfigError(f"training resumes at step {state.global_step} but {path} does not exist: the "
                                  "pruner's state cannot be restored; resume from a checkpoint this callback saved")
            self.driver.load_state_dict(io.torch_load(path, "pruner state"))
        if self.gate_survival is not None:
            self._choose_gate_start_on(kwargs.get("train_dataloader"), model, args, device)

    def _choose_gate_start_on(self, loader, model, args, device) -> None:
        """The gates' start measured through the whole ``model`` on the Trainer's ``loader``."""
        # the Trainer's own label names: args.label_names, else those of the model's forward (find_labels)
        labels = set(args.label_names if args.label_names is not None else find_labels(model.__class__))
        labels |= {"labels", "label", "label_ids"}

        def inputs(batch):  # the model's own inputs: a Trainer's batch is a dict with the labels in it
            if not isinstance(batch, Mapping):
                raise ConfigError("gate_survival runs the model on the Trainer's batches, which here are not dicts "
                                  "of named inputs: set gate_init instead")
            return {k: v for k, v in batch.items() if k not in labels}

        def forward(whole, named):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(args.bf16)):
                return whole(**named)
        self._choose_gate_start(loader, forward=forward, inputs=inputs, module=model)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        # one writer: under torch.distributed every rank holds the same pruner state
        if self.driver is not None and state.is_world_process_zero and os.path.isdir(folder):
            io.torch_save(os.path.join(folder, STATE_FILE), self.driver.state_dict())

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.driver.before_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.driver.after_optimizer_step()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._finish(model, self.module)
