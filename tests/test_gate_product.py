"""The per-example gate product written into its host's output (budgetprune.gate_product): the
same values and gradients as autograd's product followed by the ReLU, computed independently
here, with no copy of the feature map kept for backward; and where the hooks use it
(budgetprune.attach.in_place_gate_host)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from budgetprune import Pruner, attach
from budgetprune.gate_product import gate_product
from budgetprune.graph import ChannelGraph
from budgetprune.models.registry import create_model


def _hard_concrete_like(u):
    """Gate values in [0, 1] from free parameters, 0 where clamped (as a Hard Concrete sample)."""
    return (1.2 * torch.sigmoid(u) - 0.1).clamp(0, 1)


def _case(seed, activation, in_place):
    """conv → gate → activation → a loss; gradients of the conv's weight and of the gate's parameters."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 6, 3)
    u = torch.randn(4, 6, requires_grad=True)
    u.data[0, :3] = -5.0  # clamped to 0: those gates are exactly 0
    x = torch.randn(4, 3, 9, 9)
    target = torch.randn(4, 6, 7, 7)
    z = _hard_concrete_like(u).view(4, 6, 1, 1)
    if in_place is None:  # the independent computation: autograd's own product
        y = activation(conv(x) * z)
    else:
        y = activation(gate_product(conv(x), z, in_place=in_place))
    loss = ((y - target) ** 2).sum()
    loss.backward()
    return y.detach(), conv.weight.grad, conv.bias.grad, u.grad


@pytest.mark.parametrize("activation", [F.relu, lambda t: F.relu(t, inplace=True), nn.ReLU6(inplace=True),
                                        lambda t: t.relu_()], ids=["relu", "relu_inplace", "relu6_inplace", "relu_"])
@pytest.mark.parametrize("seed", [0, 1])
def test_in_place_product_has_autograds_values_and_gradients(activation, seed):
    expect = _case(seed, activation, None)
    got = _case(seed, activation, True)
    assert torch.equal(got[0], expect[0])
    for g, e in zip(got[1:], expect[1:]):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert expect[3][0, :3].abs().max() == 0 and expect[3].abs().max() > 0  # the clamped gates get nothing


def test_in_place_product_on_a_linear_layers_tokens():
    """A linear layer over (N, L, C) tokens returns a view of its 2-d product: written in place all the same."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 6)
    x = torch.randn(3, 4, 5)
    u = torch.zeros(3, 1, 6).uniform_(-1, 1).requires_grad_(True)  # some gates 0
    grads = []
    for in_place in (False, True):
        y, z = lin(x), u.clamp(min=0)
        y = F.relu(gate_product(y, z, in_place=True) if in_place else y * z)
        (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
        grads.append((lin.weight.grad, u.grad))
        lin.weight.grad, u.grad = None, None
    torch.testing.assert_close(grads[1], grads[0])


def test_the_gate_gradient_divides_the_product_back_by_the_gate_hand_worked():
    """One channel, two positions: y = x·z = (1.5, -2)·0.5, relu → (0.75, 0); L = 3·relu(y)_0 + 7·relu(y)_1,
    so ∂L/∂z = 3·1.5 = 4.5 and ∂L/∂x = (3·0.5, 0)."""
    x0 = torch.tensor([[[1.5, -2.0]]], requires_grad=True)
    z = torch.tensor([[[0.5]]], requires_grad=True)
    y = torch.relu(gate_product(x0 * 1.0, z, in_place=True))
    (y * torch.tensor([[[3.0, 7.0]]])).sum().backward()
    assert y.tolist() == [[[0.75, 0.0]]]
    assert z.grad.item() == pytest.approx(4.5)
    assert x0.grad.tolist() == [[[1.5, 0.0]]]


def _kept_bytes(in_place: bool, relu) -> int:
    """Bytes conv → gate product → ReLU leaves allocated at the end of its forward pass (torch.profiler's
    memory events): what autograd keeps for backward, whoever holds it, and the output."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    x = torch.randn(2, 3, 10, 10)
    z = torch.rand(2, 8, 1, 1, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = relu(gate_product(conv(x), z, in_place=in_place))
    del out
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_parent is None)


def test_the_in_place_product_keeps_no_map_of_its_own_before_an_in_place_relu():
    feature_map = 2 * 8 * 8 * 8 * 4
    assert _kept_bytes(False, torch.relu_) - _kept_bytes(True, torch.relu_) == feature_map
    # a ReLU with an output of its own: the product stays alive (as autograd's product keeps its input)
    assert _kept_bytes(False, torch.relu) == _kept_bytes(True, torch.relu)


