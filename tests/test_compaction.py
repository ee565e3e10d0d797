"""Compaction tests: the physically smaller network computes exactly what the gated one does.

For each model, BAR's gates are set to random values (some channels off, some with a
fractional gate 0 < ẑ < 1 that must be folded into the weights), the gated model is run in
eval mode, and the compacted ``GraphModule`` must give the same outputs (mixed-connectivity
and regular blocks), have the widths and the parameter count the resource model predicts,
and survive a save/load round trip. Also: depth determination, the fatal-pruning guard,
graph groups by hand, graph errors, and removing the gates restores the model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import budgetprune
from budgetprune.attach import GateHooks
from budgetprune.budget import Budget
from budgetprune.errors import GraphError
from budgetprune.liveness import effective_masks, slot_sets
from budgetprune.methods.bar import BAR
from budgetprune.ops import index_add_channels
from budgetprune.resources import CostModel, resource_report

from loops import randomise_batchnorms


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
    """(model, graph) for one of the test models, on 1×28×28 inputs."""
    if name == "user":
        model = UserNet()
    elif name == "wrn":
        model = budgetprune.create_model("wrn", depth=10, width=2)
    elif name == "vgg_small":
        model = budgetprune.create_model("vgg_small", in_channels=1)
    else:
        model = budgetprune.create_model(name)
    _randomise_bn(model)
    graph = budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 28, 28), gate_inputs=name == "lenet300")
    return model, graph


CHAIN_MODELS = ["lenet5", "lenet300", "vgg_small", "user"]
RESIDUAL_MODELS = ["resnet20", "wrn", "tiny_densenet", "tiny_mobilenetv2", "tiny_senet"]
MODELS = CHAIN_MODELS + RESIDUAL_MODELS
MODES = ["mixed", "regular"]


def attach_random(model, graph, seed, shift=0.0):
    torch.manual_seed(seed)
    bar = BAR()
    bar.attach(model, graph, [Budget("volume", 0.25)])
    with torch.no_grad():
        for key, g in bar.gates.items():
            g.log_alpha.copy_(torch.randn(g.num_channels) * 3.0 + shift)
            if graph.groups[bar.gid_of[key]].min_keep:
                g.keep_at_least_one()
    return bar


def layer_modules(net):
    return [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def check_compaction(model, graph, bar, masks, x, mode="mixed", values=None):
    bar.freeze(masks, values)
    model.eval()
    bar.eval()
    with torch.no_grad():
        gated = model(x)
    values = values if values is not None else {g: v * masks[g].float() for g, v in bar.gate_values().items()}
    net = budgetprune.compact(model, graph, masks, values, mode=mode)
    assert isinstance(net, torch.fx.GraphModule)
    with torch.no_grad():
        small = net(x)
    assert small.shape == gated.shape
    assert float((gated - small).abs().max()) <= 1e-5
    assert float(gated.abs().max()) > 1e-3  # not a trivially-zero comparison

    # widths: every kept conv/linear has the channels the slot sets say
    eff = effective_masks(graph, masks)
    sets = slot_sets(graph, masks, net.budgetprune_mode)  # the blocks compaction built (auto: as chosen)
    mods = dict(net.named_modules())
    for layer in graph.layers.values():
        alive_out = layer.out_group is None or bool(eff[layer.out_group].any())
        if not bool(sets[layer.out_tensor].any()):
            alive_out = False  # what only pruned-away layers read goes with them (a depthwise conv, an SE scale)
        if not alive_out:
            assert not isinstance(mods.get(layer.name), (nn.Conv2d, nn.Linear)), layer.name
            continue
        mod = mods[layer.name]
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue  # an attention layer: its widths are test_attention's and test_window_attention's
        out = mod.out_channels if isinstance(mod, nn.Conv2d) else mod.out_features
        expected = int(sets[layer.out_tensor].sum()) if layer.out_group or layer.depthwise or layer.follows \
            else layer.out_channels
        assert out == expected, layer.name
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == resource_report(graph, masks, mode)["params"]
    return net, gated


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_compaction_matches_gated_model(name, mode, tmp_path):
    model, graph = make_model(name)
    bar = attach_random(model, graph, seed=100 + MODELS.index(name))
    masks = bar.keep_masks()
    # the random gates really exercise both pruning and folding
    values = bar.gate_values()
    assert any(not bool(m.all()) for m in masks.values())
    assert any(bool(((v > 0) & (v < 1)).any()) for v in values.values())
    torch.manual_seed(1)
    x = torch.randn(16, 1, 28, 28)
    net, gated = check_compaction(model, graph, bar, masks, x, mode)

    # save / load round trip, safe loading, no original code needed
    path = tmp_path / "m.pt"
    budgetprune.save(net, path)
    again = budgetprune.load(path)
    with torch.no_grad():
        assert torch.equal(again(x), net(x))
    obj = torch.load(path, weights_only=True)
    assert isinstance(obj, dict)


@pytest.mark.parametrize("name", RESIDUAL_MODELS)
def test_mixed_block_computes_less_than_regular(name):
    model, graph = make_model(name)
    bar = attach_random(model, graph, seed=7, shift=-1.0)
    masks = bar.keep_masks()
    mixed, regular = (resource_report(graph, masks, m) for m in MODES)
    assert mixed["volume"] <= regular["volume"] and mixed["params"] <= regular["params"]
    if name in ("resnet20", "wrn", "tiny_senet"):  # residual adds of differently pruned branches
        assert mixed["volume"] < regular["volume"]
    net = budgetprune.compact(model, graph, masks, bar.gate_values(), mode="mixed")
    ops = {n.target for n in net.graph.nodes if n.op == "call_function"}
    if name in ("resnet20", "wrn", "tiny_senet"):
        assert index_add_channels in ops  # the mixed-connectivity block's scatterAdd
    net_regular = budgetprune.compact(model, graph, masks, bar.gate_values(), mode="regular")
    assert index_add_channels not in {n.target for n in net_regular.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("mode", MODES)
def test_pruned_away_blocks_disappear(mode):
    """Automatic depth determination: a block whose branch is fully pruned is skipped."""
    model, graph = make_model("resnet20")
    bar = attach_random(model, graph, seed=8)
    masks = {gid: m.clone() for gid, m in bar.keep_masks().items()}
    masks["layer1.1.conv1"][:] = False                      # inner conv gone: the whole branch purges
    masks["layer2.2.conv2"][:] = False                      # last conv gone
    masks["layer3.1.conv1"][:] = False
    masks["layer3.1.conv2"][:] = True                       # kept gates behind a dead input purge too
    torch.manual_seed(9)
    net, _ = check_compaction(model, graph, bar, masks, torch.randn(8, 1, 28, 28), mode)
    names = {n for n, _ in net.named_modules()}
    for gone in ("layer1.1.conv1", "layer1.1.conv2", "layer2.2.conv2", "layer3.1.conv1", "layer3.1.conv2"):
        assert gone not in names
    assert "layer2.2.conv1" not in names  # its only reader went, so it went too
    eff = effective_masks(graph, masks)
    assert not bool(eff["layer3.1.conv2"].any()) and not bool(eff["layer1.1.conv2"].any())


class InvertedResidualSE(nn.Module):
    """A stem, then x + project(SE(depthwise(expand(x)))): MobileNetV3's and EfficientNet's block."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.depthwise = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc1, self.fc2 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        h = self.depthwise(self.expand(x))
        h = h * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(h, 1)))))
        return self.head((x + self.project(h)).mean(dim=(2, 3)))


