"""The channel graph: what in a model can be pruned, and what a pruned channel removes.

A model is traced with ``torch.fx`` and its shapes are propagated from an example input.
Every conv/linear layer whose output channels can be switched off becomes a *channel group*
with one gate per channel. The gate multiplies the output of the group's *host*: the affine
BatchNorm right after the layer if there is one, else the layer itself (seed 001 gates
feature maps; Louizos et al. also gate an MLP's input features).

Every tensor of the forward pass is described by *slots* (its channels, or features before a
flatten) and, for each slot, the gated channels that can write a non-zero value into it:

* an activation, pooling or dropout keeps its input's slots (they map 0 to 0);
* a residual ``add`` writes both inputs into the same slots, so a slot of the sum is alive
  when *any* writer is (this is what lets a block refine a subset of the residual signal or
  add new maps: the mixed-connectivity block of seed 001, section 4.2 and supplement 2);
* a ``cat`` places its inputs side by side; a depthwise conv works slot by slot; a
  squeeze-and-excitation ``mul`` keeps the slots of the scaled tensor; a flatten turns each
  channel into H·W features;
* channels may live in the last dim (tokens (N, L, C), channels-last maps): ``permute``,
  ``transpose`` and ``swapaxes`` move them there and back, and a reshape that keeps the batch
  and the channel dim (MaxViT's windows) regroups the rest; linear layers, element-wise ops,
  residual adds, a mean over the tokens and a LayerNorm over the channels (:class:`Norm`) work
  there, and so do attention layers (:mod:`budgetprune.attention`: ``nn.MultiheadAttention``,
  Swin's and MaxViT's), layers of kind ``"attention"`` whose heads are a group of their own; a
  parameter read across the channels (a layer scale, a class token, a position embedding:
  :class:`ChannelParameter`) is sliced with them;
* an op the graph does not know is run on random inputs (:mod:`budgetprune.probe`): passed
  through when it works channel by channel, a gather when each output channel copies one input
  channel (Swin's patch merging).

An op that maps 0 to a non-zero value (a BatchNorm that is not a gate host, e.g. the
pre-activation BN of a Wide-ResNet block, a sigmoid, a bias, a LayerNorm, an added position
embedding) is a *renormaliser*: the gates also multiply its output by the slot's aliveness, so
a dead channel is zero everywhere and removing it is exact. A function is masked at the output
of the module that returns it or first reads it (:meth:`ChannelGraph.mask_site`).

A slot can be removed when it is not alive. A group whose removal could cut every path from
input to output (a layer of a chain, the 1×1 shortcut conv of a ResNet pooling block:
seed 001, section 4.1, "fatal pruning") keeps at least one channel. A grouped convolution
ties the channels it reads and writes across its groups (:attr:`ChannelGroup.units`), so each
group keeps the same positions. Anything the graph cannot handle — a channel-mixing reshape,
an unknown operation —
leaves the layers that feed it ungated, listed with the reason in :meth:`ChannelGraph.summary`.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from . import attention, layer_subclasses, norm_act, notrace
from .attention import Attention
from .errors import GraphError, first_line
from .fx_registry import forget_unused_wraps
from .probe import probe_channel_map, probe_channelwise

#: Modules and functions that map 0 to 0 channel by channel.
ZERO_PRESERVING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardswish, nn.Mish, nn.Identity,
    nn.Dropout, nn.Dropout2d, nn.Hardtanh, nn.Softsign, nn.Tanhshrink, nn.PReLU,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool1d, nn.AvgPool1d,
)
ZERO_PRESERVING_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, torch.tanh, F.hardswish, F.mish,
    F.dropout, F.dropout2d, F.hardtanh, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, operator.neg, torch.neg,
}
ZERO_PRESERVING_METHODS = {"relu", "tanh", "contiguous", "clone", "detach", "neg", "relu_"}
#: Channel-wise ops that map 0 to something else: their output is masked by aliveness.
#: Of those, the ones that work element by element on any layout (not poolings over the last dims).
POOLING_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool1d, nn.AvgPool1d)
POOLING_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
RENORMALISING_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.SELU, nn.CELU)
RENORMALISING_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus, F.selu, F.celu}
RENORMALISING_METHODS = {"sigmoid"}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
FLATTEN_METHODS = {"view", "reshape", "flatten"}
SHAPE_METHODS = {"size", "dim"}

ALWAYS = None  # the "writer" of a slot that is always alive (input image, ungated layer, bias)


@dataclass(frozen=True)
class Segment:
    """Slots ``start .. start+length`` of a tensor and who can write them.

    ``sources`` holds ``(group, offset)`` pairs: slot ``start + j`` receives channel
    ``offset + j`` of ``group``; a ``(None, 0)`` source means the slots are always alive.
    """

    start: int
    length: int
    sources: tuple[tuple[str | None, int], ...]


@dataclass
class TensorInfo:
    """One tensor of the forward pass, by slots (channels; features = slots × expansion)."""

    node: str
    slots: int
    area: int  # H·W of a feature map (1 for a (batch, features) tensor)
    expansion: int = 1  # features per slot after a flatten
    segments: tuple[Segment, ...] = ()
    scale: bool = False  # a squeeze-and-excitation scale: it follows the tensor it multiplies
    dim: int = 1  # where the channels are: 1 (N, C, H, W), or -1 (tokens (N, L, C), channels-last maps)

    def sources(self) -> set[str]:
        return {g for s in self.segments for g, _ in s.sources if g is not ALWAYS}

    @cached_property
    def writers(self) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """The segments as index arrays, for vectorised aliveness: a bool (slots,) of the slots an
        always-alive writer reaches, and per group the slots it writes and the channels it writes
        them from (each slot at most once per group)."""
        always = torch.zeros(self.slots, dtype=torch.bool)
        by_group: dict[str, tuple[list, list]] = {}
        for seg in self.segments:
            for gid, off in seg.sources:
                if gid is ALWAYS:
                    always[seg.start:seg.start + seg.length] = True
                else:
                    slots, chans = by_group.setdefault(gid, ([], []))
                    slots.append(torch.arange(seg.start, seg.start + seg.length))
                    chans.append(torch.arange(off, off + seg.length))
        return always, {gid: (torch.cat(sl), torch.cat(ch)) for gid, (sl, ch) in by_group.items()}

    @cached_property
    def always_written(self) -> bool:
        """Whether an always-alive writer reaches some slot (the tensor is then never dead)."""
        return bool(self.writers[0].any())

    @cached_property
    def whole_writers(self) -> frozenset[str]:
        """The groups that write every slot of the tensor from their channel of the same index (a
        layer's own output, passed on unchanged): their aliveness is their mask as it is."""
        _, by_group = self.writers
        whole = torch.arange(self.slots)
        return frozenset(gid for gid, (slots, chans) in by_group.items()
                         if torch.equal(slots, whole) and torch.equal(chans, whole))

    @cached_property
    def gathered_writers(self) -> tuple[tuple[tuple[str, int], ...], torch.Tensor, torch.Tensor]:
        """:attr:`writers` as one gather: ((group, channels read), ...) in order, the slot each
        read reaches and its index into the groups' masks cut to those lengths and concatenated
        (:func:`budgetprune.liveness.alive_mask` then needs one cat and one index per tensor,
        not a pass per group: a DenseNet concatenation has dozens of writers)."""
        _, by_group = self.writers
        parts, slots, index, offset = [], [], [], 0
        for gid, (sl, ch) in by_group.items():
            length = int(ch.max()) + 1
            parts.append((gid, length))
            slots.append(sl)
            index.append(ch + offset)
            offset += length
        empty = torch.zeros(0, dtype=torch.long)
        return tuple(parts), torch.cat(slots) if slots else empty, torch.cat(index) if index else empty

    def always_alive(self) -> bool:
        return all(any(g is ALWAYS for g, _ in s.sources) for s in self.segments)


@dataclass
class ChannelGroup:
    """The output channels of one layer (or an MLP's input features), one gate each.

    ``position`` is ``"output"`` (the gate multiplies the host's output), ``"input"`` (it
    multiplies the host's input) or ``"heads"`` (one gate per head of an attention layer, on its
    values: :mod:`budgetprune.attention`). ``min_keep`` is 1 where removing every channel could cut
    the network (the fatal-pruning guard) and 0 where the whole group may go (a residual
    branch: automatic depth determination). ``shared`` is True when other groups write the
    same slots (the last conv of a residual branch adds into the residual signal).
    """

    id: str
    channels: int
    area: int
    host: str
    position: str = "output"
    producer: str | None = None
    consumers: list[str] = field(default_factory=list)
    min_keep: int = 1
    shared: bool = False
    tie_period: int = 0
    dim: int = 1  # the host output's channel dim: 1, or -1 for a linear layer over tokens / channels-last

    def __post_init__(self):
        if not self.tie_period:
            self.tie_period = self.channels

    @property
    def units(self) -> int:
        """Independent gates: channels ``c`` and ``c'`` share one when ``c ≡ c' (mod tie_period)``.

        A grouped convolution can only be compacted into a grouped convolution when each of its
        groups keeps the same positions, so the channels it reads (and its own outputs) are tied
        across its groups (Torch-Pruning's rule for grouped convs): ``tie_period`` is the
        channels per conv group, and every untied group has ``tie_period == channels``."""
        return self.tie_period

    def unit_of(self, device=None) -> torch.Tensor:
        """The gate unit of each channel: ``c mod tie_period``."""
        return torch.arange(self.channels, device=device) % self.tie_period

    def expand(self, values: torch.Tensor) -> torch.Tensor:
        """Per-unit values (..., units) as per-channel values (..., channels); per-channel values unchanged."""
        if self.tie_period == self.channels or values.shape[-1] == self.channels:
            return values
        return values[..., self.unit_of(values.device)]

    def members(self, channel: int) -> tuple[int, ...]:
        """The channels tied to ``channel`` (itself included), in order."""
        return tuple(range(channel % self.tie_period, self.channels, self.tie_period))


@dataclass(frozen=True)
class ChannelParameter:
    """A parameter read across a tensor's channels (ConvNeXt's layer scale, a LayerNorm's weight):
    compaction keeps its entries along ``axis`` for the channels ``tensor`` keeps."""

    path: str  # the parameter's qualified name in the model
    tensor: str  # the tensor whose channels it runs over
    axis: int  # its dim that runs over those channels


@dataclass(frozen=True)
class Norm:
    """A LayerNorm over a tensor's channels (the last dim): each channel's output depends on the
    mean and variance of all of them. A pruned channel is zero in the gated network, so its
    statistics count it as a zero; the compacted network keeps that count
    (:func:`budgetprune.ops.full_count_layer_norm`) and computes exactly what the gated one does."""

    node: str
    tensor: str  # what it normalises
    channels: int  # how many channels its statistics divide by: the unpruned count
    weight: str  # parameter paths
    bias: str | None
    eps: float
    module: str | None = None  # an nn.LayerNorm's name, or None for F.layer_norm


@dataclass
class Layer:
    """A conv or linear layer: what it reads, what it writes, and its cost coefficients."""

    name: str
    kind: str  # "conv" | "linear" | "attention"
    in_tensor: str  # TensorInfo key of its input
    out_tensor: str  # TensorInfo key of its output (after the host BatchNorm for a gated layer)
    in_features: int
    out_channels: int
    out_area: int
    kernel_area: int = 1
    out_group: str | None = None
    depthwise: bool = False
    bias: bool = True
    batchnorms: list[str] = field(default_factory=list)  # host BatchNorms folded with this layer
    groups: int = 1  # a grouped (not depthwise) convolution: each output reads in_features / groups inputs
    follows: str | None = None  # a squeeze-and-excitation scale: keeps the channels of the tensor it multiplies
    attention: Attention | None = None  # kind "attention": its shape and projections
    heads: str | None = None  # kind "attention": the group gating its heads (its tensor: :attr:`heads_tensor`)

    @property
    def heads_tensor(self) -> str:
        """The tensor of an attention layer's heads, one slot per head (no node computes it alone)."""
        return f"{self.out_tensor}:heads"


class ChannelGraph:
    """Prunable channel groups, layers and tensors of a traced model.

    Build it with :meth:`ChannelGraph.build`; ``print(graph.summary())`` shows what is
    prunable and why the rest is not.
    """

    def __init__(self, gm: fx.GraphModule, tensors: dict[str, TensorInfo], layers: dict[str, Layer],
                 groups: dict[str, ChannelGroup], renormalisers: dict[str, str], ungated: dict[str, str],
                 input_shape: tuple[int, ...], spaces: dict[str, str], cats: dict[str, list[str]],
                 splits: dict[str, tuple[str, list[str]]] | None = None,
                 gathers: dict[str, tuple[str, torch.Tensor]] | None = None,
                 params: dict[str, ChannelParameter] | None = None, norms: dict[str, Norm] | None = None,
                 mask_sites: dict[str, tuple[str, str]] | None = None, computed_gathers: set[str] | None = None):
        self.gm = gm
        self.tensors = tensors
        self.layers = layers
        self.groups = groups
        self.renormalisers = renormalisers  # node name -> what it is, for the summary
        self.ungated = ungated
        self.input_shape = input_shape
        self.spaces = spaces  # tensor -> the set of tensors that must keep equal width in a regular block
        self.cats = cats  # tensor made by torch.cat -> the tensors it joins, in order
        self.splits = splits or {}  # chunk/split node -> (the tensor it splits, its pieces in order)
        self.gathers = gathers or {}  # channel shuffle or slice output -> (its input, input slot of each output slot)
        self.computed_gathers = computed_gathers or set()  # gathers an op computes (probed): compaction keeps the op
        self.params = params or {}  # parameter path -> the tensor whose channels it is sliced with
        self.norms = norms or {}  # LayerNorm node -> what compaction keeps of its statistics
        self.mask_sites = mask_sites or {}  # function renormaliser -> (module whose output is masked, its tensor)
        self.measured_flops: float | None = None  # MACs per example torch's counter counts in the whole model
        self.latency_batch = 1  # examples per call at which latency metrics time its layers (the deployment's batch)

    # -- construction -----------------------------------------------------------------
    @classmethod
    def build(cls, model: nn.Module, example_input: torch.Tensor, gate_inputs: bool = False) -> "ChannelGraph":
        """Trace ``model``, propagate shapes from ``example_input`` and find channel groups.

        ``gate_inputs`` adds a group for the input features of a network whose first layer
        is a linear layer (an MLP), so input pixels can be pruned too.
        """
        modes = [(m, m.training) for m in model.modules()]  # the user's, module by module (a frozen BN stays in eval)
        model.eval()  # traced as it will be compacted and checked: training-only branches (dropout, drop path) out
        try:
            gm = trace(model)
        except BaseException:
            _restore_modes(modes)
            raise
        try:
            # the first call counts the MACs (in eval mode, as compacted); where the counter cannot run
            # it, a plain call (ShapeProp prints a traceback of its own on failure)
            measured = _measured_macs(gm, example_input)
            with torch.no_grad():
                if measured is None:
                    gm(example_input)
                ShapeProp(gm).propagate(example_input)
        except Exception as exc:  # shape mismatch, wrong channel count, ...
            raise GraphError(
                f"the example input of shape {tuple(example_input.shape)} does not fit "
                f"{type(model).__name__}: {first_line(exc, 300)}; pass an input of the shape the model expects"
            ) from None
        finally:
            _restore_modes(modes)
        graph = _Builder(gm, dict(model.named_modules()), gate_inputs, tuple(example_input.shape[1:])).build()
        for name, why in layer_subclasses.refused(model).items():  # traced through: no layer of the graph
            graph.ungated.setdefault(name, why)
        graph.measured_flops = measured
        return graph

    # -- queries ----------------------------------------------------------------------
    def mask_site(self, node: str) -> tuple[str, str]:
        """Where the gates mask a renormaliser's output: (a module, the tensor it returns). A
        module renormaliser is masked at its own output; a function (``F.layer_norm`` inside a
        ``LayerNorm2d``) at the output of the innermost module that returns it."""
        if node in self.mask_sites:
            return self.mask_sites[node]
        target = next(n.target for n in self.gm.graph.nodes if n.name == node)
        return target, node

    def filter_rows(self, gid: str) -> list[tuple[str, torch.Tensor]]:
        """The parameters (paths) whose rows (dim 0) belong to one channel each of an output group,
        with the channel of each row: its layer's weight and bias; an attention layer's output
        projection; for an attention's heads, the query, key and value rows of each head (row r of
        ``W_qkv`` is head (r mod E) // d)."""
        group = self.groups[gid]
        layer = self.layers[group.producer]
        if layer.kind != "attention":
            module = self.gm.get_submodule(layer.name)
            paths = [f"{layer.name}.{attr}" for attr in ("weight", "bias") if getattr(module, attr, None) is not None]
            return [(path, torch.arange(group.channels)) for path in paths]
        spec = layer.attention
        if group.position == "heads":
            rows = torch.arange(3 * spec.embed_dim) % spec.embed_dim // spec.head_dim
            return [(path, rows) for path in (spec.qkv_weight, spec.qkv_bias) if path is not None]
        return [(path, torch.arange(group.channels)) for path in (spec.proj_weight, spec.proj_bias)
                if path is not None]

    def layer_of_group(self, gid: str) -> Layer | None:
        g = self.groups[gid]
        return self.layers.get(g.producer) if g.producer else None

    def readers(self, gid: str) -> list[Layer]:
        """Layers whose input has slots written by ``gid``."""
        return self._readers[gid]

    @cached_property
    def tied_positions(self) -> tuple[list[str], torch.Tensor, int]:
        """``(tensors, class of each slot, number of classes)``: the slots of ``tensors`` (those
        tied to another), laid end to end in that order, numbered by which must keep the same
        channel in a regular block.
        Slot i of the tensors of a space (:attr:`spaces`) is one position; so are a concatenation's
        (or split's) slot and the piece's slot it joins, and a channel shuffle's output slot and the
        input slot it reads. The classes are the connected positions (label propagation with
        pointer jumping over those identifications)."""
        counts: dict[str, int] = defaultdict(int)
        for space in self.spaces.values():
            counts[space] += 1
        joined = {t for name, parts in list(self.cats.items()) + list(self.splits.values()) for t in (name, *parts)}
        joined |= {t for out, (src, _) in self.gathers.items() for t in (out, src)}
        names = [t for t in self.tensors if t in joined or counts.get(self.spaces.get(t), 0) > 1]  # the others: alone
        offset, start = {}, 0
        for name in names:
            offset[name] = start
            start += self.tensors[name].slots
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

        def tie(a: str, a_slots: torch.Tensor, b: str, b_slots: torch.Tensor) -> None:
            pairs.append((offset[a] + a_slots, offset[b] + b_slots))

        first: dict[str, str] = {}
        for name, space in self.spaces.items():
            if name in offset:
                lead = first.setdefault(space, name)
                if lead != name:
                    slots = torch.arange(self.tensors[name].slots)
                    tie(name, slots, lead, slots)
        for name, parts in list(self.cats.items()) + list(self.splits.values()):  # a split's input joins its pieces
            at = 0
            for part in parts:
                slots = torch.arange(self.tensors[part].slots)
                tie(name, at + slots, part, slots)
                at += len(slots)
        for out, (src, perm) in self.gathers.items():
            tie(out, torch.arange(len(perm)), src, perm.long())
        labels = torch.arange(start)
        if pairs:
            u, v = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
            while True:
                low = torch.minimum(labels[u], labels[v])
                new = labels.scatter_reduce(0, u, low, "amin").scatter_reduce(0, v, low, "amin")
                new = new[new]  # a label is a slot whose own label is no larger: jump to it
                if torch.equal(new, labels):
                    break
                labels = new
        classes, labels = torch.unique(labels, return_inverse=True)
        return names, labels, len(classes)

    @cached_property
    def dataflow(self) -> list[tuple[str, tuple[str, ...], str | None, bool]]:
        """The traced nodes, the output first and then backwards in execution order, each as
        ``(node name, the nodes it reads, the layer it runs or None, whether it sums two tensors)``
        (a layer: a module call, or a window attention's function call; a sum: an add or subtract of
        two tensors of :attr:`tensors`, which compaction skips an operand of that keeps no alive
        channel): what :func:`budgetprune.liveness.useful_nodes` walks."""
        calls = {layer.out_tensor: name for name, layer in self.layers.items()
                 if layer.attention is not None and layer.attention.family == "window"}
        flow = []
        for node in reversed(list(self.gm.graph.nodes)):
            layer = node.target if node.op == "call_module" and node.target in self.layers else calls.get(node.name)
            adds = (node.op == "call_function" and node.target in ADD_FUNCTIONS) or \
                (node.op == "call_method" and node.target in ("add", "sub"))
            operands = [a for a in node.args if isinstance(a, fx.Node) and a.name in self.tensors]
            flow.append((node.name, tuple(n.name for n in node.all_input_nodes), layer, adds and len(operands) == 2))
        return flow

    @cached_property
    def input_guards(self) -> tuple[tuple[tuple[str, torch.Tensor], ...], ...]:
        """The channels of which each layer that must run keeps one alive input: per such layer whose
        input only gated channels write, ``((group, channels), ...)`` of its writers.

        A layer must run when it is ungated (nothing prunes it away) or hosts a group the
        fatal-pruning guard protects (``min_keep``), and so must the single writer of such a layer's
        input. Without an alive input it would compute a constant the compacted network has no
        layer for (an ungated layer), or be purged (a protected group). ``min_keep`` covers an input
        that is all of one protected group; this covers the others: a piece of a split (a
        selective-kernel block's paths each read half of the residual stream), an input several
        residual writers share, a protected layer's unprotected writer (a bottleneck whose last conv
        is ungated: its first conv must keep a channel for the second to run)."""
        must = [layer for layer in self.layers.values()
                if layer.out_group is None or self.groups[layer.out_group].min_keep > 0]
        guards, seen = [], set()
        while must:
            layer = must.pop()
            if layer.name in seen:
                continue
            seen.add(layer.name)
            always, by_group = self.tensors[layer.in_tensor].writers
            if bool(always.any()) or not by_group or any(gid not in self.groups for gid in by_group):
                continue
            if len(by_group) == 1:  # its one writer must run too
                writer = self.layer_of_group(next(iter(by_group)))
                if writer is not None:
                    must.append(writer)
            if any(self.groups[gid].min_keep and torch.equal(chans.sort().values, torch.arange(self.groups[gid].channels))
                   for gid, (_, chans) in by_group.items()):
                continue  # all of a protected group: it keeps a channel
            guards.append(tuple((gid, chans.unique()) for gid, (_, chans) in by_group.items()))
        return tuple(guards)

    @cached_property
    def node_names(self) -> frozenset[str]:
        """The names of the traced nodes (a tensor of :attr:`tensors` that is not one, such as a
        layer's gated input or an attention's heads, is computed by no node alone)."""
        return frozenset(step[0] for step in self.dataflow)

    @cached_property
    def _readers(self) -> dict[str, list[Layer]]:
        out: dict[str, list[Layer]] = {gid: [] for gid in self.groups}
        for layer in self.layers.values():
            for gid in self.tensors[layer.in_tensor].sources():
                if gid in out:
                    out[gid].append(layer)
        return out

    def summary(self) -> str:
        """A readable table: each group, its area, host and readers; what is left ungated and why."""
        rows = [f"ChannelGraph: input {self.input_shape}, {len(self.groups)} prunable groups, "
                f"{len(self.layers)} conv/linear layers"]
        rows.append(f"  {'group':<28}{'channels':>9}{'area':>7}{'keeps':>6}  host -> read by")
        for g in self.groups.values():
            tag = " (adds into a shared signal)" if g.shared else ""
            if g.units != g.channels:
                tag += f" ({g.units} units, tied across {g.channels // g.units} conv groups)"
            rows.append(f"  {g.id:<28}{g.channels:>9}{g.area:>7}{g.min_keep:>6}  {g.host} ({g.position}){tag} -> "
                        f"{', '.join(g.consumers) or '-'}")
        for node, what in self.renormalisers.items():
            rows.append(f"  masked by aliveness: {node} ({what} maps 0 to a non-zero value)")
        for name, why in self.ungated.items():
            rows.append(f"  not pruned: {name}: {why}")
        return "\n".join(rows)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping the attention modules budgetprune prunes as a whole, the
    BatchNorms with an activation of their own (:mod:`budgetprune.norm_act`) and the subclasses
    of torch's layers that compute what the layer computes (:mod:`budgetprune.layer_subclasses`)
    as one node. ``marked`` adds the module classes and functions the model's package marks as not
    to be traced through (:mod:`budgetprune.notrace`)."""

    def __init__(self, marked: tuple[tuple[type, ...], tuple] = ((), ())):
        super().__init__(autowrap_functions=marked[1])
        self.leaf_classes = marked[0]

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return attention.is_leaf(m) or norm_act.is_leaf(m) or layer_subclasses.prunes_as_torch_layer(m) or \
            type(m) in self.leaf_classes or super().is_leaf_module(m, qualname)


def parameter(modules: dict[str, nn.Module], path: str) -> torch.Tensor:
    """The parameter at ``path`` (``"features.1.0.attn.qkv.weight"``) of a model's ``named_modules()``."""
    owner, _, attr = path.rpartition(".")
    return getattr(modules[owner], attr)


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` (attention modules kept whole) with a one-line error naming what failed."""
    forget_unused_wraps()  # a trace patches every registered wrap: drop those of modules gone
    try:
        norm_act.examine(model)
        layer_subclasses.examine(model)
        try:
            return fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
        except Exception as plain:
            marks = notrace.marked()  # what the model's package keeps whole when it traces it
            if not any(marks):
                raise
            try:
                return fx.GraphModule(model, _Tracer(marks).trace(model), type(model).__name__)
            except Exception:
                raise plain from None
    except Exception as exc:
        raise GraphError(
            f"cannot trace {type(model).__name__} with torch.fx: {first_line(exc, 300)}; "
            "remove data-dependent control flow from forward() or wrap that part in a leaf module"
        ) from None


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


def _measured_macs(gm: fx.GraphModule, example_input: torch.Tensor) -> float | None:
    """Multiply-accumulates per example that ``torch.utils.flop_counter`` counts in one forward
    pass (convolutions, matrix products, attention), or None where it cannot run the model. The
    fast path of ``nn.MultiheadAttention`` is off and attention runs its math kernel while
    counting: the counter cannot see into the fused kernels. The caller holds the model in eval
    mode (the traced module shares the model's submodules: their modes are the user's)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            gm(example_input)
    except Exception:  # an op the counter cannot run: only the layers are counted
        return None
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return counter.get_total_flops() / 2 / example_input.shape[0]  # the counter counts 2 FLOPs per MAC


def _shape(node) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _area(shape: tuple[int, ...], dim: int = 1) -> int:
    """Positions per channel: H·W of a (N, C, H, W) map, L of (N, L, C) tokens (``dim`` -1)."""
    area = 1
    for s in (shape[2:] if dim == 1 else shape[1:-1]):
        area *= int(s)
    return area


def _arg(node: fx.Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _describe(node: fx.Node, modules) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} '{node.target}'"
    return f"'{getattr(node.target, '__name__', node.target)}' at node '{node.name}'"


class _Unsupported(Exception):
    """An op the graph cannot see through: its inputs' writers must stay ungated."""


class _Builder:
    """One pass over the traced graph; repeated while new layers must be left ungated."""

    def __init__(self, gm: fx.GraphModule, modules: dict[str, nn.Module], gate_inputs: bool,
                 input_shape: tuple[int, ...]):
        self.gm, self.modules, self.gate_inputs, self.input_shape = gm, modules, gate_inputs, input_shape
        self.blocked: dict[str, str] = {}  # producer -> why it stays ungated
        self.followers: dict[str, str] = {}  # layer computing a channel scale -> the tensor it multiplies
        self.probes: dict[tuple, object] = {}  # what running an unknown op showed (see budgetprune.probe)
        self.head_writers: dict[str, str] = {}  # linear layer writing per-head values -> its attention node

    def build(self) -> ChannelGraph:
        self._find_scales()
        self._find_head_writers()
        for _ in range(1000):
            before = (dict(self.blocked), dict(self.followers))
            graph = self._pass()
            if (self.blocked, self.followers) == before:
                return graph
        raise GraphError("internal error: the channel graph did not settle")

    # one pass ---------------------------------------------------------------------------
    def _pass(self) -> ChannelGraph:
        nodes = list(self.gm.graph.nodes)
        self.tensors: dict[str, TensorInfo] = {}
        self.layers: dict[str, Layer] = {}
        self.groups: dict[str, ChannelGroup] = {}
        self.renorm: dict[str, str] = {}
        self.cats: dict[str, list[str]] = {}
        self.splits: dict[str, tuple[str, list[str]]] = {}
        self.gathers: dict[str, tuple[str, torch.Tensor]] = {}
        self.computed_gathers: set[str] = set()
        self.shuffle_inside: set[str] = set()
        self.hosted: dict[str, str] = {}  # node that is a gate host output -> group
        self.params: dict[str, ChannelParameter] = {}
        self.norms: dict[str, Norm] = {}
        self.attention: set[str] = set()  # nn.MultiheadAttention nodes that are layers
        self.parent: dict[str, str] = {}  # union-find over tensors for regular-block widths
        self.calls: dict[str, int] = defaultdict(int)
        ungated: dict[str, str] = dict(self.blocked)
        self._find_layers(nodes, ungated)
        self.exits = _module_exits(nodes)
        self.returned_by = {out[0].name: path for path, out in self.exits.items()
                            if len(out) == 1 and self.calls.get(path, 0) <= 1}
        for node in nodes:
            if node.op == "placeholder":
                shape = _shape(node)
                if shape is not None:
                    self._set(node, self._fresh(node, shape, ALWAYS))
                continue
            if node.op == "output":
                for arg in node.all_input_nodes:
                    self._block(arg, "feeds the network output")
                continue
            if self._visit_attention(node):
                continue
            if _shape(node) is None:  # not one tensor: x.size(0) and friends, or several tensors (chunk, split)
                if self._attention_weights(node):
                    continue
                if not _reads_metadata_only(node) and not self._visit_split(node):
                    for arg in node.all_input_nodes:
                        self._block(arg, f"read by {_describe(node, self.modules)}, which returns several tensors")
                continue
            try:
                self._visit(node)
            except _Unsupported as why:
                for arg in node.all_input_nodes:
                    self._block(arg, str(why))
                shape = _shape(node)
                self._set(node, self._fresh(node, shape, ALWAYS) if len(shape) >= 2 else
                          TensorInfo(node.name, 1, 1, 1, (Segment(0, 1, ((ALWAYS, 0),)),)))
        if not self.layers:
            raise GraphError("the model has no conv or linear layer to prune")
        self._finish_groups(nodes)
        mask_sites = self._place_masks(nodes)
        spaces = {t: self._find(t) for t in self.tensors}
        return ChannelGraph(self.gm, self.tensors, self.layers, self.groups, self.renorm, ungated,
                            self.input_shape, spaces, self.cats, self.splits, self.gathers, self.params,
                            self.norms, mask_sites, self.computed_gathers)

    def _call_counts(self) -> dict[str, int]:
        """How often each module is called and each parameter read (before any pass counts them)."""
        calls = defaultdict(int)
        for node in self.gm.graph.nodes:
            if node.op in ("call_module", "get_attr"):
                calls[node.target] += 1
        return calls

    def _find_scales(self) -> None:
        """Squeeze-and-excitation: a product of a feature map and a (batch, C, 1, 1) scale that one
        conv/linear computes through activations; that layer follows the map's channels."""
        calls = self._call_counts()
        for node in self.gm.graph.nodes:
            is_mul = node.op == "call_function" and node.target in MUL_FUNCTIONS or \
                node.op == "call_method" and node.target == "mul"
            args = [a for a in node.args if isinstance(a, fx.Node)]
            shapes = [_shape(a) for a in args]
            if not is_mul or len(args) != 2 or any(sh is None or len(sh) < 3 for sh in shapes):
                continue
            areas = [_area(sh) for sh in shapes]
            if min(areas) == max(areas) or shapes[0][1] != shapes[1][1]:
                continue
            producer = _scale_producer(args[areas.index(min(areas))], node, self.modules)
            if producer is not None and calls[producer] == 1:
                self.followers[producer] = args[areas.index(max(areas))].name

    def _find_head_writers(self) -> None:
        """Swin V2's position-bias MLP: its last linear layer writes one value per head of an attention
        layer (:func:`budgetprune.attention.v2_bias_writer`); it gets no gate of its own, its outputs
        follow the heads (:meth:`_follow_heads`)."""
        calls = self._call_counts()
        for node in self.gm.graph.nodes:
            if node.op != "call_function" or not attention.is_window_attention(node.target):
                continue
            a = attention.window_args(node)
            if a["logit_scale"] is None or not isinstance(a["num_heads"], int):
                continue
            found = attention.v2_bias_writer(a["relative_position_bias"], a["num_heads"], self.modules, calls)
            if found is not None:
                self.head_writers[found[0]] = node.name

    def _follow_heads(self, spec, layer: "Layer") -> None:
        """The head writer of an attention layer whose heads are a group: output h lives while head h
        does, so compaction keeps the rows of the kept heads and the costs count them."""
        writer = self.layers.get(spec.head_writer) if spec.head_writer else None
        info = self.tensors.get(writer.out_tensor) if writer is not None else None
        if info is None or info.slots != spec.num_heads or info.expansion != 1:
            return
        self.tensors[writer.out_tensor] = TensorInfo(writer.out_tensor, spec.num_heads, info.area, 1,
                                                     (Segment(0, spec.num_heads, ((layer.heads, 0),)),), dim=info.dim)
        writer.follows = layer.heads_tensor

    def _find_layers(self, nodes, ungated) -> None:
        """Count module calls (a module called twice shares weights: never gated)."""
        for node in nodes:
            if node.op in ("call_module", "get_attr"):
                self.calls[node.target] += 1
        for name, n in self.calls.items():
            if name not in self.modules:
                continue  # a parameter read by get_attr
            mod = self.modules[name]
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and n > 1:
                self.blocked.setdefault(name, f"called {n} times (shared weights)")
                ungated.setdefault(name, self.blocked[name])

    # helpers ---------------------------------------------------------------------------
    def _set(self, node: fx.Node, info: TensorInfo) -> None:
        self.tensors[node.name] = info
        self.parent.setdefault(node.name, node.name)

    def _set_named(self, info: TensorInfo) -> None:
        """A tensor the graph adds (an always-alive input described over another dim, an attention's heads)."""
        self.tensors[info.node] = info
        self.parent.setdefault(info.node, info.node)

    def _find(self, t: str) -> str:
        while self.parent[t] != t:
            self.parent[t] = self.parent[self.parent[t]]
            t = self.parent[t]
        return t

    def _union(self, a: str, b: str) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self.parent[rb] = ra

    @staticmethod
    def _fresh(node: fx.Node, shape, writer: str | None, dim: int = 1) -> TensorInfo:
        slots = int(shape[dim]) if len(shape) >= 2 else 1
        return TensorInfo(node.name, slots, _area(shape, dim), 1, (Segment(0, slots, ((writer, 0),)),), dim=dim)

    def _info(self, node) -> TensorInfo:
        return self.tensors[node.name]

    def _same(self, node: fx.Node, src: fx.Node, renormalise: str | None = None) -> None:
        """Output keeps the input's slots (area from the output shape)."""
        info = self._info(src)
        shape = _shape(node)
        if len(shape) < 2 or (shape[info.dim] != info.slots * info.expansion) or \
                (info.dim != 1 and len(shape) != len(_shape(src))):
            raise _Unsupported(f"{node.name} changes the channel dimension {_shape(src)} -> {shape}")
        self._set(node, TensorInfo(node.name, info.slots, _area(shape, info.dim) if info.expansion == 1 else info.area,
                                   info.expansion, info.segments, info.scale, info.dim))
        self._union(node.name, src.name)
        if renormalise and not info.always_alive() and not info.scale:  # a scale's product is zero anyway
            self.renorm[node.name] = renormalise  # a function is masked where a module returns it: _place_masks

    def _block(self, node: fx.Node, why: str) -> None:
        info = self.tensors.get(node.name)
        if info is None:
            return
        for gid in info.sources():
            producer = self.groups[gid].producer if gid in self.groups else None
            key = producer or gid
            if key not in self.blocked:
                self.blocked[key] = why

    # the op table ----------------------------------------------------------------------------
    def _visit(self, node: fx.Node) -> None:
        if node.op == "call_function" and node.target is operator.getitem and \
                isinstance(node.args[0], fx.Node) and node.args[0].name in self.attention:
            if node.args[1] != 0:  # the attention weights
                return self._set(node, self._fresh(node, _shape(node), ALWAYS))
            info = self.tensors[node.args[0].name]
            self._set(node, TensorInfo(node.name, info.slots, info.area, 1, info.segments, dim=-1))
            return self._union(node.name, node.args[0].name)
        if node.op == "call_function" and node.target is operator.getitem and self._match_token_select(node):
            return
        if node.op == "call_function" and node.target is operator.getitem and \
                isinstance(node.args[0], fx.Node) and node.args[0].name in self.splits:
            piece = self.splits[node.args[0].name][1][node.args[1]]
            info = self.tensors[piece]
            self._set(node, TensorInfo(node.name, info.slots, info.area, 1, info.segments))
            return self._union(node.name, piece)
        if node.name in self.gathers or node.op == "call_function" and node.target is operator.getitem and \
                self._match_channel_slice(node):
            return self._set(node, self._gathered(node))
        if node.name in self.shuffle_inside:  # the 5-d view and transpose of a channel shuffle: read by it alone
            return self._set(node, self._fresh(node, _shape(node), ALWAYS))
        tensor_args = [a for a in node.all_input_nodes if a.name in self.tensors]
        if not tensor_args and node.op != "get_attr":  # a tensor made from nothing: torch.zeros(...)
            return self._set(node, self._fresh(node, _shape(node), ALWAYS))
        if _is_permute(node):
            return self._visit_permute(node, tensor_args[0])
        norm = self._match_layer_norm(node)
        if norm is not None:
            return self._visit_layer_norm(node, *norm)
        param = self._parameter_operand(node, tensor_args)
        if param is not None:
            return self._visit_parameter_op(node, *param)
        if any(self._info(a).dim != 1 and not self._info(a).always_alive() for a in tensor_args):
            return self._visit_channels_last(node, tensor_args)
        if node.op == "call_module":
            return self._visit_module(node, self.modules[node.target], tensor_args)
        if node.op == "get_attr":
            return self._set(node, self._fresh(node, _shape(node), ALWAYS) if len(_shape(node)) >= 2 else
                             TensorInfo(node.name, 1, 1, 1, (Segment(0, 1, ((ALWAYS, 0),)),)))
        fn = node.target
        if node.op == "call_function" and fn in ZERO_PRESERVING_FUNCTIONS or \
                node.op == "call_method" and fn in ZERO_PRESERVING_METHODS:
            return self._same(node, tensor_args[0])
        if node.op == "call_function" and fn in RENORMALISING_FUNCTIONS or \
                node.op == "call_method" and fn in RENORMALISING_METHODS:
            return self._same(node, tensor_args[0], getattr(fn, "__name__", str(fn)))
        if node.op == "call_function" and fn in ADD_FUNCTIONS or node.op == "call_method" and fn in ("add", "sub"):
            return self._visit_add(node, tensor_args)
        if node.op == "call_function" and fn in MUL_FUNCTIONS or node.op == "call_method" and fn == "mul":
            return self._visit_mul(node, tensor_args)
        if node.op == "call_function" and fn is torch.cat:
            return self._visit_cat(node)
        if node.op == "call_method" and fn in ("view", "reshape") and self._match_shuffle(node):
            return self._set(node, self._fresh(node, _shape(node), ALWAYS))
        if node.op == "call_function" and fn is torch.flatten or node.op == "call_method" and fn in FLATTEN_METHODS:
            return self._visit_flatten(node, tensor_args)
        if node.op == "call_method" and fn in ("mean", "amax", "sum") and _reduces_spatial_only(node):
            return self._same(node, tensor_args[0])
        return self._visit_unknown(node, tensor_args)

    def _visit_permute(self, node: fx.Node, src: fx.Node) -> None:
        """``x.permute(...)`` or ``x.transpose(a, b)`` keeping the batch first: the channels move to
        dim 1 or to the last dim (ConvNeXt's ``(N, C, H, W) -> (N, H, W, C)`` around its LayerNorm
        and linear layers, a ViT's patches ``(N, C, L) -> (N, L, C)``)."""
        info, in_shape = self._info(src), _shape(src)
        perm = [int(d) % len(in_shape) for d in _permutation(node, len(in_shape))]
        where = perm.index(1 if info.dim == 1 else len(in_shape) - 1)
        if info.always_alive():  # nothing to prune; its channels are still counted where they went
            dim = -1 if where == len(in_shape) - 1 and where != 1 else 1
            return self._set(node, self._fresh(node, _shape(node), ALWAYS, dim))
        if info.expansion != 1 or perm[0] != 0 or where not in (1, len(in_shape) - 1):
            raise _Unsupported(f"read by '{node.name}', which permutes {tuple(in_shape)} to {_shape(node)} "
                               "(only moves of the channels between dim 1 and the last dim are pruned)")
        dim = 1 if where == 1 else -1
        self._set(node, TensorInfo(node.name, info.slots, _area(_shape(node), dim), 1, info.segments, info.scale, dim))
        self._union(node.name, src.name)

    def _match_layer_norm(self, node: fx.Node):
        """(input, normalised shape, weight path, bias path, eps, module) of an ``nn.LayerNorm`` or an
        ``F.layer_norm`` whose weight and bias are the model's parameters, or None."""
        if node.op == "call_module" and isinstance(self.modules[node.target], nn.LayerNorm):
            mod = self.modules[node.target]
            path = node.target
            weight = f"{path}.weight" if mod.weight is not None else None
            bias = f"{path}.bias" if getattr(mod, "bias", None) is not None else None
            return node.args[0], tuple(mod.normalized_shape), weight, bias, mod.eps, path
        if node.op == "call_function" and node.target is F.layer_norm:
            attrs = []
            for index, name in ((2, "weight"), (3, "bias")):
                value = _arg(node, index, name, None)
                if value is not None and not (isinstance(value, fx.Node) and value.op == "get_attr"):
                    return None  # a computed weight: not a parameter compaction can slice
                attrs.append(value.target if value is not None else None)
            shape = _arg(node, 1, "normalized_shape", ())
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            return node.args[0], shape, attrs[0], attrs[1], float(_arg(node, 4, "eps", 1e-5)), None
        return None

    def _visit_layer_norm(self, node, src, normalized, weight, bias, eps, module) -> None:
        """A LayerNorm over the channels: prunable with them when it has a learned scale (which the
        gates' mask zeroes at a dead channel, and compaction slices) and each call has its own."""
        info, shape = self._info(src), _shape(src)
        if not isinstance(src, fx.Node) or info.always_alive():
            return self._same(node, src)
        if info.dim == 1 and len(shape) - len(normalized) > 1:  # over each row of a map: channel by channel
            return self._visit_unknown(node, [src]) if node.op == "call_module" else \
                self._visit_unknown(node, [a for a in node.all_input_nodes if a.name in self.tensors])
        what = _describe(node, self.modules)
        if info.expansion != 1 or not (info.dim == -1 or len(shape) == 2) or normalized != (info.slots,):
            raise _Unsupported(f"read by {what}, which normalises over {normalized} of a {tuple(shape)} tensor "
                               "(only a LayerNorm over the channels alone, in the last dim, is pruned)")
        if weight is None:
            raise _Unsupported(f"read by {what}, which has no learned scale to switch a pruned channel off")
        if module is not None and self.calls[module] != 1 or \
                any(p is not None and self.calls[p] > 1 for p in (weight, bias) if module is None):
            raise _Unsupported(f"read by {what}, whose parameters are used more than once")
        self._same(node, src, "LayerNorm")
        self.norms[node.name] = Norm(node.name, src.name, info.slots, weight, bias, eps, module)
        for path in (weight, bias):
            if path is not None:
                self.params[path] = ChannelParameter(path, src.name, 0)

    def _parameter_operand(self, node: fx.Node, tensor_args):
        """(parameter node, other operand, is_add) for ``x * p`` or ``x + p`` with ``p`` a parameter
        read by this op alone (ConvNeXt's layer scale), else None."""
        is_add = node.op == "call_function" and node.target in ADD_FUNCTIONS - {operator.sub, operator.isub, torch.sub} \
            or node.op == "call_method" and node.target == "add"
        is_mul = node.op == "call_function" and node.target in MUL_FUNCTIONS or \
            node.op == "call_method" and node.target == "mul"
        if not (is_add or is_mul) or len(tensor_args) != 2:
            return None
        params = [a for a in tensor_args if a.op == "get_attr" and self.calls[a.target] == 1 and len(a.users) == 1]
        if len(params) != 1 or len(node.args) != 2:
            return None
        other = tensor_args[1] if params[0] is tensor_args[0] else tensor_args[0]
        return params[0], other, is_add

    def _visit_parameter_op(self, node: fx.Node, param: fx.Node, src: fx.Node, is_add: bool) -> None:
        """A product with a parameter keeps zeros; a sum with one is masked by aliveness. Where the
        parameter runs over the channels (a (C, 1, 1) layer scale), compaction slices it."""
        info, shape, pshape = self._info(src), _shape(src), _shape(param)
        if info.always_alive():
            return self._set(node, self._fresh(node, _shape(node), ALWAYS))
        if tuple(_shape(node)) != tuple(shape) or info.expansion != 1:
            raise _Unsupported(f"read by '{node.name}', which broadcasts it with a parameter of shape {pshape}")
        axis = (1 if info.dim == 1 else len(shape) - 1) - (len(shape) - len(pshape))
        if axis >= 0 and pshape[axis] not in (1, info.slots):
            raise _Unsupported(f"read by '{node.name}' with a parameter of shape {pshape}")
        self._same(node, src, "adding a parameter" if is_add else None)
        if axis >= 0 and pshape[axis] == info.slots:
            self.params[param.target] = ChannelParameter(param.target, src.name, axis)

    def _reduces_tokens(self, node: fx.Node, src: fx.Node) -> bool:
        """``x.mean(dim=1)`` (``amax``, ``sum``) of channels-last tensors over dims other than the
        batch and the channels (a transformer's mean over tokens): the channels stay."""
        is_reduce = node.op == "call_method" and node.target in ("mean", "amax", "sum") or \
            node.op == "call_function" and node.target in (torch.mean, torch.amax, torch.sum)
        dims = _arg(node, 1, "dim", None)
        in_shape, shape = _shape(src), _shape(node)
        if not is_reduce or dims is None or _arg(node, 2, "keepdim", False) or shape is None:
            return False
        dims = {int(d) % len(in_shape) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
        if not dims or 0 in dims or len(in_shape) - 1 in dims:
            return False
        info = self._info(src)
        dim = 1 if len(shape) == 2 else -1
        self._set(node, TensorInfo(node.name, info.slots, _area(shape, dim), 1, info.segments, info.scale, dim))
        self._union(node.name, src.name)
        return True

    def _visit_attention(self, node: fx.Node) -> bool:
        """An attention layer (:mod:`budgetprune.attention`: ``nn.MultiheadAttention`` self-attention,
        Swin's window attention, MaxViT's relative attention) reads its input's channels through its
        query/key/value projection and writes a gated group through its output projection; its heads
        are a group of their own (one slot per head in :attr:`Layer.heads_tensor`) where its family
        allows. An attention call budgetprune does not prune leaves its input's writers ungated."""
        spec = attention.match(node, self.modules, self.calls, self.returned_by)
        if spec is None:
            return False
        is_module = node.op == "call_module"
        what = f"{type(self.modules[node.target]).__name__} '{node.target}'" if is_module else \
            f"'{node.target.__name__}' at node '{node.name}'"
        out_shape = _shape(node)
        if isinstance(self.modules.get(node.target), nn.MultiheadAttention):  # returns (output, weights)
            metas = node.meta.get("tensor_meta")
            out_shape = tuple(metas[0].shape) if isinstance(metas, (tuple, list)) and hasattr(metas[0], "shape") \
                else None
            self.attention.add(node.name)
        why = spec if isinstance(spec, str) else None
        src = next((a for a in node.all_input_nodes if a.name == spec.source), None) if why is None else None
        if why is None:
            info = self._info(src) if src is not None and src.name in self.tensors else None
            if info is None or not info.always_alive() and not (
                    info.dim == -1 and info.slots == spec.in_features and info.expansion == 1):
                why = "whose input's channels are not in the last dim"
        if why is not None:
            for arg in node.all_input_nodes:
                self._block(arg, f"read by {what}, {why}")
            width = getattr(self.modules.get(node.target), "embed_dim", 1)
            self._set(node, self._fresh(node, out_shape or (1, 1, width), ALWAYS, dim=-1))
            return True
        info = self._info(src)
        if info.always_alive():
            info = _always_alive_over(info, _shape(src), -1)
            info = TensorInfo(f"{node.name}:in", info.slots, info.area, 1, info.segments, dim=-1)
            self._set_named(info)
        name = spec.host
        gated = name not in self.blocked
        gid = name if gated else ALWAYS
        area = _area(out_shape, -1)
        bias = spec.proj_bias is not None
        layer = Layer(name, "attention", info.node, node.name, spec.in_features, spec.out_features, area,
                      1, None, False, bias, attention=spec)
        self.layers[name] = layer
        self._set(node, TensorInfo(node.name, spec.out_features, area, 1,
                                   (Segment(0, spec.out_features, ((gid, 0),)),), dim=-1))
        if gated:
            self.groups[gid] = ChannelGroup(gid, spec.out_features, area, spec.host, "output", name, dim=-1)
            layer.out_group = gid
        heads = f"{name}:heads"
        if spec.head_params is not None and spec.num_heads > 1 and heads not in self.blocked:
            self._set_named(TensorInfo(layer.heads_tensor, spec.num_heads, spec.tokens, 1,
                                       (Segment(0, spec.num_heads, ((heads, 0),)),), dim=-1))
            self.groups[heads] = ChannelGroup(heads, spec.num_heads, spec.tokens, spec.host, "heads", name, dim=-1)
            layer.heads = heads
            self._follow_heads(spec, layer)
        return True

    def _attention_weights(self, node: fx.Node) -> bool:
        """``attn(x, x, x)[1]`` when it is None (``need_weights=False``): carries nothing."""
        return node.op == "call_function" and node.target is operator.getitem and \
            isinstance(node.args[0], fx.Node) and node.args[0].name in self.attention

    def _match_token_select(self, node: fx.Node) -> bool:
        """``x[:, 0]`` of tokens (N, L, C): one token's channels (a ViT's class token), as (N, C)."""
        src, idx = node.args[0], node.args[1]
        if not isinstance(src, fx.Node) or src.name not in self.tensors or not isinstance(idx, tuple) or \
                len(idx) != 2 or idx[0] != slice(None) or not isinstance(idx[1], int):
            return False
        info, shape = self.tensors[src.name], _shape(node)
        if info.dim != -1 or info.expansion != 1 or len(_shape(src)) != 3 or shape is None or len(shape) != 2:
            return False
        self._set(node, TensorInfo(node.name, info.slots, 1, 1, info.segments, info.scale))
        self._union(node.name, src.name)
        return True

    def _visit_token_cat(self, node: fx.Node) -> None:
        """``torch.cat`` of channels-last tensors along another dim (a ViT's class token joined to the
        patches): a slot is alive where it is in any part. A part that is a parameter (through
        ``expand``) is masked by that aliveness and sliced with the channels at compaction."""
        parts, dim = _arg(node, 0, "tensors", []), _arg(node, 1, "dim", 0)
        shape = _shape(node)
        if any(not isinstance(p, fx.Node) or p.name not in self.tensors for p in parts) or \
                dim % len(shape) in (0, len(shape) - 1):
            raise _Unsupported(f"read by torch.cat at node '{node.name}' along dim {dim} of channels-last tensors")
        segments, params = None, []
        for p in parts:
            info = self._info(p)
            param = _parameter_source(p, self.calls)
            if info.always_alive() and param is not None and int(_shape(param)[-1]) == shape[-1]:
                params.append(param)
                continue
            if info.always_alive():
                info = _always_alive_over(info, _shape(p), -1)
            if info.dim != -1 or info.expansion != 1 or info.slots != shape[-1]:
                raise _Unsupported(f"read by torch.cat at node '{node.name}' of tensors of different channel layouts")
            segments = info.segments if segments is None else _merge(segments, info.segments)
        if segments is None:
            return self._set(node, self._fresh(node, shape, ALWAYS, dim=-1))
        self._set(node, TensorInfo(node.name, shape[-1], _area(shape, -1), 1, segments, dim=-1))
        for p in parts:
            if self._info(p).dim == -1:
                self._union(node.name, p.name)
        if params and not self.tensors[node.name].always_alive():
            self.renorm[node.name] = "a parameter joined along the tokens"
            for param in params:
                self.params[param.target] = ChannelParameter(param.target, node.name, len(_shape(param)) - 1)

    def _place_masks(self, nodes) -> dict[str, tuple[str, str]]:
        """A renormalising function is masked at the output of the innermost module that returns
        it through ops keeping its channels (``F.layer_norm`` → ``permute`` in a ``LayerNorm2d``),
        else at the output of the first module reading it through such ops (a ViT's position
        embedding sum → dropout); where there is none, its input's writers stay ungated."""
        exits = self.exits
        sites = {}
        by_name = {n.name: n for n in nodes}
        for name, what in self.renorm.items():
            node = by_name[name]
            if node.op == "call_module":
                continue
            site = None
            for path in reversed(_scopes(node)):
                out = exits.get(path, [])
                if len(out) == 1 and self.calls.get(path, 1) <= 1 and \
                        _passes_through(node, out[0], self.tensors, self.norms):
                    site = (path, out[0].name)
                    break
            cur = node
            while site is None and len(_value_users(cur)) == 1:  # else the first module that reads it alone
                cur = _value_users(cur)[0]
                if cur.op == "call_module" and self.calls[cur.target] == 1 and \
                        _passes_through(node, cur, self.tensors, self.norms):
                    site = (cur.target, cur.name)
                elif not _passes_through(node, cur, self.tensors, self.norms):
                    break
            if site is None:
                for arg in node.all_input_nodes:
                    self._block(arg, f"read by {what} at node '{name}', which maps 0 to a non-zero value; "
                                     "write it as a module (e.g. nn.Sigmoid) so it can be masked")
            else:
                sites[name] = site
        return sites

    def _visit_split(self, node: fx.Node) -> bool:
        """``x.chunk(k, dim=1)`` / ``x.split(sizes, dim=1)``: each piece keeps its range of slots."""
        is_split = node.op == "call_method" and node.target in ("chunk", "split") or \
            node.op == "call_function" and node.target in (torch.chunk, torch.split)
        src = node.args[0] if node.args else None
        if not is_split or not isinstance(src, fx.Node) or src.name not in self.tensors:
            return False
        info, in_shape = self.tensors[src.name], _shape(src)
        metas = node.meta.get("tensor_meta")
        if info.expansion != 1 or info.dim != 1 or _arg(node, 2, "dim", 0) not in (1, 1 - len(in_shape)) or \
                not isinstance(metas, (tuple, list)) or not all(hasattr(m, "shape") for m in metas):
            return False
        sizes = [int(m.shape[1]) for m in metas]
        if sum(sizes) != info.slots:
            return False
        pieces, lo = [], 0
        for i, n in enumerate(sizes):
            name = f"{node.name}:{i}"
            self.tensors[name] = TensorInfo(name, n, info.area, 1, _slice_segments(info.segments, lo, lo + n))
            self.parent.setdefault(name, name)
            pieces.append(name)
            lo += n
        self.splits[node.name] = (src.name, pieces)
        return True

    def _match_shuffle(self, view: fx.Node) -> bool:
        """A channel shuffle (ShuffleNet): ``x.view(N, g, C/g, H, W).transpose(1, 2)`` then back to
        ``(N, C, H, W)``, each step read by the next alone: output slot a·g + b is input slot b·C/g + a."""
        src = view.args[0]
        if not isinstance(src, fx.Node) or src.name not in self.tensors:
            return False
        in_shape, s5 = _shape(src), _shape(view)
        info = self.tensors[src.name]
        if len(in_shape) != 4 or len(s5) != 5 or s5[0] != in_shape[0] or s5[1] * s5[2] != in_shape[1] or \
                tuple(s5[3:]) != tuple(in_shape[2:]) or info.expansion != 1 or info.dim != 1:
            return False
        chain, cur = [view], view
        while len(cur.users) == 1:
            cur = next(iter(cur.users))
            chain.append(cur)
            if cur.op == "call_method" and cur.target == "contiguous":
                continue
            if cur.op in ("call_method", "call_function") and cur.target in ("transpose", torch.transpose) and \
                    len(chain) == 2 and {_arg(cur, 1, "dim0", None), _arg(cur, 2, "dim1", None)} == {1, 2}:
                continue
            break
        final = chain[-1]
        if len(chain) < 3 or chain[1].target not in ("transpose", torch.transpose) or \
                not (final.op == "call_method" and final.target in ("view", "reshape")) or \
                tuple(_shape(final) or ()) != tuple(in_shape):
            return False
        g, per = s5[1], s5[2]
        j = torch.arange(in_shape[1])
        self.gathers[final.name] = (src.name, (j % g) * per + j // g)
        self.shuffle_inside.update(n.name for n in chain[1:-1])
        return True

    def _match_channel_slice(self, node: fx.Node) -> bool:
        """``x[:, a:b]`` (constant bounds, step 1): output slot j is input slot a + j."""
        src, idx = node.args[0], node.args[1]
        if not isinstance(src, fx.Node) or src.name not in self.tensors or not isinstance(idx, tuple) or \
                len(idx) < 2 or idx[0] != slice(None) or not isinstance(idx[1], slice) or \
                not all(i == slice(None) or i is Ellipsis for i in idx[2:]):
            return False
        info = self.tensors[src.name]
        bounds = (idx[1].start, idx[1].stop, idx[1].step)
        if info.dim != 1 or info.expansion != 1 or not all(v is None or isinstance(v, int) for v in bounds):
            return False
        a, b, step = idx[1].indices(info.slots)
        if step != 1 or b <= a:
            return False
        self.gathers[node.name] = (src.name, torch.arange(a, b))
        return True

    def _gathered(self, node: fx.Node) -> TensorInfo:
        """Output slot j is input slot perm[j] (a channel shuffle, slice or probed channel map): runs of
        consecutive input slots from one segment make one segment."""
        src, perm = self.gathers[node.name]
        info = self.tensors[src]
        runs: list[list] = []  # [start, length, input segment, first input slot]
        for j, p in enumerate(perm.tolist()):
            seg = next(s for s in info.segments if s.start <= p < s.start + s.length)
            last = runs[-1] if runs else None
            if last is not None and last[2] is seg and last[3] + last[1] == p:
                last[1] += 1
            else:
                runs.append([j, 1, seg, p])
        segs = tuple(Segment(j, n, tuple((g, off if g is ALWAYS else off + p - seg.start) for g, off in seg.sources))
                     for j, n, seg, p in runs)
        return TensorInfo(node.name, len(perm), _area(_shape(node), info.dim), 1, segs, dim=info.dim)

    def _visit_channel_map(self, node: fx.Node, src: fx.Node, dim: int) -> bool:
        """An op that probing shows copies each input channel into one or more output channels, each
        computed from its source alone (Swin's patch merging): a gather of its input's slots. The
        compacted network runs the op on the kept channels (:attr:`ChannelGraph.computed_gathers`)."""
        if node.op == "get_attr" or self._info(src).always_alive():
            return False
        found = self._probed(probe_channel_map, node, dim)
        if found is None or found[0] != "zero" or self._info(src).expansion != 1:
            return False
        self.gathers[node.name] = (src.name, found[1])
        self.computed_gathers.add(node.name)
        self._set(node, self._gathered(node))
        return True

    def _visit_channels_last(self, node, tensor_args) -> None:
        """Pruned channels in the last dim (a linear layer's hidden width over tokens or a
        channels-last map) pass through element-wise ops into the linear layer that reads them."""
        mod = self.modules.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, nn.Linear):
            return self._visit_layer(node, mod, tensor_args[0])
        if node.op == "call_function" and node.target in ADD_FUNCTIONS or \
                node.op == "call_method" and node.target in ("add", "sub"):
            return self._visit_add(node, tensor_args)
        if node.op == "call_function" and node.target is torch.cat:
            return self._visit_token_cat(node)
        if len(tensor_args) == 1 and self._reduces_tokens(node, tensor_args[0]):
            return
        if node.op == "call_function" and node.target is torch.flatten or \
                node.op == "call_method" and node.target in FLATTEN_METHODS:
            if _keeps_channels(self._info(tensor_args[0]), _shape(tensor_args[0]), _shape(node)):
                return self._visit_flatten(node, tensor_args)
        if len(tensor_args) == 1 and (
                isinstance(mod, ZERO_PRESERVING_MODULES) and not isinstance(mod, POOLING_MODULES)
                or node.op == "call_function" and node.target in ZERO_PRESERVING_FUNCTIONS - POOLING_FUNCTIONS
                or node.op == "call_method" and node.target in ZERO_PRESERVING_METHODS):
            return self._same(node, tensor_args[0])
        if len(tensor_args) == 1 and node.op != "get_attr" and \
                self._probed(probe_channelwise, node, -1) == "zero":
            return self._same(node, tensor_args[0])
        if len(tensor_args) == 1 and self._visit_channel_map(node, tensor_args[0], -1):
            return
        raise _Unsupported(f"read by {_describe(node, self.modules)}, which budgetprune cannot prune through "
                           "on channels in the last dim (only element-wise ops and linear layers)")

    def _visit_unknown(self, node, tensor_args) -> None:
        """An op the table does not know: passed through when probing shows it works channel by
        channel (stochastic depth, a custom activation, an upsampling), else unsupported."""
        kind = self._probed(probe_channelwise, node, 1) if len(tensor_args) == 1 else None
        if kind is None and len(tensor_args) == 1 and self._visit_channel_map(node, tensor_args[0], 1):
            return
        if kind is None:
            raise _Unsupported(f"read by {_describe(node, self.modules)}, which budgetprune cannot prune through")
        return self._same(node, tensor_args[0], None if kind == "zero" else _describe(node, self.modules))

    def _probed(self, probe, node: fx.Node, dim: int):
        """``probe(node, ...)``, run once per node over the builder's passes."""
        key = (probe.__name__, node.name, dim)
        if key not in self.probes:
            self.probes[key] = probe(node, self.modules, self._device(), dim=dim)
        return self.probes[key]

    def _device(self) -> torch.device:
        for p in self.gm.parameters():
            return p.device
        return torch.device("cpu")

    def _visit_module(self, node, mod, tensor_args) -> None:
        src = tensor_args[0]
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            return self._visit_layer(node, mod, src)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return self._same(node, src, None if node.name in self.hosted else "BatchNorm")
        if isinstance(mod, ZERO_PRESERVING_MODULES):
            return self._same(node, src)
        if isinstance(mod, RENORMALISING_MODULES):
            return self._same(node, src, type(mod).__name__)
        if isinstance(mod, nn.Flatten):
            return self._visit_flatten(node, tensor_args)
        return self._visit_unknown(node, tensor_args)

    def _visit_layer(self, node, mod, src) -> None:
        info = self._info(src)
        in_shape, shape = _shape(src), _shape(node)
        kind = "conv" if isinstance(mod, nn.Conv2d) else "linear"
        if kind == "conv" and mod.padding_mode != "zeros":
            raise _Unsupported(f"read by conv '{node.target}' with padding_mode '{mod.padding_mode}'")
        dim = -1 if kind == "linear" and len(in_shape) > 2 else 1  # a linear over tokens works on the last dim
        if dim == -1 and not (info.dim == -1 and info.slots == in_shape[-1] and info.expansion == 1):
            if not info.always_alive():
                raise _Unsupported(f"read by linear '{node.target}' over the last dim of a {len(in_shape)}-d "
                                   "tensor whose pruned channels are in dim 1")
            info = TensorInfo(f"{node.name}:in", in_shape[-1], _area(in_shape, -1), 1,
                              (Segment(0, in_shape[-1], ((ALWAYS, 0),)),), dim=-1)
            self.tensors[info.node] = info  # what it reads: always alive, counted over the last dim
            self.parent.setdefault(info.node, info.node)
        depthwise = kind == "conv" and mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
        groups = mod.groups if kind == "conv" and not depthwise else 1
        if groups > 1:
            self._tie_input(node, src, mod.in_channels // groups)
        in_tensor = info.node if dim == -1 else src.name
        if self.gate_inputs and kind == "linear" and dim == 1 and not self.layers and info.always_alive() and \
                "input" not in self.blocked:
            in_tensor = f"{node.name}:input"  # the gated input features of an MLP
            n = in_shape[1]
            self.tensors[in_tensor] = TensorInfo(in_tensor, n, 1, 1, (Segment(0, n, (("input", 0),)),))
            self.parent.setdefault(in_tensor, in_tensor)
            self.groups["input"] = ChannelGroup("input", n, 1, node.target, "input", None, [node.target])
        # the host: the last affine BatchNorm reached through sole users and ops that map 0 to 0
        # (conv -> BN, or conv -> ReLU -> BN): a gate before a BN would be renormalised away
        host_node, bns, cur = node, [], node
        while len(cur.users) == 1:
            nxt = next(iter(cur.users))
            if nxt.op == "call_module" and isinstance(self.modules[nxt.target], nn.modules.batchnorm._BatchNorm) \
                    and self.modules[nxt.target].affine and self.calls[nxt.target] == 1:
                host_node = nxt
                bns.append(nxt.target)
            elif not (nxt.op == "call_module" and isinstance(self.modules[nxt.target], ZERO_PRESERVING_MODULES)
                      and self.calls[nxt.target] == 1 or nxt.op == "call_function"
                      and nxt.target in ZERO_PRESERVING_FUNCTIONS or nxt.op == "call_method"
                      and nxt.target in ZERO_PRESERVING_METHODS):
                break
            cur = nxt
        layer = Layer(node.target, kind, in_tensor, host_node.name, in_shape[dim], shape[dim], _area(shape, dim),
                      _kernel_area(mod), None, depthwise, getattr(mod, "bias", None) is not None, bns, groups=groups)
        self.layers[node.target] = layer
        if depthwise:
            self._same(node, src, "depthwise conv bias" if layer.bias else None)
            layer.batchnorms, layer.out_tensor = [], node.name  # its BNs renormalise, they host no gate
            return
        followed = self.tensors.get(self.followers.get(node.target, ""))
        if followed is not None and followed.slots == shape[1] and followed.expansion == 1:
            # a squeeze-and-excitation scale: channel c lives while channel c of what it scales does
            self._set(node, TensorInfo(node.name, shape[1], _area(shape), 1, followed.segments, scale=True))
            self._union(node.name, followed.node)
            layer.batchnorms, layer.out_tensor, layer.follows = [], node.name, followed.node
            return
        gated = node.target not in self.blocked and node.target not in self.head_writers
        gid = node.target if gated else ALWAYS
        out = self._fresh(node, shape, gid, dim)
        self._set(node, out)
        for bn_node in self.gm.graph.nodes:
            if bn_node.op == "call_module" and bn_node.target in bns:
                self.hosted[bn_node.name] = gid or ""
        if gated:
            self.groups[gid] = ChannelGroup(gid, shape[dim], _area(shape, dim), host_node.target, "output",
                                            node.target, tie_period=shape[dim] // groups, dim=dim)
            layer.out_group = gid

    def _tie_input(self, node: fx.Node, src: fx.Node, per_group: int) -> None:
        """A grouped convolution reads ``per_group`` channels per conv group: its input's writer
        must keep the same positions in every group, so its channels are tied with that period.
        Only a single gated writer of every input slot, in order, can be tied; other writers stay
        ungated."""
        info = self._info(src)
        if info.always_alive():
            return
        writers = {g for s in info.segments for g, _ in s.sources}
        gid = next(iter(writers)) if len(writers) == 1 else None
        if gid in self.groups and info.expansion == 1 and self.groups[gid].channels == info.slots and \
                all(s.sources == ((gid, s.start),) for s in info.segments):
            group = self.groups[gid]
            group.tie_period = math.gcd(group.tie_period, per_group)
            return
        self._block(src, f"read by grouped convolution '{node.target}' through a tensor that is not one "
                         "layer's output in order (only a single writer can keep equal positions per group)")

    def _visit_add(self, node, tensor_args) -> None:
        if len(tensor_args) != 2:  # tensor + constant: a constant makes every slot non-zero
            return self._same(node, tensor_args[0], "adding a constant")
        a, b = (self._info(t) for t in tensor_args)
        shape = _shape(node)
        dim = a.dim if not a.always_alive() else b.dim
        if len(shape) >= 2:  # an always-alive operand is counted over the other's channel dim
            a, b = (_always_alive_over(x, shape, dim) if x.always_alive() and x.dim != dim else x for x in (a, b))
        if a.expansion != 1 or b.expansion != 1 or a.slots != b.slots or len(shape) < 2 or \
                shape[1 if dim == 1 else -1] != a.slots or a.dim != b.dim or \
                any(len(_shape(t) or ()) != len(shape) for t in tensor_args):  # a broadcast over other dims
            raise _Unsupported(f"read by '{node.name}', which adds tensors of different channel layouts")
        self._set(node, TensorInfo(node.name, a.slots, _area(shape, dim), 1, _merge(a.segments, b.segments), dim=dim))
        for t in tensor_args:
            if self._info(t).slots == a.slots:  # an always-alive operand counted over another dim keeps its widths
                self._union(node.name, t.name)

    def _visit_mul(self, node, tensor_args) -> None:
        if len(tensor_args) == 1:
            return self._same(node, tensor_args[0])  # scaling by a constant keeps zeros
        a, b = (self._info(t) for t in tensor_args)
        shape = _shape(node)
        if a.slots != b.slots or a.expansion != 1 or b.expansion != 1:
            raise _Unsupported(f"read by '{node.name}', which multiplies tensors of different channel layouts")
        # A product is zero where either factor is; "alive where either writer is" over-approximates
        # (safe: a slot kept alive is computed, never wrongly dropped). A factor that is always
        # alive (a squeeze-and-excitation scale) leaves the other factor's slots unchanged.
        areas = [_area(_shape(t)) for t in tensor_args]
        big = tensor_args[0] if areas[0] >= areas[1] else tensor_args[1]
        if not a.always_alive() and not b.always_alive() and min(areas) < max(areas) and not (a.scale or b.scale):
            # a broadcast scale (squeeze-and-excitation): the layer computing it follows what it scales
            self._block(tensor_args[areas.index(min(areas))], f"computes the channel scale multiplied at "
                        f"'{node.name}' (squeeze-and-excitation) through ops other than activations")
        if a.scale or b.scale:
            segs = self._info(big).segments
        else:
            segs = a.segments if b.always_alive() else b.segments if a.always_alive() else \
                _merge(a.segments, b.segments)
        self._set(node, TensorInfo(node.name, a.slots, _area(shape), 1, segs))
        self._union(node.name, big.name)

    def _visit_cat(self, node) -> None:
        parts = _arg(node, 0, "tensors", [])
        dim = _arg(node, 1, "dim", 0)
        shape = _shape(node)
        if dim not in (1, -len(shape) + 1) or any(not isinstance(p, fx.Node) or p.name not in self.tensors
                                                  for p in parts):
            raise _Unsupported(f"read by torch.cat at node '{node.name}' along dim {dim} (only dim 1 is pruned)")
        infos = [self._info(p) for p in parts]
        if any(info.dim != 1 or (_shape(p) or (0, 0))[1] != info.slots for p, info in zip(parts, infos)):
            # dim 1 is not the parts' channels: tokens (N, L, C) joined along L (a class token before the patches)
            if all(info.always_alive() for info in infos):
                return self._set(node, _always_alive_over(infos[0], shape, -1 if any(i.dim == -1 for i in infos) else 1))
            raise _Unsupported(f"read by torch.cat at node '{node.name}', which joins tokens, not channels")
        segs, start = [], 0
        for p in parts:
            info = self._info(p)
            if info.expansion != 1:
                raise _Unsupported(f"read by torch.cat at node '{node.name}' of flattened tensors")
            segs += [Segment(s.start + start, s.length, s.sources) for s in info.segments]
            start += info.slots
        self._set(node, TensorInfo(node.name, start, _area(shape), 1, tuple(segs)))
        self.cats[node.name] = [p.name for p in parts]

    def _visit_flatten(self, node, tensor_args) -> None:
        src = tensor_args[0]
        info, in_shape, shape = self._info(src), _shape(src), _shape(node)
        if _keeps_channels(info, in_shape, shape):  # (N, C, H, W) -> (N, C, H·W): a ViT's patches
            self._set(node, TensorInfo(node.name, info.slots, _area(shape, info.dim), 1, info.segments, info.scale,
                                       info.dim))
            return self._union(node.name, src.name)
        if info.dim != 1 or len(shape) != 2 or shape[0] != in_shape[0]:
            raise _Unsupported(f"reshaped by '{node.name}' to {shape} (only flattening to (batch, features))")
        if info.expansion != 1 or shape[1] % info.slots:
            raise _Unsupported(f"reshaped by '{node.name}' in a way that mixes channels")
        self._set(node, TensorInfo(node.name, info.slots, info.area, shape[1] // info.slots, info.segments))
        self._union(node.name, src.name)

    # after the pass ---------------------------------------------------------------------
    def _finish_groups(self, nodes) -> None:
        for layer in self.layers.values():
            for gid in self.tensors[layer.in_tensor].sources():
                if gid in self.groups and layer.name not in self.groups[gid].consumers:
                    self.groups[gid].consumers.append(layer.name)
        by_space: dict[str, list[tuple[str, int, int]]] = defaultdict(list)  # space -> (group, start, end)
        for name, info in self.tensors.items():
            space = self._find(name)
            for seg in info.segments:
                for gid, _ in seg.sources:
                    if gid is not ALWAYS:
                        by_space[space].append((gid, seg.start, seg.start + seg.length))
        for ranges in by_space.values():
            for i, (g1, lo1, hi1) in enumerate(ranges):
                for g2, lo2, hi2 in ranges[i + 1:]:
                    if g1 != g2 and lo1 < hi2 and lo2 < hi1:
                        self.groups[g1].shared = self.groups[g2].shared = True
        for g in self.groups.values():
            g.min_keep = 1 if g.position == "heads" else 0  # an attention keeps a head while it is computed
        for gid in _protected_groups(self, nodes):
            self.groups[gid].min_keep = 1


def _always_alive_over(info: TensorInfo, shape, dim: int) -> TensorInfo:
    """An always-alive tensor's description with its channels in ``dim`` of ``shape``."""
    slots = int(shape[1 if dim == 1 else -1])
    return TensorInfo(info.node, slots, _area(shape, dim), 1, (Segment(0, slots, ((ALWAYS, 0),)),), dim=dim)


def _merge(a: tuple[Segment, ...], b: tuple[Segment, ...]) -> tuple[Segment, ...]:
    """Segments of a sum: the common refinement of both, writers of both."""
    cuts = sorted({s.start for s in a + b} | {s.start + s.length for s in a + b})
    out = []
    for lo, hi in zip(cuts, cuts[1:]):
        sources = []
        for segs in (a, b):
            for s in segs:
                if s.start <= lo and hi <= s.start + s.length:
                    sources += [(g, off + lo - s.start) for g, off in s.sources]
        always = any(g is ALWAYS for g, _ in sources)
        out.append(Segment(lo, hi - lo, ((ALWAYS, 0),) if always else tuple(dict.fromkeys(sources))))
    return tuple(out)


def _slice_segments(segments: tuple[Segment, ...], lo: int, hi: int) -> tuple[Segment, ...]:
    """The segments of slots ``lo .. hi`` of a tensor, renumbered from 0."""
    out = []
    for s in segments:
        a, b = max(s.start, lo), min(s.start + s.length, hi)
        if a < b:
            out.append(Segment(a - lo, b - a, tuple((g, off if g is ALWAYS else off + a - s.start)
                                                    for g, off in s.sources)))
    return tuple(out)


def _reads_metadata_only(node: fx.Node) -> bool:
    """``x.size()``, ``x.dim()``, ``x.shape``, ``x.dtype``: what never carries channel values."""
    return node.op == "call_method" and node.target in SHAPE_METHODS or \
        node.op == "call_function" and node.target in (getattr, len)


def _scale_producer(scale: fx.Node, mul: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The conv/linear computing a squeeze-and-excitation scale: reached from the scale through
    single-input nodes, each read by the next one alone (so its dead channels only ever meet
    zeros in the product), or None."""
    node, user = scale, mul
    while True:
        if len(node.users) != 1 or next(iter(node.users)) is not user:
            return None
        if node.op == "call_module" and isinstance(modules.get(node.target), (nn.Conv2d, nn.Linear)):
            return node.target
        if len(node.all_input_nodes) != 1:
            return None
        node, user = node.all_input_nodes[0], node


def _is_permute(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target in ("permute", "transpose", "swapaxes") or \
        node.op == "call_function" and node.target in (torch.permute, torch.transpose, torch.swapaxes)


def _permutation(node: fx.Node, ndim: int) -> list[int]:
    """The dims of ``x.permute(0, 2, 3, 1)``, ``x.permute([0, 2, 3, 1])``, ``torch.permute(x, dims)``
    or ``x.transpose(1, 2)`` (a permutation of ``ndim`` dims)."""
    if node.target in ("transpose", torch.transpose, "swapaxes", torch.swapaxes):
        a, b = (int(_arg(node, i, name, 0)) % ndim for i, name in ((1, "dim0"), (2, "dim1")))
        perm = list(range(ndim))
        perm[a], perm[b] = b, a
        return perm
    dims = list(node.args[1:]) or [node.kwargs.get("dims")]
    return list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims


def _module_exits(nodes) -> dict[str, list[fx.Node]]:
    """Module path -> the nodes its forward returns (those read outside its scope)."""
    exits: dict[str, list[fx.Node]] = defaultdict(list)
    for node in nodes:
        for path in _scopes(node):
            if any(u.op == "output" or path not in _scopes(u) for u in node.users):
                exits[path].append(node)
    return exits


def _scopes(node: fx.Node) -> list[str]:
    """The modules whose forward computed ``node``, outermost first (torch.fx's module stack)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [value[0] if isinstance(value, tuple) else key for key, value in stack.items()]


def _passes_through(node: fx.Node, end: fx.Node, tensors: dict[str, TensorInfo], norms) -> bool:
    """Whether ``node`` reaches ``end`` through sole users that keep its channel slots and mix no
    channels (a LayerNorm would spread the unmasked value over the others)."""
    segments = tensors[node.name].segments
    while node is not end:
        users = _value_users(node)
        if len(users) != 1:
            return False
        node = users[0]
        if node.name not in tensors or tensors[node.name].segments is not segments or node.name in norms:
            return False
    return True


def _value_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values (not only its shape)."""
    return [u for u in node.users if not _reads_metadata_only(u)]


def _parameter_source(node: fx.Node, calls) -> fx.Node | None:
    """The parameter a tensor is, directly or through ``expand(..., -1)`` (a ViT's class token), read
    there alone; else None."""
    if node.op == "call_method" and node.target == "expand" and len(node.users) == 1 and \
            node.args[-1] == -1 and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    if node.op == "get_attr" and calls[node.target] == 1 and len(node.users) == 1:
        return node
    return None


def _keeps_channels(info: TensorInfo, in_shape, shape) -> bool:
    """Whether a reshape of a tensor described by ``info`` keeps its batch and its channel dim (dim 1
    before, or the last dim after, the dims it regroups): (N, C, H, W) -> (N, C, h, p, w, p) (MaxViT's
    windows), (N, G, P, C) -> (N, h, w, p, p, C). Row-major order puts element (n, c, r) of
    (N, C, R) at n·C·R + c·R + r in both shapes, so every element keeps its batch and channel."""
    if info.expansion != 1 or len(shape) < 3 or len(in_shape) < 2 or shape[0] != in_shape[0]:
        return False  # (a 1-d tensor, e.g. a parameter viewed as (C, 1, 1), has no batch and channel dims)
    return shape[1] == in_shape[1] if info.dim == 1 else shape[-1] == in_shape[-1]


def _reduces_spatial_only(node: fx.Node) -> bool:
    dims = _arg(node, 1, "dim", None)
    if dims is None:
        return False
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    shape = _shape(node.args[0])
    nd = len(shape) if shape else 0
    return nd > 2 and all(isinstance(d, int) and (d % nd) >= 2 for d in dims)


def _kernel_area(mod: nn.Module) -> int:
    if isinstance(mod, nn.Conv2d):
        return int(mod.kernel_size[0] * mod.kernel_size[1])
    return 1


def _protected_groups(b: _Builder, nodes) -> set[str]:
    """Groups that must keep a channel so that some path from input to output survives.

    A group whose host output every input→output path crosses (a dominator: every layer of
    a chain) is protected. Where paths split and meet at an ``add`` that no always-alive
    signal reaches (a ResNet pooling block: the branch and the 1×1 shortcut), the writer
    that reads the split point directly (the shortcut) is protected (seed 001, section 4.1).
    """
    tensor_nodes = [n for n in nodes if n.name in b.tensors or n.op == "output"]
    order = {n.name: i for i, n in enumerate(tensor_nodes)}
    succ = {n.name: [u.name for u in n.users if u.name in order] for n in tensor_nodes}
    starts = [n.name for n in tensor_nodes if n.op == "placeholder"]
    end = next(n.name for n in tensor_nodes if n.op == "output")

    def reaches_without(skip: str) -> bool:
        seen, stack = {skip}, [s for s in starts if s != skip]
        while stack:
            cur = stack.pop()
            if cur == end:
                return True
            if cur in seen:
                continue
            seen.add(cur)
            stack += succ.get(cur, [])
        return False

    dominators = {name for name in order if name != end and not reaches_without(name)}
    protected = set()
    for gid, g in b.groups.items():
        layer = b.layers.get(g.producer) if g.producer else None
        if g.position == "input" or (layer and layer.out_tensor in dominators):
            protected.add(gid)
    for layer in b.layers.values():  # an ungated layer must not lose its whole input
        sources = b.tensors[layer.in_tensor].sources()
        if layer.out_group is None and len(sources) == 1 and not b.tensors[layer.in_tensor].always_alive() \
                and not any(g is ALWAYS for s in b.tensors[layer.in_tensor].segments for g, _ in s.sources):
            protected |= sources
    for name in dominators:
        info = b.tensors.get(name)
        if info is None or info.always_alive() or not info.sources():
            continue
        readers = [l for l in b.layers.values() if l.out_group in info.sources()]
        if not readers or any(l.out_group in protected for l in readers):
            continue
        # the writer closest to the split: its input is itself a dominator
        direct = [l for l in readers if l.in_tensor in dominators]
        pick = min(direct or readers, key=lambda l: (l.kernel_area, l.in_features * l.out_channels))
        protected.add(pick.out_group)
    return protected
