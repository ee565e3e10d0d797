"""Physical compaction: a smaller network from keep-masks, as a ``torch.fx.GraphModule``.

The model's traced graph is copied and every conv, linear and BatchNorm is replaced by a
smaller one holding only the channels the compacted network keeps
(:func:`budgetprune.liveness.slot_sets`). Each kept channel's deterministic gate value
ẑ ∈ (0, 1] is folded into its host (the BatchNorm's γ and β, or the layer's weight and
bias): z·(Wx + b) = (zW)x + zb and z·BN(x) = BN with (zγ, zβ).

Residual adds of tensors that no longer keep the same channels become the mixed-
connectivity block of seed 001 (supplement 2): ``h_l = scatterAdd(h_{l-1}, Δ, I_out)``
(:func:`budgetprune.ops.index_add_channels`), so only alive maps are computed. With
``mode="regular"`` tensors that are added keep equal widths instead (the extra channels
compute zeros), as a plain ResBlock implementation needs. A squeeze-and-excitation scale is
sliced to the channels it multiplies. Channels that only move between layers (ShuffleNet's
splits, shuffles and concatenations) are laid out as slices of permuted layers
(:mod:`budgetprune.channel_order`). The compacted module computes the same outputs as
the gated model in eval mode; :func:`budgetprune.io.save` stores it without pickled code.
"""

from __future__ import annotations

import copy
import operator
import re

import torch
from torch import fx, nn

from . import layer_subclasses, norm_act
from .attention import head_columns, pruned_proj, pruned_qkv
from .blocks import built_sets
from .channel_order import order_channels
from .graph import ADD_FUNCTIONS, FLATTEN_METHODS, MUL_FUNCTIONS, ChannelGraph
from .index_buffers import IndexBuffers
from .liveness import alive_sets, effective_masks, padding_of
from .ops import RelativeAttention, SelfAttention, full_count_layer_norm, index_add_channels, scatter_channels, \
    select_channels, window_attention

SUB_FUNCTIONS = {operator.sub, operator.isub, torch.sub}


