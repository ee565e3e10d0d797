"""Attaching per-channel gates to a user's model from the outside, and removing them.

Like ``torch.nn.utils.parametrize``, the model stays a plain ``nn.Module``: gates live in
the method, and forward hooks on the graph's *host* modules multiply their output (or, for
an MLP's input group, their input) by the gate values. :meth:`GateHooks.remove` restores
the model exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from .graph import ChannelGraph

GateFn = Callable[[int], torch.Tensor]  # batch size -> (C,) or (batch, C) gate values


def _broadcast(z: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape gate values (C,) or (N, C) to multiply a (N, C, ...) tensor channel-wise."""
    lead = z.shape[0] if z.dim() == 2 else 1
    return z.reshape(lead, -1, *([1] * (like.dim() - 2)))


class GateHooks:
    """Forward hooks that apply ``gates[group_id]`` at each group's host module."""

    def __init__(self, model: nn.Module, graph: ChannelGraph, gates: Mapping[str, GateFn]):
        modules = dict(model.named_modules())
        self.handles = []
        for gid, gate in gates.items():
            group = graph.groups[gid]
            host = modules[group.host]
            if group.position == "input":
                self.handles.append(host.register_forward_pre_hook(self._input_hook(gate)))
            else:
                self.handles.append(host.register_forward_hook(self._output_hook(gate)))

    @staticmethod
    def _output_hook(gate: GateFn):
        def hook(module, inputs, output):
            return output * _broadcast(gate(output.shape[0]), output)
        return hook

    @staticmethod
    def _input_hook(gate: GateFn):
        def hook(module, inputs):
            x = inputs[0]
            return (x * _broadcast(gate(x.shape[0]), x),) + tuple(inputs[1:])
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
