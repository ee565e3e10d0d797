"""Channel operations a compacted network uses where pruned tensors no longer line up.

They are wrapped for ``torch.fx`` (they appear as single ``call_function`` nodes in a
compacted :class:`torch.fx.GraphModule`), are plain tensor code that TorchScript and the
ONNX exporter handle, and are the only non-``torch`` functions a saved model may call.

* :func:`index_add_channels` is the mixed-connectivity block's ``scatterAdd`` (seed 001,
  supplement 2): ``h_l = scatterAdd(h_{l-1}, Δ, I_out)``, i.e. ``h_l[I_out] = h_{l-1}[I_out] + Δ``
  and ``h_l[¬I_out] = h_{l-1}[¬I_out]``.
* :func:`scatter_channels` places a tensor's channels at ``index`` of a wider zero tensor (a
  new map added to the residual signal, Fig. 4c, when the signal itself lacks it).
* :func:`select_channels` keeps the channels at ``index`` (a block reading a subset
  ``h[I_in]`` of the residual signal).
"""

from __future__ import annotations

import torch
from torch import fx


@fx.wrap
def index_add_channels(base: torch.Tensor, index: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``base`` with ``delta`` added to its channels ``index`` (dim 1), out of place."""
    return base.index_add(1, index, delta)


@fx.wrap
def scatter_channels(x: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """A zero tensor with ``width`` channels holding ``x``'s channels at ``index``."""
    shape = list(x.shape)
    shape[1] = width
    return x.new_zeros(shape).index_add(1, index, x)


@fx.wrap
def select_channels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[:, index]``."""
    return x.index_select(1, index)


#: Functions a saved compacted network may call besides torch's own (see budgetprune.io).
CHANNEL_OPS = {f.__name__: f for f in (index_add_channels, scatter_channels, select_channels)}
