"""CIFAR-10 and CIFAR-100, "python version" layout, read with a restricted unpickler.

Layout (https://www.cs.toronto.edu/~kriz/cifar.html): ``cifar-10-batches-py/`` holds
``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta``;
``cifar-100-python/`` holds ``train``, ``test`` and ``meta``. Each is a Python 2 pickle of a
dict with ``b"data"`` (N x 3072 uint8, rows R then G then B planes of 32x32) and
``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100). The folder may be under the
data root or be the data root itself. Checksums (md5, from torchvision/datasets/cifar.py)
are those of the archives and of the files inside them.
"""

from __future__ import annotations

import codecs
import importlib
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .registry import DatasetNotFound, DatasetSpec, Resource, dataset_dir, register
from .tensors import DataSplits, DatasetInfo, ImageDataset

__all__ = ["RestrictedUnpickler", "load_pickle", "CIFAR10_CLASSES", "CIFAR100_CLASSES"]


def _numpy_attr(modules: tuple[str, ...], name: str):
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None


_RECONSTRUCT = _numpy_attr(("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct")
_FROMBUFFER = _numpy_attr(("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer")

# The only globals a pickle may reference: what rebuilding numpy arrays needs.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,  # protocol-5 pickles
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles written by Python 3
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds only plain containers and numpy arrays.

    Any other global (``os.system``, ``builtins.eval``, ...) is refused with a DataError
    before anything is called. ``path`` is only used in messages.
    """

    def __init__(self, file, *, path: str | Path | None = None, **kwargs) -> None:
        kwargs.setdefault("encoding", "bytes")
        super().__init__(file, **kwargs)
        self.path = path

    def find_class(self, module: str, name: str):
        obj = _ALLOWED.get((module, name))
        if obj is None:
            where = self.path if self.path is not None else "the pickle"
            raise DataError(
                f"{where} references {module}.{name}, which is not allowed (only numpy arrays are): "
                "it is not an original CIFAR python-version file; replace it with the original from "
                "https://www.cs.toronto.edu/~kriz/cifar.html"
            )
        return obj

    def persistent_load(self, pid):
        raise DataError(f"{self.path or 'the pickle'} uses persistent ids, which CIFAR files never do; replace it")


def load_pickle(path: Path) -> object:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (``encoding="bytes"``)."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, path=path, encoding="bytes").load()
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}; check that the file exists and is readable") from e
    except Exception as e:  # malformed pickles raise almost anything
        reason = str(e).replace("\n", " ")
        raise DataError(
            f"{path} is not a readable CIFAR python-version pickle ({type(e).__name__}: {reason}); "
            "replace it with the original file"
        ) from e


def _get(entry: dict, key: str):
    return entry.get(key.encode(), entry.get(key))


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    entry = load_pickle(path)
    if not isinstance(entry, dict):
        raise DataError(f"{path} holds a {type(entry).__name__}, expected a dict: it is not a CIFAR batch; replace it")
    data, labels = _get(entry, "data"), _get(entry, label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' is a {got}, expected uint8 N x 3072: it is not a CIFAR batch; replace it")
    if labels is None:
        raise DataError(f"{path} has no '{label_key}' entry: it is not a batch of this CIFAR version; replace it")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: '{label_key}' is not a list of integers ({e}); replace the file") from e
    if labels.shape[0] != data.shape[0]:
        raise DataError(
            f"{path} holds {labels.shape[0]} labels for {data.shape[0]} images: the file is damaged; replace it"
        )
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(
            f"{path} holds label {int(bad[0])} "
            f"outside 0..{num_classes - 1}: it is not a batch of this CIFAR version; replace it"
        )
    return data, labels


def _read_split(folder: Path, files: tuple[str, ...], spec: DatasetSpec, label_key: str, augment: bool):
    parts = [_read_batch(folder / f, label_key, spec.info.num_classes) for f in files]
    data = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32))
    return ImageDataset(images, torch.from_numpy(labels), spec.mean, spec.std, augment=augment)


def _class_names(path: Path, key: str, spec: DatasetSpec) -> tuple[str, ...]:
    """Class names from the meta file if it is there and well formed, else the built-in ones."""
    if not path.is_file():
        return spec.info.class_names
    meta = load_pickle(path)
    names = _get(meta, key) if isinstance(meta, dict) else None
    if not isinstance(names, (list, tuple)) or len(names) != spec.info.num_classes:
        raise DataError(f"{path} has no list of {spec.info.num_classes} '{key}': the file is damaged; replace it")
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names)


def _make_loader(train_files: tuple[str, ...], test_file: str, meta_file: str, label_key: str, names_key: str):
    def load(root: Path | None, spec: DatasetSpec) -> DataSplits:
        assert root is not None and spec.folder is not None
        folder = dataset_dir(root, spec.folder, spec.markers)
        missing = [f for f in (*train_files, test_file) if not (folder / f).is_file()]
        if missing:
            state = "is missing" if folder.is_dir() else "does not exist; it should hold"
            archive = spec.resources[0].filename if spec.resources else "the archive"
            raise DatasetNotFound(
                f"dataset folder {folder} {state} {', '.join(missing)}: extract {archive} (python version, "
                f"https://www.cs.toronto.edu/~kriz/cifar.html) into {folder.parent} or pass --download"
            )
        train = _read_split(folder, train_files, spec, label_key, augment=True)
        test = _read_split(folder, (test_file,), spec, label_key, augment=False)
        names = _class_names(folder / meta_file, names_key, spec)
        info = spec.info if names == spec.info.class_names else replace(spec.info, class_names=names)
        return DataSplits(train=train, test=test, info=info)

    return load


CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))

# md5s from torchvision/datasets/cifar.py (CIFAR10 / CIFAR100: tgz_md5, train_list, test_list, meta).
CIFAR10_RESOURCE = Resource(
    "cifar-10-python.tar.gz",
    "c58f30108f718f92721af3b95e74349a",
    ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
    members=(
        (f"{CIFAR10_FOLDER}/data_batch_1", "c99cafc152244af753f735de768cd75f"),
        (f"{CIFAR10_FOLDER}/data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
        (f"{CIFAR10_FOLDER}/data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
        (f"{CIFAR10_FOLDER}/data_batch_4", "634d18415352ddfa80567beed471001a"),
        (f"{CIFAR10_FOLDER}/data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
        (f"{CIFAR10_FOLDER}/test_batch", "40351d587109b95175f43aff81a1287e"),
        (f"{CIFAR10_FOLDER}/batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
    ),
)
CIFAR100_RESOURCE = Resource(
    "cifar-100-python.tar.gz",
    "eb9058c3a382ffc7106e4002c42a8d85",
    ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
    members=(
        (f"{CIFAR100_FOLDER}/train", "16019d7e3df5f24257cddd939b257f8d"),
        (f"{CIFAR100_FOLDER}/test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),
        (f"{CIFAR100_FOLDER}/meta", "7973b15100ade9c7d40fb424638fde48"),
    ),
)

register(
    DatasetInfo("cifar10", 3, (32, 32), 10, CIFAR10_CLASSES),
    title="CIFAR-10",
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    folder=CIFAR10_FOLDER,
    markers=("test_batch", "batches.meta"),
    resources=(CIFAR10_RESOURCE,),
)(_make_loader(CIFAR10_TRAIN, "test_batch", "batches.meta", "labels", "label_names"))

register(
    DatasetInfo("cifar100", 3, (32, 32), 100, CIFAR100_CLASSES),
    title="CIFAR-100",
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    folder=CIFAR100_FOLDER,
    markers=("test", "meta"),
    resources=(CIFAR100_RESOURCE,),
)(_make_loader(("train",), "test", "meta", "fine_labels", "fine_label_names"))