@pytest.mark.parametrize("mode", ["mixed", "regular"])
def test_what_only_a_pruned_away_layer_reads_is_pruned_away_and_not_counted(mode):
    """An inverted residual block whose projection is pruned away: its expansion, depthwise conv and
    squeeze-and-excitation compute only what that projection would read, so they go too (compaction
    drops them as unused) and the costs no longer count them: the report's parameters and FLOPs are
    the compacted network's own. The purge rules by reader missed the expansion, whose readers are
    a depthwise conv and the excitation's first conv, which kept channels."""
    from budgetprune.resources import CostModel

    torch.manual_seed(0)
    model = InvertedResidualSE()
    randomise_batchnorms(model)
    x = torch.randn(4, 1, 12, 12)
    graph = budgetprune.ChannelGraph.build(model, x[:1])
    assert {"expand.0", "fc1", "project.0"} <= set(graph.groups)
    bar = attach_random(model, graph, seed=0, shift=5.0)
    masks = {gid: torch.ones_like(m) for gid, m in bar.keep_masks().items()}
    masks["project.0"][:] = False
    eff = effective_masks(graph, masks)
    assert not bool(eff["expand.0"].any()) and not bool(eff["fc1"].any()) and bool(eff["stem.0"].all())
    net, _ = check_compaction(model, graph, bar, masks, x, mode)  # parameters: the report's count
    assert {"expand.0", "depthwise.0", "fc1", "fc2", "project.0"}.isdisjoint(n for n, _ in net.named_modules())
    small = budgetprune.ChannelGraph.build(net, x[:1])
    assert CostModel(graph, "flops", mode).hard(masks) == pytest.approx(CostModel(small, "flops").full(), rel=1e-9)


