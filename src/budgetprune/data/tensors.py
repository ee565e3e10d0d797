"""In-memory image datasets: uint8 images, int64 labels, normalised on access.

Images are kept as one uint8 tensor of shape (N, C, H, W) (a quarter of the memory of
float32) and turned into float32 ``(x / 255 - mean) / std`` only when a sample or a batch
is read. CIFAR training splits also get the standard augmentation (random 32x32 crop of
the image padded by 4 zero pixels, then a horizontal flip with probability 1/2), done for
a whole batch at once with tensor indexing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["DatasetInfo", "ImageDataset", "DataSplits", "normalise", "random_crop_flip"]

CROP_PADDING = 4


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: input shape and classes."""

    name: str
    in_channels: int
    image_size: tuple[int, int]
    num_classes: int
    class_names: tuple[str, ...]


def _as_index(indices) -> torch.Tensor:
    """Turn a tensor, array, list, range or boolean mask into a 1-d int64 index tensor."""
    if isinstance(indices, range):
        indices = list(indices)
    idx = torch.as_tensor(indices)
    if idx.dtype == torch.bool:
        idx = idx.nonzero().flatten()
    return idx.reshape(-1).to(dtype=torch.long, device="cpu")


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 ``(x / 255 - mean) / std``; ``mean`` and ``std`` are (1, C, 1, 1)."""
    x = images.to(torch.float32).div_(255.0)
    return x.sub_(mean.to(x.device)).div_(std.to(x.device))


def random_crop_flip(
    images: torch.Tensor, padding: int = CROP_PADDING, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop of the zero-padded images back to their size, then a random horizontal flip.

    ``images`` is (B, C, H, W) of any dtype; each image gets its own offsets and flip,
    drawn from ``generator`` (the default generator when None). One gather, no Python loop.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = top[:, None] + torch.arange(h)  # (B, H)
    cols_in = torch.arange(w)
    cols = left[:, None] + torch.where(flip[:, None], w - 1 - cols_in, cols_in)  # (B, W)
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(c)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class ImageDataset(torch.utils.data.Dataset):
    """Images held in memory as uint8 (N, C, H, W) plus int64 labels; normalised on access.

    ``mean`` and ``std`` are per channel, in [0, 1] pixel units. ``augment`` turns on the
    CIFAR training augmentation (random crop 32 pad 4 + horizontal flip) in ``batch`` and
    ``__getitem__``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be (N,) with N={images.shape[0]}, got {tuple(labels.shape)}")
        channels = images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values (one per channel), got {len(mean)} and {len(std)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = bool(augment)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i) -> tuple[torch.Tensor, int]:
        x, y = self.batch(torch.tensor([int(i)]))
        return x[0], int(y[0])

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 ``(x / 255 - mean) / std``."""
        return normalise(images, self._mean, self._std)

    def batch(
        self, indices: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float32 images (B, C, H, W) and int64 labels (B,) for ``indices``.

        When ``augment`` is True the crop offsets and flips are drawn from ``generator``.
        """
        idx = _as_index(indices)
        images = self.images[idx]
        if self.augment:
            images = random_crop_flip(images, CROP_PADDING, generator)
        return self.normalise(images), self.labels[idx]

    def subset(self, indices) -> ImageDataset:
        """A new dataset with the selected samples and the same normalisation and augment flag."""
        idx = _as_index(indices)
        return ImageDataset(self.images[idx], self.labels[idx], self.mean, self.std, self.augment)

    def holdout(self, indices, augment: bool) -> ImageDataset:
        """The selected samples, augmented as this dataset is if ``augment`` (a training part),
        never otherwise (a validation part)."""
        idx = _as_index(indices)
        return ImageDataset(self.images[idx], self.labels[idx], self.mean, self.std, self.augment and augment)

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"ImageDataset(n={n}, shape=({c}, {h}, {w}), augment={self.augment})"


@dataclass
class DataSplits:
    """The train and test splits of a dataset and its description.

    ``note`` is what a run should tell its user about how the data was read (for a folder of
    images: the classes, the split and its source); empty for the built-in datasets.
    """

    train: torch.utils.data.Dataset  # an ImageDataset, or a FolderDataset streamed from disk
    test: torch.utils.data.Dataset
    info: DatasetInfo
    note: str = ""

    def close(self) -> None:
        """Stop the worker processes of splits streamed from disk (nothing to do for data in memory)."""
        for split in (self.train, self.test):
            if hasattr(split, "close"):
                split.close()
