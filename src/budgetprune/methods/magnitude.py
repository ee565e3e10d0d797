"""Weight-magnitude pruning (seed 001's "WM" baseline; Li et al., "Pruning Filters for
Efficient ConvNets", 2017): the iterative scheme scoring each channel by the mean absolute
weight of its filter (the producing layer's output row), so filters of layers with
different fan-in compare on one scale. An MLP's input features are scored by the mean
absolute weight of their column in the layer that reads them.
"""

from __future__ import annotations

import torch

from ..graph import parameter
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
            else:  # the mean over the group's filter rows (an attention head: its q, k and v rows)
                path, rows = self.graph.filter_rows(gid)[0]
                w = parameter(self.modules_of, path).detach().abs()
                w = w.reshape(w.shape[0], -1).mean(dim=1)
                out[gid] = torch.zeros(group.channels, dtype=w.dtype, device=w.device).index_add(
                    0, rows.to(w.device), w) / torch.bincount(rows, minlength=group.channels).to(w)
        return out