def test_fatal_pruning_guard_residual():
    """The stem and the 1×1 shortcut convs of pooling blocks keep ≥ 1 map (seed 001, 4.1)."""
    _, graph = make_model("resnet20")
    protected = {gid for gid, g in graph.groups.items() if g.min_keep}
    assert protected == {"conv1", "layer2.0.downsample.0", "layer3.0.downsample.0"}
    model, graph = make_model("resnet20")
    bar = attach_random(model, graph, seed=10, shift=-40.0)  # every gate closed
    bar.after_step(0.5)
    masks = bar.keep_masks()
    for gid, m in masks.items():
        assert int(m.sum()) == (1 if gid in protected else 0), gid
    torch.manual_seed(11)
    check_compaction(model, graph, bar, masks, torch.randn(4, 1, 28, 28) * 3)


@pytest.mark.parametrize("mode", ["mixed", "regular"])
def test_the_projection_reopens_a_protected_group_a_method_closed(mode):
    """A method whose own criterion closed every channel of a protected group (sensitivity's decay on
    ResNet-20's only stage-2 shortcut, with the block's first conv closed too: no path from stage 1
    to stage 2, volume 10 and a compaction that failed) hands masks the projection must repair: the
    group's best-scored channel is reopened, the result fits the budget and compacts."""
    model, graph = make_model("resnet20")
    masks = {gid: torch.ones(g.channels, dtype=torch.bool) for gid, g in graph.groups.items()}
    masks["layer2.0.downsample.0"][:] = False
    masks["layer2.0.conv1"][:] = False
    g1 = torch.Generator().manual_seed(1)
    scores = {gid: torch.rand(g.channels, generator=g1) for gid, g in graph.groups.items()}
    budget = Budget("volume", 0.3)
    final = budgetprune.enforce_budget(graph, masks, scores, budget, mode=mode)
    shortcut = final["layer2.0.downsample.0"]
    assert shortcut.tolist() == (torch.arange(32) == int(torch.argmax(scores["layer2.0.downsample.0"]))).tolist()
    cost = CostModel(graph, "volume", mode)
    assert 0.9 * budget.absolute(graph) < cost.hard(final) <= budget.absolute(graph)  # not cut off: far above 10
    bar = attach_random(model, graph, seed=12)
    torch.manual_seed(12)
    check_compaction(model, graph, bar, final, torch.randn(4, 1, 28, 28) * 3, mode,
                     values={gid: m.float() for gid, m in final.items()})  # the kept channels open


