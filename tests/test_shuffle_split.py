"""Channel split (``chunk``/``split`` along channels), channel slices ``x[:, a:b]`` and channel
shuffle (ShuffleNet): every
layer stays prunable, a split keeps each piece's range of slots, a shuffle reorders them, and
the compacted network (a ``torch.split`` of the kept sizes, one gather for the shuffle)
computes what the gated one does in both block modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import budgetprune
from budgetprune import Pruner
from budgetprune.compact import compact
from budgetprune.graph import ChannelGraph
from budgetprune.ops import select_channels

from loops import pruning_steps, randomise_batchnorms


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, c, h, w)


def branch(c_in: int, c: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), nn.BatchNorm2d(c),
                         nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())


class ShuffleUnit(nn.Module):
    def __init__(self, c: int, stride: int, use_split: bool):
        super().__init__()
        self.stride, self.use_split = stride, use_split
        half = c // 2
        if stride == 2:
            self.branch1 = nn.Sequential(nn.Conv2d(c, c, 3, 2, 1, groups=c, bias=False), nn.BatchNorm2d(c),
                                         nn.Conv2d(c, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())
        self.branch2 = branch(c if stride == 2 else half, half, stride)

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.split([x.shape[1] // 2] * 2, dim=1) if self.use_split else x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class TinyShuffleNet(nn.Module):
    def __init__(self, use_split: bool = False, first_stride: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.units = nn.Sequential(ShuffleUnit(16, first_stride, use_split), ShuffleUnit(16, 1, use_split),
                                   ShuffleUnit(16, 1, use_split))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.units(self.stem(x)).mean(dim=(2, 3)))


def test_split_and_shuffle_keep_every_layer_prunable_with_slots_tracked():
    graph = ChannelGraph.build(TinyShuffleNet(), torch.randn(2, 3, 8, 8))
    assert set(graph.ungated) == {"fc"}
    assert len(graph.splits) == 2
    src, pieces = next(iter(graph.splits.values()))
    assert [graph.tensors[p].slots for p in pieces] == [8, 8]
    out, (shuffled_from, perm) = next(iter(graph.gathers.items()))
    assert perm.tolist() == [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]
    # after the first unit's shuffle, slot 1 carries branch2's channel 0 and slot 2 branch1's channel 1
    info = graph.tensors[out]
    sources = {s.start: s.sources for s in info.segments}
    assert sources[1] == (("units.0.branch2.5", 0),) and sources[2] == (("units.0.branch1.2", 1),)


@pytest.mark.parametrize("use_split", [False, True])
@pytest.mark.parametrize("mode", ["mixed", "regular"])
def test_a_shufflenet_prunes_and_compacts_with_equal_outputs(use_split, mode):
    torch.manual_seed(0)
    model = TinyShuffleNet(use_split)
    randomise_batchnorms(model)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    pruner = Pruner(model, x, "flops=0.5", method="magnitude", block=mode, total_steps=1)
    pruning_steps(model, pruner, torch.optim.SGD(pruner.parameters(lr=0.05), lr=0.05), [(x, y)])
    small, report = pruner.finalize(x)
    assert report["compaction_max_abs_diff"] <= 1e-5
    assert report["pruned"]["flops"] <= pruner.budget.absolute(pruner.graph) * (1 + 1e-9)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_uneven_pieces_compact_to_a_split_of_the_kept_sizes():
    """The first unit splits the stem's map (a ``torch.split`` of the kept sizes); the later ones
    split a shuffle's gather, which becomes one gather per piece."""
    torch.manual_seed(0)
    model = TinyShuffleNet(first_stride=1).eval()
    randomise_batchnorms(model)
    for m in model.modules():  # BatchNorms that map 0 to 0, so that zeroing at the hosts is the whole story
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.zero_()
            m.bias.data.zero_()
    x = torch.randn(2, 3, 8, 8)
    graph = ChannelGraph.build(model, x)
    masks = {gid: torch.rand(g.channels) > 0.4 for gid, g in graph.groups.items()}
    for gid in masks:
        masks[gid][0] = True
    with torch.no_grad():
        reference = model(x)
    small = compact(model, graph, masks, order_moves=False)  # the gathers (test_channel_order: without them)
    ordered = compact(model, graph, masks)
    splits = [n for n in small.graph.nodes if n.target is torch.split]
    assert len(splits) == 1 and splits[0].args[0].target != select_channels
    gathers = [n for n in small.graph.nodes if n.target is select_channels]
    assert len(gathers) == 2 * 2 + 1  # two shuffles read by the next unit's split, one gather per piece; the last
    assert {b for b, _ in small.named_buffers() if "index" in b} == {n.args[1].target for n in gathers}
    # the same network by hand: zero every dropped channel where its layer writes it
    hooks = []
    for gid, m in masks.items():
        host = model.get_submodule(graph.groups[gid].host)
        hooks.append(host.register_forward_hook(lambda mod, i, o, m=m: o * m.view(1, -1, 1, 1).float()))
    with torch.no_grad():
        expected = model(x)
    for h in hooks:
        h.remove()
    assert not torch.allclose(expected, reference)
    assert torch.allclose(small(x), expected, atol=1e-5)
    assert torch.allclose(ordered(x), expected, atol=1e-5)


