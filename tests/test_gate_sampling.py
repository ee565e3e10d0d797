"""Gates sampled once per batch fold into their host's weights: the network computes exactly what
multiplying the host's output by the same sample computes, with the same gradients, and makes no
pass over the feature maps for it (budgetprune.attach, Pruner(gate_sample=...))."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from budgetprune import Pruner, attach, layer_subclasses
from budgetprune.attach import GateHooks, fold_targets
from budgetprune.errors import ConfigError
from budgetprune.gates import HardConcreteGate
from budgetprune.graph import ChannelGraph
from budgetprune.models.registry import create_model
from loops import pruning_steps, random_batches


class _TokenMLP(nn.Module):
    """A linear layer over tokens (channels last) and one over a flat input (its input gated)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16 * 5, 10)

    def forward(self, x):  # x: (N, 60)
        t = F.relu(self.embed(x.view(x.shape[0], 5, 12)))
        t = F.relu(self.mix(t))
        return self.head(t.flatten(1))


class _PlainBN(nn.Module):
    """Hosts that cannot fold: a BatchNorm without affine parameters, a convolution called twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, affine=False)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.shared(F.relu(self.shared(x))))
        return self.fc(x.mean((2, 3)))


MODELS = {
    "lenet5": (lambda: create_model("lenet5", in_channels=1, num_classes=10), (4, 1, 28, 28)),
    "lenet300": (lambda: create_model("lenet300", in_channels=1, num_classes=10), (4, 1, 28, 28)),
    "resnet20": (lambda: create_model("resnet20", in_channels=1, num_classes=10), (4, 1, 28, 28)),
    "tokens": (_TokenMLP, (4, 60)),
    "unfoldable": (_PlainBN, (4, 1, 12, 12)),
}


def _gated(name: str, fold: bool, monkeypatch) -> tuple[nn.Module, dict, torch.Tensor]:
    """A seeded model with Hard Concrete gates (log α spread so that some samples are exactly 0 or 1)
    attached per batch, folding where it can (``fold``) or multiplying every host's output."""
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(*shape)
    graph = ChannelGraph.build(model, x[:2], gate_inputs=True)
    gates = {}
    for gid, group in graph.groups.items():
        gate = HardConcreteGate(group.units)
        with torch.no_grad():
            gate.log_alpha.copy_(torch.linspace(-2.5, 2.5, group.units))
        gates[gid] = gate
    if not fold:
        monkeypatch.setattr(attach, "fold_targets", lambda module, channels: None)
    GateHooks(model, graph, gates, sample="batch")
    monkeypatch.undo()
    return model, gates, x


@pytest.mark.parametrize("name", list(MODELS))
def test_folded_per_batch_gates_compute_and_train_as_multiplied_ones(name, monkeypatch):
    results = []
    for fold in (True, False):
        model, gates, x = _gated(name, fold, monkeypatch)
        model.train()
        torch.manual_seed(7)  # the same gate samples in both
        out = model(x)
        (out.square().mean() + out[:, 0].sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        grads.update({f"gate:{g}": gate.log_alpha.grad.clone() for g, gate in gates.items()})
        model.eval()
        with torch.no_grad():
            results.append((out.detach(), model(x), grads))
    (out_f, eval_f, grad_f), (out_m, eval_m, grad_m) = results
    torch.testing.assert_close(out_f, out_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eval_f, eval_m, rtol=1e-5, atol=1e-6)
    assert grad_f.keys() == grad_m.keys()
    for key in grad_f:  # folding sums the same products in another order: errors scale with the tensor's largest entry
        scale = float(grad_m[key].abs().max())
        torch.testing.assert_close(grad_f[key], grad_m[key], rtol=1e-4, atol=1e-6 + 1e-5 * scale, msg=key)
    assert any(float(g.abs().sum()) > 0 for k, g in grad_f.items() if k.startswith("gate:"))


def test_the_host_gets_its_own_parameters_back_also_when_its_forward_fails(monkeypatch):
    model, gates, x = _gated("lenet5", True, monkeypatch)
    originals = {n: p for n, p in model.named_parameters()}
    model.train()
    model(x).sum().backward()
    assert {n: p for n, p in model.named_parameters()} == originals
    assert all(type(p) is nn.Parameter for p in model.parameters())
    conv = model.get_submodule(next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)))
    with pytest.raises(RuntimeError):
        conv(torch.randn(2, 5, 28, 28))  # wrong input channels: the convolution raises
    assert {n: p for n, p in model.named_parameters()} == originals