def test_residual_graph_groups_by_hand():
    _, graph = make_model("resnet20")
    assert len(graph.groups) == 21 and set(graph.ungated) == {"fc"}
    g = graph.groups
    assert g["layer1.0.conv2"].host == "layer1.0.bn2" and g["layer1.0.conv2"].shared
    assert not g["layer1.0.conv1"].shared and g["layer1.0.conv1"].consumers == ["layer1.0.conv2"]
    assert g["conv1"].consumers[:3] == ["layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1"]
    assert g["layer2.0.downsample.0"].area == 14 * 14 and g["layer3.0.conv1"].area == 7 * 7
    # the stage-3 residual signal has two writers per slot before the first add, more after
    info = graph.tensors[graph.layers["layer3.1.conv1"].in_tensor]
    assert info.sources() == {"layer3.0.downsample.0", "layer3.0.conv2"}
    _, graph = make_model("tiny_senet")
    se = graph.layers["layer1.0.se.fc2"]  # the scale follows the channels it multiplies
    assert "layer1.0.se.fc2" not in graph.groups and se.follows and "layer1.0.se.fc1" in graph.groups
    assert graph.tensors[se.out_tensor].sources() == graph.tensors[se.follows].sources()
    assert graph.groups["layer1.0.se.fc1"].min_keep == 1  # the scale's only input
    _, graph = make_model("tiny_mobilenetv2")
    dw = [l for l in graph.layers.values() if l.depthwise]
    assert dw and all(l.out_group is None for l in dw)
    assert all(graph.tensors[l.out_tensor].sources() == graph.tensors[l.in_tensor].sources() for l in dw)
    assert any("BatchNorm" in what for what in graph.renormalisers.values())
    _, graph = make_model("tiny_densenet")
    cat_in = graph.tensors[graph.layers["features.transition1.conv"].in_tensor]
    assert [s.length for s in cat_in.segments] == [16, 8, 8, 8]
    assert cat_in.sources() == {"features.conv0", "features.denseblock1.0.conv", "features.denseblock1.1.conv",
                                "features.denseblock1.2.conv"}


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
    net = budgetprune.compact(model, graph)
    with torch.no_grad():
        assert float((net(x) - ref).abs().max()) <= 1e-5
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in model.parameters())


def test_user_net_graph_places_gate_after_bn():
    model, graph = make_model("user")
    assert set(graph.groups) == {"conv1", "conv2", "fc1"}
    assert graph.groups["conv1"].host == "bn1"
    assert graph.groups["conv2"].host == "bn2"
    assert graph.tensors[graph.layers["fc1"].in_tensor].expansion == 36


# ---------------------------------------------------------------------------------------
# Graph errors
# ---------------------------------------------------------------------------------------
class Sliced(nn.Module):
    """A strided channel slice (what feeds it is left ungated, with the reason) and a grouped conv (tied)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv4 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 28 * 28, 10)

    def forward(self, x):
        y = self.conv2(F.relu(self.conv1(x)))
        z = F.relu(self.conv3(F.relu(y)))
        z = self.conv4(z[:, ::2])
        return self.fc(F.relu(z).flatten(1))


def test_unsupported_ops_leave_their_writers_ungated():
    model = Sliced()
    graph = budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 28, 28))
    assert set(graph.groups) == {"conv1", "conv2", "conv4"}
    assert graph.groups["conv1"].units == 4 and graph.groups["conv2"].units == 4  # tied across 2 conv groups
    assert "getitem" in graph.ungated["conv3"]
    assert "network output" in graph.ungated["fc"]
    text = graph.summary()
    assert "not pruned: conv3" in text and "conv4" in text


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
    """A channel reopened with gate 1 and zeroed outgoing weights (or, in a residual sum, a
    zeroed output) changes no output."""
    from budgetprune.budget import reopenable_channels
    from budgetprune.compact import silence_channels
    model, graph = make_model(name)
    bar = attach_random(model, graph, seed=300 + MODELS.index(name))
    masks = bar.keep_masks()
    torch.manual_seed(3)
    x = torch.randn(8, 1, 28, 28)
    net_before, gated = check_compaction(model, graph, bar, masks, x)
    allowed = reopenable_channels(graph, masks)
    reopened = {gid: torch.nonzero(allowed[gid]).flatten()[:3] for gid in masks}
    assert sum(i.numel() for i in reopened.values()) > 0
    if name in ("resnet20", "wrn", "tiny_mobilenetv2"):
        assert any(graph.groups[g].shared and i.numel() for g, i in reopened.items())
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
    model.eval()
    net = budgetprune.compact(model, graph, grown, values)
    with torch.no_grad():
        assert float((net(x) - gated).abs().max()) <= 1e-5
        assert float((model(x) - gated).abs().max()) <= 1e-5
    assert sum(p.numel() for p in net.parameters()) > sum(p.numel() for p in net_before.parameters())
    # the reopened channels are live: their outgoing weights get gradients
    net.train()
    net(x).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_compaction_reads_the_given_model_not_the_traced_one():
    """Regression: the graph is traced from the user's model; the student is a copy that trains."""
    import copy
    model, graph = make_model("resnet20")
    student = copy.deepcopy(model)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(1.5)
    student.eval()
    x = torch.randn(4, 1, 28, 28)
    net = budgetprune.compact(student, graph)
    with torch.no_grad():
        assert float((net(x) - student(x)).abs().max()) <= 1e-5
        assert float((net(x) - model.eval()(x)).abs().max()) > 1e-3


