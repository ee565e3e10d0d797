"""Attention layers beyond nn.MultiheadAttention, and whole heads in all of them.

* Swin's ``shifted_window_attention`` (a function of its module's weights) and MaxViT's
  relative-position attention (traced as one module) are attention layers: their input and
  output channels and their heads are pruned. Their pruned forms (``budgetprune.ops``) compute
  what torchvision's code computes on the weights they keep, and a pruned head is the head whose
  values are zero.
* Swin's patch merging is a probed channel map (each channel copied four times), MaxViT's window
  partitions are reshapes that keep the channels.
* On random keep-masks (channels and heads) the compacted network equals the gated one, and its
  FLOPs and parameters are what ``torch.utils.flop_counter`` and ``parameters()`` count on it.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from budgetprune.compact import compact
from budgetprune.graph import ChannelGraph
from budgetprune.liveness import BlockMode
from budgetprune.ops import RelativeAttention, SelfAttention, window_attention
from budgetprune.resources import CostModel

from loops import masked_output


@pytest.fixture(scope="module")
def tv():
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (make test installs it)")
    import torchvision.models
    return torchvision.models


def _tiny(tv, name):
    torch.manual_seed(0)
    if name == "swin":  # 10×10 maps in windows of 4: padded to 12, shifted in the second block
        return tv.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[2, 4],
                                  window_size=[4, 4], num_classes=10).eval(), 40
    if name == "maxvit":
        return tv.MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16],
                         block_layers=[1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10).eval(), 32
    return tv.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                                num_classes=10).eval(), 32


def _away_from_init(model):
    """Norms, biases and zero-initialised weights drawn at random, so that dropped channels matter."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            if isinstance(m, nn.Linear) and not bool(m.weight.any()):  # ViT's zero head
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.1)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)