class SlicedNet(nn.Module):
    """Two convs read different channel ranges of one map (a ghost or partial-conv module)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1)
        self.b1 = nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(5, 6, 3, padding=1)
        self.c3 = nn.Conv2d(7, 6, 3, padding=1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        y = torch.cat([F.relu(self.c2(h[:, :5])), F.relu(self.c3(h[:, 5:]))], dim=1)
        return self.fc(y.mean(dim=(2, 3)))


@pytest.mark.parametrize("mode", ["mixed", "regular"])
def test_channel_slices_prune_their_ranges_and_compact_with_equal_outputs(mode):
    torch.manual_seed(0)
    model = SlicedNet()
    randomise_batchnorms(model)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    pruner = Pruner(model, x, "flops=0.5", method="magnitude", block=mode, total_steps=1)
    assert set(pruner.graph.ungated) == {"fc"}
    assert [int(v[1][0]) for v in pruner.graph.gathers.values()] == [0, 5]  # the two ranges start at 0 and 5
    pruning_steps(model, pruner, torch.optim.SGD(pruner.parameters(lr=0.05), lr=0.05), [(x, y)])
    small, report = pruner.finalize(x)
    assert report["compaction_max_abs_diff"] <= 1e-5
    assert small.c2.in_channels + small.c3.in_channels == small.c1.out_channels < 12


class NegativePieces(nn.Module):
    """A shuffle read by a chunk whose pieces are taken as ``[-1]`` and ``[-2]``."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        out = channel_shuffle(torch.cat((F.relu(self.b1(self.c1(x))), F.relu(self.b2(self.c2(x)))), dim=1), 2)
        parts = out.chunk(2, dim=1)
        return self.fc(torch.cat((parts[-1], F.relu(self.c3(parts[-2]))), dim=1).mean(dim=(2, 3)))


@pytest.mark.parametrize("model_of", [NegativePieces, lambda: TinyShuffleNet(first_stride=1)])
def test_folded_splits_compute_what_the_unfolded_ones_do(model_of):
    """The fold against the compaction without it, on the same random masks; pieces taken by a
    negative index included."""
    torch.manual_seed(0)
    model = model_of().eval()
    randomise_batchnorms(model)
    x = torch.randn(2, 3, 8, 8)
    graph = ChannelGraph.build(model, x)
    masks = {gid: torch.rand(g.channels) > 0.4 for gid, g in graph.groups.items()}
    for gid in masks:
        masks[gid][0] = True
    folded, plain = (compact(model, graph, masks, fold_splits=fold, order_moves=False) for fold in (True, False))
    assert not [n for n in folded.graph.nodes if n.target is torch.split and n.args[0].target is select_channels]
    assert [n for n in plain.graph.nodes if n.target is torch.split and n.args[0].target is select_channels]
    with torch.no_grad():
        assert torch.allclose(folded(x), plain(x), atol=1e-6)


