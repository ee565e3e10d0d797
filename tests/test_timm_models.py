"""timm's models: its BatchNorm + activation modules and its ViT attention are pruned.

Uses timm when it is installed (``make test`` installs it beside torchvision, without
dependencies; timm imports torchvision, which conftest's operator-schema shim makes importable).
The whole family table is ``python benchmarks/torchvision_models.py --source timm``.
"""

from __future__ import annotations

import pytest
import torch

import budgetprune
from budgetprune import Pruner
from budgetprune.graph import ChannelGraph
from budgetprune.io import load_file

from loops import pruning_steps

timm = pytest.importorskip("timm")


def _prune(model, size: int, steps: int = 2):
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, size, size), torch.randint(0, 10, (4,))
    pruner = Pruner(model, x, "flops=0.5", total_steps=steps, gate_init=3.0)
    pruning_steps(model, pruner, torch.optim.AdamW(pruner.parameters(lr=1e-3), lr=1e-3), [(x, y)] * steps)
    small, report = pruner.finalize(x)
    return pruner, small, report, x


def _vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, depth=2,
                             **kwargs)


def test_a_timm_vit_prunes_heads_and_widths_and_saves_as_a_plan(tmp_path):
    model = _vit()
    graph = ChannelGraph.build(model, torch.randn(2, 3, 32, 32))
    assert set(graph.ungated) == {"head"}  # every attention, MLP and the patch embedding gated
    assert {g for g in graph.groups if g.endswith(":heads")} == {"blocks.0.attn:heads", "blocks.1.attn:heads"}
    pruner, small, report, x = _prune(model, 32)
    assert report["compaction_max_abs_diff"] <= 1e-4
    assert 0.95 <= report["pruned"]["flops"] / (0.5 * pruner.full["flops"]) <= 1.0
    attn = small.get_submodule("blocks.0.attn")
    assert type(attn).__name__ == "SelfAttention" and not attn.tuple_output
    path = tmp_path / "vit.pt"
    budgetprune.save(small, path)  # its unset optional inputs (mask, causal flag) are gone: self-contained
    assert "graph" in torch.load(path, weights_only=True)
    for loaded in (budgetprune.load(path), load_file(path, model=_vit())[0]):
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)


def test_a_timm_attention_with_query_key_norms_is_left_whole():
    from torch import nn
    model = _vit(qk_norm=True)
    graph = ChannelGraph.build(model, torch.randn(2, 3, 32, 32))
    assert not any(g.endswith(":heads") for g in graph.groups)  # its own modules: traced through
    assert isinstance(model.blocks[0].attn.q_norm, nn.LayerNorm)


def test_a_timm_mobilenet_v3_of_batchnorm_act_modules_prunes_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = budgetprune.create_model("timm:mobilenetv3_small_050", in_channels=3, num_classes=10,
                                     input_size=(32, 32))
    graph = ChannelGraph.build(model, torch.randn(2, 3, 32, 32))
    assert not any("batch_norm" in why for why in graph.ungated.values())
    assert type(model.bn1).__name__ == "BatchNormAct2d" and graph.groups["conv_stem"].host == "bn1"
    pruner, small, report, x = _prune(model, 32)
    assert report["compaction_max_abs_diff"] <= 1e-4
    assert type(small.get_submodule("bn1")).__name__ == "BatchNormAct2d"
    path = tmp_path / "mnv3.pt"
    budgetprune.save(small, path)
    torch.manual_seed(0)
    fresh = budgetprune.create_model("timm:mobilenetv3_small_050", in_channels=3, num_classes=10, input_size=(32, 32))
    loaded = load_file(path, model=fresh)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)
