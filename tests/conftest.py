"""Helpers several test files share."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from budgetprune.data import load_dataset


@lru_cache(maxsize=None)
def _demo_subsets(n_train: int, n_test: int = 256):
    """(train, test): ``n_train`` random and the first ``n_test`` images of the embedded demo data."""
    splits = load_dataset("demo")
    g = torch.Generator().manual_seed(0)
    return splits.train.subset(torch.randperm(len(splits.train), generator=g)[:n_train]), \
        splits.test.subset(torch.arange(n_test))


@pytest.fixture(scope="session")
def demo_subsets():
    """``demo_subsets(n_train, n_test=256)`` → (train, test) subsets of the embedded demo data."""
    return _demo_subsets
