"""Driving a :class:`~budgetprune.pruner.Pruner` from a trainer's hooks (Lightning, Hugging Face).

A trainer computes and backpropagates its own loss; its callbacks cannot add a term to it. The
gradient of (task loss + penalty) is the gradient of the loss plus the gradient of the penalty,
so :meth:`TrainerDriver.before_optimizer_step` backpropagates the penalty alone right before the
trainer's optimizer steps, once per optimizer step (after gradient accumulation).

The method's own parameters (gates) get their own Adam optimizer here, stepped right after the
trainer's, at a constant learning rate: the trainer's optimizer, its scheduler, its gradient
clipping and its saved state never see them (a scheduler that decays every group to zero would
freeze the gates before they reach the budget, and a resumed trainer would find an optimizer
state with a group it does not have).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import distributed, gate_start
from ..errors import ConfigError
from ..pruner import Pruner, check_count


def submodule(model: nn.Module, path: str | None) -> nn.Module:
    """``model`` itself (``path`` None or empty) or its submodule at the dotted ``path`` (the network
    to prune inside a wrapper that also computes the loss)."""
    if not path:
        return model
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ConfigError(f"the model has no submodule '{path}' to prune: name the network with module=...") from None


def replace_submodule(model: nn.Module, path: str | None, new: nn.Module) -> bool:
    """Put ``new`` at ``model.<path>``; False when there is no path (the model itself was pruned)."""
    if not path:
        return False
    parent, _, name = path.rpartition(".")
    setattr(submodule(model, parent), name, new)
    return True


class TrainerDriver:
    """One pruner and the optimizer of its gates, for a trainer's hooks."""

    def __init__(self, pruner: Pruner, gate_lr: float):
        if pruner.method.penalty_reads_forward:
            raise ConfigError(f"method '{pruner.method.name}' measures each step's forward pass in its penalty, "
                              "which a trainer callback cannot reach; use it in your own loop (budgetprune.Pruner)")
        self.pruner = pruner
        groups = pruner.method_parameters(gate_lr)
        self.optimizer = torch.optim.Adam(groups, lr=gate_lr) if groups else None

    def before_optimizer_step(self) -> None:
        """Accumulate the penalty's gradient into the parameters' gradients."""
        penalty = self.pruner.penalty()
        if penalty.requires_grad:
            penalty.backward()

    def after_optimizer_step(self) -> None:
        """The gates' update (skipped when a gradient is not finite, as a gradient scaler skips the
        trainer's), then the pruner's step."""
        if self.optimizer is not None:
            grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            if all(bool(torch.isfinite(g).all()) for g in grads):
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.pruner.step()

    def state_dict(self) -> dict:
        return {"pruner": self.pruner.state_dict(),
                "gate_optimizer": self.optimizer.state_dict() if self.optimizer is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        self.pruner.load_state_dict(state["pruner"])
        if self.optimizer is not None and state.get("gate_optimizer"):
            self.optimizer.load_state_dict(state["gate_optimizer"])


class PruningCallback:
    """What the Lightning and the Hugging Face callbacks share: their settings, the pruner and
    driver they start when training starts, and the result they keep when it ends."""

    def _settings(self, budget, example_inputs, module, total_steps, gate_lr, replace, gate_survival,
                  gate_start_images, gate_agree, pruner_options) -> None:
        if gate_survival is not None:
            gate_start.check_survival(gate_survival)
            if pruner_options.get("gate_init") is not None:
                raise ConfigError("gate_init fixes where the gates start and gate_survival chooses it: give one")
        check_count(gate_start_images, "gate_start_images", "training examples the gates' start is measured on")
        if gate_agree is not None and not callable(gate_agree):
            raise ConfigError("gate_agree must be a function (output, reference) -> per-example bool tensor")
        self.budget, self.example_inputs, self.module = budget, example_inputs, module
        self.total_steps, self.gate_lr, self.replace = total_steps, gate_lr, replace
        self.gate_survival, self.gate_start_images, self.gate_agree = gate_survival, gate_start_images, gate_agree
        self.pruner_options = pruner_options
        self.pruner: Pruner | None = None
        self.driver: TrainerDriver | None = None
        self.pruned_model: nn.Module | None = None
        self.report: dict | None = None

    def _start(self, network: nn.Module, example: torch.Tensor, total_steps: int) -> None:
        """A new pruner on ``network`` (budget over ``total_steps`` unless set) and its driver."""
        if self.pruned_model is not None:
            raise ConfigError(f"this {type(self).__name__} has already pruned its model; give a new one to "
                              "another training run")
        self.pruner = Pruner(network, example, self.budget, total_steps=self.total_steps or int(total_steps),
                             **self.pruner_options)
        self.driver = TrainerDriver(self.pruner, self.gate_lr)

    def _choose_gate_start(self, loader, *, forward=None, inputs=None, module: nn.Module | None = None) -> None:
        """With ``gate_survival``, on a fresh pruner: where the gates start, measured on the first
        ``gate_start_images`` examples of the trainer's training ``loader`` (under torch.distributed
        each rank its share of them) with :meth:`~budgetprune.pruner.Pruner.choose_gate_start`
        (``forward``, ``inputs`` and ``module`` as there; ``gate_agree`` its ``agree``). The
        loader is read with the random streams put back afterwards, so the run trains as it
        would have without the measurement."""
        if self.gate_survival is None or self.pruner.steps or self.pruner.gate_start is not None:
            return  # not asked for, or restored from a checkpoint (the gates come back where they were)
        if loader is None or isinstance(loader, (dict, list, tuple)):
            raise ConfigError("gate_survival measures the gates' start on the training batches of one DataLoader; "
                              "this trainer has " + ("none" if loader is None else "several") +
                              ": set gate_init instead")
        take = inputs or gate_start.batch_inputs
        wanted = math.ceil(self.gate_start_images / distributed.world_size())
        batches, seen = [], 0
        with torch.random.fork_rng(devices=[]):  # an iterator draws its shuffle's seed from torch's stream
            for batch in loader:
                x = take(batch)
                if inputs is None and not isinstance(x, torch.Tensor):
                    raise ConfigError("gate_survival runs the pruned network on the training batches' inputs, and "
                                      f"these batches hold {type(x).__name__}s, not tensors (or (inputs, targets) "
                                      "pairs): set gate_init instead")
                batches.append(batch)
                first = gate_start.first_tensor(x)
                seen += 1 if first is None or first.dim() == 0 else first.shape[0]
                if seen >= wanted:
                    break
        self.pruner.choose_gate_start(batches, survival=self.gate_survival, forward=forward, inputs=inputs,
                                      module=module, agree=self.gate_agree)

    def _finish(self, owner: nn.Module, path: str | None) -> None:
        """Finalize; the smaller network replaces ``owner.<path>`` (with ``replace``)."""
        self.pruned_model, self.report = self.pruner.finalize()
        if self.replace:
            replace_submodule(owner, path, self.pruned_model)
