"""Grouped convolutions (ResNeXt, RegNet): channels tied across conv groups, pruned and compacted.

A grouped conv with g groups can only become a smaller grouped conv when each of its groups
keeps the same positions, so the layer writing its input and its own outputs are tied with a
period of (channels per conv group). These tests check the ties in the graph, in the gates,
in the budget projection, in the costs (against FLOPs counted on the compacted network) and in
compaction (outputs equal to the gated network), for every family of method.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from budgetprune import Pruner, enforce_budget, parse_budget
from budgetprune.budget import fill_budget, reopenable_channels, tie_masks
from budgetprune.compact import compact, silence_channels
from budgetprune.graph import ChannelGraph
from budgetprune.resources import CostModel

from loops import pruning_steps, randomise_batchnorms


class Bottleneck(nn.Module):
    """A ResNeXt bottleneck: 1×1 → grouped 3×3 → 1×1, added to the residual signal."""

    def __init__(self, c: int = 16, width: int = 32, groups: int = 8, residual_read: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.c1 = nn.Conv2d(c, width, 1, bias=False)
        self.b1 = nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False)
        self.b2 = nn.BatchNorm2d(width)
        self.c3 = nn.Conv2d(width, c, 1, bias=False)
        self.b3 = nn.BatchNorm2d(c)
        self.g2 = nn.Conv2d(c, c, 3, padding=1, groups=4, bias=False)  # reads the residual sum itself
        self.fc = nn.Linear(c, 10)
        self.residual_read = residual_read

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.b2(self.c2(y)))
        x = F.relu(x + self.b3(self.c3(y)))
        if self.residual_read:
            x = F.relu(self.g2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_the_graph_ties_a_grouped_conv_s_input_writer_and_its_outputs():
    graph = ChannelGraph.build(Bottleneck(), torch.randn(2, 3, 8, 8))
    assert graph.groups["c1"].units == 4 and graph.groups["c2"].units == 4  # 32 channels / 8 conv groups
    assert graph.groups["stem"].units == 16 and graph.groups["c3"].units == 16
    assert graph.groups["c1"].members(5) == (1, 5, 9, 13, 17, 21, 25, 29)
    assert graph.layers["c2"].groups == 8
    assert "4 units, tied across 8 conv groups" in graph.summary()
    assert not any("grouped" in why for why in graph.ungated.values())


def test_a_grouped_conv_reading_a_residual_sum_leaves_its_writers_ungated_with_the_reason():
    graph = ChannelGraph.build(Bottleneck(residual_read=True), torch.randn(2, 3, 8, 8))
    assert "stem" not in graph.groups and "c3" not in graph.groups
    assert "grouped convolution 'g2'" in graph.ungated["stem"]
    assert "c1" in graph.groups and graph.groups["c1"].units == 4  # the block's inside is still pruned
    assert graph.groups["g2"].units == 4  # g2's own outputs: 16 channels / 4 conv groups


def test_the_projection_keeps_tied_channels_together_and_meets_the_budget():
    torch.manual_seed(0)
    model = Bottleneck()
    graph = ChannelGraph.build(model, torch.randn(2, 3, 8, 8))
    scores = {gid: torch.rand(g.channels) for gid, g in graph.groups.items()}
    masks = {gid: torch.rand(g.channels) > 0.3 for gid, g in graph.groups.items()}  # untied on purpose
    budget = parse_budget("0.4", metric="flops")
    final = enforce_budget(graph, masks, scores, budget)
    for gid, g in graph.groups.items():
        rows = final[gid].view(-1, g.units)
        assert bool((rows == rows[0]).all()), gid
    cm = CostModel(graph, "flops")
    assert cm.hard(final) <= budget.absolute(graph) * (1 + 1e-9)
    filled = fill_budget(graph, final, scores, budget, reopenable=reopenable_channels(graph, final))
    assert cm.hard(filled) <= budget.absolute(graph) * (1 + 1e-9)
    assert all(bool((filled[g].view(-1, graph.groups[g].units) == filled[g].view(-1, graph.groups[g].units)[0]).all())
               for g in filled)
    tied = tie_masks(graph, {"c1": torch.tensor([True] + [False] * 31)})["c1"]
    assert tied.tolist() == [i % 4 == 0 for i in range(32)]


def _conv_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of every conv/linear, counted from the modules the network runs."""
    total = 0

    def count(mod, inputs, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            per_out = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            total += out[0].numel() * per_out
        else:
            total += out.shape[-1] * mod.in_features
    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    return total


def test_flops_of_a_tied_mask_equal_the_macs_of_the_compacted_grouped_network():
    torch.manual_seed(0)
    model = Bottleneck().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = ChannelGraph.build(model, x)
    cm = CostModel(graph, "flops")
    assert cm.full() == pytest.approx(_conv_macs(model, x))
    masks = tie_masks(graph, {gid: torch.rand(g.channels) > 0.5 for gid, g in graph.groups.items()})
    masks["stem"][0] = True
    small = compact(model, graph, masks)
    assert cm.hard(masks) == pytest.approx(_conv_macs(small, x))
    assert small.c2.groups == 8 and small.c2.in_channels == int(masks["c1"].sum())


@pytest.mark.parametrize("method", ["bar", "l0", "cs", "morphnet", "magnitude", "vq", "id", "sensitivity"])
def test_every_method_prunes_a_grouped_block_to_the_budget_with_equal_outputs(method):
    torch.manual_seed(0)
    model = Bottleneck()
    randomise_batchnorms(model)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    pruner = Pruner(model, x, "flops=0.5", method=method, total_steps=4)
    pruning_steps(model, pruner, torch.optim.SGD(pruner.parameters(lr=0.05), lr=0.05), [(x, y)] * 4)
    small, report = pruner.finalize(x)
    assert report["compaction_max_abs_diff"] <= 1e-5
    assert report["pruned"]["flops"] <= pruner.budget.absolute(pruner.graph) * (1 + 1e-9)
    assert small.c2.groups == 8
    assert small.c2.in_channels % 8 == 0 and small.c2.out_channels % 8 == 0


def test_the_regular_block_compacts_a_grouped_bottleneck_with_equal_outputs():
    torch.manual_seed(0)
    model = Bottleneck()
    randomise_batchnorms(model)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    pruner = Pruner(model, x, "flops=0.7", method="magnitude", block="regular", total_steps=1)
    pruning_steps(model, pruner, torch.optim.SGD(pruner.parameters(lr=0.05), lr=0.05), [(x, y)])
    small, report = pruner.finalize(x)
    assert report["compaction_max_abs_diff"] <= 1e-5
    assert small.c2.groups == 8


def test_silencing_reopened_channels_read_by_a_grouped_conv_keeps_the_function():
    """A reopened channel's outgoing weights are zeroed only in its own conv group's rows."""
    torch.manual_seed(0)
    model = Bottleneck().eval()
    randomise_batchnorms(model)
    x = torch.randn(4, 3, 8, 8)
    graph = ChannelGraph.build(model, x)
    masks = {gid: torch.ones(g.channels, dtype=torch.bool) for gid, g in graph.groups.items()}
    masks["c1"] = torch.tensor([i % 4 != 1 for i in range(32)])  # unit 1 closed in every conv group
    before = compact(model, graph, masks)(x)
    reopened = {"c1": torch.tensor([c for c in range(32) if c % 4 == 1])}
    zeroed = silence_channels(model, graph, reopened)
    assert zeroed == 8 * 4 * 9  # 8 channels, each read by the 4 outputs of its conv group, 3×3 kernels
    after = compact(model, graph, {**masks, "c1": torch.ones(32, dtype=torch.bool)})(x)
    assert torch.allclose(before, after, atol=1e-5)
    w = model.c2.weight.detach()
    assert float(w[0:4, 1].abs().sum()) == 0.0 and float(w[4:8, 1].abs().sum()) == 0.0
    assert float(w[0:4, 0].abs().sum()) > 0.0


@pytest.mark.parametrize("method", ["bar", "l0", "constrained-l0", "ib"])
def test_per_channel_quantities_computed_together_equal_each_gates_own(method):
    """GatedMethod.per_channel joins the Hard Concrete gates' log α and computes a quantity once: the
    values (tied units expanded to their channels) and the gradients are each gate's own."""
    torch.manual_seed(0)
    model = Bottleneck(residual_read=True)
    pruner = Pruner(model, torch.randn(2, 3, 8, 8), "flops=0.5", method=method, total_steps=10)
    gates = pruner.method.gates
    with torch.no_grad():
        for gate in gates.values():
            for p in gate.parameters():
                p.copy_(torch.randn(p.shape) * 2)
    for quantity in ("deterministic", "prob_nonzero", "keep_score", "keep_mask"):
        if not hasattr(next(iter(gates.values())), quantity):
            continue
        joint, own = pruner.method.per_channel(quantity), pruner.method.by_group(lambda g: getattr(g, quantity)())
        assert joint.keys() == own.keys() and joint["c1"].shape == (32,)  # 4 units tied across 8 groups
        for gid in own:
            torch.testing.assert_close(joint[gid], own[gid], rtol=0, atol=0, msg=f"{quantity} {gid}")
    if method != "ib":
        weights = {gid: torch.rand(t.shape) for gid, t in own.items()}
        grads = []
        for values in (pruner.method.per_channel("prob_nonzero"),
                       pruner.method.by_group(lambda g: g.prob_nonzero())):
            pruner.method.zero_grad()
            sum((weights[g] * v).sum() for g, v in values.items()).backward()
            grads.append({k: p.grad.clone() for k, p in pruner.method.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(gates)
        for k in grads[0]:
            torch.testing.assert_close(grads[0][k], grads[1][k], msg=k)


@pytest.mark.parametrize("budget, tied", [(0.3, True), (0.5, False)])
def test_padded_widths_pad_each_conv_group_alike_or_fall_back_to_exact_tied_channels(budget, tied):
    """Three conv groups of 32: the tied channels pad per conv group (each group keeps a
    multiple of 8: the width splits into equal groups, which a total padded to 8 would not, e.g.
    80 into 3). Where those steps of 3 × 8 channels cannot end within 0.95 of the budget, finalize
    keeps the same padding with the tied channels exact (the rest still padded). Either way the
    budget is met and the compacted network computes the gated one's outputs."""
    torch.manual_seed(0)
    model = Bottleneck(c=48, width=96, groups=3)
    randomise_batchnorms(model)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    logs = []
    pruner = Pruner(model, x, f"flops={budget}", total_steps=2, method="magnitude", log=logs.append)
    assert pruner.graph.groups["c1"].units == 32  # 96 channels tied with a period of 32
    optimizer = torch.optim.SGD(pruner.parameters(lr=1e-3), lr=1e-3)
    pruning_steps(model, pruner, optimizer, [(x, y)] * 2)
    small, report = pruner.finalize(x)
    assert report["padding"][0] == 8 and report["pad_tied"] is tied and report["compaction_max_abs_diff"] <= 1e-5
    assert 0.95 <= report["pruned"]["flops"] / pruner.budget.absolute(pruner.graph) <= 1.0
    convs = dict(small.named_modules())
    assert convs["c2"].groups == 3 and convs["c2"].out_channels % 3 == 0
    assert convs["stem"].out_channels % 8 == 0  # the residual stream (48 channels) is padded
    per_group = [convs["c2"].in_channels // 3, convs["c2"].out_channels // 3]
    assert all(n % 8 == 0 for n in per_group) == tied, per_group
    assert any("grouped conv exact" in line for line in logs) == (not tied)
    assert report["plan"]["version"] == (5 if tied else 2)


@pytest.mark.parametrize("block", ["mixed", "regular"])
def test_each_block_kind_pads_a_grouped_conv_per_conv_group(block):
    """Mixed and regular blocks alike pad a grouped conv's tied channels per conv group, and the
    compacted network computes the gated one's outputs on budget."""
    torch.manual_seed(0)
    model = Bottleneck(c=48, width=96, groups=3)
    randomise_batchnorms(model)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    pruner = Pruner(model, x, "flops=0.3", total_steps=2, method="magnitude", block=block)
    pruning_steps(model, pruner, torch.optim.SGD(pruner.parameters(lr=1e-3), lr=1e-3), [(x, y)] * 2)
    small, report = pruner.finalize(x)
    assert report["pad_tied"] and report["compaction_max_abs_diff"] <= 1e-5
    assert 0.95 <= report["pruned"]["flops"] / pruner.budget.absolute(pruner.graph) <= 1.0
    assert small.c2.groups == 3 and small.c2.in_channels % 24 == 0 and small.c2.out_channels % 24 == 0
