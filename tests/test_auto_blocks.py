"""``block="auto"``: each residual space built mixed or regular, whichever runs faster.

The choice (:func:`budgetprune.blocks.choose_blocks`) weighs the multiply-adds a mixed space
saves against the gathers its sums cost (γ per channel and position). These tests check it on
a network built so that it must pick each kind, with the saving counted independently (torch's
flop counter on the two compacted networks) and the gather cost worked by hand; that the cost
the budget counts under auto blocks is the compacted network's own count and its outputs the
gated network's; that the projection meets a budget under auto blocks; and that a Pruner run
keeps its choice in its plan, which replays on the user's model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import budgetprune
from budgetprune.blocks import GATHER_COST, choose_blocks, gathered_positions
from budgetprune.budget import Budget, enforce_budget, fill_budget, reopenable_channels
from budgetprune.errors import CheckpointError, ConfigError
from budgetprune.graph import _measured_macs
from budgetprune.liveness import BlockMode, effective_masks, slot_sets
from budgetprune.methods.bar import BAR
from budgetprune.plan import replay
from budgetprune.resources import CostModel, layer_costs

from loops import finalize_against_choice, pruning_steps
from test_compaction import _randomise_bn, attach_random, check_compaction, make_model


class TwoSums(nn.Module):
    """Two residual sums of 32 channels: one at 28×28, one at 14×14."""

    def __init__(self):
        super().__init__()

        def conv(stride=1, relu=True):
            return nn.Sequential(nn.Conv2d(32, 32, 3, stride=stride, padding=1), nn.BatchNorm2d(32),
                                 *([nn.ReLU()] if relu else []))

        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.a1, self.a2 = conv(), conv(relu=False)
        self.down = conv(stride=2)
        self.b1, self.b2 = conv(), conv(relu=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.a2(self.a1(x)))
        x = self.down(x)
        x = torch.relu(x + self.b2(self.b1(x)))
        return self.head(x.mean((2, 3)))


def _two_sums(kept: dict[str, int]):
    """The network, its graph and a BAR whose gates keep the first ``kept[group]`` channels
    (every channel of the groups not named), the kept ones at fractional values."""
    torch.manual_seed(0)
    model = TwoSums()
    _randomise_bn(model)
    graph = budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 28, 28))
    bar = BAR()
    bar.attach(model, graph, [Budget("flops", 0.5)])
    with torch.no_grad():
        for key, gate in bar.gates.items():
            n = kept.get(bar.gid_of[key], gate.num_channels)
            gate.log_alpha.copy_(torch.where(torch.arange(gate.num_channels) < n, 1.0 + torch.rand(gate.num_channels),
                                             torch.full((gate.num_channels,), -20.0)))
    return model, graph, bar


#: the branch of the 28×28 sum keeps 4 of its 32 channels, that of the 14×14 sum 31
KEPT = {"a2.0": 4, "b2.0": 31}


def test_the_choice_picks_each_kind_for_what_it_saves():
    model, graph, bar = _two_sums(KEPT)
    masks = bar.keep_masks()
    eff = effective_masks(graph, masks)
    big, small = graph.spaces["add"], graph.spaces["add_1"]
    flops = layer_costs(graph, "flops")
    # what a mixed space saves, by hand: its branch's last conv computes 4 (31) of 32 maps
    saving = {big: (32 - 4) * 32 * 9 * 28 * 28, small: (32 - 31) * 32 * 9 * 14 * 14}
    # what its sum costs, by hand: γ per channel of the result (all 32 kept) per position
    gathered = {big: 32 * 28 * 28, small: 32 * 14 * 14}
    gamma = GATHER_COST["eager"]
    assert saving[big] > gamma * gathered[big] and saving[small] < gamma * gathered[small]
    chosen, _ = choose_blocks(graph, eff, BlockMode("auto", gather_cost=gamma), flops)
    assert chosen.mixed == {big}
    assert gathered_positions(graph, slot_sets(graph, masks, "mixed")) == gathered[big] + gathered[small]
    assert gathered_positions(graph, slot_sets(graph, masks, chosen)) == gathered[big]
    assert gathered_positions(graph, slot_sets(graph, masks, "regular")) == 0
    # the thresholds: free gathers make both mixed, gathers dearer than the saving make neither
    assert choose_blocks(graph, eff, BlockMode("auto", gather_cost=0.0), flops)[0].mixed == {big, small}
    dear = saving[big] / gathered[big] * 1.001
    assert choose_blocks(graph, eff, BlockMode("auto", gather_cost=dear), flops)[0].mixed == frozenset()
    cheap = saving[big] / gathered[big] * 0.999
    assert choose_blocks(graph, eff, BlockMode("auto", gather_cost=cheap), flops)[0].mixed == {big}
    # the saving the choice weighs is what the compacted networks compute: torch's flop counter
    x = torch.randn(2, 1, 28, 28)
    macs = {}
    for name, mixed in (("none", set()), ("big", {big}), ("both", {big, small})):
        mode = BlockMode("auto", mixed=frozenset(mixed))
        net, _ = check_compaction(model, graph, bar, masks, x, mode)  # outputs equal the gated model's
        macs[name] = _measured_macs(net, x)
        assert CostModel(graph, "flops", mode).hard(masks) == pytest.approx(macs[name], rel=1e-12)
        gathers = sum(1 for n in net.graph.nodes if n.op == "call_function" and "index_add" in n.name)
        assert gathers == len(mixed)
    assert macs["none"] - macs["big"] == pytest.approx(saving[big], rel=1e-12)
    assert macs["big"] - macs["both"] == pytest.approx(saving[small], rel=1e-12)


def test_auto_with_equal_widths_builds_plain_sums():
    """Where the branches keep the stream's channels, no space differs: nothing to choose."""
    model, graph, bar = _two_sums({})
    mode, sets = choose_blocks(graph, effective_masks(graph, bar.keep_masks()), BlockMode("auto", gather_cost=0.0),
                               layer_costs(graph, "flops"))
    assert mode.mixed == frozenset() and all(bool(s.all()) for s in sets.values())


