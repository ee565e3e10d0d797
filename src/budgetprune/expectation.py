"""The differentiable expected cost of a network under its gates, in a few tensor operations.

:class:`budgetprune.resources.CostModel` writes every metric as a sum of terms
``c_io · n_in · n_out + c_out · n_out``; in expectation each ``n`` is Σ P(slot alive), where a
slot written by one gated channel is alive with that channel's P(z > 0), one written by several
with ``1 − Π(1 − p)``, and one an always-alive writer reaches with probability 1 (seed 001,
section 3.3's L_S and its FLOP variant; the module docstring of :mod:`budgetprune.resources`).

Computed term by term that is a few small tensor operations per layer, and as many nodes for
autograd to walk back: on a ResNet-50 more time than the rest of BAR's penalty. Here every
probability is gathered once into one vector, the products over a slot's writers are one
``scatter_reduce``, the sums per tensor and per group one ``index_add`` each, and all terms one
multiply-add over vectors; the index arrays are built once per set of gated groups and device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .graph import ChannelGraph


class ExpectedCost:
    """Σ_terms w · (c_io · n_in · n_out + c_out · n_out) for the ``terms`` of one metric, with
    ``n`` the expected alive slots under independent gates with probabilities ``probs``."""

    def __init__(self, graph: ChannelGraph, terms: Sequence):
        self.graph = graph
        self.terms = list(terms)
        self._plans: dict[tuple, dict[str, torch.Tensor]] = {}

    def __call__(self, probs: dict[str, torch.Tensor], weights: dict[str, float] | None = None,
                 joined: torch.Tensor | None = None) -> torch.Tensor:
        """The expectation (a 0-dim tensor of ``probs``' dtype, differentiable in ``probs``);
        ``weights`` multiplies the terms of the layers it names (others count once). ``joined``:
        ``probs``' values already as one vector, in ``probs``' order (as the joined gates compute
        them, :meth:`budgetprune.methods.gated.GatedMethod.per_channel_joined`): read instead of joining
        the pieces again, it spares a copy and, in backward, a gradient split per piece; the
        gradient then reaches ``joined``, not the pieces."""
        like = next(iter(probs.values()))
        dtype = like.dtype if like.is_floating_point() else torch.float32
        order = tuple(probs)
        plan = self._plan(order, like.device)
        if joined is None:
            joined = torch.cat([probs[g].reshape(-1) for g in order])
        elif joined.shape != plan["group_of_chan"].shape:
            raise ValueError(f"joined has shape {tuple(joined.shape)}, not the "
                             f"{tuple(plan['group_of_chan'].shape)} of probs' channels")
        p = joined.to(plan["ones"].dtype)  # float64: see _plan
        dead = plan["ones"].scatter_reduce(0, plan["pair_slot"], 1.0 - p.index_select(0, plan["pair_chan"]),
                                           reduce="prod", include_self=True)
        alive = 1.0 - dead * plan["gated"]  # a slot an always-alive writer reaches: 1
        counts = torch.cat([plan["zero_groups"].index_add(0, plan["group_of_chan"], p),
                            plan["zero_tensors"].index_add(0, plan["tensor_of_slot"], alive),
                            plan["zero_one"]])  # the last entry: a term with no input side
        n_out = counts.index_select(0, plan["out"])
        n_in = counts.index_select(0, plan["in"]) * plan["in_expansion"]
        coefficient_io, coefficient_out = plan["c_io"], plan["c_out"]
        if weights is not None:
            w = torch.tensor([float(weights.get(t.name, 1.0)) for t in self.terms], device=like.device,
                             dtype=p.dtype)
            coefficient_io, coefficient_out = coefficient_io * w, coefficient_out * w
        return (coefficient_io * n_in * n_out + coefficient_out * n_out).sum().to(dtype)

    def _plan(self, order: tuple[str, ...], device: torch.device) -> dict[str, torch.Tensor]:
        """The index arrays on ``device``, values in float64 (float32 where the device has no
        float64, Apple's MPS): ``index_add`` sums one element after another, and in float32 a
        ResNet's FLOPs (1e8 and more) would lose a few units per million."""
        key = (order, str(device))
        if key not in self._plans:
            wide = torch.float32 if torch.device(device).type == "mps" else torch.float64
            self._plans[key] = {name: t.to(device, wide if t.is_floating_point() else t.dtype)
                                for name, t in self._build(order).items()}
        return self._plans[key]

    def _build(self, order: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Index arrays over one vector of every gated channel (the groups of ``order``, each
        the width of its gates) and one of every slot of the tensors the terms read."""
        offset, start = {}, 0
        for gid in order:
            offset[gid] = start
            start += self.graph.groups[gid].channels
        group_of_chan = torch.cat([torch.full((self.graph.groups[g].channels,), i, dtype=torch.long)
                                   for i, g in enumerate(order)]) if order else torch.zeros(0, dtype=torch.long)
        gated = set(order)
        tensors: dict[str, int] = {}  # tensor name -> its index among the counted tensors
        for t in self.terms:
            for name in ((t.out_tensor,) if t.out_group not in gated else ()) + ((t.in_tensor,) if t.in_tensor else ()):
                tensors.setdefault(name, len(tensors))
        pair_slot, pair_chan, always, tensor_of_slot = [], [], [], []
        first = 0
        for name, index in tensors.items():
            info = self.graph.tensors[name]
            reached, by_group = info.writers
            reached = reached.clone()
            for gid, (slots, chans) in by_group.items():
                if gid in gated:
                    pair_slot.append(first + slots)
                    pair_chan.append(offset[gid] + chans)
                else:  # a group without gates here is always alive
                    reached[slots] = True
            always.append(reached)
            tensor_of_slot.append(torch.full((info.slots,), index, dtype=torch.long))
            first += info.slots
        cat = lambda parts, dtype: torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)  # noqa: E731
        groups, none = len(order), len(order) + len(tensors)
        out = [order.index(t.out_group) if t.out_group in gated else groups + tensors[t.out_tensor]
               for t in self.terms]
        inp = [groups + tensors[t.in_tensor] if t.in_tensor else none for t in self.terms]
        return {"pair_slot": cat(pair_slot, torch.long), "pair_chan": cat(pair_chan, torch.long),
                "gated": (~cat(always, torch.bool)).double(), "ones": torch.ones(first, dtype=torch.float64),
                "tensor_of_slot": cat(tensor_of_slot, torch.long), "group_of_chan": group_of_chan,
                "zero_groups": torch.zeros(groups, dtype=torch.float64),
                "zero_tensors": torch.zeros(len(tensors), dtype=torch.float64),
                "zero_one": torch.zeros(1, dtype=torch.float64),
                "out": torch.tensor(out, dtype=torch.long), "in": torch.tensor(inp, dtype=torch.long),
                "in_expansion": torch.tensor([float(t.in_expansion) for t in self.terms], dtype=torch.float64),
                "c_io": torch.tensor([t.c_io for t in self.terms], dtype=torch.float64),
                "c_out": torch.tensor([t.c_out for t in self.terms], dtype=torch.float64)}
