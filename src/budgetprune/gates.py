"""Gate distributions: the learnable per-channel masks that training prunes with.

Hard Concrete (Louizos, Welling & Kingma 2018; BAR, seed 001, supplement 7):
a Binary Concrete variable stretched to (γ, ζ) and clamped to [0, 1], so that it puts
real probability mass on exactly 0 (channel off) and exactly 1 (channel on).
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: Hard Concrete constants used throughout BAR (seed 001, supplement 7.1): β, γ, ζ.
BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1


class HardConcreteGate(nn.Module):
    """One Hard Concrete gate per channel, parametrised by ``log_alpha`` (Φ in seed 001).

    * training: reparametrised sample (seed 001, supplement Eq. 4)
      ``z = clamp(σ((log u − log(1−u) + log α)/β)(ζ−γ)+γ, 0, 1)``, u ~ U(0, 1);
    * evaluation: the deterministic gate ``ẑ = clamp(σ(log α)(ζ−γ)+γ, 0, 1)``;
      a channel is pruned where ẑ = 0 (Eq. 4's ``E[z] > 0`` test);
    * ``prob_nonzero``: ``P(z > 0) = σ(log α − β log(−γ/ζ))`` (supplement Eq. 5).

    ``log_alpha`` starts near 0 (uniform in [init_low, init_high]): supplement 4 gives
    U(0, 0.01), which only makes sense read as log α, since with α itself that small every
    gate would start closed.
    """

    def __init__(self, num_channels: int, init_low: float = 0.0, init_high: float = 0.01,
                 beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA):
        super().__init__()
        if num_channels < 1:
            raise ValueError("a gate needs at least one channel")
        if not (gamma < 0.0 and zeta > 1.0 and beta > 0.0):
            raise ValueError("Hard Concrete needs gamma < 0 < 1 < zeta and beta > 0")
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        self.log_alpha = nn.Parameter(torch.empty(num_channels).uniform_(init_low, init_high))
        #: When set (a 0/1 or [0,1] tensor), the gate is frozen at these values.
        self.register_buffer("frozen", None, persistent=False)

    @property
    def num_channels(self) -> int:
        return self.log_alpha.numel()

    def _stretch(self, s: torch.Tensor) -> torch.Tensor:
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def sample(self, batch_size: int | None = None) -> torch.Tensor:
        """Reparametrised sample, differentiable w.r.t. ``log_alpha``; one per example if asked."""
        shape = (self.num_channels,) if batch_size is None else (batch_size, self.num_channels)
        eps = 1e-6
        u = torch.rand(shape, device=self.log_alpha.device, dtype=self.log_alpha.dtype)
        u = u.clamp(eps, 1.0 - eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return self._stretch(s)

    def deterministic(self) -> torch.Tensor:
        """ẑ = clamp(σ(log α)(ζ−γ)+γ, 0, 1): the gate used at evaluation and for pruning."""
        return self._stretch(torch.sigmoid(self.log_alpha))

    def prob_nonzero(self) -> torch.Tensor:
        """P(z > 0) = σ(log α − β log(−γ/ζ)) (seed 001, supplement Eq. 5)."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def keep_score(self) -> torch.Tensor:
        """How much each channel is worth keeping: P(z > 0)."""
        return self.prob_nonzero()

    def prob_zero(self) -> torch.Tensor:
        """P(z = 0) = 1 − P(z > 0)."""
        return 1.0 - self.prob_nonzero()

    def prob_one(self) -> torch.Tensor:
        """P(z = 1) = 1 − σ(β log((1−γ)/(ζ−1)) − log α): the stretched mass above 1."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log((1.0 - self.gamma) / (self.zeta - 1.0)))

    def open_threshold(self) -> float:
        """log α above which ẑ > 0: σ(log α) > −γ/(ζ − γ)."""
        p = -self.gamma / (self.zeta - self.gamma)
        return math.log(p / (1.0 - p))

    @torch.no_grad()
    def keep_at_least_one(self, margin: float = 1e-2) -> None:
        """Fatal-pruning guard (seed 001, section 4.1): clamp the highest log α so one channel stays open."""
        i = int(torch.argmax(self.log_alpha))
        floor = self.open_threshold() + margin
        if float(self.log_alpha[i]) < floor:
            self.log_alpha[i] = floor

    def keep_mask(self) -> torch.Tensor:
        """Channels whose deterministic gate is non-zero."""
        return self.deterministic() > 0

    def freeze(self, values: torch.Tensor) -> None:
        """Fix the gate to ``values`` (e.g. ẑ with pruned channels at 0) for fine-tuning."""
        self.frozen = values.detach().to(self.log_alpha.device, self.log_alpha.dtype).clone()
        self.log_alpha.requires_grad_(False)

    def forward(self, batch_size: int | None = None) -> torch.Tensor:
        """The gate values for one forward pass: frozen, a sample (training) or ẑ (eval)."""
        if self.frozen is not None:
            return self.frozen
        if self.training:
            return self.sample(batch_size)
        return self.deterministic()


class MaskGate(nn.Module):
    """A fixed 0/1 mask per channel, no parameters: the gate of the iterative baselines
    (random, weight magnitude, VQ, ID; seed 001 supplement 3.2), which prune by setting it."""

    def __init__(self, num_channels: int):
        super().__init__()
        if num_channels < 1:
            raise ValueError("a gate needs at least one channel")
        self.register_buffer("mask", torch.ones(num_channels))
        self.register_buffer("frozen", None, persistent=False)

    @property
    def num_channels(self) -> int:
        return self.mask.numel()

    def deterministic(self) -> torch.Tensor:
        return self.mask

    def keep_score(self) -> torch.Tensor:
        return self.mask

    def keep_mask(self) -> torch.Tensor:
        return self.mask > 0

    def keep_at_least_one(self) -> None:
        """Nothing to do: the budget projection keeps a protected group's last channel."""

    def set(self, keep: torch.Tensor) -> None:
        self.mask.copy_(keep.to(self.mask).float())

    def freeze(self, values: torch.Tensor) -> None:
        self.frozen = values.detach().to(self.mask.device, self.mask.dtype).clone()

    def forward(self, batch_size: int | None = None) -> torch.Tensor:
        return self.frozen if self.frozen is not None else self.mask
