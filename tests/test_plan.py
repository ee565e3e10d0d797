"""Save and load any pruned model: the pruning plan replayed on the user's own model.

A network a self-contained file can describe keeps that form (and carries its plan too); any
other (here: hyphenated module names and a tensor method outside the allow-list) is saved as
plan + weights and loaded with ``budgetprune.load(path, model=TheUnprunedModel())``, with equal
outputs, and exported to ONNX. A plan never becomes code: a damaged or mismatched one is one line.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import budgetprune
from budgetprune import Pruner, cli
from budgetprune.errors import CheckpointError
from loops import pruning_steps

HAVE_ORT = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


class Unusual(nn.Module):
    """What a self-contained file cannot hold: module names with '-' (RegNet's style) and
    ``Tensor.clamp`` (not in budgetprune's allow-list)."""

    def __init__(self):
        super().__init__()
        self.add_module("stem-conv", nn.Conv2d(1, 16, 3, padding=1))
        self.add_module("stem-bn", nn.BatchNorm2d(16))
        self.add_module("body-conv", nn.Conv2d(16, 24, 3, padding=1, stride=2))
        self.add_module("body-bn", nn.BatchNorm2d(24))
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        h = getattr(self, "stem-bn")(getattr(self, "stem-conv")(x)).clamp(min=0)
        h = F.relu(getattr(self, "body-bn")(getattr(self, "body-conv")(h)))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _pruned(model_cls, budget="flops=0.5", steps=10):
    torch.manual_seed(0)
    model = model_cls()
    x = torch.randn(16, 1, 28, 28)
    y = torch.randint(0, 10, (16,))
    pruner = Pruner(model, x, budget, total_steps=steps, gate_init=3.0)
    optimizer = torch.optim.Adam(pruner.parameters(lr=1e-2), lr=1e-2)
    pruning_steps(model, pruner, optimizer, [(x, y)] * steps)
    small, report = pruner.finalize()
    return small, report, x


def test_a_network_no_file_can_describe_is_saved_as_plan_and_weights(tmp_path, capsys):
    small, report, x = _pruned(Unusual)
    full = Pruner(Unusual(), x, "flops=0.5", total_steps=1).full["flops"]
    assert report["pruned"]["flops"] <= 0.5 * full  # on the budget: channels were removed
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in Unusual().parameters())
    path = tmp_path / "unusual.pt"
    budgetprune.save(small, path, meta={"input_shape": [1, 28, 28]})
    stored = torch.load(path, weights_only=True)
    assert stored["version"] == 4 and "graph" not in stored and "plan" in stored
    with pytest.raises(CheckpointError, match=r"model=TheUnprunedModel\(\)"):
        budgetprune.load(path)
    assert cli.main(["info", str(path)]) == 2 and capsys.readouterr().err.count("\n") == 1
    again = budgetprune.load(path, model=Unusual())
    with torch.no_grad():
        assert torch.allclose(again(x), small(x), atol=1e-6)
    budgetprune.save(again, tmp_path / "again.pt")  # a replayed model saves again
    assert torch.load(tmp_path / "again.pt", weights_only=True)["plan"] == stored["plan"]


@pytest.mark.skipif(not HAVE_ORT, reason="onnx/onnxruntime not installed")
def test_a_replayed_model_exports_to_onnx(tmp_path):
    from budgetprune.export import to_onnx
    small, _, x = _pruned(Unusual)
    budgetprune.save(small, tmp_path / "u.pt")
    again = budgetprune.load(tmp_path / "u.pt", model=Unusual())
    result = to_onnx(again, tmp_path / "u.onnx", x[:2])
    assert result["verified"] and result["max_abs_diff"] <= 1e-4


def test_a_describable_network_keeps_its_self_contained_form_and_its_plan(tmp_path):
    small, _, x = _pruned(lambda: budgetprune.create_model("lenet5"))
    path = tmp_path / "lenet.pt"
    budgetprune.save(small, path)
    stored = torch.load(path, weights_only=True)
    assert stored["version"] == 2 and "graph" in stored and "plan" in stored
    by_graph, by_plan = budgetprune.load(path), budgetprune.load(path, model=budgetprune.create_model("lenet5"))
    with torch.no_grad():
        assert torch.equal(by_graph(x), small(x)) and torch.allclose(by_plan(x), small(x), atol=1e-6)


def test_the_plan_must_match_the_model_passed(tmp_path):
    small, _, _ = _pruned(Unusual)
    budgetprune.save(small, tmp_path / "u.pt")
    with pytest.raises(CheckpointError, match="does not match the pruning plan") as err:
        budgetprune.load(tmp_path / "u.pt", model=budgetprune.create_model("lenet5"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("edit, words", [
    (lambda p: p.update(format="x"), "not a budgetprune pruning plan"),
    (lambda p: p.update(version=99), "upgrade budgetprune"),
    (lambda p: p.update(block="fancy"), "granularity, block"),
    (lambda p: p.update(input_shape=[-1, 28, 28]), "input shape"),
    (lambda p: p.update(groups=[1, 2]), "groups"),
    (lambda p: p["kept"].update({next(iter(p["kept"])): [10 ** 6]}), "kept channels"),
    (lambda p: p["kept"].update({next(iter(p["kept"])): [0, 0]}), "kept channels"),
    (lambda p: p["kept"].update({"__import__('os')": [0]}), "kept channels"),
    (lambda p: p["groups"].update({k: n + 5 for k, n in p["groups"].items()}), "does not match the pruning plan"),
])
def test_a_damaged_plan_is_one_line(edit, words, tmp_path):
    small, _, _ = _pruned(Unusual)
    path = tmp_path / "u.pt"
    budgetprune.save(small, path)
    stored = torch.load(path, weights_only=True)
    plan = json.loads(stored["plan"])
    edit(plan)
    stored["plan"] = json.dumps(plan)
    torch.save(stored, path)
    with pytest.raises(CheckpointError) as err:
        budgetprune.load(path, model=Unusual())
    assert words in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_file_without_a_plan_says_so_when_a_model_is_passed(tmp_path):
    path = tmp_path / "plain.pt"
    budgetprune.save(torch.fx.symbolic_trace(budgetprune.create_model("lenet5")), path)
    with pytest.raises(CheckpointError, match="no pruning plan"):
        budgetprune.load(path, model=budgetprune.create_model("lenet5"))


def test_the_full_pipeline_prunes_a_network_only_a_plan_can_describe(tmp_path, demo_subsets):
    """budgetprune.prune (the command line's pipeline) on such a network: teacher.pt, the fine-tune
    checkpoints and model.pt hold plans, and a run resumed at the fine-tune stage ends as one."""
    train, test = demo_subsets(256, 128)
    options = dict(budget="flops=0.6", teacher_epochs=1, epochs=1, finetune_epochs=2, lowlr_epochs=0, log=None,
                   progress=False, deploy_runtime="none")  # nothing timed: runs a and b must choose alike
    torch.manual_seed(0)
    small, metrics = budgetprune.prune(Unusual(), train, test, out=tmp_path / "a", **options)
    assert 0.8 <= metrics["budget_ratio"] <= 1.0
    for name in ("teacher.pt", "model.pt"):
        assert "graph" not in torch.load(tmp_path / "a" / name, weights_only=True)
    again = budgetprune.load(tmp_path / "a" / "model.pt", model=Unusual())
    x = test[0][0].unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(again(x), small(x), atol=1e-6)

    # interrupted after the first fine-tune epoch, then resumed from its checkpoint
    class Stop(Exception):
        pass

    def stop(line):
        if line.startswith("[finetune] epoch 1/"):
            raise Stop

    torch.manual_seed(0)
    with pytest.raises(Stop):
        budgetprune.prune(Unusual(), train, test, out=tmp_path / "b", **{**options, "log": stop})
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["arch"] == "null"
    torch.manual_seed(0)
    resumed, _ = budgetprune.prune(Unusual(), train, test, out=tmp_path / "b", resume=True, **options)
    with torch.no_grad():
        assert torch.allclose(resumed(x), small(x), atol=1e-5)


def test_masks_of_indices_sets_exactly_the_listed_channels():
    from budgetprune.plan import masks_of_indices
    masks = masks_of_indices({"a": [0, 3], "b": []}, {"a": 5, "b": 2})
    assert masks["a"].tolist() == [True, False, False, True, False]
    assert masks["b"].tolist() == [False, False] and masks["a"].dtype == torch.bool
