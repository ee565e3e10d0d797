"""Helpers several test files share."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from functools import lru_cache

import pytest
import torch

from budgetprune.data import load_dataset


def _torchvision_operator_schemas():
    """torchvision 0.28 from the registry is a CUDA build: with our CPU torch it imports only once
    its ``torchvision::nms``/``qnms`` schemas exist. Lightning's torchmetrics imports torchvision
    too, so they are defined before any test module is collected (where the plain import fails,
    checked in a subprocess: a failed import leaves torch's operator registry half filled)."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    if subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True).returncode == 0:
        return None
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return lib


_TORCHVISION_SCHEMAS = _torchvision_operator_schemas()  # kept alive for the session


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


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Benchmark mains run in-process set torch's thread count for their own timing: restored after
    every test, so a test's speed never depends on which ran before it (a leaked 2 threads beside a
    busy core made a 2-second test take two minutes)."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
