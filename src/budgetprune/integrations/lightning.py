"""A PyTorch Lightning callback that prunes the trained module under a budget.

    trainer = L.Trainer(max_epochs=10, callbacks=[BudgetPruning("flops=0.25")])
    trainer.fit(module, loader)
    small = trainer.callbacks[0].pruned_model      # also set as module.<module> (replace=True)

The network pruned is ``module.<module>`` (default ``"model"`` when the LightningModule has
such an attribute, else the LightningModule itself); ``example_inputs`` defaults to the
LightningModule's ``example_input_array``. The budget moves over ``total_steps`` optimizer
steps (default: all of the fit, ``trainer.estimated_stepping_batches``). At the end of the fit
the pruner finalizes: :attr:`pruned_model` is the physically smaller network and :attr:`report`
says what was kept. The callback's state (the pruner's) is saved in Lightning checkpoints.
With ``gate_survival`` the gates' start is measured when training starts, on the first
``gate_start_images`` examples of the training DataLoader (batches of inputs or (inputs,
targets, ...)), each run through the pruned network under the fit's precision.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from ..errors import ConfigError
from .driver import PruningCallback, submodule


class BudgetPruning(PruningCallback, pl.Callback):
    """Prune ``module.<module>`` to ``budget`` while Lightning trains it (see the module docstring).

    Other keyword options are the :class:`~budgetprune.pruner.Pruner`'s (``method``, ``metric``,
    ``lam``, ``gate_init``, ``method_options``, ...); ``gate_lr`` is the learning rate of the
    method's gates (their own Adam, constant; 1e-2); ``gate_survival`` (instead of ``gate_init``,
    for a trained network) starts the Hard Concrete gates at the lowest log α whose noise keeps
    the network's answer on that fraction of ``gate_start_images`` training examples
    (:meth:`~budgetprune.pruner.Pruner.choose_gate_start`; ``gate_agree(output, reference)`` gives
    a per-example bool tensor where the output is not (batch, classes) scores). Mixed precision:
    ``bf16-mixed`` works;
    ``16-mixed`` (a gradient scaler) is refused, since the gates' gradients would stay scaled."""

    def __init__(self, budget, *, example_inputs: torch.Tensor | None = None, module: str | None = None,
                 total_steps: int | None = None, gate_lr: float = 1e-2, replace: bool = True,
                 gate_survival: float | None = None, gate_start_images: int = 1024, gate_agree=None,
                 **pruner_options):
        super().__init__()
        self._settings(budget, example_inputs, module, total_steps, gate_lr, replace, gate_survival,
                       gate_start_images, gate_agree, pruner_options)
        self._restored: dict | None = None
        self._counted = 0  # optimizer steps the pruner has seen

    @property
    def state_key(self) -> str:
        """The key of the pruner's state in Lightning checkpoints (the same for subclasses)."""
        return "BudgetPruning"

    def _path(self, pl_module) -> str | None:
        if self.module is not None:
            return self.module
        return "model" if isinstance(getattr(pl_module, "model", None), torch.nn.Module) else None

    def on_fit_start(self, trainer, pl_module) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ConfigError("BudgetPruning does not support precision='16-mixed' (a gradient scaler): use "
                              "'bf16-mixed' or 32-bit")
        example = self.example_inputs if self.example_inputs is not None else pl_module.example_input_array
        if not isinstance(example, torch.Tensor):
            raise ConfigError("BudgetPruning needs one batch of inputs: pass example_inputs=... or set "
                              "example_input_array on the LightningModule")
        self._start(submodule(pl_module, self._path(pl_module)), example.to(pl_module.device),
                    trainer.estimated_stepping_batches)
        if self._restored is not None:
            self.driver.load_state_dict(self._restored)
            self._counted = self._restored["counted"]

    def on_train_start(self, trainer, pl_module) -> None:  # the training DataLoader exists from here on
        def forward(network, x):  # as the training step runs it: its precision's inputs and autocast
            with trainer.precision_plugin.train_step_context():
                return network(trainer.precision_plugin.convert_input(x))
        self._choose_gate_start(trainer.train_dataloader, forward=forward)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.driver.before_optimizer_step()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # after the step
        while self._counted < trainer.global_step:  # one pruner step per optimizer step taken
            self.driver.after_optimizer_step()
            self._counted += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # the same on every rank (the pruner is kept in sync); sync_dist says so to Lightning
        pl_module.log_dict({f"budgetprune/{k}": float(v) for k, v in self.pruner.status().items()}, sync_dist=True)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._finish(pl_module, self._path(pl_module))

    def state_dict(self) -> dict:
        return {} if self.driver is None else {**self.driver.state_dict(), "counted": self._counted}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict or None
