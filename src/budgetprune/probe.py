"""How an op the channel graph does not know maps channels, found by running it.

The op's single tensor input is replaced by random values of the recorded shape (the other
arguments must be constants) and the op is run in eval mode without gradients. Two answers:

* :func:`probe_channelwise`: output channel c is a function of input channel c alone (a
  stochastic depth, a custom activation, an upsampling);
* :func:`probe_channel_map`: output channel j is a function of input channel ``sources[j]``
  alone, each input channel feeding one or more outputs (Swin's patch merging: four spatial
  samples of every channel side by side, (…, H, W, C) → (…, H/2, W/2, 4C)).

Either way the op is checked to depend on nothing but its kept channels: run on a subset of
the channels, it must give exactly the outputs of those channels (in order) that it gives on
all of them, and with the other channels zeroed it must give the same on the kept ones.
"""

from __future__ import annotations

import math

import torch
from torch import fx, nn


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _Probe:
    """Runs ``node`` on tensors shaped like its input, channels in ``cd``."""

    def __init__(self, node: fx.Node, modules: dict[str, nn.Module], device: torch.device, cd: int):
        self.node, self.modules, self.cd = node, modules, cd
        meta = node.all_input_nodes[0].meta["tensor_meta"]
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(tuple(meta.shape), generator=gen).to(device, meta.dtype) + 0.5
        self.channels = int(meta.shape[cd])

    def run(self, x: torch.Tensor):
        node = self.node
        args = fx.node.map_arg(node.args, lambda a: x)
        kwargs = fx.node.map_arg(node.kwargs, lambda a: x)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        mod = self.modules[node.target]
        was = mod.training
        mod.eval()
        try:
            return mod(*args, **kwargs)
        finally:
            mod.train(was)

    def keep(self, mask: torch.Tensor) -> torch.Tensor:
        shape = [1] * self.x.dim()
        shape[self.cd] = -1
        return self.x * mask.to(self.x.device, self.x.dtype).view(shape)

    def select(self, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return t.index_select(self.cd, torch.nonzero(mask).flatten().to(t.device))

    def well_formed(self, t, channels: int) -> bool:
        x = self.x
        return isinstance(t, torch.Tensor) and t.dim() == x.dim() and t.shape[0] == x.shape[0] and \
            t.shape[self.cd] == channels


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.isfinite(b).all()) and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def _setup(node: fx.Node, dim: int) -> tuple[int, int, int] | None:
    """(channel dim, input channels, output channels) of an op with one floating-point tensor
    input and an output of the same rank and batch, else None."""
    if len(node.all_input_nodes) != 1:  # x.size(0) and other computed arguments: not probed
        return None
    in_shape, out_shape = _shape(node.all_input_nodes[0]), _shape(node)
    if in_shape is None or out_shape is None or len(in_shape) < 2 or len(out_shape) != len(in_shape):
        return None
    cd = 1 if dim == 1 else len(in_shape) - 1  # the channel dim
    if out_shape[0] != in_shape[0] or in_shape[cd] < 2:
        return None
    if not node.all_input_nodes[0].meta["tensor_meta"].dtype.is_floating_point:
        return None
    return cd, int(in_shape[cd]), int(out_shape[cd])


def _kind(node: fx.Node, modules, zero: bool) -> str:
    if node.op == "call_module" and any(True for _ in modules[node.target].parameters()):
        return "renormalise"  # a learned parameter (a LayerNorm's bias) may stop mapping 0 to 0: always masked
    return "zero" if zero else "renormalise"


def probe_channelwise(node: fx.Node, modules: dict[str, nn.Module], device: torch.device,
                      dim: int = 1) -> str | None:
    """Whether ``node`` works channel by channel: three runs, on the input, on the input with
    some channels zeroed, and on only the other channels. It does when the last run gives exactly
    the remaining channels of the first (no channel reads another, and the op does not depend on
    how many there are), and the second run gives the same on the channels it kept. Returns
    ``"zero"`` when the zeroed channels also stay exactly zero, ``"renormalise"`` when they do not
    or when the op is a module with parameters that training may change (it then needs masking),
    None otherwise."""
    setup = _setup(node, dim)
    if setup is None or setup[1] != setup[2]:
        return None
    probe = _Probe(node, modules, device, setup[0])
    keep = torch.arange(probe.channels) % 2 == 0
    try:
        with torch.no_grad():
            full, zeroed, part = probe.run(probe.x), probe.run(probe.keep(keep)), \
                probe.run(probe.select(probe.x, keep))
    except Exception:
        return None
    c = probe.channels
    if not (probe.well_formed(full, c) and probe.well_formed(zeroed, c) and probe.well_formed(part, int(keep.sum()))):
        return None
    expected = probe.select(full, keep)
    if not (_same(part, expected) and _same(probe.select(zeroed, keep), expected)):
        return None
    return _kind(node, modules, bool((probe.select(zeroed, ~keep) == 0).all()))


def probe_channel_map(node: fx.Node, modules: dict[str, nn.Module], device: torch.device,
                      dim: int = 1) -> tuple[str, torch.Tensor] | None:
    """(kind, sources) when output channel j of ``node`` depends on input channel ``sources[j]``
    alone, else None; kind as in :func:`probe_channelwise`.

    The sources are read from ⌈log₂ C⌉ runs, run b keeping the input channels whose index has bit
    b set: output j is non-zero in run b exactly when bit b of its source is set (an output that is
    zero on the full input has no source to read: None). The map is then checked as a channel-wise
    op is, with the even and then the odd input channels kept."""
    setup = _setup(node, dim)
    if setup is None:
        return None
    cd, c, out_c = setup
    probe = _Probe(node, modules, device, cd)
    channel = torch.arange(c)
    others = [d for d in range(probe.x.dim()) if d != cd]
    try:
        with torch.no_grad():
            full = probe.run(probe.x)
            if not probe.well_formed(full, out_c) or not bool((full != 0).any(dim=others).all()):
                return None
            sources = torch.zeros(out_c, dtype=torch.long)
            for b in range(math.ceil(math.log2(c))):
                run = probe.run(probe.keep((channel >> b) % 2 == 1))
                if not probe.well_formed(run, out_c):
                    return None
                sources += (run != 0).any(dim=others).long().cpu() << b
            if bool((sources >= c).any()):
                return None
            zero = True
            for keep in (channel % 2 == 0, channel % 2 == 1):
                out_keep = keep[sources]
                zeroed, part = probe.run(probe.keep(keep)), probe.run(probe.select(probe.x, keep))
                if not (probe.well_formed(zeroed, out_c) and probe.well_formed(part, int(out_keep.sum()))):
                    return None
                expected = probe.select(full, out_keep)
                if not (_same(part, expected) and _same(probe.select(zeroed, out_keep), expected)):
                    return None
                zero = zero and bool((probe.select(zeroed, ~out_keep) == 0).all())
    except Exception:
        return None
    return _kind(node, modules, zero), sources
