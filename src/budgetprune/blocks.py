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
at each position (:data:`GATHER_COST`). Spaces whose positions are tied by a concatenation,
split or channel shuffle stay regular. The costs, the
budget projection and the compaction all call the same choice for the same masks
(:class:`budgetprune.resources.CostModel`, :func:`budgetprune.compact.compact`), so the
budget counts exactly the network that is built.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from .graph import ChannelGraph
from .liveness import (BlockMode, Padding, alive_sets, channel_sums, combine_sets, kept_counter, mixed_sets,
                       nonempty_masks, padding_of, regular_sets, slot_sets, tied_spaces)

#: γ per runtime (multiply-adds per channel of a gathered sum, per position), measured on CPU (2
#: cores, AMD EPYC) by ``python benchmarks/deploy_speed.py`` (``benchmarks/results/deploy_speed.md``):
#: eager PyTorch and TorchScript from what the same-mask mixed and regular networks' times imply
#: (medians over its five models at 2× and 4× FLOPs: 78–115 in eager PyTorch and 62–74 in
#: TorchScript at batch 16 and 1; single measurements are noisy). In onnxruntime a gather also
#: breaks the chain of blocked (NCHWc) convolutions, which those unpadded networks do not show:
#: in a first run with widths padded to 16 and γ = 100 (``benchmarks/results/deploy_speed_gamma100``),
#: auto networks took up to 29 % longer than padded regular ones at batch 16 (resnet20 4×: 2.15 vs
#: 1.66 ms), so there a space stays mixed only where it saves ten times as much. On other hardware
#: pass ``gather_cost``.
GATHER_COST = {"eager": 80.0, "torchscript": 65.0, "onnxruntime": 1000.0}


def auto_mode(runtime: str = "eager", multiple: int | Padding = 1, gather_cost: float | None = None,
              pad_tied: bool = True) -> BlockMode:
    """The ``"auto"`` block mode for ``runtime`` (its :data:`GATHER_COST` unless ``gather_cost``
    is given), its widths padded to ``multiple`` (an int, or a :class:`~budgetprune.liveness.Padding`;
    ``pad_tied``: tied channels too)."""
    return BlockMode("auto", multiple, GATHER_COST[runtime] if gather_cost is None else gather_cost,
                     pad_tied=pad_tied)


def as_mode(mode: str) -> BlockMode:
    """``mode`` as a :class:`~budgetprune.liveness.BlockMode` (a plain ``"auto"`` weighs gathers
    at their cost in eager PyTorch)."""
    if isinstance(mode, BlockMode):
        return mode
    return auto_mode("eager") if mode == "auto" else BlockMode(str(mode))


def built_sets(graph: ChannelGraph, eff: dict[str, torch.Tensor], mode: str,
               flop_terms: Callable[[], list]) -> tuple[BlockMode, dict[str, torch.Tensor]]:
    """``(the blocks built, the channels each tensor keeps)`` for the purged masks ``eff``: an
    ``"auto"`` mode whose spaces are not chosen yet is chosen here (weighed with ``flop_terms()``)."""
    mode = as_mode(mode)
    if str(mode) == "auto" and mode.mixed is None:
        return choose_blocks(graph, eff, mode, flop_terms())
    return mode, slot_sets(graph, eff, mode, purge=False)


def choose_blocks(graph: ChannelGraph, eff: dict[str, torch.Tensor], mode: BlockMode,
                  flop_terms: list) -> tuple[BlockMode, dict[str, torch.Tensor]]:
    """``(mode with its mixed spaces chosen, the kept sets)`` for the purged masks ``eff``
    (:func:`budgetprune.liveness.effective_masks`); ``flop_terms`` are the FLOP cost terms
    (:func:`budgetprune.resources.layer_costs`) the saving is counted with."""
    padding = padding_of(mode)
    alive = alive_sets(graph, eff)
    tied = getattr(mode, "pad_tied", True)
    regular = regular_sets(graph, eff, padding, alive, pad_tied=tied)
    mixed = mixed_sets(graph, eff, padding, alive, within_space=getattr(mode, "pad_within_space", True), pad_tied=tied)
    differ = {graph.spaces[n] for n in regular
              if regular[n] is not mixed[n] and not torch.equal(regular[n], mixed[n])} - tied_spaces(graph)
    if not differ:
        return mode.chosen(frozenset()), regular
    kept = kept_counter()
    n_regular = {n: kept(s) for n, s in regular.items()}
    n_mixed = {n: kept(s) for n, s in mixed.items()}
    saving: dict[str, float] = defaultdict(float)
    nonempty = nonempty_masks(eff)
    for t in flop_terms:
        touched = {graph.spaces[x] for x in (t.in_tensor, t.out_tensor) if x is not None} & differ
        gone = t.out_group is not None and not nonempty[t.out_group]  # a pruned-away layer costs nothing
        for space in touched:
            def count(tensor, space=space):
                return (n_mixed if graph.spaces[tensor] == space else n_regular)[tensor]
            n_in_r = n_regular[t.in_tensor] * t.in_expansion if t.in_tensor else 0
            n_in_m = count(t.in_tensor) * t.in_expansion if t.in_tensor else 0
            n_out_r, n_out_m = (0, 0) if gone else (n_regular[t.out_tensor], count(t.out_tensor))
            saving[space] += float(t.cost(n_in_r, n_out_r)) - float(t.cost(n_in_m, n_out_m))
    overhead: dict[str, float] = defaultdict(float)
    for space, positions in _gathers(graph, mixed):
        overhead[space] += mode.gather_cost * positions
    chosen = frozenset(s for s in differ if saving[s] > overhead[s])
    return mode.chosen(chosen), combine_sets(graph, regular, mixed, chosen)


def _gathers(graph: ChannelGraph, sets: dict[str, torch.Tensor]):
    """``(space, channels × positions per example of its result)`` for each sum of a network
    keeping ``sets`` that gathers (an operand keeps other channels than the result)."""
    for out, operands in channel_sums(graph):
        if any(not torch.equal(sets[o], sets[out]) for o in operands):
            yield graph.spaces[out], graph.tensors[out].area * int(sets[out].sum())


def gathered_positions(graph: ChannelGraph, sets: dict[str, torch.Tensor]) -> int:
    """Channels × positions per example that the gathering sums of a network keeping ``sets``
    (:func:`budgetprune.liveness.slot_sets`) produce: what ``γ`` multiplies."""
    return sum(positions for _, positions in _gathers(graph, sets))
