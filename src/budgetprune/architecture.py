"""Architecture descriptions: a JSON-able list of layer specs ↔ a plain ``nn.Sequential``.

A pruned model is stored as this description plus its weights, so it can be rebuilt
without the original model code and without unpickling arbitrary objects.
"""

from __future__ import annotations

from torch import nn
import torch

from .errors import CheckpointError


class SelectFeatures(nn.Module):
    """Keeps the input features listed in ``index`` (the kept inputs of a pruned MLP)."""

    def __init__(self, index: list[int] | torch.Tensor):
        super().__init__()
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} features"


def _pair(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


def build_layer(spec: dict) -> nn.Module:
    """One module from one spec entry."""
    op = spec.get("op")
    s = {k: v for k, v in spec.items() if k != "op"}
    try:
        if op == "conv2d":
            return nn.Conv2d(s["in_channels"], s["out_channels"], _pair(s["kernel_size"]), _pair(s["stride"]),
                             _pair(s["padding"]), _pair(s["dilation"]), s["groups"], s["bias"])
        if op == "linear":
            return nn.Linear(s["in_features"], s["out_features"], s["bias"])
        if op in ("batch_norm2d", "batch_norm1d"):
            cls = nn.BatchNorm2d if op == "batch_norm2d" else nn.BatchNorm1d
            return cls(s["num_features"], s["eps"], s["momentum"], s["affine"], s["track_running_stats"])
        if op == "select_features":
            return SelectFeatures(list(range(s["num_features"])))
        if op == "flatten":
            return nn.Flatten(s.get("start_dim", 1), s.get("end_dim", -1))
        simple = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "tanh": nn.Tanh,
                  "hardswish": nn.Hardswish, "mish": nn.Mish, "identity": nn.Identity}
        if op in simple:
            return simple[op]()
        if op == "leaky_relu":
            return nn.LeakyReLU(s["negative_slope"])
        if op == "elu":
            return nn.ELU(s["alpha"])
        if op == "gelu":
            return nn.GELU(approximate=s["approximate"])
        if op == "dropout":
            return nn.Dropout(s["p"])
        if op == "dropout2d":
            return nn.Dropout2d(s["p"])
        if op == "max_pool2d":
            return nn.MaxPool2d(_pair(s["kernel_size"]), _pair(s["stride"]), _pair(s["padding"]),
                                _pair(s["dilation"]), ceil_mode=s["ceil_mode"])
        if op == "avg_pool2d":
            return nn.AvgPool2d(_pair(s["kernel_size"]), _pair(s["stride"]), _pair(s["padding"]),
                                ceil_mode=s["ceil_mode"], count_include_pad=s["count_include_pad"])
        if op == "adaptive_avg_pool2d":
            return nn.AdaptiveAvgPool2d(_pair(s["output_size"]))
        if op == "adaptive_max_pool2d":
            return nn.AdaptiveMaxPool2d(_pair(s["output_size"]))
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"malformed architecture entry {spec}: {exc}") from None
    raise CheckpointError(f"unknown layer '{op}' in the architecture description; "
                          "the file was written by a newer budgetprune")


def build_sequential(specs: list[dict]) -> nn.Sequential:
    """The plain ``nn.Sequential`` an architecture description describes."""
    return nn.Sequential(*[build_layer(s) for s in specs])