@pytest.mark.parametrize("multiple", [1, 8])
@pytest.mark.parametrize("name", ["resnet20", "wrn", "tiny_mobilenetv2", "tiny_senet", "tiny_densenet"])
def test_auto_cost_is_the_network_compaction_builds(name, multiple):
    model, graph = make_model(name)
    bar = attach_random(model, graph, seed=3)
    masks = bar.keep_masks()
    x = torch.randn(4, 1, 28, 28)
    mode = BlockMode("auto", multiple, gather_cost=0.0)  # every space that saves goes mixed
    net, _ = check_compaction(model, graph, bar, masks, x, mode)  # outputs, widths and params of the choice
    assert str(net.budgetprune_mode) == "auto" and net.budgetprune_mode.mixed is not None
    assert CostModel(graph, "flops", mode).hard(masks) == pytest.approx(_measured_macs(net, x), rel=1e-9)
    # never more than the cheaper of the two pure forms counts, in multiply-adds
    regular = CostModel(graph, "flops", BlockMode("regular", multiple)).hard(masks)
    mixed = CostModel(graph, "flops", BlockMode("mixed", multiple)).hard(masks)
    assert CostModel(graph, "flops", mode).hard(masks) <= min(regular, mixed) * (1 + 1e-12) or \
        name == "tiny_densenet"  # every space of a DenseNet is tied by its concatenations: regular
    if name == "tiny_densenet":
        assert net.budgetprune_mode.mixed == frozenset() or CostModel(graph, "flops", mode).hard(masks) == regular


@pytest.mark.parametrize("name", ["resnet20", "tiny_mobilenetv2"])
def test_projection_and_fill_meet_the_budget_under_auto_blocks(name):
    model, graph = make_model(name)
    bar = attach_random(model, graph, seed=5, shift=2.0)  # mostly open gates: far over budget
    masks, scores = bar.keep_masks(), bar.scores()
    mode = BlockMode("auto", 1, gather_cost=GATHER_COST["eager"])
    budget = Budget("flops", 0.4)
    limit = budget.absolute(graph)
    projected = enforce_budget(graph, masks, scores, budget, mode=mode)
    cost = CostModel(graph, "flops", mode)
    assert 0.95 * limit <= cost.hard(projected) <= limit
    filled = fill_budget(graph, projected, scores, budget, reopenable=reopenable_channels(graph, projected), mode=mode)
    assert cost.hard(projected) <= cost.hard(filled) <= limit


