"""``load_dataset``: look a dataset up in the registry, download it if asked, load it."""

from __future__ import annotations

import os

from .fetch import download as _download
from .registry import DatasetNotFound, get_spec, resolve_root
from .tensors import DataSplits

__all__ = ["load_dataset"]


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    download: bool = False,
    mirror: str | None = None,
    progress: bool = True,
) -> DataSplits:
    """Load the train and test splits of dataset ``name`` into memory.

    ``root`` is the data root (default ``$BUDGETPRUNE_DATA``, else
    ``~/.cache/budgetprune/data``); a dataset's files may sit in ``root/<folder>/`` or in
    ``root`` itself. With ``download=True`` missing files are fetched first (from ``mirror``
    if given); files that are present are used as they are. ``demo`` ignores all of this.
    """
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
