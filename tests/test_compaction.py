"""Compaction tests: the physically smaller network computes exactly what the gated one does.

For each model, BAR's gates are set to random values (some channels off, some with a
fractional gate 0 < ẑ < 1 that must be folded into the weights), the gated model is run in
eval mode, and the compacted plain ``nn.Sequential`` must give the same outputs, have the
widths of the masks and the parameter count the resource model predicts, and survive a
save/load round trip. Also: graph errors, and removing the gates restores the model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import budgetprune
from budgetprune.architecture import SelectFeatures
from budgetprune.attach import GateHooks
from budgetprune.budget import Budget
from budgetprune.errors import GraphError
from budgetprune.methods.bar import BAR
from budgetprune.resources import resource_report


class UserNet(nn.Module):
    """A user's model written with functional calls, with a BatchNorm *after* the ReLU."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 6 * 6, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = self.bn1(F.relu(self.conv1(x)))      # BN after the ReLU
        x = F.max_pool2d(x, 2)                   # 26 → 13
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.max_pool2d(x, 2)                   # 13 → 6
        x = x.view(x.size(0), -1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def _randomise_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.5)
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
                m.weight.copy_(torch.randn_like(m.weight))
                m.bias.copy_(torch.randn_like(m.bias))


def make_model(name: str):
    """(model, graph) for one of the four test models, on 1×28×28 inputs."""
    if name == "lenet5":
        model = budgetprune.create_model("lenet5")
        gate_inputs = False
    elif name == "lenet300":
        model = budgetprune.create_model("lenet300")
        gate_inputs = True
    elif name == "vgg_small":
        model = budgetprune.create_model("vgg_small", in_channels=1)
        gate_inputs = False
    else:
        model = UserNet()
        gate_inputs = False
    _randomise_bn(model)
    graph = budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 28, 28), gate_inputs=gate_inputs)
    return model, graph


MODELS = ["lenet5", "lenet300", "vgg_small", "user"]


def attach_random(model, graph, seed):
    torch.manual_seed(seed)
    bar = BAR()
    bar.attach(model, graph, [Budget("volume", 0.25)])
    with torch.no_grad():
        for g in bar.gates.values():
            g.log_alpha.copy_(torch.randn(g.num_channels) * 3.0)
            g.keep_at_least_one()
    return bar


def layer_modules(net):
    return [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]


def check_compaction(model, graph, bar, masks, x):
    bar.freeze(masks)
    model.eval()
    bar.eval()
    with torch.no_grad():
        gated = model(x)
    net, specs = budgetprune.compact(model, graph, masks, bar.gate_values())
    with torch.no_grad():
        small = net(x)
    assert small.shape == gated.shape
    assert float((gated - small).abs().max()) <= 1e-5
    assert float(gated.abs().max()) > 1e-3  # not a trivially-zero comparison

    # widths equal the mask sums, layer by layer
    layers = layer_modules(net)
    assert len(layers) == len(graph.layers)
    for mod, layer in zip(layers, graph.layers.values()):
        out = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
        expected = int(masks[layer.out_group].sum()) if layer.out_group else layer.out_channels
        assert out == expected, layer.name
    if "input" in graph.groups:
        sel = [m for m in net if isinstance(m, SelectFeatures)]
        assert len(sel) == 1
        assert torch.equal(sel[0].index, torch.nonzero(masks["input"]).flatten())
        assert layers[0].in_features == int(masks["input"].sum())
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == resource_report(graph, masks)["params"]
    return net, gated


@pytest.mark.parametrize("name", MODELS)
def test_compaction_matches_gated_model(name, tmp_path):
    model, graph = make_model(name)
    bar = attach_random(model, graph, seed=100 + MODELS.index(name))
    masks = bar.keep_masks()
    assert all(int(m.sum()) >= 1 for m in masks.values())
    # the random gates really exercise both pruning and folding
    values = bar.gate_values()
    assert any(not bool(m.all()) for m in masks.values())
    assert any(bool(((v > 0) & (v < 1)).any()) for v in values.values())
    torch.manual_seed(1)
    x = torch.randn(16, 1, 28, 28)
    net, gated = check_compaction(model, graph, bar, masks, x)

    # save / load round trip, safe loading
    path = tmp_path / "m.pt"
    budgetprune.save(net, path)
    again = budgetprune.load(path)
    with torch.no_grad():
        assert torch.equal(again(x), net(x))
    obj = torch.load(path, weights_only=True)
    assert isinstance(obj, dict)


