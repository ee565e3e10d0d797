"""Linear layers over tokens (N, L, C) and channels-last maps (N, H, W, C): the hidden width of
a transformer's or a ConvNeXt block's MLP is pruned along the last dim, costs count every token,
and compaction keeps the outputs. Ops returning several tensors (chunk, split) never hide a
pruned channel: their writers stay ungated."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from budgetprune import Pruner
from budgetprune.compact import compact
from budgetprune.graph import ChannelGraph
from budgetprune.resources import CostModel

from loops import pruning_steps


class TokenMLP(nn.Module):
    """Patch embedding, then a pre-norm transformer MLP block on (N, L, C) tokens."""

    def __init__(self, c: int = 8, hidden: int = 24):
        super().__init__()
        self.embed = nn.Conv2d(3, c, 4, stride=4)
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # (N, L, C)
        t = t + self.fc2(F.dropout(F.gelu(self.fc1(self.norm(t))), 0.1, self.training))
        return self.head(t.mean(dim=1))


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, then channels-last LayerNorm and MLP, scaled and added back."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1 = nn.Linear(c, 4 * c)
        self.pw2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.5))
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.pw2(nn.functional.gelu(self.pw1(y))).permute(0, 3, 1, 2)
        x = x + self.gamma * y
        return self.head(x.mean(dim=(2, 3)))


def test_a_transformer_mlp_s_hidden_width_is_a_group_over_the_last_dim():
    model = TokenMLP()
    x = torch.randn(2, 3, 16, 16)  # 16 tokens
    graph = ChannelGraph.build(model, x)
    g = graph.groups["fc1"]
    assert g.dim == -1 and g.channels == 24 and g.area == 16
    assert graph.layers["fc2"].in_features == 24 and graph.layers["fc1"].out_area == 16
    # FLOPs by hand: embed 16 positions × 3·16 × 8, fc1 16 × 8 × 24, fc2 16 × 24 × 8, head 8 × 10
    full = 16 * 48 * 8 + 16 * 8 * 24 + 16 * 24 * 8 + 8 * 10
    cm = CostModel(graph, "flops")
    assert cm.full() == pytest.approx(full)
    masks = {gid: torch.ones(gr.channels, dtype=torch.bool) for gid, gr in graph.groups.items()}
    masks["fc1"] = torch.arange(24) < 10
    assert cm.hard(masks) == pytest.approx(full - 2 * 16 * 8 * 14)


@pytest.mark.parametrize("cls", [TokenMLP, ConvNeXtBlock])
def test_token_and_channels_last_blocks_prune_and_compact_with_equal_outputs(cls):
    torch.manual_seed(0)
    model = cls()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    pruner = Pruner(model, x, "flops=0.6", total_steps=3)
    hidden = "fc1" if cls is TokenMLP else "pw1"
    assert pruner.graph.groups[hidden].dim == -1
    pruning_steps(model, pruner, torch.optim.SGD(pruner.parameters(lr=0.05), lr=0.05), [(x, y)] * 3)
    small, report = pruner.finalize(x)
    assert report["compaction_max_abs_diff"] <= 1e-5
    assert report["pruned"]["flops"] <= pruner.budget.absolute(pruner.graph) * (1 + 1e-9)
    layer = small.get_submodule(hidden)  # the hidden width or the signal it reads (ConvNeXt's, under a LayerNorm)
    assert layer.out_features * layer.in_features < 8 * (24 if cls is TokenMLP else 32)


def test_gates_over_the_last_dim_multiply_the_right_channels():
    model = TokenMLP().eval()
    x = torch.randn(2, 3, 16, 16)
    graph = ChannelGraph.build(model, x)
    masks = {gid: torch.ones(g.channels, dtype=torch.bool) for gid, g in graph.groups.items()}
    masks["fc1"] = torch.arange(24) % 3 != 0
    small = compact(model, graph, masks)
    with torch.no_grad():  # the same network by hand: the dropped hidden units' fc2 columns zeroed
        w = model.fc2.weight.clone()
        model.fc2.weight[:, ~masks["fc1"]] = 0.0
        expected = model(x)
        model.fc2.weight.copy_(w)
        assert torch.allclose(small(x), expected, atol=1e-6)
    assert small.fc1.out_features == 16 and small.fc2.in_features == 16


class Chunked(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        top, bottom = F.relu(self.c1(x)).chunk(2, dim=2)  # halves of the map, not of the channels
        return self.fc((top + bottom).mean(dim=(2, 3)))


def test_an_op_returning_several_tensors_leaves_its_writers_ungated():
    graph = ChannelGraph.build(Chunked(), torch.randn(2, 3, 8, 8))
    assert "c1" not in graph.groups and "returns several tensors" in graph.ungated["c1"]


class Attention(nn.Module):
    """A pre-norm self-attention block on 16 tokens of width 8: nn.MultiheadAttention, then an F.linear
    with a parameter of its own (neither is a conv/linear module the graph prunes)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.embed = nn.Conv2d(3, c, 4, stride=4)
        self.attn = nn.MultiheadAttention(c, 2, batch_first=True)
        self.mix = nn.Parameter(torch.randn(c, c) / c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.head(F.linear(t, self.mix).mean(dim=1))


@pytest.mark.parametrize("training", [False, True])
def test_flops_and_params_count_what_runs_outside_the_pruned_layers(training):
    model = Attention().train(training)
    graph = ChannelGraph.build(model, torch.randn(2, 3, 16, 16))
    L, C = 16, 8
    layers = L * 48 * C + C * 10  # embed, head: what the graph's layers count
    attention = L * C * 3 * C + 2 * L * L * C + L * C * C  # in-projection, scores and weighted sum, out-projection
    assert CostModel(graph, "flops").full() == pytest.approx(layers + attention + L * C * C)  # + the F.linear
    assert CostModel(graph, "flops").fixed == pytest.approx(L * C * C)  # the F.linear (products count per head)
    params = CostModel(graph, "params")
    assert params.full() == sum(p.numel() for p in model.parameters())
    assert params.fixed == C * C  # the F.linear's weight: no layer's


def test_building_the_graph_leaves_every_module_in_its_mode():
    """The shape pass and the FLOP count run the model in eval mode; the user's modes come back, module by module."""
    model = Attention().train()
    model.attn.eval()  # a user's own mix of modes
    before = {name: m.training for name, m in model.named_modules()}
    ChannelGraph.build(model, torch.randn(2, 3, 16, 16))
    assert {name: m.training for name, m in model.named_modules()} == before


class SwinLikeMLP(TokenMLP):
    """timm's Swin block in miniature: a channels-last map reshaped to tokens (N, H·W, C) that
    the graph counts over its second dim (always alive), plus an MLP over the last dim whose
    output channels the sum lets the graph gate."""

    def forward(self, x):
        m = self.embed(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        n, h, w, c = m.shape
        m = F.pad(m, (0, 0, 0, 1, 0, 1))[:, :h, :w, :]  # padded to whole windows and back, as Swin's attention
        t = m.reshape(n, -1, c)
        t = t + self.fc2(F.gelu(self.fc1(self.norm(t))))
        return self.head(t.reshape(n, h, w, c).mean(dim=(1, 2)))


@pytest.mark.parametrize("case", ["mlp pruned away", "mixed sum", "regular sum"])
def test_a_sum_with_tokens_counted_over_another_dim_compacts_with_equal_outputs(case):
    """The sum adds an always-alive token tensor counted over its second dim to the MLP's output
    counted over channels: compaction must still drop a pruned-away MLP (it kept adding it and
    failed, "the emptied tensor ... is still used") and add a partial one into the kept channels."""
    torch.manual_seed(0)
    model = SwinLikeMLP().eval()
    x = torch.randn(2, 3, 16, 16)
    graph = ChannelGraph.build(model, x)
    assert graph.tensors["reshape"].slots != graph.tensors["add"].slots  # the two layouts
    assert {"fc1", "fc2"} <= set(graph.groups)
    masks = {gid: torch.ones(g.channels, dtype=torch.bool) for gid, g in graph.groups.items()}
    if case == "mlp pruned away":
        masks["fc1"][:] = False
    else:
        masks["fc2"] = torch.arange(8) % 3 != 0
    small = compact(model, graph, masks, mode="mixed" if case != "regular sum" else "regular")
    with torch.no_grad():  # by hand: what the masks remove contributes nothing to the sum
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        dropped = torch.ones(8, dtype=torch.bool) if case == "mlp pruned away" else ~masks["fc2"]
        model.fc2.weight[dropped] = 0.0
        model.fc2.bias[dropped] = 0.0
        expected = model(x)
        model.load_state_dict(saved)
        assert torch.allclose(small(x), expected, atol=1e-6)
    if case == "mlp pruned away":
        assert not hasattr(small, "fc1")
    else:  # a regular sum keeps the stream's width: the dropped channels' rows are zeros
        assert small.fc2.out_features == (5 if case == "mixed sum" else 8)


class ClassTokenConvPos(nn.Module):
    """A class token joined to the patch tokens along the tokens' dim, then a convolutional
    position encoding of the patches alone (timm's CoaT): the join is no channel concatenation."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.embed = nn.Conv2d(3, c, 4, stride=4)
        self.norm = nn.LayerNorm(c)
        self.cls = nn.Parameter(torch.randn(1, 1, c))
        self.pos = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm2 = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 2 * c)
        self.fc2 = nn.Linear(2 * c, c)
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        m = self.embed(x)
        n, c, h, w = m.shape
        t = torch.cat([self.cls.expand(n, -1, -1), self.norm(m.flatten(2).transpose(1, 2))], dim=1)
        cls_token, patches = t[:, :1], t[:, 1:]
        feat = patches.transpose(1, 2).view(n, c, h, w)
        t = torch.cat([cls_token, (self.pos(feat) + feat).flatten(2).transpose(1, 2)], dim=1)
        t = t + self.fc2(F.gelu(self.fc1(self.norm2(t))))
        return self.head(t[:, 0])


def test_a_class_token_joined_along_the_tokens_is_no_channel_concatenation():
    """The join used to be read as a concatenation of 1 + 8 channels, the slice after it as a channel
    gather, and the compacted network failed to run ("shape ... is invalid")."""
    torch.manual_seed(0)
    model = ClassTokenConvPos()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    graph = ChannelGraph.build(model, x[:2])
    assert graph.tensors["cat"].slots == 8 and "cat" not in graph.cats
    assert {"fc1"} <= set(graph.groups)
    pruner = Pruner(model, x[:2], "flops=0.7", total_steps=2)
    pruning_steps(model, pruner, torch.optim.SGD(pruner.parameters(lr=0.05), lr=0.05), [(x, y)] * 2)
    small, report = pruner.finalize(x[:2])
    assert report["compaction_max_abs_diff"] <= 1e-5
    assert small(x).shape == (4, 10)