def test_the_projection_and_the_fill_cost_each_set_of_masks_once(monkeypatch):
    """Each greedy step reads an offer's saving, its drop per budget and whether it fits from one
    evaluation of its masks, not one each (the costs dominate the projection's time on big
    networks)."""
    from budgetprune import budget as budget_module
    model, graph = make_model("resnet20")
    bar = attach_random(model, graph, seed=5, shift=2.0)
    masks, scores = bar.keep_masks(), bar.scores()
    mode = BlockMode("auto", 1, gather_cost=GATHER_COST["eager"])
    budgets = [Budget("flops", 0.4), Budget("params", 0.6)]
    seen = []
    real = budget_module._Costs.ratios
    monkeypatch.setattr(budget_module._Costs, "ratios",
                        lambda self, m: seen.append(tuple(m[g].clone() for g in sorted(m))) or real(self, m))

    def repeats() -> int:  # an evaluation of the masks evaluated just before
        keys = [tuple(tuple(v.tolist()) for v in masks_) for masks_ in seen]
        return sum(a == b for a, b in zip(keys, keys[1:]))

    costs = budget_module._Costs(graph, budgets, mode)
    dropped_masks, dropped = budget_module._drop_until(graph, costs, {g: m.clone() for g, m in masks.items()}, scores)
    assert dropped and costs.fits(dropped_masks) and len(seen) > 20
    assert repeats() == 0
    seen.clear()
    fill_budget(graph, dropped_masks, scores, budgets, mode=mode)
    assert len(seen) > 5 and repeats() == 0


def _pruned_resnet20(**options):
    torch.manual_seed(0)
    model = budgetprune.create_model("resnet20")
    reference = budgetprune.create_model("resnet20")
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    pruner = budgetprune.Pruner(model, x, "flops=0.5", total_steps=2, method="magnitude", **options)
    optimizer = torch.optim.SGD(pruner.parameters(lr=0.01), lr=0.01)
    pruning_steps(model, pruner, optimizer, [(x, y)] * 2)
    return pruner, reference, x


def test_pruner_default_under_a_flop_budget_is_auto_and_its_plan_replays(tmp_path):
    pruner, reference, x = _pruned_resnet20(gather_cost=0.0, deploy_runtime="eager")
    assert str(pruner.block) == "auto" and pruner.block.gather_cost == 0.0
    small, report = pruner.finalize(x)
    assert report["pruned"]["flops"] <= pruner.budget.absolute(pruner.graph)
    assert set(report["pruned_by_block"]) == {"auto", "mixed", "regular"}
    assert report["pruned_by_block"]["auto"]["flops"] == pytest.approx(report["pruned"]["flops"], rel=1e-12)
    assert _measured_macs(small, x) == pytest.approx(report["pruned"]["flops"], rel=1e-9)
    plan = small.budgetprune_plan
    assert plan["block"] == "auto" and plan["mixed_spaces"]  # magnitude pruning leaves every stream mixed-able
    assert all(name in pruner.graph.spaces for name in plan["mixed_spaces"])
    again = replay(plan, reference, small.state_dict())
    with torch.no_grad():
        assert torch.allclose(again(x), small(x), atol=1e-6)
    path = tmp_path / "m.pt"
    budgetprune.save(small, path)
    with torch.no_grad():
        assert torch.allclose(budgetprune.load(path)(x), small(x), atol=1e-6)
    plan = {**plan, "mixed_spaces": ["no_such_tensor"]}
    with pytest.raises(CheckpointError, match="no tensor 'no_such_tensor'"):
        replay(plan, reference, small.state_dict())


def test_pruner_gather_cost_follows_the_deploy_runtime():
    model = budgetprune.create_model("resnet20")
    for runtime in ("eager", "torchscript"):
        pruner = budgetprune.Pruner(model, torch.zeros(2, 1, 28, 28), 0.5, total_steps=1, deploy_runtime=runtime,
                                    block="auto")
        assert pruner.block.gather_cost == GATHER_COST[runtime]
        pruner.finalize()
    with pytest.raises(ConfigError, match="gather_cost must be a non-negative number"):
        budgetprune.Pruner(model, torch.zeros(2, 1, 28, 28), 0.5, total_steps=1, gather_cost=-1.0)


class BranchOnAStream(nn.Module):
    """A residual branch added to the network's input: with regular blocks the stream keeps every
    channel whatever the branch's last conv keeps, and its first conv is not prunable (a softmax
    over its channels follows it)."""

    def __init__(self):
        super().__init__()
        self.b1 = nn.Conv2d(8, 16, 3, padding=1)
        self.b2 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = x + self.b2(torch.softmax(self.b1(x), dim=1))
        return self.head(y.mean(dim=(2, 3)))


