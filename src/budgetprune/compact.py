"""Physical compaction: a smaller plain network from keep-masks.

Conv, BatchNorm and linear weights are sliced to the kept channels (and a dead output
channel's columns removed from the next layer); each kept channel's deterministic gate
value ẑ ∈ (0, 1] is folded into its host (the BatchNorm's γ and β, or the layer's weight
and bias): z·(Wx + b) = (zW)x + zb and z·BN(x) = BN with (zγ, zβ). The graph only gates
where the ops after the host map 0 to 0, so removing a gated-off channel is exact and
the compacted network computes the same outputs as the gated one in eval mode.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .architecture import SelectFeatures, build_sequential
from .graph import ChannelGraph


def _index(mask: torch.Tensor | None, full: int) -> torch.Tensor:
    if mask is None:
        return torch.arange(full)
    return torch.nonzero(mask.cpu(), as_tuple=False).flatten()


def _expand(index: torch.Tensor, expansion: int) -> torch.Tensor:
    """Channel indices → feature indices after a flatten with ``expansion`` features each."""
    if expansion == 1:
        return index
    return (index[:, None] * expansion + torch.arange(expansion)[None, :]).flatten()


def compact(model: nn.Module, graph: ChannelGraph, masks: dict[str, torch.Tensor] | None = None,
            gate_values: dict[str, torch.Tensor] | None = None) -> tuple[nn.Sequential, list[dict]]:
    """Build the compacted network and its architecture description.

    ``masks[group] `` keeps channel i where True (groups not listed keep everything);
    ``gate_values[group]`` is the per-channel scale to fold (1 where not given).
    Returns ``(module, specs)``; the module is in eval mode on the model's device.
    """
    masks = masks or {}
    gate_values = gate_values or {}
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    keep = {gid: _index(masks.get(gid), g.channels) for gid, g in graph.groups.items()}
    specs: list[dict] = []
    states: list[dict[str, torch.Tensor]] = []

    flowing: torch.Tensor | None = None  # kept indices of the channels flowing now (None: all)
    expansion = 1
    for op in graph.ops:
        spec = copy.deepcopy(op.spec)
        state: dict[str, torch.Tensor] = {}
        if op.kind in ("conv", "linear"):
            layer = graph.layers[op.module]
            mod = modules[op.module]
            W = mod.weight.detach()
            b = mod.bias.detach() if mod.bias is not None else None
            in_group = layer.in_group
            if in_group is not None and graph.groups[in_group].position == "input":
                idx = keep[in_group]
                if idx.numel() == graph.groups[in_group].channels and in_group not in gate_values:
                    idx = None  # nothing pruned, nothing scaled: no selection layer
            else:
                idx = None
            if idx is not None:
                specs.append({"op": "select_features", "num_features": int(idx.numel())})
                states.append({"index": idx.clone()})
                z_in = _scale(gate_values, in_group, idx, W)
                W = W[:, idx.to(W.device)] * z_in[None, :]
            elif flowing is not None:
                W = W.index_select(1, _expand(flowing, expansion).to(W.device))
            out_idx = keep[layer.out_group] if layer.out_group else None
            if out_idx is not None:
                W = W.index_select(0, out_idx.to(W.device))
                b = b.index_select(0, out_idx.to(W.device)) if b is not None else None
                if graph.groups[layer.out_group].host == op.module:
                    z = _scale(gate_values, layer.out_group, out_idx, W)
                    W = W * z.view(-1, *([1] * (W.dim() - 1)))
                    b = b * z if b is not None else None
            if op.kind == "conv":
                spec["in_channels"], spec["out_channels"] = int(W.shape[1]), int(W.shape[0])
            else:
                spec["in_features"], spec["out_features"] = int(W.shape[1]), int(W.shape[0])
            state["weight"] = W.clone()
            if b is not None:
                state["bias"] = b.clone()
            flowing, expansion = out_idx, 1
        elif op.kind == "batchnorm":
            bn = modules[op.module]
            idx = flowing if flowing is not None else torch.arange(bn.num_features)
            idx = idx.to(device)
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(bn, name)
                if t is not None:
                    state[name] = t.detach().index_select(0, idx).clone()
            if bn.num_batches_tracked is not None:
                state["num_batches_tracked"] = bn.num_batches_tracked.detach().clone()
            gid = _group_hosted_by(graph, op.module)
            if gid is not None:
                z = _scale(gate_values, gid, keep[gid], state["weight"])
                state["weight"] = state["weight"] * z
                state["bias"] = state["bias"] * z
            spec["num_features"] = int(idx.numel())
        elif op.kind == "flatten":
            expansion = op.out_shape[1] // op.in_shape[1] if len(op.in_shape) > 2 else 1
        specs.append(spec)
        states.append(state)

    net = build_sequential(specs)
    full_state = {}
    for i, st in enumerate(states):
        for name, t in st.items():
            full_state[f"{i}.{name}"] = t
    net.load_state_dict(full_state, strict=True)
    net.budgetprune_architecture = specs
    return net.to(device).eval(), specs


def _group_hosted_by(graph: ChannelGraph, module: str) -> str | None:
    for g in graph.groups.values():
        if g.host == module and g.position == "output":
            return g.id
    return None


def _scale(gate_values, gid: str, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if gid not in gate_values:
        return torch.ones(idx.numel(), dtype=like.dtype, device=like.device)
    z = gate_values[gid].detach().to(like.device, like.dtype)
    return z.index_select(0, idx.to(like.device))


def to_sequential(model: nn.Module, graph: ChannelGraph) -> tuple[nn.Sequential, list[dict]]:
    """The unpruned model as a plain Sequential (same function, same weights)."""
    return compact(model, graph)


def sequential_state_to_model(graph: ChannelGraph, seq_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an unpruned Sequential's state dict (index keys) back to the model's names."""
    out = {}
    for i, op in enumerate(graph.ops):
        if op.module is None:
            continue
        prefix = f"{i}."
        for key, t in seq_state.items():
            if key.startswith(prefix):
                out[f"{op.module}.{key[len(prefix):]}"] = t
    return out


def silence_channels(model: nn.Module, graph: ChannelGraph, channels: dict[str, torch.Tensor]) -> int:
    """Zero the weights that read ``channels[group]`` (indices) in every consumer, in place.

    A channel reopened by :func:`budgetprune.budget.fill_budget` is given gate value 1 and
    zero outgoing weights, so the network's function is unchanged at the moment it is
    reopened (a zero-initialised addition, as in function-preserving network growth) while
    the outgoing weights still receive gradients and fine-tuning can put the channel to use.
    Returns the number of weights zeroed.
    """
    modules = dict(model.named_modules())
    zeroed = 0
    with torch.no_grad():
        for gid, idx in channels.items():
            if idx.numel() == 0:
                continue
            for name in graph.groups[gid].consumers:
                layer = graph.layers[name]
                weight = modules[name].weight
                cols = _expand(idx.cpu(), layer.in_expansion).to(weight.device)
                weight.index_fill_(1, cols, 0.0)
                zeroed += int(cols.numel()) * int(weight.shape[0]) * int(weight[0, 0].numel())
    return zeroed
