"""torch.fx's wrap registry stays the size of the modules alive, however many models are loaded."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch
from torch import fx
from torch.fx import _symbolic_trace

from budgetprune import graphio, io, ops
from budgetprune.fx_registry import forget_unused_wraps

sys.path.insert(0, str(Path(__file__).parent))
from test_export import residual_model  # noqa: E402


def _channel_op_registrations() -> int:
    return sum(1 for _, name in _symbolic_trace._wrapped_fns_to_patch if name.endswith("_channels"))


def test_loads_leave_only_the_live_modules_registered(tmp_path):
    path = tmp_path / "model.pt"
    io.save(residual_model(), path, meta={"input_shape": [3, 8, 8]})
    gc.collect()
    forget_unused_wraps()
    before = _channel_op_registrations()
    kept = io.load(path)  # its generated code registers its 3 channel ops
    for _ in range(20):
        io.load(path)  # loaded and dropped at once
    gc.collect()  # the dropped modules' classes are reference cycles: freed here
    assert _channel_op_registrations() > before + 3  # torch keeps them all until told
    assert forget_unused_wraps() > 0
    assert _channel_op_registrations() == before + 3  # only the live module's registrations are left
    # the live module still traces with each channel op as one node (its registrations were kept)
    traced = fx.symbolic_trace(kept)
    targets = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert {ops.select_channels, ops.index_add_channels, ops.scatter_channels} <= targets
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(traced(x), kept(x))


def test_a_trace_drops_the_registrations_of_modules_gone(tmp_path):
    path = tmp_path / "model.pt"
    io.save(residual_model(), path, meta={"input_shape": [3, 8, 8]})
    gc.collect()
    forget_unused_wraps()
    before = _channel_op_registrations()  # the modules alive elsewhere in this process
    for _ in range(10):
        io.load(path)
    gc.collect()
    assert _channel_op_registrations() > before
    graphio.trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))  # any trace through budgetprune
    assert _channel_op_registrations() == before