def test_a_branch_whose_channels_save_nothing_alone_is_pruned_away_whole():
    """Removing one channel of the branch's last conv saves nothing in a regular block (the input
    keeps the slot), and no set of writers can close it; removing the whole conv saves it and the
    first conv with it. The projection offers that (before, it stopped: "cannot be met")."""
    from budgetprune import enforce_budget, parse_budget
    from budgetprune.compact import compact
    from budgetprune.graph import ChannelGraph

    torch.manual_seed(0)
    model = BranchOnAStream().eval()
    x = torch.randn(2, 8, 8, 8)
    graph = ChannelGraph.build(model, x)
    assert set(graph.groups) == {"b2"} and graph.groups["b2"].min_keep == 0
    masks = {"b2": torch.ones(8, dtype=torch.bool)}
    final = enforce_budget(graph, masks, {"b2": torch.rand(8)}, parse_budget(0.3, "flops"), mode="regular")
    assert not bool(final["b2"].any())
    small = compact(model, graph, final, mode="regular")
    with torch.no_grad():
        assert torch.allclose(small(x), model.head(x.mean(dim=(2, 3))), atol=1e-6)


@pytest.mark.parametrize("budget,form", [
    ("volume=0.25", ("mixed", 1)), ("params=0.25", ("auto", "auto")),
    ("flops=0.25", ("auto", "auto")), ("volume=0.25,flops=0.5", ("auto", "auto")),
    ("latency=0.5", ("auto", "auto"))])
def test_the_default_form_follows_the_budgets(budget, form):
    """Naming neither block nor channel_multiple: mixed blocks at exact widths under volume budgets
    alone (the paper's form; what the budget pays for is then only channels the method trained),
    the fastest form (auto, auto) as soon as a budget is on FLOPs, parameters or latency. The
    Pruner and the run's config resolve them alike, and a named one is kept."""
    from budgetprune.pipeline import PruneConfig
    from budgetprune.budget import parse_budgets
    from budgetprune.liveness import auto_paddings
    from budgetprune.pruner import default_form

    budgets = parse_budgets(budget, "volume")
    assert default_form([b.metric for b in budgets]) == form
    first, *extra = budgets
    config = PruneConfig(budget=first.fraction, metric=first.metric,
                         extra_budgets={b.metric: b.fraction for b in extra})
    assert (config.block, config.channel_multiple) == form
    assert (PruneConfig(metric=first.metric, block="regular").block,
            PruneConfig(metric=first.metric, channel_multiple=8).channel_multiple) == ("regular", 8)
    if first.metric == "latency":
        return  # building a latency Pruner times a table; the rule is the same function
    model = budgetprune.create_model("resnet20")
    pruner = budgetprune.Pruner(model, torch.zeros(2, 1, 28, 28), budget, total_steps=1, deploy_runtime="eager")
    assert str(pruner.block) == form[0]
    assert pruner.paddings == (auto_paddings() if form[1] == "auto" else (pruner.block.padding(),))
    assert pruner.block.multiple == (8 if form[1] == "auto" else 1)


def test_a_volume_budget_s_default_form_spends_it_on_the_channels_the_method_chose():
    """ResNet-20 at an eighth of its volume, magnitude masks (189 channels chosen): the default form
    (mixed, exact) spends nearly all the budget on chosen channels (share 0.99, 25 dropped by the
    projection), where the fastest form (auto blocks, padded to 8) drops more of them to pay for its
    padding and its shared residual widths (0.66, 59)."""
    def finalized(**options):
        torch.manual_seed(0)
        model = budgetprune.create_model("resnet20")
        pruner = budgetprune.Pruner(model, torch.randn(4, 1, 28, 28), "volume=0.125", total_steps=3,
                                    method="magnitude", deploy_runtime="eager", **options)
        for _ in range(3):
            pruner.step()
        return (pruner, *finalize_against_choice(pruner))

    default, report, default_dropped, default_share = finalized()
    fastest, fastest_report, fastest_dropped, fastest_share = finalized(block="auto", channel_multiple="auto")
    assert str(default.block) == "mixed" and report["padding"][0] == 1
    assert str(fastest.block) == "auto" and fastest_report["padding"][0] == 8
    assert default_dropped < fastest_dropped and default_share > fastest_share
