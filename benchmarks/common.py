"""Small helpers the benchmark scripts share."""

from __future__ import annotations

import platform

import torch


def random_subset(ds, n: int, seed: int = 0):
    """``n`` random images of ``ds`` (all of them for n ≤ 0)."""
    if n <= 0 or n >= len(ds):
        return ds
    return ds.subset(torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n])


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine()}
