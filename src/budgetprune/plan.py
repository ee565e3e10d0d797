"""A pruning plan: what :meth:`budgetprune.pruner.Pruner.finalize` decided, as plain data that
replays on the user's own model.

A model file can describe a compacted network by itself only when every operation of it is in
budgetprune's allow-list (:mod:`budgetprune.graphio`). Any other network — stochastic depth,
a custom activation, a hyphenated module name — is saved as (plan, weights): the plan names,
for each channel group of the traced model, the channels kept, with the residual block mode
(and the multiple its widths are padded to, from which width up), the granularity and the input shape. Loading replays it on a model the user passes (their own
code, not the file's): trace, check that the groups are the plan's, compact with the kept
channels, load the weights strictly. Nothing in a plan is ever code; it is only looked up.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .compact import compact
from .errors import CheckpointError
from .graph import ChannelGraph
from .graphio import check_state_shapes
from .liveness import BlockMode, Padding, has_tied_channels, padding_of

FORMAT = "budgetprune-plan"
#: 2: some tensors may keep exact widths (pad_min_width, pad_min_area); 3: also those that keep
#: few channels (pad_min_kept); 4: a padded mixed tensor pads with its residual space's channels
#: first (:func:`budgetprune.liveness._pad_mixed`; a padded mixed or auto plan of an earlier
#: version replays as it was written); 5: channels tied by position or by a grouped convolution
#: are padded too (:func:`budgetprune.liveness.regular_sets`); 6: a channel gather read only by a
#: channel split is compacted as one gather per piece (its index buffers differ); 7: Swin V2's
#: heads are groups (an older plan of a Swin V2 kept them whole, and replays so); 8: channels that only
#: move (concatenations, gathers and splits) are laid out as slices of permuted writers for permuted
#: readers (:mod:`budgetprune.channel_order`; written where compaction laid out some), and the plan
#: names ``pad_within_space`` and ``pad_tied`` itself (before, its version said them). A plan is
#: written at the lowest version that reads it.
VERSION = 8
_PAD_WITHIN_SPACE = 4  # the first version whose padded mixed tensors pad within their space
_PAD_TIED = 5  # the first version whose tied channels are padded
_FOLD_SPLITS = 6  # the first version whose gathers read by a split are folded into it
_V2_HEADS = 7  # the first version in which Swin V2's attention heads are pruned
_ORDER_MOVES = 8  # the first version whose channel moves are laid out as slices

#: The plan fields of a :class:`~budgetprune.liveness.Padding` after its multiple: name, value
#: when absent (no floor), the first plan version that has it, what it is.
_FLOORS = (("pad_min_width", 0, 2, "narrowest padded width"),
           ("pad_min_area", 1, 2, "fewest positions of a padded tensor"),
           ("pad_min_kept", 0, 3, "fewest kept channels of a padded tensor"))


def make_plan(graph: ChannelGraph, masks: dict[str, torch.Tensor] | None, *, block: str, granularity: str,
              gate_inputs: bool, moves_ordered: bool = False) -> dict:
    """The plan of a finalized pruning: ``masks`` are the final keep-masks per group (None: every
    channel kept, as with per-weight pruning). ``moves_ordered``: the compacted network has channel
    moves laid out as slices (its ``budgetprune_moves_ordered``)."""
    kept = {gid: [int(i) for i in torch.nonzero(m).flatten()] for gid, m in (masks or {}).items()}
    padding = padding_of(block)
    # a padding that leaves some tensors exact needs a later version to read; other plans stay readable by version 1
    floors = {name: value for (name, absent, *_), value in zip(_FLOORS, padding[1:]) if value != absent}
    version = max([1] + [since for name, _, since, _ in _FLOORS if name in floors])
    mixed = str(block) == "mixed" or str(block) == "auto" and bool(getattr(block, "mixed", None))
    if mixed and padding.multiple > 1 and getattr(block, "pad_within_space", True):  # a padded mixed tensor
        version = max(version, _PAD_WITHIN_SPACE)
    if padding.multiple > 1 and getattr(block, "pad_tied", True) and has_tied_channels(graph):
        version = max(version, _PAD_TIED)
    if any(src in graph.gathers for src, _ in graph.splits.values()):  # compaction folds such a split
        version = max(version, _FOLD_SPLITS)
    if v2_head_groups(graph):
        version = max(version, _V2_HEADS)
    if moves_ordered:
        version = max(version, _ORDER_MOVES)
    plan = {"format": FORMAT, "version": version, "granularity": granularity, "block": str(block),
            "channel_multiple": padding.multiple, **floors, "gate_inputs": gate_inputs,
            "input_shape": list(graph.input_shape), "groups": {gid: g.channels for gid, g in graph.groups.items()},
            "kept": kept}
    if version >= _ORDER_MOVES:  # said by name from this version on, not by the version
        plan["pad_within_space"] = bool(getattr(block, "pad_within_space", True))
        plan["pad_tied"] = bool(getattr(block, "pad_tied", True))
    if str(block) == "auto":
        members: dict[str, list[str]] = {}
        for name, space in graph.spaces.items():
            members.setdefault(space, []).append(name)
        plan["mixed_spaces"] = sorted(min(members[s]) for s in (getattr(block, "mixed", None) or ()))
    return plan


def v2_head_groups(graph: ChannelGraph) -> set[str]:
    """The head groups of Swin V2 attention layers (grouped since plan version 7)."""
    return {layer.heads for layer in graph.layers.values()
            if layer.kind == "attention" and layer.heads and layer.attention.head_writer}


def _malformed(why: str) -> CheckpointError:
    return CheckpointError(f"malformed pruning plan: {why}")


def check_plan(plan) -> dict:
    """``plan`` if it is a plan this budgetprune reads (types and ranges), else a one-line error."""
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise _malformed("not a budgetprune pruning plan")
    if not isinstance(plan.get("version"), int) or plan["version"] > VERSION:
        raise CheckpointError(f"the pruning plan is version {plan.get('version')!r:.20}, not one this budgetprune "
                              "reads; upgrade budgetprune")
    if plan.get("granularity") not in ("channel", "weight") or plan.get("block") not in ("mixed", "regular", "auto") \
            or not isinstance(plan.get("gate_inputs"), bool):
        raise _malformed("granularity, block or gate_inputs is not one budgetprune knows")
    multiple = plan.get("channel_multiple", 1)  # plans written before widths were padded have none
    if type(multiple) is not int or not 1 <= multiple <= 2 ** 16:
        raise _malformed(f"channel multiple {multiple!r:.20} is not a positive int")
    for name, absent, _, what in _FLOORS:  # plans written before some tensors kept exact widths have none
        value = plan.get(name, absent)
        if type(value) is not int or not absent <= value <= 2 ** 30:
            raise _malformed(f"{what} {value!r:.20} is not an int of at least {absent}")
    if not all(isinstance(plan.get(name, False), bool) for name in ("pad_within_space", "pad_tied")):
        raise _malformed("pad_within_space or pad_tied is not true or false")
    mixed = plan.get("mixed_spaces", [])
    if not isinstance(mixed, list) or not all(isinstance(t, str) for t in mixed) or \
            (mixed and plan["block"] != "auto"):
        raise _malformed("its mixed spaces are not a list of tensor names (with auto blocks only)")
    shape = plan.get("input_shape")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 4 and all(type(v) is int and 0 < v <= 2 ** 16
                                                                     for v in shape)):
        raise _malformed(f"input shape {shape!r:.60} is not 1 to 4 positive sizes")
    groups, kept = plan.get("groups"), plan.get("kept")
    if not isinstance(groups, dict) or not all(isinstance(g, str) and type(n) is int and n > 0
                                               for g, n in groups.items()):
        raise _malformed("its groups are not a mapping of names to channel counts")
    if not isinstance(kept, dict):
        raise _malformed("its kept channels are not a mapping of groups to indices")
    for gid, idx in kept.items():
        if gid not in groups or not isinstance(idx, list) or not all(
                type(i) is int and 0 <= i < groups[gid] for i in idx) or len(set(idx)) != len(idx):
            raise _malformed(f"kept channels of group {gid!r:.60} are not distinct indices of its channels")
    return plan


def replay(plan: dict, model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The compacted network ``plan`` describes, built from the user's ``model`` (not changed)
    with ``state_dict`` loaded strictly, in eval mode."""
    plan = check_plan(plan)
    model = copy.deepcopy(model).cpu().eval()
    example = torch.zeros(1, *plan["input_shape"])
    graph = ChannelGraph.build(model, example, gate_inputs=plan["gate_inputs"])
    mine = {gid: g.channels for gid, g in graph.groups.items()}
    if plan["version"] < _V2_HEADS:  # written when Swin V2's heads stayed whole: they still do
        whole = v2_head_groups(graph)
        mine = {gid: n for gid, n in mine.items() if gid not in whole}
    if mine != plan["groups"]:
        differ = sorted(set(mine) ^ set(plan["groups"])) or sorted(g for g in mine if mine[g] != plan["groups"][g])
        raise CheckpointError(f"the model passed does not match the pruning plan (group {differ[0]!r:.60} differs): "
                              "pass the same architecture that was pruned, before pruning")
    masks = kept_masks(plan, mine) if plan["granularity"] == "channel" else None
    net = compact(model, graph, masks, mode=_block(plan, graph), fold_splits=plan["version"] >= _FOLD_SPLITS,
                  order_moves=plan["version"] >= _ORDER_MOVES)
    check_state_shapes(net, state_dict)
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights do not fit the replayed plan ({' '.join(str(exc).split())[:300]})") \
            from None
    net.budgetprune_plan = plan
    return net.eval()


