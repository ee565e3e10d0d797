"""Subclasses of torch's Linear and Conv2d that compute what torch's class computes are pruned as it.

timm's ``Linear`` (``F.linear`` with the module's own weight and bias) stands for them: traced
through, the head convolution that feeds it stayed ungated. A convolution that pads its input by
the input's size first (timm's ``Conv2dSame``) slices like a convolution: pruned too, compacted in
its own class. A subclass that computes something else (a standardised weight) is still traced
through and leaves its writers ungated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from budgetprune import Pruner, layer_subclasses
from budgetprune.graph import ChannelGraph

from loops import pruning_steps


class CastLinear(nn.Linear):
    """timm's ``Linear`` in outline: the same product, written out."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class PlainConv(nn.Conv2d):
    """A subclass that keeps torch's forward."""


class StandardisedConv(nn.Conv2d):
    """Weight standardisation: not what nn.Conv2d computes."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class SamePadConv(nn.Conv2d):
    """TensorFlow's "same" padding worked out from the input's size (timm's ``Conv2dSame``), with
    a branch on that size that torch.fx cannot trace through."""

    def forward(self, x):
        pad_h = max((-(-x.shape[-2] // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - x.shape[-2], 0)
        pad_w = max((-(-x.shape[-1] // self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - x.shape[-1], 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Net(nn.Module):
    def __init__(self, conv=nn.Conv2d):
        super().__init__()
        self.conv1, self.bn1 = conv(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head_conv = PlainConv(8, 16, 1)
        self.classifier = CastLinear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.head_conv(x)).mean((2, 3))
        return self.classifier(x)


def test_layer_subclasses_that_compute_the_torch_layer_are_layers():
    torch.manual_seed(0)
    model = Net()
    graph = ChannelGraph.build(model, torch.randn(2, 3, 8, 8))
    assert layer_subclasses.computes_as_torch_layer(model.classifier)
    assert layer_subclasses.computes_as_torch_layer(model.head_conv)
    assert set(graph.groups) == {"conv1", "head_conv"}  # the head conv feeds a linear layer the graph sees
    assert set(graph.ungated) == {"classifier"}
    x = torch.randn(8, 3, 8, 8)
    pruner = Pruner(model, x[:2], "flops=0.5", total_steps=2, gate_init=3.0)
    pruning_steps(model, pruner, torch.optim.AdamW(pruner.parameters(lr=1e-3), lr=1e-3),
                  [(x, torch.randint(0, 5, (8,)))] * 2)
    small, report = pruner.finalize(x[:2])
    assert report["compaction_max_abs_diff"] <= 1e-5
    assert small.get_submodule("classifier").in_features < 16 or small.get_submodule("conv1").out_channels < 8


def test_a_subclass_that_computes_something_else_is_traced_through():
    torch.manual_seed(0)
    model = Net(conv=StandardisedConv)
    graph = ChannelGraph.build(model, torch.randn(2, 3, 8, 8))
    assert not layer_subclasses.computes_as_torch_layer(model.conv1)
    assert "conv1" not in graph.groups  # its functional conv: nothing writes a gated group there
    assert "conv1" not in [n.target for n in graph.gm.graph.nodes if n.op == "call_module"]
    assert "StandardisedConv computes something other than torch's Conv2d" in graph.ungated["conv1"]


class SameNet(nn.Module):
    """A stem, a depthwise and a pointwise convolution with "same" padding, strided."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn1 = SamePadConv(3, 8, 3, stride=2), nn.BatchNorm2d(8)
        self.dw, self.bn2 = SamePadConv(8, 8, 3, stride=2, groups=8), nn.BatchNorm2d(8)
        self.pw, self.bn3 = SamePadConv(8, 12, 1), nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.bn2(self.dw(F.relu(self.bn1(self.stem(x))))))
        return self.head(F.relu(self.bn3(self.pw(x))).mean((2, 3)))


def test_a_convolution_with_its_own_padding_is_pruned_and_keeps_its_class():
    torch.manual_seed(0)
    model = SameNet()
    x = torch.randn(8, 3, 11, 9)  # odd sizes: the padding is uneven
    graph = ChannelGraph.build(model, x[:2])
    assert not layer_subclasses.computes_as_torch_layer(model.stem)
    assert layer_subclasses.prunes_as_torch_layer(model.stem) and layer_subclasses.prunes_as_torch_layer(model.dw)
    assert set(graph.groups) == {"stem", "pw"} and graph.layers["dw"].depthwise and set(graph.ungated) == {"head"}
    pruner = Pruner(model, x[:2], "flops=0.4", total_steps=2, gate_init=3.0)
    pruning_steps(model, pruner, torch.optim.AdamW(pruner.parameters(lr=1e-3), lr=1e-3),
                  [(x, torch.randint(0, 5, (8,)))] * 2)
    small, report = pruner.finalize(x[:2])
    assert report["compaction_max_abs_diff"] <= 1e-5
    assert isinstance(small.get_submodule("stem"), SamePadConv) and isinstance(small.get_submodule("dw"), SamePadConv)
    assert small.get_submodule("stem").out_channels < 8 or small.get_submodule("pw").out_channels < 12
    with torch.no_grad():  # the padding is worked out again for another input size
        assert small(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_a_standardised_convolution_does_not_slice_like_one():
    torch.manual_seed(0)
    model = Net(conv=StandardisedConv)
    ChannelGraph.build(model, torch.randn(2, 3, 8, 8))
    assert not layer_subclasses.prunes_as_torch_layer(model.conv1)
