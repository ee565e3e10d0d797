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
