"""Ops the graph does not know, and squeeze-and-excitation scales.

* An unknown op with one tensor input is probed: it passes channels through when running it
  shows it works channel by channel (stochastic depth, a custom activation, an upsampling);
  an op that maps 0 to something else is masked when it is a module; one that mixes channels
  leaves its writers ungated.
* The conv computing a squeeze-and-excitation scale follows the channels it scales: its rows
  are removed with them (its FLOPs and parameters shrink), and outputs stay equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from budgetprune import Pruner
from budgetprune.compact import compact
from budgetprune.graph import ChannelGraph
from budgetprune.resources import CostModel

from loops import pruning_steps


@fx.wrap
def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth as timm and torchvision write it: a leaf function for torch.fx."""
    if not training or p == 0.0:
        return x
    keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= p
    return x * keep / (1.0 - p)


@fx.wrap
def shift_activation(x: torch.Tensor) -> torch.Tensor:
    """Maps 0 to 0.1: channel by channel, but a dead channel would come back."""
    return F.relu(x) + 0.1


@fx.wrap
def mix_channels(x: torch.Tensor) -> torch.Tensor:
    """Channel c reads channel c+1: not channel by channel."""
    return x + x.roll(1, dims=1)


class Net(nn.Module):
    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.shift = nn.LogSigmoid()  # a leaf module the graph's table does not list; maps 0 to log ½
        self.row_norm = nn.LayerNorm(8)  # over each row of the map: channel by channel, maps 0 to its bias
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        if self.op == "drop_path":
            y = drop_path(y, 0.2, self.training)
        elif self.op == "upsample":
            y = F.max_pool2d(F.interpolate(y, scale_factor=2.0, mode="nearest"), 2)
        elif self.op == "shift_function":
            y = shift_activation(y)
        elif self.op == "shift_module":
            y = self.shift(y)
        elif self.op == "row_norm":
            y = self.row_norm(y)
        elif self.op == "mix":
            y = mix_channels(y)
        y = F.relu(self.c2(y))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _graph(op):
    return ChannelGraph.build(Net(op), torch.randn(2, 3, 8, 8))


def test_ops_that_work_channel_by_channel_pass_channels_through():
    for op in ("drop_path", "upsample"):
        graph = _graph(op)
        assert "c1" in graph.groups and "c1" not in graph.ungated, op
        assert not graph.renormalisers, op


def test_an_op_that_maps_zero_elsewhere_is_masked_as_a_module_and_refused_as_a_function():
    graph = _graph("shift_module")
    assert "c1" in graph.groups and any("LogSigmoid" in what for what in graph.renormalisers.values())
    graph = _graph("shift_function")
    assert "c1" not in graph.groups and "maps 0 to a non-zero value" in graph.ungated["c1"]


def test_an_op_that_mixes_channels_leaves_its_writer_ungated_with_its_name():
    graph = _graph("mix")
    assert "c1" not in graph.groups
    assert "mix_channels" in graph.ungated["c1"] and "cannot prune through" in graph.ungated["c1"]


def test_probed_ops_prune_and_compact_with_equal_outputs():
    for op in ("drop_path", "upsample", "shift_module"):
        torch.manual_seed(0)
        model = Net(op)
        x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
        pruner = Pruner(model, x, "flops=0.5", method="magnitude", total_steps=2)
        pruning_steps(model, pruner, torch.optim.SGD(pruner.parameters(lr=0.05), lr=0.05), [(x, y)] * 2)
        small, report = pruner.finalize(x)
        assert report["compaction_max_abs_diff"] <= 1e-5, op
        assert small.c1.out_channels < 8, op


class SE(nn.Module):
    def __init__(self, c: int, functional: bool):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // 2, 1)
        self.fc2 = nn.Conv2d(c // 2, c, 1)
        self.act = nn.Hardsigmoid()
        self.functional = functional

    def forward(self, x):
        s = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        return x * (torch.sigmoid(s) if self.functional else self.act(s))


class SENet(nn.Module):
    def __init__(self, functional: bool = False):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.BatchNorm2d(16)
        self.se = SE(16, functional)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = self.se(F.relu(self.b1(self.c1(x))))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.c2(y)), 1).flatten(1))


def test_a_squeeze_and_excitation_scale_follows_the_channels_it_scales():
    for functional in (False, True):
        model = SENet(functional).eval()
        x = torch.randn(2, 3, 8, 8)
        graph = ChannelGraph.build(model, x)
        assert graph.layers["se.fc2"].follows is not None and "se.fc2" not in graph.groups
        assert {"c1", "se.fc1", "c2"} <= set(graph.groups) and not graph.ungated.keys() - {"fc"}
        masks = {gid: torch.ones(g.channels, dtype=torch.bool) for gid, g in graph.groups.items()}
        masks["c1"] = torch.arange(16) % 4 != 0  # 12 of 16 kept
        small = compact(model, graph, masks)
        assert small.se.fc2.out_channels == 12 and small.se.fc1.in_channels == 12
        # FLOPs of the scale conv count its kept rows: 8 inputs × 12 outputs on a 1×1 map
        full, pruned = CostModel(graph, "flops").per_layer(), CostModel(graph, "flops").per_layer(masks)
        assert full["se.fc2"] == 8 * 16 and pruned["se.fc2"] == 8 * 12


def test_a_squeeze_and_excitation_network_prunes_with_equal_outputs():
    for functional in (False, True):
        torch.manual_seed(0)
        model = SENet(functional)
        x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
        pruner = Pruner(model, x, "flops=0.5", total_steps=3)
        pruning_steps(model, pruner, torch.optim.SGD(pruner.parameters(lr=0.05), lr=0.05), [(x, y)] * 3)
        small, report = pruner.finalize(x)
        assert report["compaction_max_abs_diff"] <= 1e-5
        assert small.se.fc2.out_channels == small.c1.out_channels


def test_a_module_with_parameters_is_masked_even_where_it_maps_zero_to_zero_today():
    """The LayerNorm's bias starts at 0 (0 ↦ 0 at build time) but training moves it: masked."""
    graph = _graph("row_norm")
    assert "c1" in graph.groups and any("LayerNorm" in what for what in graph.renormalisers.values())
