"""Widths padded to a multiple of channels (``BlockMode("regular", multiple=m)``).

Runtimes such as onnxruntime on CPU run their fast blocked convolutions only when a layer's
channel counts are multiples of 8 or 16. These tests check that the padded slot sets are
multiples (or full), contain the kept channels and agree within a residual space; that the
compacted network still computes the gated network's outputs with every conv width a multiple;
that the padded hard cost is the compacted network's own count (an independent trace of it);
that the projection and the fill meet the budget in padded costs; and that a Pruner run saves
and replays its plan with the padded widths.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
import json
import pickle

import pytest
import torch
from torch import nn

import budgetprune
from budgetprune.budget import Budget, budget_ratios, enforce_budget, fill_budget, reopenable_channels
from budgetprune.errors import CheckpointError, ConfigError
from budgetprune.liveness import BlockMode, Padding, auto_paddings, slot_sets
from budgetprune.plan import check_plan, replay
from budgetprune.resources import CostModel

from loops import finalize_against_choice, pruning_steps, randomise_batchnorms
from test_compaction import attach_random, check_compaction, make_model

PADDED_MODELS = ["resnet20", "wrn", "tiny_mobilenetv2", "tiny_senet", "vgg_small"]


def _aligned(n: int, full: int, multiple: int) -> bool:
    return n % multiple == 0 or n == full


def _tied(graph) -> set[str]:
    """Tensors in a space read through a concatenation, split or shuffle (not padded)."""
    names = set()
    for name, parts in graph.cats.items():
        names.update((name, *parts))
    for src, pieces in graph.splits.values():
        names.update((src, *pieces))
    for out, (src, _) in graph.gathers.items():
        names.update((out, src))
    spaces = {graph.spaces[n] for n in names}
    return {t for t, space in graph.spaces.items() if space in spaces}


@pytest.mark.parametrize("multiple", [4, 8])
@pytest.mark.parametrize("name", PADDED_MODELS + ["tiny_densenet"])
def test_padded_slot_sets(name, multiple):
    model, graph = make_model(name)
    bar = attach_random(model, graph, seed=3)
    masks = bar.keep_masks()
    exact = slot_sets(graph, masks, "regular")
    padded = slot_sets(graph, masks, BlockMode("regular", multiple))
    tied = _tied(graph)
    grew = 0
    for t, s in padded.items():
        assert bool((s | exact[t]).eq(s).all()), t  # the kept channels stay
        n, full = int(s.sum()), s.numel()
        assert n == 0 or _aligned(n, full, multiple), (t, n, full)
        if t not in tied:  # by as few channels as it takes (a tied tensor also takes what its ties add)
            assert n - int(exact[t].sum()) < multiple or n == int(exact[t].sum())
        grew += n - int(exact[t].sum())
    assert grew > 0  # random masks leave unaligned widths to pad (a DenseNet's tied by its concatenations)
    for t, space in graph.spaces.items():  # a regular block's added tensors keep one set
        first = next(u for u, sp in graph.spaces.items() if sp == space)
        assert torch.equal(padded[t], padded[first])
    _check_ties(graph, padded)


def _check_ties(graph, sets) -> None:
    """Concatenations, splits and shuffles keep the same channels on both sides."""
    for name, parts in graph.cats.items():
        assert torch.equal(sets[name], torch.cat([sets[p] for p in parts])), name
    for src, pieces in graph.splits.values():
        assert torch.equal(sets[src], torch.cat([sets[p] for p in pieces])), src
    for out, (src, perm) in graph.gathers.items():
        assert torch.equal(sets[out], sets[src][perm]), out


@pytest.mark.parametrize("name", PADDED_MODELS)
def test_padded_compaction_is_exact_and_aligned(name):
    model, graph = make_model(name)
    bar = attach_random(model, graph, seed=11)
    masks = bar.keep_masks()
    mode = BlockMode("regular", 8)
    torch.manual_seed(1)
    x = torch.randn(8, 1, 28, 28)
    net, _ = check_compaction(model, graph, bar, masks, x, mode)  # outputs, widths, params
    full = {name: mod for name, mod in model.named_modules()}
    for layer_name, mod in net.named_modules():
        if isinstance(mod, nn.Conv2d) and layer_name in full:
            unpruned = full[layer_name]
            assert _aligned(mod.out_channels, unpruned.out_channels, 8), layer_name
            assert _aligned(mod.in_channels, unpruned.in_channels, 8), layer_name
    # the padded cost is what the compacted network computes: counted again on its own trace
    small = budgetprune.ChannelGraph.build(net, x[:1])
    for metric in ("flops", "params", "volume"):
        padded = CostModel(graph, metric, mode).hard(masks)
        exact = CostModel(graph, metric, "regular").hard(masks)
        assert padded == pytest.approx(CostModel(small, metric).full(), rel=1e-9), metric
        assert padded >= exact


def test_block_mode_is_the_plain_string():
    model = budgetprune.create_model("resnet20")
    for bad in (0, "8", 2.0):
        with pytest.raises(ConfigError, match="channel_multiple must be 'auto' or a positive int"):
            budgetprune.Pruner(model, torch.zeros(2, 1, 28, 28), 0.5, total_steps=1, block="regular",
                               channel_multiple=bad)
    with pytest.raises(ConfigError, match="block must be one of auto, mixed, regular"):
        budgetprune.Pruner(model, torch.zeros(2, 1, 28, 28), 0.5, total_steps=1, block="dense")
    mode = BlockMode("regular", 16)
    assert mode == "regular" and mode.multiple == 16 and str(mode) == "regular"
    assert BlockMode("mixed").multiple == 1 and BlockMode("mixed", 8).multiple == 8
    with pytest.raises(ValueError, match="positive int"):
        BlockMode("regular", 0)
    with pytest.raises(ValueError, match="unknown block mode"):
        BlockMode("dense", 8)
    with pytest.raises(ValueError, match="only an auto block mode"):
        BlockMode("mixed", mixed=frozenset())


@pytest.mark.parametrize("multiple", [4, 8])
@pytest.mark.parametrize("name", PADDED_MODELS)
def test_padded_mixed_sets(name, multiple):
    """Mixed blocks pad tensor by tensor: every set holds its alive channels, is aligned (or full),
    and every residual sum's result keeps what its operands keep."""
    model, graph = make_model(name)
    bar = attach_random(model, graph, seed=3)
    masks = bar.keep_masks()
    alive = slot_sets(graph, masks, "mixed")
    padded = slot_sets(graph, masks, BlockMode("mixed", multiple))
    tied = _tied(graph)
    for t, s in padded.items():
        assert bool((s | alive[t]).eq(s).all()), t
        if t in tied:
            assert torch.equal(s, alive[t]), t
        else:
            assert int(s.sum()) == 0 or _aligned(int(s.sum()), s.numel(), multiple), t
    sums = 0
    for node in graph.gm.graph.nodes:
        if node.op == "call_function" and node.name in graph.tensors and "add" in node.name:
            operands = [a.name for a in node.args if isinstance(a, torch.fx.Node) and a.name in graph.tensors]
            for op in operands:
                assert bool((padded[node.name] | padded[op]).eq(padded[node.name]).all()), (node.name, op)
            sums += 1
    assert (sums > 0) == (name != "vgg_small")  # a plain chain has no residual sum


