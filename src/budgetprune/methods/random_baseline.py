"""Random pruning (seed 001's "Random" baseline): the iterative scheme with a random
score per channel, drawn once, so the projection keeps random channels per unit of cost."""

from __future__ import annotations

import torch
from torch import nn

from ..budget import Budget
from ..graph import ChannelGraph
from .base import register_method
from .iterative import IterativePruning


@register_method("random")
class RandomPruning(IterativePruning):
    """Channels removed at random (uniform scores), half of the cost at a time."""

    def setup(self, model: nn.Module, graph: ChannelGraph, budgets: list[Budget]) -> None:
        super().setup(model, graph, budgets)
        for gid, group in graph.groups.items():
            self.gate(gid).register_buffer("random_score", torch.rand(group.channels, device=self.gate(gid).mask.device))

    def channel_scores(self) -> dict[str, torch.Tensor]:
        return self.by_group(lambda g: g.random_score)
