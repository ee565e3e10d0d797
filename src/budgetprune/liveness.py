"""Which slots of each tensor are alive, for given gate values or keep-masks.

A slot is alive when at least one of its writers is (:mod:`budgetprune.graph`). With
independent gates the probability that slot c is alive is ``1 − Π_w (1 − P(z_w,c > 0))``;
with 0/1 masks the same formula is the logical OR. One function serves the differentiable
cost (probabilities), the gate hooks (per-example sampled gates) and compaction (masks).

:func:`effective_masks` adds the purge rule: a layer whose every input slot is dead outputs
nothing (its gates are treated as closed), so a residual branch whose first conv is pruned
away disappears as a whole (automatic depth determination, seed 001 section 4.1).

:func:`slot_sets` gives the channels each tensor keeps in the compacted network:

* ``"mixed"`` (the mixed-connectivity block, seed 001 supplement 2): exactly the alive slots;
  a residual add of tensors with different slots becomes ``index_add``;
* ``"regular"``: tensors that are added together keep the same channels (the union of their
  alive slots), as a regular ResBlock needs; the extra channels are computed as zeros;
* ``BlockMode("regular", multiple=m)``: the same, with every width padded up to a multiple of
  ``m`` (or to the full width) by more zero channels, for the runtimes whose fast kernels need
  aligned widths (onnxruntime's blocked convolutions on CPU: 8 or 16 channels).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .graph import ChannelGraph, TensorInfo

MODES = ("mixed", "regular")


class BlockMode(str):
    """A block mode (``"mixed"`` or ``"regular"``) whose kept widths are padded to a multiple.

    It is the plain string everywhere a mode is compared or stored, and carries ``multiple``
    (1: no padding) to :func:`slot_sets`, so the costs, the projection and the compaction that
    take a mode all count and build the same padded widths. Only regular blocks pad: a mixed
    block's sum keeps the union of its operands' channels at their own positions, which padding
    each tensor on its own would break."""

    multiple: int

    def __new__(cls, kind: str, multiple: int = 1) -> "BlockMode":
        if kind not in MODES:
            raise ValueError(f"unknown block mode '{kind}': choose one of {', '.join(MODES)}")
        if type(multiple) is not int or multiple < 1:
            raise ValueError(f"the channel multiple must be a positive int, got {multiple!r}")
        if multiple > 1 and kind != "regular":
            raise ValueError("channel widths are padded to a multiple in regular blocks only: use block 'regular'")
        mode = super().__new__(cls, kind)
        mode.multiple = multiple
        return mode

    def __reduce__(self):
        return BlockMode, (str(self), self.multiple)

    def __repr__(self) -> str:
        return f"BlockMode({str(self)!r}, multiple={self.multiple})"


def channel_multiple(mode: str) -> int:
    """The multiple ``mode`` pads kept widths to (1 for a plain mode string)."""
    return getattr(mode, "multiple", 1)


def alive(info: TensorInfo, values: dict[str, torch.Tensor], like: torch.Tensor | None = None) -> torch.Tensor:
    """P(slot alive) per slot of ``info`` (shape (slots,) or (batch, slots)).

    ``values[group]`` is a (C,) or (batch, C) tensor of probabilities or 0/1 indicators; a
    group missing from ``values`` counts as always alive.
    """
    ref = like if like is not None else next(iter(values.values()), torch.ones(1))
    lead = ()
    for v in values.values():
        if v.dim() == 2:
            lead = (v.shape[0],)
            break
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    always, by_group = info.writers
    always = always.clone()
    dead = torch.ones(*lead, info.slots, dtype=dtype, device=ref.device)
    for gid, (slots, chans) in by_group.items():  # each slot at most once per group
        if gid not in values:
            always[slots] = True
            continue
        slots, chans = slots.to(ref.device), chans.to(ref.device)
        factor = 1.0 - values[gid].to(dtype).index_select(-1, chans)
        dead = dead.index_copy(-1, slots, dead.index_select(-1, slots) * factor)
    return 1.0 - dead * (~always).to(dead.device, dtype)


def alive_mask(info: TensorInfo, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Boolean (slots,) aliveness for 0/1 keep-masks."""
    always, by_group = info.writers
    out = always.clone()
    for gid, (slots, chans) in by_group.items():
        if gid not in masks:
            out[slots] = True
        else:
            out[slots] |= masks[gid].bool().cpu()[chans]
    return out