@pytest.mark.parametrize("name", PADDED_MODELS)
def test_padded_mixed_compaction_is_exact_and_counted(name):
    model, graph = make_model(name)
    bar = attach_random(model, graph, seed=11)
    masks = bar.keep_masks()
    mode = BlockMode("mixed", 8)
    x = torch.randn(4, 1, 28, 28)
    net, _ = check_compaction(model, graph, bar, masks, x, mode)  # outputs, widths, params
    # the padded cost is what the compacted network computes, counted by torch's flop counter
    from budgetprune.graph import _measured_macs

    assert CostModel(graph, "flops", mode).hard(masks) == pytest.approx(_measured_macs(net, x), rel=1e-9)


@pytest.mark.parametrize("name", ["resnet20", "tiny_mobilenetv2"])
def test_projection_and_fill_meet_the_budget_in_padded_widths(name):
    model, graph = make_model(name)
    bar = attach_random(model, graph, seed=5, shift=2.0)  # mostly open gates: far over budget
    masks, scores = bar.keep_masks(), bar.scores()
    mode = BlockMode("regular", 8)
    budget = Budget("flops", 0.4)
    limit = budget.absolute(graph)
    projected = enforce_budget(graph, masks, scores, budget, mode=mode)
    padded = CostModel(graph, "flops", mode)
    assert padded.hard(projected) <= limit
    filled = fill_budget(graph, projected, scores, budget, reopenable=reopenable_channels(graph, projected), mode=mode)
    assert padded.hard(projected) <= padded.hard(filled) <= limit
    net = budgetprune.compact(model, graph, filled, mode=mode)  # counted again on the built network's own trace
    built = CostModel(budgetprune.ChannelGraph.build(net, torch.zeros(1, 1, 28, 28)), "flops").full()
    assert budget_ratios(graph, filled, budget, mode) == [pytest.approx(built / limit, rel=1e-9)]
    # the fill turns padding into kept channels: no fewer real channels, no more padded cost
    exact = slot_sets(graph, filled, "regular")
    pads = slot_sets(graph, filled, mode)
    before = sum(int((slot_sets(graph, projected, mode)[t] & ~slot_sets(graph, projected, "regular")[t]).sum())
                 for t in graph.tensors)
    after = sum(int((pads[t] & ~exact[t]).sum()) for t in graph.tensors)
    assert after <= before


def test_pruner_run_with_padded_widths_saves_and_replays(tmp_path):
    torch.manual_seed(0)
    model = budgetprune.create_model("resnet20")
    reference = budgetprune.create_model("resnet20")
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    pruner = budgetprune.Pruner(model, x, "flops=0.5", total_steps=3, method="magnitude", block="regular",
                                channel_multiple=8)
    optimizer = torch.optim.SGD(pruner.parameters(lr=0.01), lr=0.01)
    pruning_steps(model, pruner, optimizer, [(x, y)] * 3)
    small, report = pruner.finalize(x)
    limit = pruner.budget.absolute(pruner.graph)
    assert report["pruned"]["flops"] <= limit
    counted = budgetprune.ChannelGraph.build(small, x[:1])
    assert CostModel(counted, "flops").full() == pytest.approx(report["pruned"]["flops"], rel=1e-9)
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert all(_aligned(c.out_channels, 64, 8) and (c.in_channels == 1 or c.in_channels % 8 == 0) for c in convs)
    plan = small.budgetprune_plan
    assert plan["block"] == "regular" and plan["channel_multiple"] == 8
    again = replay(plan, reference, small.state_dict())
    with torch.no_grad():
        assert torch.allclose(again(x), small(x), atol=1e-6)
    path = tmp_path / "m.pt"
    budgetprune.save(small, path)
    with torch.no_grad():
        assert torch.allclose(budgetprune.load(path)(x), small(x), atol=1e-6)


@pytest.mark.parametrize("bad", [0, 2.0, "8", 2 ** 20])
def test_plan_with_a_bad_multiple_is_refused(bad):
    plan = {"format": "budgetprune-plan", "version": 1, "granularity": "channel", "block": "regular",
            "channel_multiple": bad, "gate_inputs": False, "input_shape": [1, 28, 28], "groups": {"a": 4},
            "kept": {"a": [0, 1]}}
    with pytest.raises(CheckpointError, match="channel multiple"):
        check_plan(plan)
    plan.update(channel_multiple=8, block="mixed", mixed_spaces=["add"])
    with pytest.raises(CheckpointError, match="mixed spaces"):
        check_plan(plan)


def test_cli_run_with_padded_widths(tmp_path, capsys):
    from budgetprune import cli

    out = tmp_path / "run"
    code = cli.main(["prune", "--model", "lenet5", "--data", "demo", "--budget", "flops=0.3", "--block", "regular",
                     "--channel-multiple", "4", "--out", str(out), "--no-progress", "--teacher-epochs", "1",
                     "--epochs", "1", "--finetune-epochs", "0", "--lowlr-epochs", "0"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["channel_multiple"] == 4 and metrics["block"] == "regular"
    assert "- Residual blocks: regular (added tensors keep equal widths); widths padded to multiples of 4" in \
        (out / "report.md").read_text()
    assert metrics["pruned"]["flops"] <= metrics["budget"]
    model = budgetprune.load(out / "model.pt")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.out_channels % 4 == 0 for c in convs)
    counted = budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 28, 28))
    assert CostModel(counted, "flops").full() == pytest.approx(metrics["pruned"]["flops"], rel=1e-9)


def test_padding_targets_by_hand():
    """``channel_multiple="auto"``'s paddings, hand-worked: multiples of 8 in every feature map,
    then in feature maps of 32 channels or more, then in those that keep 32 channels or more, then
    exact widths."""
    assert auto_paddings() == ((8, 0, 2, 0), (8, 32, 2, 0), (8, 0, 2, 32), (1, 0, 1, 0))
    maps = auto_paddings()[0]
    assert maps.target(3, 16, 784) == 8 and maps.target(9, 16, 784) == 16 and maps.target(13, 20, 49) == 16
    assert maps.target(17, 20, 49) == 20  # capped at the full width
    assert maps.target(13, 120, 1) == 13  # (batch, features): exact
    assert maps.describe() == "widths padded to multiples of 8 (tensors of (batch, features) exact)"
    wide = auto_paddings()[1]
    assert wide.target(13, 64, 49) == 16 and wide.target(3, 32, 49) == 8 and wide.target(3, 31, 49) == 3
    assert wide.target(13, 120, 1) == 13  # (batch, features): exact
    assert wide.describe() == ("widths padded to multiples of 8 (tensors under 32 channels or of (batch, features) "
                               "exact)")
    auto = auto_paddings()[2]
    assert auto.target(33, 64, 49) == 40 and auto.target(32, 64, 49) == 32 and auto.target(63, 64, 49) == 64
    assert auto.target(33, 36, 4) == 36  # capped at the full width
    assert auto.target(0, 64, 49) == 0  # a dead tensor stays dead
    assert auto.target(31, 64, 49) == 31 and auto.target(13, 64, 49) == 13 and auto.target(5, 16, 49) == 5  # few kept
    assert auto.target(41, 120, 1) == 41  # (batch, features): exact
    assert Padding(16).target(5, 16) == 16 and Padding(16).target(1, 6) == 6  # an explicit multiple pads all
    assert Padding(8, 32).target(3, 32, 49) == 8 and Padding(8, 32).target(3, 31, 49) == 3  # by full width
    assert Padding().target(13, 64, 49) == 13
    assert auto.describe() == ("widths padded to multiples of 8 (tensors keeping under 32 channels or of (batch, "
                               "features) exact)")
    assert Padding().describe() == "exact widths"
    # the padded count never falls as more channels are kept (the projection and the fill rely on it)
    for padding in (*auto_paddings(), Padding(16)):
        counts = [padding.target(k, 100, 49) for k in range(101)]
        assert counts == sorted(counts) and all(c >= k for k, c in enumerate(counts))
    for bad in (dict(multiple=0), dict(min_width=-1), dict(min_area=0), dict(min_kept=2.0)):
        with pytest.raises(ValueError):
            Padding(**bad)
    mode = BlockMode("auto", auto, gather_cost=5.0, mixed=frozenset({"x"}))
    for again in (copy.deepcopy(mode), pickle.loads(pickle.dumps(mode))):
        assert again == "auto" and again.padding() == auto and isinstance(again.padding(), Padding)
        assert (again.gather_cost, again.mixed) == (5.0, {"x"})