class _Gate:
    """A gate stand-in: fixed per-example values, never negative or possibly negative."""

    def __init__(self, values, nonnegative):
        self.values, self.nonnegative = values, nonnegative

    def __call__(self, batch_size=None):
        return self.values[:batch_size]


def test_nonnegative_gates_move_past_relu_and_pooling_without_changing_outputs():
    from budgetprune.attach import gate_site
    model, graph = make_model("lenet5")
    assert gate_site(graph, "features.0") == "features.2"  # conv → ReLU → max-pool
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    values = {gid: torch.rand(4, g.channels) for gid, g in graph.groups.items()}
    # by hand: each group's output multiplied right after its host (conv or linear)
    hooks = [dict(model.named_modules())[g.host].register_forward_hook(
        lambda m, i, o, v=values[gid]: o * v.reshape(4, -1, *([1] * (o.dim() - 2))))
        for gid, g in graph.groups.items() if g.position == "output"]
    with torch.no_grad():
        by_hand = model(x)
    for h in hooks:
        h.remove()
    moved = GateHooks(model, graph, {gid: _Gate(v, True) for gid, v in values.items() if graph.groups[gid].position == "output"})
    named = dict(model.named_modules())
    # the per-example product is taken after the pool; the conv only gets its weights back after its forward
    assert [h.__name__ for h in named["features.2"]._forward_hooks.values()] == ["multiply"]
    assert [h.__name__ for h in named["features.0"]._forward_hooks.values()] == ["restore"]
    with torch.no_grad():
        assert torch.equal(model(x), by_hand)
    moved.remove()
    # a gate that may be negative stays at its host: relu(z·x) ≠ z·relu(x) for z < 0
    signed = {gid: _Gate(v - 0.5, False) for gid, v in values.items() if graph.groups[gid].position == "output"}
    stay = GateHooks(model, graph, signed)
    assert dict(model.named_modules())["features.0"]._forward_hooks
    stay.remove()


def test_gate_site_stops_at_a_module_called_twice():
    from budgetprune.attach import gate_site

    class SharedReLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.relu = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.ReLU()
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            x = self.relu(self.conv2(self.relu(self.conv1(x))))
            return self.head(x.mean((2, 3)))

    model = SharedReLU()
    graph = budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 12, 12))
    assert gate_site(graph, "conv1") == "conv1" and gate_site(graph, "conv2") == "conv2"


@pytest.mark.parametrize("name", ["resnet20", "tiny_densenet"])
def test_the_purge_test_is_the_aliveness_of_the_layer_input(name):
    """A gated layer outputs nothing when no slot of its input is alive: the hooks test it from
    the open gates of its writers; the same as the per-slot aliveness, reduced."""
    from budgetprune.liveness import alive
    model, graph = make_model(name)
    hooks = GateHooks(model, graph, {})
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for layer in graph.layers.values():
        sources = hooks._purge_sources(layer.in_tensor)
        if not sources:
            assert graph.tensors[layer.in_tensor].writers[0].any()  # something always writes it
            continue
        for _ in range(8):
            hooks.current = {gid: (torch.rand(4, g.channels, generator=gen) < 0.2)
                             & (torch.rand(4, 1, generator=gen) < 0.5) for gid, g in graph.groups.items()}
            expected = alive(graph.tensors[layer.in_tensor], hooks.current).amax(dim=-1, keepdim=True) > 0
            assert torch.equal(hooks._input_open(sources), expected)
            checked += int((~expected).sum())
    hooks.remove()
    assert checked > 0  # some inputs were dead


