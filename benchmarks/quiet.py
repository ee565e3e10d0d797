"""Timing on a shared machine: wait until the other processes leave the CPUs alone."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path


class Quiet:
    """Measure only while the other processes of the machine leave it alone.

    The machine is shared: another process on the same cores stalls every parallel region of a
    2-thread run (resnet20 at batch 1 went from 2 ms to 670 ms). Before a measurement this waits
    until the others use at most ``busy`` of all CPUs (from ``/proc/stat``, minus this process's
    own CPU time); a measurement during which they used more is repeated, up to ``retries``
    times. Waiting stops for good once ``budget`` seconds of waiting are spent (the run's length
    stays bounded); from then on measurements are taken as they come, and flagged."""

    def __init__(self, busy: float, budget: float, retries: int = 2, max_wait: float = 20.0):
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

    def others(self, a, b) -> float:
        """The share of all CPUs that other processes used between samples ``a`` and ``b``."""
        total = b[1] - a[1]
        return max(0.0, (b[0] - a[0]) - (b[2] - a[2])) / total if total > 0 else 0.0

    def wait(self) -> None:
        start = time.perf_counter()
        while self.enabled and self.waited + (time.perf_counter() - start) < self.budget \
                and time.perf_counter() - start < self.max_wait:
            a = self.sample()
            time.sleep(0.1)
            if self.others(a, self.sample()) <= self.busy:
                break
        self.waited += time.perf_counter() - start

    def run(self, turn):
        """(``turn()``'s result, the others' CPU share meanwhile, attempts): ``turn`` runs after
        :meth:`wait`, and again (up to ``retries`` times) while the others used more than ``busy``
        of the CPUs during it, until the waiting budget is spent."""
        for attempt in range(1, self.retries + 2):
            self.wait()
            a = self.sample() if self.enabled else None
            result = turn()
            share = self.others(a, self.sample()) if self.enabled else 0.0
            if share <= self.busy or attempt > self.retries or self.waited >= self.budget:
                return result, share, attempt
        raise AssertionError("unreachable")

    def measure(self, fn, repeats: int) -> tuple[float, float, int]:
        """(median seconds of ``repeats`` calls, the others' CPU share meanwhile, attempts)."""
        def turn():
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                runs.append(time.perf_counter() - t0)
            return statistics.median(runs)
        return self.run(turn)
