"""Freed CPU buffers kept for reuse by glibc's malloc while a model trains on the CPU.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc's defaults give every buffer
over its mmap threshold (128 KiB, raised as buffers are freed, up to 32 MiB) a fresh ``mmap``
and return it to the kernel on ``free``: a training step that writes feature maps over 32 MiB
(ResNet-50 at 224 px, batch 16) maps them anew at every step and pays a page fault for every
page it writes. Per-example gates write and keep more maps, so they pay more of these faults
(README, "In your loop"; ``benchmarks/pruner_overhead.py``: on ResNet-50 at 224 px the pruner
added 5–6 % to a step with freed buffers kept, 7–13 % with glibc's defaults, and the plain step
was faster too).

:func:`keep_freed_buffers` makes, through ``mallopt``, the two settings the
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` variables make at start-up (glibc's
manual, "Memory Allocation Tunables"): buffers up to 2 GiB (the most ``mallopt``'s int takes;
32 MiB on glibc releases that refuse more) come from the heap, and freed ones stay there for the
next step, as PyTorch's GPU caching allocator keeps its own. The process then holds its peak
memory (more where the heap fragments), which a training loop reaches at every step anyway;
the setting lasts as long as the process. Threads other than the main one allocate from arenas
of at most 64 MiB, so their larger buffers are still mapped anew. The allocator is left alone
where the user chose one: another allocator preloaded (``LD_PRELOAD``: tcmalloc, jemalloc), a
``MALLOC_*`` variable or ``GLIBC_TUNABLES`` of their own, or a C library other than glibc.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Callable

import torch

from .errors import ConfigError

#: the ``cpu_buffers`` choices: keep freed buffers for reuse while training on the CPU, or leave
#: the allocator as the process has it
CHOICES = ("keep", "system")

#: glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: the largest value mallopt's int argument takes: buffers up to 2 GiB from the heap
LARGEST = 2 ** 31 - 1
#: the mmap threshold glibc releases that refuse more accept (their documented maximum, 32 MiB)
FALLBACK = 32 << 20

_applied = False


def why_not() -> str | None:
    """Why :func:`keep_freed_buffers` would leave the allocator as it is, or None when it would set it."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the C library is not glibc"
    if os.environ.get("LD_PRELOAD", "").strip():
        return "another allocator is preloaded (LD_PRELOAD)"
    chosen = sorted(k for k in os.environ if k.startswith(("MALLOC_", "GLIBC_TUNABLES")))
    if chosen:
        return f"the allocator is already configured ({', '.join(chosen)})"
    return None


def _mallopt():
    """glibc's ``mallopt`` of the running process (its own C library), typed."""
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def keep_freed_buffers() -> bool:
    """Ask glibc's malloc to keep freed buffers for reuse, once per process (module docstring).
    True when it is (now or by an earlier call), False where :func:`why_not` says why not or
    glibc refused; never raises.

    The mmap threshold goes first: setting either value turns glibc's self-adjusting threshold
    off, and a trim threshold alone would leave every buffer over 128 KiB mapped anew."""
    global _applied
    if _applied:
        return True
    try:
        if why_not() is not None:
            return False
        mallopt = _mallopt()
        if not (mallopt(M_MMAP_THRESHOLD, LARGEST) or mallopt(M_MMAP_THRESHOLD, FALLBACK)):
            return False
        _applied = bool(mallopt(M_TRIM_THRESHOLD, LARGEST))
    except Exception:  # no glibc after all, no mallopt: the allocator as it is
        return False
    return _applied


def check_cpu_buffers(value, name: str = "cpu_buffers") -> None:
    """A one-line error unless ``value`` is one of :data:`CHOICES`."""
    if value not in CHOICES:
        raise ConfigError(f"{name} must be 'keep' (freed CPU buffers kept for reuse while training on the CPU) "
                          f"or 'system' (the allocator left as it is), got {value!r:.40}")


def prepare(device: torch.device, choice: str, log: Callable[[str], None]) -> bool:
    """With ``choice`` ``"keep"`` (checked by the caller, :func:`check_cpu_buffers`) and training
    on the CPU, :func:`keep_freed_buffers`; logs one line the first time it sets the allocator in
    this process. True when freed buffers are kept."""
    if choice != "keep" or torch.device(device).type != "cpu":
        return False
    first = not _applied
    kept = keep_freed_buffers()
    if kept and first:
        log("CPU memory: glibc's malloc keeps freed buffers for reuse while this process trains "
            "(faster CPU steps; cpu_buffers='system' / --cpu-buffers system leaves the allocator as it is)")
    return kept