class _FeatureMapMultiplies(TorchDispatchMode):
    """Counts the multiplications whose result is as large as a feature map of the batch."""

    def __init__(self, smallest: int):
        super().__init__()
        self.smallest, self.count = smallest, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mul, torch.ops.aten.mul_) and \
                isinstance(out, torch.Tensor) and out.numel() >= self.smallest:
            self.count += 1
        return out


@pytest.mark.parametrize("sample, expect_passes", [("batch", False), ("example", True)])
def test_per_batch_gates_make_no_pass_over_the_feature_maps(sample, expect_passes):
    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=1, num_classes=10)
    x = torch.randn(8, 1, 28, 28)
    pruner = Pruner(model, x[:2], budget="flops=0.5", method="bar", total_steps=10, gate_sample=sample)
    smallest = 8 * 64 * 7 * 7  # the smallest feature map of resnet20 on this batch
    with _FeatureMapMultiplies(smallest) as counter:
        loss = F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)) + pruner.penalty()
        loss.backward()
    assert (counter.count > 0) == expect_passes


def test_fold_targets_only_for_modules_whose_parameters_scale_their_outputs():
    assert fold_targets(nn.Conv2d(3, 8, 3), 8) == [("weight", (-1, 1, 1, 1)), ("bias", (-1,))]
    assert fold_targets(nn.Linear(4, 6, bias=False), 6) == [("weight", (-1, 1))]
    assert fold_targets(nn.BatchNorm2d(8), 8) == [("weight", (-1,)), ("bias", (-1,))]
    assert fold_targets(nn.BatchNorm2d(8, affine=False), 8) is None
    assert fold_targets(nn.ConvTranspose2d(8, 4, 3), 4) is None  # its weight's rows are the inputs

    class Standardised(nn.Conv2d):  # transforms its weight first: a scale would be normalised away
        def forward(self, x):
            w = self.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
            return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)

    class Renamed(nn.Conv2d):  # torch's forward: what nn.Conv2d computes (budgetprune.layer_subclasses)
        pass
    standardised = Standardised(3, 8, 3)
    layer_subclasses.examine(standardised)
    assert fold_targets(standardised, 8) is None
    assert fold_targets(Renamed(3, 8, 3), 8) == [("weight", (-1, 1, 1, 1)), ("bias", (-1,))]
    conv = nn.Conv2d(3, 8, 3)
    torch.nn.utils.parametrize.register_parametrization(conv, "weight", nn.Identity())
    assert fold_targets(conv, 8) is None


