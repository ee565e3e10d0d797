"""Index buffers of a rewritten fx graph: named after the ones already there, never over them."""

from __future__ import annotations

import torch
from torch import fx, nn

from budgetprune.index_buffers import IndexBuffers
from budgetprune.ops import select_channels


class _TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 3, 1)

    def forward(self, x):
        return self.b(self.a(x))


def test_a_name_in_use_is_skipped_and_the_gather_reads_its_own_copy():
    gm = fx.symbolic_trace(_TwoConvs())
    gm.register_buffer("idx_0", torch.tensor([5]))  # e.g. a module compacted before
    gm.idx_1 = nn.Identity()  # any attribute holds its name, not only a buffer
    buffers = IndexBuffers(gm, "idx")
    g = gm.graph
    b = next(n for n in g.nodes if n.target == "b")
    index = torch.tensor([0, 2, 5])
    ref = buffers.add(g, index, before=b)
    with g.inserting_before(b):
        gathered = g.call_function(select_channels, (b.args[0], ref))
    b.replace_input_with(b.args[0], gathered)
    gm.b = nn.Conv2d(3, 3, 1)
    gm.recompile()
    assert ref.target == "idx_2" and torch.equal(gm.idx_0, torch.tensor([5]))
    index[0] = 4  # the buffer is a copy
    assert gm.idx_2.tolist() == [0, 2, 5]
    x = torch.randn(2, 4, 3, 3)
    assert torch.allclose(gm(x), gm.b(gm.a(x)[:, [0, 2, 5]]))
    with g.inserting_before(b):  # at the insertion point when no node is given
        assert buffers.add(g, torch.tensor([1])).target == "idx_3"
