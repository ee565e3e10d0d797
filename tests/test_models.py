"""The model zoo: residual, wide, dense, depthwise and squeeze-and-excitation networks.

Each model builds for 1×28×28 and 3×32×32 inputs, gives (batch, classes) outputs, traces
with torch.fx to a module with identical outputs, and has the published parameter count.
Big models are counted on the meta device (no memory, no compute).
"""

import pytest
import torch
from torch import fx, nn

import budgetprune
from budgetprune.errors import ConfigError
from budgetprune.models import available_models, create_model

SMALL_MODELS = ["resnet20", "resnet56", "tiny_densenet", "tiny_mobilenetv2", "tiny_senet"]
INPUTS = [(1, 28, 28), (3, 32, 32)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small convs are far faster on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_forward_and_trace(model: nn.Module, shape, num_classes: int = 10):
    torch.manual_seed(0)
    model.eval()
    x = torch.randn(2, *shape)
    traced = fx.symbolic_trace(model)
    with torch.no_grad():
        y, y_traced = model(x), traced(x)
    assert y.shape == (2, num_classes)
    assert torch.isfinite(y).all()
    assert torch.equal(y, y_traced)


def test_models_are_registered():
    names = set(available_models())
    assert {"resnet20", "resnet56", "resnet50", "wrn", "tiny_densenet", "tiny_mobilenetv2", "tiny_senet"} <= names


@pytest.mark.parametrize("shape", INPUTS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", SMALL_MODELS)
def test_small_models_run_and_trace(name, shape):
    model = create_model(name, in_channels=shape[0], num_classes=10, input_size=shape[1:])
    check_forward_and_trace(model, shape)


@pytest.mark.parametrize("shape", INPUTS, ids=lambda s: "x".join(map(str, s)))
def test_wrn_runs_and_traces(shape):
    # WRN-10-2 has every kind of block of the default WRN-16-12 (shortcut conv in each stage).
    model = create_model("wrn", in_channels=shape[0], num_classes=10, input_size=shape[1:], depth=10, width=2)
    check_forward_and_trace(model, shape)


def test_wrn_default_is_wrn_16_12():
    with torch.device("meta"):
        model = create_model("wrn", in_channels=3, num_classes=10, input_size=(32, 32))
        assert model(torch.empty(2, 3, 32, 32)).shape == (2, 10)
        assert fx.symbolic_trace(model)(torch.empty(2, 3, 28, 28)).shape == (2, 10)
    assert len(model.layer1) == 2 and model.fc.in_features == 64 * 12
    assert n_params(model) == 24_637_914


def test_cifar_resnet_parameter_counts():
    # Per BasicBlock c→c: two 3×3 convs 2·9c² and two BNs 4c. Stage change c→2c: conv1 18c²,
    # conv2 36c², BNs 8c, projection 1×1 conv 2c² + BN 4c. Stem 27·16 + 32, fc 64·10 + 10.
    def count(n):
        block = lambda c: 18 * c * c + 4 * c  # noqa: E731
        first = lambda c: 18 * c * c + 36 * c * c + 8 * c + 2 * c * c + 4 * c  # noqa: E731
        return (27 * 16 + 32) + n * block(16) + first(16) + (n - 1) * block(32) \
            + first(32) + (n - 1) * block(64) + 650
    assert count(3) == 272_474 and count(9) == 855_770
    assert n_params(create_model("resnet20", in_channels=3)) == 272_474  # option A: 0.27M
    assert n_params(create_model("resnet56", in_channels=3)) == 855_770  # option A: 0.85M


def test_cifar_resnet_layout():
    model = create_model("resnet20", in_channels=3)
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3)] == [3, 3, 3]
    assert model.layer1[0].downsample is None
    for stage in (model.layer2, model.layer3):
        conv, bn = stage[0].downsample
        assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and conv.bias is None
        assert isinstance(bn, nn.BatchNorm2d) and stage[0].conv1.stride == (2, 2)
    assert not any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())


def test_resnet20_with_100_classes():
    model = create_model("resnet20", in_channels=3, num_classes=100, input_size=(32, 32)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("depth,width,published", [(28, 10, 36.5e6), (16, 8, 11.0e6)])
def test_wrn_parameter_counts(depth, width, published):
    with torch.device("meta"):
        model = create_model("wrn", in_channels=3, num_classes=10, input_size=(32, 32), depth=depth, width=width)
    assert abs(n_params(model) - published) / published < 0.01  # 36,479,194 and 10,961,370


@pytest.mark.parametrize("depth", [15, 4, 0, "16"])
def test_wrn_bad_depth(depth):
    with pytest.raises(ConfigError, match="wrn depth must be 6n\\+4") as err:
        create_model("wrn", depth=depth)
    assert "\n" not in str(err.value)


def test_resnet50_is_torchvision_resnet50():
    model = create_model("resnet50", in_channels=3, num_classes=1000)
    assert n_params(model) == 25_557_032
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3, 4)] == [3, 4, 6, 3]
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)  # v1.5
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 128, 128)], ids=["1x28x28", "3x128x128"])
def test_resnet50_shapes_and_trace(shape):
    with torch.device("meta"):  # shapes only
        model = create_model("resnet50", in_channels=shape[0], num_classes=10, input_size=shape[1:])
        x = torch.empty(2, *shape)
        assert model(x).shape == (2, 10)
        assert fx.symbolic_trace(model)(x).shape == (2, 10)


def test_tiny_models_are_tiny():
    for name in ("tiny_densenet", "tiny_mobilenetv2", "tiny_senet"):
        assert n_params(budgetprune.create_model(name, in_channels=3)) < 100_000


def test_tiny_model_structure():
    dense = create_model("tiny_densenet")
    assert dense.features.denseblock2[2].conv.out_channels == 8
    mobile = create_model("tiny_mobilenetv2")
    depthwise = [m for m in mobile.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert [b.use_res_connect for b in mobile.features[1:-1]] == [True, False, True, False]
    senet = create_model("tiny_senet")
    blocks = [*senet.layer1, *senet.layer2]
    assert len(blocks) == 3 and all(hasattr(b, "se") for b in blocks)
    assert [b.downsample is not None for b in blocks] == [False, False, True]
