"""``folder:PATH``: a user's own images, one sub-folder per class, streamed from disk.

Layout (as torchvision's ImageFolder): ``PATH/<class>/<image>``, images possibly in nested
folders below their class folder. Class names sorted give the label indices. Files whose name
ends in .jpg, .jpeg, .png, .bmp, .gif or .webp (any case) are images; other files, and every
file or folder whose name starts with ``.``, are skipped.

Splits: when ``PATH`` holds ``train/`` and ``val/`` (or ``test/``), each is such a tree and the
second is the test split (``val/`` when both are there). Otherwise (``PATH`` holds the class
folders, or only ``train/``) :data:`HOLDOUT_FRACTION` of each class's images is held out as the
test split: round(10 %) of a class, at least one image of every class with two or more. Which
images is fixed by their paths alone (sorted by a hash of ``<class>/<file>``): the same tree
gives the same split for every run, seed and machine, so ``evaluate`` scores on the images
``prune`` held out, and adding images moves few others.

Images are decoded, resized and augmented on the fly (:mod:`budgetprune.data.images`) and
normalised with ImageNet's channel statistics. Every problem a user can fix raises a one-line
:class:`~budgetprune.errors.DataError` (the tree) or :class:`~budgetprune.errors.ConfigError`
(the options).
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .images import AUGMENTATIONS, IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, ImageTransform, decode_rgb, \
    is_image_file
from .streaming import StreamedDataset
from .tensors import DataSplits, DatasetInfo, normalise

__all__ = ["PREFIX", "HOLDOUT_FRACTION", "DEFAULT_IMAGE_SIZE", "DEFAULT_AUGMENT", "is_folder_data",
           "absolute_folder_data", "check_folder_options", "load_image_folder", "scan_classes", "list_samples",
           "holdout_split", "FolderDataset"]

#: ``--data folder:PATH``.
PREFIX = "folder:"
#: Share of each class held out as the test split when the tree has no val/ or test/ folder.
HOLDOUT_FRACTION = 0.1
#: Side of the square images a model gets when no image size is given.
DEFAULT_IMAGE_SIZE = 32
#: Training augmentation when none is given (see budgetprune.data.images).
DEFAULT_AUGMENT = "crop-flip"
TRAIN_FOLDER = "train"
TEST_FOLDERS = ("val", "test")
_HOLDOUT_SALT = "budgetprune-holdout"

Sample = tuple[Path, int]


def is_folder_data(name) -> bool:
    """Whether the dataset name ``name`` is ``folder:PATH``."""
    return isinstance(name, str) and name.startswith(PREFIX)


def absolute_folder_data(name: str) -> str:
    """``folder:PATH`` with PATH made absolute (``~`` expanded, links kept): what a run records, so
    that ``--resume`` and ``evaluate`` from another working folder read the same images."""
    path = name[len(PREFIX):]
    return PREFIX + os.path.abspath(os.path.expanduser(path)) if path else name


def check_folder_options(data: str | None, image_size: int | None, augment: str | None,
                         workers: int | None) -> None:
    """One-line ConfigError for an image size, augmentation or worker count that cannot work, or an
    image size or augmentation given for data that is not ``folder:PATH``."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size < 1):
        raise ConfigError(f"--image-size must be a positive number of pixels (e.g. 32 or 224), got {image_size!r}")
    if augment is not None and augment not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation '{augment}': choose one of {', '.join(AUGMENTATIONS)}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ConfigError(f"--workers must be 0 (read in the main process) or more, got {workers!r}")
    if (image_size is not None or augment is not None) and not is_folder_data(data):
        raise ConfigError(f"--image-size and --augment apply to --data folder:PATH only; {data or 'this data'} "
                          "has its own size and augmentation: leave them out")


