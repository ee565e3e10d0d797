"""Latency measurement shared by the benchmarks: medians of repeated runs, interleaved."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def median_latency(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``repeats`` forward passes (after a warm-up), in eval mode, no grad."""
    model.eval()
    with torch.no_grad():
        for _ in range(max(3, repeats // 10)):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_latency(models: dict[str, nn.Module], x: torch.Tensor, repeats: int, rounds: int = 5) -> dict:
    """Median seconds per model, measured in ``rounds`` alternating rounds of ``repeats`` runs.

    Alternating the models spreads the machine's noise evenly over them, so ratios between
    models of one call are fair even when the absolute times drift.
    """
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(median_latency(model, x, repeats))
    return {name: statistics.median(t) for name, t in times.items()}
