"""Models from elsewhere: ``--model torchvision:NAME``, ``timm:NAME`` and ``path/to/file.py:factory``.

torchvision 0.28 from the registry is a CUDA build; with the CPU torch its import needs the
``torchvision::nms``/``qnms`` operator schemas defined first (a shim for the tests only:
budgetprune itself never imports torchvision unless a spec names it; see tests/conftest.py).
"""

from __future__ import annotations

import importlib.util
import json
import types

import pytest
import torch

import budgetprune
import budgetprune.data
from budgetprune import Pruner, cli
from budgetprune.errors import ConfigError
from loops import pruning_steps


@pytest.fixture(scope="module")
def torchvision():
    """torchvision, importable after conftest's operator-schema shim."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (make test installs it)")
    import torchvision
    return torchvision


def test_a_torchvision_resnet18_is_pruned_saved_and_loaded(torchvision, tmp_path):
    torch.manual_seed(0)
    model = budgetprune.create_model("torchvision:resnet18", in_channels=3, num_classes=10, input_size=(32, 32))
    assert type(model).__module__.startswith("torchvision.")
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    pruner = Pruner(model, x, "flops=0.5", total_steps=3, gate_init=3.0)
    optimizer = torch.optim.Adam(pruner.parameters(lr=1e-3), lr=1e-3)
    pruning_steps(model, pruner, optimizer, [(x, y)] * 3)
    small, report = pruner.finalize()
    assert 0.9 <= report["pruned"]["flops"] / pruner.budget.absolute(pruner.graph) <= 1.0
    budgetprune.save(small, tmp_path / "r18.pt")
    again = budgetprune.load(tmp_path / "r18.pt")
    with torch.no_grad():
        assert torch.allclose(again(x), small(x), atol=1e-5)


@pytest.mark.parametrize("spec, words", [
    ("torchvision:resnet81", "did you mean 'torchvision:resnet18'"),
    ("torchvision:resnet18", "takes 3-channel images"),
])
def test_torchvision_specs_that_cannot_work_give_one_line(spec, words, torchvision):
    with pytest.raises(ConfigError, match=words) as err:
        budgetprune.create_model(spec, in_channels=1, num_classes=10)
    assert "\n" not in str(err.value)


def test_the_command_line_refuses_a_torchvision_model_for_grey_images(torchvision, tmp_path, capsys):
    code = cli.main(["prune", "--model", "torchvision:resnet18", "--data", "demo", "--budget", "0.5",
                     "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "3-channel" in err


def test_timm_specs_call_timm_with_the_data_s_channels_and_a_fixed_size_model_s_image_size(monkeypatch):
    calls = []

    def create_model(name, pretrained, num_classes, in_chans, **kwargs):
        calls.append((name, pretrained, num_classes, in_chans, kwargs))
        return budgetprune.create_model("lenet5", in_channels=in_chans, num_classes=num_classes)

    fixed = {"vit_tiny_patch16_224": True, "convnext_tiny": False, "resnet18": False}
    monkeypatch.setitem(__import__("sys").modules, "timm", types.SimpleNamespace(
        list_models=lambda: list(fixed), create_model=create_model,
        get_pretrained_cfg=lambda name: types.SimpleNamespace(input_size=(3, 224, 224), fixed_input_size=fixed[name])))
    model = budgetprune.create_model("timm:convnext_tiny", in_channels=1, num_classes=7, input_size=(28, 28))
    assert calls == [("convnext_tiny", False, 7, 1, {})] and isinstance(model, torch.nn.Module)
    budgetprune.create_model("timm:vit_tiny_patch16_224", in_channels=3, num_classes=7, input_size=(32, 32))
    budgetprune.create_model("timm:vit_tiny_patch16_224", in_channels=3, num_classes=7, input_size=(224, 224))
    budgetprune.create_model("timm:vit_tiny_patch16_224", in_channels=3, num_classes=7)  # its own size
    assert [c[4] for c in calls[1:]] == [{"img_size": (32, 32)}, {}, {}]
    with pytest.raises(ConfigError, match="did you mean 'timm:resnet18'"):
        budgetprune.create_model("timm:resnet19")


def test_torchvision_models_made_for_one_image_size_are_built_for_the_data_s(torchvision):
    vit = budgetprune.create_model("torchvision:vit_b_16", in_channels=3, num_classes=10, input_size=(32, 32))
    with torch.no_grad():
        assert vit.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert budgetprune.create_model("torchvision:vit_b_16", in_channels=3, num_classes=10).image_size == 224
    with pytest.raises(ConfigError, match="square"):
        budgetprune.create_model("torchvision:vit_b_16", in_channels=3, num_classes=10, input_size=(32, 48))
    # MaxViT's windows need sides the partition size divides: torchvision's refusal in one line
    with pytest.raises(ConfigError, match=r"torchvision:maxvit_t cannot be built for this data \(ValueError"):
        budgetprune.create_model("torchvision:maxvit_t", in_channels=3, num_classes=10, input_size=(64, 64))


MODEL_FILE = '''
import torch.nn as nn

def small_cnn(in_channels, num_classes, width=8):
    return nn.Sequential(nn.Conv2d(in_channels, width, 3), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, 2 * width, 3), nn.BatchNorm2d(2 * width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

not_a_function = 3

def broken(in_channels):
    raise ValueError("the factory failed here")
'''


def test_a_model_from_the_user_s_file_prunes_end_to_end_on_the_command_line(tmp_path, monkeypatch, capsys):
    from test_reproducibility import _demo_small
    monkeypatch.setattr(budgetprune.data, "load_dataset", lambda *a, **k: _demo_small())
    path = tmp_path / "mymodels.py"
    path.write_text(MODEL_FILE)
    out = tmp_path / "run"
    args = ["prune", "--model", f"{path}:small_cnn", "--data", "demo", "--budget", "flops=0.5", "--out", str(out),
            "--no-progress", "--teacher-epochs", "1", "--epochs", "1", "--finetune-epochs", "1", "--lowlr-epochs", "0"]
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == f"{path}:small_cnn" and 0.8 <= metrics["budget_ratio"] <= 1.0
    assert budgetprune.load(out / "model.pt")(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("factory, words", [
    ("nothing_here", "defines no function 'nothing_here'"),
    ("not_a_function", "defines no function"),
    ("broken", "broken() failed (ValueError: the factory failed here)"),
    ("1bad", "is not a function name"),
])
def test_a_bad_model_file_spec_gives_one_line(factory, words, tmp_path):
    path = tmp_path / "mymodels.py"
    path.write_text(MODEL_FILE)
    with pytest.raises(ConfigError) as err:
        budgetprune.create_model(f"{path}:{factory}")
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_model_file_that_does_not_exist_or_fails_to_run(tmp_path):
    with pytest.raises(ConfigError, match="is not a Python file"):
        budgetprune.create_model(f"{tmp_path / 'missing.py'}:f")
    bad = tmp_path / "bad.py"
    bad.write_text("import not_a_module_anywhere\n")
    with pytest.raises(ConfigError, match="running .* failed \\(ModuleNotFoundError"):
        budgetprune.create_model(f"{bad}:f")


def test_torchvision_mobilenet_v2_with_a_whole_block_pruned_compacts(torchvision):
    """An inverted residual whose expansion is pruned away entirely: its add is removed with it (the
    benchmark's mobilenet_v2 and mnasnet runs caught a compaction that left the add in place)."""
    torch.manual_seed(0)
    model = budgetprune.create_model("torchvision:mobilenet_v2", in_channels=3, num_classes=10, input_size=(64, 64))
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    pruner = Pruner(model, x, "flops=0.5", total_steps=2, gate_init=3.0)
    optimizer = torch.optim.SGD(pruner.parameters(lr=1e-3), lr=1e-3, momentum=0.9)
    pruning_steps(model, pruner, optimizer, [(x, y)] * 2)
    small, report = pruner.finalize(x)
    assert report["compaction_max_abs_diff"] <= 1e-4
    assert 0.99 <= report["pruned"]["flops"] / pruner.budget.absolute(pruner.graph) <= 1.0