def test_a_plan_written_before_the_fold_replays_with_its_own_buffers(tmp_path):
    """A version-5 plan (gathers not folded) with its state dict loads as it was compacted; a
    new plan says version 8 (``test_channel_order``: the version-7 form)."""
    from budgetprune.plan import make_plan, replay

    torch.manual_seed(0)
    model = TinyShuffleNet(first_stride=1)
    x = torch.randn(4, 3, 8, 8)
    pruner = Pruner(model, x, "flops=0.5", total_steps=1, block="regular", channel_multiple=1, gate_init=3.0)
    small, report = pruner.finalize()
    assert report["plan"]["version"] == 8
    masks = {gid: torch.zeros(g.channels, dtype=torch.bool).index_fill_(0, torch.tensor(report["plan"]["kept"][gid]), True)
             for gid, g in pruner.graph.groups.items() if gid in report["plan"]["kept"]}
    old = compact(model, pruner.graph, masks, mode="regular", fold_splits=False, order_moves=False)
    plan = make_plan(pruner.graph, masks, block="regular", granularity="channel", gate_inputs=False,
                     moves_ordered=True)
    assert plan["version"] == 8 and set(old.state_dict()) != set(small.state_dict())
    from budgetprune.errors import CheckpointError
    with pytest.raises(CheckpointError):  # what the version is for: the old buffers do not fit the new form
        replay(plan, TinyShuffleNet(first_stride=1), old.state_dict())
    again = replay({**plan, "version": 5}, TinyShuffleNet(first_stride=1), old.state_dict())
    with torch.no_grad():
        assert torch.allclose(again(x), old(x), atol=1e-6)
    budgetprune.save(small, tmp_path / "shuffle.pt")
    loaded = budgetprune.load(tmp_path / "shuffle.pt", model=TinyShuffleNet(first_stride=1))
    with torch.no_grad():
        assert torch.allclose(loaded(x), small(x), atol=1e-6)


class Res2NetBlock(nn.Module):
    """Res2Net's hierarchical block (Gao et al. 2019, as timm writes it): the input convolution's
    output is split into scales; each scale's convolution reads its piece plus the previous scale's
    output, and every scale's output is concatenated."""

    def __init__(self, width: int = 4, scales: int = 4):
        super().__init__()
        self.width = width
        self.conv1, self.bn1 = nn.Conv2d(3, width * scales, 1), nn.BatchNorm2d(width * scales)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(scales - 1))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scales - 1))
        self.conv3, self.bn3 = nn.Conv2d(width * scales, 6, 1), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        spx = torch.split(F.relu(self.bn1(self.conv1(x))), self.width, 1)
        outs, sp = [], None
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            sp = spx[i] if i == 0 else sp + spx[i]
            sp = F.relu(bn(conv(sp)))
            outs.append(sp)
        out = F.relu(self.bn3(self.conv3(torch.cat(outs + [spx[-1]], 1))))
        return self.head(out.mean((2, 3)))


@pytest.mark.parametrize("mode", ["mixed", "regular", "auto"])
def test_a_pruned_away_scale_of_a_res2net_block_compacts_with_equal_outputs(mode):
    """The first scale's convolution closed whole: its output is added to the next piece and
    concatenated. Regular blocks keep a space's channels for its sums, but a pruned-away layer's
    output carries zeros: it is dropped from the concatenation as mixed blocks drop it (before, the
    regular network kept those positions and compaction stopped on an emptied tensor)."""
    from budgetprune.liveness import BlockMode
    from loops import masked_output
    torch.manual_seed(0)
    model = Res2NetBlock().eval()
    randomise_batchnorms(model)
    x = torch.randn(2, 3, 8, 8)
    graph = ChannelGraph.build(model, x)
    masks = {gid: torch.ones(g.channels, dtype=torch.bool) for gid, g in graph.groups.items()}
    masks["convs.0"][:] = False  # the first scale pruned away
    masks["conv1"][9] = False  # and one channel of the third piece
    gated = masked_output(model, graph, masks, x)
    small = compact(model, graph, masks, mode=BlockMode("auto") if mode == "auto" else mode)
    with torch.no_grad():
        torch.testing.assert_close(small(x), gated, rtol=1e-5, atol=1e-5)
    assert small.get_submodule("conv3").in_channels < 16  # the dead scale's positions are gone


