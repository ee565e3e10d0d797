"""The dataset registry: name -> how to find, load and download a dataset.

A dataset plugs in with the :func:`register` decorator on its loader, a function
``loader(root, spec) -> DataSplits`` that reads the files under ``root`` (the data root
the user gave, or None for datasets shipped inside the package) and raises
:class:`DatasetNotFound` when they are absent.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import DataError
from .tensors import DataSplits, DatasetInfo

__all__ = [
    "Resource",
    "DatasetSpec",
    "DatasetNotFound",
    "REGISTRY",
    "register",
    "get_spec",
    "available_datasets",
    "resolve_root",
    "dataset_dir",
    "DEFAULT_ROOT",
    "ROOT_ENV",
]

ROOT_ENV = "BUDGETPRUNE_DATA"
DEFAULT_ROOT = Path("~/.cache/budgetprune/data")


class DatasetNotFound(DataError):
    """The files of a dataset are not in the data root (``download=True`` can fetch them)."""


@dataclass(frozen=True)
class Resource:
    """One file to download: name, md5 as the publisher gives it, URLs tried in order.

    ``members`` is empty for a plain file saved as is; for a ``.tar.gz`` archive it lists
    ``(path inside the archive, md5)`` of the files to extract into the dataset folder
    (flattened: only the file name is kept).
    """

    filename: str
    md5: str
    urls: tuple[str, ...]
    members: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the package knows about one dataset."""

    info: DatasetInfo
    title: str  # name for messages, e.g. "Fashion-MNIST"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    loader: Callable[[Path | None, "DatasetSpec"], DataSplits]
    folder: str | None = None  # sub-folder of the data root holding the files; None: embedded
    markers: tuple[str, ...] = ()  # files whose presence means root itself is that folder
    resources: tuple[Resource, ...] = field(default=())

    @property
    def name(self) -> str:
        return self.info.name


REGISTRY: dict[str, DatasetSpec] = {}


def register(
    info: DatasetInfo,
    *,
    title: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    folder: str | None = None,
    markers: tuple[str, ...] = (),
    resources: tuple[Resource, ...] = (),
) -> Callable[[Callable], Callable]:
    """Decorator: register ``loader(root, spec) -> DataSplits`` under ``info.name``."""

    def decorate(loader: Callable) -> Callable:
        REGISTRY[info.name] = DatasetSpec(
            info=info,
            title=title,
            mean=tuple(mean),
            std=tuple(std),
            loader=loader,
            folder=folder,
            markers=tuple(markers),
            resources=tuple(resources),
        )
        return loader

    return decorate


def available_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(REGISTRY)


def get_spec(name: str) -> DatasetSpec:
    """The spec of ``name``; an unknown name raises DataError listing the choices."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        pass
    choices = available_datasets()
    close = difflib.get_close_matches(str(name).lower(), choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise DataError(f"unknown dataset '{name}'{hint}: choose one of {', '.join(choices)}, "
                    "or folder:PATH for your own images")


def resolve_root(root: str | os.PathLike | None) -> Path:
    """``root``, else ``$BUDGETPRUNE_DATA``, else ``~/.cache/budgetprune/data`` (user-expanded)."""
    if root is None or str(root) == "":
        root = os.environ.get(ROOT_ENV) or DEFAULT_ROOT
    return Path(root).expanduser()


def dataset_dir(root: Path, folder: str, markers: tuple[str, ...] = ()) -> Path:
    """The folder of a dataset under ``root``: ``root/folder`` if it exists, else ``root``
    itself when it is named ``folder`` or holds one of ``markers``, else ``root/folder``."""
    sub = root / folder
    if sub.is_dir():
        return sub
    if root.name == folder or any((root / m).exists() for m in markers):
        return root
    return sub
