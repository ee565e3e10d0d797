"""MNIST and Fashion-MNIST: the four idx files, plain or ``.gz``, in ``root`` or ``root/<name>/``.

Sources (checksums are the md5 of the publishers' ``.gz`` files, as listed in
torchvision/datasets/mnist.py): MNIST from https://ossci-datasets.s3.amazonaws.com/mnist/
(fallback http://yann.lecun.com/exdb/mnist/), Fashion-MNIST from
http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .idx import find_idx_file, read_idx
from .registry import DatasetNotFound, DatasetSpec, Resource, dataset_dir, register
from .tensors import DataSplits, DatasetInfo, ImageDataset

__all__ = ["IDX_FILES", "load_idx_folder", "FASHION_CLASSES"]

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
_MARKERS = IDX_FILES + tuple(f"{f}.gz" for f in IDX_FILES)

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)

MNIST_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
FASHION_URLS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)

# md5 of the canonical .gz files, from torchvision/datasets/mnist.py (MNIST.resources,
# FashionMNIST.resources).
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


def _resources(md5s: dict[str, str], bases: tuple[str, ...]) -> tuple[Resource, ...]:
    return tuple(Resource(name, md5, tuple(b + name for b in bases)) for name, md5 in md5s.items())


def _read_split(folder, images_base: str, labels_base: str, spec: DatasetSpec) -> ImageDataset:
    images_path = find_idx_file(folder, images_base)
    labels_path = find_idx_file(folder, labels_base)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    h, w = spec.info.image_size
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (h, w):
        raise DataError(
            f"{images_path} holds {images.dtype} values of shape {images.shape}, expected uint8 images "
            f"N x {h} x {w} (magic 0x00000803): it is not a {spec.title} image file; replace it"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(
            f"{labels_path} holds {labels.dtype} values of shape {labels.shape}, expected uint8 labels "
            f"(magic 0x00000801): it is not a {spec.title} label file; replace it"
        )
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{labels_path} holds {labels.shape[0]} labels but {images_path} holds {images.shape[0]} images: "
            "the two files do not belong together; replace them with a matching pair"
        )
    k = spec.info.num_classes
    if labels.size and int(labels.max()) >= k:
        raise DataError(
            f"{labels_path} holds label {int(labels.max())} but {spec.title} has {k} classes (0..{k - 1}): "
            f"it is not a {spec.title} label file; replace it"
        )
    return ImageDataset(
        torch.from_numpy(images).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        spec.mean,
        spec.std,
        augment=False,
    )


def load_idx_folder(folder, spec: DatasetSpec) -> DataSplits:
    """Load the train (``train-*``) and test (``t10k-*``) splits from the four idx files in
    ``folder`` (a Path or an importlib.resources Traversable)."""
    missing = [base for base in IDX_FILES if find_idx_file(folder, base) is None]
    if missing:
        wanted = ", ".join(f"{m}(.gz)" for m in missing)
        state = "is missing" if folder.is_dir() else "does not exist; it should hold"
        raise DatasetNotFound(
            f"dataset folder {folder} {state} {wanted}: put the four idx files of {spec.title} there "
            "or pass --download"
        )
    train = _read_split(folder, TRAIN_IMAGES, TRAIN_LABELS, spec)
    test = _read_split(folder, TEST_IMAGES, TEST_LABELS, spec)
    return DataSplits(train=train, test=test, info=spec.info)


def _load_from_root(root: Path | None, spec: DatasetSpec) -> DataSplits:
    assert root is not None and spec.folder is not None
    return load_idx_folder(dataset_dir(root, spec.folder, spec.markers), spec)


register(
    DatasetInfo("mnist", 1, (28, 28), 10, tuple(str(d) for d in range(10))),
    title="MNIST",
    mean=(0.1307,),
    std=(0.3081,),
    folder="mnist",
    markers=_MARKERS,
    resources=_resources(MNIST_MD5, MNIST_URLS),
)(_load_from_root)

register(
    DatasetInfo("fashion-mnist", 1, (28, 28), 10, FASHION_CLASSES),
    title="Fashion-MNIST",
    mean=FASHION_MEAN,
    std=FASHION_STD,
    folder="fashion-mnist",
    markers=_MARKERS,
    resources=_resources(FASHION_MD5, FASHION_URLS),
)(_load_from_root)