def compact(model: nn.Module, graph: ChannelGraph, masks: dict[str, torch.Tensor] | None = None,
            gate_values: dict[str, torch.Tensor] | None = None, mode: str = "mixed",
            fold_splits: bool = True, order_moves: bool = True) -> fx.GraphModule:
    """Build the compacted network (eval mode, on the model's device).

    ``masks[group]`` keeps channel i where True (groups not listed keep everything);
    ``gate_values[group]`` is the per-channel scale to fold (1 where not given).
    ``fold_splits``: a gather read only by a channel split becomes one gather per piece
    (False: the form of plans written before that, whose saved index buffers it keeps).
    ``order_moves``: channels that only move (ShuffleNet's splits, shuffles and concatenations) are
    laid out as slices, their writers' and readers' channels permuted to match
    (:func:`budgetprune.channel_order.order_channels`; False: the form of plans written before that).
    The network's ``budgetprune_moves_ordered`` says how many clusters of moves were laid out (its
    plan must say so: :func:`budgetprune.plan.make_plan`).
    """
    full = {gid: torch.ones(g.channels, dtype=torch.bool) for gid, g in graph.groups.items()}
    masks = {**full, **{g: m.detach().bool().cpu() for g, m in (masks or {}).items()}}
    from .resources import layer_costs  # resources → latency → io → plan → compact: imported here

    eff = effective_masks(graph, masks)
    mode, sets = built_sets(graph, eff, mode, lambda: layer_costs(graph, "flops"))  # auto: chosen for these masks
    index = {name: torch.nonzero(s).flatten() for name, s in sets.items()}
    alive = sets if mode == "mixed" and padding_of(mode).multiple == 1 else alive_sets(graph, eff)
    gm = _traced_copy(model, graph)  # the model's own weights
    modules = dict(gm.named_modules())
    device = next(model.parameters()).device

    hosted = {}
    purged = set()  # pruned-away layers' modules (a window attention's call): the rewrite leaves them unused
    for layer in graph.layers.values():
        gid = layer.out_group
        z = None
        if gid is not None:
            z = torch.ones(graph.groups[gid].channels)
            if gate_values and gid in gate_values:
                z = gate_values[gid].detach().float().cpu().clone()
            z = z * eff[gid].float()
        info_in = graph.tensors[layer.in_tensor]
        cols = _expand(index[layer.in_tensor], info_in.expansion)
        rows = index[layer.in_tensor] if layer.depthwise else \
            (index[layer.out_tensor] if gid or layer.follows else None)  # a scale keeps what it multiplies
        mod = modules[layer.name]
        if rows is not None and (rows.numel() == 0 or (gid is not None and not bool(eff[gid].any()))):
            # a pruned-away branch (its output is all zeros): removed with the graph rewrite
            if layer.kind == "attention" and layer.attention.family == "window":
                purged.add(layer.out_tensor)
                continue  # a function call: removed with the graph rewrite, its parameters with it
            _replace(gm, layer.name, nn.Identity())
            purged.add(layer.name)
            for bn in layer.batchnorms:
                _replace(gm, bn, nn.Identity())
                hosted[bn] = True
            continue
        zr = z[rows] if z is not None else None
        if layer.kind == "attention":  # its query/key/value and output projections lose channels and heads
            rows = rows if rows is not None else torch.arange(layer.out_channels)
            heads, z_heads = _kept_heads(layer, index, eff, gate_values)
            if layer.attention.family == "multihead" and isinstance(mod, nn.MultiheadAttention):
                _replace(gm, layer.name, SelfAttention.pruned(mod, cols, rows, zr, heads, z_heads))
            elif layer.attention.family == "multihead":  # timm's: read through the spec's parameter paths
                spec = layer.attention
                qkv_w, qkv_b, proj_w, proj_b = (gm.get_parameter(p) if p is not None else None for p in (
                    spec.qkv_weight, spec.qkv_bias, spec.proj_weight, spec.proj_bias))
                _replace(gm, layer.name, SelfAttention.from_projections(
                    qkv_w, qkv_b, proj_w, proj_b, spec.num_heads, spec.dropout, spec.tuple_output,
                    cols, rows, zr, heads, z_heads))
                for node in gm.graph.nodes:  # called with its input alone (the optional ones it had were unset)
                    if node.op == "call_module" and node.target == layer.name:
                        node.args, node.kwargs = node.args[:1], {}
            elif layer.attention.family == "relative":
                _replace(gm, layer.name, RelativeAttention.pruned(mod, cols, rows, zr, heads, z_heads))
            else:
                _prune_window_attention(gm, layer, cols, rows, zr, heads, z_heads)
            continue
        z_in = None
        if layer.in_tensor.endswith(":input") and gate_values and "input" in gate_values:
            z_in = gate_values["input"].detach().float().cpu()[index[layer.in_tensor]]  # MLP input gates
        new = _slice_layer(mod, rows, None if layer.depthwise else cols, layer.depthwise,
                           zr if not layer.batchnorms else None, z_in, layer.groups)
        _replace(gm, layer.name, layer_subclasses.sliced(mod, new))
        for i, bn in enumerate(layer.batchnorms):
            last = i == len(layer.batchnorms) - 1
            _replace(gm, bn, _slice_bn(modules[bn], rows, zr if (last and zr is not None) else None))
            hosted[bn] = True
    # BatchNorms that host no gate: slice to their tensor's channels, zero the dead ones
    nodes = list(gm.graph.nodes)
    for node in nodes:
        if node.op == "call_module" and node.target not in hosted and node.name in graph.tensors and \
                isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            keep = index[node.name]
            live = alive[node.name][keep].float()
            _replace(gm, node.target, _slice_bn(modules[node.target], keep, live) if keep.numel() else nn.Identity())
            hosted[node.target] = True
    _slice_parameters(gm, graph, index)
    _rewrite_graph(gm, graph, index, alive, sets)
    if fold_splits:
        _fold_gathers_into_splits(gm)
    _rewrite_norms(gm, graph, index)
    _remove_empty(gm, index, purged)
    # the inputs keep their widths (a gated input is gathered where a layer reads it)
    input_widths = {n.name: graph.tensors[n.name].slots for n in gm.graph.nodes
                    if n.op == "placeholder" and n.name in graph.tensors and graph.tensors[n.name].dim == 1}
    gm.budgetprune_moves_ordered = order_channels(gm, input_widths) if order_moves else 0
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm.budgetprune_mode = mode
    return gm.to(device).eval()


def unpruned_copy(model: nn.Module, graph: ChannelGraph) -> fx.GraphModule:
    """The model as traced, without the pruner's hooks (eval mode, on the model's device): the network
    a pruned one's latency is measured against. Not :func:`compact` with every channel kept, which
    rewrites some ops: ShuffleNet V2 x0.5's channel shuffles become gathers there (slices of permuted
    layers since :mod:`budgetprune.channel_order`), and that network ran about 7 % faster than the model
    itself in onnxruntime (batch 16), so a latency budget measured against it ended at 0.83–0.88 of the
    budget when the result was timed against the model."""
    return _traced_copy(model, graph).to(next(model.parameters()).device).eval()


