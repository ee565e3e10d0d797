"""Vision transformers: the token signal is pruned through LayerNorms, the class token and the
position embedding (parameters masked by the signal's aliveness and sliced with it), and
``nn.MultiheadAttention`` self-attention, a layer whose in-projection reads the kept channels, whose
out-projection writes a gated group, and whose heads are gated whole. Compaction gives the same
outputs in both block modes; FLOPs count the projections per kept channel and head and the
attention products per head."""

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
from budgetprune.ops import SelfAttention
from budgetprune.resources import CostModel

from loops import masked_output, pruning_steps

C, HEADS, TOKENS = 16, 2, 17  # 16 patches of 4×4 from a 16×16 image, and the class token


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attn = nn.MultiheadAttention(C, HEADS, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)

    def forward(self, x):
        y = self.ln_1(x)
        y, _ = self.attn(y, y, y, need_weights=False)
        x = x + y
        return x + self.fc2(F.gelu(self.fc1(self.ln_2(x))))


class TinyViT(nn.Module):
    """torchvision's ViT layout, small: patch conv, reshape, class token, position embedding, blocks."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, C, 4, stride=4)
        self.class_token = nn.Parameter(torch.randn(1, 1, C))
        self.pos = nn.Parameter(torch.randn(1, TOKENS, C) * 0.5)
        self.dropout = nn.Dropout(0.0)
        self.blocks = nn.Sequential(Block(), Block())
        self.ln = nn.LayerNorm(C)
        self.head = nn.Linear(C, 10)

    def forward(self, x):
        x = self.patch(x)
        x = x.reshape(x.shape[0], C, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.blocks(self.dropout(x + self.pos))
        return self.head(self.ln(x)[:, 0])


def _model(seed=0):
    torch.manual_seed(seed)
    model = TinyViT().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):  # away from (1, 0): a dead channel would not stay zero unmasked
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.MultiheadAttention):
                m.in_proj_bias.uniform_(-0.5, 0.5)
                m.out_proj.bias.uniform_(-0.5, 0.5)
    return model


def test_every_layer_of_the_token_signal_is_gated():
    graph = ChannelGraph.build(_model(), torch.randn(2, 3, 16, 16))
    assert set(graph.ungated) == {"head"}
    attn = graph.layers["blocks.0.attn"]
    assert attn.kind == "attention" and graph.groups["blocks.0.attn"].dim == -1
    assert graph.groups["patch"].shared and graph.groups["blocks.1.fc2"].shared  # they add into the signal
    assert {"class_token", "pos"} <= set(graph.params) and graph.params["class_token"].axis == 2
    sites = {graph.mask_site(name)[0] for name in graph.renormalisers}
    assert "dropout" in sites  # the class token's cat and the position sum are masked after the dropout


def _random_masks(graph, seed, p=0.6):
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for gid, g in graph.groups.items():
        keep = torch.rand(g.channels, generator=gen) < p
        keep[int(torch.randint(g.channels, (1,), generator=gen))] = True
        masks[gid] = keep
    return masks


@pytest.mark.parametrize("mode", ["mixed", "regular"])
def test_random_masks_compact_to_the_gated_network(mode):
    model, x = _model(), torch.randn(4, 3, 16, 16)
    graph = ChannelGraph.build(model, x)
    masks = _random_masks(graph, 3)
    masks["blocks.0.attn:heads"] = torch.tensor([False, True])
    gated = masked_output(model, graph, masks, x)
    small = compact(model, graph, masks, mode=mode)
    with torch.no_grad():
        assert not torch.allclose(gated, model(x), atol=1e-3)
        assert torch.allclose(small(x), gated, atol=1e-5), float((small(x) - gated).abs().max())
    attn = small.get_submodule("blocks.0.attn")
    heads = int(masks["blocks.0.attn:heads"].sum())
    assert isinstance(attn, SelfAttention) and (attn.num_heads, attn.embed_dim) == (heads, heads * C // HEADS)
    if mode == "mixed":
        assert attn.out_features == int(masks["blocks.0.attn"].sum())
        assert small.class_token.shape[-1] == small.pos.shape[-1] == int(masks["patch"].sum())


def test_a_pruned_self_attention_is_the_module_on_the_kept_channels_and_heads():
    torch.manual_seed(4)
    mha = nn.MultiheadAttention(C, HEADS, batch_first=True).eval()
    cols, rows = torch.tensor([0, 3, 4, 9, 15]), torch.tensor([1, 2, 8, 11])
    z, z_head = torch.rand(4) + 0.5, 0.7
    x = torch.randn(3, 7, C)
    x[..., [c for c in range(C) if c not in cols.tolist()]] = 0.0  # what the pruned channels are: zeros
    gated = nn.MultiheadAttention(C, HEADS, batch_first=True).eval()  # head 0's values gone, head 1's scaled
    gated.load_state_dict(mha.state_dict())
    d = C // HEADS
    with torch.no_grad():
        gated.in_proj_weight[2 * C:2 * C + d] = 0.0
        gated.in_proj_bias[2 * C:2 * C + d] = 0.0
        gated.in_proj_weight[2 * C + d:] *= z_head
        gated.in_proj_bias[2 * C + d:] *= z_head
        expected = gated(x, x, x, need_weights=False)[0][..., rows] * z
        small = SelfAttention.pruned(mha, cols, rows, z, torch.tensor([1]), torch.tensor([z_head])).eval()
        out, weights = small(x[..., cols], None, None)
        whole = SelfAttention.pruned(mha, cols, rows, z).eval()(x[..., cols])[0]
    assert small.num_heads == 1 and small.embed_dim == d
    assert weights is None and torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(whole, mha(x, x, x, need_weights=False)[0][..., rows] * z, atol=1e-5)


def test_flops_count_the_projections_per_kept_channel_and_head_and_the_products_per_head():
    model = _model()
    graph = ChannelGraph.build(model, torch.randn(2, 3, 16, 16))
    cm = CostModel(graph, "flops")
    L, E, d = TOKENS, C, C // HEADS
    patch = 16 * 48 * C
    block = L * E * 3 * E + L * E * E + L * E * 2 * E + L * 2 * E * E  # in/out projections, fc1, fc2
    assert cm.fixed == 0  # q·kᵀ and the weighted sum count per head
    assert cm.full() == pytest.approx(patch + 2 * block + 2 * 2 * L * L * E + C * 10)
    masks = {gid: torch.ones(g.channels, dtype=torch.bool) for gid, g in graph.groups.items()}
    masks["blocks.0.attn"] = torch.arange(C) < 4  # 12 out-projection rows fewer (it adds into the signal:
    masks["blocks.0.attn:heads"] = torch.tensor([False, True])  # the signal keeps them), one head of two
    per = cm.per_layer(masks)
    assert per["blocks.0.attn"] == pytest.approx(L * 3 * d * E + 2 * L * L * d + L * d * 4)
    params = CostModel(graph, "params")
    assert params.full() == sum(p.numel() for p in model.parameters())
    assert params.per_layer(masks)["blocks.0.attn"] == 3 * d * E + 3 * d + d * 4 + 4  # weights and biases


def test_a_dead_channel_is_masked_per_example_after_the_position_embedding():
    model, x = _model(), torch.randn(2, 3, 16, 16)
    graph = ChannelGraph.build(model, x)
    gates = {gid: (lambda n, c=g.channels: torch.ones(n, c)) for gid, g in graph.groups.items()}
    per_example = torch.ones(2, C)
    per_example[0, 5] = 0.0
    gates["patch"] = lambda n: per_example
    for gid in graph.groups:  # nothing else writes channel 5 of the signal
        if gid != "patch" and graph.groups[gid].shared:
            gates[gid] = (lambda n, c=graph.groups[gid].channels: (torch.arange(c) != 5).float().expand(n, c))
    hooks = GateHooks(model, graph, gates)
    seen = {}
    handle = model.blocks[0].ln_1.register_forward_pre_hook(lambda m, i: seen.setdefault("in", i[0]))
    with torch.no_grad():
        model(x)
    hooks.remove()
    handle.remove()
    signal = seen["in"]  # the class token and position embedding are masked in the dead channel
    assert torch.all(signal[0, :, 5] == 0) and not torch.all(signal[1, :, 5] == 0)


def test_a_latency_budget_says_it_cannot_time_attention_yet():
    from budgetprune.errors import ConfigError
    with pytest.raises(ConfigError, match="cannot time the attention layer 'blocks.0.attn' yet: use a flops"):
        Pruner(_model(), torch.randn(2, 3, 16, 16), "latency=0.5", total_steps=2)


def test_a_cross_attention_leaves_its_inputs_ungated_with_the_reason():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(C, C), nn.Linear(C, C)
            self.attn = nn.MultiheadAttention(C, HEADS, batch_first=True)
            self.head = nn.Linear(C, 10)

        def forward(self, x):
            q, kv = self.a(x), self.b(x)
            return self.head(self.attn(q, kv, kv)[0].mean(dim=1))

    graph = ChannelGraph.build(Cross(), torch.randn(2, 5, C))
    assert "self-attention" in graph.ungated["a"] and "self-attention" in graph.ungated["b"]


def test_a_pruner_meets_the_budget_and_the_file_loads_without_the_model(tmp_path):
    model = _model()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    model.train()
    pruner = Pruner(model, x, "flops=0.6", total_steps=3, gate_init=3.0)
    pruning_steps(model, pruner, torch.optim.SGD(pruner.parameters(lr=0.05), lr=0.05), [(x, y)] * 3)
    small, report = pruner.finalize(x)
    assert report["compaction_max_abs_diff"] <= 1e-5
    assert 0.95 <= report["pruned"]["flops"] / pruner.budget.absolute(pruner.graph) <= 1.0
    budgetprune.save(small, tmp_path / "vit.pt")
    again = budgetprune.load(tmp_path / "vit.pt")  # torch ops, budgetprune's channel ops and SelfAttention
    with torch.no_grad():
        assert torch.allclose(again(x), small(x), atol=1e-6)
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        from budgetprune.export import to_onnx
        result = to_onnx(again, tmp_path / "vit.onnx", x[:2])
        assert result["verified"] and result["max_abs_diff"] <= 1e-4