@pytest.mark.parametrize("rung", [0, 1, 2])
@pytest.mark.parametrize("kind", ["regular", "mixed"])
@pytest.mark.parametrize("name", ["resnet20", "wrn"])
def test_auto_padding_pads_feature_maps_and_leaves_the_others_exact(name, kind, rung):
    """With the first padding of ``"auto"`` every feature map pads to a multiple of 8 (resnet20's
    16-channel stage too); with the second, tensors narrower than 32 channels keep their exact
    widths, with the third those that keep fewer than 32; the compacted network still computes
    the gated one."""
    model, graph = make_model(name)
    bar = attach_random(model, graph, seed=5)
    masks = bar.keep_masks()
    padding = auto_paddings()[rung]
    mode = BlockMode(kind, padding)
    exact, padded = slot_sets(graph, masks, kind), slot_sets(graph, masks, mode)
    tied = _tied(graph)
    area = {}  # a space is padded alike, by its largest map (a pooled map keeps the set of the map it pools)
    for t, space in graph.spaces.items():
        area[space] = max(area.get(space, 0), graph.tensors[t].area)
    narrow_unaligned = grew = narrow_grew = 0
    for t, s in padded.items():
        n, full, before = int(s.sum()), s.numel(), int(exact[t].sum())
        assert bool((s | exact[t]).eq(s).all()), t
        if (32, full, before)[rung] < 32 or area[graph.spaces[t]] < 2 or t in tied:
            assert torch.equal(s, exact[t]), t
            narrow_unaligned += n % 8 != 0
        else:
            assert n == 0 or _aligned(n, full, 8), (t, n, full)
            grew += n - before
            narrow_grew += full < 32 and n > before
    assert narrow_unaligned > 0 and grew > 0  # both kinds of tensor are there to tell apart
    assert bool(narrow_grew) == (rung == 0)  # narrow maps pad only with the first
    torch.manual_seed(1)
    x = torch.randn(4, 1, 28, 28)
    check_compaction(model, graph, bar, masks, x, mode)


def test_pruner_with_auto_padding_pads_feature_maps_and_its_plan_replays(tmp_path):
    torch.manual_seed(0)
    model, reference = budgetprune.create_model("resnet20"), budgetprune.create_model("resnet20")
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    exact = budgetprune.Pruner(budgetprune.create_model("resnet20"), x, "flops=0.4", total_steps=3, channel_multiple=1)
    assert exact.block.multiple == 1
    pruner = budgetprune.Pruner(model, x, "flops=0.4", total_steps=3, method="magnitude")  # auto by default
    assert pruner.block.padding() == auto_paddings()[0] == (8, 0, 2, 0)  # the first to try
    optimizer = torch.optim.SGD(pruner.parameters(lr=0.01), lr=0.01)
    pruning_steps(model, pruner, optimizer, [(x, y)] * 3)
    small, report = pruner.finalize(x)
    assert report["pruned"]["flops"] <= pruner.budget.absolute(pruner.graph)
    counted = budgetprune.ChannelGraph.build(small, x[:1])
    assert CostModel(counted, "flops").full() == pytest.approx(report["pruned"]["flops"], rel=1e-9)
    originals = dict(reference.named_modules())
    widths = [(conv.out_channels, originals[layer].out_channels) for layer, conv in small.named_modules()
              if isinstance(conv, nn.Conv2d)]
    assert report["padding"] == [8, 0, 2, 0] and pruner.block.padding() == auto_paddings()[0]  # it ended on budget
    assert report["pruned"]["flops"] >= 0.95 * pruner.budget.absolute(pruner.graph)
    assert all(_aligned(n, full, 8) for n, full in widths)  # the 16-channel stage too
    plan = small.budgetprune_plan
    assert (plan["channel_multiple"], plan["pad_min_area"], plan["version"]) == (8, 2, 2) and "pad_min_width" not in plan
    again = replay(plan, reference, small.state_dict())
    with torch.no_grad():
        assert torch.allclose(again(x), small(x), atol=1e-6)


@pytest.mark.parametrize("field, what, bad", [
    ("pad_min_width", "narrowest padded width", -1), ("pad_min_width", "narrowest padded width", 2.5),
    ("pad_min_width", "narrowest padded width", "32"), ("pad_min_width", "narrowest padded width", True),
    ("pad_min_area", "fewest positions", 0), ("pad_min_kept", "fewest kept channels", -1),
    ("pad_min_kept", "fewest kept channels", "32")])
def test_plan_with_a_bad_padding_floor_is_refused(field, what, bad):
    plan = {"format": "budgetprune-plan", "version": 3, "granularity": "channel", "block": "regular",
            "channel_multiple": 8, field: bad, "gate_inputs": False, "input_shape": [1, 28, 28],
            "groups": {"a": 4}, "kept": {"a": [0, 1]}}
    with pytest.raises(CheckpointError, match=what):
        check_plan(plan)


@pytest.mark.parametrize("padding, version", [(Padding(8), 1), (Padding(8, 32, 2), 2), (auto_paddings()[0], 2),
                                              (auto_paddings()[2], 3)])
def test_a_plan_is_written_at_the_lowest_version_that_reads_it_and_replays(padding, version):
    """A plan padded by the full width (as written before kept counts set the floor) still
    replays to the same network, and a plan names only the floors its padding has."""
    from budgetprune.compact import compact
    from budgetprune.plan import make_plan

    gated, gated_graph = make_model("resnet20")
    masks = attach_random(gated, gated_graph, seed=4).keep_masks()
    model, graph = make_model("resnet20")  # a plain one, as the user passes it
    mode = BlockMode("regular", padding)
    net = compact(model, graph, masks, mode=mode)
    plan = json.loads(json.dumps(make_plan(graph, masks, block=mode, granularity="channel", gate_inputs=False)))
    assert plan["version"] == version
    assert [k for k in ("pad_min_width", "pad_min_area", "pad_min_kept") if k in plan] == \
        [k for k, v, absent in zip(("pad_min_width", "pad_min_area", "pad_min_kept"), padding[1:], (0, 1, 0))
         if v != absent]
    again = replay(plan, model, net.state_dict())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(again(x), net.eval()(x))