def _kept_heads(layer, index, eff, gate_values) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An attention layer's kept heads and their gate values to fold (None: every head, no gates)."""
    if layer.heads is None:
        return torch.arange(layer.attention.num_heads), None
    heads = index[layer.heads_tensor]
    z = gate_values[layer.heads].detach().float().cpu() if gate_values and layer.heads in gate_values else \
        torch.ones(layer.attention.num_heads)
    return heads, (z * eff[layer.heads].float())[heads]


def _prune_window_attention(gm: fx.GraphModule, layer, cols: torch.Tensor, rows: torch.Tensor,
                            z: torch.Tensor | None, heads: torch.Tensor, z_heads: torch.Tensor | None) -> None:
    """Swin's window attention on the kept channels and heads: its query/key/value weight keeps the
    input columns ``cols`` and the heads' rows, its output projection the rows ``rows`` (``z`` folded
    in) and the heads' columns, its relative position bias table the heads' columns; the call runs
    :func:`budgetprune.ops.window_attention`, which takes its widths from the weights. Swin V2's
    logit scale keeps the heads' entries (``head_params``), its bias MLP the heads' outputs (a layer
    that follows the heads) and the view that splits them its head count."""
    spec = layer.attention
    get = lambda path: gm.get_parameter(path) if path is not None else None  # noqa: E731
    w_in, b_in = pruned_qkv(get(spec.qkv_weight), get(spec.qkv_bias), spec.head_dim, cols, heads, z_heads)
    w_out, b_out = pruned_proj(get(spec.proj_weight), get(spec.proj_bias), spec.head_dim, rows, heads, z)
    for path, value in ((spec.qkv_weight, w_in), (spec.qkv_bias, b_in), (spec.proj_weight, w_out),
                        (spec.proj_bias, b_out)):
        if path is not None:
            _set_parameter(gm, path, value)
    for path, axis in spec.head_params or ():
        value = get(path).detach()
        _set_parameter(gm, path, value.index_select(axis, heads.to(value.device)))
    node = next(n for n in gm.graph.nodes if n.name == layer.out_tensor)
    node.target = window_attention
    if int(heads.numel()) != spec.num_heads:
        if len(node.args) > 5:
            node.args = (*node.args[:5], int(heads.numel()), *node.args[6:])
        else:
            node.kwargs = {**node.kwargs, "num_heads": int(heads.numel())}
        for view in (n for n in gm.graph.nodes if n.name in spec.head_views):  # V2's bias: (-1, heads)
            view.args = (view.args[0], -1, int(heads.numel()))


def _set_parameter(gm: fx.GraphModule, path: str, value: torch.Tensor) -> None:
    """Replace the parameter at ``path`` with ``value`` (trainable as it was)."""
    owner_path, _, attr = path.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    old = getattr(owner, attr)
    setattr(owner, attr, nn.Parameter(value.clone(), requires_grad=old.requires_grad))


def _slice_parameters(gm: fx.GraphModule, graph: ChannelGraph, index) -> None:
    """Parameters read across a tensor's channels (a layer scale, a LayerNorm's weight and bias)
    keep the entries of the channels that tensor keeps."""
    for path, param in graph.params.items():
        owner_path, _, attr = path.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        value = getattr(owner, attr)
        keep = index[param.tensor]
        if keep.numel() == value.shape[param.axis]:
            continue
        sliced = value.detach().index_select(param.axis, keep.to(value.device))
        if isinstance(value, nn.Parameter):
            setattr(owner, attr, nn.Parameter(sliced, requires_grad=value.requires_grad))
        elif attr in owner._buffers:
            owner._buffers[attr] = sliced
        else:
            setattr(owner, attr, sliced)


def _rewrite_norms(gm: fx.GraphModule, graph: ChannelGraph, index) -> None:
    """A LayerNorm over channels some of which are pruned becomes :func:`full_count_layer_norm`
    of the kept ones (its statistics still count the pruned channels as the zeros they were)."""
    g = gm.graph
    nodes = {n.name: n for n in g.nodes}
    for name, norm in graph.norms.items():
        node = nodes.get(name)
        kept = index[norm.tensor].numel()
        if node is None or kept in (0, norm.channels):
            continue
        with g.inserting_before(node):
            if norm.module is not None:  # the module holds the sliced parameters; the function reads them
                old = gm.get_submodule(norm.module)
                new_norm = nn.LayerNorm(kept, eps=old.eps, bias=old.bias is not None).to(old.weight.device, old.weight.dtype)
                new_norm.load_state_dict(old.state_dict())
                _replace(gm, norm.module, new_norm)
                weight = g.get_attr(norm.weight)
                bias = g.get_attr(norm.bias) if norm.bias is not None else None
            else:
                weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
                bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
            new = g.call_function(full_count_layer_norm, (node.args[0], norm.channels, weight, bias, norm.eps))
        new.meta["budgetprune_tensor"] = name
        node.replace_all_uses_with(new)
        g.erase_node(node)


