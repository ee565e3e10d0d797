"""Folding a linear map of a layer's output channels into the layers that read them.

When the outputs of a layer's channels are (approximately) linear combinations of a kept
subset, ``h ≈ M h_kept`` with M of shape (C, k), every reader can compute from the kept
channels alone with weights ``W' = W M`` on its input side (seed 001 section 5.1, ID:
"V is multiplied at the next layer, W_{l+1} ← V_l W_{l+1}"; VQ: channels merged into one
centre add their outgoing weights). Shared by the VQ and ID baselines, with the per-layer
loop of their cuts (:class:`FoldingPruning`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..graph import ChannelGraph
from .magnitude import MagnitudePruning


def reader_columns(graph: ChannelGraph, gid: str) -> dict[str, torch.Tensor] | None:
    """``{reader layer: input slot of each of the group's channels}``, or None when the
    group's channels cannot be folded (a slot also written by another group — a residual
    sum — or a depthwise or grouped reader, which cannot mix channels across its groups)."""
    channels = graph.groups[gid].channels
    out = {}
    for layer in graph.readers(gid):
        if layer.depthwise or layer.groups > 1 or layer.kind == "attention":  # a grouped reader only sees
            # its own group's channels; an attention's in-projection is not a plain weight to fold into
            return None
        slots = torch.full((channels,), -1, dtype=torch.long)
        for seg in graph.tensors[layer.in_tensor].segments:
            mine = [off for g, off in seg.sources if g == gid]
            if not mine:
                continue
            if len(seg.sources) > 1:
                return None
            idx = torch.arange(seg.length)
            slots[mine[0] + idx] = seg.start + idx
        if bool((slots < 0).any()):
            return None
        out[layer.name] = slots
    return out


@torch.no_grad()
def fold_into_readers(graph: ChannelGraph, modules: dict[str, nn.Module], gid: str, kept: torch.Tensor,
                      mix: torch.Tensor) -> bool:
    """Give every reader of ``gid`` the input weights ``W M`` on the ``kept`` channels.

    ``mix`` is (channels, len(kept)): the output of channel c is taken as
    Σ_j mix[c, j] · (output of kept[j]). Returns False (and changes nothing) when the group
    cannot be folded (see :func:`reader_columns`).
    """
    columns = reader_columns(graph, gid)
    if columns is None:
        return False
    for name, slots in columns.items():
        layer = graph.layers[name]
        e = graph.tensors[layer.in_tensor].expansion
        w = modules[name].weight
        # (out, slots·e, ...) → (out, slots, e, ...) so that a slot's e features move together
        view = w.view(w.shape[0], -1, e, *w.shape[2:])
        old = view[:, slots].clone()  # (out, C, e, ...): the columns of the group's channels
        new = torch.einsum("oc...,ck->ok...", old, mix.to(old))
        view[:, slots[kept]] = new
    return True


def filters(module: torch.nn.Module) -> torch.Tensor:
    """(out, fan_in [+ 1]) matrix of a layer's filters, the bias as a last column."""
    w = module.weight.detach().reshape(module.weight.shape[0], -1)
    if module.bias is not None:
        w = torch.cat([w, module.bias.detach().unsqueeze(1)], dim=1)
    return w


@torch.no_grad()
def set_filters(module: torch.nn.Module, rows: torch.Tensor, values: torch.Tensor) -> None:
    """Write filter vectors (as :func:`filters` lays them out) into ``rows`` of ``module``."""
    fan_in = module.weight[0].numel()
    module.weight[rows] = values[:, :fan_in].reshape(len(rows), *module.weight.shape[1:]).to(module.weight)
    if module.bias is not None:
        module.bias[rows] = values[:, fan_in].to(module.bias)


class FoldingPruning(MagnitudePruning):
    """The iterative scheme where a cut reduces each layer to its new width by
    :meth:`reduce_group` (VQ, ID) instead of dropping channels; the final projection ranks
    channels by filter magnitude."""

    def reduce_group(self, gid: str, kept: torch.Tensor, k: int) -> torch.Tensor:
        """Reduce the ``kept`` channels of ``gid`` to ``k``, changing weights; returns those that stay."""
        raise NotImplementedError

    def on_cut(self, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for gid, keep in after.items():
            kept = torch.nonzero(before[gid]).flatten()
            k = int(keep.sum())
            group = self.graph.groups[gid]
            if group.position != "output" or k >= len(kept) or k == 0 or \
                    self.graph.layers[group.producer].kind == "attention":  # its filters mix heads: not folded
                out[gid] = keep
                continue
            mask = torch.zeros_like(keep)
            mask[self.reduce_group(gid, kept, k)] = True
            out[gid] = mask
        return out