def _macs(net, x) -> float:
    """MACs per example torch's flop counter counts (attention in its math kernel, which it sees into)."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            net(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return counter.get_total_flops() / 2 / x.shape[0]


def test_window_attention_is_torchvisions_on_the_same_weights(tv):
    from torchvision.models.swin_transformer import shifted_window_attention
    torch.manual_seed(0)
    c, heads, window = 8, 2, [3, 3]
    x = torch.randn(2, 7, 5, c)  # padded to 9 × 6
    qkv, proj = torch.randn(3 * c, c), torch.randn(c, c)
    qkv_bias, proj_bias, bias = torch.randn(3 * c), torch.randn(c), torch.randn(1, heads, 9, 9)
    for shift, scale in (([0, 0], None), ([1, 1], None), ([1, 1], torch.rand(heads, 1, 1) + 1.0)):
        args = (x, qkv, proj, bias, window, heads, shift, 0.0, 0.0, qkv_bias, proj_bias, scale, False)
        assert torch.allclose(window_attention(*args), shifted_window_attention(*args), atol=1e-5)


def test_pruned_window_attention_is_torchvisions_without_the_pruned_head(tv):
    """Input channels 1, 4, 6 of 8 (the rest are zeros), head 1 of 2, output channels 0 and 5."""
    from torchvision.models.swin_transformer import shifted_window_attention
    torch.manual_seed(1)
    c, d, window, shift = 8, 4, [3, 3], [1, 1]
    x = torch.randn(2, 6, 6, c)
    cols, rows = torch.tensor([1, 4, 6]), torch.tensor([0, 5])
    x[..., [i for i in range(c) if i not in cols.tolist()]] = 0.0
    qkv, proj, qkv_bias, proj_bias = torch.randn(3 * c, c), torch.randn(c, c), torch.randn(3 * c), torch.randn(c)
    bias = torch.randn(1, 2, 9, 9)
    dropped = qkv.clone(), qkv_bias.clone()
    for t in dropped:
        t[2 * c:2 * c + d] = 0.0  # head 0's values
    full = shifted_window_attention(x, dropped[0], proj, bias, window, 2, shift, qkv_bias=dropped[1],
                                    proj_bias=proj_bias, training=False)[..., rows]
    kept = torch.cat([torch.arange(d, 2 * d) + part * c for part in range(3)])  # head 1's q, k and v rows
    small = window_attention(x[..., cols], qkv[kept][:, cols], proj[rows][:, d:], bias[:, 1:], window, 1, shift,
                             qkv_bias=qkv_bias[kept], proj_bias=proj_bias[rows], training=False)
    assert torch.allclose(small, full, atol=1e-5)


def test_pruned_relative_attention_is_maxvits_without_the_pruned_head(tv):
    from torchvision.models.maxvit import RelativePositionalMultiHeadAttention
    torch.manual_seed(2)
    attn = RelativePositionalMultiHeadAttention(8, 4, 4).eval()  # 2 heads of 4, windows of 2×2
    x = torch.randn(2, 3, 4, 8)
    with torch.no_grad():
        assert torch.allclose(RelativeAttention.pruned(attn, torch.arange(8), torch.arange(8))(x), attn(x), atol=1e-6)
        cols, rows = torch.tensor([0, 2, 7]), torch.tensor([3, 4])
        x[..., [i for i in range(8) if i not in cols.tolist()]] = 0.0
        z = torch.tensor([0.5, 2.0])
        small = RelativeAttention.pruned(attn, cols, rows, z, torch.tensor([0]), torch.tensor([0.8]))
        attn.to_qkv.weight[16 + 4:] = 0.0  # head 1's values
        attn.to_qkv.bias[16 + 4:] = 0.0
        attn.to_qkv.weight[16:16 + 4] *= 0.8
        attn.to_qkv.bias[16:16 + 4] *= 0.8
        assert small.n_heads == 1 and small.relative_position_bias_table.shape[1] == 1
        assert torch.allclose(small(x[..., cols]), attn(x)[..., rows] * z, atol=1e-6)


def test_patch_merging_is_a_probed_channel_map(tv):
    model, size = _tiny(tv, "swin")
    graph = ChannelGraph.build(model, torch.randn(2, 3, size, size))
    (merge,) = graph.computed_gathers
    src, sources = graph.gathers[merge]
    assert torch.equal(sources, torch.arange(4 * 16) % 16)  # x0 … x3: four samples of every channel, side by side
    assert graph.tensors[merge].dim == -1 and len(graph.tensors[merge].segments) == 4


@pytest.mark.parametrize("name, mode", [(name, mode) for name in ("swin", "maxvit", "vit") for mode in
                                        ("mixed", "regular")] + [("maxvit", BlockMode("mixed", 4))])
def test_random_masks_compact_to_the_gated_network_with_the_costs_counted(tv, name, mode):
    model, size = _tiny(tv, name)
    _away_from_init(model)
    x = torch.randn(2, 3, size, size)
    graph = ChannelGraph.build(model, x)
    heads = [g for g in graph.groups.values() if g.position == "heads"]
    assert heads and set(graph.ungated) == {"head" if name == "swin" else "classifier.5" if name == "maxvit"
                                            else "heads.head"}
    gen = torch.Generator().manual_seed(3)
    masks = {gid: torch.rand(g.channels, generator=gen) < 0.6 for gid, g in graph.groups.items()}
    for m in masks.values():
        m[0] = True
    for g in heads:  # the last head goes in every attention layer
        masks[g.id][-1] = False
    gated = masked_output(model, graph, masks, x)
    small = compact(model, graph, masks, mode=mode)
    with torch.no_grad():
        out, plain = small(x), model(x)
    scale = float(gated.abs().max())
    assert float((plain - gated).abs().max()) > 1e-2 * scale  # the masks change the network
    assert float((out - gated).abs().max()) <= 1e-5 * scale
    assert CostModel(graph, "flops", mode).hard(masks) == pytest.approx(_macs(small, x))
    assert CostModel(graph, "params", mode).hard(masks) == sum(p.numel() for p in small.parameters())
    assert CostModel(graph, "flops").full() == pytest.approx(_macs(model, x))
    kept = sorted(int(masks[g.id].sum()) for g in heads)  # whole heads, never padded to a channel multiple
    assert sorted(m.num_heads if isinstance(m, SelfAttention) else m.n_heads for m in small.modules()
                  if isinstance(m, (SelfAttention, RelativeAttention))) == ([] if name == "swin" else kept)


def _swin_v2(tv):
    torch.manual_seed(0)
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformerBlockV2
    model = tv.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[2, 4], window_size=[4, 4],
                               num_classes=10, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2).eval()
    _away_from_init(model)
    return model


def test_a_swin_v2_prunes_its_channels_and_heads(tv):
    """V2's cosine attention scales its logits per head and computes its position bias with an MLP
    whose last layer writes one value per head: a pruned head takes its logit scale and that layer's
    row with it, the view splitting the MLP's output takes the new head count."""
    model = _swin_v2(tv)
    x = torch.randn(1, 3, 32, 32)  # one example: the bias MLP runs once per forward, counted per example
    graph = ChannelGraph.build(model, x)
    heads = {g.id: g for g in graph.groups.values() if g.position == "heads"}
    assert set(heads) == {"features.1.0.attn:heads", "features.1.1.attn:heads", "features.3.0.attn:heads"}
    assert "features.1.0.attn.cpb_mlp.2" not in graph.groups and set(graph.ungated) == {"head"}
    assert graph.layers["features.1.0.attn.cpb_mlp.2"].follows == graph.layers["features.1.0.attn"].heads_tensor
    gen = torch.Generator().manual_seed(3)
    masks = {gid: torch.rand(g.channels, generator=gen) < 0.6 for gid, g in graph.groups.items()}
    for m in masks.values():
        m[0] = True
    masks["features.1.0.attn:heads"] = torch.tensor([False, True])  # the first head goes: its bias row first
    masks["features.3.0.attn:heads"] = torch.tensor([True, False, True, False])
    gated = masked_output(model, graph, masks, x)
    scale = float(gated.abs().max())
    with torch.no_grad():
        assert float((model(x) - gated).abs().max()) > 1e-2 * scale  # the masks change the network
    for mode in ("mixed", "regular"):
        small = compact(model, graph, masks, mode=mode)
        with torch.no_grad():
            assert float((small(x) - gated).abs().max()) <= 1e-5 * scale
        assert CostModel(graph, "flops", mode).hard(masks) == pytest.approx(_macs(small, x))
        assert CostModel(graph, "params", mode).hard(masks) == sum(p.numel() for p in small.parameters())
        kept = {name: (small.get_parameter(f"{name}.logit_scale").shape[0],
                       small.get_submodule(f"{name}.cpb_mlp.2").out_features)
                for name in ("features.1.0.attn", "features.3.0.attn")}
        assert kept == {"features.1.0.attn": (1, 1), "features.3.0.attn": (2, 2)}
    assert CostModel(graph, "flops").full() == pytest.approx(_macs(model, x))


def test_a_swin_v2_plan_written_before_its_heads_were_pruned_replays_with_them_whole(tv):
    from budgetprune.plan import make_plan, replay
    model = _swin_v2(tv)
    x = torch.randn(1, 3, 32, 32)
    graph = ChannelGraph.build(model, x)
    masks = {gid: torch.arange(g.channels) % 3 != 1 for gid, g in graph.groups.items() if g.position != "heads"}
    small = compact(model, graph, masks)  # the heads whole, as a version-6 plan kept them
    plan = make_plan(graph, masks, block="mixed", granularity="channel", gate_inputs=True)
    assert plan["version"] == 7 and "features.1.0.attn:heads" in plan["groups"]
    old = {**plan, "version": 6, "groups": {g: n for g, n in plan["groups"].items() if not g.endswith(":heads")},
           "kept": {g: k for g, k in plan["kept"].items() if not g.endswith(":heads")}}
    again = replay(old, model, small.state_dict())
    with torch.no_grad():
        assert torch.allclose(again(x), small(x), atol=1e-6)
    with pytest.raises(Exception, match="does not match the pruning plan"):
        replay({**old, "version": 7}, model, small.state_dict())  # today a Swin V2 plan names its heads