def _remove_empty(gm: fx.GraphModule, index, purged: set[str]) -> None:
    """Drop what no longer feeds the output (pruned-away branches: depth determination). What is
    left must neither keep a tensor without channels nor run a pruned-away layer (``purged``: its
    output is no zero padding, a tensor that keeps channels of a layer that computes them is)."""
    for node in reversed(list(gm.graph.nodes)):
        if node.op not in ("placeholder", "output") and not node.users:
            gm.graph.erase_node(node)
        elif node.op == "placeholder" and node.args and not node.users:
            gm.graph.erase_node(node)  # an optional input nothing reads any more (a ViT's unset attention mask)
    for node in gm.graph.nodes:
        name = _tensor_name(node)
        if (node.target if node.op == "call_module" else node.name) in purged:
            raise RuntimeError(f"internal error: the pruned-away layer '{node.name}' is still used by "
                               f"{', '.join(u.name for u in node.users)}")
        if name in index and index[name].numel() == 0 and node.op != "placeholder":
            raise RuntimeError(f"internal error: the emptied tensor '{name}' is still used by "
                               f"{', '.join(u.name for u in node.users)}")


def _traced_copy(model: nn.Module, graph: ChannelGraph) -> fx.GraphModule:
    """The graph the model was traced to, run by copies of the model's modules without hooks."""
    return _copy_without_hooks(fx.GraphModule(model, copy.deepcopy(graph.gm.graph)))


def _copy_without_hooks(gm: fx.GraphModule) -> fx.GraphModule:
    root = copy.deepcopy(gm)
    for m in root.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return root


def _expand(index: torch.Tensor, expansion: int) -> torch.Tensor:
    """Channel indices → feature indices after a flatten with ``expansion`` features each."""
    if expansion == 1:
        return index
    return (index[:, None] * expansion + torch.arange(expansion)[None, :]).flatten()


def _replace(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, new)