class FolderDataset(StreamedDataset):
    """Image files and their labels, decoded when read: ``dataset[i]`` is (normalised float
    tensor (3, N, N), class index), never augmented; a run's batches are augmented as
    ``transform`` says (see :class:`~budgetprune.data.streaming.StreamedDataset`)."""

    def __init__(self, samples: list[Sample], transform: ImageTransform, workers: int | None = None) -> None:
        super().__init__(workers)
        # one bytes array, not a list of Path objects: forked workers reading a list touch each
        # object's reference count, and so copy the memory of every page of it (a million images)
        self._paths = np.array([os.fsencode(path) for path, _ in samples], dtype=np.bytes_)
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        self.transform = transform
        self.augment = transform.augments
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> Path:
        """The file of item ``index``."""
        return Path(os.fsdecode(self._paths[index]))

    @property
    def paths(self) -> list[Path]:
        """The files of all items, in order."""
        return [self.path(i) for i in range(len(self))]

    def read(self, index: int, seed: int | None) -> tuple[torch.Tensor, int]:
        image = decode_rgb(self.path(index), size_hint=self.transform.size)
        rng = random.Random(seed) if seed is not None and self.augment else None
        return self.transform(image, rng), int(self.labels[index])

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return normalise(images, self._mean, self._std)

    def holdout(self, indices, augment: bool) -> FolderDataset:
        """The selected images, augmented as this dataset is if ``augment`` (a training part),
        never otherwise (a validation part); read by worker processes of their own."""
        samples = [(self.path(int(i)), int(self.labels[int(i)])) for i in indices]
        transform = self.transform if augment else ImageTransform(self.transform.size, "none")
        return FolderDataset(samples, transform, self.workers)

    def __repr__(self) -> str:
        size = self.transform.size
        return f"FolderDataset(n={len(self)}, shape=(3, {size}, {size}), augment={self.transform.augment!r})"


def load_image_folder(name: str, *, image_size: int | None = None, augment: str | None = None,
                      workers: int | None = None) -> DataSplits:
    """The train and test splits of the tree in ``name`` (``folder:PATH``); see the module's doc.

    ``image_size`` (default :data:`DEFAULT_IMAGE_SIZE`) is the side of the square inputs,
    ``augment`` (default :data:`DEFAULT_AUGMENT`) the training augmentation, ``workers``
    (default min(4, CPU count)) the DataLoader processes that decode the images.
    """
    check_folder_options(name, image_size, augment, workers)
    if not name[len(PREFIX):]:
        raise ConfigError("--data folder: needs the folder's path: folder:path/to/images")
    root = Path(name[len(PREFIX):]).expanduser()
    if not root.is_dir():
        state = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"image folder {root} {state}: give the folder that holds one sub-folder of images "
                        "per class (or train/ and val/ folders of them)")
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    augment = DEFAULT_AUGMENT if augment is None else augment
    train_dir, test_dir = _split_folders(root)
    if test_dir is not None:
        classes = scan_classes(train_dir)
        test_classes = scan_classes(test_dir)
        if test_classes != classes:
            raise DataError(_mismatch(train_dir, classes, test_dir, test_classes))
        train, test = list_samples(train_dir, classes), list_samples(test_dir, classes)
        source = f"train {train_dir}, test {test_dir}"
    else:
        classes = scan_classes(train_dir)
        train, test = holdout_split(list_samples(train_dir, classes), train_dir, len(classes))
        if not test:
            raise DataError(f"no class folder in {train_dir} holds two images, so none can be held out for "
                            f"testing: add images, or put train/ and val/ folders in {root}")
        source = (f"test split: {HOLDOUT_FRACTION:.0%} of each class held out from {train_dir} "
                  f"(fixed by the file names; put train/ and val/ folders in {root} to choose it)")
    info = DatasetInfo(name, 3, (size, size), len(classes), tuple(classes))
    note = (f"{name}: {len(classes)} classes, {len(train)} train and {len(test)} test images, {size}x{size} RGB, "
            f"augmentation {augment}; {source}")
    return DataSplits(train=FolderDataset(train, ImageTransform(size, augment), workers),
                      test=FolderDataset(test, ImageTransform(size, "none"), workers), info=info, note=note)


