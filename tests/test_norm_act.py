"""A BatchNorm with its own activation (timm's ``BatchNormAct2d``) is pruned as a BatchNorm.

The stand-in below is written as timm writes it: a subclass of ``nn.BatchNorm2d`` whose forward
calls ``F.batch_norm`` and then its ``drop`` and ``act`` submodules. Traced through it would be a
functional batch norm the graph cannot gate; kept whole, it hosts its convolution's gate, the
gate goes between the normalisation and the activation (also per example), and compaction keeps
the activation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from budgetprune import Pruner, norm_act
from budgetprune.attach import GateHooks
from budgetprune.compact import compact
from budgetprune.graph import ChannelGraph

from loops import pruning_steps


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` in outline: batch norm, then dropout and activation modules."""

    def __init__(self, channels: int, act: nn.Module):
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = act

    def forward(self, x):
        use_batch = self.training or self.running_mean is None
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, use_batch,
                         self.momentum, self.eps)
        return self.act(self.drop(x))


class ActThenNorm(nn.BatchNorm2d):
    """Not a norm-activation module: its activation runs first."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.act = nn.SiLU()

    def forward(self, x):
        return F.batch_norm(self.act(x), self.running_mean, self.running_var, self.weight, self.bias,
                            self.training, self.momentum, self.eps)


class RenamedBatchNorm(nn.BatchNorm2d):
    """A subclass that keeps torch's forward: a BatchNorm."""


class Net(nn.Module):
    def __init__(self, norm=None):
        super().__init__()
        norm = norm or (lambda c, act: BatchNormAct2d(c, act))
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), norm(8, nn.SiLU())
        self.conv2, self.bn2 = nn.Conv2d(8, 12, 3, padding=1), norm(12, nn.ReLU())
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.head(x.mean((2, 3)))


def _net(norm=None) -> Net:
    torch.manual_seed(0)
    model = Net(norm)
    with torch.no_grad():  # statistics and affine parameters away from their defaults
        for bn in [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]:
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model


def test_a_batchnorm_with_its_activation_hosts_its_convolutions_gate():
    model = _net()
    graph = ChannelGraph.build(model, torch.randn(2, 3, 8, 8))
    assert {g.host for g in graph.groups.values()} == {"bn1", "bn2"}
    assert set(graph.ungated) == {"head"}  # the classifier only
    assert [n.target for n in graph.gm.graph.nodes if n.op == "call_module"] == ["conv1", "bn1", "conv2", "bn2", "head"]


def test_a_batchnorm_subclass_with_torchs_forward_is_a_batchnorm():
    model = _net(lambda c, act: nn.Sequential(RenamedBatchNorm(c), act))
    x = torch.randn(8, 3, 8, 8)
    graph = ChannelGraph.build(model, x[:2])  # traced through, its input check would stop the trace
    assert {g.host for g in graph.groups.values()} == {"bn1.0", "bn2.0"}
    pruner = Pruner(model, x[:2], "flops=0.5", total_steps=4, gate_init=3.0)
    pruning_steps(model, pruner, torch.optim.AdamW(pruner.parameters(lr=1e-3), lr=1e-3),
                  [(x, torch.randint(0, 5, (8,)))] * 2)
    small, report = pruner.finalize(x[:2])
    assert report["compaction_max_abs_diff"] <= 1e-5
    assert isinstance(dict(small.named_modules())["bn1.0"], RenamedBatchNorm)


def test_other_batchnorm_subclasses_are_traced_through():
    assert not norm_act.is_norm_act(ActThenNorm(4))  # its activation first: act(x) then BN
    assert not norm_act.is_norm_act(BatchNormAct2d(4, nn.Sigmoid()))  # maps 0 to 0.5: a dead channel would live
    assert not norm_act.is_norm_act(nn.BatchNorm2d(4))  # torch's own: a leaf of its own
    model = _net(lambda c, act: ActThenNorm(c))
    graph = ChannelGraph.build(model, torch.randn(2, 3, 8, 8))
    assert "bn1" not in [n.target for n in graph.gm.graph.nodes if n.op == "call_module"]
    assert "conv1" in graph.ungated  # the functional batch norm blocks it, as before


