"""Constrained L0 (seed 003, Gallego-Posada, Ramirez & Erraqabi).

``min f_obj  s.t.  E[‖z‖₀] / |θ| ≤ ε``, solved as the min-max game over the Lagrangian
``L = f_obj + λ (E[‖z‖₀]/|θ| − ε)`` with λ ≥ 0: the network and its Hard Concrete gates
descend on L, and λ ascends by projected gradient steps λ ← max(0, λ + η_λ · g)
(:func:`budgetprune.objectives.dual_ascent`). Here the constraint is each budget: the
expected cost of the budget's metric as a fraction of the full network's, at most the
budget's fraction (with ``--metric params`` that is the paper's E[‖z‖₀] ≤ ε·|θ|).
``targets="layer"`` puts one constraint (and one multiplier) on every layer instead: its
expected share of open gates at most ε_layer. With ``granularity="weight"`` the gates are on
single weights, as in the paper, ε_layer is the budget's fraction (a network keeping that share
of every layer's weights keeps that share of its weights), and the model-wise constraint is
E[‖θ‖₀]/|θ| ≤ ε with ε the non-zero-weight budget. With channel gates ε_layer is the share of
every layer's channels at which the network meets the budgets
(:func:`budgetprune.budget.uniform_share`): a layer keeping a share s of its channels keeps about
s² of its weights and FLOPs, so the budget's own fraction would aim far below the budget.
"""

from __future__ import annotations

import torch
from torch import nn

from ..budget import Budget, uniform_share
from ..gates import HardConcreteGate
from ..graph import ChannelGraph
from ..objectives import dual_ascent
from .base import register_method
from .gated import GatedMethod


@register_method("constrained-l0")
class ConstrainedL0(GatedMethod):
    """Lagrangian with one multiplier per constraint, updated after every step."""

    def __init__(self, dual_lr: float = 1e-2, targets: str = "model", gate_lr: float | None = None,
                 gate_init: float = 0.0, granularity: str = "channel"):
        super().__init__(gate_lr, granularity)
        if targets not in ("model", "layer"):
            raise ValueError("constrained-l0 targets must be 'model' or 'layer'")
        if not dual_lr > 0:
            raise ValueError("the dual learning rate must be positive")
        self.dual_lr = float(dual_lr)
        self.targets = targets
        self.gate_init = float(gate_init)
        self._violation: torch.Tensor | None = None

    def new_gate(self, size: int) -> nn.Module:
        return HardConcreteGate(size, self.gate_init, self.gate_init + 0.01)

    def setup(self, model: nn.Module, graph: ChannelGraph, budgets: list[Budget]) -> None:
        if self.targets == "model":
            models = [(b, self.cost_model(b.metric)) for b in budgets]
            self.constraints = [(b, cm, cm.full()) for b, cm in models]
            n = len(budgets)
        else:
            self.fraction = min(b.fraction for b in budgets) if self.per_weight else uniform_share(graph, budgets)
            n = len(self.gates)
        device = next(model.parameters()).device
        self.register_buffer("multipliers", torch.zeros(n, device=device))

    def violations(self) -> torch.Tensor:
        """g_i = expected cost_i / full_i − ε_i for every constraint (≤ 0 when it holds)."""
        probs = self.per_channel("prob_nonzero")
        if self.targets == "model":
            return torch.stack([cm.expected(probs) / full - b.fraction for b, cm, full in self.constraints])
        return torch.stack([p.mean() - self.fraction for p in probs.values()])

    def penalty(self, progress: float) -> torch.Tensor:
        """Σ_i λ_i g_i: the constraint part of the Lagrangian (λ held fixed for the primal step)."""
        g = self.violations()
        self._violation = g.detach()
        self._last.update({"max_violation": float(g.detach().max()), "max_multiplier": float(self.multipliers.max())})
        return (self.multipliers.detach() * g).sum()

    def after_step(self, progress: float) -> None:
        """Projected dual ascent on the multipliers, then the fatal-pruning guard."""
        if self._violation is not None:
            self.multipliers.copy_(dual_ascent(self.multipliers, self._violation, self.dual_lr))
            self._violation = None
        super().after_step(progress)
