"""``load_dataset``: look a dataset up in the registry, download it if asked, load it."""

from __future__ import annotations

import os

from ..errors import ConfigError
from .fetch import download as _download
from .folder import check_folder_options, is_folder_data, load_image_folder
from .registry import DatasetNotFound, get_spec, resolve_root
from .tensors import DataSplits

__all__ = ["load_dataset"]


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    download: bool = False,
    mirror: str | None = None,
    progress: bool = True,
    *,
    image_size: int | None = None,
    augment: str | None = None,
    workers: int | None = None,
) -> DataSplits:
    """Load the train and test splits of dataset ``name`` into memory, or of ``folder:PATH``.

    ``root`` is the data root (default ``$BUDGETPRUNE_DATA``, else
    ``~/.cache/budgetprune/data``); a dataset's files may sit in ``root/<folder>/`` or in
    ``root`` itself. With ``download=True`` missing files are fetched first (from ``mirror``
    if given); files that are present are used as they are. ``demo`` ignores all of this.

    ``folder:PATH`` is a tree of your own images, streamed from disk (see
    :mod:`budgetprune.data.folder`): ``image_size``, ``augment`` and ``workers`` apply to it
    (the first two to it only), ``root`` and ``mirror`` do not.
    """
    check_folder_options(name, image_size, augment, workers)
    if is_folder_data(name):
        if download:
            raise ConfigError("--download fetches the built-in datasets; folder:PATH reads your own images: "
                              "drop --download")
        return load_image_folder(name, image_size=image_size, augment=augment, workers=workers)
    spec = get_spec(name)
    if spec.folder is None:
        return spec.loader(None, spec)
    base = resolve_root(root)
    try:
        return spec.loader(base, spec)
    except DatasetNotFound:
        if not download:
            raise
    _download(name, base, mirror=mirror, progress=progress)
    return spec.loader(base, spec)
