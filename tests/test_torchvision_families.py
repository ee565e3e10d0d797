"""torchvision's model families, small: what the channel graph sees through in each, and that a
Pruner meets a FLOP budget, compacts to equal outputs, and saves and loads.

One model per structure the graph handles (grouped convs, squeeze-and-excitation with
stochastic depth, channel split and shuffle, linear layers over tokens and channels-last
maps, attention layers and their heads: ViT's, Swin's windows, MaxViT's windows and grids), built from torchvision's own classes in a small configuration so the module runs in
a minute. The full-size
table is ``benchmarks/torchvision_models.py``'s. torchvision imports after conftest's shim.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import budgetprune
from budgetprune import Pruner
from loops import pruning_steps


@pytest.fixture(scope="module")
def models():
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (make test installs it)")
    import torchvision.models
    return torchvision.models


CLASSIFIER = {"vit": "heads.head", "convnext": "classifier.2", "swin": "head", "maxvit": "classifier.5"}


def _build(models, name):
    if name == "vit":  # ViT-B's layout, tiny: 2 layers, 16-dim tokens, 32×32 images in 8×8 patches
        return models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                        mlp_dim=48, num_classes=10), 32
    if name == "convnext":  # ConvNeXt's block layout, tiny: two stages of one block
        from torchvision.models.convnext import CNBlockConfig
        return models.ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=10), 32
    if name == "regnet":  # RegNetY's layout (grouped convs, squeeze-and-excitation), tiny
        from torchvision.models.regnet import BlockParams
        params = BlockParams.from_init_params(depth=3, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25)
        return models.RegNet(params, num_classes=10, stem_width=16), 32
    if name == "efficientnet":  # EfficientNet's MBConv (squeeze-and-excitation, stochastic depth), tiny
        from torchvision.models.efficientnet import MBConvConfig
        setting = [MBConvConfig(1, 3, 1, 16, 16, 1), MBConvConfig(4, 3, 2, 16, 24, 2)]
        return models.EfficientNet(setting, dropout=0.2, stochastic_depth_prob=0.2, num_classes=10), 32
    if name == "shufflenet":  # ShuffleNetV2's units (channel split and shuffle), tiny
        return models.ShuffleNetV2([2, 1, 1], [8, 16, 32, 64, 128], num_classes=10), 32
    if name == "swin":  # Swin-T's layout, tiny: window attention (shifted in the second block), patch merging
        return models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                      window_size=[4, 4], num_classes=10), 32
    if name == "maxvit":  # MaxViT-T's layout, tiny: MBConv, window and grid attention in one block
        return models.MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16],
                             block_layers=[1], head_dim=8, stochastic_depth_prob=0.1, num_classes=10), 32
    raise ValueError(name)


def _prunable(graph, model):
    """Output channels of conv/linear layers in groups, following one (depthwise, SE scale) or in a
    gated attention head (3·d query, key and value rows of an nn.Linear projection)."""
    groups = sum(g.channels for g in graph.groups.values() if g.position == "output")
    following = sum(l.out_channels for l in graph.layers.values()
                    if (l.depthwise or l.follows) and l.out_group is None and graph.tensors[l.out_tensor].sources())
    modules = dict(model.named_modules())
    heads = sum(g.channels * 3 * graph.layers[g.producer].attention.head_dim for g in graph.groups.values()
                if g.position == "heads" and isinstance(
                    modules[graph.layers[g.producer].attention.qkv_weight.rpartition(".")[0]], nn.Linear))
    return groups + following + heads


@pytest.mark.parametrize("name, structure", [
    ("regnet", "groups"),
    ("efficientnet", "scales"),
    ("shufflenet", "gathers"),
    ("vit", "tokens"),
    ("convnext", "tokens"),
    ("swin", "tokens"),
    ("maxvit", "tokens"),
])
def test_a_family_prunes_to_the_budget_with_equal_outputs_and_loads(models, name, structure, tmp_path):
    torch.manual_seed(0)
    model, size = _build(models, name)
    x, y = torch.randn(4, 3, size, size), torch.randint(0, 10, (4,))
    pruner = Pruner(model, x, "flops=0.5", total_steps=2, gate_init=3.0)
    graph = pruner.graph
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if structure == "groups":
        assert any(g.units < g.channels for g in graph.groups.values()) and any(l.follows for l in graph.layers.values())
        assert _prunable(graph, model) == sum(m.out_channels for m in layers if isinstance(m, nn.Conv2d))  # not fc
    elif structure == "scales":
        assert any(l.follows for l in graph.layers.values())
        assert set(graph.ungated) == {"classifier.1"}
    elif structure == "gathers":
        assert graph.gathers and graph.splits and set(graph.ungated) == {"fc"}
    else:  # the token / channels-last signal too, through LayerNorms, attention (its heads), class token,
        # position embedding, patch merging and window partitions
        assert any(g.dim == -1 for g in graph.groups.values())
        assert set(graph.ungated) == {CLASSIFIER[name]}
        assert _prunable(graph, model) == sum(m.out_features if isinstance(m, nn.Linear) else m.out_channels
                                              for m in layers) - 10  # all but the classifier
        if name != "convnext":
            assert any(g.position == "heads" for g in graph.groups.values())
    pruning_steps(model, pruner, torch.optim.SGD(pruner.parameters(lr=1e-3), lr=1e-3), [(x, y)] * 2)
    small, report = pruner.finalize(x)
    with torch.no_grad():
        scale = float(small(x).abs().max())
    assert scale > 0 and report["compaction_max_abs_diff"] <= 1e-4 * scale
    assert 0.95 <= report["pruned"]["flops"] / pruner.budget.absolute(graph) <= 1.0
    budgetprune.save(small, tmp_path / "m.pt")
    if name == "vit":  # its compacted attention and patches are safe ops: the file stands alone
        assert "graph" in torch.load(tmp_path / "m.pt", weights_only=True)
    again = budgetprune.load(tmp_path / "m.pt", model=_build(models, name)[0])
    with torch.no_grad():
        assert torch.allclose(again(x), small(x), atol=1e-5 * max(scale, 1.0))


@pytest.mark.parametrize("name", ["regnet", "efficientnet", "shufflenet", "convnext", "swin", "maxvit"])
def test_random_masks_with_pruned_away_layers_compact_to_what_the_costs_count(models, name):
    """Random keep-masks with a sixth of the groups that may close closed whole (a projection at a
    high factor removes whole blocks): in padded regular and mixed blocks the compacted network
    computes the gated one's outputs, with the widths the slot sets give and the parameters the
    report counts. Random masks of this kind found a ShuffleNet branch kept alive by the padding of
    the concatenation after it, and expansions, depthwise convs and squeeze-and-excitations of
    pruned-away blocks counted in the costs but removed by compaction."""
    from budgetprune.liveness import BlockMode
    from test_compaction import attach_random, check_compaction
    from loops import randomise_batchnorms

    torch.manual_seed(0)
    model, size = _build(models, name)
    model.eval()
    randomise_batchnorms(model)
    if name == "maxvit":  # its small classifier weights give outputs of 1e-4, too small to compare
        with torch.no_grad():
            model.classifier[-1].weight.mul_(100.0)
    x = torch.randn(4, 3, size, size)
    graph = budgetprune.ChannelGraph.build(model, x[:1])
    for seed in range(2):
        bar = attach_random(model, graph, seed=seed, shift=-1.0)
        masks = bar.keep_masks()
        closable = [gid for gid in masks if not graph.groups[gid].min_keep]
        order = torch.randperm(len(closable), generator=torch.Generator().manual_seed(seed))
        for i in order[: max(1, len(closable) // 6)].tolist():
            masks[closable[i]] = torch.zeros_like(masks[closable[i]])
        for mode in (BlockMode("regular", 8), BlockMode("mixed", 8)):
            check_compaction(model, graph, bar, masks, x, mode)
        bar.detach()
