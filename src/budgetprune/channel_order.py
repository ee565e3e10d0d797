"""Channel order of a compacted network: channels that only move are laid out as slices.

A compacted ShuffleNet V2 moves most of its channels without computing on them: each unit
concatenates the channels it passes on with its branch's output, and the shuffle's gathers (one
per piece of the next unit's split) pick each channel's next place, so a channel is copied twice
per unit for the few units it passes through before a convolution reads it. In onnxruntime those
copies did not get faster with pruning (``benchmarks/results/deploy_speed_families/profile``). No
layer needs its channels in the order the moves give them, though: a convolution's input columns
can be permuted, and so can the output rows of the convolution that wrote them, with the
BatchNorms, depthwise convolutions, activations and pools between (each works on every channel
alone).

:func:`order_channels` takes each cluster of moves (concatenations, channel gathers and channel
splits joined to each other) that holds a gather or a split. Each layer chain writing into the
cluster (a *writer*) writes its channels grouped by the chain that reads them next (a *reader*);
each reader reads its channels grouped by writer, writers in graph order. Every reader's input is
then one concatenation of contiguous slices of the writers' outputs (``slice_channels``, a view in
torch and a ``Slice`` in onnx): the slices and one ``torch.cat`` per reader replace the cluster. A
writer whose chain cannot be permuted keeps its order (a gather where a reader's channels from it
are not contiguous). A cluster with a reader that cannot be permuted (the model's output, a
residual sum, an op of unknown kind, an op writing in place) is left as it is. Outputs stay equal
to rounding.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from .index_buffers import IndexBuffers
from .ops import select_channels, slice_channels

#: Modules that work on each channel alone, whatever its place (permuted with their channels where
#: they hold per-channel values: BatchNorms and depthwise convolutions).
_PER_CHANNEL = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.GELU,
                nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Mish, nn.Identity, nn.Dropout,
                nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)

#: Functions and tensor methods that work on each channel alone and hold nothing per channel.
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.leaky_relu,
                          F.elu, F.mish, torch.sigmoid, torch.tanh, F.dropout}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}


def _elementwise(node: fx.Node, value: fx.Node) -> bool:
    """Whether ``node`` is an activation function or method of ``value`` alone (no other tensor)."""
    known = (node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS) or \
        (node.op == "call_method" and node.target in _ELEMENTWISE_METHODS)
    return known and bool(node.args) and node.args[0] is value and \
        not any(isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values()))


class _Identity:
    """The positions of a writer that keeps its order: channel c at position c."""

    def __getitem__(self, channel: int) -> int:
        return channel


@dataclass
class _Permutations:
    """The parameter permutations a cluster's rewrite needs: ``(module target, kind) -> index``,
    kind ``rows`` (a writer's conv), ``cols`` (a reader's conv or linear) or ``chan`` (a per-channel
    module between). A module takes at most one permutation of each dim."""

    index: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)

    def conflicts(self, target: str, kind: str) -> bool:
        kinds = {k for t, k in self.index if t == target}
        return kind in kinds or (bool(kinds) and "chan" in kinds | {kind})

    def add(self, target: str, kind: str, perm: torch.Tensor) -> bool:
        if self.conflicts(target, kind):
            return False
        self.index[(target, kind)] = perm
        return True


def order_channels(gm: fx.GraphModule, input_widths: dict[str, int] | None = None) -> int:
    """Rewrite every cluster of channel moves of ``gm`` that holds a gather or a split (see the module
    docstring); returns how many clusters were rewritten. ``gm`` is changed in place (recompile it).
    ``input_widths``: the channels of inputs (placeholders) by name, where known."""
    net = _Net(gm, dict(input_widths or {}))
    applied = _Permutations()
    rewritten = 0
    for cluster in _clusters(gm):
        plan = _plan_cluster(net, cluster, applied)
        if plan is not None:
            _rewrite_cluster(net, cluster, *plan)
            rewritten += 1
    return rewritten


class _Net:
    """What the pass reads of ``gm``: its modules by name, how often each is called, its inputs' widths."""

    def __init__(self, gm: fx.GraphModule, input_widths: dict[str, int]):
        self.gm, self.input_widths = gm, input_widths
        self.modules = dict(gm.named_modules())
        self.calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1

    def module(self, node: fx.Node) -> nn.Module | None:
        """``node``'s module where it is called once and has no parametrization."""
        if node.op != "call_module" or self.calls.get(node.target) != 1:
            return None
        mod = self.modules[node.target]
        return None if parametrize.is_parametrized(mod) else mod


# --- the moves ------------------------------------------------------------------------------------

