"""LayerNorms over the channels (ConvNeXt, transformers): the signal they read is pruned with
them. A pruned channel is a zero in the gated network, the LayerNorm's statistics count it, its
output there is masked; the compacted network keeps the count
(:func:`budgetprune.ops.full_count_layer_norm`), slices the LayerNorm's and a layer scale's
parameters, and computes the same. ``permute`` moves the channels between dim 1 and the last dim."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import budgetprune
from budgetprune import Pruner
from budgetprune.attach import GateHooks
from budgetprune.compact import compact
from budgetprune.graph import ChannelGraph
from budgetprune.ops import full_count_layer_norm

from loops import pruning_steps


class LayerNorm2d(nn.LayerNorm):
    """A LayerNorm over the channels of an (N, C, H, W) map written as torchvision writes it: the
    call to ``F.layer_norm`` is inside the module's forward, so the graph sees the function."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 3 * c)
        self.fc2 = nn.Linear(3 * c, c)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, c).view(c, 1, 1))

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        return x + self.scale * y


class TinyConvNeXt(nn.Module):
    """Stem conv + LayerNorm2d, two blocks, a LayerNorm2d + 2×2 conv downsampling, one block, head."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.stem_norm = LayerNorm2d(c)
        self.stage1 = nn.Sequential(Block(c), Block(c))
        self.down_norm = LayerNorm2d(c)
        self.down = nn.Conv2d(c, 2 * c, 2, stride=2)
        self.stage2 = Block(2 * c)
        self.head_norm = nn.LayerNorm(2 * c)
        self.head = nn.Linear(2 * c, 10)

    def forward(self, x):
        x = self.stage1(self.stem_norm(self.stem(x)))
        x = self.stage2(self.down(self.down_norm(x)))
        return self.head(self.head_norm(x.mean(dim=(2, 3))))


def _randomise_norms(model, seed=0):
    """LayerNorm weights and biases away from (1, 0), so a dead channel's output would not be zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)


def test_full_count_layer_norm_is_a_layer_norm_of_the_zero_padded_channels():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5, 6) * 2 + 0.7, torch.rand(6) + 0.5, torch.randn(6)
    padded = F.pad(x, (0, 4))  # 4 pruned channels: zeros
    expected = F.layer_norm(padded, (10,), F.pad(w, (0, 4)), F.pad(b, (0, 4)), 1e-5)[..., :6]
    assert torch.allclose(full_count_layer_norm(x, 10, w, b, 1e-5), expected, atol=1e-5)
    # by hand: μ = Σx / C, σ² = (Σ(x − μ)² + (C − k)·μ²) / C over C = 10 of which k = 6 are kept
    mean = x.sum(-1, keepdim=True) / 10
    var = ((x - mean).square().sum(-1, keepdim=True) + 4 * mean.square()) / 10
    assert torch.allclose(full_count_layer_norm(x, 10, w, b, 1e-5), (x - mean) / torch.sqrt(var + 1e-5) * w + b,
                          atol=1e-5)
    assert torch.allclose(full_count_layer_norm(x, 6, w, None, 1e-5), F.layer_norm(x, (6,), w, None, 1e-5), atol=1e-5)


def test_the_stream_under_layer_norms_is_prunable_and_its_parameters_follow_it():
    graph = ChannelGraph.build(TinyConvNeXt(), torch.randn(2, 3, 16, 16))
    convs_and_linears = {"stem", "down"} | {f"{s}.{p}" for s in ("stage1.0", "stage1.1", "stage2") for p in ("fc1", "fc2")}
    assert convs_and_linears <= set(graph.groups) and set(graph.ungated) == {"head"}
    assert graph.groups["stem"].shared and graph.groups["stage1.0.fc2"].dim == 1 + -2  # over the last dim
    norms = {n.module or n.weight.rsplit(".", 1)[0]: n for n in graph.norms.values()}
    assert set(norms) == {"stem_norm", "down_norm", "stage1.0.norm", "stage1.1.norm", "stage2.norm", "head_norm"}
    assert norms["stem_norm"].module is None and norms["stage1.0.norm"].module == "stage1.0.norm"
    assert norms["down_norm"].channels == 8 and norms["stage2.norm"].channels == 16
    # the functional LayerNorm is masked where its module returns it; the module one at its own output
    site, _ = graph.mask_site(next(n for n, v in graph.norms.items() if v.module is None and "stem" in v.weight))
    assert site == "stem_norm"
    assert {p.path for p in graph.params.values()} >= {"stage1.0.scale", "stem_norm.weight", "stage2.norm.bias"}
    assert graph.params["stage1.0.scale"].axis == 0


def _fixed_gates(graph, masks):
    return {gid: (lambda n, m=masks[gid]: m.float()) for gid in masks}


