"""The channel graph: what in a model can be pruned, and what shrinks together.

A model is traced with ``torch.fx`` and its shapes are propagated from an example input.
Every conv/linear output that feeds another conv/linear becomes a *channel group*: the set
of feature maps (or neurons) a gate switches off together. For each group the graph knows
its feature-map area A_l (seed 001, Eq. 4), the module whose output the gate multiplies
(the *host*: the BatchNorm right after the layer if there is one, else the layer), and the
layers that consume it — so a dead output channel also removes the next layer's inputs.

This version handles chain-structured networks (LeNet, VGG-style): conv, linear, batch norm,
zero-preserving activations, pooling, dropout and flatten. Anything else is refused with a
one-line :class:`~budgetprune.errors.GraphError` that names the operation.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import GraphError

#: Activations that map 0 to 0, so a gated-off channel stays exactly zero through them.
ZERO_PRESERVING_MODULES = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu", nn.ELU: "elu",
    nn.GELU: "gelu", nn.SiLU: "silu", nn.Tanh: "tanh", nn.Hardswish: "hardswish",
    nn.Mish: "mish", nn.Identity: "identity", nn.Dropout: "dropout", nn.Dropout2d: "dropout2d",
}
POOL_MODULES = {
    nn.MaxPool2d: "max_pool2d", nn.AvgPool2d: "avg_pool2d",
    nn.AdaptiveAvgPool2d: "adaptive_avg_pool2d", nn.AdaptiveMaxPool2d: "adaptive_max_pool2d",
}
ZERO_PRESERVING_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.leaky_relu: "leaky_relu",
    F.elu: "elu", F.gelu: "gelu", F.silu: "silu", torch.tanh: "tanh", F.hardswish: "hardswish",
    F.mish: "mish", F.dropout: "dropout",
}
POOL_FUNCTIONS = {
    F.max_pool2d: "max_pool2d", F.avg_pool2d: "avg_pool2d",
    F.adaptive_avg_pool2d: "adaptive_avg_pool2d", F.adaptive_max_pool2d: "adaptive_max_pool2d",
}
FLATTEN_METHODS = {"view", "reshape", "flatten"}
PASSTHROUGH_METHODS = {"contiguous": "identity", "relu": "relu", "tanh": "tanh"}


@dataclass
class ChannelGroup:
    """Channels that are kept or pruned together, with one gate each.

    ``position`` is ``"output"`` for a layer's output maps (gate multiplies the host's
    output) or ``"input"`` for the network's input features (gate multiplies the host's
    input, as Louizos et al. gate the inputs of an MLP).
    """

    id: str
    channels: int
    area: int
    host: str
    position: str = "output"
    producer: str | None = None
    consumers: list[str] = field(default_factory=list)
    min_keep: int = 1


@dataclass
class Layer:
    """A conv or linear layer and the channel groups on its two sides."""

    name: str
    kind: str  # "conv" | "linear"
    in_features: int  # input channels (conv) or input features (linear)
    out_channels: int
    out_area: int  # A_l: H*W of the output maps, 1 for a linear layer
    kernel_area: int = 1
    in_group: str | None = None
    in_expansion: int = 1  # input features per channel of in_group (H*W after a flatten)
    out_group: str | None = None
    bias: bool = True
    batchnorms: list[str] = field(default_factory=list)  # BatchNorms on this layer's output maps


@dataclass
class Op:
    """One step of the traced forward pass, in execution order."""

    node: str
    kind: str  # "conv" | "linear" | "batchnorm" | "act" | "pool" | "flatten"
    module: str | None  # qualified module name for call_module nodes
    spec: dict  # architecture description of this step (see budgetprune.architecture)
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


class ChannelGraph:
    """Prunable channel groups, layers and ops of a traced model.

    Build it with :meth:`ChannelGraph.build`; ``print(graph.summary())`` shows what is
    prunable and why the rest is not.
    """

    def __init__(self, ops: list[Op], layers: dict[str, Layer], groups: dict[str, ChannelGroup],
                 ungated: dict[str, str], input_shape: tuple[int, ...]):
        self.ops = ops
        self.layers = layers
        self.groups = groups
        self.ungated = ungated
        self.input_shape = input_shape

    # -- construction -----------------------------------------------------------------
    @classmethod
    def build(cls, model: nn.Module, example_input: torch.Tensor, gate_inputs: bool = False) -> "ChannelGraph":
        """Trace ``model``, propagate shapes from ``example_input`` and find channel groups.

        ``gate_inputs`` adds a group for the input features of a network whose first layer is
        a linear layer (an MLP), so input pixels can be pruned too.
        """
        gm = trace(model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(example_input)
        except Exception as exc:  # shape mismatch, wrong channel count, ...
            raise GraphError(
                f"the example input of shape {tuple(example_input.shape)} does not fit "
                f"{type(model).__name__}: {_first_line(exc)}; pass an input of the shape the model expects"
            ) from None
        finally:
            model.train(was_training)
        modules = dict(model.named_modules())
        ops = _linearise(gm, modules)
        layers, groups, ungated = _find_groups(ops, modules, gate_inputs)
        return cls(ops, layers, groups, ungated, tuple(example_input.shape[1:]))

    # -- queries ----------------------------------------------------------------------
    def layer_of_group(self, gid: str) -> Layer | None:
        g = self.groups[gid]
        return self.layers.get(g.producer) if g.producer else None

    def summary(self) -> str:
        """A readable table: each layer, its output group, area and what was left ungated."""
        rows = [f"ChannelGraph: input {self.input_shape}, {len(self.groups)} prunable groups"]
        rows.append(f"  {'group':<24}{'channels':>9}{'area':>8}  host -> consumers")
        for g in self.groups.values():
            rows.append(f"  {g.id:<24}{g.channels:>9}{g.area:>8}  {g.host} ({g.position}) -> "
                        f"{', '.join(g.consumers) or '-'}")
        for name, why in self.ungated.items():
            rows.append(f"  not pruned: {name}: {why}")
        return "\n".join(rows)


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with a one-line error naming what failed."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:
        raise GraphError(
            f"cannot trace {type(model).__name__} with torch.fx: {_first_line(exc)}; "
            "remove data-dependent control flow from forward() or wrap that part in a leaf module"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _arg(node: fx.Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _module_spec(mod: nn.Module) -> tuple[str, dict]:
    """(kind, architecture spec) for a supported module."""
    if isinstance(mod, nn.Conv2d):
        if mod.padding_mode != "zeros":
            raise GraphError(f"conv padding_mode '{mod.padding_mode}' is not supported; use zero padding")
        return "conv", {"op": "conv2d", "in_channels": mod.in_channels, "out_channels": mod.out_channels,
                        "kernel_size": list(mod.kernel_size), "stride": list(mod.stride),
                        "padding": list(mod.padding) if not isinstance(mod.padding, str) else mod.padding,
                        "dilation": list(mod.dilation), "groups": mod.groups, "bias": mod.bias is not None}
    if isinstance(mod, nn.Linear):
        return "linear", {"op": "linear", "in_features": mod.in_features, "out_features": mod.out_features,
                          "bias": mod.bias is not None}
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return "batchnorm", {"op": "batch_norm2d" if isinstance(mod, nn.BatchNorm2d) else "batch_norm1d",
                             "num_features": mod.num_features, "eps": mod.eps, "momentum": mod.momentum,
                             "affine": mod.affine, "track_running_stats": mod.track_running_stats}
    if isinstance(mod, nn.Flatten):
        return "flatten", {"op": "flatten", "start_dim": mod.start_dim, "end_dim": mod.end_dim}
    for cls_, op in ZERO_PRESERVING_MODULES.items():
        if type(mod) is cls_:
            spec = {"op": op}
            if op == "leaky_relu":
                spec["negative_slope"] = mod.negative_slope
            elif op == "elu":
                spec["alpha"] = mod.alpha
            elif op == "gelu":
                spec["approximate"] = mod.approximate
            elif op in ("dropout", "dropout2d"):
                spec["p"] = mod.p
            return "act", spec
    for cls_, op in POOL_MODULES.items():
        if type(mod) is cls_:
            return "pool", {"op": op, **_pool_args(op, mod)}
    raise GraphError(f"module type {type(mod).__name__} is not supported in a prunable path")


def _pool_args(op: str, mod) -> dict:
    def pair(v):
        return list(v) if isinstance(v, (tuple, list)) else [v, v] if v is not None else None
    if op.startswith("adaptive"):
        return {"output_size": pair(mod.output_size)}
    args = {"kernel_size": pair(mod.kernel_size), "stride": pair(mod.stride or mod.kernel_size),
            "padding": pair(mod.padding), "ceil_mode": bool(mod.ceil_mode)}
    if op == "max_pool2d":
        args["dilation"] = pair(mod.dilation)
    else:
        args["count_include_pad"] = bool(mod.count_include_pad)
    return args


class _PoolArgs:
    """Adapter so functional pooling calls share :func:`_pool_args` with modules."""

    def __init__(self, op: str, node: fx.Node):
        if op.startswith("adaptive"):
            self.output_size = _arg(node, 1, "output_size", None)
            return
        self.kernel_size = _arg(node, 1, "kernel_size", None)
        self.stride = _arg(node, 2, "stride", None)
        self.padding = _arg(node, 3, "padding", 0)
        if op == "max_pool2d":
            self.dilation = _arg(node, 4, "dilation", 1)
            self.ceil_mode = _arg(node, 5, "ceil_mode", False)
        else:
            self.ceil_mode = _arg(node, 4, "ceil_mode", False)
            self.count_include_pad = _arg(node, 5, "count_include_pad", True)
            if _arg(node, 6, "divisor_override", None) is not None:
                raise GraphError("avg_pool2d with divisor_override is not supported")


def _function_spec(node: fx.Node) -> tuple[str, dict]:
    fn = node.target
    if fn in ZERO_PRESERVING_FUNCTIONS:
        op = ZERO_PRESERVING_FUNCTIONS[fn]
        spec = {"op": op}
        if op == "leaky_relu":
            spec["negative_slope"] = _arg(node, 1, "negative_slope", 0.01)
        elif op == "elu":
            spec["alpha"] = _arg(node, 1, "alpha", 1.0)
        elif op == "gelu":
            spec["approximate"] = node.kwargs.get("approximate", "none")
        elif op == "dropout":
            spec["p"] = _arg(node, 1, "p", 0.5)
        return "act", spec
    if fn in POOL_FUNCTIONS:
        op = POOL_FUNCTIONS[fn]
        return "pool", {"op": op, **_pool_args(op, _PoolArgs(op, node))}
    if fn is torch.flatten:
        return "flatten", {"op": "flatten", "start_dim": _arg(node, 1, "start_dim", 0),
                           "end_dim": _arg(node, 2, "end_dim", -1)}
    name = getattr(fn, "__name__", str(fn))
    if fn in (operator.add, torch.add, torch.cat, operator.mul, torch.mul):
        raise GraphError(f"operation '{name}' at node '{node.name}' joins several tensors; this version "
                         "prunes chain-structured networks (conv/linear/BN/activation/pool/flatten) only")
    raise GraphError(f"operation '{name}' at node '{node.name}' is not supported in a prunable path")


def _linearise(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> list[Op]:
    """The tensor ops of a chain network in execution order; refuses branches."""
    ops: list[Op] = []
    previous: fx.Node | None = None
    for node in gm.graph.nodes:
        out_shape = _shape(node)
        if node.op == "placeholder":
            previous = node
            continue
        if node.op == "output":
            break
        if out_shape is None:  # e.g. x.size(0) feeding a view: not a tensor op
            continue
        tensor_inputs = [a for a in node.all_input_nodes if _shape(a) is not None]
        if len(tensor_inputs) != 1 or tensor_inputs[0] is not previous:
            raise GraphError(
                f"node '{node.name}' ({node.target}) does not continue a single chain of layers; "
                "this version prunes chain-structured networks only")
        in_shape = _shape(tensor_inputs[0])
        if node.op == "call_module":
            kind, spec = _module_spec(modules[node.target])
            mod_name = node.target
        elif node.op == "call_function":
            kind, spec = _function_spec(node)
            mod_name = None
        elif node.op == "call_method" and node.target in FLATTEN_METHODS:
            if len(out_shape) != 2 or out_shape[0] != in_shape[0]:
                raise GraphError(f"'{node.target}' at node '{node.name}' reshapes {in_shape} to {out_shape}; "
                                 "only flattening to (batch, features) is supported")
            kind, spec, mod_name = "flatten", {"op": "flatten", "start_dim": 1, "end_dim": -1}, None
        elif node.op == "call_method" and node.target in PASSTHROUGH_METHODS:
            kind, spec, mod_name = "act", {"op": PASSTHROUGH_METHODS[node.target]}, None
        else:
            raise GraphError(f"'{node.target}' at node '{node.name}' is not supported in a prunable path")
        if kind == "flatten" and (len(out_shape) != 2 or out_shape[0] != in_shape[0]):
            raise GraphError(f"flatten at node '{node.name}' must produce (batch, features), got {out_shape}")
        ops.append(Op(node.name, kind, mod_name, spec, in_shape, out_shape))
        previous = node
    if not any(op.kind in ("conv", "linear") for op in ops):
        raise GraphError("the model has no conv or linear layer to prune")
    return ops


def _find_groups(ops: list[Op], modules: dict[str, nn.Module], gate_inputs: bool):
    layers: dict[str, Layer] = {}
    groups: dict[str, ChannelGroup] = {}
    ungated: dict[str, str] = {}
    current_group: str | None = None  # group of the channels flowing at this point
    expansion = 1
    open_layer: Layer | None = None  # last producer whose output group is still being formed

    for i, op in enumerate(ops):
        if op.kind in ("conv", "linear"):
            mod = modules[op.module]
            if op.kind == "conv" and mod.groups != 1:
                raise GraphError(f"grouped convolution '{op.module}' (groups={mod.groups}) is not supported "
                                 "in this version; use groups=1")
            if op.kind == "linear" and len(op.in_shape) != 2:
                raise GraphError(f"linear layer '{op.module}' gets a {len(op.in_shape)}-d input; "
                                 "only (batch, features) inputs are supported")
            if not layers and op.kind == "linear" and gate_inputs:
                gid = "input"
                groups[gid] = ChannelGroup(gid, op.in_shape[1], 1, op.module, "input", None, [op.module])
                current_group, expansion = gid, 1
            layer = Layer(op.module, op.kind, op.in_shape[1], op.out_shape[1],
                          _area(op.out_shape), _kernel_area(mod), current_group, expansion,
                          None, mod.bias is not None)
            if current_group is not None:
                groups[current_group].consumers.append(op.module)
            layers[op.module] = layer
            open_layer, current_group, expansion = layer, op.module, 1
            groups[op.module] = ChannelGroup(op.module, op.out_shape[1], layer.out_area, op.module,
                                             "output", op.module)
        elif op.kind == "batchnorm":
            bn = modules[op.module]
            if expansion != 1:
                raise GraphError(f"BatchNorm '{op.module}' after a flatten of feature maps is not supported")
            if open_layer is not None and current_group == open_layer.name:
                # The gate must sit after the last BatchNorm of the segment: a BN after the gate
                # would renormalise a switched-off channel back to a non-zero constant.
                if not bn.affine:
                    raise GraphError(f"BatchNorm '{op.module}' has no affine parameters, so a gate cannot be "
                                     "folded into it; use affine=True")
                open_layer.batchnorms.append(op.module)
                groups[open_layer.name].host = op.module
        elif op.kind == "flatten":
            expansion = _flatten_expansion(op)

    # The last layer's output is the network's output: never gated.
    last = [l for l in layers.values()][-1]
    groups.pop(last.name, None)
    ungated[last.name] = "network output"
    for layer in layers.values():
        layer.out_group = layer.name if layer.name in groups else None
    return layers, groups, ungated


def _area(shape: tuple[int, ...]) -> int:
    area = 1
    for s in shape[2:]:
        area *= int(s)
    return area


def _kernel_area(mod: nn.Module) -> int:
    if isinstance(mod, nn.Conv2d):
        return int(mod.kernel_size[0] * mod.kernel_size[1])
    return 1


def _flatten_expansion(op: Op) -> int:
    channels = op.in_shape[1] if len(op.in_shape) > 1 else 1
    total = op.out_shape[1]
    if total % channels:
        raise GraphError(f"flatten at node '{op.node}' does not keep channels contiguous")
    return total // channels
