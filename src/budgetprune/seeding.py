"""Every random stream of a run, derived from its one ``seed``.

A run draws random numbers in four places: the initial weights of a model the command line
creates, the batch order (and data augmentation) of every epoch, torch's global generator
(Hard Concrete and Gaussian gate noise, gate initialisation, the random baseline's scores,
dropout) and scipy's k-means (``vq``, which seeds its own generator). Each comes from
``seed`` and a name, so the same command twice on the same machine gives the same result, and
a resumed run continues the saved state of the global generator (see ``PruneRun``).

Python's ``random`` and numpy's global generator are not used by budgetprune and are not
seeded. Nothing here calls ``torch.use_deterministic_algorithms``: on a GPU some kernels
(cuDNN convolution backward, ``index_add_``) are not bit-reproducible unless the caller
enables it.
"""

from __future__ import annotations

import hashlib

import torch

def stream_seed(seed: int, name: str) -> int:
    """A 63-bit seed for the stream ``name`` of run seed ``seed`` (distinct names: unrelated streams)."""
    digest = hashlib.sha256(f"budgetprune:{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_model_init(seed: int) -> None:
    """Seed torch's global generator (CPU and every GPU) for creating a model's initial weights."""
    torch.manual_seed(stream_seed(seed, "model-init"))


def seed_stage(seed: int, stage: str) -> None:
    """Seed torch's global generator (CPU and every GPU) at the start of a stage's training."""
    torch.manual_seed(stream_seed(seed, f"stage-{stage}"))


def batch_generator(seed: int, stage_index: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's batch order and augmentation (budgetprune 0.1's formula, kept
    so that runs started before this module continue with the same batches)."""
    return torch.Generator().manual_seed(seed * 10007 + stage_index * 1009 + epoch)


def isolated_rng(device: torch.device):
    """A context in which a run may seed torch's global generator; the caller's state comes back after.

    Forks the CPU generator and, for a CUDA device, that device's generator.
    """
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices, enabled=True)
