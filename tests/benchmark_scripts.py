"""A script of ``benchmarks/`` imported by a test: the folder is on ``sys.path`` (for the script's
own imports: ``common``, ``stats``, ``peer``) only while the test module uses it."""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def benchmark_module(name: str):
    """``benchmarks/<name>.py`` as a module (use in a module-scoped fixture)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))
