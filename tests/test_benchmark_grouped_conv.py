"""``benchmarks/grouped_conv_speed.py``: the FLOP reductions it divides by are the blocks' own MACs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmark_scripts import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("grouped_conv_speed") as module:
        yield module


@pytest.mark.parametrize("groups, per_group", [(10, 16), (10, 6), (4, 16), (25, 8)])
def test_macs_are_what_torch_counts_less_the_biases(bench, groups, per_group):
    c, side = 40, 5
    with FlopCounterMode(display=False) as counter:
        bench.block(c, groups, per_group)(torch.zeros(1, c, side, side))
    assert bench.macs(c, side, groups, per_group) == counter.get_total_flops() // 2  # FLOPs = 2 × MACs


def test_every_variant_keeps_fewer_channels_than_the_block(bench):
    for groups in (10, 25):
        for label, g, per in bench.variants(groups):
            assert g * per < groups * bench.GROUP_WIDTH and (g == groups) == label.startswith("tied")
