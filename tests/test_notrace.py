"""Models that torch.fx cannot trace through, whose package marks the untraceable parts (timm's
``register_notrace_module`` / ``register_notrace_function``): budgetprune traces them with those
parts whole, as the package itself does, and prunes the rest."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import budgetprune
import budgetprune.io
from budgetprune import Pruner
from budgetprune.errors import GraphError
from budgetprune.graph import ChannelGraph, trace


class PoolIfLarge(nn.Module):
    """A head that pools only maps larger than its kernel: control flow on the input's shape."""

    def forward(self, x):
        if x.shape[-1] > 2:
            x = F.adaptive_avg_pool2d(x, 2)
        return x


def scale_by_size(x):
    """A function that branches on its input's size."""
    return x * 0.5 if x.shape[-1] > 4 else x


class StdSameConv(nn.Conv2d):
    """A standardised convolution padding by its input's size (timm's ``StdConv2dSame``): marked,
    but a Conv2d, and not one the graph can prune (its weight is standardised as a whole)."""

    def forward(self, x):
        pad = self.kernel_size[0] - 1 if x.shape[-1] > 1 else 0
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(F.pad(x, (0, pad, 0, pad)), w, self.bias, self.stride, self.padding)


class Net(nn.Module):
    def __init__(self, conv=nn.Conv2d):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = conv(8, 8, 3, padding=1)
        self.head_pool = PoolIfLarge()
        self.fc = nn.Linear(8 * 4, 10)

    def forward(self, x):
        x = scale_by_size(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return self.fc(self.head_pool(x).flatten(1))


@pytest.fixture
def marks(monkeypatch):
    """A package registry of marked modules and functions, as timm keeps it."""
    registry = types.ModuleType("timm.layers._fx")
    registry.get_notrace_modules = lambda: [PoolIfLarge, StdSameConv]
    registry.get_notrace_functions = lambda: [scale_by_size]
    monkeypatch.setitem(__import__("sys").modules, "timm.layers._fx", registry)
    return registry


def test_without_marks_the_model_cannot_be_traced(monkeypatch):
    monkeypatch.delitem(__import__("sys").modules, "timm.layers._fx", raising=False)
    with pytest.raises(GraphError, match="cannot trace Net with torch.fx"):
        trace(Net())


def test_marked_modules_and_functions_are_traced_whole_and_the_rest_is_pruned(marks, tmp_path):
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(4, 3, 8, 8)
    gm = trace(model)
    calls = {n.target for n in gm.graph.nodes if n.op in ("call_module", "call_function")}
    assert "head_pool" in calls and scale_by_size in calls  # one node each
    graph = ChannelGraph.build(model, x)
    assert set(graph.groups) == {"conv1", "conv2"}  # the ops around them are probed as any unknown op
    pruner = Pruner(model, x, "flops=0.6", total_steps=2)
    opt = torch.optim.SGD(pruner.parameters(lr=0.01), lr=0.01)
    for _ in range(2):
        loss = F.cross_entropy(model(x), torch.arange(4)) + pruner.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
    small, report = pruner.finalize(x)
    assert report["compaction_max_abs_diff"] <= 1e-5
    assert report["pruned"]["flops"] <= pruner.budget.absolute(pruner.graph) * (1 + 1e-9)
    assert small(x).shape == (4, 10)
    budgetprune.save(small, tmp_path / "net.pt")  # the marked parts are no safe ops: saved as a plan
    again = budgetprune.io.load_file(tmp_path / "net.pt", model=Net())[0]  # replayed on a fresh trace
    with torch.no_grad():
        assert torch.allclose(again(x), small(x), atol=1e-6)


def test_a_marked_subclass_of_a_layer_is_not_taken_for_the_layer(marks):
    """A marked Conv2d subclass that does not prune like a convolution stays traced through (called
    whole, the graph would read it as a plain Conv2d): the trace fails as before, with the plain
    trace's error."""
    with pytest.raises(GraphError, match="cannot trace Net with torch.fx"):
        trace(Net(conv=StdSameConv))