def _split_folders(root: Path) -> tuple[Path, Path | None]:
    """(training tree, test tree or None for a held-out split) of ``root``."""
    train = root / TRAIN_FOLDER
    if not train.is_dir():
        return root, None
    test = next((root / t for t in TEST_FOLDERS if (root / t).is_dir()), None)
    others = sorted(d.name for d in _visible_dirs(root) if d.name not in (TRAIN_FOLDER, *TEST_FOLDERS))
    if others:
        raise DataError(f"{root} holds {TRAIN_FOLDER}/ and also {', '.join(o + '/' for o in others[:3])}: put every "
                        f"class folder inside {TRAIN_FOLDER}/ (and val/), or rename {TRAIN_FOLDER}/ if it is a class")
    return train, test


def _visible_dirs(folder: Path) -> list[Path]:
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise DataError(f"cannot list {folder} ({exc.strerror or exc}): check that it is readable") from None
    return [Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir()]


def scan_classes(folder: Path) -> list[str]:
    """The sorted class folder names in ``folder``; DataError when it has none."""
    classes = sorted(d.name for d in _visible_dirs(folder))
    if not classes:
        has_images = any(is_image_file(e.name) for e in os.scandir(folder) if e.is_file())
        found = "images but no class folders" if has_images else "no class folders"
        raise DataError(f"{folder} holds {found}: put each class's images in a sub-folder named after the class "
                        f"({folder / 'cat' / '001.jpg'}, {folder / 'dog' / '001.jpg'}, ...)")
    return classes


def list_samples(folder: Path, classes: list[str]) -> list[Sample]:
    """(image path, class index) of every image under ``folder/<class>/``, class by class, each
    class's images sorted by path; DataError naming a class folder that holds no image."""
    samples = []
    for label, name in enumerate(classes):
        images = _images_under(folder / name)
        if not images:
            raise DataError(f"class folder {folder / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
                            "add images to it or remove it")
        samples += [(path, label) for path in images]
    return samples


def _images_under(folder: Path) -> list[Path]:
    """Image files in ``folder`` and its visible sub-folders (links followed, each folder once), sorted."""
    found, seen = [], set()
    for current, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:  # a link back up the tree
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(current) / f for f in files if is_image_file(f)]
    return sorted(found)


def holdout_split(samples: list[Sample], root: Path, num_classes: int,
                  fraction: float = HOLDOUT_FRACTION) -> tuple[list[Sample], list[Sample]]:
    """(train, test): ``fraction`` of each class's samples, at least one of a class with two or
    more, held out; the held-out ones are those whose path relative to ``root`` hashes lowest."""
    by_class: list[list[Sample]] = [[] for _ in range(num_classes)]
    for sample in samples:
        by_class[sample[1]].append(sample)
    held = set()
    for members in by_class:
        k = max(1, round(fraction * len(members))) if len(members) >= 2 else 0
        ranked = sorted(members, key=lambda s: _holdout_rank(s[0], root))
        held.update(path for path, _ in ranked[:k])
    return [s for s in samples if s[0] not in held], [s for s in samples if s[0] in held]


def _holdout_rank(path: Path, root: Path) -> bytes:
    relative = path.relative_to(root).as_posix()
    return hashlib.sha256(f"{_HOLDOUT_SALT}:{relative}".encode()).digest()


def _mismatch(train_dir: Path, train: list[str], test_dir: Path, test: list[str]) -> str:
    only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
    parts = [f"{', '.join(only_train[:5])} only in {train_dir}"] if only_train else []
    parts += [f"{', '.join(only_test[:5])} only in {test_dir}"] if only_test else []
    return (f"{train_dir} and {test_dir} hold different classes ({'; '.join(parts)}): give both the same "
            "class folders")
