"""BAR: Budget-Aware Regularization (seed 001, Lemaire et al., CVPR 2019).

Hard Concrete gates on every prunable channel group; the sparsity loss is the expected
cost L_S (volume: Σ_l A_l Σ_i P(z_l,i > 0), section 3.3) scaled by the barrier
f(V, a, b) of the *hard* cost V (Eq. 5, 6), while the budget b moves from the full cost
V_F to the target B along the sigmoidal schedule T (Eq. 7, supplement Eq. 1). Several
budgets (one per metric) give one barrier term each. The data loss (knowledge
distillation, section 3.5) is the engine's.
"""

from __future__ import annotations

import torch
from torch import nn

from ..budget import Budget
from ..gates import HardConcreteGate
from ..graph import ChannelGraph
from ..objectives import BARRIER_KNEE, BudgetSchedule, barrier, check_knee, check_schedule_end
from ..resources import CostModel
from .base import register_method
from .gated import GatedMethod


@register_method("bar")
class BAR(GatedMethod):
    """Budget-aware regularisation with Hard Concrete gates.

    ``lam`` is λ of the final loss (seed 001, section 3.5; 1e-5 there, for the volume
    metric). For other metrics, L_S is rescaled by V_F / cost_F so the same λ weighs the
    same. ``schedule`` is ``sigmoid`` (default, d = 10), ``linear`` or ``exponential``; the budget
    reaches its target after ``schedule_end`` of the pruning phase (1: at its end, the paper's).
    ``gate_init`` is the initial log α (see :class:`~budgetprune.gates.HardConcreteGate`).
    ``knee`` is where the barrier leaves the paper's f for its tangent (:func:`~budgetprune.objectives.barrier`;
    closer to 1 is a harder wall).
    """

    def __init__(self, lam: float = 1e-5, schedule: str = "sigmoid", hardness: float | None = None,
                 gate_lr: float | None = None, gate_init: float = 0.0, schedule_end: float = 1.0,
                 knee: float = BARRIER_KNEE):
        super().__init__(gate_lr)
        self.lam = lam
        self.schedule_kind = schedule
        self.hardness = hardness
        self.schedule_end = check_schedule_end(schedule_end)
        self.gate_init = float(gate_init)
        self.knee = check_knee(knee)

    def new_gate(self, size: int) -> nn.Module:
        return HardConcreteGate(size, self.gate_init, self.gate_init + 0.01)

    def setup(self, model: nn.Module, graph: ChannelGraph, budgets: list[Budget]) -> None:
        volume_full = CostModel(graph, "volume").full()
        self.terms = []
        for budget in budgets:
            cm = CostModel(graph, budget.metric)
            full = cm.full()
            schedule = BudgetSchedule(full, budget.fraction * full, self.schedule_kind, self.hardness,
                                      self.schedule_end)
            self.terms.append((budget, cm, schedule, volume_full / full))

    def penalty(self, progress: float) -> torch.Tensor:
        """λ Σ_metrics L_S · f(V, a, b) (seed 001, Eq. 6 and the final loss of section 3.5)."""
        probs, joined = self.per_channel_joined("prob_nonzero")
        masks = self.keep_masks()
        total = None  # the terms alone: a differentiable zero (an op per gate) only when every term is off
        for budget, cm, schedule, scale in self.terms:
            V = cm.hard(masks)
            b = schedule.b(progress)
            f = barrier(V, schedule.a, b, self.knee)
            if f > 0.0:
                term = self.lam * scale * cm.expected(probs, joined=joined) * f
                total = term if total is None else total + term
            tag = "" if len(self.terms) == 1 else f"_{budget.metric}"
            self._last.update({f"V{tag}": V, f"b{tag}": b, f"f{tag}": f})
        return self.zero() if total is None else total
