"""A validation split held out of the training images, to choose options on without looking at
the test set.

Which images are held out depends only on the run's seed and the training set's size: a
generator seeded from ``seed`` (:func:`budgetprune.seeding.stream_seed`, stream ``validation``)
permutes the indices and the first N are held out. The same seed gives the same split in every
run and on resume; the held-out images are never trained on, and are read without augmentation.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset, Subset

from ..errors import ConfigError, DataError
from ..seeding import stream_seed


def check_validation(value) -> None:
    """``value`` is 0 (no split), a whole count ≥ 1 or a fraction in (0, 1); one-line ConfigError otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        0 <= value < 1 or float(value).is_integer())
    if not ok or value < 0:
        raise ConfigError(f"--validation {value!r:.40}: give a number of training images to hold out (10000), "
                          "a fraction of them (0.1), or 0 for none")


def validation_count(value: float, n: int) -> int:
    """How many of ``n`` training images ``value`` (count or fraction) holds out; DataError if
    nothing would be left to train on."""
    count = int(value) if value >= 1 else int(round(value * n))
    if value > 0 and count == 0:
        count = 1
    if count >= n:
        raise DataError(f"--validation {value:g} holds out {count} of the {n} training images, leaving none to "
                        "train on: hold out fewer")
    return count


def validation_indices(n: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices) of a training set of ``n``, each sorted."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed(seed, "validation")))
    return order[count:].sort().values, order[:count].sort().values


def split_validation(dataset: Dataset, value: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """(the images to train on, the held-out validation images) of ``dataset``; (``dataset``,
    None) for ``value`` 0. Data in memory and folders of images are split into datasets of their
    own kind (the validation part without augmentation); any other dataset into
    :class:`torch.utils.data.Subset`\\ s."""
    check_validation(value)
    if not value:
        return dataset, None
    train_idx, val_idx = validation_indices(len(dataset), validation_count(value, len(dataset)), seed)
    if hasattr(dataset, "holdout"):  # ImageDataset, FolderDataset
        return dataset.holdout(train_idx, augment=True), dataset.holdout(val_idx, augment=False)
    return Subset(dataset, train_idx.tolist()), Subset(dataset, val_idx.tolist())
