"""Each residual sum as a mixed or a regular block, whichever runs faster (``block="auto"``).

A residual space is a set of tensors added together (a ResNet stage's stream and the branches
written into it). After pruning, its tensors keep different channels, and there are two ways
to build it:

* **mixed** (seed 001, supplement 2): each tensor keeps only its own alive channels; every sum
  becomes a gather (``index_add``; Pad + Gather in ONNX, :mod:`budgetprune.ops`). Fewer
  multiply-adds, but each sum costs a pass over its result, and in runtimes with blocked
  layouts a gather also breaks the conv + add fusion;
* **regular**: every tensor of the space keeps the union of their channels (the extra ones
  compute zeros) and sums stay plain adds. More multiply-adds in the layers that write and
  read the space, no gathers.

:func:`choose_blocks` weighs the two per space for the masks at hand. With ``R`` the regular
sets and ``M`` the mixed ones (both padded to the mode's channel multiple), a space ``s`` is
kept mixed when

    Σ_layers [MACs(R) − MACs(R with s at M)] > γ · Σ_{sums of s that gather} area · |M(result)|

where the left side sums over the layers reading or writing a tensor of ``s`` (the others at
their regular widths), a sum gathers when one operand keeps other channels than its result,
and ``γ`` is the runtime's gather cost: the multiply-adds one channel of a gathered sum costs
at each position (:data:`GATHER_COST`, measured by :func:`measure_gather_cost`). Spaces whose
positions are tied by a concatenation, split or channel shuffle stay regular. The costs, the
budget projection and the compaction all call the same choice for the same masks
(:class:`budgetprune.resources.CostModel`, :func:`budgetprune.compact.compact`), so the
budget counts exactly the network that is built.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .graph import ChannelGraph
from .liveness import BlockMode, alive_sets, channel_multiple, channel_sums, combine_sets, mixed_sets, regular_sets, tied_spaces
from .ops import index_add_channels

#: γ per runtime (multiply-adds per channel of a gathered sum, per position), measured on CPU
#: (2 cores, AMD EPYC) by ``python benchmarks/gather_cost.py``
#: (``benchmarks/results/gather_cost.md``); :func:`measure_gather_cost` measures it elsewhere.
GATHER_COST = {"eager": 150.0, "torchscript": 150.0, "onnxruntime": 100.0}


def auto_mode(runtime: str = "eager", multiple: int = 1, gather_cost: float | None = None) -> BlockMode:
    """The ``"auto"`` block mode for ``runtime`` (its :data:`GATHER_COST` unless ``gather_cost``
    is given), its widths padded to ``multiple``."""
    return BlockMode("auto", multiple, GATHER_COST[runtime] if gather_cost is None else gather_cost)


def as_mode(mode: str) -> BlockMode:
    """``mode`` as a :class:`~budgetprune.liveness.BlockMode` (a plain ``"auto"`` weighs gathers
    at their cost in eager PyTorch)."""
    if isinstance(mode, BlockMode):
        return mode
    return auto_mode("eager") if mode == "auto" else BlockMode(str(mode))


def choose_blocks(graph: ChannelGraph, eff: dict[str, torch.Tensor], mode: BlockMode,
                  flop_terms: list) -> tuple[BlockMode, dict[str, torch.Tensor]]:
    """``(mode with its mixed spaces chosen, the kept sets)`` for the purged masks ``eff``
    (:func:`budgetprune.liveness.effective_masks`); ``flop_terms`` are the FLOP cost terms
    (:func:`budgetprune.resources.layer_costs`) the saving is counted with."""
    multiple = channel_multiple(mode)
    alive = alive_sets(graph, eff)
    regular, mixed = regular_sets(graph, eff, multiple, alive), mixed_sets(graph, eff, multiple, alive)
    differ = {graph.spaces[n] for n in regular if not torch.equal(regular[n], mixed[n])} - tied_spaces(graph)
    if not differ:
        return mode.chosen(frozenset()), regular
    n_regular = {n: int(s.sum()) for n, s in regular.items()}
    n_mixed = {n: int(s.sum()) for n, s in mixed.items()}
    saving: dict[str, float] = defaultdict(float)
    for t in flop_terms:
        touched = {graph.spaces[x] for x in (t.in_tensor, t.out_tensor) if x is not None} & differ
        gone = t.out_group is not None and not bool(eff[t.out_group].any())  # a pruned-away layer costs nothing
        for space in touched:
            def count(tensor, space=space):
                return (n_mixed if graph.spaces[tensor] == space else n_regular)[tensor]
            n_in_r = n_regular[t.in_tensor] * t.in_expansion if t.in_tensor else 0
            n_in_m = count(t.in_tensor) * t.in_expansion if t.in_tensor else 0
            n_out_r, n_out_m = (0, 0) if gone else (n_regular[t.out_tensor], count(t.out_tensor))
            saving[space] += float(t.cost(n_in_r, n_out_r)) - float(t.cost(n_in_m, n_out_m))
    overhead: dict[str, float] = defaultdict(float)
    for out, operands in channel_sums(graph):
        space = graph.spaces[out]
        if space in differ and any(not torch.equal(mixed[o], mixed[out]) for o in operands):
            overhead[space] += mode.gather_cost * graph.tensors[out].area * n_mixed[out]
    chosen = frozenset(s for s in differ if saving[s] > overhead[s])
    return mode.chosen(chosen), combine_sets(graph, regular, mixed, chosen)


class _ResidualBlock(nn.Module):
    """conv → ReLU → conv (``width`` outputs) added into the ``channels``-wide input, then a
    conv reading the sum: regular (``width == channels``, a plain add) or mixed (the second
    conv's ``width`` outputs gathered into every ``channels // width``-th channel)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.a = nn.Conv2d(channels, channels, 3, padding=1)
        self.b = nn.Conv2d(channels, width, 3, padding=1)
        self.c = nn.Conv2d(channels, channels, 3, padding=1)
        self.mixed = width != channels
        self.register_buffer("index", torch.arange(width) * (channels // width))

    def forward(self, x):
        delta = self.b(torch.relu(self.a(x)))
        out = index_add_channels(x, self.index, delta) if self.mixed else x + delta
        return self.c(torch.relu(out))


def measure_gather_cost(runtime: str = "eager", device: str | torch.device = "cpu", batch: int = 16,
                        shapes: tuple[tuple[int, int], ...] = ((64, 28), (128, 14), (256, 7)),
                        rounds: int = 5) -> dict:
    """γ of :data:`GATHER_COST` measured in ``runtime`` on ``device``: per (channels, size) of
    ``shapes``, a residual block whose branch writes all its channels (regular) against the same
    block whose branch writes half of them, gathered into the sum (mixed), timed in ``rounds``
    alternating rounds (each keeps its fastest). The mixed block saves the MACs of half the
    branch's last conv; what it takes longer than that saving predicts, per channel of the sum
    and position, in MACs at the regular block's rate, is γ. Returns the per-shape values and
    their median (``"gather_cost"``, floored at 0)."""
    from .runtimes import median_ms, runner

    device = torch.device(device)
    per_shape = []
    for channels, size in shapes:
        example = torch.randn(batch, channels, size, size, device=device)
        nets = {"regular": _ResidualBlock(channels, channels), "mixed": _ResidualBlock(channels, channels // 2)}
        runs = {k: runner(net.to(device).eval(), example, runtime) for k, net in nets.items()}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(rounds):
            for k, run in runs.items():
                times[k].append(median_ms(run, 10, 2, device))
        best = {k: min(v) for k, v in times.items()}
        positions = batch * size * size
        macs = 3 * channels * channels * 9 * positions
        saved = (channels - channels // 2) * channels * 9 * positions
        ms_per_mac = best["regular"] / macs
        extra = best["mixed"] - (best["regular"] - saved * ms_per_mac)
        per_shape.append({"channels": channels, "size": size, "regular_ms": best["regular"],
                          "mixed_ms": best["mixed"], "gather_cost": extra / ms_per_mac / (channels * positions)})
    values = sorted(r["gather_cost"] for r in per_shape)
    return {"runtime": runtime, "device": str(device), "batch": batch, "shapes": per_shape,
            "gather_cost": max(0.0, values[len(values) // 2])}
