"""Latency measurement shared by the benchmarks: medians of repeated runs, interleaved
(eager PyTorch; :mod:`budgetprune.runtimes` times the other runtimes the same way)."""

from __future__ import annotations

import statistics

import torch
from torch import nn

from budgetprune.runtimes import median_ms, runner


def median_latency(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``repeats`` forward passes (after a warm-up), in eval mode, no grad."""
    return median_ms(runner(model, x, "eager"), repeats, warmup=max(3, repeats // 10), device=x.device) / 1e3


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
