"""Resource cost of a pruned network: activation volume, FLOPs and parameters.

Every metric is written once, per conv/linear layer, in terms of ``n_in`` (alive input
slots × features per slot) and ``n_out`` (alive output channels)::

    cost_l = c_io · n_in · n_out + c_out · n_out

so the same code gives the *hard* cost of a set of keep-masks (n = number of channels the
compacted network keeps, :func:`budgetprune.liveness.slot_sets`) and its *differentiable
expectation* under the gates (n = Σ P(slot alive), the gates being independent; a residual
slot with several writers is alive with probability 1 − Π(1 − p)). Both are purge-aware: a
dead output channel also removes the next layer's inputs.

* volume — seed 001, Eq. 4: V = Σ_l A_l · #kept maps of layer l; its expectation is BAR's
  L_S = Σ_l A_l Σ_i P(z_l,i > 0) (section 3.3). Ungated layers (the network's output) count
  with their full width; input features count when they are gated (an MLP).
* flops — section 3.3's FLOP variant: a layer's cost also counts the (expected) active maps
  of its input: A_l · k² · n_in · n_out multiply-accumulates (a depthwise conv: A_l · k² · n_out;
  a conv with g groups: A_l · k² · n_in · n_out / g, each output reading its group's inputs;
  a linear layer over tokens: A_l is the number of tokens; MACs, the fvcore/thop convention:
  one MAC counts as one FLOP). What runs outside the graph's conv and linear layers and is never
  pruned (attention products, ``nn.MultiheadAttention``'s projections, an ``F.linear`` inside an
  attention function) is a constant: the MACs ``torch.utils.flop_counter`` counts for it when
  the graph is built (:attr:`budgetprune.graph.ChannelGraph.measured_flops`), less what the
  layers count. An attention layer (``nn.MultiheadAttention`` self-attention, Swin's window
  attention, MaxViT's relative attention: :mod:`budgetprune.attention`) is a layer whose
  projections and attention products count per kept input channel, head and output channel
  (:func:`_attention_costs`).
* latency — milliseconds measured per layer on the current device and fitted to the same
  c_io · n_in · n_out + c_out · n_out form (:mod:`budgetprune.latency`): a budget like FLOPs.
  ``latency`` times the layers in eager PyTorch, ``latency:torchscript`` and
  ``latency:onnxruntime`` in those runtimes.
* params — weights k² · n_in · n_out (/ g for a grouped conv), biases n_out, BatchNorm γ and β 2 · n_out (also for a
  BatchNorm that hosts no gate, e.g. a Wide-ResNet's pre-activation BN), a LayerNorm's and a layer
  scale's entries per kept channel; every other parameter of the model (an attention's projections,
  a position embedding) is a constant, so the full count is the model's parameter count.
* nonzero — the conv and linear weights alone (k² · n_in · n_out): the count an unstructured
  (per-weight) budget limits (:mod:`budgetprune.sparsity` counts single weights); for channel
  pruning it is the weights the compacted network keeps.

``mode`` picks what the hard cost counts for residual networks: ``"mixed"`` (the
mixed-connectivity block: only alive maps are computed; what BAR optimises) or
``"regular"`` (tensors added together keep equal widths; seed 001, supplement 5) or
``"auto"`` (per residual space the faster of the two, :mod:`budgetprune.blocks`: the cost of a
set of masks is that of the network the choice builds for them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError
from .graph import ChannelGraph
from .latency import LATENCY_METRICS, is_latency, layer_coefficients
from .blocks import as_mode, built_sets
from .expectation import ExpectedCost
from .liveness import effective_masks, kept_counter

METRICS = ("volume", "flops", "params")  # counted: every report gives them
#: Every metric a budget may use: the counted ones and the measured latency (:mod:`budgetprune.latency`).
BUDGET_METRICS = METRICS + ("nonzero", *LATENCY_METRICS)


@dataclass(frozen=True)
class LayerCost:
    """One cost term: ``c_io · n_in · n_out + c_out · n_out`` over two tensors' slots.

    ``n_out`` counts the slots of ``out_tensor`` (its group's gates for a gated layer),
    ``n_in`` the input features: slots of ``in_tensor`` × ``in_expansion`` (None: no input side).
    """

    name: str
    in_tensor: str | None
    out_tensor: str
    out_group: str | None  # the gates that decide n_out in the expectation (None: the out tensor's slots)
    in_expansion: int
    c_io: float
    c_out: float

    def cost(self, n_in, n_out):
        return self.c_io * n_in * n_out + self.c_out * n_out


def layer_costs(graph: ChannelGraph, metric: str) -> list[LayerCost]:
    """The cost terms of ``metric`` over ``graph``."""
    if metric not in BUDGET_METRICS:
        raise ConfigError(f"unknown metric '{metric}': choose one of {', '.join(BUDGET_METRICS)}")
    modules = dict(graph.gm.named_modules())
    attention = [layer.name for layer in graph.layers.values() if layer.kind == "attention"]
    if is_latency(metric) and attention:
        raise ConfigError(f"a latency budget cannot time the attention layer '{attention[0]}' yet: "
                          "use a flops or params budget for this model")
    timed = layer_coefficients(graph, runtime=LATENCY_METRICS[metric]) if is_latency(metric) else None
    terms: list[LayerCost] = []
    for layer in graph.layers.values():
        if layer.kind == "attention":
            terms += _attention_costs(layer, graph, metric)
            continue
        e = graph.tensors[layer.in_tensor].expansion
        k = layer.kernel_area / layer.groups  # an output of a grouped conv reads 1/groups of the inputs
        out_t = layer.out_tensor
        if metric == "volume":
            c_io, c_out = 0.0, float(layer.out_area)
        elif metric == "flops":
            c_io, c_out = (0.0, float(layer.out_area * k)) if layer.depthwise else (float(layer.out_area * k), 0.0)
        elif is_latency(metric):  # measured ms in the metric's runtime, fitted to the same bilinear form
            c_io, c_out = (0.0, timed[layer.name][1]) if layer.depthwise else timed[layer.name]
        elif metric == "nonzero":
            c_io, c_out = (0.0, float(k)) if layer.depthwise else (float(k), 0.0)
        else:
            per_out = (1.0 if layer.bias else 0.0) + 2.0 * len(layer.batchnorms)
            c_io, c_out = (0.0, float(k) + per_out) if layer.depthwise else (float(k), per_out)
        out_group = layer.out_group
        terms.append(LayerCost(layer.name, layer.in_tensor if c_io else None, out_t, out_group,
                               e, c_io, c_out))
    if metric == "volume":
        for g in graph.groups.values():
            if g.position == "input":
                t = graph.layers[g.host].in_tensor
                terms.append(LayerCost(g.id, None, t, g.id, 1, 0.0, float(g.area)))
    if metric == "params":  # parameters read per channel: a LayerNorm's weight and bias, a layer scale
        # a LayerNorm's are counted on its output, which keeps its input's channels unless only
        # pruned-away layers read it: the LayerNorm then goes with them
        normalised = {path: norm.node for norm in graph.norms.values() for path in (norm.weight, norm.bias)
                      if path is not None and norm.node in graph.tensors}
        for param in graph.params.values():
            value = graph.gm.get_parameter(param.path) if _is_parameter(graph.gm, param.path) else None
            if value is not None:
                terms.append(LayerCost(param.path, None, normalised.get(param.path, param.tensor), None, 1, 0.0,
                                       float(value.numel() // value.shape[param.axis])))
    if metric == "params":  # BatchNorms that host no gate (pre-activation, after a depthwise conv)
        hosted = {bn for layer in graph.layers.values() for bn in layer.batchnorms}
        for node in graph.gm.graph.nodes:
            if node.op == "call_module" and node.name in graph.tensors and node.target not in hosted and \
                    isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm) and \
                    modules[node.target].affine:
                terms.append(LayerCost(node.target, None, node.name, None, 1, 0.0, 2.0))
    return terms


def _attention_costs(layer, graph: ChannelGraph, metric: str) -> list[LayerCost]:
    """An attention layer's cost terms (:class:`budgetprune.attention.Attention`), with n_in input
    channels, n_h heads of width d and n_out output channels over T positions (a Swin map padded
    to whole windows), each query attending to w keys:

    * FLOPs: T · 3d · n_in · n_h for the query/key/value projection, 2 · T · w · d · n_h for the
      attention products (q·kᵀ and the weighted sum of the values), T · d · n_h · n_out for the
      output projection;
    * params: 3d · n_in · n_h weights and 3d · n_h biases (q, k, v), d · n_h · n_out weights and
      n_out biases (output), and each per-head parameter's entries (a relative position bias
      table's column);
    * volume: 3d · T activations per head (its queries, keys and values) and T per output channel.

    Where the heads are not gated (n_h fixed) their part is the same with n_h = heads, and the
    attention products are in the constant."""
    spec, heads = layer.attention, layer.heads
    tokens, d = float(spec.tokens), float(spec.head_dim)
    head_t = layer.heads_tensor if heads else None
    n_heads = 1.0 if heads else float(spec.num_heads)  # folded into the coefficients where heads are fixed
    per_head_params = 0.0
    for path, axis in spec.head_params or ():
        value = graph.gm.get_parameter(path)
        per_head_params += float(value.numel() // value.shape[axis])
    if metric == "flops":
        qkv, per_head, out, per_out = tokens * 3 * d, 2 * tokens * spec.window * d, tokens * d, 0.0
    elif metric in ("params", "nonzero"):
        bias = metric == "params"
        qkv, out = 3 * d, d
        per_head = (3 * d if bias and spec.qkv_bias else 0.0) + (per_head_params if bias else 0.0)
        per_out = 1.0 if bias and layer.bias else 0.0
    else:  # volume
        qkv, per_head, out, per_out = 0.0, 3 * d * tokens, 0.0, float(layer.out_area)
    if not heads:  # the heads' own terms are constants (the attention products, its biases: measured)
        return [LayerCost(layer.name, None, layer.out_tensor, layer.out_group, 1, 0.0, out * n_heads + per_out),
                *([LayerCost(layer.name, None, layer.in_tensor, None, 1, 0.0, qkv * n_heads)] if qkv else [])]
    return [LayerCost(layer.name, layer.in_tensor if qkv else None, head_t, heads, 1, qkv, per_head),
            LayerCost(layer.name, head_t if out else None, layer.out_tensor, layer.out_group, 1, out, per_out)]


def _is_parameter(module: nn.Module, path: str) -> bool:
    owner, _, attr = path.rpartition(".")
    return attr in (module.get_submodule(owner) if owner else module)._parameters


#: The per-layer name of the constant cost of what is never pruned (see the module docstring).
UNPRUNED_OPS = "(ops outside the pruned layers)"


class CostModel:
    """Hard and expected cost of one metric over one graph.

    ``fixed`` is the constant cost of what no gate can remove: FLOPs of ops outside the conv and
    linear layers, parameters outside the counted ones (0 for the other metrics)."""

    def __init__(self, graph: ChannelGraph, metric: str, mode: str = "mixed"):
        self.graph = graph
        self.metric = metric
        self.mode = as_mode(mode)
        self.terms = layer_costs(graph, metric)
        self._expected = ExpectedCost(graph, self.terms)
        self._cache: tuple[bytes, float] | None = None
        self._flops: list[LayerCost] | None = None
        self.fixed = 0.0
        total = graph.measured_flops if metric == "flops" else \
            sum(p.numel() for p in graph.gm.parameters()) if metric == "params" else None
        if total is not None:
            self.fixed = float(max(0.0, total - sum(self.per_layer().values())))

    def layer_names(self) -> list[str]:
        """The names ``expected(..., weights=)`` and :meth:`per_layer` use."""
        return list(dict.fromkeys(t.name for t in self.terms))

    # hard ---------------------------------------------------------------------------------
    def per_layer(self, masks: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Cost of each term for the network that keeps ``masks`` (None: the full network)."""
        masks = self._full_masks() if masks is None else masks
        eff = effective_masks(self.graph, masks)
        _, sets = built_sets(self.graph, eff, self.mode, self._flop_terms)
        out: dict[str, float] = {}
        kept = kept_counter()  # a tensor feeds several terms, and tensors share sets
        for t in self.terms:
            gone = t.out_group is not None and not eff.nonempty[t.out_group]  # a pruned-away layer
            n_out = 0 if gone else kept(sets[t.out_tensor])
            n_in = kept(sets[t.in_tensor]) * t.in_expansion if t.in_tensor else 0
            out[t.name] = out.get(t.name, 0.0) + float(t.cost(n_in, n_out))
        if self.fixed:
            out[UNPRUNED_OPS] = self.fixed
        return out

    def hard(self, masks: dict[str, torch.Tensor]) -> float:
        """Cost of the compacted network that keeps exactly the channels set in ``masks``."""
        names = sorted(masks)
        flat = torch.cat([_flat_bool(masks[g]) for g in names]) if names else torch.zeros(0)
        key = flat.cpu().numpy().tobytes() + ",".join(f"{g}:{masks[g].numel()}" for g in names).encode()  # one copy
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        value = float(sum(self.per_layer(masks).values()))
        self._cache = (key, value)
        return value

    def full(self) -> float:
        """Cost of the unpruned network (V_F for volume)."""
        return self.hard(self._full_masks())

    def minimum(self) -> float:
        """Cost when every group keeps only its ``min_keep`` channels, and each layer that must keep
        an alive input one of them (:attr:`budgetprune.graph.ChannelGraph.input_guards`)."""
        masks = {}
        for gid, g in self.graph.groups.items():
            m = torch.zeros(g.channels, dtype=torch.bool)
            m[:g.min_keep] = True
            masks[gid] = m
        from .budget import with_guarded_inputs  # budget imports this module: imported here

        flat = {gid: torch.zeros(g.channels) for gid, g in self.graph.groups.items()}  # no channel preferred
        return self.hard(with_guarded_inputs(self.graph, masks, flat))

    def _flop_terms(self) -> list[LayerCost]:
        """The FLOP terms ``"auto"`` blocks weigh their choice with."""
        if self.metric == "flops":
            return self.terms
        if self._flops is None:
            self._flops = layer_costs(self.graph, "flops")
        return self._flops

    def _full_masks(self) -> dict[str, torch.Tensor]:
        return {gid: torch.ones(g.channels, dtype=torch.bool) for gid, g in self.graph.groups.items()}

    # expected -----------------------------------------------------------------------------
    def expected(self, probs: dict[str, torch.Tensor], weights: dict[str, float] | None = None,
                 joined: torch.Tensor | None = None) -> torch.Tensor:
        """Differentiable expectation: n = Σ P(slot alive) with independent gates P(z > 0)
        (vectorised over every term: :class:`budgetprune.expectation.ExpectedCost`).

        ``weights`` multiplies the cost of the layers it names (others count once); ``joined``:
        ``probs``' values as one vector in their order, when the caller has them so."""
        return self._expected(probs, weights, joined) + self.fixed


def _flat_bool(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as a flat bool vector outside autograd (itself when it is one: a keep mask)."""
    if mask.dtype is torch.bool and mask.dim() == 1:  # a bool tensor never requires grad
        return mask
    return mask.detach().bool().reshape(-1)


def resource_report(graph: ChannelGraph, masks: dict[str, torch.Tensor] | None = None,
                    mode: str = "mixed", metrics: tuple[str, ...] = METRICS) -> dict[str, float]:
    """``{"volume": .., "flops": .., "params": ..}`` of ``masks`` (the full net if None);
    ``metrics`` may add ``"latency"``."""
    out = {}
    for metric in metrics:
        cm = CostModel(graph, metric, mode)
        out[metric] = cm.full() if masks is None else cm.hard(masks)
    return out
