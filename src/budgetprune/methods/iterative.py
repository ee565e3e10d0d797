"""The iterative scheme of seed 001's baselines (supplement 3.2): train, then repeatedly
prune half of the remaining cost and retrain.

The prune phase is cut into n + 1 equal parts, n = ⌈log₂(1 / budget fraction)⌉: the first
trains the unpruned network, and at the start of part k (k = 1..n) the network is pruned to
max(2⁻ᵏ, fraction) of its full cost, then retrained until the next cut (with ``steps`` = n
given, cut k prunes to fraction^(k/n) instead). With ``schedule_end`` < 1 the n + 1 parts share
that first fraction of the phase and the rest retrains the pruned network. As in seed 001 (section 5.1), a cut scales
the width of every layer by one factor (:func:`budgetprune.budget.uniform_widths`) and the
method's channel scores decide which channels of a layer stay; ``allocation="global"``
uses the shared projection (:func:`budgetprune.budget.enforce_budget`: lowest score per
unit of cost first) instead. With the uniform allocation each layer ranks its channels by its own
scores (``streams="apart"``, the default: a residual stream keeps every channel one of its
writers keeps, the mixed-connectivity block's scattered channels); with ``streams="joint"`` the
layers that write one stream rank its channels by their summed scores and keep the same ones,
so a cut thins the stream too (:func:`budgetprune.budget.uniform_widths` says what that did to
MaxViT-T's speed; VQ and ID choose their own channels, so for them it changes only the widths).
The engine's final projection then meets every budget exactly. Channels are removed through
fixed 0/1 gates (:class:`budgetprune.gates.MaskGate`); a method that changes weights when it
prunes (VQ, ID) overrides :meth:`IterativePruning.on_cut`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..budget import Budget, enforce_budget, uniform_widths
from ..gates import MaskGate
from ..graph import ChannelGraph, ChannelGroup
from ..objectives import check_schedule_end
from .gated import GatedMethod


class IterativePruning(GatedMethod):
    """Subclasses give :meth:`channel_scores` (higher = keep)."""

    guard_after_step = False

    def __init__(self, steps: int | None = None, allocation: str = "uniform", schedule_end: float = 1.0,
                 streams: str = "apart"):
        super().__init__(gate_lr=None)
        self.schedule_end = check_schedule_end(schedule_end)
        if steps is not None and steps < 1:
            raise ValueError("the iterative scheme needs at least one pruning step")
        if allocation not in ("uniform", "global"):
            raise ValueError("allocation must be 'uniform' (every layer scaled alike) or 'global'")
        if streams not in ("joint", "apart"):
            raise ValueError("streams must be 'joint' (a residual stream's writers keep the same channels) or "
                             "'apart' (each layer its own)")
        if streams == "joint" and allocation != "uniform":
            raise ValueError("streams='joint' ranks the channels of the uniform allocation; with "
                             "allocation='global' the shared projection chooses each removal by what it saves")
        self.steps = steps
        self.allocation = allocation
        self.streams = streams

    def make_gate(self, group: ChannelGroup) -> nn.Module:
        return MaskGate(group.channels)

    def setup(self, model: nn.Module, graph: ChannelGraph, budgets: list[Budget]) -> None:
        self.modules_of = dict(model.named_modules())
        self.budgets = budgets
        if self.steps:
            self.fractions = [[b.fraction ** (k / self.steps) for b in budgets] for k in range(1, self.steps + 1)]
        else:
            n = max(1, math.ceil(math.log2(max(b.factor for b in budgets)) - 1e-9))
            self.fractions = [[max(2.0 ** -k, b.fraction) for b in budgets] for k in range(1, n + 1)]
        self.register_buffer("cuts_done", torch.zeros((), dtype=torch.long))

    def cut_progress(self, k: int) -> float:
        """Where (fraction of the prune phase) cut k (0-based) happens: the cuts and the retraining
        between them share the first ``schedule_end`` of the phase, the rest retrains at the budget."""
        return (k + 1) / (len(self.fractions) + 1) * self.schedule_end

    def channel_scores(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def penalty(self, progress: float) -> torch.Tensor:
        return self.zero()

    def after_step(self, progress: float) -> None:
        while int(self.cuts_done) < len(self.fractions) and progress >= self.cut_progress(int(self.cuts_done)):
            self.cut(int(self.cuts_done))

    @torch.no_grad()
    def cut(self, k: int) -> None:
        """Prune to the k-th fraction of every budget (only channels still kept can go)."""
        before = {gid: m.cpu() for gid, m in self.keep_masks().items()}
        targets = [Budget(b.metric, f) for b, f in zip(self.budgets, self.fractions[k])]
        if self.allocation == "uniform":
            projected = uniform_widths(self.graph, before, self.channel_scores(), targets,
                                       joint_streams=self.streams == "joint")
        else:
            projected = enforce_budget(self.graph, before, self.channel_scores(), targets)
        after = self.on_cut(before, projected)
        for gid, keep in after.items():
            self.gate(gid).set(keep)
        self.cuts_done.fill_(k + 1)
        self._last["cuts"] = float(k + 1)

    def on_cut(self, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The masks a cut keeps, given those before it and the projection's choice (which
        fixes each layer's width). VQ and ID choose their own channels and change weights here."""
        return after

    def scores(self) -> dict[str, torch.Tensor]:
        return {gid: s.detach() for gid, s in self.channel_scores().items()}