def test_a_pruner_with_per_batch_gates_meets_its_budget(demo_subsets):
    torch.manual_seed(0)
    train, _ = demo_subsets(512)
    model = create_model("lenet5", in_channels=1, num_classes=10)
    batches = random_batches(train, 40)
    pruner = Pruner(model, batches[0][0], "flops=0.25", method="bar", total_steps=len(batches), gate_init=3.0,
                    gate_sample="batch")
    pruning_steps(model, pruner, torch.optim.SGD(pruner.parameters(lr=0.01), lr=0.01, momentum=0.9), batches)
    small, report = pruner.finalize()
    assert report["pruned"]["flops"] <= pruner.budget.absolute(pruner.graph)
    assert report["compaction_max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("value", ["per-batch", 1, None])
def test_an_unknown_gate_sample_is_one_line(value):
    model = create_model("lenet5", in_channels=1, num_classes=10)
    with pytest.raises(ConfigError, match="gate_sample must be one of example, batch"):
        Pruner(copy.deepcopy(model), torch.zeros(2, 1, 28, 28), budget=0.5, total_steps=5, gate_sample=value)


def test_a_folded_layer_whose_inputs_are_all_closed_outputs_nothing(monkeypatch):
    """The purge (attach.py): a layer none of whose inputs is open outputs nothing, not its bias,
    whatever order the gates were given in (its input gate runs first)."""
    torch.manual_seed(0)
    model = create_model("lenet300", in_channels=1, num_classes=10)
    x = torch.randn(4, 1, 28, 28)
    graph = ChannelGraph.build(model, x[:2], gate_inputs=True)
    inputs = next(gid for gid, g in graph.groups.items() if g.position == "input")
    first = next(gid for gid, g in graph.groups.items() if g.position == "output")
    gates = {gid: HardConcreteGate(g.units) for gid, g in reversed(graph.groups.items())}
    with torch.no_grad():
        gates[inputs].log_alpha.fill_(-10.0)  # every input feature closed
    seen = {}
    hooks = GateHooks(model, graph, gates, sample="batch")
    host = model.get_submodule(graph.groups[first].host)
    host.register_forward_hook(lambda module, args, out: seen.setdefault("first", out.detach()))
    model.train()
    model(x)
    hooks.remove()
    assert float(seen["first"].abs().max()) == 0.0


def test_the_command_line_samples_per_batch_and_records_it(tmp_path):
    import json

    from budgetprune import cli
    out = tmp_path / "run"
    assert cli.main(["prune", "--model", "lenet5", "--data", "demo", "--budget", "4x", "--gate-sample", "batch",
                     "--out", str(out), "--no-progress", "--teacher-epochs", "1", "--epochs", "1",
                     "--finetune-epochs", "0", "--lowlr-epochs", "0", "--deploy-runtime", "none"]) == 0
    assert json.loads((out / "config.json").read_text())["gate_sample"] == "batch"
    m = json.loads((out / "metrics.json").read_text())
    assert m["pruned"]["volume"] <= m["budget"] + 1e-9


def test_gates_sampled_together_are_each_gates_inverse_cdf_sample():
    """sample_joined draws several gates' samples as one tensor: each gate's block is the paper's
    inverse CDF (seed 001, supplement Eq. 4) of its own log α on the same uniform noise, and the
    gradient of one gate's sample reaches that gate's log α only."""
    from budgetprune.gates import BETA, GAMMA, ZETA, sample_joined
    a, b = HardConcreteGate(3), HardConcreteGate(2)
    with torch.no_grad():
        a.log_alpha.copy_(torch.tensor([-2.0, 0.0, 1.5]))
        b.log_alpha.copy_(torch.tensor([3.0, -0.5]))
    la = torch.tensor([-2.0, 0.0, 1.5, 3.0, -0.5], dtype=torch.float64)
    for batch, shape in ((500, (500, 5)), (None, (5,))):
        torch.manual_seed(11)
        za, zb = sample_joined([a, b], batch).split([3, 2], dim=-1)
        torch.manual_seed(11)
        u = torch.rand(shape).clamp(1e-6, 1 - 1e-6).double()
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / BETA)
        expected = (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
        assert za.shape == shape[:-1] + (3,) and zb.shape == shape[:-1] + (2,)
        torch.testing.assert_close(torch.cat([za, zb], dim=-1).double(), expected, atol=1e-5, rtol=0)
    za.sum().backward()
    assert float(a.log_alpha.grad.abs().sum()) > 0
    assert b.log_alpha.grad is None or float(b.log_alpha.grad.abs().sum()) == 0


class _Draws(TorchDispatchMode):
    """Counts the uniform noise tensors drawn."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.uniform_, torch.ops.aten.rand):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sample", ["example", "batch"])
def test_the_gates_are_drawn_once_per_forward_pass_and_only_while_sampling(sample, monkeypatch):
    torch.manual_seed(0)
    model = create_model("lenet5", in_channels=1, num_classes=10)
    x = torch.randn(6, 1, 28, 28)
    pruner = Pruner(model, x[:2], budget="flops=0.5", method="bar", total_steps=10, gate_sample=sample)
    drawn = []
    real = attach.sample_joined
    monkeypatch.setattr(attach, "sample_joined", lambda gates, batch: drawn.append(gates) or real(gates, batch))
    model.train()
    outs = []
    for seed in (1, 2, 1):
        torch.manual_seed(seed)
        with _Draws() as draws:
            outs.append(model(x))
        assert draws.count == 1  # every gate of the network from one draw
    assert not torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])  # a new draw each pass
    gates = {gid: pruner.method.gate(gid) for gid in pruner.graph.groups}
    assert drawn[-1] == list(gates.values())
    # a part of the model called on its own, twice: each call draws anew (nothing left over is reused)
    torch.manual_seed(3)
    first, second = model.features(x), model.features(x)
    assert len(drawn) == 5 and not torch.equal(first, second)
    frozen = next(iter(gates.values()))
    frozen.freeze(torch.zeros(frozen.num_channels))  # a frozen gate is not drawn: its values are its own
    with _Draws() as draws:
        model(x)
    assert draws.count == 1 and drawn[-1] == list(gates.values())[1:]
    model.eval()
    with _Draws() as draws:
        model(x)
    assert draws.count == 0


@pytest.mark.parametrize("shape", [(7, 30), (30,)])
def test_open_in_every_row_is_each_pieces_any_then_all(shape):
    """One reduction for all pieces, against each piece tested on its own."""
    from budgetprune.gates import open_in_every_row, piece_index
    gen = torch.Generator().manual_seed(1)
    sizes = [1, 4, 10, 2, 13]
    for _ in range(20):
        z = torch.rand(shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.3)
        expected = [bool((p != 0).any(dim=-1).all()) for p in z.split(sizes, dim=-1)]
        assert open_in_every_row(z, piece_index(sizes, z.device)) == expected
    assert open_in_every_row(torch.ones(shape), piece_index(sizes, torch.device("cpu"))) == [True] * 5


def test_the_purge_is_skipped_only_where_it_would_multiply_by_one(monkeypatch):
    """A layer whose input only gates with an open unit in every example write is not purged, so
    the hooks skip the purge's product; the outputs and gradients are those of the hooks that
    always compute it, also where a layer is purged in some examples only (its open-looking
    sample then no longer counts as open for the layers after it)."""
    model = create_model("lenet5", in_channels=1, num_classes=10)
    x = torch.randn(16, 1, 28, 28)
    graph = ChannelGraph.build(model, x[:2])
    gates = {gid: HardConcreteGate(g.units) for gid, g in graph.groups.items()}
    first = next(iter(gates.values()))

    def run(skip: bool):
        opens = []
        with monkeypatch.context() as m:
            if not skip:
                m.setattr(attach, "open_in_every_row", lambda z, pieces: [False] * (int(pieces[-1]) + 1))
            hooks = GateHooks(model, graph, gates)
            m.setattr(hooks, "_input_open", lambda sources, real=hooks._input_open: opens.append(1) or real(sources))
            torch.manual_seed(5)
            out = model(x)
            hooks.remove()
        (grad,) = torch.autograd.grad(out.square().sum(), first.log_alpha)
        return out, grad, len(opens)

    model.train()
    with torch.no_grad():
        first.log_alpha.fill_(-4.0)  # the first layer fully closed in some examples, not in others
    torch.manual_seed(5)
    closed = (attach.sample_joined(list(gates.values()), 16)[:, :first.num_channels] == 0).all(dim=-1)
    assert 0 < int(closed.sum()) < 16
    (out, grad, purges), (out_ref, grad_ref, purges_ref) = run(skip=True), run(skip=False)
    assert purges > 0 and purges_ref == len(graph.groups) - 1
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)
    assert float(out[closed].detach().std(dim=0).max()) == 0  # the examples with a closed first layer: purged all along
    with torch.no_grad():
        first.log_alpha.fill_(3.0)  # open in every example: no purge computed
    (out, grad, purges), (out_ref, grad_ref, _) = run(skip=True), run(skip=False)
    assert purges == 0
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=0, atol=0)
