"""Saving and loading models and run files safely.

A model file is ``torch.save`` of a plain dict — a description of the network (JSON text),
the weights, and metadata — read back with ``torch.load(..., weights_only=True)``: no
arbitrary object is ever unpickled. Every file is written atomically (temporary file in the
same folder, then ``os.replace``), so an interrupted run never leaves a half-written file.

Format 2 (written now): ``{"format", "version": 2, "graph", "state_dict", "meta"}`` where
``graph`` is the JSON of :func:`budgetprune.graphio.describe` of the model's ``torch.fx``
graph, so residual networks are saved as well as chains. Format 3 is format 2 plus
``"sparse"``: weights that are at least half zeros (unstructured pruning) are stored as a
bit mask (1 bit per weight) and their non-zero values, ``{name: {"shape", "bits",
"values"}}``, and left out of ``state_dict``. Format 1 (still read): ``"architecture"`` is a
JSON list of layer specs of an ``nn.Sequential``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import graphio
from .architecture import build_sequential
from .errors import CheckpointError

FORMAT = "budgetprune-model"
FORMAT_VERSION = 3
SPARSE_DENSITY = 0.5  # floating-point tensors with at most this fraction of non-zeros are stored sparse


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


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def torch_load(path, what: str = "checkpoint") -> dict:
    """``torch.load`` with ``weights_only=True`` and one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{what} {path} cannot be read ({_first_line(exc)}); "
                              "is it a budgetprune or torch file?") from None
    return obj


def save(model: nn.Module, path: str | os.PathLike, specs: list[dict] | None = None,
         meta: dict | None = None) -> None:
    """Save a compacted model (format 2): its graph description, weights and metadata.

    ``model`` is a ``torch.fx.GraphModule``, or a module such as an ``nn.Sequential`` that is
    traced with torch.fx first.
    ``specs`` is accepted for compatibility with format 1 and ignored. Raises
    :class:`CheckpointError` when the model uses something a model file cannot hold.
    """
    gm = graphio.trace(model)
    description = graphio.describe(gm)
    state, sparse = pack_sparse(graphio.saveable_state(gm, description))
    obj = {"format": FORMAT, "version": 3 if sparse else 2, "graph": json.dumps(description),
           "state_dict": state, "meta": json.dumps(meta or {})}
    if sparse:
        obj["sparse"] = sparse
    torch_save(path, obj)


def pack_sparse(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(dense tensors, sparse ones as {"shape", "bits", "values"}) of a state dict."""
    dense, sparse = {}, {}
    for name, t in state.items():
        if t.is_floating_point() and t.numel() >= 64 and int(torch.count_nonzero(t)) <= SPARSE_DENSITY * t.numel():
            mask = (t != 0).reshape(-1).cpu()
            sparse[name] = {"shape": torch.tensor(t.shape, dtype=torch.long),
                            "bits": torch.from_numpy(np.packbits(mask.numpy())),
                            "values": t.reshape(-1)[mask.to(t.device)].clone()}
        else:
            dense[name] = t
    return dense, sparse


def unpack_sparse(state: dict[str, torch.Tensor], sparse: dict) -> dict[str, torch.Tensor]:
    """The full state dict back from :func:`pack_sparse`'s two parts."""
    out = dict(state)
    for name, entry in sparse.items():
        shape = [int(v) for v in entry["shape"]]
        n = int(np.prod(shape)) if shape else 1
        mask = torch.from_numpy(np.unpackbits(entry["bits"].numpy(), count=n).astype(bool))
        values = entry["values"]
        if int(mask.sum()) != values.numel():
            raise ValueError(f"sparse tensor {name} has {values.numel()} values for {int(mask.sum())} non-zeros")
        t = torch.zeros(n, dtype=values.dtype)
        t[mask] = values
        out[name] = t.reshape(shape)
    return out


def load_file(path: str | os.PathLike) -> tuple[nn.Module, list[dict] | dict, dict]:
    """(model in eval mode, architecture, metadata) from a model file.

    The architecture is the list of layer specs for a format-1 file and the graph
    description (:func:`budgetprune.graphio.describe`) for a format-2 file; the model is an
    ``nn.Sequential`` or a ``torch.fx.GraphModule`` accordingly.
    """
    obj = torch_load(path, "model file")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a budgetprune model file (no '{FORMAT}' header); "
                              "pass a model.pt written by budgetprune")
    version = obj.get("version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer budgetprune (format {version}); upgrade")
    try:
        meta = json.loads(obj.get("meta", "{}"))
        if version >= 2:
            architecture = json.loads(obj["graph"])
            model = graphio.rebuild(architecture, unpack_sparse(obj["state_dict"], obj.get("sparse", {})))
        else:
            architecture = json.loads(obj["architecture"])
            model = _load_sequential(architecture, obj["state_dict"])
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} is a damaged budgetprune model file ({type(exc).__name__}: "
                              f"{_first_line(exc)})") from None
    return model.eval(), architecture, meta


def _load_sequential(specs: list[dict], state_dict: dict) -> nn.Sequential:
    """A format-1 model: the Sequential ``specs`` describes, with ``state_dict`` loaded strictly."""
    model = build_sequential(specs)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights do not match the architecture ({str(exc).splitlines()[0]})") from None
    return model


def named_layer_specs(architecture: list[dict] | dict) -> list[tuple[str, dict]]:
    """(module name, layer spec) of each layer of a model file's architecture, in order.

    For a format-1 list the names are the Sequential's indices; for a format-2 graph
    description they are the called modules' qualified names (the same for a traced Sequential).
    """
    if isinstance(architecture, dict):
        return graphio.named_layer_specs(architecture)
    return [(str(i), spec) for i, spec in enumerate(architecture)]


def layer_specs(architecture: list[dict] | dict) -> list[dict]:
    """The layer specs of a model file's architecture, in order (see :func:`named_layer_specs`)."""
    return [spec for _, spec in named_layer_specs(architecture)]


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild a saved (compacted) model without its original code; returned in eval mode."""
    return load_file(path)[0]