def _is_cat(node: fx.Node) -> bool:
    if not (node.op == "call_function" and node.target is torch.cat):
        return False
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return isinstance(parts, (list, tuple)) and all(isinstance(p, fx.Node) for p in parts) and dim == 1


def _is_gather(gm: fx.GraphModule, node: fx.Node) -> bool:
    if not (node.op == "call_function" and node.target is select_channels and not node.kwargs
            and len(node.args) in (2, 3) and (len(node.args) == 2 or node.args[2] == 1)):
        return False
    ref = node.args[1]
    return isinstance(ref, fx.Node) and ref.op == "get_attr" and isinstance(_buffer(gm, ref.target), torch.Tensor)


def _is_split(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.split and not node.kwargs and len(node.args) == 3
            and isinstance(node.args[1], (list, tuple)) and all(type(s) is int for s in node.args[1])
            and node.args[2] == 1)


def _is_piece(node: fx.Node, moves: set) -> bool:
    return (node.op == "call_function" and node.target is operator.getitem and node.args[0] in moves
            and _is_split(node.args[0]) and type(node.args[1]) is int)


def _buffer(gm: fx.GraphModule, target: str):
    try:
        return gm.get_buffer(target)
    except AttributeError:
        return None


def _moves(gm: fx.GraphModule) -> set:
    moves = {n for n in gm.graph.nodes if _is_cat(n) or _is_gather(gm, n) or _is_split(n)}
    return moves | {n for n in gm.graph.nodes if _is_piece(n, moves)}


