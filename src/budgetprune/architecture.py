"""Layer specs: a JSON-able description of one ``torch.nn`` module ↔ the module itself.

A pruned model is stored as a description plus its weights, so it can be rebuilt without
the original model code and without unpickling arbitrary objects. :data:`LAYERS` is the one
table of the module classes a saved model may contain: for each, its spec name (``"op"``)
and the constructor arguments a spec records. Both descriptions use it — the list of specs
of a plain ``nn.Sequential`` (format 1, :func:`build_sequential`) and the ``modules`` table
of a ``torch.fx`` graph (format 2, :mod:`budgetprune.graphio`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .errors import CheckpointError
from .graphsafety import is_layer_name
from .ops import SelfAttention


class SelectFeatures(nn.Module):
    """Keeps the input features listed in ``index`` (the kept inputs of a pruned MLP)."""

    def __init__(self, index: list[int] | torch.Tensor):
        super().__init__()
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} features"


_REQUIRED = object()


@dataclass(frozen=True)
class Arg:
    """One constructor argument of a layer class, stored in a spec under its own name.

    ``form``: ``"value"`` (as is), ``"list"`` (a tuple attribute stored as a list; a string
    such as padding ``"same"`` stays a string), ``"pair"`` (an int or tuple stored as a
    two-element list, as the graph's pooling specs are) or ``"bias"`` (the ``bias`` tensor
    attribute stored as a bool). An argument with a default may be missing from a spec; with
    ``omit`` it is written only when it differs from that default (so older specs, which
    lack it, stay the same).
    """

    name: str
    form: str = "value"
    default: object = _REQUIRED
    omit: bool = False

    def read(self, mod: nn.Module):
        value = getattr(mod, self.name)
        if self.form == "bias":
            return value is not None
        if self.form == "pair" and value is not None and not isinstance(value, (tuple, list)):
            return [value, value]
        if isinstance(value, (tuple, list)):
            return list(value)
        return value

    def write(self, spec: dict):
        value = spec[self.name] if self.default is _REQUIRED else spec.get(self.name, self.default)
        return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class LayerKind:
    """A module class a spec may name, and the constructor arguments its spec records."""

    op: str
    cls: type
    args: tuple[Arg, ...] = ()

    def spec(self, mod: nn.Module) -> dict:
        spec = {"op": self.op}
        for arg in self.args:
            value = arg.read(mod)
            if not (arg.omit and value == arg.default):
                spec[arg.name] = value
        return spec

    def build(self, spec: dict) -> nn.Module:
        return self.cls(**{arg.name: arg.write(spec) for arg in self.args})


def _inplace() -> Arg:
    return Arg("inplace", default=False, omit=True)


def _pool(*extra: Arg) -> tuple[Arg, ...]:
    return (Arg("kernel_size", "pair"), Arg("stride", "pair"), Arg("padding", "pair"), *extra)


#: Every module class a saved model may hold (exact classes: a subclass may change forward()).
LAYERS: tuple[LayerKind, ...] = (
    LayerKind("conv2d", nn.Conv2d, (Arg("in_channels"), Arg("out_channels"), Arg("kernel_size", "list"),
                                    Arg("stride", "list"), Arg("padding", "list"), Arg("dilation", "list"),
                                    Arg("groups"), Arg("bias", "bias"),
                                    Arg("padding_mode", default="zeros", omit=True))),
    LayerKind("linear", nn.Linear, (Arg("in_features"), Arg("out_features"), Arg("bias", "bias"))),
    *(LayerKind(op, cls, (Arg("num_features"), Arg("eps"), Arg("momentum"), Arg("affine"),
                          Arg("track_running_stats")))
      for op, cls in (("batch_norm2d", nn.BatchNorm2d), ("batch_norm1d", nn.BatchNorm1d))),
    LayerKind("layer_norm", nn.LayerNorm, (Arg("normalized_shape", "list"), Arg("eps"), Arg("elementwise_affine"),
                                          Arg("bias", "bias"))),
    LayerKind("self_attention", SelfAttention, (Arg("in_features"), Arg("embed_dim"), Arg("out_features"),
                                                Arg("num_heads"), Arg("bias"), Arg("dropout"),
                                                Arg("tuple_output", default=True, omit=True),
                                                Arg("proj_bias", default=None, omit=True))),
    LayerKind("flatten", nn.Flatten, (Arg("start_dim", default=1), Arg("end_dim", default=-1))),
    *(LayerKind(op, cls, (_inplace(),)) for op, cls in (
        ("relu", nn.ReLU), ("relu6", nn.ReLU6), ("silu", nn.SiLU), ("hardswish", nn.Hardswish),
        ("hardsigmoid", nn.Hardsigmoid), ("mish", nn.Mish))),
    *(LayerKind(op, cls) for op, cls in (("tanh", nn.Tanh), ("sigmoid", nn.Sigmoid), ("identity", nn.Identity),
                                         ("softsign", nn.Softsign), ("tanhshrink", nn.Tanhshrink))),
    LayerKind("leaky_relu", nn.LeakyReLU, (Arg("negative_slope"), _inplace())),
    LayerKind("elu", nn.ELU, (Arg("alpha"), _inplace())),
    LayerKind("celu", nn.CELU, (Arg("alpha"), _inplace())),
    LayerKind("selu", nn.SELU, (_inplace(),)),
    LayerKind("hardtanh", nn.Hardtanh, (Arg("min_val"), Arg("max_val"), _inplace())),
    LayerKind("softplus", nn.Softplus, (Arg("beta"), Arg("threshold"))),
    LayerKind("prelu", nn.PReLU, (Arg("num_parameters"),)),
    LayerKind("gelu", nn.GELU, (Arg("approximate", default="none"),)),
    LayerKind("dropout", nn.Dropout, (Arg("p"), _inplace())),
    LayerKind("dropout2d", nn.Dropout2d, (Arg("p"), _inplace())),
    LayerKind("max_pool2d", nn.MaxPool2d, _pool(Arg("dilation", "pair"), Arg("ceil_mode"),
                                                Arg("return_indices", default=False, omit=True))),
    LayerKind("avg_pool2d", nn.AvgPool2d, _pool(Arg("ceil_mode"), Arg("count_include_pad"),
                                                Arg("divisor_override", default=None, omit=True))),
    LayerKind("max_pool1d", nn.MaxPool1d, (Arg("kernel_size", "list"), Arg("stride", "list"), Arg("padding", "list"),
                                           Arg("dilation", "list"), Arg("ceil_mode"),
                                           Arg("return_indices", default=False, omit=True))),
    LayerKind("avg_pool1d", nn.AvgPool1d, (Arg("kernel_size", "list"), Arg("stride", "list"), Arg("padding", "list"),
                                           Arg("ceil_mode"), Arg("count_include_pad"))),
    LayerKind("adaptive_avg_pool2d", nn.AdaptiveAvgPool2d, (Arg("output_size", "pair"),)),
    LayerKind("adaptive_max_pool2d", nn.AdaptiveMaxPool2d, (Arg("output_size", "pair"),
                                                            Arg("return_indices", default=False, omit=True))),
)
_BY_OP = {kind.op: kind for kind in LAYERS}
_BY_CLASS = {kind.cls: kind for kind in LAYERS}


def module_spec(mod: nn.Module) -> dict:
    """The spec of one module of a class in :data:`LAYERS` (or a ``SelectFeatures`` or an
    ``nn.Sequential`` of such modules); raises :class:`CheckpointError` for any other class."""
    cls = type(mod)
    if cls in _BY_CLASS:
        return _BY_CLASS[cls].spec(mod)
    if cls is SelectFeatures:
        return {"op": "select_features", "num_features": int(mod.index.numel())}
    if cls is nn.Sequential:
        return {"op": "sequential", "layers": {name: module_spec(child) for name, child in mod.named_children()}}
    raise CheckpointError(f"module class {cls.__module__}.{cls.__qualname__} cannot be saved")


def build_layer(spec: dict) -> nn.Module:
    """One module from one spec (its weights and buffers come from the state dict)."""
    op = spec.get("op") if isinstance(spec, dict) else None
    try:
        if op in _BY_OP:
            return _BY_OP[op].build(spec)
        if op == "select_features":
            count = spec["num_features"]
            if type(count) is not int or count < 0:
                raise ValueError(f"num_features {count!r:.40} is not a count")
            return SelectFeatures(torch.arange(count))  # on the meta device while a file is checked
        if op == "sequential":
            bad = [name for name in spec["layers"] if not is_layer_name(name)]
            if bad:  # torch.fx writes layer names into the source it generates when the model is traced
                raise CheckpointError(f"malformed architecture entry: layer name {bad[0]!r:.80} is not a plain "
                                      "identifier or index")
            return nn.Sequential(OrderedDict((name, build_layer(s)) for name, s in spec["layers"].items()))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"malformed architecture entry {spec!r:.120}: {type(exc).__name__} {exc}") from None
    raise CheckpointError(f"unknown layer {op!r:.60} in the architecture description; "
                          "the file was written by a newer budgetprune or is not a budgetprune file")


def build_sequential(specs: list[dict]) -> nn.Sequential:
    """The plain ``nn.Sequential`` a list of layer specs (format 1) describes."""
    return nn.Sequential(*[build_layer(s) for s in specs])
