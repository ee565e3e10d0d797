"""The ``demo`` dataset: a small class-balanced Fashion-MNIST subset shipped in the package.

The four gzip idx files in ``budgetprune/data/demo/`` (built by
``scripts/make_demo_dataset.py``; see ``demo/README.md`` and ``demo/LICENSE.txt``, MIT,
Copyright (c) 2017 Zalando SE) are read through importlib.resources with the same reader
as Fashion-MNIST, so the demo works offline and ignores the data root.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import DataError
from .idx import find_idx_file
from .mnist import FASHION_CLASSES, FASHION_MEAN, FASHION_STD, IDX_FILES, load_idx_folder
from .registry import DatasetSpec, register
from .tensors import DataSplits, DatasetInfo

__all__ = ["DEMO_TRAIN_PER_CLASS", "DEMO_TEST_PER_CLASS", "demo_folder"]

DEMO_TRAIN_PER_CLASS = 500
DEMO_TEST_PER_CLASS = 100


def demo_folder():
    """The package folder holding the demo files (a Traversable; a Path for normal installs)."""
    return resources.files(__package__) / "demo"


@register(
    DatasetInfo("demo", 1, (28, 28), 10, FASHION_CLASSES),
    title="demo (Fashion-MNIST subset)",
    mean=FASHION_MEAN,
    std=FASHION_STD,
)
def _load_demo(root: Path | None, spec: DatasetSpec) -> DataSplits:
    folder = demo_folder()
    missing = [base for base in IDX_FILES if find_idx_file(folder, base) is None]
    if missing:
        raise DataError(
            f"the demo dataset in {folder} is missing {', '.join(missing)}(.gz): the budgetprune install "
            "is incomplete; reinstall it (or run scripts/make_demo_dataset.py in a source checkout)"
        )
    return load_idx_folder(folder, spec)
