"""Saving and loading models and run files safely.

A model file is ``torch.save`` of a plain dict — an architecture description (JSON text),
the weights, and metadata — read back with ``torch.load(..., weights_only=True)``: no
arbitrary object is ever unpickled. Every file is written atomically (temporary file in the
same folder, then ``os.replace``), so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from .architecture import build_sequential
from .errors import CheckpointError

FORMAT = "budgetprune-model"
FORMAT_VERSION = 1


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(file_object)`` on a temporary file, then move it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, obj) -> None:
    atomic_write(path, lambda fh: fh.write((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()))


def write_text(path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


def torch_save(path, obj) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


def torch_load(path, what: str = "checkpoint") -> dict:
    """``torch.load`` with ``weights_only=True`` and one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"{what} {path} cannot be read ({first}); is it a budgetprune or torch file?") from None
    return obj


def save(model: nn.Sequential, path: str | os.PathLike, specs: list[dict], meta: dict | None = None) -> None:
    """Save a compacted model: its architecture description, weights and metadata."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch_save(path, {"format": FORMAT, "version": FORMAT_VERSION, "architecture": json.dumps(specs),
                      "state_dict": state, "meta": json.dumps(meta or {})})


def load_file(path: str | os.PathLike) -> tuple[nn.Sequential, list[dict], dict]:
    """(model, architecture description, metadata) from a model file."""
    obj = torch_load(path, "model file")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a budgetprune model file (no '{FORMAT}' header); "
                              "pass a model.pt written by budgetprune")
    if obj.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer budgetprune (format {obj['version']}); upgrade")
    specs = json.loads(obj["architecture"])
    model = build_sequential(specs)
    try:
        model.load_state_dict(obj["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the architecture ({str(exc).splitlines()[0]})") from None
    return model.eval(), specs, json.loads(obj.get("meta", "{}"))


def load(path: str | os.PathLike) -> nn.Sequential:
    """Rebuild a saved (compacted) model without its original code; returned in eval mode."""
    return load_file(path)[0]
