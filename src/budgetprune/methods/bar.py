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

from ..attach import GateHooks
from ..budget import Budget
from ..gates import HardConcreteGate
from ..graph import ChannelGraph
from ..objectives import BudgetSchedule, barrier
from ..resources import CostModel
from .base import Method, register_method


def _key(gid: str) -> str:
    """ModuleDict keys may not contain dots."""
    return gid.replace(".", "__")


@register_method("bar")
class BAR(Method):
    """Budget-aware regularisation with Hard Concrete gates.

    ``lam`` is λ of the final loss (seed 001, section 3.5; 1e-5 there, for the volume
    metric). For other metrics, L_S is rescaled by V_F / cost_F so the same λ weighs the
    same. ``schedule`` is ``sigmoid`` (default, d = 10), ``linear`` or ``exponential``.
    """

    def __init__(self, lam: float = 1e-5, schedule: str = "sigmoid", hardness: float | None = None,
                 gate_lr: float | None = None):
        super().__init__()
        self.lam = lam
        self.schedule_kind = schedule
        self.hardness = hardness
        self.gate_lr = gate_lr
        self.gates = nn.ModuleDict()
        self._hooks: GateHooks | None = None
        self._last: dict[str, float] = {}

    def attach(self, model: nn.Module, graph: ChannelGraph, budgets: list[Budget]) -> None:
        self.graph = graph
        device = next(model.parameters()).device
        self.gid_of = {}
        for gid, group in graph.groups.items():
            self.gates[_key(gid)] = HardConcreteGate(group.channels).to(device)
            self.gid_of[_key(gid)] = gid
        volume_full = CostModel(graph, "volume").full()
        self.terms = []
        for budget in budgets:
            cm = CostModel(graph, budget.metric)
            full = cm.full()
            schedule = BudgetSchedule(full, budget.fraction * full, self.schedule_kind, self.hardness)
            self.terms.append((budget, cm, schedule, volume_full / full))
        self._hooks = GateHooks(model, graph, {gid: self.gates[_key(gid)] for gid in graph.groups})

    def detach(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    def _by_group(self, fn) -> dict[str, torch.Tensor]:
        return {self.gid_of[k]: fn(g) for k, g in self.gates.items()}

    def penalty(self, progress: float) -> torch.Tensor:
        """λ Σ_metrics L_S · f(V, a, b) (seed 001, Eq. 6 and the final loss of section 3.5)."""
        probs = self._by_group(lambda g: g.prob_nonzero())
        with torch.no_grad():
            masks = self._by_group(lambda g: g.keep_mask())
        total = 0.0
        for budget, cm, schedule, scale in self.terms:
            V = cm.hard(masks)
            b = schedule.b(progress)
            f = barrier(V, schedule.a, b)
            if f > 0.0:
                total = total + self.lam * scale * cm.expected(probs) * f
            tag = "" if len(self.terms) == 1 else f"_{budget.metric}"
            self._last.update({f"V{tag}": V, f"b{tag}": b, f"f{tag}": f})
        if not torch.is_tensor(total):
            total = self.gates[next(iter(self.gates))].log_alpha.sum() * 0.0
        return total

    def after_step(self, progress: float) -> None:
        """Keep ≥ 1 open channel in every protected group (the fatal-pruning guard, section 4.1).

        Groups with ``min_keep`` 0 (inside a residual branch) may close completely: the
        block then disappears (automatic depth determination)."""
        for key, gate in self.gates.items():
            if gate.frozen is None and self.graph.groups[self.gid_of[key]].min_keep > 0:
                gate.keep_at_least_one()

    def scores(self) -> dict[str, torch.Tensor]:
        return self._by_group(lambda g: g.prob_nonzero().detach())

    def keep_masks(self) -> dict[str, torch.Tensor]:
        return self._by_group(lambda g: g.keep_mask().detach())

    def gate_values(self) -> dict[str, torch.Tensor]:
        return self._by_group(lambda g: g.deterministic().detach())

    def freeze(self, masks: dict[str, torch.Tensor], values: dict[str, torch.Tensor] | None = None) -> None:
        """Gates become ẑ (or ``values``) on kept channels and 0 on pruned ones."""
        if values is None:
            det = self.gate_values()
            values = {g: det[g] * masks[g].to(det[g].device).float() for g in det}
        for key, gate in self.gates.items():
            gate.freeze(values[self.gid_of[key]])

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [g.log_alpha for g in self.gates.values()], "lr": self.gate_lr or lr,
                 "weight_decay": 0.0, "name": "gates"}]

    def status(self) -> dict[str, float]:
        return dict(self._last)
