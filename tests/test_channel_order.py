"""Channels that only move (ShuffleNet's concatenations, shuffles and splits), laid out as slices of
permuted writers for permuted readers (:mod:`budgetprune.channel_order`): the same outputs as the
compaction with its gathers, fewer values copied, and every cluster it cannot permute left as it is."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

import budgetprune
from budgetprune import Pruner
from budgetprune.channel_order import order_channels
from budgetprune.compact import compact
from budgetprune.graph import ChannelGraph
from budgetprune.ops import select_channels, slice_channels

from loops import randomise_batchnorms
from test_shuffle_split import NegativePieces, TinyShuffleNet, channel_shuffle


def _random_masks(graph, seed: int = 0, keep: float = 0.6) -> dict:
    gen = torch.Generator().manual_seed(seed)
    masks = {gid: torch.rand(g.channels, generator=gen) < keep for gid, g in graph.groups.items()}
    for m in masks.values():
        m[0] = True
    return masks


def _both_forms(model: nn.Module, x: torch.Tensor, seed: int = 0, keep: float = 0.6, **options):
    """``model`` (BatchNorms randomised) compacted on the same random masks with its gathers and with
    its moves laid out: ``(gathers, slices)``."""
    torch.manual_seed(0)
    model = model.eval()
    randomise_batchnorms(model)
    graph = ChannelGraph.build(model, x)
    masks = _random_masks(graph, seed=seed, keep=keep)
    return compact(model, graph, masks, order_moves=False, **options), compact(model, graph, masks, **options)


def _moved(gm: fx.GraphModule, x: torch.Tensor) -> int:
    """Values written by the network's concatenations, gathers, slices and splits for input ``x`` (each
    a copy in onnx)."""
    ShapeProp(gm).propagate(x)
    total = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (torch.cat, select_channels, slice_channels):
            total += node.meta["tensor_meta"].shape.numel()
        elif node.op == "call_function" and node.target is torch.split:
            total += sum(t.shape.numel() for t in node.meta["tensor_meta"])
    return total


def _count(gm: fx.GraphModule, target) -> int:
    return sum(n.op == "call_function" and n.target is target for n in gm.graph.nodes)


@pytest.mark.parametrize("model_of", [lambda: TinyShuffleNet(), lambda: TinyShuffleNet(use_split=True),
                                      lambda: TinyShuffleNet(first_stride=1), NegativePieces])
@pytest.mark.parametrize("mode", ["mixed", "regular"])
@pytest.mark.parametrize("keep", [1.0, 0.6])
def test_moves_become_slices_with_the_outputs_of_the_gathers(model_of, mode, keep):
    """Against the compaction that keeps the gathers (itself checked against the gated network in
    ``test_shuffle_split``): equal outputs, no gather left, fewer values copied."""
    x = torch.randn(2, 3, 8, 8)
    gathers, slices = _both_forms(model_of(), x, keep=keep, mode=mode)
    assert _count(gathers, select_channels) > 0 and _count(slices, select_channels) == 0
    with torch.no_grad():
        assert torch.allclose(slices(x), gathers(x), atol=1e-5)
    assert _moved(slices, x) < _moved(gathers, x)
    for cut in (n for n in slices.graph.nodes if n.target is slice_channels):  # each slices a layer's output
        assert cut.args[0].op in ("call_module", "call_function") and cut.args[0].target not in (
            torch.cat, select_channels, slice_channels, torch.split)


def test_the_source_model_keeps_its_parameters():
    torch.manual_seed(0)
    model = TinyShuffleNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = ChannelGraph.build(model, torch.randn(1, 3, 8, 8))
    compact(model, graph, _random_masks(graph))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class TwoReaders(nn.Module):
    """One shuffled map read by a depthwise conv (then a conv) and by a conv, as ShuffleNet V2's
    downsampling unit reads the previous stage."""

    def __init__(self):
        super().__init__()
        self.a, self.ba = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.b, self.bb = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.dw, self.bdw = nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12)
        self.pw = nn.Conv2d(12, 5, 1)
        self.c = nn.Conv2d(12, 5, 1)
        self.fc = nn.Linear(10, 4)

    def forward(self, x):
        h = channel_shuffle(torch.cat((F.relu(self.ba(self.a(x))), self.bb(self.b(x)).relu()), dim=1), 2)
        one = F.relu(self.pw(self.bdw(self.dw(h))))
        return self.fc(torch.cat((one, F.relu(self.c(h))), dim=1).mean((2, 3)))


def test_a_map_read_by_a_depthwise_chain_and_a_conv_is_read_in_the_writers_order():
    """Both readers take the writers' channels as written: no gather, no concatenation of the
    shuffle's pieces, and the depthwise conv and its BatchNorm permuted with them."""
    x = torch.randn(2, 3, 6, 6)
    gathers, slices = _both_forms(TwoReaders(), x, seed=2)
    assert _count(slices, select_channels) == 0
    readers = [n for n in slices.graph.nodes if n.op == "call_module" and n.target in ("dw", "c")]
    assert len(readers) == 2 and readers[0].args[0] is readers[1].args[0]
    joined = readers[0].args[0]  # one concatenation of the two writers' outputs, whole
    assert joined.target is torch.cat and [p.args[0].target for p in joined.args[0]] == ["ba", "bb"]
    with torch.no_grad():
        assert torch.allclose(slices(x), gathers(x), atol=1e-5)