def _slice_layer(mod: nn.Module, rows, cols, depthwise: bool, z, z_in=None, groups: int = 1) -> nn.Module:
    """A new conv/linear keeping output ``rows`` and input ``cols`` (None: all), gates folded:
    ``z`` scales the outputs, ``z_in`` the inputs. A grouped convolution keeps its ``groups``:
    each keeps the same positions (the graph ties them), so its input columns are the
    positions kept in the first group."""
    W = mod.weight.detach()
    b = mod.bias.detach() if mod.bias is not None else None
    if rows is not None:
        W = W.index_select(0, rows.to(W.device))
        b = b.index_select(0, rows.to(W.device)) if b is not None else None
    if cols is not None and groups > 1:
        cols = _group_positions(cols, groups, mod.in_channels // groups)
        if rows is not None:
            _group_positions(rows, groups, mod.out_channels // groups)
    if cols is not None:
        W = W.index_select(1, cols.to(W.device))
    if z_in is not None:
        W = W * z_in.to(W.device, W.dtype)[None, :]
    if z is not None:
        z = z.to(W.device, W.dtype)
        W = W * z.view(-1, *([1] * (W.dim() - 1)))
        b = b * z if b is not None else None
    if isinstance(mod, nn.Conv2d):
        out_c = W.shape[0]
        in_c = out_c if depthwise else W.shape[1]
        if groups > 1:
            in_c = W.shape[1] * groups
        new = nn.Conv2d(in_c, out_c, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                        groups=out_c if depthwise else groups, bias=b is not None, padding_mode=mod.padding_mode)
    else:
        new = nn.Linear(W.shape[1], W.shape[0], bias=b is not None)
    new = new.to(W.device, W.dtype)
    with torch.no_grad():
        new.weight.copy_(W)
        if b is not None:
            new.bias.copy_(b)
    return new


def _group_positions(index: torch.Tensor, groups: int, per_group: int) -> torch.Tensor:
    """The positions within a group that a grouped convolution keeps, given the kept channel
    ``index`` over all its groups; every group must keep the same positions."""
    if index.numel() % groups:
        raise RuntimeError(f"internal error: {index.numel()} kept channels cannot split into {groups} equal groups")
    local = index.view(groups, -1) - (torch.arange(groups, device=index.device) * per_group)[:, None]
    if bool((local != local[0]).any()) or bool((local < 0).any()) or bool((local >= per_group).any()):
        raise RuntimeError("internal error: a grouped convolution's groups keep different positions")
    return local[0]


def _slice_bn(bn: nn.modules.batchnorm._BatchNorm, keep, z) -> nn.Module:
    keep = keep if keep is not None else torch.arange(bn.num_features)
    if type(bn) not in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):  # a subclass: copied, its activation with it
        return norm_act.sliced(bn, keep, z)
    new = type(bn)(int(keep.numel()), bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new = new.to(bn.weight.device if bn.weight is not None else "cpu")
    idx = keep.to(new.running_mean.device if new.running_mean is not None else "cpu")
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(bn, name)
            if src is not None:
                value = src.detach().index_select(0, idx)
                if z is not None and name in ("weight", "bias"):
                    value = value * z.to(value.device, value.dtype)
                getattr(new, name).copy_(value)
        if bn.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def _positions(inner: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
    """Where each index of ``inner`` sits in the sorted index list ``outer``."""
    return torch.searchsorted(outer, inner)


def _rewrite_graph(gm, graph: ChannelGraph, index, alive, sets) -> None:
    buffers = IndexBuffers(gm, "_budgetprune_index")
    g = gm.graph
    first_linear_input = {l.name: l.in_tensor for l in graph.layers.values() if l.in_tensor.endswith(":input")}
    for node in list(g.nodes):
        if node.op == "call_module" and node.target in first_linear_input:
            t = first_linear_input[node.target]
            idx = index[t]
            if idx.numel() != graph.tensors[t].slots:
                src = node.args[0]
                ref = buffers.add(g, idx, node)
                with g.inserting_before(node):
                    sel = g.call_function(select_channels, (src, ref))
                node.replace_input_with(src, sel)
            continue
        if node.name in graph.splits:  # pieces of a chunk/split: the kept slots of each range
            src, pieces = graph.splits[node.name]
            kept, lo = [], 0
            for piece in pieces:
                n = graph.tensors[piece].slots
                kept.append(int(((index[src] >= lo) & (index[src] < lo + n)).sum()))
                lo += n
            with g.inserting_before(node):
                split = g.call_function(torch.split, (node.args[0], kept, 1))
            node.replace_all_uses_with(split)
            g.erase_node(node)
            continue
        if node.name in graph.computed_gathers:  # a probed channel map, run on the kept input channels
            src, perm = graph.gathers[node.name]
            if not torch.equal(torch.nonzero(torch.isin(perm, index[src])).flatten(), index[node.name]):
                raise RuntimeError(f"internal error: '{node.name}' keeps other channels than its input gives it")
            continue
        if node.name in graph.gathers:  # a channel shuffle or slice: one gather of the kept slots, in order
            src, perm = graph.gathers[node.name]
            ref = buffers.add(g, _positions(perm[index[node.name]], index[src]), node)
            with g.inserting_before(node):
                gathered = g.call_function(select_channels, (_gathered_source(node), ref))
            gathered.meta["budgetprune_tensor"] = node.name
            node.replace_all_uses_with(gathered)
            g.erase_node(node)
            continue
        if node.name not in graph.tensors:
            continue
        is_add = (node.op == "call_function" and node.target in ADD_FUNCTIONS) or \
            (node.op == "call_method" and node.target in ("add", "sub"))
        is_mul = (node.op == "call_function" and node.target in MUL_FUNCTIONS) or \
            (node.op == "call_method" and node.target == "mul")
        tensor_args = [a for a in node.args if isinstance(a, fx.Node) and _tensor_name(a) in graph.tensors]
        # an always-alive operand counted over another dim (a token tensor reshaped from a channels-last
        # map, added to an MLP's output over channels) is every channel of the sum to the graph, which
        # may gate the other operand's writer: the sum is rewritten as any other, that side kept whole
        width = graph.tensors[node.name].slots
        whole = {_tensor_name(t) for t in tensor_args if is_add and graph.tensors[_tensor_name(t)].slots != width
                 and graph.tensors[_tensor_name(t)].always_alive()}
        # other operands counted over different dims were never pruned through: the graph left their
        # writers ungated, and the op stays as it is
        counted = {graph.tensors[_tensor_name(t)].slots for t in (*tensor_args, node)
                   if _tensor_name(t) in graph.tensors and _tensor_name(t) not in whole}
        by_parameter = any(a.op == "get_attr" and a.target in graph.params for a in tensor_args)
        if (is_add or is_mul) and len(tensor_args) == 2 and _same_layout(node, tensor_args) and len(counted) == 1 \
                and not by_parameter:
            kept, live = index, alive
            if whole:
                kept = {**index, **{t: torch.arange(width) for t in whole}}
                live = {**alive, **{t: torch.ones(width, dtype=torch.bool) for t in whole}}
            _rewrite_binary(g, buffers, node, tensor_args, kept, live, is_add,
                            node.target in SUB_FUNCTIONS or node.target == "sub", graph.tensors[node.name].dim)
        elif node.op == "call_function" and node.target is torch.cat:
            parts = node.args[0] if node.args else node.kwargs["tensors"]
            kept = [p for p in parts if index[_tensor_name(p)].numel() > 0]
            if len(kept) != len(parts):
                rest = tuple(node.args[1:])
                node.args = (kept,) + rest if node.args else ()
                if not node.args:
                    node.kwargs = {**node.kwargs, "tensors": kept}
        elif node.op == "call_method" and node.target in ("view", "reshape") and len(_shape_of(node)) == 3 \
                and len(_shape_of(node.args[0])) == 4 and _shape_of(node)[:2] == _shape_of(node.args[0])[:2]:
            with g.inserting_before(node):  # (N, C, H, W) -> (N, C, H·W): a ViT's patches, as a flatten (no
                flat = g.call_function(torch.flatten, (node.args[0], 2))  # sizes computed from shapes to save)
            flat.meta["budgetprune_tensor"] = node.name
            node.replace_all_uses_with(flat)
            g.erase_node(node)
        elif node.op == "call_method" and node.target in ("view", "reshape") and len(_shape_of(node)) > 2:
            _resize_channels(node, graph.tensors[node.name], int(index[node.name].numel()))
        elif node.op == "call_method" and node.target in FLATTEN_METHODS and node.target != "flatten" \
                and len(_shape_of(node)) == 2 and _shape_of(node)[0] == _shape_of(node.args[0])[0]:
            # a flatten to (batch, features); other reshapes keep their sizes
            with g.inserting_before(node):
                flat = g.call_function(torch.flatten, (node.args[0], 1))
            flat.meta["budgetprune_tensor"] = node.name
            node.replace_all_uses_with(flat)
            g.erase_node(node)
        if node.name in graph.renormalisers and not getattr(node, "_erased", False) and not _is_bn(gm, node):
            dead = ~alive[node.name][index[node.name]]
            if bool(dead.any()):  # regular mode: channels kept for width only must stay zero
                live = (~dead).float()
                shape = [1] * len(_shape_of(node))
                shape[1 if graph.tensors[node.name].dim == 1 else -1] = -1
                ref = buffers.add(g, live.view(shape), node.next)
                with g.inserting_after(ref):
                    masked = g.call_function(operator.mul, (node, ref))
                masked.meta["budgetprune_tensor"] = node.name
                node.replace_all_uses_with(masked, delete_user_cb=lambda u: u is not masked)


def _resize_channels(node: fx.Node, info, kept: int) -> None:
    """A reshape that keeps the channel dim (a ViT's (N, C, H, W) -> (N, C, H·W), MaxViT's windows)
    with its channel count written out: the count becomes the kept one (a computed size, read from
    the compacted input's shape, is right as it is)."""
    packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
    sizes = list(node.args[1] if packed else node.args[1:])
    at = 1 if info.dim == 1 else len(sizes) - 1
    if not isinstance(sizes[at], int) or sizes[at] != info.slots or kept == info.slots:
        return
    sizes[at] = kept
    node.args = (node.args[0], type(node.args[1])(sizes)) if packed else (node.args[0], *sizes)


def _with_dim(args: tuple, dim: int) -> tuple:
    """A channel op's arguments, with the channel dim only where it is not the default 1 (files
    written before tokens were pruned call the ops without it)."""
    return args if dim == 1 else (*args, dim)


def _fold_gathers_into_splits(gm: fx.GraphModule) -> None:
    """A gather of channels read only by a channel split (ShuffleNet: the shuffle, then the next
    unit's chunk) becomes one gather per piece, straight from the gather's source: the same
    values without the split's copy of the whole gathered tensor (onnxruntime's ``Split`` cost
    as much as the shuffle's ``Gather`` in a pruned ShuffleNet). Only gathers of this module's
    own index buffers (``_budgetprune_index_N``, read by that one gather) are folded."""
    g = gm.graph
    for split in list(g.nodes):
        if not (split.op == "call_function" and split.target is torch.split and len(split.args) == 3
                and split.args[2] == 1 and isinstance(split.args[1], list)):
            continue
        gather, sizes = split.args[0], split.args[1]
        if not (isinstance(gather, fx.Node) and gather.op == "call_function" and gather.target is select_channels
                and len(gather.args) == 2 and not gather.kwargs and len(gather.users) == 1):
            continue
        ref = gather.args[1]
        if not (isinstance(ref, fx.Node) and ref.op == "get_attr" and _INDEX_BUFFER.fullmatch(ref.target)
                and len(ref.users) == 1
                and sum(n.op == "get_attr" and n.target == ref.target for n in g.nodes) == 1):
            continue
        pieces = list(split.users)
        if 0 in sizes or not all(u.op == "call_function" and u.target is operator.getitem
                                 and type(u.args[1]) is int and -len(sizes) <= u.args[1] < len(sizes)
                                 for u in pieces):
            continue
        source, index = gather.args[0], gm.get_buffer(ref.target)
        bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
        buffers = IndexBuffers(gm, f"{ref.target}_piece")
        for piece in pieces:
            i = piece.args[1] % len(sizes)
            piece_ref = buffers.add(g, index[bounds[i]:bounds[i + 1]], piece)
            with g.inserting_before(piece):
                alone = g.call_function(select_channels, (source, piece_ref))
            alone.meta.update(piece.meta)
            alone.meta["budgetprune_tensor"] = _tensor_name(piece)
            piece.replace_all_uses_with(alone)
            g.erase_node(piece)
        g.erase_node(split)
        g.erase_node(gather)
        g.erase_node(ref)
        del gm._buffers[ref.target]


_INDEX_BUFFER = re.compile(r"_budgetprune_index_\d+")


def _gathered_source(node: fx.Node) -> fx.Node:
    """What a channel slice ``x[:, a:b]`` reads, or a channel shuffle: the input of the 5-d view
    its chain starts with."""
    if node.op == "call_function" and node.target is operator.getitem:
        return node.args[0]
    node = node.args[0]
    while not (node.op == "call_method" and node.target in ("view", "reshape") and len(_shape_of(node)) == 5):
        node = node.args[0]
    return node.args[0]


def _tensor_name(node: fx.Node) -> str:
    """The graph tensor a (possibly rewritten) node computes."""
    return node.meta.get("budgetprune_tensor", node.name)


def _is_bn(gm, node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm)


def _same_layout(node: fx.Node, operands: list[fx.Node]) -> bool:
    """Whether the operands of an add or mul have the result's dims, channels at dim 1 (a broadcast
    over other dims, such as an attention bias added to (batch, windows, heads, N, N), is no channel op)."""
    known = [m.shape for m in (t.meta.get("tensor_meta") for t in (node, *operands)) if m is not None]
    return len({len(shape) for shape in known}) <= 1  # nodes compaction made have no metadata: no say


def _shape_of(node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None else (1, 1)


def _rewrite_binary(g: fx.Graph, buffers: IndexBuffers, node: fx.Node, args, index, alive, is_add: bool,
                    is_sub: bool, dim: int = 1):
    """An add or mul of tensors keeping different channels (in ``dim``): the mixed block's
    index_add, or a gather / scatter of a factor."""
    a, b = args
    ia, ib, io = index[_tensor_name(a)], index[_tensor_name(b)], index[node.name]
    if is_add and not (bool(alive[_tensor_name(a)].any()) and bool(alive[_tensor_name(b)].any())):
        ia = ia if bool(alive[_tensor_name(a)].any()) else ia[:0]  # an all-zero side: skipped below
        ib = ib if bool(alive[_tensor_name(b)].any()) else ib[:0]
    if torch.equal(ia, io) and torch.equal(ib, io):
        return  # same channels on both sides: a plain add / mul
    if io.numel() == 0 or (ia.numel() == 0 and ib.numel() == 0):
        return  # the result is empty too: removed with its users
    if is_add and (ia.numel() == 0 or ib.numel() == 0):  # one side pruned away: the block is skipped
        keep = b if ia.numel() == 0 else a
        new = keep
        if keep is b and is_sub:
            with g.inserting_before(node):
                new = g.call_function(operator.neg, (b,))
                new.meta["budgetprune_tensor"] = node.name
        node.replace_all_uses_with(new)
        g.erase_node(node)
        return
    if is_add:
        if is_sub:
            with g.inserting_before(node):
                b_node = g.call_function(operator.neg, (b,))
        else:
            b_node = b
        if torch.equal(ia, io):
            base, delta, delta_idx = a, b_node, ib
        elif torch.equal(ib, io) and not is_sub:
            base, delta, delta_idx = b, a, ia
        else:
            ref = buffers.add(g, _positions(ia, io), node)
            with g.inserting_before(node):
                base = g.call_function(scatter_channels, _with_dim((a, ref, int(io.numel())), dim))
            delta, delta_idx = b_node, ib
        ref = buffers.add(g, _positions(delta_idx, io), node)
        with g.inserting_before(node):
            new = g.call_function(index_add_channels, _with_dim((base, ref, delta), dim))
    else:
        sides = []
        for side, idx in ((a, ia), (b, ib)):
            if torch.equal(idx, io):
                sides.append(side)
                continue
            if bool(torch.isin(io, idx).all()):  # this factor has every channel needed: select them
                ref = buffers.add(g, _positions(io, idx), node)
                with g.inserting_before(node):
                    sides.append(g.call_function(select_channels, _with_dim((side, ref), dim)))
            else:  # channels it lacks are zero
                ref = buffers.add(g, _positions(idx, io), node)
                with g.inserting_before(node):
                    sides.append(g.call_function(scatter_channels, _with_dim((side, ref, int(io.numel())), dim)))
        with g.inserting_before(node):
            new = g.call_function(operator.mul, tuple(sides))
    new.meta["budgetprune_tensor"] = node.name
    node.replace_all_uses_with(new)
    g.erase_node(node)


def silence_channels(model: nn.Module, graph: ChannelGraph, channels: dict[str, torch.Tensor]) -> int:
    """Make reopened channels (``channels[group]``: indices) contribute nothing, in place.

    A channel reopened by :func:`budgetprune.budget.fill_budget` is given gate value 1 but
    adds nothing yet, so the network's function is unchanged at the moment it is reopened
    (a zero-initialised addition, as in function-preserving network growth) and fine-tuning
    can put it to use:

    * a group that is the sole writer of its slots gets zero *outgoing* weights (the columns
      that read it); its own filter keeps computing and the zeros receive gradients;
    * a head of an attention layer gets zero columns in the output projection (its values are
      computed, and add nothing);
    * a group that writes into a residual sum with others (``shared``) gets a zero *output*:
      its filter row, bias and host BatchNorm γ and β, so it adds 0 to the sum (β and the
      filter still receive gradients).

    Returns the number of weights zeroed.
    """
    modules = dict(model.named_modules())
    zeroed = 0
    with torch.no_grad():
        for gid, idx in channels.items():
            if idx.numel() == 0:
                continue
            group = graph.groups[gid]
            if group.position == "heads":  # a reopened head: the output projection's columns that read it
                spec = graph.layers[group.producer].attention
                weight = model.get_parameter(spec.proj_weight)
                cols = head_columns(spec.head_dim, idx).to(weight.device)
                weight.index_fill_(1, cols, 0.0)
                zeroed += int(cols.numel()) * int(weight.shape[0])
                continue
            if group.shared:
                layer = graph.layers[group.producer]
                if layer.kind == "attention":  # its output projection's rows
                    params = [model.get_parameter(p) for p in (layer.attention.proj_weight, layer.attention.proj_bias)
                              if p is not None]
                else:
                    params = [p for mod in [modules[layer.name]] + [modules[bn] for bn in layer.batchnorms]
                              for p in (mod.weight, mod.bias) if p is not None]
                for p in params:
                    p[idx.to(p.device)] = 0.0
                    zeroed += int(idx.numel()) * int(p[0].numel())
                continue
            for layer in graph.readers(gid):
                info = graph.tensors[layer.in_tensor]
                slots = torch.cat([torch.tensor([s.start + (i - off) for i in idx.tolist()
                                                 if off <= i < off + s.length], dtype=torch.long)
                                   for s in info.segments for g_, off in s.sources if g_ == gid])
                weight = model.get_parameter(layer.attention.qkv_weight) if layer.kind == "attention" else \
                    modules[layer.name].weight
                cols = _expand(slots, info.expansion).to(weight.device)
                if layer.depthwise:
                    continue
                if layer.groups > 1:  # input c is column c mod a of the rows of its own conv group
                    per_in, per_out = weight.shape[1], weight.shape[0] // layer.groups
                    for c in cols.tolist():
                        weight[(c // per_in) * per_out:(c // per_in + 1) * per_out, c % per_in] = 0.0
                    zeroed += int(cols.numel()) * per_out * int(weight[0, 0].numel())
                    continue
                weight.index_fill_(1, cols, 0.0)
                zeroed += int(cols.numel()) * int(weight.shape[0]) * int(weight[0, 0].numel())
    return zeroed


def to_plain(model: nn.Module, graph: ChannelGraph) -> fx.GraphModule:
    """The unpruned model as a plain GraphModule (same function, same weights and names)."""
    return compact(model, graph)
