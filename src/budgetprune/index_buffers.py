"""Index tensors that a rewritten fx graph reads through ``get_attr`` nodes.

Compaction (:mod:`budgetprune.compact`) and the channel layout (:mod:`budgetprune.channel_order`)
both insert gathers of kept channels whose indices are buffers of the graph module; this is where
those buffers are named, registered and read, under a name no attribute of the module holds yet.
"""

from __future__ import annotations

import torch
from torch import fx


class IndexBuffers:
    """Buffers ``{prefix}_0``, ``{prefix}_1``, ... of ``gm``, each read by a ``get_attr`` node."""

    def __init__(self, gm: fx.GraphModule, prefix: str):
        self.gm, self.prefix, self.count = gm, prefix, 0

    def add(self, graph: fx.Graph, tensor: torch.Tensor, before: fx.Node | None = None) -> fx.Node:
        """Register a copy of ``tensor`` under the next free name and return a node reading it,
        inserted before ``before`` (default: at the graph's current insertion point)."""
        while hasattr(self.gm, f"{self.prefix}_{self.count}"):  # a name in use is never overwritten
            self.count += 1
        name = f"{self.prefix}_{self.count}"
        self.count += 1
        self.gm.register_buffer(name, tensor.clone())
        if before is None:
            return graph.get_attr(name)
        with graph.inserting_before(before):
            return graph.get_attr(name)