class UnknownReader(nn.Module):
    """A shuffle read through an op the pass does not know (a product with a constant)."""

    def __init__(self):
        super().__init__()
        self.a, self.ba = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = channel_shuffle(F.relu(self.ba(self.a(x))), 2)
        x1, x2 = h.chunk(2, dim=1)
        return self.fc(F.relu(self.c(torch.cat((x1 * 2.0, x2), dim=1))).mean((2, 3)))


def test_a_cluster_with_a_reader_of_unknown_kind_is_left_as_it_is():
    x = torch.randn(2, 3, 6, 6)
    gathers, slices = _both_forms(UnknownReader(), x, seed=1)
    assert _count(slices, select_channels) == _count(gathers, select_channels) > 0
    assert slices.budgetprune_moves_ordered == 0 and order_channels(gathers) == 0
    with torch.no_grad():
        assert torch.equal(slices(x), gathers(x))


class ShuffledInput(nn.Module):
    """The model's input shuffled, then read by a conv: the input cannot be permuted, the conv can."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(F.relu(self.c(channel_shuffle(x, 2))).mean((2, 3)))


def test_a_writer_that_cannot_be_permuted_keeps_its_order_and_the_reader_follows_it():
    """The input's shuffle is folded into the conv's columns: the conv reads the input as it is."""
    x = torch.randn(2, 4, 5, 5)
    gathers, slices = _both_forms(ShuffledInput(), x, seed=3)
    conv = next(n for n in slices.graph.nodes if n.op == "call_module" and n.target == "c")
    assert conv.args[0].op == "placeholder"
    # by hand: the shuffle of 4 channels in 2 groups reads them as [0, 2, 1, 3] (its own inverse)
    assert torch.equal(slices.c.weight, gathers.c.weight[:, [0, 2, 1, 3]])
    with torch.no_grad():
        assert torch.allclose(slices(x), gathers(x), atol=1e-5)


@pytest.fixture(scope="module")
def models():
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (make test installs it)")
    import torchvision.models
    return torchvision.models


def test_torchvision_shufflenet_loses_every_gather(models):
    """torchvision's ShuffleNet V2 x0.5 at 224 px, a random third of its channels dropped: its 29
    gathers are gone, its outputs unchanged."""
    x = torch.randn(1, 3, 224, 224)
    gathers, slices = _both_forms(models.shufflenet_v2_x0_5(num_classes=10), x, keep=0.65)
    assert _count(gathers, select_channels) == 29 and _count(slices, select_channels) == 0
    assert _count(slices, torch.split) == 0 and _count(slices, slice_channels) > 0
    with torch.no_grad():
        assert torch.allclose(slices(x), gathers(x), atol=1e-5)
    assert _moved(slices, x) < 0.7 * _moved(gathers, x)


def test_a_plan_written_before_the_layout_replays_with_its_gathers(tmp_path):
    """A version-7 plan (gathers folded into splits, not laid out) with its state dict loads as it
    was compacted; a new plan says version 8, and the new form saves as a graph of safe ops (loaded
    without the model's code)."""
    from budgetprune.errors import CheckpointError
    from budgetprune.plan import check_plan, make_plan, replay

    torch.manual_seed(0)
    model = TinyShuffleNet(first_stride=1)
    x = torch.randn(4, 3, 8, 8)
    pruner = Pruner(model, x, "flops=0.5", total_steps=1, block="regular", channel_multiple=1, gate_init=3.0)
    small, report = pruner.finalize()
    assert report["plan"]["version"] == 8 and _count(small, select_channels) == 0
    masks = {gid: torch.zeros(g.channels, dtype=torch.bool).index_fill_(0, torch.tensor(report["plan"]["kept"][gid]),
                                                                        True)
             for gid, g in pruner.graph.groups.items() if gid in report["plan"]["kept"]}
    old = compact(model, pruner.graph, masks, mode="regular", order_moves=False)
    plan = make_plan(pruner.graph, masks, block="regular", granularity="channel", gate_inputs=False,
                     moves_ordered=True)
    assert plan["version"] == 8 and (plan["pad_tied"], plan["pad_within_space"]) == (True, True)
    assert make_plan(pruner.graph, masks, block="regular", granularity="channel", gate_inputs=False)["version"] == 6
    with pytest.raises(CheckpointError, match="pad_within_space or pad_tied"):
        check_plan({**plan, "pad_tied": "yes"})
    with pytest.raises(CheckpointError):  # the old buffers do not fit the new form
        replay(plan, TinyShuffleNet(first_stride=1), old.state_dict())
    again = replay({**plan, "version": 7}, TinyShuffleNet(first_stride=1), old.state_dict())
    assert _count(again, select_channels) > 0
    with torch.no_grad():
        assert torch.allclose(again(x), old(x), atol=1e-6)
    budgetprune.save(small, tmp_path / "shuffle.pt")  # no torch.split left: the file stands alone
    assert "graph" in torch.load(tmp_path / "shuffle.pt", weights_only=True)
    loaded = budgetprune.load(tmp_path / "shuffle.pt")
    with torch.no_grad():
        assert torch.allclose(loaded(x), small(x), atol=1e-6)


def test_the_laid_out_network_scripts_and_exports(tmp_path):
    """Its slices script in TorchScript and export to onnx (checked with onnxruntime where installed)."""
    from budgetprune.export import to_onnx, to_torchscript

    x = torch.randn(2, 3, 8, 8)
    _, slices = _both_forms(TinyShuffleNet(first_stride=1), x)
    assert _count(slices, slice_channels) > 0
    assert to_torchscript(slices, tmp_path / "m.ts", x)["method"] == "script"
    assert to_onnx(slices, tmp_path / "m.onnx", x)["verified"]