def kept_masks(plan: dict, channels: dict[str, int]) -> dict[str, torch.Tensor]:
    """The keep-mask of each group ``plan`` lists (True at its kept channels), ``channels[group]`` long."""
    return masks_of_indices(plan["kept"], channels)


def masks_of_indices(kept: dict[str, list[int]], channels: dict[str, int]) -> dict[str, torch.Tensor]:
    """Keep-masks from kept channel indices per group (a plan's ``kept``, ``metrics.json``
    ``kept_channels``): True at those indices, ``channels[group]`` long."""
    masks = {}
    for gid, idx in kept.items():
        masks[gid] = torch.zeros(channels[gid], dtype=torch.bool)
        masks[gid][torch.tensor(idx, dtype=torch.long)] = True
    return masks


def _block(plan: dict, graph: ChannelGraph) -> BlockMode:
    """The block mode ``plan`` was compacted with, its mixed spaces (auto blocks) found in ``graph``."""
    padding = Padding(plan.get("channel_multiple", 1), *(plan.get(name, absent) for name, absent, *_ in _FLOORS))
    within = plan.get("pad_within_space", plan["version"] >= _PAD_WITHIN_SPACE)
    tied = plan.get("pad_tied", plan["version"] >= _PAD_TIED)
    if plan["block"] != "auto":
        return BlockMode(plan["block"], padding, pad_within_space=within, pad_tied=tied)
    unknown = [t for t in plan.get("mixed_spaces", []) if t not in graph.spaces]
    if unknown:
        raise CheckpointError(f"the model passed does not match the pruning plan (no tensor {unknown[0]!r:.60}): "
                              "pass the same architecture that was pruned, before pruning")
    return BlockMode("auto", padding, mixed=frozenset(graph.spaces[t] for t in plan.get("mixed_spaces", [])),
                     pad_within_space=within, pad_tied=tied)