def test_a_negative_scale_keeps_its_channel_alive():
    """MorphNet's own scale γ may be negative: a channel whose only kept gate value is negative is
    alive (z ≠ 0), so the layer reading it is not purged and the compacted network equals the gated
    one (the purge once tested z > 0 and dropped the next layer's output)."""
    torch.manual_seed(0)
    model = budgetprune.create_model("lenet5", in_channels=1, num_classes=10, input_size=(28, 28))
    x = torch.randn(8, 1, 28, 28)
    pruner = budgetprune.Pruner(model, x, 0.5, total_steps=1, method="morphnet",
                                fill=False)
    with torch.no_grad():
        gamma = pruner.method.gate("features.0").gamma
        gamma.fill_(1e-3)          # below the threshold: pruned
        gamma[3] = -0.5            # the one kept channel, negative
    net, report = pruner.finalize(x)
    assert report["masks"]["features.0"] == [3]
    assert report["compaction_max_abs_diff"] < 1e-5
    assert float(net(x).std(dim=0).max()) > 1e-4  # the second conv was not purged to its bias


class _CatNet(nn.Module):
    """A layer's output read whole, through a concatenation, and as a residual sum."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.c, self.head = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a = F.relu(self.a(x))
        h = self.c(torch.cat([a, self.b(x)], 1)) + a
        return self.head(h).mean((2, 3))


@pytest.mark.parametrize("gather_from", [1, None])
@pytest.mark.parametrize("make, shape", [(lambda: budgetprune.create_model("resnet20"), (1, 1, 28, 28)),
                                         (_CatNet, (1, 3, 8, 8)),
                                         (lambda: budgetprune.create_model("tiny_densenet"), (1, 1, 28, 28))])
def test_aliveness_of_every_tensor_follows_its_segments(make, shape, gather_from, monkeypatch):
    """:func:`alive_mask` (with its shortcut for a layer's output read whole, and its one gather
    over many writers: forced for every tensor with ``gather_from=1``) against each slot's writers
    read straight from the graph's segments; and :func:`has_alive`, which answers its ``any()``
    without building it, where many groups are closed whole."""
    from budgetprune import liveness
    from budgetprune.graph import ALWAYS, ChannelGraph
    from budgetprune.liveness import alive_mask, has_alive

    if gather_from is not None:
        monkeypatch.setattr(liveness, "GATHER_WRITERS", gather_from)
    torch.manual_seed(0)
    graph = ChannelGraph.build(make(), torch.randn(*shape))
    assert any(info.whole_writers for info in graph.tensors.values())
    dead = 0
    for trial in range(5):
        masks = {gid: torch.rand(g.channels) < 0.5 for gid, g in graph.groups.items()}
        if trial in (1, 2, 3):  # most groups closed whole: tensors with no alive slot
            masks = {gid: m & (torch.rand(()) < 0.3) for gid, m in masks.items()}
        if trial == 4:
            masks.pop(next(iter(masks)))  # a group without a mask is kept whole
        for name, info in graph.tensors.items():
            expected = torch.zeros(info.slots, dtype=torch.bool)
            for seg in info.segments:
                for j in range(seg.length):
                    expected[seg.start + j] |= any(
                        g is ALWAYS or g not in masks or bool(masks[g][off + j]) for g, off in seg.sources)
            assert torch.equal(alive_mask(info, masks), expected), name
            assert has_alive(info, masks) == bool(expected.any()), name
            dead += not expected.any()
    assert dead > 0  # has_alive also answered False
