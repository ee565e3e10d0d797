"""Datasets decoded from disk item by item, read in batches through a DataLoader with workers.

A :class:`StreamedDataset` says how to read one item (:meth:`~StreamedDataset.read`: a uint8
image and its label, augmented from a seed) and how to normalise a batch; :meth:`stream` turns
batches of indices, in the order the training loop chose, into normalised batches decoded by
``workers`` processes. The DataLoader is made once and kept (``persistent_workers``), so the
workers are not restarted every epoch; ``pin_memory`` is on when the batches go to a GPU.

Each epoch draws one seed per item from the loop's generator, in the main process: an item's
augmentation depends only on the run's seed, the epoch and the item, so any number of workers
(0 included) gives the same batches. A :class:`~budgetprune.errors.BudgetpruneError` raised
while a worker reads an item (a corrupt image) comes back to the main process as it was: one line.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import BudgetpruneError

__all__ = ["StreamedDataset", "default_workers"]

#: Seeds of items' augmentation are drawn in [0, 2**62).
_SEED_LIMIT = 1 << 62


def default_workers() -> int:
    """DataLoader worker processes when none are asked for: min(4, CPUs this process may use)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(4, cpus or 1)


class StreamedDataset(Dataset):
    """A dataset read from disk while training; subclasses define :meth:`__len__`, :meth:`read` and
    :meth:`normalise`.

    ``dataset[i]`` is item ``i`` normalised and without augmentation; ``augment`` says whether
    :meth:`stream` augments (with the seeds it draws). ``streamed`` tells the training code that
    the whole dataset is never in memory (teacher outputs are computed batch by batch).
    """

    streamed = True
    augment = False

    def __init__(self, workers: int | None = None) -> None:
        self.workers = default_workers() if workers is None else int(workers)
        self._loader: DataLoader | None = None
        self._loader_key: tuple[int, bool] | None = None

    def read(self, index: int, seed: int | None) -> tuple[torch.Tensor, int]:
        """Item ``index`` as (uint8 image (C, H, W), class index); augmented from ``seed`` unless None."""
        raise NotImplementedError

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """A uint8 batch (B, C, H, W) as the float32 inputs of a model."""
        raise NotImplementedError

    def __getitem__(self, index) -> tuple[torch.Tensor, int]:
        image, label = self.read(int(index), None)
        return self.normalise(image.unsqueeze(0))[0], label

    def stream(self, batches: Sequence[torch.Tensor], generator: torch.Generator | None = None,
               workers: int | None = None, pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised images and int64 labels of each batch of indices in ``batches``, in order.

        Augmentation seeds are drawn from ``generator`` (torch's default generator when None) when
        ``augment`` is on; ``workers`` (default: the dataset's) processes decode the items.
        """
        seeds = self._seeds(sum(len(b) for b in batches), generator)
        keyed, start = [], 0
        for batch in batches:
            items = batch.tolist()
            keyed.append(list(zip(items, seeds[start:start + len(items)])))
            start += len(items)
        loader = self._loader_for(self.workers if workers is None else int(workers), pin_memory)
        loader.batch_sampler.batches = keyed
        for result in loader:
            if isinstance(result, BaseException):
                try:
                    raise result
                finally:
                    del result  # no cycle exception -> traceback -> this frame -> exception
            yield result

    def close(self) -> None:
        """Stop the worker processes now (else when the dataset is freed, or at exit).

        Worth calling: DataLoader's workers stop slowly (seconds) when the garbage collector,
        rather than reference counting, frees a loader that still has them.
        """
        loader, self._loader, self._loader_key = self._loader, None, None
        # torch has no public way to stop persistent workers; the iterator is the loader's
        shutdown = getattr(getattr(loader, "_iterator", None), "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def _seeds(self, n: int, generator: torch.Generator | None) -> list[int | None]:
        if not self.augment:
            return [None] * n
        return torch.randint(0, _SEED_LIMIT, (n,), generator=generator).tolist()

    def _loader_for(self, workers: int, pin_memory: bool) -> DataLoader:
        if workers < 0:
            raise ValueError(f"workers must be 0 or more, got {workers}")
        key = (workers, bool(pin_memory))
        if self._loader is None or self._loader_key != key:
            self.close()
            reader = _ItemReader(copy.copy(self))  # a copy without the loader: no reference cycle
            self._loader = DataLoader(reader, batch_sampler=_Batches(), num_workers=workers,
                                      collate_fn=reader.collate, pin_memory=bool(pin_memory),
                                      persistent_workers=workers > 0,
                                      generator=torch.Generator())  # leaves torch's default generator alone
            self._loader_key = key
        return self._loader

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()  # a worker started by "spawn" gets the dataset, not its loader
        state["_loader"], state["_loader_key"] = None, None
        return state


class _Batches(Sampler):
    """The batches of ``(index, seed)`` of the current pass; :meth:`StreamedDataset.stream` sets them."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int | None]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _ItemReader(Dataset):
    """What the DataLoader's workers run: items by ``(index, seed)``, and a collate that normalises.

    A user-facing error while reading is returned in place of the item and of its batch, so that
    the main process re-raises it as it is instead of DataLoader's multi-line wrapper.
    """

    def __init__(self, dataset: StreamedDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int | None]):
        try:
            return self.dataset.read(*key)
        except BudgetpruneError as exc:
            return exc

    def collate(self, items: list) -> tuple[torch.Tensor, torch.Tensor] | BudgetpruneError:
        failed = next((item for item in items if isinstance(item, BudgetpruneError)), None)
        if failed is not None:
            return failed
        images = torch.stack([image for image, _ in items])
        labels = torch.tensor([label for _, label in items], dtype=torch.int64)
        return self.dataset.normalise(images), labels