class SplitPaths(nn.Module):
    """A selective-kernel block in miniature (timm's skresnet): each half of a gated stem's output
    feeds its own conv, whose outputs are stacked (so those convs stay ungated)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.path0 = nn.Conv2d(4, 6, 3, padding=1)
        self.path1 = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        a, b = torch.split(F.relu(self.bn(self.stem(x))), 4, dim=1)
        y = torch.stack([self.path0(a), self.path1(b)], dim=1).sum(dim=1)
        return self.head(y.mean(dim=(2, 3)))


def test_an_ungated_layer_reading_a_split_piece_keeps_an_alive_input():
    """Each path conv reads half of the stem's channels and cannot be pruned away: the projection
    keeps a channel in each half, also where the method closed a whole half and its scores are the
    lowest, and the network compacts (before, the half was emptied and compaction failed with
    "the emptied tensor ... is still used")."""
    from budgetprune import enforce_budget, parse_budget
    from budgetprune.budget import with_guarded_inputs

    torch.manual_seed(0)
    model = SplitPaths().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.bias.uniform_(0.1, 0.5)
    x = torch.randn(2, 3, 8, 8)
    graph = ChannelGraph.build(model, x)
    assert sorted([(g, c.tolist()) for g, c in guard] for guard in graph.input_guards) == \
        [[("stem", [0, 1, 2, 3])], [("stem", [4, 5, 6, 7])]]
    from budgetprune.resources import CostModel
    cm = CostModel(graph, "flops")  # the smallest network keeps a channel in each half
    assert cm.minimum() == cm.hard({"stem": torch.tensor([True] + [False] * 3 + [True] + [False] * 3)})
    masks = {"stem": torch.tensor([True] * 4 + [False] * 4)}
    scores = {"stem": torch.tensor([8.0, 7.0, 6.0, 5.0, 1.0, 4.0, 2.0, 3.0])}
    reopened = with_guarded_inputs(graph, masks, scores)
    assert reopened["stem"].tolist() == [True] * 4 + [False, True, False, False]  # the best of the half
    assert masks["stem"].tolist() == [True] * 4 + [False] * 4  # not in place
    for mode in ("mixed", "regular"):
        final = enforce_budget(graph, masks, scores, parse_budget(0.3, "flops"), mode=mode)
        assert bool(final["stem"][:4].any()) and bool(final["stem"][4:].any()), (mode, final)
        small = compact(model, graph, final, mode=mode)
        with torch.no_grad():  # a dropped stem channel is zero after its BatchNorm and ReLU
            assert torch.allclose(small(x), _with_channels_zeroed(model, [(model.bn, ~final["stem"])], x),
                                  atol=1e-5), mode


def _with_channels_zeroed(model: nn.Module, dropped, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` computed by hand with the ``(BatchNorm, bool mask)`` pairs' channels zeroed (γ and
    β set to 0), the model restored afterwards."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for bn, mask in dropped:
            bn.weight[mask] = 0.0
            bn.bias[mask] = 0.0
        out = model(x)
    model.load_state_dict(saved)
    return out


class ChannelAttentionBottleneck(nn.Module):
    """A bottleneck whose output is scaled by a channel attention computed across channels (timm's
    ECA: a 1-d convolution over the pooled channels), which leaves its last conv ungated."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv3, self.bn3 = nn.Conv2d(6, 8, 1), nn.BatchNorm2d(8)
        self.eca = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        s = F.relu(self.stem(x))
        y = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(s))))))))
        a = torch.sigmoid(self.eca(y.mean((2, 3)).view(y.shape[0], 1, -1))).view(y.shape[0], -1, 1, 1)
        return self.head(F.relu(y * a.expand_as(y) + s).mean(dim=(2, 3)))


def test_a_protected_layer_s_only_writer_keeps_a_channel():
    """The last conv is ungated, so the middle one is protected (it writes all of the last one's
    input), but it is purged when the first conv keeps nothing: the first conv keeps a channel too
    (before, the projection emptied it and compaction failed with "the pruned-away layer ... is still
    used")."""
    from budgetprune import enforce_budget, parse_budget

    torch.manual_seed(0)
    model = ChannelAttentionBottleneck().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = ChannelGraph.build(model, x)
    assert "conv3" not in graph.groups and graph.groups["conv2"].min_keep == 1 and graph.groups["conv1"].min_keep == 0
    assert [[(g, c.tolist()) for g, c in guard] for guard in graph.input_guards] == [[("conv1", list(range(6)))]]
    masks = {gid: torch.ones(g.channels, dtype=torch.bool) for gid, g in graph.groups.items()}
    masks["conv1"][:] = False
    scores = {gid: torch.rand(g.channels) for gid, g in graph.groups.items()}
    final = enforce_budget(graph, masks, scores, parse_budget(0.5, "flops"), mode="mixed")
    assert int(final["conv1"].sum()) >= 1 and int(final["conv2"].sum()) >= 1
    small = compact(model, graph, final)
    with torch.no_grad():  # a dropped channel is zero after its BatchNorm
        expected = _with_channels_zeroed(model, [(model.bn1, ~final["conv1"]), (model.bn2, ~final["conv2"])], x)
        assert torch.allclose(small(x), expected, atol=1e-5)