@pytest.mark.parametrize("name", MODELS)
def test_compaction_one_channel_per_group(name):
    model, graph = make_model(name)
    # With one channel per layer a random ReLU path is often dead (the output is then the last
    # bias and says nothing about the folding): make every bias / BN shift positive so each kept
    # channel is active and its fractional gate ẑ shows in the output.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)) and m.bias is not None:
                m.bias.copy_(m.bias.abs() + 0.5)
    bar = attach_random(model, graph, seed=200 + MODELS.index(name))
    masks = {}
    torch.manual_seed(20)
    for key, gate in bar.gates.items():
        gid = bar.gid_of[key]
        i = int(torch.randint(gate.num_channels, ()))
        with torch.no_grad():
            gate.log_alpha[i] = float(torch.empty(()).uniform_(-1.0, 1.0))  # 0.22 < ẑ < 0.78
        m = torch.zeros(gate.num_channels, dtype=torch.bool)
        m[i] = True
        masks[gid] = m
    values = bar.gate_values()
    for gid, m in masks.items():
        assert 0.2 < float(values[gid][m]) < 0.8
    torch.manual_seed(2)
    x = torch.randn(8, 1, 28, 28) * 3
    check_compaction(model, graph, bar, masks, x)
    assert all(int(m.sum()) == 1 for m in masks.values())


@pytest.mark.parametrize("name", MODELS)
def test_compaction_full_masks_gate_ones_is_the_original_model(name):
    """Without pruning and with unit gates, the compacted net is the original function."""
    model, graph = make_model(name)
    model.eval()
    torch.manual_seed(3)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    net, _ = budgetprune.compact(model, graph)
    with torch.no_grad():
        assert float((net(x) - ref).abs().max()) <= 1e-5
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in model.parameters())


def test_user_net_graph_places_gate_after_bn():
    model, graph = make_model("user")
    assert set(graph.groups) == {"conv1", "conv2", "fc1"}
    assert graph.groups["conv1"].host == "bn1"
    assert graph.groups["conv2"].host == "bn2"
    assert graph.layers["fc1"].in_expansion == 36


# ---------------------------------------------------------------------------------------
# Graph errors
# ---------------------------------------------------------------------------------------
class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 28 * 28, 10)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        y = self.conv2(y) + y
        return self.fc(y.flatten(1))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 26 * 26, 10)

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.fc(F.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("model,shape", [
    (Residual(), (1, 1, 28, 28)),
    (DataDependent(), (1, 1, 28, 28)),
    (budgetprune.create_model("lenet5"), (1, 3, 28, 28)),
    (budgetprune.create_model("lenet5"), (1, 1, 8, 8)),
    (budgetprune.create_model("lenet300"), (1, 1, 20, 20)),
])
def test_graph_errors_are_one_line(model, shape):
    with pytest.raises(GraphError) as err:
        budgetprune.ChannelGraph.build(model, torch.zeros(*shape))
    msg = str(err.value)
    assert msg and "\n" not in msg


# ---------------------------------------------------------------------------------------
# Removing the gates
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_detach_restores_original_outputs(name):
    model, graph = make_model(name)
    model.eval()
    torch.manual_seed(4)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    bar = attach_random(model, graph, seed=300)
    bar.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x), ref)  # the gates act
    bar.detach()
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    bar.detach()  # idempotent
    with torch.no_grad():
        assert torch.equal(model(x), ref)


def test_gate_hooks_remove_restores_original_outputs():
    model, graph = make_model("lenet300")
    model.eval()
    torch.manual_seed(5)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    gates = {gid: (lambda n, c=g.channels: torch.full((c,), 0.5)) for gid, g in graph.groups.items()}
    hooks = GateHooks(model, graph, gates)
    with torch.no_grad():
        assert not torch.allclose(model(x), ref)
    hooks.remove()
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert not model.features[1]._forward_pre_hooks and not model.features[1]._forward_hooks


@pytest.mark.parametrize("name", MODELS)
def test_silenced_reopened_channels_preserve_function(name):
    """A channel reopened with gate 1 and zeroed outgoing weights changes no output."""
    from budgetprune.compact import silence_channels
    model, graph = make_model(name)
    bar = attach_random(model, graph, seed=300 + MODELS.index(name))
    masks = bar.keep_masks()
    torch.manual_seed(3)
    x = torch.randn(8, 1, 28, 28)
    net_before, gated = check_compaction(model, graph, bar, masks, x)
    reopened = {gid: torch.nonzero(~m).flatten()[:3] for gid, m in masks.items()}
    assert sum(i.numel() for i in reopened.values()) > 0
    zeroed = silence_channels(model, graph, reopened)
    assert zeroed > 0
    values = bar.gate_values()
    grown = {gid: m.clone() for gid, m in masks.items()}
    for gid, idx in reopened.items():
        grown[gid][idx] = True
        values[gid] = values[gid].clone()
        values[gid][idx] = 1.0
    values = {gid: values[gid] * grown[gid].float() for gid in grown}
    bar.freeze(grown, values)
    net, _ = budgetprune.compact(model, graph, grown, values)
    with torch.no_grad():
        assert float((net(x) - gated).abs().max()) <= 1e-5
        assert float((model(x) - gated).abs().max()) <= 1e-5
    assert sum(p.numel() for p in net.parameters()) > sum(p.numel() for p in net_before.parameters())
    # the reopened channels are live: their outgoing weights get gradients
    net.train()
    net(x).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
