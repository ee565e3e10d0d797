"""Continuous Sparsification (Savarese, Silva & Maire, NeurIPS 2020; seed 004).

Each channel is multiplied by the deterministic mask σ(β·s) (:class:`budgetprune.gates.SigmoidGate`)
and the loss adds ``λ · ‖σ(β·s)‖₁``, the continuous stand-in for λ·‖m‖₀. The temperature β
rises from 1 to ``beta_max`` (200 by default) over the prune phase, geometrically
(β = β_max^progress: the paper multiplies β by the same factor every epoch; we do it every
step), so the mask hardens into the Heaviside step H(s) and the kept channels are those
with s > 0. Like L0, CS has no budget in its objective: the engine's final projection meets it.
The paper's ticket search (several rounds, rewinding the weights to an early iteration) is not
implemented yet: this is one round.
"""

from __future__ import annotations

import torch
from torch import nn

from ..gates import SigmoidGate
from ..graph import ChannelGroup
from .base import register_method
from .gated import GatedMethod


@register_method("cs")
class ContinuousSparsification(GatedMethod):
    """λ · Σ σ(β·s) with β annealed to ``beta_max``; ``s0`` is the initial s (mask σ(s0) at β = 1)."""

    def __init__(self, lam: float = 1e-3, beta_max: float = 200.0, s0: float = 0.0, gate_lr: float | None = None):
        super().__init__(gate_lr)
        if lam < 0 or not beta_max >= 1.0:
            raise ValueError("cs needs lam ≥ 0 and beta_max ≥ 1")
        self.lam = float(lam)
        self.beta_max = float(beta_max)
        self.s0 = float(s0)

    def make_gate(self, group: ChannelGroup) -> nn.Module:
        return SigmoidGate(group.channels, self.s0)

    def beta(self, progress: float) -> float:
        """β = β_max^progress: 1 at the start, β_max at the end."""
        return self.beta_max ** min(max(progress, 0.0), 1.0)

    def penalty(self, progress: float) -> torch.Tensor:
        beta = self.beta(progress)
        total = self.zero()
        for gate in self.gates.values():
            gate.beta = torch.full_like(gate.beta, beta)  # a new tensor: this step's forward still holds the old one
            total = total + gate.soft().sum()
        self._last.update({"beta": beta, "mask_l1": float(total.detach())})
        return self.lam * total
