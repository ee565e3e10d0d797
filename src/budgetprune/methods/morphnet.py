"""MorphNet (Gordon et al., CVPR 2018; seed 001 section 5.1): BatchNorm's γ as the channel
mask, driven to zero by an L1 penalty that weighs each channel by the resource it costs.

The penalty is ``λ · (V_F / cost_F) · Σ_i w_i |γ_i|`` with w_i = ∂cost/∂n_i, the cost of
keeping channel i given which channels are alive now (the derivative of
:meth:`budgetprune.resources.CostModel.expected` at the current keep masks): A_l for the
volume, A_l·k²·(alive inputs) plus what its readers pay for it for FLOPs, as MorphNet's
FLOP regulariser counts alive neighbours. The factor V_F / cost_F makes one λ weigh the same
for every metric, as in BAR. Widths are the channels with |γ| above ``threshold``; a layer
with no BatchNorm gets a scale of its own (:class:`budgetprune.gates.ScaleGate`).

A channel whose |γ| falls to the threshold is closed for good (``permanent=True``, the default):
its output is 0 from the next step on and the rest of the network trains without it. Under
Adam an L1-driven |γ| jitters around the threshold, so where a channel only counted as pruned
while under it (``permanent=False``), the kept cost flickered.
"""

from __future__ import annotations

import torch
from torch import nn

from ..aiming import AIM_GAIN, AIM_RATE, BudgetAim
from ..budget import Budget
from ..gates import ScaleGate
from ..graph import ChannelGraph, ChannelGroup
from ..resources import CostModel
from .base import register_method
from .gated import GatedMethod, still_open


@register_method("morphnet")
class MorphNet(GatedMethod):
    """Resource-weighted L1 on BatchNorm scales; ``metric`` defaults to the (first) budget's.

    ``aim`` is ``fixed`` by default, unlike the other methods without a budget term. Before channels
    closed for good the flicker of |γ| around the threshold wound the aimed λ up until the network
    collapsed (LeNet-5 on Fashion-MNIST at 8× volume: 76.3 % aimed vs 85.2 % fixed,
    benchmarks/results/methods_aim); closing, aimed ties fixed there, but on ResNet-20 at 16× volume
    it scored 63.1 % against 73.6 % fixed: γ takes about a thousand Adam steps to fall to the
    threshold, the kept cost lags the schedule and λ winds up (benchmarks/README.md)."""

    def __init__(self, lam: float = 1e-4, threshold: float = 1e-2, metric: str | None = None,
                 gate_lr: float | None = None, permanent: bool = True,
                 aim: str = "fixed", aim_rate: float = AIM_RATE, aim_gain: float = AIM_GAIN,
                 schedule: str = "sigmoid", hardness: float | None = None, schedule_end: float = 1.0):
        super().__init__(gate_lr, aim=BudgetAim.create(
            aim, aim_rate, aim_gain, schedule, hardness, schedule_end))
        if lam < 0 or not threshold > 0:
            raise ValueError("morphnet needs lam ≥ 0 and threshold > 0")
        self.lam = float(lam)
        self.threshold = float(threshold)
        self.metric = metric
        self.permanent = bool(permanent)

    def attach(self, model: nn.Module, graph: ChannelGraph, budgets: list[Budget]) -> None:
        self._modules_of = dict(model.named_modules())
        super().attach(model, graph, budgets)

    def make_gate(self, group: ChannelGroup) -> nn.Module:
        host = self._modules_of.get(group.host)
        bn = host if (group.position == "output" and isinstance(host, nn.modules.batchnorm._BatchNorm)
                      and host.affine) else None
        return ScaleGate(group.channels, bn, self.threshold)

    def setup(self, model: nn.Module, graph: ChannelGraph, budgets: list[Budget]) -> None:
        self.cost = CostModel(graph, self.metric or budgets[0].metric)
        self.scale = CostModel(graph, "volume").full() / self.cost.full()

    def channel_costs(self) -> dict[str, torch.Tensor]:
        """w_i = ∂cost/∂n_i at the current keep masks (recomputed only when the masks change)."""
        masks = self.keep_masks()
        key = b"".join(masks[g].cpu().numpy().tobytes() for g in sorted(masks))
        if getattr(self, "_costs_key", None) != key:
            probs = {gid: m.float().requires_grad_(True) for gid, m in masks.items()}
            grads = torch.autograd.grad(self.cost.expected(probs), list(probs.values()), allow_unused=True)
            self._costs = {gid: (g if g is not None else torch.zeros_like(probs[gid])).detach()
                           for gid, g in zip(probs, grads)}
            self._costs_key = key
        return self._costs

    def penalty(self, progress: float) -> torch.Tensor:
        w = self.channel_costs()
        total = self.zero()
        for gid, gate in self.by_group(lambda g: g).items():
            total = total + (w[gid].to(gate.gamma) * gate.gamma.abs()).sum()
        self._last["l1"] = float(total.detach())
        return self.weight() * self.scale * total

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """Close the channels whose |γ| fell to the threshold (a protected group keeps its
        strongest), then the fatal-pruning guard and, aimed, the controller's step."""
        if self.permanent:
            for key, gate in self.gates.items():
                is_open = gate.open > 0
                gate.close(still_open(is_open, gate.gamma.detach().abs(), self.threshold,
                                      self.graph.groups[self.gid_of[key]].min_keep))
        super().after_step(progress)
