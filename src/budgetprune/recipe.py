"""The training recipe of a stage: which optimiser, its weight decay, the learning-rate schedule
and label smoothing. One place builds the optimiser (:func:`make_optimizer`) and one place
computes the learning rate of a step (:func:`lr_factor`), a pure function of the stage's global
step, so a resumed run needs no scheduler state to continue exactly.

The schedule scales the groups named in ``base`` (the network's ``weights``); a method's own
groups (BAR's gates) keep their learning rate: their movement is driven by the budget schedule
T(t, d) of the prune stage, which tightens the barrier until its last step, and a learning rate
decaying to 0 there would freeze the gates before the budget is reached.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")

#: One-cycle's start and end rates, as fractions of the peak (PyTorch's OneCycleLR defaults:
#: div_factor 25, final_div_factor 1e4) and its default warm-up share (pct_start 0.3).
ONECYCLE_DIV, ONECYCLE_FINAL_DIV, ONECYCLE_WARMUP = 25.0, 1e4, 0.3


@dataclass(frozen=True)
class Recipe:
    """How one stage trains. ``weight_decay`` is applied as ``optimizer`` defines it: Adam and SGD
    add ``weight_decay · w`` to the gradient (coupled L2; Adam then rescales it per weight), AdamW
    shrinks each weight by ``lr · weight_decay · w`` apart from the gradient (decoupled;
    Loshchilov & Hutter, ICLR 2019)."""

    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0

    def check(self) -> None:
        """One-line :class:`ConfigError` naming the option to fix."""
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown --optimizer '{self.optimizer}': choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown --lr-schedule '{self.schedule}': choose one of {', '.join(SCHEDULES)}")
        if not self.lr > 0:
            raise ConfigError(f"--lr {self.lr:g} must be positive")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay {self.weight_decay:g} must be 0 or more")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"--momentum {self.momentum:g} must lie in [0, 1)")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ConfigError("--nesterov needs --optimizer sgd and a --momentum above 0")
        if self.warmup_epochs < 0:
            raise ConfigError(f"--warmup-epochs {self.warmup_epochs:g} must be 0 or more")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"--label-smoothing {self.label_smoothing:g} must lie in [0, 1)")


#: Seed 001's recipe (section 5.1): Adam at lr 1e-3, weight decay 5e-4, constant rate.
PAPER = Recipe()


def make_optimizer(groups, recipe: Recipe) -> torch.optim.Optimizer:
    """The optimiser of ``recipe`` over ``groups``: parameter groups (each with its ``name``, e.g.
    :meth:`~budgetprune.pruner.Pruner.parameters`' weights and gates, whose own ``lr`` and
    ``weight_decay`` 0 are kept) or a plain list of parameters (one group named ``weights``)."""
    groups = list(groups)
    if not groups or not isinstance(groups[0], dict):
        groups = [{"params": [p for p in groups if p.requires_grad], "name": "weights"}]
    wd = recipe.weight_decay
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
                               weight_decay=wd)
    kind = torch.optim.AdamW if recipe.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, lr=recipe.lr, weight_decay=wd)


def lr_factor(recipe: Recipe, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The learning rate of global step ``step`` (0-based) of a stage of ``total_steps``, as a
    fraction of the base rate.

    - ``constant``: 1 (after the warm-up).
    - ``cosine``: (1 + cos(π t)) / 2 with t = (step − W) / (total − W) ∈ [0, 1) (SGDR without
      restarts, η_min = 0: Loshchilov & Hutter, ICLR 2017, Eq. 5).
    - warm-up of ``constant`` and ``cosine``: (step + 1) / W for the first W = ``warmup_steps``
      steps (linear, Goyal et al. 2017, section 2.2; the first step is not at rate 0).
    - ``onecycle``: PyTorch's OneCycleLR (Smith & Topin 2019) with cosine annealing: from 1/25 up
      to 1 over the first W steps (W = 30 % of the stage when ``warmup_steps`` is 0), then down
      to 1/(25 · 10⁴) at the last step; at step s of a phase from a to b ending at step e:
      b + (a − b)(1 + cos(π (s − s₀)/(e − s₀)))/2.
    """
    total = max(int(total_steps), 1)
    step = min(max(int(step), 0), total - 1)
    if recipe.schedule == "onecycle":
        return _onecycle(step, total, warmup_steps)
    w = min(int(warmup_steps), total)
    if step < w:
        return (step + 1) / w
    if recipe.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(total - w, 1)))
    return 1.0


def _onecycle(step: int, total: int, warmup_steps: int) -> float:
    peak = float(warmup_steps) - 1 if warmup_steps > 0 else ONECYCLE_WARMUP * total - 1
    start, end = 1.0 / ONECYCLE_DIV, 1.0 / (ONECYCLE_DIV * ONECYCLE_FINAL_DIV)

    def anneal(a: float, b: float, pct: float) -> float:
        return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)
    if step <= peak:
        return anneal(start, 1.0, step / peak) if peak > 0 else 1.0
    return anneal(1.0, end, (step - peak) / max(total - 1 - peak, 1e-12))


def warmup_steps(recipe: Recipe, steps_per_epoch: int) -> int:
    """``warmup_epochs`` (fractional allowed) in steps."""
    return int(round(recipe.warmup_epochs * steps_per_epoch))


def set_lr(optimizer: torch.optim.Optimizer, factor: float, base: dict[str, float]) -> None:
    """Set every group named in ``base`` to ``factor`` × its base rate; other groups (a method's
    gates) keep theirs."""
    for g in optimizer.param_groups:
        name = g.get("name", "weights")
        if name in base:
            g["lr"] = base[name] * factor


def stage_schedule(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int, epochs: int,
                   lowlr_epochs: int = 0, lowlr_factor: float = 1.0) -> Callable[[int], None]:
    """A ``before_step(step)`` for :func:`~budgetprune.engine.train_epoch` that sets the weights'
    learning rate of the stage's global ``step``. The stage has ``epochs`` + ``lowlr_epochs``
    epochs; with ``constant`` the last ``lowlr_epochs`` run at ``lowlr_factor`` × the rate (seed
    001's fine-tune tail); ``cosine`` and ``onecycle`` span the whole stage and already anneal
    its tail, so ``lowlr_factor`` does not apply to them."""
    total = (epochs + lowlr_epochs) * steps_per_epoch
    warm = warmup_steps(recipe, steps_per_epoch)
    tail_from = epochs * steps_per_epoch
    base = {"weights": recipe.lr}

    def before_step(step: int) -> None:
        factor = lr_factor(recipe, step, total, warm)
        if recipe.schedule == "constant" and step >= tail_from:
            factor *= lowlr_factor
        set_lr(optimizer, factor, base)
    return before_step
