"""Continuous Sparsification (Savarese, Silva & Maire, NeurIPS 2020; seed 004).

Each unit (a channel, or with ``granularity="weight"`` a single weight, the paper's form) is
multiplied by the deterministic mask σ(β·s)/σ(s₀) (:class:`budgetprune.gates.SigmoidGate`;
the 1/σ(s₀) makes the mask start at 1, as in the authors' code) and the loss adds
``λ · ‖σ(β·s)‖₁``, the continuous stand-in for λ·‖m‖₀ (seed 004, the L_β(w, s) equation).
Within a round the temperature β rises from 1 to ``beta_max`` (200 by default)
geometrically (β = β_max^t over the round; the paper multiplies β by the same factor every
epoch, we do it every step), so the mask hardens into the Heaviside step H(s) and the
kept units are those with s > 0.

The ticket search (``rounds`` > 1) follows the paper's algorithm: the prune phase is split
into ``rounds`` equal rounds; at the end of every round but the last, the mask parameters
are reset softly, ``s ← min(β_max · s, s₀)`` (removed units stay far below 0, kept ones
restart at s₀), β restarts at 1, and the network's parameters are rewound to their values
at ``rewind`` (a fraction of the first round; 0: where training started). At the end of
the last round the weights are rewound once more, so the ticket H(s) ⊙ w_k is what the
hard prune compacts and fine-tuning trains (``rewind_ticket``; with one round the ticket is
rewound only when a ``rewind`` point > 0 is given).

Like L0, CS has no budget in its objective: the engine's final projection meets it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..aiming import AIM_GAIN, AIM_RATE, BudgetAim
from ..budget import Budget
from ..gates import SigmoidGate
from ..graph import ChannelGraph
from .base import register_method
from .gated import GatedMethod


_TICKS = 2 ** 52


@register_method("cs")
class ContinuousSparsification(GatedMethod):
    """λ · Σ σ(β·s) with β annealed to ``beta_max`` in each of ``rounds`` rounds; ``s0`` is
    the initial s. λ defaults to 1e-3 per channel and 1e-5 per weight.

    ``aim`` is ``fixed`` by default: aimed at the budget (``aim="budget"``) the cost follows b
    closely (C/b 1.02–1.04 through the phase), but it does so by holding the marginal channels at
    s ≈ 0, where the trained mask σ(β·s) differs most from the step H(s) the hard prune keeps, and
    the network lost 5 points at the prune (LeNet-5 on Fashion-MNIST at 8× volume: 75.2 % aimed,
    benchmarks/results/methods_aim)."""

    def __init__(self, lam: float | None = None, beta_max: float = 200.0, s0: float = 0.0, rounds: int = 1,
                 rewind: float = 0.0, rewind_ticket: bool = True, gate_lr: float | None = None,
                 granularity: str = "channel",
                 aim: str = "fixed", aim_rate: float = AIM_RATE, aim_gain: float = AIM_GAIN,
                 schedule: str = "sigmoid", hardness: float | None = None, schedule_end: float = 1.0):
        super().__init__(gate_lr, granularity, BudgetAim.create(
            aim, aim_rate, aim_gain, schedule, hardness, schedule_end))
        if lam is None:  # per weight the data gradient on each s is far smaller than on a whole channel's
            lam = 1e-5 if granularity == "weight" else 1e-3
        if lam < 0 or not beta_max >= 1.0:
            raise ValueError("cs needs lam ≥ 0 and beta_max ≥ 1")
        if rounds < 1 or not 0.0 <= rewind < 1.0:
            raise ValueError("cs needs rounds ≥ 1 and 0 ≤ rewind < 1 (a fraction of the first round)")
        self.lam = float(lam)
        self.beta_max = float(beta_max)
        self.s0 = float(s0)
        self.rounds = int(rounds)
        self.rewind = float(rewind)
        self.rewind_ticket = bool(rewind_ticket)
        # the ticket search's position, saved with the method so a resumed run continues it
        self.register_buffer("round", torch.zeros((), dtype=torch.long))
        # the last step's progress in units of 2⁻⁵² (an integer: exact, and on every device)
        self.register_buffer("last_tick", torch.full((), -1, dtype=torch.long))
        self.register_buffer("snapshot_taken", torch.zeros((), dtype=torch.bool))

    def new_gate(self, size: int) -> nn.Module:
        return SigmoidGate(size, self.s0)

    def setup(self, model: nn.Module, graph: ChannelGraph, budgets: list[Budget]) -> None:
        self._params = [p for p in model.parameters()]
        self.snapshot = nn.ParameterList()  # not trained: a copy of the weights to rewind to
        if self.rounds > 1 or self.rewind > 0:
            for p in self._params:
                self.snapshot.append(nn.Parameter(p.detach().clone(), requires_grad=False))
            if self.rewind == 0:
                self.snapshot_taken.fill_(True)

    # -- schedule --------------------------------------------------------------------------
    def round_of(self, progress: float) -> tuple[int, float]:
        """(round index, position t ∈ [0, 1) within it) at ``progress`` of the prune phase."""
        x = min(max(progress, 0.0), 1.0) * self.rounds
        r = min(int(math.floor(x + 1e-9)), self.rounds - 1)  # k/T · R lands a hair under a boundary in floats
        return r, max(x - r, 0.0)

    def beta(self, progress: float) -> float:
        """β = β_max^t, t the position within the current round: 1 at a round's start, β_max at its end."""
        return self.beta_max ** self.round_of(progress)[1]

    def penalty(self, progress: float) -> torch.Tensor:
        beta = self.beta(progress)
        self._set_beta(progress)  # the forward pass of this step already used it (set by after_step)
        total = self.zero()
        for gate in self.gates.values():
            total = total + gate.soft().sum()
        self._last.update({"beta": beta, "mask_l1": float(total.detach()), "round": float(self.round) + 1})
        return self.weight() * total

    # -- ticket search ---------------------------------------------------------------------
    @torch.no_grad()
    def rewind_weights(self) -> None:
        """The network's parameters ← their snapshot (w_k)."""
        for p, saved in zip(self._params, self.snapshot):
            p.copy_(saved)

    @torch.no_grad()
    def reset_masks(self) -> None:
        """s ← min(β_max · s, s₀) (the authors' soft reset between rounds)."""
        for gate in self.gates.values():
            gate.s.copy_(torch.clamp(self.beta_max * gate.s, max=self.s0))

    @staticmethod
    def next_progress(last: float, progress: float) -> float | None:
        """The progress of the step after this one: steps are k/T apart, so T and k are whole
        numbers recovered from two consecutive values (None before the second step)."""
        if last < 0 or progress <= last:
            return None
        total = round(1.0 / (progress - last))
        return (round(progress * total) + 1) / total

    def _set_beta(self, progress: float) -> None:
        beta = self.beta(progress)
        for gate in self.gates.values():
            gate.beta = torch.full_like(gate.beta, beta)  # a new tensor: a forward under way holds the old one

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """Take the rewind snapshot, end a round when the next step starts a new one, and set β
        for the next step's forward pass."""
        tick = int(self.last_tick)
        following = self.next_progress(tick / _TICKS if tick >= 0 else -1.0, progress)
        self.last_tick.fill_(round(progress * _TICKS))
        if len(self.snapshot) and not bool(self.snapshot_taken) and progress >= self.rewind / self.rounds - 1e-9:
            for p, saved in zip(self._params, self.snapshot):
                saved.copy_(p)
            self.snapshot_taken.fill_(True)
        if following is not None and len(self.snapshot):
            if following >= 1.0 - 1e-9:
                if self.rewind_ticket:
                    self.rewind_weights()
            elif self.round_of(following)[0] > int(self.round):
                self.reset_masks()
                self.rewind_weights()
                self.round += 1
        if following is not None:
            self._set_beta(min(following, 1.0))
        super().after_step(progress)