class _Gate:
    """Fixed per-example values between 0 and 1."""
    nonnegative = True

    def __init__(self, values):
        self.values = values

    def __call__(self, batch_size=None):
        return self.values[:batch_size]


def test_a_per_example_gate_multiplies_the_normalised_map_before_the_activation():
    model = _net().train()
    graph = ChannelGraph.build(model, torch.randn(2, 3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    gen = torch.Generator().manual_seed(1)
    z = {gid: 0.2 + 0.6 * torch.rand(4, g.channels, generator=gen) for gid, g in graph.groups.items()}

    def by_hand(after_act: bool):
        h = x
        for conv, bn, gid in ((model.conv1, model.bn1, "conv1"), (model.conv2, model.bn2, "conv2")):
            y = F.batch_norm(conv(h), None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
            zz = z[gid][:, :, None, None]
            h = bn.act(y) * zz if after_act else bn.act(y * zz)
        return model.head(h.mean((2, 3)))

    hooks = GateHooks(model, graph, {gid: _Gate(v) for gid, v in z.items()})
    with torch.no_grad():
        gated = model(x)
        between, after = by_hand(False), by_hand(True)
    hooks.remove()
    assert not torch.allclose(between, after, atol=1e-3)  # SiLU: where the gate goes matters
    torch.testing.assert_close(gated, between, rtol=1e-5, atol=1e-6)


def test_a_pruned_network_of_norm_activation_modules_compacts_to_equal_outputs():
    model = _net()
    x = torch.randn(8, 3, 8, 8)
    pruner = Pruner(model, x[:2], "flops=0.5", total_steps=4, gate_init=3.0)
    opt = torch.optim.AdamW(pruner.parameters(lr=1e-3), lr=1e-3)
    pruning_steps(model, pruner, opt, [(x, torch.randint(0, 5, (8,)))] * 2)
    small, report = pruner.finalize(x[:2])
    assert report["compaction_max_abs_diff"] <= 1e-5
    assert report["pruned"]["flops"] <= 0.5 * pruner.full["flops"]
    kept = dict(small.named_modules())
    assert isinstance(kept["bn1"], BatchNormAct2d) and isinstance(kept["bn1"].act, nn.SiLU)
    assert kept["bn1"].num_features == kept["conv1"].out_channels < 8 or \
        kept["bn2"].num_features == kept["conv2"].out_channels < 12


def test_a_gate_folded_into_a_norm_activation_module_scales_before_the_activation():
    model = _net().eval()
    graph = ChannelGraph.build(model, torch.randn(2, 3, 8, 8))
    masks = {"conv1": torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool),
             "conv2": torch.ones(12, dtype=torch.bool)}
    values = {"conv1": torch.linspace(0.2, 0.9, 8), "conv2": torch.linspace(0.3, 1.0, 12)}
    x = torch.randn(4, 3, 8, 8)
    hooks = GateHooks(model, graph, {gid: (lambda n, v=values[gid] * masks[gid]: v) for gid in values})
    with torch.no_grad():
        gated = model(x)
    hooks.remove()
    small = compact(model, graph, masks, values)
    assert small.bn1.num_features == 6 and isinstance(small.bn1.act, nn.SiLU)
    with torch.no_grad():
        torch.testing.assert_close(small(x), gated, rtol=1e-5, atol=1e-5)


def test_timm_batchnorm_act_hosts_gates_when_timm_is_installed():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    graph = ChannelGraph.build(model, torch.randn(2, 3, 32, 32))
    hosts = {g.host for g in graph.groups.values()}
    assert "bn1" in hosts and all("batch_norm" not in why for why in graph.ungated.values())
