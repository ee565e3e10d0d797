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
* ``"auto"``: per residual space, mixed or regular, whichever is cheaper to run
  (:mod:`budgetprune.blocks` chooses; the mode then carries the spaces it keeps mixed);
* ``BlockMode(kind, Padding(m, ...))``: the same, with every width padded up to a multiple of
  ``m`` (or to the full width) by more zero channels, for the runtimes whose fast kernels need
  aligned widths (onnxruntime's blocked convolutions on CPU: 8 or 16 channels). Regular
  spaces pad their one set; in mixed spaces each tensor pads its own, and a sum keeps what its
  operands keep. Channels tied by position (a concatenation, a split, a channel shuffle) are
  padded together in regular blocks: each tied tensor pads, the ties carry the added channels
  to the tensors they join, until every one is aligned (:func:`regular_sets`). A grouped
  convolution's tied channels pad the positions each conv group keeps
  (:func:`_padded_per_group`). An attention's heads stay whole. A :class:`Padding` can leave
  tensors exact: those narrower than ``min_width``
  channels, with fewer than ``min_area`` positions (a (batch, features) tensor has one), or that
  keep fewer than ``min_kept`` channels (``channel_multiple="auto"``, the default,
  :func:`auto_paddings`: multiples of 8 in every feature map and token tensor, or where that
  ends too far under the budget, in those of 32 channels or more, then in those that keep 32 or
  more).

The sets share vectors (tensors passed through unchanged, a set kept as computed): each step
that changes a set replaces its vector, none writes one in place.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable
from types import MappingProxyType

import torch

from .graph import ADD_FUNCTIONS, MUL_FUNCTIONS, ChannelGraph, TensorInfo

MODES = ("mixed", "regular", "auto")

#: The paddings ``channel_multiple="auto"`` (the default) tries, in turn (:func:`auto_paddings`):
#: multiples of :data:`AUTO_MULTIPLE` in every feature map and token tensor (more than one
#: position); the same only in those at least :data:`AUTO_MIN_WIDTH` channels wide; only where a
#: tensor keeps at least :data:`AUTO_MIN_KEPT` channels; exact widths. onnxruntime's CPU
#: convolutions block channels by 8 (AVX2) or 16 (AVX-512), and a network with unaligned widths
#: can run slower than the unpruned one (resnet20 and mobilenet_v2 at 2× fewer FLOPs, exact
#: widths, ran at 0.73× and 0.84× of it in onnxruntime at batch 16; padded at 1.64× and 1.92×:
#: ``benchmarks/results/deploy_speed_auto``). Narrow maps matter too: with its 16-channel stage
#: left exact, resnet20 at 2× ran 1.38× faster there, padded to 8 everywhere 1.91×
#: (``benchmarks/results/deploy_speed_resnet20_paddings``). A fully connected layer over
#: (batch, features) gains little from it. On a small network a step of 8 channels can be too
#: coarse to end on the budget (LeNet-5 (20-50-500), both convs padded, ended at 0.79 of a quarter
#: of its FLOPs in a short test run), so finalize falls back to the next padding when a network
#: ends under :data:`budgetprune.budget.FILLED` of its budget or cannot meet it.
AUTO_MULTIPLE = 8
AUTO_MIN_WIDTH = 32
AUTO_MIN_KEPT = 32
AUTO_MIN_AREA = 2


class BlockMode(str):
    """A block mode (``"mixed"``, ``"regular"`` or ``"auto"``) whose kept widths are padded as a
    :class:`Padding` asks.

    It is the plain string everywhere a mode is compared or stored, and carries its padding
    (``multiple`` 1: none) to :func:`slot_sets`, so the costs, the projection and the compaction
    that take a mode all count and build the same padded widths. An ``"auto"`` mode also carries
    ``gather_cost`` (what a mixed sum costs to run, in multiply-adds per channel of its result
    at each position: :mod:`budgetprune.blocks`) and, once chosen for given masks, ``mixed``:
    the spaces (:attr:`budgetprune.graph.ChannelGraph.spaces` keys) kept mixed.
    ``pad_within_space`` (the default) pads a mixed tensor with channels its residual space
    keeps elsewhere first (:func:`_pad_mixed`); False, how plans before version 4 were compacted,
    with the lowest-numbered channels it does not keep. ``pad_tied`` (the default) also pads
    channels tied by position or by a grouped convolution (:func:`regular_sets`); False, how plans
    before version 5 were compacted, leaves them exact."""

    gather_cost: float
    mixed: frozenset[str] | None
    pad_within_space: bool
    pad_tied: bool

    def __new__(cls, kind: str, padding: "int | Padding" = 1, gather_cost: float = 0.0,
                mixed: frozenset[str] | None = None, pad_within_space: bool = True,
                pad_tied: bool = True) -> "BlockMode":
        if kind not in MODES:
            raise ValueError(f"unknown block mode '{kind}': choose one of {', '.join(MODES)}")
        if not isinstance(padding, Padding):
            padding = Padding(padding)
        if not (isinstance(gather_cost, (int, float)) and 0.0 <= gather_cost < float("inf")):
            raise ValueError(f"the gather cost must be a non-negative number, got {gather_cost!r}")
        if mixed is not None and kind != "auto":
            raise ValueError("only an auto block mode names the spaces it keeps mixed")
        mode = super().__new__(cls, kind)
        mode._padding, mode.gather_cost = padding, float(gather_cost)
        mode.mixed = frozenset(mixed) if mixed is not None else None
        mode.pad_within_space = bool(pad_within_space)
        mode.pad_tied = bool(pad_tied)
        return mode

    @property
    def multiple(self) -> int:
        return self._padding.multiple

    def padding(self) -> "Padding":
        return self._padding

    def chosen(self, mixed: frozenset[str]) -> "BlockMode":
        """This auto mode with its mixed spaces chosen."""
        return BlockMode(str(self), self._padding, self.gather_cost, mixed, self.pad_within_space, self.pad_tied)

    def exact(self) -> "BlockMode":
        """The same mode without padding."""
        return BlockMode(str(self), 1, self.gather_cost, self.mixed, self.pad_within_space, self.pad_tied)

    def __reduce__(self):
        return BlockMode, (str(self), self._padding, self.gather_cost, self.mixed, self.pad_within_space,
                           self.pad_tied)

    def describe_padding(self) -> str:
        return describe_padding(self._padding, self.pad_tied)

    def __repr__(self) -> str:
        extra = f", gather_cost={self.gather_cost:g}" if str(self) == "auto" else ""
        extra += f", mixed={sorted(self.mixed)}" if self.mixed is not None else ""
        extra += ", pad_within_space=False" if not self.pad_within_space else ""
        extra += ", pad_tied=False" if not self.pad_tied else ""
        return f"BlockMode({str(self)!r}, {self._padding!r}{extra})"


class Padding(tuple):
    """``(multiple, min_width, min_area, min_kept)``: kept widths padded up to a multiple of
    ``multiple`` (or to the full width) in tensors at least ``min_width`` channels wide with at
    least ``min_area`` positions (H·W of a feature map, tokens of a token tensor, 1 for (batch,
    features)) that keep at least ``min_kept`` channels. Every other tensor keeps its exact width."""

    def __new__(cls, multiple: int = 1, min_width: int = 0, min_area: int = 1, min_kept: int = 0) -> "Padding":
        if type(multiple) is not int or multiple < 1:
            raise ValueError(f"the channel multiple must be a positive int, got {multiple!r}")
        if type(min_width) is not int or min_width < 0:
            raise ValueError(f"the narrowest padded width must be a non-negative int, got {min_width!r}")
        if type(min_area) is not int or min_area < 1:
            raise ValueError(f"the fewest positions of a padded tensor must be a positive int, got {min_area!r}")
        if type(min_kept) is not int or min_kept < 0:
            raise ValueError(f"the fewest kept channels of a padded tensor must be a non-negative int, "
                             f"got {min_kept!r}")
        return super().__new__(cls, (multiple, min_width, min_area, min_kept))

    def __getnewargs__(self) -> tuple:  # copies and pickles rebuild it from its four fields
        return tuple(self)

    @property
    def multiple(self) -> int:
        return self[0]

    @property
    def min_width(self) -> int:
        return self[1]

    @property
    def min_area(self) -> int:
        return self[2]

    @property
    def min_kept(self) -> int:
        return self[3]

    def applies(self, kept: int, width: int, area: int = 1) -> bool:
        """Whether ``kept`` channels of a ``width``-channel tensor of ``area`` positions are
        padded at all (an empty set never is)."""
        return kept > 0 and kept >= self.min_kept and width >= self.min_width and area >= self.min_area

    def target(self, kept: int, width: int, area: int = 1) -> int:
        """The padded count of ``kept`` channels of a ``width``-channel tensor of ``area``
        positions (0 stays 0)."""
        if not self.applies(kept, width, area):
            return kept
        return min(-(-kept // self.multiple) * self.multiple, width)

    def describe(self) -> str:
        if self.multiple == 1:
            return "exact widths"
        exact = ([f"under {self.min_width} channels"] if self.min_width else []) + \
            ([f"keeping under {self.min_kept} channels"] if self.min_kept else []) + \
            (["of (batch, features)"] if self.min_area == 2 else [f"of under {self.min_area} positions"]
             if self.min_area > 2 else [])
        return f"widths padded to multiples of {self.multiple}" + \
            (f" (tensors {' or '.join(exact)} exact)" if exact else "")

    def __repr__(self) -> str:
        return f"Padding{tuple(self)!r}"


def describe_padding(padding: Padding, pad_tied: bool = True) -> str:
    """What ``padding`` (and ``pad_tied``, :class:`BlockMode`) does to kept widths, in words."""
    return padding.describe() + ("" if pad_tied or padding.multiple == 1 else
                                 "; channels tied by a concatenation, split, shuffle or grouped conv exact")


def auto_paddings() -> tuple[Padding, ...]:
    """The paddings ``channel_multiple="auto"`` tries in turn (see :data:`AUTO_MULTIPLE`)."""
    return (Padding(AUTO_MULTIPLE, 0, AUTO_MIN_AREA), Padding(AUTO_MULTIPLE, AUTO_MIN_WIDTH, AUTO_MIN_AREA),
            Padding(AUTO_MULTIPLE, 0, AUTO_MIN_AREA, AUTO_MIN_KEPT), Padding())


#: With ``time_padding`` (the command line's default), a network kept at the first auto padding is
#: also projected with every width a multiple of :data:`AUTO_WIDE_MULTIPLE`, and the wider padding
#: is kept where it runs faster in the deploy runtime (:func:`wide_padding`). On a CPU with AVX-512,
#: onnxruntime's blocked convolutions take 16 channels at a time and leave a convolution whose
#: input width is not a multiple of 16 out of the blocked layout (converting around it):
#: squeezenet1_0, mnasnet0_5 and mobilenet_v3_small at 4× fewer FLOPs ran 1.36×, 1.36× and 1.28×
#: faster padded to 16 than to 8 (batch 16, ``benchmarks/results/deploy_speed_families/multiple_8_vs_16/``).
#: Not the first try without timing: on a small network a step of 16 channels costs accuracy
#: (ResNet-20's first stage is 16 wide), and on AVX2 CPUs and GPUs 8 is aligned already.
AUTO_WIDE_MULTIPLE = 16


def wide_padding() -> Padding:
    """The wider padding a timed ``channel_multiple="auto"`` tries too (:data:`AUTO_WIDE_MULTIPLE`)."""
    return Padding(AUTO_WIDE_MULTIPLE, 0, AUTO_MIN_AREA)


def padding_of(mode: str) -> Padding:
    """How ``mode`` pads kept widths (none for a plain mode string)."""
    return mode.padding() if isinstance(mode, BlockMode) else Padding()


def _per_graph(fn):
    """``fn(graph)`` computed once per graph, like the graph's cached properties (its layers,
    tensors and spaces do not change once built); the result is read-only."""
    key = f"_liveness_{fn.__name__}"

    @functools.wraps(fn)
    def cached(graph: ChannelGraph):
        if key not in graph.__dict__:
            value = fn(graph)
            graph.__dict__[key] = MappingProxyType(value) if isinstance(value, dict) else \
                frozenset(value) if isinstance(value, set) else value
        return graph.__dict__[key]
    return cached


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


#: Writers of a tensor from which :func:`alive_mask` gathers them all at once instead of one by
#: one (a DenseNet concatenation has dozens; with a few, the loop is faster).
GATHER_WRITERS = 5


def alive_mask(info: TensorInfo, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Boolean (slots,) aliveness for 0/1 keep-masks: a slot is alive when an always-alive
    writer or a kept channel of a group writes it (a group without a mask keeps every channel)."""
    always, by_group = info.writers
    out = always.clone()
    if len(by_group) >= GATHER_WRITERS:
        parts, slots, index = info.gathered_writers
        kept = torch.cat([torch.ones(length, dtype=torch.bool) if masks.get(gid) is None
                          else masks[gid].to("cpu", torch.bool)[:length] for gid, length in parts])
        out[slots[kept[index]]] = True
        return out
    whole = info.whole_writers
    for gid, (slots, chans) in by_group.items():
        mask = masks.get(gid)
        if mask is None:
            out[slots] = True
        elif gid in whole and mask.numel() == info.slots:
            out |= mask.to("cpu", torch.bool)
        else:
            out[slots] |= mask.to("cpu", torch.bool)[chans]
    return out


def has_alive(info: TensorInfo, masks: dict[str, torch.Tensor], nonempty: dict[str, bool] | None = None) -> bool:
    """``bool(alive_mask(info, masks).any())`` without building the mask: whether an always-alive
    writer, or a kept channel of a group, writes any slot of the tensor (the walk of
    :func:`useful_nodes` asks it of every operand of every sum). ``nonempty``, where given, is
    ``bool(masks[g].any())`` per group: a group without a kept channel is not looked at, and one
    that writes the whole tensor from all its channels is alive where it keeps one."""
    if info.always_written:
        return True
    whole = info.whole_writers
    for gid, (_, chans) in info.writers[1].items():
        mask = masks.get(gid)
        if mask is None:
            return True
        if nonempty is not None:
            if not nonempty[gid]:
                continue
            if gid in whole and mask.numel() == info.slots:
                return True
        mask = mask.to("cpu", torch.bool)
        if bool((mask[:info.slots] if gid in whole else mask[chans]).any()):
            return True
    return False


def nonempty_masks(masks: dict[str, torch.Tensor]) -> dict[str, bool]:
    """``bool(mask.any())`` per group: which keep a channel (read from purged masks, which know)."""
    if isinstance(masks, PurgedMasks):
        return masks.nonempty
    return {gid: bool(m.any()) for gid, m in masks.items()}


class PurgedMasks(dict):
    """:func:`effective_masks`' result, a dict of masks read and never changed, with what the
    cost and block searches ask of it often: ``nonempty``, which groups keep a channel, and
    ``useful``, :func:`useful_nodes`."""

    def __init__(self, masks: dict[str, torch.Tensor], nonempty: dict[str, bool], useful: set[str]):
        super().__init__(masks)
        self.nonempty = nonempty
        self.useful = useful


def effective_masks(graph: ChannelGraph, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``masks`` with the purge rules applied until nothing changes.

    Forward: a gated layer with no alive input keeps nothing (its output would be a constant
    the gates also switch off); an attention layer without output channels or input keeps no
    head, and one without heads no output channel. Backward: a gated layer whose every reader is a gated layer
    that keeps nothing is useless and goes too (a residual branch whose last conv is pruned
    takes its first conv with it). Together they remove whole blocks: automatic depth
    determination (seed 001, section 4.1). Last, a gated layer whose output reaches the network's
    output only through pruned-away layers goes as well (:func:`useful_nodes`), whatever ops lie
    between (a depthwise conv, a squeeze-and-excitation).
    """
    eff = {gid: m.detach().bool().cpu() for gid, m in masks.items()}  # read only: emptied groups are replaced
    for gid, g in graph.groups.items():
        eff.setdefault(gid, torch.ones(g.channels, dtype=torch.bool))
    kept = nonempty_masks(eff)  # kept in step with eff: the rules only empty whole groups

    def empty(gid: str) -> None:
        eff[gid] = torch.zeros_like(eff[gid])
        kept[gid] = False

    layers = list(graph.layers.values())  # in execution order
    changed = True
    while changed:
        changed = False
        for layer in layers:
            gid = layer.out_group
            if gid is None or not kept[gid]:
                continue
            if not has_alive(graph.tensors[layer.in_tensor], eff, kept):
                empty(gid)
                changed = True
        for layer in layers:  # an attention computes its heads for its output alone, and outputs nothing without them
            if layer.heads is None or not kept[layer.heads]:
                continue
            if layer.out_group is not None and not kept[layer.out_group] or \
                    not has_alive(graph.tensors[layer.in_tensor], eff, kept):
                empty(layer.heads)
                changed = True
        for layer in layers:
            if layer.heads is not None and layer.out_group is not None and not kept[layer.heads] \
                    and kept[layer.out_group]:
                empty(layer.out_group)
                changed = True
        for layer in reversed(layers):
            gid = layer.out_group
            if gid is None or not kept[gid]:
                continue
            rs = [r for r in graph.readers(gid) if not r.depthwise]
            if rs and all(r.out_group is not None and not kept[r.out_group] for r in rs):
                empty(gid)
                changed = True
        if not changed:  # what the rules by reader cannot see: outputs read through other ops
            useful = useful_nodes(graph, eff, kept)
            for name, layer in graph.layers.items():
                gid = layer.out_group
                if gid is not None and kept[gid] and name not in useful:
                    empty(gid)
                    changed = True
    return PurgedMasks(eff, kept, useful)  # the last walk saw these masks


def useful_nodes(graph: ChannelGraph, eff: dict[str, torch.Tensor],
                 nonempty: dict[str, bool] | None = None) -> set[str]:
    """The names of the traced nodes whose result reaches the network's output (``eff``: purged
    masks) and of the layers that run for it. A pruned-away layer computes nothing, so it reads
    nothing, and a sum skips an operand without an alive channel: what only those read is computed
    for nothing, and compaction removes it (an inverted residual block whose projection is pruned
    away takes its expansion, depthwise conv and squeeze-and-excitation with it; a ConvNeXt block
    whose first linear layer is, its depthwise conv). The costs leave it out too, so the budget
    counts the network compaction builds. ``nonempty``: :func:`nonempty_masks` of ``eff``, where
    the caller has it."""
    nonempty = nonempty_masks(eff) if nonempty is None else nonempty
    purged = {name for name, layer in graph.layers.items()
              if layer.out_group is not None and not nonempty[layer.out_group]}
    flow = graph.dataflow
    useful = {flow[0][0]}  # the output node
    for node, inputs, layer, is_sum in flow:
        if node not in useful:
            continue
        if layer is not None:
            useful.add(layer)
            if layer in purged:
                continue
        if is_sum:  # a residual branch without an alive channel: the compacted sum skips it
            inputs = [i for i in inputs if i not in graph.tensors or has_alive(graph.tensors[i], eff, nonempty)]
        useful.update(inputs)
    return useful


def _without_useless(graph: ChannelGraph, eff: dict[str, torch.Tensor], sets: dict[str, torch.Tensor]) -> None:
    """Empty, in place, the sets of the tensors whose result reaches no output (:func:`useful_nodes`):
    compaction computes none of their channels."""
    useful = eff.useful if isinstance(eff, PurgedMasks) else useful_nodes(graph, eff)
    for name, kept in sets.items():
        if name not in useful and name in graph.node_names and bool(kept.any()):
            sets[name] = torch.zeros_like(kept)


def slot_sets(graph: ChannelGraph, masks: dict[str, torch.Tensor], mode: str = "mixed",
              purge: bool = True) -> dict[str, torch.Tensor]:
    """Boolean (slots,) vector per tensor: the channels it keeps in the compacted network.

    An ``"auto"`` mode must name its mixed sums (:mod:`budgetprune.blocks` chooses them)."""
    kind = str(mode)
    if kind not in MODES:
        raise ValueError(f"unknown block mode '{mode}': choose one of {', '.join(MODES)}")
    eff = effective_masks(graph, masks) if purge else masks
    padding = padding_of(mode)
    within, tied = getattr(mode, "pad_within_space", True), getattr(mode, "pad_tied", True)
    if kind == "mixed":
        return mixed_sets(graph, eff, padding, within_space=within, pad_tied=tied)
    if kind == "regular":
        return regular_sets(graph, eff, padding, pad_tied=tied)
    chosen = getattr(mode, "mixed", None)
    if chosen is None:
        raise ValueError("internal error: an auto block mode reached slot_sets before its sums were chosen")
    alive = alive_sets(graph, eff)
    return combine_sets(graph, regular_sets(graph, eff, padding, alive, pad_tied=tied),
                        mixed_sets(graph, eff, padding, alive, within_space=within, pad_tied=tied), chosen)


def kept_counter() -> Callable[[torch.Tensor], int]:
    """``count(vector)``: the channels a set keeps, ``int(vector.sum())``, each vector summed once
    (the sets share vectors; the vectors must outlive the counter)."""
    counted: dict[int, int] = {}

    def count(vector: torch.Tensor) -> int:
        if id(vector) not in counted:
            counted[id(vector)] = int(vector.sum())
        return counted[id(vector)]
    return count


def alive_sets(graph: ChannelGraph, eff: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Boolean (slots,) aliveness of every tensor for the purged masks ``eff``, to read: tensors
    passed through unchanged share one vector (copy them to change one)."""
    shared: dict[int, torch.Tensor] = {}  # tensors passed through unchanged share their segments
    sets = {}
    for name, info in graph.tensors.items():
        key = id(info.segments)
        if key not in shared:
            shared[key] = alive_mask(info, eff)
        sets[name] = shared[key]
    _without_useless(graph, eff, sets)
    return sets


def _members(graph: ChannelGraph) -> dict[str, list[str]]:
    members = defaultdict(list)
    for name, space in graph.spaces.items():
        members[space].append(name)
    return members


def mixed_sets(graph: ChannelGraph, eff: dict[str, torch.Tensor], padding: Padding = Padding(),
               alive: dict[str, torch.Tensor] | None = None, within_space: bool = True,
               pad_tied: bool = True) -> dict[str, torch.Tensor]:
    """Mixed blocks: each tensor keeps its alive channels (``eff``: purged masks; ``alive``: their
    :func:`alive_sets` if already computed), padded as ``padding`` asks, tensor by tensor
    (:func:`_pad_mixed`; ``within_space``: with its space's other channels first; ``pad_tied``:
    a grouped convolution's tied channels too)."""
    sets = dict(alive_sets(graph, eff) if alive is None else alive)  # vectors are replaced, not written
    if padding.multiple > 1:
        _pad_mixed(graph, sets, padding, within_space, pad_tied)
        _without_useless(graph, eff, sets)
    return sets


def regular_sets(graph: ChannelGraph, eff: dict[str, torch.Tensor], padding: Padding = Padding(),
                 alive: dict[str, torch.Tensor] | None = None, pad_tied: bool = True) -> dict[str, torch.Tensor]:
    """Regular blocks: the tensors of a space keep one set, the union of their alive channels
    (``eff``: purged masks; ``alive`` as in :func:`mixed_sets`), widened where concatenations,
    splits and shuffles tie positions (:func:`_tie_positions`), then padded as ``padding`` asks
    (:func:`_pad_widths`). Padding a tensor tied by position widens the tensors it is tied to,
    so the two alternate until nothing changes (each round only adds channels, so they end;
    ``pad_tied`` False, as plans before version 5: tied tensors stay exact)."""
    sets = dict(alive_sets(graph, eff) if alive is None else alive)  # vectors are replaced, not written
    members = _members(graph)
    _tie_positions(graph, sets)
    if padding.multiple == 1:
        _without_useless(graph, eff, sets)
        _without_dead(graph, eff, sets)
        return sets
    exact, periods = _padded_spaces(graph, pad_tied, positions=True)
    by_position = position_tied_spaces(graph) - exact
    computed = _computed_slots(graph, eff, members, by_position)
    while _pad_widths(graph, sets, members, padding, exact, periods, computed) & by_position:
        _tie_positions(graph, sets)  # carried across the ties
    _without_useless(graph, eff, sets)
    _without_dead(graph, eff, sets)
    return sets


def _without_dead(graph: ChannelGraph, eff: dict[str, torch.Tensor], sets: dict[str, torch.Tensor]) -> None:
    """Empty, in place, the sets of the tensors none of whose writers is alive (a pruned-away
    layer's output, and what passes it on), which a regular block would keep for the width of
    their space: they carry zeros, and their sums skip them (:func:`budgetprune.compact.compact`).
    Tensors whose positions are tied keep their sets (a dead split piece may carry padding that
    live layers compute as zeros), except a part of a concatenation whose positions, in the
    concatenation and in what passes it on unchanged, nothing else ties: those positions go with
    it, as in mixed blocks (Res2Net: a pruned-away scale's output is added to the next piece and
    concatenated)."""
    nonempty = nonempty_masks(eff)
    if all(nonempty.values()):
        return  # no layer pruned away: an untied tensor is dead only where all its writers are
    alive: dict[int, bool] = {}  # per segments: tensors passed through unchanged are alive together

    def is_alive(info: TensorInfo) -> bool:
        key = id(info.segments)
        if key not in alive:
            alive[key] = has_alive(info, eff, nonempty)
        return alive[key]

    dead = {name for name, kept in sets.items()
            if name in graph.tensors and not is_alive(graph.tensors[name]) and bool(kept.any())}
    if not dead:
        return
    by_split = {t for src, pieces in graph.splits.values() for t in (src, *pieces)} | \
        {t for out, (src, _) in graph.gathers.items() for t in (out, src)}
    parts_of = {p: out for out, parts in graph.cats.items() for p in parts}
    segments = {name: id(graph.tensors[name].segments) for name in dead}  # a tensor and what passes it on
    tied = {id(graph.tensors[t].segments) for t in by_split | parts_of.keys() | graph.cats.keys()}
    for name in dead:
        if segments[name] not in tied:
            sets[name] = torch.zeros_like(sets[name])
    members = _members(graph)
    for out, parts in graph.cats.items():
        chain = members.get(graph.spaces.get(out), [out])
        if not dead.intersection(parts) or by_split.intersection(chain) or \
                any(t in parts_of or (t in graph.cats and t != out) for t in chain) or \
                any(graph.tensors[t].segments is not graph.tensors[out].segments for t in chain) or \
                sets[out].numel() != sum(sets[p].numel() for p in parts):
            continue
        start = 0
        for part in parts:
            n = sets[part].numel()
            if part in dead and part not in by_split:
                for name in dead:  # the part, and the dead tensors that pass it on
                    if segments[name] == segments[part]:
                        sets[name] = torch.zeros_like(sets[name])
                for t in chain:  # a new vector: sets share theirs, none is written in place
                    cut = sets[t].clone()
                    cut[start:start + n] = False
                    sets[t] = cut
            start += n


def _computed_slots(graph: ChannelGraph, eff: dict[str, torch.Tensor], members: dict[str, list[str]],
                    spaces: set[str]) -> dict[str, torch.Tensor]:
    """Per space of ``spaces``: the slots a tensor of it computes in the compacted network, those
    an always-alive writer or a layer that keeps a channel writes (``eff``: purged masks). A layer the
    purge rules removed computes nothing, not even the zeros of a padded channel, so a slot only such
    layers write cannot pad a tensor: a ShuffleNet unit whose branch is pruned away must not come back
    because the concatenation after it was padded with that branch's half. Where no layer is
    pruned away, every space may pad with any of its channels (an empty dict)."""
    live = {gid: m.any().expand(m.numel()) for gid, m in eff.items()}
    if all(bool(m[0]) for m in live.values() if m.numel()):
        return {}
    computed = {}
    for space in spaces:
        slots = [alive_mask(graph.tensors[name], live) for name in members[space]]
        computed[space] = torch.stack(slots).any(0)
    return computed


def _tie_positions(graph: ChannelGraph, sets: dict[str, torch.Tensor]) -> None:
    """Widen ``sets`` in place until the tensors of a space keep one set and every concatenation,
    split and channel shuffle keeps the same channels on both sides: a slot is kept where any
    slot of its class is (:attr:`budgetprune.graph.ChannelGraph.tied_positions`)."""
    names, labels, classes = graph.tied_positions
    flat = torch.cat([sets[n] for n in names])
    labels = labels.to(flat.device)
    kept = torch.zeros(classes, dtype=torch.bool, device=flat.device)
    kept[labels[flat]] = True
    for name, part in zip(names, torch.split(kept[labels], _tied_sizes(graph))):
        sets[name] = part  # disjoint pieces of one new vector


@_per_graph
def _tied_sizes(graph: ChannelGraph) -> tuple[int, ...]:
    """The slots of each tensor of :attr:`~budgetprune.graph.ChannelGraph.tied_positions`, in order."""
    return tuple(graph.tensors[n].slots for n in graph.tied_positions[0])


def _spaces_of(graph: ChannelGraph, tensors) -> set[str]:
    return {graph.spaces[t] for t in tensors if t in graph.spaces}


@_per_graph
def position_tied_spaces(graph: ChannelGraph) -> set[str]:
    """Spaces whose channel positions are tied to another tensor's by a concatenation, split or
    channel shuffle."""
    tied = set()
    for name, parts in graph.cats.items():
        tied.update((name, *parts))
    for src, pieces in graph.splits.values():
        tied.update((src, *pieces))
    for out, (src, _) in graph.gathers.items():
        tied.update((out, src))
    return _spaces_of(graph, tied)


@_per_graph
def grouped_periods(graph: ChannelGraph) -> dict[str, int]:
    """The spaces a grouped convolution's tied channels write (each conv group keeps the same
    positions: :attr:`budgetprune.graph.ChannelGroup.units`), with the period of their ties."""
    grouped = {gid: g.tie_period for gid, g in graph.groups.items() if g.units < g.channels}
    periods: dict[str, int] = {}
    for name, info in graph.tensors.items():
        for gid in info.sources() & grouped.keys():
            space = graph.spaces.get(name)
            if space is not None:
                periods[space] = math.gcd(periods.get(space, 0), grouped[gid])
    return periods


@_per_graph
def tied_spaces(graph: ChannelGraph) -> set[str]:
    """Spaces whose channel positions are tied: by a concatenation, split or channel shuffle
    (:func:`position_tied_spaces`), an attention's heads, or a grouped convolution
    (:func:`grouped_periods`). They keep regular widths in every block mode."""
    return position_tied_spaces(graph) | _head_spaces(graph) | set(grouped_periods(graph))


def has_tied_channels(graph: ChannelGraph) -> bool:
    """Whether ``graph`` has channels tied by position or by a grouped convolution: the ones a
    padding with ``pad_tied`` pads (plan version 5) and finalize may fall back to leave exact."""
    return bool(position_tied_spaces(graph) or grouped_periods(graph))


@_per_graph
def _head_spaces(graph: ChannelGraph) -> set[str]:
    return _spaces_of(graph, (layer.heads_tensor for layer in graph.layers.values() if layer.heads))


def _padded_spaces(graph: ChannelGraph, pad_tied: bool, positions: bool) -> tuple[set[str], dict[str, int]]:
    """``(spaces left exact, grouped spaces padded per conv group with their period)``.

    An attention's heads stay whole. With ``pad_tied`` False (plans before version 5) every tied
    space stays exact. Otherwise a grouped space pads per conv group unless positions tie it as
    well, and a space tied by position is padded when ``positions`` (regular blocks, where the
    ties carry the padding across: :func:`regular_sets`)."""
    grouped, by_position, heads = grouped_periods(graph), position_tied_spaces(graph), _head_spaces(graph)
    if not pad_tied:
        return set(grouped) | by_position | heads, {}
    periods = {space: p for space, p in grouped.items() if space not in by_position | heads}
    return heads | (set(grouped) - set(periods)) | (set() if positions else by_position), periods


def combine_sets(graph: ChannelGraph, regular: dict[str, torch.Tensor], mixed: dict[str, torch.Tensor],
                 chosen: frozenset[str]) -> dict[str, torch.Tensor]:
    """Per space: the mixed sets of the spaces in ``chosen``, the regular ones elsewhere (a space
    tied by a concatenation, split or shuffle is always regular); the given vectors, not copies."""
    keep_mixed = set(chosen) - tied_spaces(graph)
    return {name: (mixed if graph.spaces[name] in keep_mixed else regular)[name] for name in regular}


def _padded(kept: torch.Tensor, padding: Padding, area: int, prefer: torch.Tensor | None = None,
            allowed: torch.Tensor | None = None) -> torch.Tensor:
    """``kept`` (of a tensor of ``area`` positions) with other channels added until its count is
    what ``padding`` asks (:meth:`Padding.target`: a multiple, or the full width; an empty set
    stays empty, a tensor the padding leaves alone exact): those in ``prefer`` first, then the
    lowest-numbered others; only channels in ``allowed`` (None: any), and none where too few are."""
    n = int(kept.sum())
    target = padding.target(n, kept.numel(), area)
    if target == n:
        return kept
    padded = kept.clone()
    free = ~kept if allowed is None else ~kept & allowed
    if int(free.sum()) < target - n:
        return kept
    order = torch.nonzero(free).flatten() if prefer is None else \
        torch.cat([torch.nonzero(free & prefer).flatten(), torch.nonzero(free & ~prefer).flatten()])
    padded[order[:target - n]] = True
    return padded


def _padded_per_group(kept: torch.Tensor, padding: Padding, area: int, period: int) -> torch.Tensor:
    """``kept`` of a grouped convolution's tied channels (the same positions in each conv group of
    ``period`` channels) with positions added in every group alike until each group keeps a
    multiple of ``padding.multiple`` (or all of its ``period``), the lowest-numbered first.

    The runtime's fast grouped convolution needs each group's width aligned, not only the total:
    in onnxruntime (CPU, one thread, batch 16) RegNet-X blocks whose 10 or 25 conv groups of 16
    kept 8 channels each ran at 0.80–0.91 of their FLOP reduction, kept 4 or 6 at 0.50–0.67, also
    where the total (40 channels) was a multiple of 8 (``benchmarks/grouped_conv_speed.py``).
    A period that is not a multiple of the padding's (e.g. ResNeXt's 4 channels per group) or a
    set not alike in every group stays exact."""
    n = int(kept.sum())
    if period % padding.multiple or not padding.applies(n, kept.numel(), area):
        return kept
    rows = kept.view(-1, period)
    first = rows[0]
    if not bool((rows == first).all()):
        return kept
    one = _padded(first, Padding(padding.multiple), 1)
    return kept if one is first else one.repeat(rows.shape[0])


def _pad_widths(graph: ChannelGraph, sets: dict[str, torch.Tensor], members: dict, padding: Padding,
                exact: set[str], periods: dict[str, int], computed: dict[str, torch.Tensor]) -> set[str]:
    """Pad each space's kept channels (regular blocks: one set per space) as ``padding`` asks (a
    multiple, or the full width), with the lowest-numbered channels it does not keep (they
    compute zeros, as a regular block's extra channels do), in place; the spaces that grew.
    A space in ``computed`` pads only with the channels its layers compute (:func:`_computed_slots`)
    and stays exact where too few are. Spaces in ``exact`` keep their widths; those in ``periods``,
    a grouped convolution's tied channels, pad per conv group (:func:`_padded_per_group`); see
    :func:`_padded_spaces`."""
    grew = set()
    for space, names in members.items():
        if space in exact:
            continue
        area = _area(graph, names)
        padded = _padded_per_group(sets[names[0]], padding, area, periods[space]) if space in periods else \
            _padded(sets[names[0]], padding, area, allowed=computed.get(space))
        if padded is not sets[names[0]]:
            grew.add(space)
            for name in names:
                sets[name] = padded.clone()
    return grew


def _area(graph: ChannelGraph, names: list[str]) -> int:
    """The most positions among tensors that keep one set of channels (a pooled map shares the
    set of the map it pools): they are padded alike."""
    return max(graph.tensors[name].area for name in names)


def channel_sums(graph: ChannelGraph) -> list[tuple[str, tuple[str, ...]]]:
    """``(result, operands)`` for each add or product whose result shares a space with operands
    it does not pass through unchanged (residual sums, channel scales), in execution order: under
    mixed blocks the result keeps every channel those operands keep."""
    sums = []
    for node in graph.gm.graph.nodes:
        info = graph.tensors.get(node.name)
        if info is None or not (node.op == "call_function" and node.target in ADD_FUNCTIONS | MUL_FUNCTIONS
                                or node.op == "call_method" and node.target in ("add", "sub", "mul")):
            continue
        operands = tuple(a.name for a in node.all_input_nodes if a.name in graph.tensors
                         and graph.spaces.get(a.name) == graph.spaces[node.name]
                         and graph.tensors[a.name].segments is not info.segments)
        if operands:
            sums.append((node.name, operands))
    return sums


def _pad_mixed(graph: ChannelGraph, sets: dict[str, torch.Tensor], padding: Padding,
               within_space: bool = True, pad_tied: bool = True) -> None:
    """Pad each tensor's kept channels (mixed blocks) as ``padding`` asks (a multiple, or its
    full width), in place. Tensors passed through unchanged keep one set; a sum keeps every channel
    its operands keep (widened, then padded again, in execution order), so every mixed sum
    still adds a subset of its result's channels. Spaces tied by a concatenation, split or
    shuffle, and an attention's heads, keep their widths; a grouped convolution's tied channels pad
    per conv group (:func:`_padded_per_group`; ``pad_tied`` False: exact).

    ``within_space``: a tensor pads first with channels other tensors of its residual space keep
    (their union ``U``), then with the lowest-numbered others, the channels a regular block pads
    ``U`` with; so every padded set, and every sum of them, stays within the regular block's
    padded set, and a mixed block never keeps more than a regular one. Otherwise (plans before
    version 4) it pads with its own lowest-numbered free channels, which the sums then add up."""
    tied, periods = _padded_spaces(graph, pad_tied, positions=False)
    union: dict[str, torch.Tensor] = {}
    if within_space:
        for name, s in sets.items():
            space = graph.spaces[name]
            union[space] = union[space] | s if space in union else s.clone()
    units: dict[int, list[str]] = defaultdict(list)
    for name, info in graph.tensors.items():
        if graph.spaces[name] not in tied:
            units[id(info.segments)].append(name)
    unit_of = {name: key for key, names in units.items() for name in names}
    for names in units.values():
        space = graph.spaces[names[0]]
        padded = _padded_per_group(sets[names[0]], padding, _area(graph, names), periods[space]) \
            if space in periods else _padded(sets[names[0]], padding, _area(graph, names), union.get(space))
        for name in names:
            sets[name] = padded.clone()
    for _ in range(100):
        changed = False
        for out, operands in channel_sums(graph):
            if out not in unit_of or graph.spaces[out] in periods:
                continue
            need = sets[out].clone()
            for op in operands:
                need |= sets[op]
            if torch.equal(need, sets[out]):
                continue
            grown = _padded(need, padding, _area(graph, units[unit_of[out]]), union.get(graph.spaces[out]))
            for name in units[unit_of[out]]:
                sets[name] = grown.clone()
            changed = True
        if not changed:
            return
    raise RuntimeError("internal error: padded mixed-block widths did not settle")
