"""A short real BAR run on a residual network, through the Python API and the command line."""

from __future__ import annotations


import pytest
import torch

import budgetprune
from budgetprune import cli

FAST = dict(teacher_epochs=1, epochs=2, finetune_epochs=1, lowlr_epochs=0, batch_size=64, progress=False,
            deploy_runtime="none")  # the result's speed is not timed here (tests/test_cli.py times it)


@pytest.fixture(scope="module")
def demo_small(demo_subsets):
    return demo_subsets(384)


@pytest.mark.slow
@pytest.mark.parametrize("block", ["mixed", "regular"])
def test_bar_on_resnet20_meets_budget(demo_small, block, tmp_path):
    train, test = demo_small
    torch.manual_seed(0)
    model = budgetprune.create_model("resnet20")
    small, m = budgetprune.prune(model, train, test, budget="4x", out=tmp_path / "run", log=None, block=block, **FAST)
    assert m["pruned"]["volume"] <= m["budget"] + 1e-9 and 0.95 <= m["budget_ratio"] <= 1.0
    assert m["block"] == block and set(m["pruned_by_block"]) == {"auto", "mixed", "regular"}
    assert m["pruned_by_block"]["mixed"]["volume"] <= m["pruned_by_block"]["regular"]["volume"]
    assert m["compaction_max_abs_diff"] <= 1e-5
    assert isinstance(small, torch.fx.GraphModule)
    again = budgetprune.load(tmp_path / "run" / "model.pt")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(again(x), small.eval()(x), atol=1e-6)
    assert sum(p.numel() for p in small.parameters()) == m["pruned"]["params"]


def test_inspect_command(capsys):
    code = cli.main(["inspect", "--model", "resnet20", "--input-shape", "3,32,32"])
    out, _ = capsys.readouterr()
    assert code == 0 and "layer2.0.downsample.0" in out and "not pruned: fc: feeds the network output" in out
    code = cli.main(["inspect", "--model", "resnet20", "--input-shape", "3,x"])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1


@pytest.mark.parametrize("block", ["regular", "auto"])
def test_a_method_trains_against_the_cost_of_the_blocks_finalize_builds(block):
    """The Pruner hands the method its blocks (at exact widths): an iterative method's last cut then
    meets the budget as finalize counts it, and the projection drops none of the channels it kept.
    Counted with mixed blocks instead (every method did so before), the same masks cost far more
    with regular ones, and finalize cut channels the method had trained."""
    from budgetprune.liveness import BlockMode
    from budgetprune.resources import CostModel

    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    pruner = budgetprune.Pruner(budgetprune.create_model("resnet20"), x, 0.3, method="magnitude", total_steps=4,
                                block=block, channel_multiple=1, deploy_runtime="eager", log=lambda _line: None)
    assert isinstance(pruner.method.cost_mode, BlockMode) and pruner.method.cost_mode == block
    assert pruner.method.cost_mode.multiple == 1
    for _ in range(4):
        pruner.step()
    masks = pruner.method.keep_masks()
    limit = pruner.budget.absolute(pruner.graph)
    built = CostModel(pruner.graph, "volume", pruner.block).hard(masks)
    assert 0.9 * limit < built <= limit
    if block == "regular":  # what the mixed count let through
        assert CostModel(pruner.graph, "volume", "mixed").hard(masks) < 0.9 * built
    _, report = pruner.finalize()
    assert report["channels_dropped_by_projection"] == 0