def test_cli_channel_multiple_takes_auto_or_a_positive_number(tmp_path, capsys):
    from budgetprune import cli

    parser = cli.build_parser()
    assert parser.parse_args(["prune", "--model", "lenet5", "--data", "demo", "--budget", "0.5",
                              "--channel-multiple", "auto", "--out", "r"]).channel_multiple == "auto"
    assert parser.parse_args(["prune", "--model", "lenet5", "--data", "demo", "--budget", "0.5",
                              "--channel-multiple", "16", "--out", "r"]).channel_multiple == 16
    for bad in ("0", "eight"):
        code = cli.main(["prune", "--model", "lenet5", "--data", "demo", "--budget", "0.5", "--channel-multiple",
                         bad, "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert code == 2 and f"'{bad}' is not 'auto' or a positive whole number" in err and "Traceback" not in err


def test_auto_padding_leaves_a_fully_connected_network_exact():
    """LeNet-300-100's layers work on (batch, features) tensors: the auto padding leaves every
    width exact, where a multiple of 8 for every tensor would not."""
    model, graph = make_model("lenet300")
    bar = attach_random(model, graph, seed=2)
    masks = bar.keep_masks()
    exact = slot_sets(graph, masks, "regular")
    for padding in auto_paddings():
        padded = slot_sets(graph, masks, BlockMode("regular", padding))
        assert all(torch.equal(padded[t], exact[t]) for t in exact)
    assert any(int(s.sum()) % 8 for s in exact.values())  # widths a padding would have changed
    assert not all(torch.equal(s, exact[t]) for t, s in slot_sets(graph, masks, BlockMode("regular", 8)).items())


@pytest.mark.parametrize("budget, method, rung", [("flops=0.125", "magnitude", 0), ("flops=0.25", "bar", 1),
                                                  ("flops=0.35", "magnitude", 2), ("flops=0.15", "bar", 3)])
def test_auto_padding_falls_back_to_a_finer_one_where_steps_of_8_cannot_end_on_the_budget(budget, method, rung):
    """On LeNet-5 (20-50-500) a step of 8 channels of its convs is a large share of a small
    budget: where the padded network ends under 0.95 of its budget, finalize pads only maps of 32
    channels or more, then maps that keep 32 or more, then keeps exact widths, and the run ends
    within [0.95, 1]; the
    plan names the padding kept and replays. An explicit multiple is never loosened, nor is any
    padding without the fill (a network may then end under its budget by the method's choice)."""
    def finalized(**options):
        torch.manual_seed(0)
        model = budgetprune.create_model("lenet5")
        x = torch.randn(8, 1, 28, 28)
        logs = []
        pruner = budgetprune.Pruner(model, x, budget, total_steps=1, method=method, log=logs.append, **options)
        pruner.step()
        small, report = pruner.finalize()
        return pruner, small, report, [line for line in logs if "trying" in line], x

    pruner, small, report, fallbacks, x = finalized()
    ratio = report["pruned"]["flops"] / pruner.budget.absolute(pruner.graph)
    assert report["padding"] == list(auto_paddings()[rung]) and pruner.block.padding() == auto_paddings()[rung]
    assert 0.95 <= ratio <= 1.0 and len(fallbacks) == rung
    for line in fallbacks:  # each padding tried before ended too far under the budget
        assert float(line.split("ends at ")[1].split()[0]) < 0.95
    counted = budgetprune.ChannelGraph.build(small, x[:1])
    assert CostModel(counted, "flops").full() == pytest.approx(report["pruned"]["flops"], rel=1e-9)
    plan = small.budgetprune_plan
    assert plan["version"] == (2, 2, 3, 1)[rung]
    fresh = budgetprune.create_model("lenet5")
    with torch.no_grad():
        assert torch.allclose(replay(plan, fresh, small.state_dict())(x), small(x), atol=1e-6)
    if rung:
        pruner, small, report, fallbacks, _ = finalized(channel_multiple=8)
        assert report["padding"] == [8, 0, 1, 0] and not fallbacks
        widths = [m.out_features if isinstance(m, nn.Linear) else m.out_channels
                  for m in small.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert widths[-1] == 10 and all(n % 8 == 0 or n in (20, 50, 500) for n in widths[:-1])
        _, _, report, fallbacks, _ = finalized(fill=False)
        assert report["padding"] == list(auto_paddings()[0]) and not fallbacks


def test_auto_padding_that_cannot_meet_the_budget_at_all_says_so_and_tries_the_next():
    """LeNet-5 at 9 % of its FLOPs (206k): with both convs padded to multiples of 8 no set of
    channels fits the budget (8 maps each already cost 217k); finalize logs why and ends, with a
    finer padding, within [0.95, 1] of it."""
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    logs = []
    pruner = budgetprune.Pruner(budgetprune.create_model("lenet5"), x, "flops=0.09", total_steps=1,
                                method="magnitude", log=logs.append, deploy_runtime="none")
    pruner.step()
    _, report = pruner.finalize()
    first = [line for line in logs if not line.startswith("CPU memory:")][0]  # that line: once per process
    assert first.startswith(f"{auto_paddings()[0].describe()}: cannot meet the budget (")
    assert first.endswith(f"; trying {auto_paddings()[1].describe()}")
    assert report["padding"] != list(auto_paddings()[0])
    assert 0.95 <= report["pruned"]["flops"] / pruner.budget.absolute(pruner.graph) <= 1.0


@pytest.mark.parametrize("name", ["resnet20", "wrn"])
def test_padded_mixed_tensors_stay_within_the_regular_block_s_padded_set(name):
    """A padded mixed tensor pads with channels its residual space keeps elsewhere first, then
    with the ones a regular block pads with: every tensor keeps a subset of the regular block's
    padded set, so a mixed block never costs more than a regular one of the same masks. Padded
    with its own lowest-numbered free channels (plans before version 4), the sums add up the
    different paddings and keep more than the regular block."""
    padding = auto_paddings()[0]
    tied = None
    legacy_over = 0
    for seed in range(4):
        model, graph = make_model(name)
        bar = attach_random(model, graph, seed=seed)
        masks = bar.keep_masks()
        tied = _tied(graph)
        regular = slot_sets(graph, masks, BlockMode("regular", padding))
        mixed = slot_sets(graph, masks, BlockMode("mixed", padding))
        legacy = slot_sets(graph, masks, BlockMode("mixed", padding, pad_within_space=False))
        exact = slot_sets(graph, masks, "mixed")
        for t in regular:
            if t in tied:
                continue
            assert bool((mixed[t] & ~regular[t]).sum() == 0), (seed, t)
            assert bool((exact[t] & ~mixed[t]).sum() == 0) and _aligned(int(mixed[t].sum()), mixed[t].numel(), 8) \
                or graph.tensors[t].area < 2 or int(mixed[t].sum()) == int(exact[t].sum()), (seed, t)
            legacy_over += int((legacy[t] & ~regular[t]).sum())
        for metric in ("flops", "volume"):
            assert CostModel(graph, metric, BlockMode("mixed", padding)).hard(masks) <= \
                CostModel(graph, metric, BlockMode("regular", padding)).hard(masks)
        x = torch.randn(4, 1, 28, 28)
        check_compaction(model, graph, bar, masks, x, BlockMode("mixed", padding))
    assert legacy_over > 0 or name == "resnet20"  # the earlier padding kept channels outside it (in wrn)


def _compact_and_replay(name: str, masks: dict, mode: BlockMode, version: int) -> nn.Module:
    """``name`` compacted with ``mode``: its plan, through JSON, is written at ``version`` and
    replays to a network with the same outputs; the compacted network."""
    from budgetprune.compact import compact
    from budgetprune.plan import make_plan

    model, graph = make_model(name)
    net = compact(model, graph, masks, mode=mode)
    plan = json.loads(json.dumps(make_plan(graph, masks, block=mode, granularity="channel", gate_inputs=False)))
    assert plan["version"] == version
    again = replay(plan, model, net.state_dict())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(again(x), net.eval()(x))
    return net


def test_a_padded_mixed_plan_replays_with_the_padding_it_was_written_with():
    """A padded mixed plan is written at version 4 (pads within the space) and replays to the
    same network; one compacted the earlier way is written at the version before and replays
    that way, although the two networks differ."""
    gated, gated_graph = make_model("resnet20")
    masks = attach_random(gated, gated_graph, seed=1).keep_masks()
    shapes = [_compact_and_replay("resnet20", masks, BlockMode("mixed", auto_paddings()[0], pad_within_space=within),
                                  version).state_dict()
              for within, version in ((True, 4), (False, 2))]
    assert shapes[0].keys() != shapes[1].keys() or \
        any(v.shape != shapes[1][k].shape or not torch.equal(v, shapes[1][k]) for k, v in shapes[0].items())


def _wide_shufflenet() -> nn.Module:
    from test_shuffle_split import ShuffleUnit
    return nn.Sequential(nn.Conv2d(1, 48, 3, 1, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU(),
                         ShuffleUnit(48, 2, False), ShuffleUnit(48, 1, True), ShuffleUnit(48, 1, False),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))


@pytest.mark.parametrize("name", ["tiny_densenet", "shufflenet"])
def test_channels_tied_by_position_pad_together_and_compact_exactly(name):
    """A DenseNet's concatenations and a ShuffleNet's splits, concatenations and shuffles tie
    positions across tensors: each pads, the ties carry what it adds, until every conv reads and
    writes a multiple of 8 channels (or all of them); the compacted network computes the gated
    one's outputs and its own trace counts the padded cost."""
    mode = BlockMode("regular", 8)
    for seed in range(2):
        if name == "shufflenet":
            torch.manual_seed(seed)
            model = _wide_shufflenet()
            randomise_batchnorms(model)
            graph = budgetprune.ChannelGraph.build(model, torch.zeros(1, 1, 28, 28))
            assert graph.splits and graph.gathers
        else:
            model, graph = make_model(name)
            assert graph.cats
        bar = attach_random(model, graph, seed=seed)
        masks = bar.keep_masks()
        exact = slot_sets(graph, masks, BlockMode("regular", 8, pad_tied=False))
        padded = slot_sets(graph, masks, mode)
        assert any(not torch.equal(padded[t], exact[t]) for t in _tied(graph))  # tied tensors grew
        _check_ties(graph, padded)
        x = torch.randn(4, 1, 28, 28)
        net, _ = check_compaction(model, graph, bar, masks, x, mode)
        full = dict(model.named_modules())
        for layer_name, mod in net.named_modules():
            if isinstance(mod, nn.Conv2d) and mod.groups == 1 and layer_name in full:
                assert _aligned(mod.out_channels, full[layer_name].out_channels, 8), layer_name
                assert _aligned(mod.in_channels, full[layer_name].in_channels, 8), layer_name
        small = budgetprune.ChannelGraph.build(net, x[:1])
        assert CostModel(graph, "flops", mode).hard(masks) == pytest.approx(CostModel(small, "flops").full(), rel=1e-9)


def _two_channels_everywhere(seed: int):
    """The wide ShuffleNet with random gates and masks keeping the first two channels of every
    group (each padded width needs six more): ``(model, graph, gates, masks, inputs)``."""
    torch.manual_seed(seed)
    model = _wide_shufflenet()
    randomise_batchnorms(model)
    x = torch.randn(4, 1, 28, 28)
    graph = budgetprune.ChannelGraph.build(model, x[:1])
    bar = attach_random(model, graph, seed=seed)
    masks = {gid: torch.zeros_like(m) for gid, m in bar.keep_masks().items()}
    for gid in masks:
        masks[gid][:2] = True
    return model, graph, bar, masks, x


def test_a_pruned_away_shuffle_branch_stays_away_when_its_concatenation_pads():
    """A ShuffleNet unit whose branch is pruned away: padding the shuffle after it to 8 channels
    must not take that branch's half (its layers compute nothing, not even zeros), so the tied
    tensors pad with the channels of layers that do; the compacted network has no module of the
    branch and computes the gated outputs (it ran the removed branch's Identity before)."""
    model, graph, bar, masks, x = _two_channels_everywhere(seed=0)
    masks["4.branch2.0"][:] = False  # unit 4's branch: pruned away, its last conv purged with it
    mode = BlockMode("regular", 8)
    eff = budgetprune.liveness.effective_masks(graph, masks)
    assert not bool(eff["4.branch2.5"].any())
    sets = slot_sets(graph, masks, mode)
    branch_out = next(n for n, info in graph.tensors.items() if info.sources() == {"4.branch2.5"})
    assert not bool(sets[branch_out].any())
    _check_ties(graph, sets)
    net, _ = check_compaction(model, graph, bar, masks, x, mode)
    assert not any(name.startswith("4.branch2") for name, _ in net.named_modules())


def test_a_split_piece_without_alive_channels_carries_its_padding():
    """The first half of unit 4's split holds only dead channels of unit 3's convs (each keeps two
    channels of its second half); padding the concatenation after it takes that half's lowest
    channels, which those live convs compute as zeros: the piece stays in the compacted network
    and the outputs are the gated ones."""
    model, graph, bar, masks, x = _two_channels_everywhere(seed=1)
    for gid in ("3.branch1.2", "3.branch2.5"):
        masks[gid][:] = False
        masks[gid][12:14] = True
    mode = BlockMode("regular", 8)
    alive = budgetprune.liveness.alive_sets(graph, budgetprune.liveness.effective_masks(graph, masks))
    sets = slot_sets(graph, masks, mode)
    first_half = graph.splits[next(iter(graph.splits))][1][0]
    assert not bool(alive[first_half].any()) and int(sets[first_half].sum()) > 0
    check_compaction(model, graph, bar, masks, x, mode)


def test_grouped_channels_pad_per_conv_group_by_hand():
    """Positions {0, 3, 5} kept in each of 3 conv groups of 16 pad to the 8 lowest, {0..7}, in every
    group; a group width of 4 (under the multiple) or groups keeping different positions stay
    exact; a padding that leaves the tensor alone (too few positions) too."""
    from budgetprune.liveness import _padded_per_group
    kept = torch.zeros(48, dtype=torch.bool)
    for g in range(3):
        kept[[16 * g, 16 * g + 3, 16 * g + 5]] = True
    padded = _padded_per_group(kept, Padding(8), 4, 16)
    assert torch.nonzero(padded).flatten().tolist() == [16 * g + i for g in range(3) for i in range(8)]
    assert _padded_per_group(kept, Padding(8, 0, 8), 4, 16) is kept  # 4 positions, under min_area 8
    narrow = kept[:12].clone()
    assert _padded_per_group(narrow, Padding(8), 4, 4) is narrow
    uneven = kept.clone()
    uneven[17] = True
    assert _padded_per_group(uneven, Padding(8), 4, 16) is uneven
    nine = kept.clone()
    for g in range(3):
        nine[16 * g + 8: 16 * g + 14] = True  # 9 of 16 per group pad to all 16
    assert bool(_padded_per_group(nine, Padding(8), 4, 16).all())


def test_a_plan_padded_before_tied_channels_were_replays_with_them_exact():
    """A padded plan whose tied channels were exact (written before version 5, or where finalize
    fell back to exact tied channels) replays to that network; the current padding pads them and
    writes version 5."""
    gated, gated_graph = make_model("tiny_densenet")
    masks = attach_random(gated, gated_graph, seed=1).keep_masks()
    widths = [sum(p.numel() for p in _compact_and_replay(
        "tiny_densenet", masks, BlockMode("regular", auto_paddings()[0], pad_tied=tied), version).parameters())
        for tied, version in ((True, 5), (False, 2))]
    assert widths[0] > widths[1]


def _tie_by_sweeps(graph, sets) -> dict:
    """The regular block's ties, widened sweep by sweep over every space, concatenation, split and
    shuffle until nothing changes: the reference for the classes of tied positions."""
    sets = {n: s.clone() for n, s in sets.items()}
    members = {}
    for name, space in graph.spaces.items():
        members.setdefault(space, []).append(name)
    while True:
        before = {n: s.clone() for n, s in sets.items()}
        for names in members.values():
            union = torch.stack([sets[n] for n in names]).any(0)
            for n in names:
                sets[n] = union.clone()
        for name, parts in list(graph.cats.items()) + list(graph.splits.values()):
            joined = sets[name] | torch.cat([sets[p] for p in parts])
            sets[name] = joined
            for part, piece in zip(parts, torch.split(joined, [sets[p].numel() for p in parts])):
                sets[part] = sets[part] | piece
        for out, (src, perm) in graph.gathers.items():
            sets[out] = sets[out] | sets[src][perm]
            sets[src] = sets[src].index_put((perm,), sets[out], accumulate=True)
        if all(torch.equal(before[n], sets[n]) for n in sets):
            return sets


@pytest.mark.parametrize("name", ["tiny_densenet", "shufflenet", "resnet20"])
def test_tied_positions_widen_as_sweeping_the_ties_does(name):
    """Random kept sets (tied or not) widened by the classes of tied positions equal the
    sweeps' fixed point, and the ties did widen them."""
    from budgetprune.liveness import _tie_positions

    if name == "shufflenet":
        graph = budgetprune.ChannelGraph.build(_wide_shufflenet(), torch.zeros(1, 1, 28, 28))
    else:
        _, graph = make_model(name)
    for seed in range(3):
        torch.manual_seed(seed)
        sets = {t: torch.rand(info.slots) < 0.2 for t, info in graph.tensors.items()}
        expected = _tie_by_sweeps(graph, sets)
        got = dict(sets)
        _tie_positions(graph, got)
        assert all(torch.equal(got[t], expected[t]) for t in expected)
        assert any(not torch.equal(got[t], s) for t, s in sets.items())


def _conv_widths(net: nn.Module) -> list[int]:
    return [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]


def _finalized_with_timed_padding(make: Callable[[], nn.Module], x: torch.Tensor, budget: str, runtime: str):
    """``(pruner, compacted network, report, log lines, an untouched copy of the model)`` of one
    magnitude step and finalize with ``time_padding=True``."""
    torch.manual_seed(0)
    model, reference = make(), make()
    reference.load_state_dict(model.state_dict())
    logs = []
    pruner = budgetprune.Pruner(model, x, budget, total_steps=1, method="magnitude", time_padding=True,
                                deploy_runtime=runtime, log=logs.append)
    pruner.step()
    small, report = pruner.finalize(x)
    return pruner, small, report, logs, reference


def _stand_in_timing(runtime: str, speedup: float) -> dict:
    """What :func:`budgetprune.measured.padding_speedup` returns when the second network runs
    ``speedup``× faster than the first (1 ms)."""
    from budgetprune.measured import PADDING_PAYS

    return {"runtime": runtime, "batch": 1, "exact_ms": 1.0, "padded_ms": 1.0 / speedup, "speedup": speedup,
            "pairs": 30, "others_cpu": 0.0, "pays": speedup >= PADDING_PAYS}


@pytest.mark.parametrize("speedup, kept", [(1.3, "padded"), (1.01, "exact")])
def test_time_padding_keeps_the_padding_only_where_it_measures_faster(monkeypatch, speedup, kept):
    """``time_padding=True``: finalize projects the budget at exact widths too and times both networks
    (here a stand-in timing that returns ``speedup`` and records what it was given): the padding is kept
    only at 1.05× or more, else the exact network, which still ends on the budget, replays and is
    what the report and the plan describe."""
    import budgetprune.pruner as pruner_module

    timed = []

    def fake_speedup(exact, padded, example, runtime):
        timed.append((_conv_widths(exact), _conv_widths(padded), tuple(example.shape), runtime))
        return _stand_in_timing(runtime, speedup)

    monkeypatch.setattr(pruner_module, "padding_speedup", fake_speedup)
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    pruner, small, report, logs, reference = _finalized_with_timed_padding(
        lambda: budgetprune.create_model("lenet5"), x, "flops=0.125", "torchscript")
    (exact_widths, padded_widths, shape, runtime), = timed
    assert shape == (1, 1, 28, 28) and runtime == "torchscript"
    assert all(_aligned(n, f, 8) for n, f in zip(padded_widths, (20, 50)))
    assert not all(_aligned(n, f, 8) for n, f in zip(exact_widths, (20, 50)))  # the exact one is not padded
    assert report["padding_timing"]["speedup"] == speedup
    assert _conv_widths(small) == (padded_widths if kept == "padded" else exact_widths)
    assert report["padding"] == ([8, 0, 2, 0] if kept == "padded" else [1, 0, 1, 0])
    assert pruner.block.multiple == (8 if kept == "padded" else 1)
    assert 0.95 <= report["pruned"]["flops"] / pruner.budget.absolute(pruner.graph) <= 1.0
    assert any(f"{speedup:.2f}× faster; " + ("keeping it" if kept == "padded" else "under 1.05×") in line
               for line in logs)
    counted = budgetprune.ChannelGraph.build(small, x[:1])
    assert CostModel(counted, "flops").full() == pytest.approx(report["pruned"]["flops"], rel=1e-9)
    again = replay(small.budgetprune_plan, reference, small.state_dict())
    with torch.no_grad():
        assert torch.allclose(again(x), small(x), atol=1e-6)


def test_time_padding_times_in_the_deploy_runtime_and_only_an_auto_padding():
    """Real timing in eager PyTorch: the report holds both networks' times and the choice follows
    them; an explicit multiple and the default (``time_padding=False``) time nothing; a non-bool is
    refused."""
    from budgetprune.measured import PADDING_PAYS

    def finalized(**options):
        torch.manual_seed(0)
        x = torch.randn(4, 1, 28, 28)
        pruner = budgetprune.Pruner(budgetprune.create_model("lenet5"), x, "flops=0.125", total_steps=1,
                                    method="magnitude", deploy_runtime="eager", **options)
        pruner.step()
        return pruner.finalize()[1]

    for _ in range(3):
        report = finalized(time_padding=True)
        timing = report["padding_timing"]
        if "error" not in timing:
            break
        # other processes kept this machine busy: no decision, the padding kept
        assert timing["error"].startswith("the machine was busy") and report["padding"][0] == 8
    if "error" not in timing:
        assert timing["runtime"] == "eager" and timing["batch"] == 1 and timing["pairs"] >= 30
        assert timing["exact_ms"] > 0 and timing["padded_ms"] > 0
        assert timing["speedup"] > 0  # the median of paired ratios: under load, far from exact_ms / padded_ms
        assert timing["pays"] == (timing["speedup"] >= PADDING_PAYS)
        assert report["padding"][0] == (8 if timing["pays"] else 1)
    for options in ({}, {"time_padding": True, "channel_multiple": 8}):
        assert "padding_timing" not in finalized(**options)
    assert finalized(time_padding=True, deploy_batch=3)["padding_timing"]["batch"] == 3  # the deployment's batch
    with pytest.raises(ConfigError, match="time_padding must be True or False"):
        finalized(time_padding="yes")


def _wide_convnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


@pytest.mark.parametrize("speedup, kept", [(1.2, 16), (1.02, 8)])
def test_time_padding_keeps_multiples_of_sixteen_only_where_they_measure_faster(monkeypatch, speedup, kept):
    """``time_padding=True`` with multiples of 8 kept: finalize projects the budget with every width a
    multiple of 16 too and times that network against the one padded to 8 (a stand-in timing: the
    wider one runs ``speedup``× faster, any padding 1.3× faster than exact widths); it keeps 16 only
    at 1.05× or more, and the padding kept is then timed against exact widths as before. Both end on
    the budget; the result replays from its plan."""
    import budgetprune.pruner as pruner_module

    timed = []

    def fake_speedup(slower, faster, example, runtime):
        timed.append((_conv_widths(slower), _conv_widths(faster)))
        wide = all(n % 16 == 0 for n in _conv_widths(faster))
        gain = speedup if wide and all(n % 8 == 0 for n in _conv_widths(slower)) else 1.3
        return _stand_in_timing(runtime, gain)

    monkeypatch.setattr(pruner_module, "padding_speedup", fake_speedup)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    pruner, small, report, logs, reference = _finalized_with_timed_padding(_wide_convnet, x, "flops=0.25", "eager")
    (eight, sixteen), (exact, padded) = timed
    assert all(n % 8 == 0 for n in eight) and not all(n % 16 == 0 for n in eight)
    assert all(n % 16 == 0 for n in sixteen) and not all(n % 8 == 0 for n in exact)
    assert padded == (sixteen if kept == 16 else eight) == _conv_widths(small)
    wide = report["wide_padding_timing"]
    assert (wide["multiple"], wide["against"], wide["speedup"], wide["pays"]) == (16, 8, speedup, kept == 16)
    assert report["padding"] == [kept, 0, 2, 0] and pruner.block.multiple == kept
    assert report["padding_timing"]["speedup"] == 1.3
    assert 0.95 <= report["pruned"]["flops"] / pruner.budget.absolute(pruner.graph) <= 1.0
    assert any(f"multiples of 16 (tensors of (batch, features) exact): {1 / speedup:.4g} ms against 1 ms at "
               "multiples of 8 in eager" in line and
               (("keeping it" in line) if kept == 16 else ("under 1.05×" in line)) for line in logs)
    again = replay(small.budgetprune_plan, reference, small.state_dict())
    with torch.no_grad():
        assert torch.allclose(again(x), small(x), atol=1e-5)


def test_time_padding_records_why_multiples_of_sixteen_were_not_kept():
    """LeNet-5 (20-50-500) at an eighth of its FLOPs cannot end on the budget with every width a
    multiple of 16: the report says so and multiples of 8 are timed against exact widths; an explicit
    multiple and a padding loosened to end on the budget time no wider one."""
    def finalized(flops="flops=0.125", **options):
        torch.manual_seed(0)
        x = torch.randn(4, 1, 28, 28)
        pruner = budgetprune.Pruner(budgetprune.create_model("lenet5"), x, flops, total_steps=1,
                                    method="magnitude", deploy_runtime="eager", time_padding=True, **options)
        pruner.step()
        return pruner.finalize()[1]

    report = finalized()
    assert report["wide_padding_timing"]["error"].startswith("cannot meet the budget")
    assert report["wide_padding_timing"]["multiple"] == 16 and "padding_timing" in report
    assert "wide_padding_timing" not in finalized(channel_multiple=8)
    loosened = finalized("flops=0.09")  # 8 maps in both convolutions already cost 217k of its 206k
    assert loosened["padding"][0] in (1, 8) and loosened["padding"] != [8, 0, 2, 0]
    assert "wide_padding_timing" not in loosened


def test_time_padding_keeps_the_padding_where_the_timing_fails_and_times_without_the_fill(monkeypatch):
    """A timing that fails (an export or a runtime error) keeps the padding and says why, in the log
    and the report; without the fill the padded network is timed against exact widths too."""
    import budgetprune.pruner as pruner_module

    def finalized(fake, **options):
        monkeypatch.setattr(pruner_module, "padding_speedup", fake)
        torch.manual_seed(0)
        logs = []
        pruner = budgetprune.Pruner(budgetprune.create_model("lenet5"), torch.randn(8, 1, 28, 28), "flops=0.125",
                                    total_steps=1, method="magnitude", time_padding=True, deploy_runtime="eager",
                                    log=logs.append, **options)
        pruner.step()
        return pruner.finalize()[1], logs

    failing = lambda exact, padded, example, runtime: {"runtime": runtime, "error": "ExportError: no"}  # noqa: E731
    report, logs = finalized(failing)
    assert report["padding"] == [8, 0, 2, 0] and report["padding_timing"] == {"runtime": "eager", "error": "ExportError: no"}
    assert any("no usable timing of the padded network in eager (ExportError: no)" in line for line in logs)
    slower = lambda exact, padded, example, runtime: _stand_in_timing(runtime, 1.0)  # noqa: E731
    report, _ = finalized(slower, fill=False)
    assert report["padding"] == [1, 0, 1, 0] and report["channels_reopened_by_fill"] == 0


def test_cost_before_the_projection_is_counted_in_the_padding_kept():
    """Gates that keep 3, 13 and 101 channels of LeNet-5 at a tenth of its FLOPs: padded to
    multiples of 8 the two convolutions would count 8 and 16 channels and no padding of 8 meets the budget, so
    finalize keeps a finer padding; the report's cost before the projection is the masks' cost in
    that padding (what the method ended at, in the terms of the result), not in the first one."""
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    pruner = budgetprune.Pruner(budgetprune.create_model("lenet5"), x, "flops=0.1", total_steps=1,
                                method="bar", deploy_runtime="none", log=lambda line: None)
    with torch.no_grad():
        for gid, keep in (("features.0", 3), ("features.3", 13), ("classifier.1", 101)):
            log_alpha = pruner.method.gate(gid).log_alpha
            log_alpha.fill_(-10.0)
            log_alpha[:keep] = 10.0
    masks = pruner.method.keep_masks()
    assert [int(m.sum()) for m in masks.values()] == [3, 13, 101]
    first = BlockMode(str(pruner.block), auto_paddings()[0])
    _, report = pruner.finalize()
    assert report["padding"] != list(auto_paddings()[0])
    kept = CostModel(pruner.graph, "flops", pruner.block).hard(masks)
    assert report["cost_before_projection"] == pytest.approx(kept, rel=1e-12)
    assert CostModel(pruner.graph, "flops", first).hard(masks) > 1.2 * kept


def test_chosen_share_by_hand():
    """A conv chain on 4×4 inputs (conv 1→8, max-pool, conv 8→8, linear 32→10): its volume is
    16·k₁ + 4·k₂ + 10 with k₁, k₂ kept channels. The method chose 4 + 8 channels (volume 106);
    the final masks keep 2 of the first 4 (and 3 others) and 4 of the 8: the chosen channels still
    kept cost 32 + 16 + 10 = 58. Under half the volume (limit 85) they could use 85; under 0.8 of
    it (limit 136) all of their 106. Counted at exact widths whatever the padding."""
    from budgetprune.budget import chosen_share

    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 2 * 2, 10))
    graph = budgetprune.ChannelGraph.build(model, torch.randn(1, 1, 4, 4))
    first, second = graph.groups

    def mask(*kept):
        m = torch.zeros(8, dtype=torch.bool)
        m[list(kept)] = True
        return m

    chosen = {first: mask(0, 1, 2, 3), second: mask(*range(8))}
    final = {first: mask(0, 1, 5, 6, 7), second: mask(0, 1, 2, 3)}
    half, most = Budget("volume", 0.5), Budget("volume", 0.8)
    assert chosen_share(graph, chosen, final, half) == pytest.approx(58 / 85)
    assert chosen_share(graph, chosen, final, most) == pytest.approx(58 / 106)
    assert chosen_share(graph, chosen, final, [half, most]) == pytest.approx(58 / 106)
    assert chosen_share(graph, chosen, final, half, BlockMode("regular", 8)) == pytest.approx(58 / 85)
    assert chosen_share(graph, chosen, chosen, most) == pytest.approx(1.0)  # all kept, all within the limit


def test_auto_padding_passes_over_a_padding_that_starves_the_method_s_channels():
    """ResNet-20 at 1/16 of its volume: its 28×28 stem keeps 1 of 16 channels, and padded to 8 that
    one map costs about two thirds of the budget, so the first auto padding pays for it by removing
    the channels the method chose elsewhere (residual branches). Finalize passes over each
    padding that leaves the chosen channels under PADDING_KEEPS of the budget (logging their share),
    keeps a finer one that ends on the budget, and keeps more of the chosen channels than the
    padding an explicit ``channel_multiple=8`` forces."""
    from budgetprune.budget import PADDING_KEEPS

    def finalized(**options):
        torch.manual_seed(0)
        model = budgetprune.create_model("resnet20")
        x = torch.randn(4, 1, 28, 28)
        logs = []
        pruner = budgetprune.Pruner(model, x, "volume=0.0625", total_steps=4, method="magnitude",
                                    log=logs.append, deploy_runtime="none", **options)
        for _ in range(4):  # three of the iterative cuts: every width scaled alike to an eighth
            pruner.step()
        report, _, share = finalize_against_choice(pruner)
        return pruner, report, logs, share

    pruner, report, logs, share = finalized(channel_multiple="auto")  # a volume budget's default is exact widths
    passed_over = [line for line in logs if "leaves the channels the method chose" in line]
    assert len(passed_over) >= 1 and report["padding"] != list(auto_paddings()[0])
    for line in passed_over:
        assert float(line.split("method chose ")[1].split()[0]) < PADDING_KEEPS
    assert share >= PADDING_KEEPS
    assert 0.95 <= report["pruned"]["volume"] / pruner.budget.absolute(pruner.graph) <= 1.0
    _, forced, forced_logs, forced_share = finalized(channel_multiple=8)
    assert forced["padding"] == [8, 0, 1, 0] and not any("method chose" in line for line in forced_logs)
    assert forced_share < PADDING_KEEPS < share


def test_time_padding_does_not_time_multiples_of_sixteen_that_starve_the_method_s_channels(monkeypatch):
    """Multiples of 16 that end on the budget but leave the channels the method chose under
    PADDING_KEEPS of it (a stand-in share: 0.3 for them, 1 for every other padding) are not timed:
    the report records why, and multiples of 8 stay, timed against exact widths only."""
    import budgetprune.budget as budget_module
    import budgetprune.pruner as pruner_module
    from budgetprune.budget import PADDING_KEEPS

    timed = []
    monkeypatch.setattr(budget_module, "chosen_share",
                        lambda graph, chosen, final, budgets, mode: 0.3 if mode.multiple == 16 else 1.0)
    monkeypatch.setattr(pruner_module, "padding_speedup",
                        lambda slower, faster, example, runtime: timed.append(1) or _stand_in_timing(runtime, 1.3))
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    pruner, small, report, logs, _ = _finalized_with_timed_padding(_wide_convnet, x, "flops=0.25", "eager")
    wide = report["wide_padding_timing"]
    assert wide["error"] == f"leaves the channels the method chose 0.30 of the budget, under {PADDING_KEEPS}"
    assert (wide["multiple"], wide["against"]) == (16, 8) and "speedup" not in wide
    assert len(timed) == 1 and report["padding"][0] == 8 and report["padding_timing"]["speedup"] == 1.3
    assert all(n % 8 == 0 for n in _conv_widths(small))


@pytest.mark.parametrize("kept, widths, noted", [((5, 1, 1), None, True), ((2, 12, 230), (2, 7, 293), False),
                                                 ((2, 8, 229), (2, 8, 229), False)])
def test_a_projection_that_cuts_more_than_the_overshoot_is_noted(kept, widths, noted):
    """LeNet-5 at 1/8 of its volume (1903.75 units), every kept gate equally sure. Gates keeping
    5-1-1 channels (2955 units) can only meet it by losing two first-conv maps of 576 units (the
    other layers are at one channel): the projection ends at 1803 units, 0.947 of the budget, the fill
    reopens channels into the slack, and the log says so. Gates keeping 2-12-230 (2160 units, 256 over) lose
    five second-conv maps of 64 (four leave 1904), not a first-conv map (the cheaper channels the
    projection tries where one removal overshot): 1840 units, 63 hidden units reopened, no note.
    Gates keeping 2-8-229 (1903 units) meet the budget: nothing dropped, no note."""
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    lines = []
    pruner = budgetprune.Pruner(budgetprune.create_model("lenet5"), x, "volume=0.125", total_steps=1,
                                method="bar", block="regular", channel_multiple=1, deploy_runtime="none",
                                log=lines.append)
    with torch.no_grad():
        for gid, keep in zip(("features.0", "features.3", "classifier.1"), kept):
            log_alpha = pruner.method.gate(gid).log_alpha
            log_alpha.fill_(-10.0)
            log_alpha[:keep] = 10.0
    _, report = pruner.finalize()
    notes = [line for line in lines if line.startswith("note: the gates ended over the budget")]
    kept_widths = tuple(len(report["masks"][g]) for g in ("features.0", "features.3", "classifier.1"))
    if noted:
        assert report["channels_dropped_by_projection"] == 2 and report["channels_reopened_by_fill"] > 0
        assert kept_widths[0] == 3  # two first-conv maps went
        assert len(notes) == 1 and "(volume 2955, 1.55 of it)" in notes[0] and "down to 0.95 of it" in notes[0]
        assert f"the fill reopened {report['channels_reopened_by_fill']} closed ones" in notes[0]
    else:
        assert kept_widths == widths and not notes
        assert report["channels_dropped_by_projection"] == sum(kept) - sum(widths) + report["channels_reopened_by_fill"]


def test_no_overshoot_note_where_widths_are_padded():
    """With widths padded to multiples of 8 the projection aims under the budget by the padding's
    share and the fill turns the padding into channels: LeNet-5 at an eighth of its FLOPs, gates
    keeping 6-16-120 channels (1.23× over), drops channels and reopens hundreds, and no note."""
    torch.manual_seed(0)
    lines = []
    pruner = budgetprune.Pruner(budgetprune.create_model("lenet5"), torch.randn(4, 1, 28, 28), "flops=0.125",
                                total_steps=1, method="bar", deploy_runtime="none", log=lines.append)
    with torch.no_grad():
        for gid, keep in zip(("features.0", "features.3", "classifier.1"), (6, 16, 120)):
            log_alpha = pruner.method.gate(gid).log_alpha
            log_alpha.uniform_(-1.0, 3.0)
            log_alpha[keep:] = -10.0
    _, report = pruner.finalize()
    assert report["padding"][0] == 8 and report["cost_before_projection"] > pruner.budget.absolute(pruner.graph)
    assert report["channels_dropped_by_projection"] > 0 and report["channels_reopened_by_fill"] > 100
    assert not [line for line in lines if line.startswith("note: the gates ended over the budget")]
