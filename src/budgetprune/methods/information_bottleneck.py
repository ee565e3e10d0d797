"""Information Bottleneck pruning (Dai, Zhu & Wipf, ICML 2018; "IB" in seed 001 section 5.1).

Each channel is multiplied by z = μ + ε·σ (:class:`budgetprune.gates.GaussianGate`) and the
loss adds ``λ · Σ_l A_l Σ_i log(1 + μ_l,i² / σ_l,i²)``: the prior term, each layer weighted
by its feature-map area A_l so that it penalises activation volume as BAR's L_S does (seed
001 writes it "log(1 − μ²/σ²)", a sign typo: the argument must stay positive). Channels
whose μ²/σ² falls below 1 are pruned. Like L0, IB has no budget in its objective: the
engine's final projection meets it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..aiming import AIM_GAIN, AIM_RATE, BudgetAim
from ..budget import Budget
from ..gates import GaussianGate
from ..graph import ChannelGraph
from .base import register_method
from .gated import GatedMethod


@register_method("ib")
class InformationBottleneck(GatedMethod):
    """λ · Σ_l A_l Σ_i log(1 + μ²/σ²) with Gaussian channel gates; ``lam`` 1e-5 by default."""

    def __init__(self, lam: float = 1e-5, threshold: float = 1.0, gate_lr: float | None = None,
                 aim: str = "budget", aim_rate: float = AIM_RATE, aim_gain: float = AIM_GAIN,
                 schedule: str = "sigmoid", hardness: float | None = None, schedule_end: float = 1.0):
        super().__init__(gate_lr, aim=BudgetAim.create(
            aim, aim_rate, aim_gain, schedule, hardness, schedule_end))
        if lam < 0 or not threshold > 0:
            raise ValueError("ib needs lam ≥ 0 and threshold > 0")
        self.lam = float(lam)
        self.threshold = float(threshold)

    def new_gate(self, size: int) -> nn.Module:
        return GaussianGate(size, self.threshold)

    def setup(self, model: nn.Module, graph: ChannelGraph, budgets: list[Budget]) -> None:
        self.areas = {gid: float(g.area) for gid, g in graph.groups.items()}

    def prior(self) -> torch.Tensor:
        """Σ_l A_l Σ_i log(1 + μ²/σ²)."""
        return sum(self.areas[gid] * kl.sum() for gid, kl in self.by_group(lambda g: g.kl()).items())

    def penalty(self, progress: float) -> torch.Tensor:
        prior = self.prior()
        self._last["prior"] = float(prior.detach())
        return self.weight() * prior
