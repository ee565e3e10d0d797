"""Resource cost of a pruned network: activation volume, FLOPs and parameters.

Every metric is written once, as a per-layer polynomial in the number of kept channels on
the layer's two sides::

    cost_l = c_io · n_in · n_out + c_out · n_out + c_in · n_in + c_0

so the same code gives the *hard* cost of a set of keep-masks (n = number of kept channels)
and its *differentiable expectation* under the gates (n = Σ P(z > 0), the gates being
independent). Both are purge-aware: a dead output channel of layer l also removes layer
l+1's inputs.

* volume — seed 001, Eq. 4: V = Σ_l A_l · #kept maps of layer l; its expectation is BAR's
  L_S = Σ_l A_l Σ_i P(z_l,i > 0) (section 3.3). Ungated layers (the network's output)
  count with their full width; input features count when they are gated (an MLP).
* flops — section 3.3's FLOP variant: a layer's cost also counts the (expected) active maps
  of the layer before it: A_l · k² · n_in · n_out multiply-accumulates (MACs, the
  fvcore/thop convention: one MAC counts as one FLOP).
* params — weights k² · n_in · n_out, biases n_out, BatchNorm γ and β 2 · n_out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError
from .graph import ChannelGraph

METRICS = ("volume", "flops", "params")


@dataclass(frozen=True)
class LayerCost:
    """Coefficients of one layer's cost polynomial for one metric."""

    name: str
    in_group: str | None
    out_group: str | None
    n_in_full: int  # channels (groups) on the input side, before expansion
    n_out_full: int
    c_io: float
    c_out: float
    c_in: float = 0.0
    c_0: float = 0.0

    def cost(self, n_in, n_out):
        return self.c_io * n_in * n_out + self.c_out * n_out + self.c_in * n_in + self.c_0


def layer_costs(graph: ChannelGraph, metric: str) -> list[LayerCost]:
    """The cost polynomial of every term of ``metric`` over ``graph``."""
    if metric not in METRICS:
        raise ConfigError(f"unknown metric '{metric}': choose one of {', '.join(METRICS)}")
    terms: list[LayerCost] = []
    for layer in graph.layers.values():
        n_in = layer.in_features // layer.in_expansion
        e = layer.in_expansion
        if metric == "volume":
            terms.append(LayerCost(layer.name, None, layer.out_group, 1, layer.out_channels, 0.0,
                                   float(layer.out_area)))
        elif metric == "flops":
            terms.append(LayerCost(layer.name, layer.in_group, layer.out_group, n_in, layer.out_channels,
                                   float(layer.out_area * layer.kernel_area * e), 0.0))
        else:
            per_out = (1.0 if layer.bias else 0.0) + 2.0 * len(layer.batchnorms)
            terms.append(LayerCost(layer.name, layer.in_group, layer.out_group, n_in, layer.out_channels,
                                   float(layer.kernel_area * e), per_out))
    if metric == "volume":
        for g in graph.groups.values():
            if g.position == "input":
                terms.append(LayerCost(g.id, None, g.id, 1, g.channels, 0.0, float(g.area)))
    return terms


class CostModel:
    """Hard and expected cost of channel counts for one metric over one graph."""

    def __init__(self, graph: ChannelGraph, metric: str):
        self.graph = graph
        self.metric = metric
        self.terms = layer_costs(graph, metric)

    def _counts_full(self) -> dict[str, float]:
        return {g.id: float(g.channels) for g in self.graph.groups.values()}

    def evaluate(self, counts: dict[str, torch.Tensor | float]):
        """Σ_l cost_l with n taken from ``counts`` (missing groups count as full)."""
        total = 0.0
        for t in self.terms:
            n_in = counts.get(t.in_group, t.n_in_full) if t.in_group else t.n_in_full
            n_out = counts.get(t.out_group, t.n_out_full) if t.out_group else t.n_out_full
            total = total + t.cost(n_in, n_out)
        return total

    def per_layer(self, counts: dict[str, torch.Tensor | float]) -> dict[str, float]:
        out = {}
        for t in self.terms:
            n_in = counts.get(t.in_group, t.n_in_full) if t.in_group else t.n_in_full
            n_out = counts.get(t.out_group, t.n_out_full) if t.out_group else t.n_out_full
            out[t.name] = float(t.cost(n_in, n_out))
        return out

    def full(self) -> float:
        """Cost of the unpruned network (V_F for volume)."""
        return float(self.evaluate(self._counts_full()))

    def minimum(self) -> float:
        """Cost when every group keeps only its ``min_keep`` channels."""
        return float(self.evaluate({g.id: float(g.min_keep) for g in self.graph.groups.values()}))

    def hard(self, masks: dict[str, torch.Tensor]) -> float:
        """Cost of the network that keeps exactly the channels set in ``masks``."""
        return float(self.evaluate({gid: float(m.sum()) for gid, m in masks.items()}))

    def expected(self, probs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Differentiable expectation with n = Σ P(z > 0) per group (gates independent)."""
        value = self.evaluate({gid: p.sum() for gid, p in probs.items()})
        return value if torch.is_tensor(value) else torch.tensor(value)


def resource_report(graph: ChannelGraph, masks: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """``{"volume": .., "flops": .., "params": ..}`` of ``masks`` (the full net if None)."""
    out = {}
    for metric in METRICS:
        cm = CostModel(graph, metric)
        out[metric] = cm.full() if masks is None else cm.hard(masks)
    return out