@pytest.mark.parametrize("mode", ["mixed", "regular"])
def test_random_masks_compact_to_the_gated_network(mode):
    torch.manual_seed(1)
    model = TinyConvNeXt().eval()
    _randomise_norms(model)
    x = torch.randn(4, 3, 16, 16)
    graph = ChannelGraph.build(model, x)
    gen = torch.Generator().manual_seed(2)
    masks = {}
    for gid, g in graph.groups.items():
        keep = torch.rand(g.channels, generator=gen) < 0.6
        keep[int(torch.randint(g.channels, (1,), generator=gen))] = True
        masks[gid] = keep
    hooks = GateHooks(model, graph, _fixed_gates(graph, masks))
    with torch.no_grad():
        gated = model(x)
    hooks.remove()
    small = compact(model, graph, masks, mode=mode)
    with torch.no_grad():
        out = small(x)
        assert not torch.allclose(gated, model(x), atol=1e-3)  # the masks change the network
    assert torch.allclose(out, gated, atol=1e-5), float((out - gated).abs().max())
    assert "full_count_layer_norm" in small.code
    kept = int(masks["stem"].sum())
    if mode == "mixed":  # the stage-1 stream keeps the slots its writers keep
        writers = masks["stem"] | masks["stage1.0.fc2"] | masks["stage1.1.fc2"]
        assert small.stem.out_channels == kept and small.stem_norm.weight.numel() == kept
        assert small.get_submodule("stage1.0").scale.shape == (int(masks["stage1.0.fc2"].sum()), 1, 1)
        assert small.down.in_channels == int(writers.sum())


def test_the_gated_network_masks_a_dead_channel_per_example_after_a_layer_norm():
    model = TinyConvNeXt().eval()
    _randomise_norms(model)
    x = torch.randn(2, 3, 16, 16)
    graph = ChannelGraph.build(model, x)
    per_example = torch.ones(2, 8)
    per_example[0, 3] = 0.0  # channel 3 of the stem is off for the first example only
    gates = {gid: (lambda n, c=g.channels: torch.ones(n, c)) for gid, g in graph.groups.items()}
    gates["stem"] = lambda n: per_example
    hooks = GateHooks(model, graph, gates)
    captured = {}
    handle = model.stage1[0].dw.register_forward_pre_hook(lambda m, i: captured.setdefault("in", i[0]))
    with torch.no_grad():
        model(x)
    hooks.remove()
    handle.remove()
    stream = captured["in"]  # the stem LayerNorm2d's output: its F.layer_norm masked where the module returns it
    assert torch.all(stream[0, 3] == 0) and not torch.all(stream[1, 3] == 0)
    assert not torch.all(stream[0, 2] == 0)


class NormOverSpace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm([8, 8, 8])  # over C, H and W: mixes channels and positions
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x)).mean(dim=(2, 3)))


class NormWithoutScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8, elementwise_affine=False)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x).permute(0, 2, 3, 1)).mean(dim=(1, 2)))


class LooseSigmoid(nn.Module):
    """A function that maps 0 to 0.5, in the root's forward, not returned by any module."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.sigmoid(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("cls, reason", [
    (NormOverSpace, "only a LayerNorm over the channels alone"),
    (NormWithoutScale, "no learned scale"),
    (LooseSigmoid, "write it as a module"),
])
def test_what_cannot_be_masked_leaves_its_writer_ungated_with_the_reason(cls, reason):
    graph = ChannelGraph.build(cls(), torch.randn(2, 3, 8, 8))
    assert "conv" not in graph.groups and reason in graph.ungated["conv"]


def test_a_pruner_meets_the_budget_and_the_file_loads_without_the_model(tmp_path):
    torch.manual_seed(0)
    model = TinyConvNeXt()
    _randomise_norms(model)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    # a quarter: at half the FLOPs the projection prunes the blocks' insides and keeps the streams
    pruner = Pruner(model, x, "flops=0.25", total_steps=3, gate_init=3.0)
    pruning_steps(model, pruner, torch.optim.SGD(pruner.parameters(lr=0.05), lr=0.05), [(x, y)] * 3)
    small, report = pruner.finalize(x)
    assert report["compaction_max_abs_diff"] <= 1e-5
    assert 0.95 <= report["pruned"]["flops"] / pruner.budget.absolute(pruner.graph) <= 1.0
    assert small.stem.out_channels < 8 or small.down.out_channels < 16  # the streams lose channels
    budgetprune.save(small, tmp_path / "m.pt")
    again = budgetprune.load(tmp_path / "m.pt")  # only torch ops and budgetprune's channel ops
    with torch.no_grad():
        assert torch.allclose(again(x), small(x), atol=1e-6)
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        from budgetprune.export import to_onnx
        result = to_onnx(again, tmp_path / "m.onnx", x[:2])
        assert result["verified"] and result["max_abs_diff"] <= 1e-4
