"""The Pruner inside a user's own training loop: any optimizer, any loss, any output structure.

Every method of the zoo is driven the same way (penalty, step, finalize) and ends on its
budget; a model trained with a regression loss and models that return a dict or a tuple are
pruned; the pruner's state resumes a loop exactly; bad arguments give one line.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import budgetprune
from budgetprune import Pruner
from budgetprune.errors import BudgetpruneError, ConfigError
from budgetprune.methods import available_methods
from loops import pruning_steps, random_batches


def _loop(model, pruner, batches, loss_fn, lr=0.01):
    """The loop of the README: the user's optimizer and loss, the pruner's penalty and step."""
    optimizer = torch.optim.SGD(pruner.parameters(lr=lr), lr=lr, momentum=0.9)
    pruning_steps(model, pruner, optimizer, batches, loss_fn)
    return optimizer


def _ratio(pruner, report) -> float:
    return report["pruned"][pruner.budget.metric] / pruner.budget.absolute(pruner.graph)


def test_bar_in_a_plain_sgd_loop_meets_a_flops_budget(demo_subsets):
    torch.manual_seed(0)
    train, _ = demo_subsets(512)
    model = budgetprune.create_model("lenet5")
    batches = random_batches(train, 40)
    pruner = Pruner(model, batches[0][0], "flops=0.25", method="bar", total_steps=len(batches), gate_init=3.0)
    seen = []
    optimizer = torch.optim.SGD(pruner.parameters(lr=0.01), lr=0.01, momentum=0.9)
    for x, y in batches:
        loss = F.cross_entropy(model(x), y) + pruner.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()
        seen.append(pruner.status())
    assert {"V", "b", "f", "progress"} <= set(seen[0]) and seen[-1]["progress"] == 1.0
    assert seen[0]["b"] > seen[-1]["b"]  # the wall moved from the full cost toward the target
    assert [g.get("name") for g in optimizer.param_groups] == ["weights", "gates"]
    small, report = pruner.finalize()
    assert 0.8 <= _ratio(pruner, report) <= 1.0  # at or under the budget (whole conv channels: coarse steps)
    x = batches[0][0]
    with torch.no_grad():
        assert small(x).shape == (32, 10)
    assert report["compaction_max_abs_diff"] <= 1e-4
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in budgetprune.create_model(
        "lenet5").parameters())


@pytest.mark.parametrize("method", available_methods())
def test_every_method_runs_in_a_user_loop_and_ends_on_its_budget(method, demo_subsets):
    torch.manual_seed(0)
    train, _ = demo_subsets(256)
    model = budgetprune.create_model("lenet5")
    batches = random_batches(train, 12)
    pruner = Pruner(model, batches[0][0], 0.5, method=method, total_steps=len(batches), dataset_size=len(train))
    _loop(model, pruner, batches, F.cross_entropy)
    small, report = pruner.finalize(batches[0][0])
    assert 0.9 <= _ratio(pruner, report) <= 1.0 + 1e-9  # on the budget: the projection trims, the fill tops up
    with torch.no_grad():
        assert small(batches[1][0]).shape == (32, 10)


def test_per_weight_pruning_in_a_user_loop(demo_subsets):
    torch.manual_seed(0)
    train, _ = demo_subsets(256)
    model = budgetprune.create_model("lenet5")
    batches = random_batches(train, 8)
    pruner = Pruner(model, batches[0][0], 0.1, method="l0", granularity="weight", total_steps=len(batches))
    _loop(model, pruner, batches, F.cross_entropy)
    small, report = pruner.finalize()
    kept = sum(int((m.weight != 0).sum()) for m in small.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert kept == int(report["pruned"]["nonzero"]) <= pruner.budget.absolute(pruner.graph)
    assert set(pruner.weight_masks) == {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


class EncoderDecoder(nn.Module):
    """A small convolutional autoencoder: the output is an image, the loss a regression."""

    def __init__(self):
        super().__init__()
        self.enc1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.enc2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32)
        self.dec1, self.bn3 = nn.Conv2d(32, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.out = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.bn1(self.enc1(x)))
        h = F.relu(self.bn2(self.enc2(h)))
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        h = F.relu(self.bn3(self.dec1(h)))
        return self.out(h)


def test_an_encoder_decoder_with_an_mse_loss_is_pruned(demo_subsets):
    """The budget penalty never depends on the task: a regression model prunes like a classifier,
    and its output channels (the image) are never pruned."""
    torch.manual_seed(0)
    train, _ = demo_subsets(256)
    model = EncoderDecoder()
    batches = [(x, x) for x, _ in random_batches(train, 20)]
    pruner = Pruner(model, batches[0][0], "volume=0.5", total_steps=len(batches), gate_init=3.0)
    assert "out" not in {g.split(":")[0] for g in pruner.graph.groups}
    _loop(model, pruner, batches, F.mse_loss)
    small, report = pruner.finalize()
    assert 0.9 <= _ratio(pruner, report) <= 1.0
    with torch.no_grad():
        assert small(batches[0][0]).shape == batches[0][0].shape


class TwoHeads(nn.Module):
    """Returns a dict (``as_dict``) or a tuple: logits and an embedding."""

    def __init__(self, as_dict: bool):
        super().__init__()
        self.as_dict = as_dict
        self.conv, self.bn = nn.Conv2d(1, 12, 5), nn.BatchNorm2d(12)
        self.hidden = nn.Linear(12 * 12 * 12, 64)
        self.embed, self.logits = nn.Linear(64, 8), nn.Linear(64, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        h = F.relu(self.hidden(torch.flatten(h, 1)))
        out = {"logits": self.logits(h), "embedding": self.embed(h)}
        return out if self.as_dict else (out["logits"], out["embedding"])


@pytest.mark.parametrize("as_dict", [True, False])
def test_models_returning_a_dict_or_a_tuple_are_pruned(as_dict, demo_subsets):
    torch.manual_seed(0)
    train, _ = demo_subsets(256)
    model = TwoHeads(as_dict)
    batches = random_batches(train, 12)

    def loss_fn(out, y):
        logits, embedding = (out["logits"], out["embedding"]) if as_dict else out
        return F.cross_entropy(logits, y) + 1e-3 * embedding.pow(2).mean()

    pruner = Pruner(model, batches[0][0], "flops=0.5", total_steps=len(batches), gate_init=3.0)
    _loop(model, pruner, batches, loss_fn)
    small, report = pruner.finalize()
    assert 0.8 <= _ratio(pruner, report) <= 1.0
    with torch.no_grad():
        out = small(batches[0][0])
    logits = out["logits"] if as_dict else out[0]
    assert logits.shape == (32, 10)


def test_a_loop_resumed_from_the_pruner_state_ends_exactly_as_an_uninterrupted_one(demo_subsets):
    train, _ = demo_subsets(256)
    batches = random_batches(train, 16)

    def start():
        torch.manual_seed(0)
        model = budgetprune.create_model("lenet5")
        pruner = Pruner(model, batches[0][0], 0.25, total_steps=len(batches))
        return model, pruner, torch.optim.Adam(pruner.parameters(lr=1e-3), lr=1e-3)

    model, pruner, optimizer = start()
    pruning_steps(model, pruner, optimizer, batches)
    whole = pruner.finalize()[0]

    model, pruner, optimizer = start()
    pruning_steps(model, pruner, optimizer, batches[:7])
    saved = {"model": model.state_dict(), "pruner": pruner.state_dict(), "optimizer": optimizer.state_dict(),
             "rng": torch.get_rng_state()}
    model, pruner, optimizer = start()  # a new process: everything rebuilt, then the user's checkpoint loaded
    model.load_state_dict(saved["model"])
    pruner.load_state_dict(saved["pruner"])
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    assert pruner.steps == 7
    pruning_steps(model, pruner, optimizer, batches[7:])
    resumed = pruner.finalize()[0]
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kwargs, words", [
    ({"total_steps": 0}, "total_steps must be a positive int"),
    ({"total_steps": 10, "example": [1, 2]}, "example_inputs must be one batch"),
    ({"total_steps": 10, "learning_rate": 1}, "unknown Pruner option(s) learning_rate"),
    ({"total_steps": 10, "budget": 1.5}, "budget"),
    ({"total_steps": 10, "block": "fancy"}, "block must be one of"),
    ({"total_steps": 10, "method": "nope"}, "unknown method"),
])
def test_bad_arguments_give_one_line(kwargs, words):
    model = budgetprune.create_model("lenet5")
    example = kwargs.pop("example", torch.zeros(2, 1, 28, 28))
    budget = kwargs.pop("budget", 0.5)
    with pytest.raises(BudgetpruneError) as err:
        Pruner(model, example, budget, **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_budget_nothing_can_reach_names_it():
    with pytest.raises(ConfigError):
        Pruner(budgetprune.create_model("lenet5"), torch.zeros(2, 1, 28, 28), 1e-6, total_steps=5)


class DropPathNet(nn.Module):
    """Training-only branches in forward (timm's drop path, functional dropout): the graph is traced
    as the model is compacted and checked, in eval mode."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        branch = self.bn2(self.conv2(h))
        if self.training:  # drop path
            keep = (torch.rand(x.shape[0], 1, 1, 1) > 0.2).to(x.dtype) / 0.8
            branch = branch * keep
        h = F.relu(h + branch)
        h = F.dropout(F.adaptive_avg_pool2d(h, 1).flatten(1), 0.3, training=self.training)
        return self.fc(h)


def test_a_model_with_training_only_branches_is_pruned_and_checked(demo_subsets):
    torch.manual_seed(0)
    train, _ = demo_subsets(128)
    model = DropPathNet()
    batches = random_batches(train, 8)
    pruner = Pruner(model, batches[0][0], "flops=0.6", total_steps=len(batches), gate_init=3.0)
    assert model.training  # building the pruner left the model's mode alone
    _loop(model, pruner, batches, F.cross_entropy)
    small, report = pruner.finalize()
    assert report["compaction_max_abs_diff"] <= 1e-4


def test_model_eval_alone_gives_deterministic_gates(demo_subsets):
    """The gates belong to the pruner, not the model; evaluation in the user's loop calls only model.eval()."""
    train, _ = demo_subsets(64)
    model = budgetprune.create_model("lenet5")
    x = random_batches(train, 1)[0][0]
    Pruner(model, x, 0.5, total_steps=10)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # sampled gates while training
        model.eval()
        assert torch.equal(model(x), model(x))


def test_the_pruner_lifecycle_is_guarded(demo_subsets):
    train, _ = demo_subsets(64)
    model = budgetprune.create_model("lenet5")
    x = random_batches(train, 1)[0][0]
    pruner = Pruner(model, x, 0.5, total_steps=10)
    with pytest.raises(ConfigError, match="already has a Pruner"):
        Pruner(model, x, 0.5, total_steps=10)  # a notebook cell run twice: no second set of gates
    first = pruner.finalize()
    assert pruner.finalize() is first  # the same result, not a second projection of the pruned model
    for call in (pruner.penalty, pruner.step):
        with pytest.raises(ConfigError, match="after finalize"):
            call()
    again = Pruner(model, x, 0.5, total_steps=10)  # the gates are gone: the model may be pruned anew
    assert again.steps == 0


class ChannelsLast(nn.Module):
    """A ConvNeXt-style block whose LayerNorm has no learned scale: nothing can switch a pruned channel
    off after it, so the stem cannot be pruned."""

    def __init__(self):
        super().__init__()
        self.stem, self.norm = nn.Conv2d(3, 16, 3), nn.LayerNorm(16, elementwise_affine=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = self.norm(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(h.mean((2, 3)))


def test_when_nothing_can_be_pruned_the_error_names_the_blocking_op():
    with pytest.raises(ConfigError) as err:
        Pruner(ChannelsLast(), torch.zeros(2, 3, 16, 16), "flops=0.5", total_steps=3)
    text = str(err.value)
    assert "nothing in the model can be pruned" in text and "stem: read by LayerNorm 'norm', which has no learned scale" in text
    assert text.index("stem:") < text.index("head: feeds the network output")  # the real blocker first


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle (view to 5-D, transpose, view back) between two convs."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        b, c, hh, ww = h.size()
        h = torch.transpose(h.view(b, 2, c // 2, hh, ww), 1, 2).contiguous().view(b, c, hh, ww)
        return self.fc(F.relu(self.conv3(h)).mean((2, 3)))


def test_a_channel_shuffle_prunes_through_and_saves_as_a_plan(tmp_path):
    """The shuffle reorders conv2's channels for conv3; compacted, it is one gather (not a flatten)."""
    torch.manual_seed(0)
    model = ChannelShuffle()
    x = torch.randn(4, 1, 12, 12)
    pruner = Pruner(model, x, "flops=0.7", total_steps=2, gate_init=3.0)
    assert {"conv1", "conv2"} <= set(pruner.graph.groups) and len(pruner.graph.gathers) == 1
    small, report = pruner.finalize()
    assert report["compaction_max_abs_diff"] <= 1e-5
    budgetprune.save(small, tmp_path / "shuffle.pt")  # torch.transpose: saved as plan + weights
    again = budgetprune.load(tmp_path / "shuffle.pt", model=ChannelShuffle())
    with torch.no_grad():
        assert torch.allclose(again(x), small(x), atol=1e-6)


class BroadcastBias(nn.Module):
    """MaxViT's pattern: a 5-D attention-like tensor plus a 4-D bias, broadcast (not a channel add)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.bias = nn.Parameter(torch.randn(2, 6, 6))
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        b = h.shape[0]
        a = h.view(b, 4, 2, 6, 6) + self.bias.unsqueeze(0)
        return self.fc(F.relu(self.conv2(a.view(b, 8, 6, 6))).mean((2, 3)))


def test_a_broadcast_add_of_other_layouts_is_left_as_it_is():
    torch.manual_seed(0)
    model = BroadcastBias()
    x = torch.randn(4, 1, 6, 6)
    pruner = Pruner(model, x, "flops=0.8", total_steps=1, gate_init=3.0)
    small, report = pruner.finalize()
    assert report["compaction_max_abs_diff"] <= 1e-5


def _gates_of_group(pruner, index=0):
    """The first protected group (min_keep > 0) of ``pruner``'s graph, and its Hard Concrete gates."""
    method = pruner.method
    group = [g for g, grp in pruner.graph.groups.items() if grp.min_keep > 0][index]
    return group, [gate for key, gate in method.gates.items() if method.gid_of[key] == group]


def test_the_fatal_pruning_guard_keeps_a_channel_that_carries_its_signal(demo_subsets):
    """Every gate of a protected group closed: the guard reopens its best channel at ẑ = ½ (not just
    above the threshold, where the folded channel passed a thousandth of its signal), and the report
    gives that as the group's smallest kept gate."""
    torch.manual_seed(0)
    train, _ = demo_subsets(64)
    model = budgetprune.create_model("lenet5")
    pruner = Pruner(model, random_batches(train, 1)[0][0][:8], "volume=0.5", method="bar", total_steps=4)
    group, gates = _gates_of_group(pruner)
    with torch.no_grad():
        for gate in gates:
            gate.log_alpha.fill_(-8.0)
            gate.log_alpha[1] = -7.0  # the best of a closed group
    pruner.step()
    assert [float(g.deterministic().detach()[1]) for g in gates] == [pytest.approx(0.5, abs=1e-6)] * len(gates)
    _, report = pruner.finalize()
    assert report["lowest_kept_gate"][group] == pytest.approx(0.5, abs=1e-6)
    assert 1 in report["masks"][group]


def test_a_channel_kept_at_a_faint_gate_is_named(demo_subsets):
    """A protected group whose only open channel is faint (the guard has not run): finalize's log names
    its group and the report holds its gate, as ẑ computes it by hand."""
    torch.manual_seed(0)
    train, _ = demo_subsets(64)
    model = budgetprune.create_model("lenet5")
    logs = []
    pruner = Pruner(model, random_batches(train, 1)[0][0][:8], "volume=0.99", method="bar", total_steps=4,
                    log=logs.append)
    group, gates = _gates_of_group(pruner)
    with torch.no_grad():
        for gate in gates:
            gate.log_alpha.fill_(-8.0)
            gate.log_alpha[0] = gate.open_threshold() + 1e-2
    _, report = pruner.finalize()
    expected = (1 / 12) * (11 / 12) * 0.01 * 1.2  # ẑ's slope at the threshold times 0.01
    assert 0 in report["masks"][group]
    assert report["lowest_kept_gate"][group] == pytest.approx(expected, rel=0.01)
    assert min(report["lowest_kept_gate"].values()) == report["lowest_kept_gate"][group]
    assert report["faint_kept_channels"] == {group: 1}
    assert any("pass under 0.01 of their signal" in line and group in line for line in logs)
