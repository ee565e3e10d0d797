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
    small = compact(model, graph, masks)
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
