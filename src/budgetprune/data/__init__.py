"""Datasets for budgetprune: MNIST, Fashion-MNIST, CIFAR-10/100, an embedded demo set, and your
own images (``folder:PATH``).

``load_dataset(name, root)`` returns :class:`DataSplits` (train and test
:class:`ImageDataset` held in memory as uint8, plus :class:`DatasetInfo`); for ``folder:PATH``
the splits are :class:`FolderDataset`, decoded from disk while a run reads them; ``download``
fetches the publishers' files and checks their md5. Datasets plug in through
:func:`budgetprune.data.registry.register`. Every problem a user can fix raises
:class:`budgetprune.errors.DataError` (or ``DownloadError``) with a one-line message.
"""

from . import cifar as _cifar  # noqa: F401  (registers cifar10, cifar100)
from . import demo as _demo  # noqa: F401  (registers demo)
from . import mnist as _mnist  # noqa: F401  (registers mnist, fashion-mnist)
from .fetch import download
from .folder import FolderDataset
from .loading import load_dataset
from .registry import available_datasets
from .tensors import DataSplits, DatasetInfo, ImageDataset

__all__ = ["load_dataset", "available_datasets", "DatasetInfo", "ImageDataset", "DataSplits", "FolderDataset",
           "download"]