def test_a_retained_graph_gives_the_same_gradients_twice():
    x0 = torch.randn(2, 3, 4, 4, requires_grad=True)
    z = torch.rand(2, 3, 1, 1, requires_grad=True)
    loss = torch.relu_(gate_product(x0 * 1.0, z, in_place=True)).square().sum()
    first = torch.autograd.grad(loss, (x0, z), retain_graph=True)
    second = torch.autograd.grad(loss, (x0, z))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_without_gradients_the_product_is_written_in_place():
    x = torch.randn(2, 3, 4, 4)
    z = torch.rand(2, 3, 1, 1)
    expect = x * z
    with torch.no_grad():
        out = gate_product(x, z, in_place=True)
    assert out is x and torch.equal(out, expect)


class _Readers(nn.Module):
    """BatchNorm outputs read by a ReLU in place, by a ReLU with an output of its own, by a ReLU and
    a residual sum, by an in-place sum, by a sum (traced as the same add as the in-place one), by
    a sigmoid, by F.relu(inplace=True); a convolution called twice."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c4, self.b4 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c5, self.b5 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c6, self.b6 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c7, self.b7 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.twice = nn.Conv2d(8, 8, 1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        a = self.relu(self.b1(self.c1(x)))
        a = F.relu(self.b6(self.c6(a)))
        a = F.relu(self.b7(self.c7(a)), inplace=True)
        b = self.b2(self.c2(a))
        a = F.relu(b) + b
        c = self.b3(self.c3(a))
        c += a
        c = self.b5(self.c5(c)) + c
        d = torch.sigmoid(self.b4(self.c4(self.relu(c))))
        d = self.twice(self.twice(d))
        return self.head(d.mean((2, 3)))


def test_in_place_only_where_the_one_reader_is_a_relu_in_place():
    graph = ChannelGraph.build(_Readers(), torch.zeros(2, 3, 8, 8))
    names = ("b1", "b2", "b3", "b4", "b5", "b6", "b7", "twice", "c1")
    where = {name: attach.in_place_gate_host(graph, name) for name in names}
    assert where == {"b1": True, "b2": False, "b3": False, "b4": False, "b5": False, "b6": False, "b7": True,
                     "twice": False, "c1": False}


def _registry_in_place(name):
    """budgetprune's own network with every ReLU working in place, as torchvision's."""
    model = create_model(name, in_channels=3, num_classes=10, input_size=(16, 16))
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = True
    return model


def _torchvision(name):
    import importlib.util
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (make test installs it)")
    import torchvision.models  # after conftest's operator schemas
    return getattr(torchvision.models, name)(num_classes=10)


MODELS = {"resnet20": lambda: _registry_in_place("resnet20"), "resnet50": lambda: _registry_in_place("resnet50"),
          "torchvision:resnet18": lambda: _torchvision("resnet18"),
          "torchvision:mobilenet_v2": lambda: _torchvision("mobilenet_v2")}  # ReLU6 in place


def _pruner_gradients(monkeypatch, in_place: bool, name: str):
    if not in_place:
        monkeypatch.setattr(attach, "in_place_gate_host", lambda graph, host: False)
    torch.manual_seed(0)
    model = MODELS[name]()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    pruner = Pruner(model, x, "flops=0.5", method="bar", total_steps=10)
    torch.manual_seed(1)
    loss = F.cross_entropy(model(x), y) + pruner.penalty()
    loss.backward()
    monkeypatch.undo()
    names = [n for n, _ in model.named_parameters()] + [f"gate.{n}" for n, _ in pruner.method.named_parameters()]
    params = list(model.parameters()) + list(pruner.method.parameters())
    return loss.detach(), {n: p.grad.clone() for n, p in zip(names, params) if p.grad is not None}, pruner


@pytest.mark.parametrize("name", list(MODELS))
def test_a_bar_pruner_trains_the_same_with_the_product_in_place(monkeypatch, name):
    loss_plain, plain, _ = _pruner_gradients(monkeypatch, False, name)
    loss_in_place, got, pruner = _pruner_gradients(monkeypatch, True, name)
    assert len(pruner.method._hooks.in_place) >= 4  # the path is taken
    assert torch.equal(loss_plain, loss_in_place)
    assert plain.keys() == got.keys()
    for n in plain:
        torch.testing.assert_close(got[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)