def _clusters(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Clusters of moves joined by their data (each in graph order) that hold a gather or a split."""
    moves = _moves(gm)
    parent = {n: n for n in moves}

    def find(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for node in moves:
        for arg in node.all_input_nodes:
            if arg in moves:
                parent[find(arg)] = find(node)
    members: dict[fx.Node, list] = {}
    for node in gm.graph.nodes:
        if node in moves:
            members.setdefault(find(node), []).append(node)
    return [c for c in members.values() if not all(_is_cat(n) for n in c)]


# --- the chains around a cluster ------------------------------------------------------------------

def _is_full_conv(mod) -> bool:
    return isinstance(mod, nn.Conv2d) and mod.groups == 1


def _is_depthwise(mod) -> bool:
    return isinstance(mod, nn.Conv2d) and mod.groups == mod.in_channels == mod.out_channels


def _is_spatial_mean(node: fx.Node) -> bool:
    """``x.mean((2, 3))`` (or ``dim=[2, 3]``, ``[-2, -1]``), without keepdim: (N, C, H, W) -> (N, C)."""
    if not (node.op == "call_method" and node.target == "mean" and len(node.args) <= 2):
        return False
    dims = node.args[1] if len(node.args) == 2 else node.kwargs.get("dim")
    rest = {k: v for k, v in node.kwargs.items() if k != "dim"}
    return isinstance(dims, (list, tuple)) and sorted(dims) in ([2, 3], [-2, -1]) and rest in ({}, {"keepdim": False})


def _reader_chain(net: _Net, value: fx.Node, user: fx.Node, dim_last: bool = False):
    """The permutations that let ``user`` (and what follows) read ``value``'s channels in any order:
    ``[(target, kind)]`` ending at a conv (columns), or None. ``dim_last``: channels are the last dim."""
    if _in_place(net, user):  # a reader may now read a writer's own output (or a view of it)
        return None
    if _elementwise(user, value):
        return _readers_of(net, user, dim_last)
    if len(user.args) != 1 or user.kwargs or user.args[0] is not value:
        if _is_spatial_mean(user) and user.args[0] is value and not dim_last:
            return _readers_of(net, user, dim_last=True)
        return None
    mod = net.module(user)
    if mod is None:
        return None
    if (_is_full_conv(mod) and not dim_last) or (isinstance(mod, nn.Linear) and dim_last):
        return [(user.target, "cols")]
    if _is_depthwise(mod) and not dim_last:
        rest = _readers_of(net, user, dim_last)
        return None if rest is None else [(user.target, "chan")] + rest
    if isinstance(mod, _PER_CHANNEL) and not (dim_last and not isinstance(mod, (nn.Identity, nn.Dropout))):
        rest = _readers_of(net, user, dim_last)
        return None if rest is None else [(user.target, "chan")] + rest
    return None


def _in_place(net: _Net, node: fx.Node) -> bool:
    """Whether ``node`` may write into its input (``inplace=True``, or a module built so)."""
    if node.op == "call_module":
        return bool(getattr(net.modules.get(node.target), "inplace", False))
    return node.kwargs.get("inplace") is True or any(a is True for a in node.args[1:]) or \
        (node.op == "call_method" and str(node.target).endswith("_"))


def _readers_of(net: _Net, value: fx.Node, dim_last: bool = False):
    return _readers_of_users(net, value, list(value.users), dim_last)


def _readers_of_users(net: _Net, value: fx.Node, users: list, dim_last: bool = False):
    """The permutations that let each of ``users`` read ``value`` in any order (see
    :func:`_reader_chain`), or None where one cannot."""
    if not users:
        return None
    chain = []
    for user in users:
        part = _reader_chain(net, value, user, dim_last)
        if part is None:
            return None
        chain += part
    return chain


def _writer_chain(net: _Net, root: fx.Node):
    """The permutations that let ``root``'s writer write its channels in any order: ``[(target, kind)]``
    from the conv (rows) through the per-channel modules to ``root``, or None."""
    chain, node = [], root
    while True:
        if node.args and isinstance(node.args[0], fx.Node) and _elementwise(node, node.args[0]):
            node = node.args[0]
            if len(node.users) != 1:
                return None
            continue
        mod = net.module(node)
        if mod is None or len(node.args) != 1 or node.kwargs:
            return None
        if _is_full_conv(mod):  # (a linear layer's rows are its last dim, not the moves' dim 1)
            return [(node.target, "rows")] + chain
        if not (_is_depthwise(mod) or isinstance(mod, _PER_CHANNEL)):
            return None
        chain.insert(0, (node.target, "chan"))
        node = node.args[0]
        if not isinstance(node, fx.Node) or len(node.users) != 1:
            return None


def _width(net: _Net, prov, node: fx.Node) -> int | None:
    """How many channels ``node`` has, where its layers say it."""
    if node in prov:
        return len(prov[node])
    if node.op == "placeholder":
        return net.input_widths.get(node.name)
    if node.args and isinstance(node.args[0], fx.Node) and _elementwise(node, node.args[0]):
        return _width(net, prov, node.args[0])
    if node.op != "call_module":
        return None
    mod = net.modules[node.target]
    if isinstance(mod, nn.Conv2d):
        return mod.out_channels
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return mod.num_features
    if isinstance(mod, _PER_CHANNEL) and node.args and isinstance(node.args[0], fx.Node):
        return _width(net, prov, node.args[0])
    return None


# --- planning and rewriting -----------------------------------------------------------------------

def _provenance(net, cluster) -> dict | None:
    """Each move's channels as ``(writer node, channel)``, or None where a width is unknown."""
    prov: dict[fx.Node, list] = {}

    def channels_of(node):
        if node in prov:
            return prov[node]
        width = _width(net, prov, node)
        return None if width is None else [(node, c) for c in range(width)]

    for node in cluster:
        if _is_cat(node):
            parts = [channels_of(p) for p in (node.args[0] if node.args else node.kwargs["tensors"])]
            if any(p is None for p in parts):
                return None
            prov[node] = [e for p in parts for e in p]
        elif _is_gather(net.gm, node):
            src = node.args[0]
            index = _buffer(net.gm, node.args[1].target).tolist()
            if src in prov:
                prov[node] = [prov[src][i] for i in index]
            else:
                prov[node] = [(src, i) for i in index]
        elif _is_split(node):
            src = channels_of(node.args[0])
            if src is None or sum(node.args[1]) != len(src):
                return None
            prov[node] = src
        else:  # a piece of a split
            sizes = node.args[0].args[1]
            lo = sum(sizes[:node.args[1] % len(sizes)])
            prov[node] = prov[node.args[0]][lo:lo + sizes[node.args[1] % len(sizes)]]
    return prov


def _plan_cluster(net: _Net, cluster, applied: _Permutations):
    in_cluster = set(cluster)
    prov = _provenance(net, cluster)
    if prov is None:
        return None
    order = {n: i for i, n in enumerate(net.gm.graph.nodes)}
    readers, perms = [], _Permutations()
    for node in cluster:
        outside = [u for u in node.users if u not in in_cluster]
        if not outside:
            continue
        if _is_split(node) or len(set(prov[node])) != len(prov[node]):
            return None
        chain = _readers_of_users(net, node, outside)
        if chain is None:
            return None
        readers.append((node, chain))
    writers = sorted({w for node in cluster for w, _ in prov[node]}, key=order.__getitem__)
    use: dict[tuple, list[int]] = {}
    for i, (node, _) in enumerate(readers):
        for entry in prov[node]:
            use.setdefault(entry, []).append(i)
    position, writer_perm = {}, {}
    for w in writers:
        width = _width(net, {}, w)
        chain = _writer_chain(net, w)
        others = [u for u in w.users if u not in in_cluster]
        if chain is not None and others:
            extra = _readers_of_users(net, w, others)
            chain = None if extra is None else chain + extra
        if chain is None or width is None:  # keeps its order
            position[w] = _Identity()
            continue
        new = sorted(range(width), key=lambda c: (tuple(use.get((w, c), ())) or (len(readers),), c))
        perm = torch.tensor(new)  # a reader of the writer outside the cluster takes its order too
        if not all(perms.add(t, k, perm) for t, k in chain):
            return None
        writer_perm[w] = perm
        position[w] = [0] * width
        for p, c in enumerate(new):
            position[w][c] = p
    layouts = []
    for node, chain in readers:
        # (writer, its new position, its channel) per channel the reader takes, in the reader's order
        entries = [(w, position[w][c], c) for w, c in prov[node]]
        arranged = sorted(range(len(entries)), key=lambda i: (order[entries[i][0]], entries[i][1]))
        perm = torch.tensor(arranged)
        if not all(perms.add(t, k, perm) for t, k in chain):
            return None
        layouts.append((node, [entries[i] for i in arranged]))
    if any(applied.conflicts(target, kind) for target, kind in perms.index):
        return None
    applied.index.update(perms.index)
    return perms, layouts, writer_perm


def _permute(net: _Net, target: str, kind: str, perm: torch.Tensor) -> None:
    mod = net.modules[target]

    def take(tensor, dim):
        return tensor.detach().index_select(dim, perm.to(tensor.device)).clone()

    if kind == "cols":
        mod.weight = nn.Parameter(take(mod.weight, 1), requires_grad=mod.weight.requires_grad)
        return
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        for name in ("running_mean", "running_var"):
            if getattr(mod, name) is not None:
                setattr(mod, name, take(getattr(mod, name), 0))
    elif not isinstance(mod, nn.Conv2d):
        return  # an activation, a pool, an identity: nothing per channel
    for name in ("weight", "bias"):
        param = getattr(mod, name, None)
        if param is not None:
            setattr(mod, name, nn.Parameter(take(param, 0), requires_grad=param.requires_grad))


def _runs(layout):
    """``layout`` ((writer, position, channel) per read channel) cut into maximal runs of one writer's
    consecutive positions: ``(writer, start, stop)``."""
    runs = []
    for writer, pos, _ in layout:
        if runs and runs[-1][0] is writer and runs[-1][2] == pos:
            runs[-1][2] = pos + 1
        else:
            runs.append([writer, pos, pos + 1])
    return [tuple(r) for r in runs]


def _rewrite_cluster(net: _Net, cluster, perms: _Permutations, layouts, writer_perm) -> None:
    gm = net.gm
    g = gm.graph
    buffers = IndexBuffers(gm, "_budgetprune_order")
    inside = set(cluster)
    for (target, kind), perm in perms.index.items():
        _permute(net, target, kind, perm)
    order = {n: i for i, n in enumerate(g.nodes)}
    for node, layout in layouts:
        # what the reader takes from each writer: runs of positions (slices, the whole output where a run
        # covers it), or one gather where a writer that keeps its order gives it channels out of order
        first = min((u for u in node.users if u not in inside), key=order.__getitem__)
        parts = []
        with g.inserting_before(first):
            for writer in dict.fromkeys(w for w, _, _ in layout):
                mine = [e for e in layout if e[0] is writer]
                runs = _runs(mine)
                width = _width(net, {}, writer)
                if writer not in writer_perm and (len(runs) > 1 or width is None):
                    ref = buffers.add(g, torch.tensor([c for _, _, c in mine]))
                    parts.append(g.call_function(select_channels, (writer, ref)))
                    continue
                for _, start, stop in runs:
                    parts.append(writer if (start, stop) == (0, width) else
                                 g.call_function(slice_channels, (writer, start, stop)))
            new = parts[0] if len(parts) == 1 else g.call_function(torch.cat, (parts, 1))
        node.replace_all_uses_with(new, delete_user_cb=lambda u: u not in inside)
    for node in reversed(cluster):
        if node.users:
            raise RuntimeError(f"internal error: '{node.name}' is still read after its channels were laid out")
        refs = [a for a in node.all_input_nodes if a.op == "get_attr"]
        g.erase_node(node)
        for ref in refs:
            if not ref.users:
                g.erase_node(ref)
                if ref.target in gm._buffers and not any(n.op == "get_attr" and n.target == ref.target
                                                         for n in g.nodes):
                    del gm._buffers[ref.target]

