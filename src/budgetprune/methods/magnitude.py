"""Weight-magnitude pruning (seed 001's "WM" baseline; Li et al., "Pruning Filters for
Efficient ConvNets", 2017): the iterative scheme scoring each channel by the mean absolute
weight of its filter (the producing layer's output row), so filters of layers with
different fan-in compare on one scale. An MLP's input features are scored by the mean
absolute weight of their column in the layer that reads them.
"""

from __future__ import annotations

import torch

from .base import register_method
from .iterative import IterativePruning


@register_method("magnitude")
class MagnitudePruning(IterativePruning):
    """Channels of smallest mean |w| go first, half of the cost at a time."""

    @torch.no_grad()
    def channel_scores(self) -> dict[str, torch.Tensor]:
        out = {}
        for gid, group in self.graph.groups.items():
            if group.position == "input":
                w = self.modules_of[group.host].weight.detach().abs()
                out[gid] = w.mean(dim=0).reshape(group.channels, -1).mean(dim=1)
            else:
                w = self.modules_of[group.producer].weight.detach().abs()
                out[gid] = w.reshape(w.shape[0], -1).mean(dim=1)
        return out
