"""Timing on a shared machine: measure while the other processes leave the CPUs alone.

A network timed while other processes run on the same cores is not timed as it will run: another
process stalls every parallel region of a multi-threaded run (resnet20 in onnxruntime at batch 1
went from 2 ms to 670 ms beside a test suite on 2 cores), and it stalls a wide network and a narrow
one by different amounts, so even paired runs (:func:`budgetprune.runtimes.paired_times`) can rank
them wrongly: timed beside two training processes, ShuffleNet V2 x0.5 at 4× fewer FLOPs measured
its widths padded to 8 slower than exact widths, and exact widths were kept, where the same command
run alone kept the padding and ran faster (0.53 of its FLOP reduction in onnxruntime at batch 16,
``benchmarks/results/deploy_speed_families/ordered_moves/timed/``).

:class:`Quiet` watches the machine's CPU time in ``/proc/stat`` (Linux; elsewhere it watches
nothing), less this process's own, waits a bounded time for the others to quieten before a
measurement, repeats a measurement during which they used more than a share of the CPUs, and says
what share they used, so that a caller can tell a measurement it should not act on.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

#: The share of all CPUs other processes may use while a measurement still counts as quiet.
BUSY = 0.15


class Quiet:
    """Measure only while the other processes of the machine leave it alone.

    Before a measurement this waits (at most ``max_wait`` seconds) until the others use at most
    ``busy`` of all CPUs (from ``/proc/stat``, minus this process's own CPU time); a measurement
    during which they used more is repeated, up to ``retries`` times. Waiting stops for good once
    ``budget`` seconds of waiting are spent (what it costs stays bounded); from then on
    measurements are taken as they come, and their share says how busy the machine was."""

    def __init__(self, busy: float = BUSY, budget: float = 10.0, retries: int = 2, max_wait: float = 5.0):
        if not 0 <= busy <= 1:
            raise ValueError(f"busy is a share of the CPUs in [0, 1], got {busy!r}")
        self.busy, self.budget, self.retries, self.max_wait = busy, budget, retries, max_wait
        self.waited = 0.0
        self.enabled = Path("/proc/stat").exists() and budget > 0

    @staticmethod
    def sample() -> tuple[float, float, float]:
        """(busy seconds of all CPUs, total seconds of all CPUs, this process's CPU seconds)."""
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        hz = os.sysconf("SC_CLK_TCK")
        idle = fields[3] + fields[4]
        return (sum(fields) - idle) / hz, sum(fields) / hz, time.process_time()

    @staticmethod
    def others(a, b) -> float:
        """The share of all CPUs that other processes used between samples ``a`` and ``b``."""
        total = b[1] - a[1]
        return max(0.0, (b[0] - a[0]) - (b[2] - a[2])) / total if total > 0 else 0.0

    def wait(self) -> None:
        """Wait until the others use at most ``busy`` of the CPUs (or the waiting allowed is spent)."""
        start = time.perf_counter()
        while self.enabled and self.waited + (time.perf_counter() - start) < self.budget \
                and time.perf_counter() - start < self.max_wait:
            a = self.sample()
            time.sleep(0.1)
            if self.others(a, self.sample()) <= self.busy:
                break
        self.waited += time.perf_counter() - start

    def run(self, turn):
        """(``turn()``'s result, the others' share of the CPUs meanwhile, attempts): ``turn`` runs
        after :meth:`wait`, and again (up to ``retries`` times) while the others used more than
        ``busy`` of the CPUs during it, until the waiting budget is spent. The share is 0 where the
        machine is not watched (no ``/proc/stat``)."""
        for attempt in range(1, self.retries + 2):
            self.wait()
            a = self.sample() if self.enabled else None
            result = turn()
            share = self.others(a, self.sample()) if self.enabled else 0.0
            if share <= self.busy or attempt > self.retries or self.waited >= self.budget:
                return result, share, attempt
        raise AssertionError("unreachable")