def effective_masks(graph: ChannelGraph, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``masks`` with the purge rules applied until nothing changes.

    Forward: a gated layer with no alive input keeps nothing (its output would be a constant
    the gates also switch off); an attention layer without output channels or input keeps no
    head, and one without heads no output channel. Backward: a gated layer whose every reader is a gated layer
    that keeps nothing is useless and goes too (a residual branch whose last conv is pruned
    takes its first conv with it). Together they remove whole blocks: automatic depth
    determination (seed 001, section 4.1).
    """
    eff = {gid: m.detach().bool().cpu().clone() for gid, m in masks.items()}
    for gid, g in graph.groups.items():
        eff.setdefault(gid, torch.ones(g.channels, dtype=torch.bool))
    layers = list(graph.layers.values())  # in execution order
    changed = True
    while changed:
        changed = False
        for layer in layers:
            gid = layer.out_group
            if gid is None or not bool(eff[gid].any()):
                continue
            if not bool(alive_mask(graph.tensors[layer.in_tensor], eff).any()):
                eff[gid] = torch.zeros_like(eff[gid])
                changed = True
        for layer in layers:  # an attention computes its heads for its output alone, and outputs nothing without them
            if layer.heads is None or not bool(eff[layer.heads].any()):
                continue
            if layer.out_group is not None and not bool(eff[layer.out_group].any()) or \
                    not bool(alive_mask(graph.tensors[layer.in_tensor], eff).any()):
                eff[layer.heads] = torch.zeros_like(eff[layer.heads])
                changed = True
        for layer in layers:
            if layer.heads is not None and layer.out_group is not None and not bool(eff[layer.heads].any()) \
                    and bool(eff[layer.out_group].any()):
                eff[layer.out_group] = torch.zeros_like(eff[layer.out_group])
                changed = True
        for layer in reversed(layers):
            gid = layer.out_group
            if gid is None or not bool(eff[gid].any()):
                continue
            rs = [r for r in graph.readers(gid) if not r.depthwise]
            if rs and all(r.out_group is not None and not bool(eff[r.out_group].any()) for r in rs):
                eff[gid] = torch.zeros_like(eff[gid])
                changed = True
    return eff


def slot_sets(graph: ChannelGraph, masks: dict[str, torch.Tensor], mode: str = "mixed",
              purge: bool = True) -> dict[str, torch.Tensor]:
    """Boolean (slots,) vector per tensor: the channels it keeps in the compacted network."""
    if mode not in MODES:
        raise ValueError(f"unknown block mode '{mode}': choose one of {', '.join(MODES)}")
    eff = effective_masks(graph, masks) if purge else masks
    shared: dict[int, torch.Tensor] = {}  # tensors passed through unchanged share their segments
    sets = {}
    for name, info in graph.tensors.items():
        key = id(info.segments)
        if key not in shared:
            shared[key] = alive_mask(info, eff)
        sets[name] = shared[key].clone()
    if mode == "mixed":
        return sets
    members = defaultdict(list)
    for name, space in graph.spaces.items():
        members[space].append(name)
    cats = list(graph.cats.items()) + list(graph.splits.values())  # a split's input joins its pieces
    for _ in range(100):
        changed = False
        for names in members.values():
            union = sets[names[0]].clone()
            for n in names[1:]:
                union |= sets[n]
            for n in names:
                if not torch.equal(sets[n], union):
                    sets[n] = union.clone()
                    changed = True
        for name, parts in cats:
            start = 0
            for part in parts:
                piece = sets[name][start:start + sets[part].numel()]
                grown = sets[part] | piece
                if not torch.equal(grown, sets[part]):
                    sets[part] = grown
                    changed = True
                start += sets[part].numel()
            joined = torch.cat([sets[p] for p in parts])
            if not torch.equal(joined | sets[name], sets[name]):
                sets[name] = sets[name] | joined
                changed = True
        for out, (src, perm) in graph.gathers.items():  # a shuffle's output is its input, reordered (or repeated)
            grown_out = sets[out] | sets[src][perm]
            grown_src = sets[src] | torch.zeros(sets[src].numel(), dtype=torch.long).index_add(
                0, perm, sets[out].long()).bool()
            if not (torch.equal(grown_out, sets[out]) and torch.equal(grown_src, sets[src])):
                sets[out], sets[src] = grown_out, grown_src
                changed = True
        if not changed:
            if channel_multiple(mode) > 1:
                _pad_widths(graph, sets, members, channel_multiple(mode))
            return sets
    raise RuntimeError("internal error: regular-block widths did not settle")


def _pad_widths(graph: ChannelGraph, sets: dict[str, torch.Tensor], members: dict, multiple: int) -> None:
    """Pad each space's kept channels (regular blocks: one set per space) up to a multiple of
    ``multiple``, or to its full width, with the lowest-numbered channels it does not keep (they
    compute zeros, as a regular block's extra channels do), in place. A space read through a
    concatenation, split or channel shuffle keeps its width: its positions are tied to another
    tensor's."""
    tied = set()
    for name, parts in graph.cats.items():
        tied.update((name, *parts))
    for src, pieces in graph.splits.values():
        tied.update((src, *pieces))
    for out, (src, _) in graph.gathers.items():
        tied.update((out, src))
    for names in members.values():
        if tied.intersection(names):
            continue
        kept = sets[names[0]]
        n = int(kept.sum())
        target = min(-(-n // multiple) * multiple, kept.numel())
        if n == 0 or target == n:
            continue
        padded = kept.clone()
        padded[torch.nonzero(~kept).flatten()[:target - n]] = True
        for name in names:
            sets[name] = padded.clone()
