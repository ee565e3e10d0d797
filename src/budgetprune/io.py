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
"values"}}``, and left out of ``state_dict``. A model a Pruner finalized also carries ``"plan"``
(JSON of :mod:`budgetprune.plan`); format 4 holds the plan and the weights without ``"graph"``,
for networks a self-contained file cannot describe (loaded with the user's model). Format 1
(still read): ``"architecture"`` is a JSON list of layer specs of an ``nn.Sequential``.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import graphio
from .architecture import build_sequential
from .plan import replay as plan_replay
from .errors import CheckpointError, first_line

FORMAT = "budgetprune-model"
FORMAT_VERSION = 4
SPARSE_DENSITY = 0.5  # floating-point tensors with at most this fraction of non-zeros are stored sparse


#: Name of an :func:`atomic_write` temporary file: ``tempfile.mkstemp(prefix=".NAME.", suffix=".tmp")``.
TEMP_FILE_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(file_object)`` on a temporary file, then move it over ``path``.

    The file gets the permissions a plain ``open(path, "w")`` would (0666 less the umask), not
    mkstemp's 0600. A temporary file that outlives a killed process is removed by
    :func:`remove_stale_temp_files`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process's umask, read from /proc where it can be (setting it to read it races with threads)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temp_files(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files of interrupted :func:`atomic_write` calls in ``folder``; their names.

    Call it only while nothing can be writing into ``folder`` (a run holds its lock, see
    :mod:`budgetprune.runfolder`). Only regular files named like :data:`TEMP_FILE_NAME` go.
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    removed = []
    for entry in entries:
        if TEMP_FILE_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(entry.name)
    return removed


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written in ``folder`` (created when missing), or None.

    The answer completes the sentence "``folder`` ...": "is a file, not a folder", "lies under
    the file X", "is not writable", "cannot be created: X is not writable".
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return "is a file, not a folder"
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing != folder and existing.exists() and not existing.is_dir():
        return f"lies under the file {existing}"
    if not os.access(existing, os.W_OK | os.X_OK):
        return "is not writable" if existing == folder else f"cannot be created: {existing} is not writable"
    return None


def write_json(path, obj) -> None:
    atomic_write(path, lambda fh: fh.write((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()))


def write_text(path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


def torch_save(path, obj) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


#: How much more memory the tensors of a file may claim than the data it stores (weights a
#: model ties share one stored copy); anything more is a file built to exhaust memory.
CLAIM_FACTOR = 2


def torch_load(path, what: str = "checkpoint") -> dict:
    """``torch.load`` with ``weights_only=True`` and one-line errors.

    Every tensor must be backed by the data the file stores (:func:`check_backed`), so a file
    cannot make a later copy of its tensors allocate more than it holds."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{what} {path} cannot be read ({first_line(exc)}); "
                              "is it a budgetprune or torch file?") from None
    check_backed(obj, f"{what} {path}")
    return obj


def check_backed(obj, where: str) -> None:
    """Refuse tensors that claim more elements than their storage holds (``expand``-ed, stride 0),
    non-strided layouts, and files whose tensors claim in all more than :data:`CLAIM_FACTOR`
    times the bytes they store."""
    claimed, storages = 0, {}
    stack, seen = [obj], 0
    while stack:
        item = stack.pop()
        seen += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, torch.Tensor):
            try:
                storage = item.untyped_storage() if item.layout == torch.strided else None
            except (RuntimeError, NotImplementedError):
                storage = None
            need = item.numel() * item.element_size()
            if storage is None or (need and storage.nbytes() < need):
                raise CheckpointError(f"{where} holds a tensor of shape {tuple(item.shape)} that is not backed by "
                                      "its own data (expanded, or not a dense tensor); the file is damaged or crafted")
            claimed += need
            storages[storage.data_ptr()] = storage.nbytes()
    if claimed > CLAIM_FACTOR * sum(storages.values()) + 2 ** 20:
        raise CheckpointError(f"{where} has tensors claiming {claimed} bytes over {sum(storages.values())} bytes "
                              "of stored data; the file is damaged or crafted")


def save(model: nn.Module, path: str | os.PathLike, specs: list[dict] | None = None,
         meta: dict | None = None) -> None:
    """Save a compacted model: its graph description and/or pruning plan, weights and metadata.

    ``model`` is a ``torch.fx.GraphModule``, or a module such as an ``nn.Sequential`` that is
    traced with torch.fx first. A model a :class:`~budgetprune.pruner.Pruner` finalized carries
    its pruning plan (``budgetprune_plan``), which is saved too; where the network uses
    something a self-contained file cannot hold, the file holds the plan and the weights only
    (format 4: load it with the original model, ``load(path, model=...)``). ``specs`` is
    accepted for compatibility with format 1 and ignored. Raises :class:`CheckpointError` when
    the model can be saved neither way.
    """
    plan = getattr(model, "budgetprune_plan", None)
    try:
        gm = graphio.trace(model)
        description = graphio.describe(gm)
        state = graphio.saveable_state(gm, description)
    except CheckpointError:
        if plan is None:
            raise
        description, state = None, {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state, sparse = pack_sparse(state)
    version = 4 if description is None else 3 if sparse else 2
    obj = {"format": FORMAT, "version": version, "state_dict": state, "meta": json.dumps(meta or {})}
    if description is not None:
        obj["graph"] = json.dumps(description)
    if plan is not None:
        obj["plan"] = json.dumps(plan)
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
    """The full state dict back from :func:`pack_sparse`'s two parts.

    Each entry is checked before anything is allocated: its shape's size must match the bit
    mask's length and its values the number of set bits, so a file cannot declare more
    memory than it holds bits for."""
    if not isinstance(sparse, dict):
        raise CheckpointError("the sparse section is not a mapping of names to sparse tensors")
    out = dict(state)
    for name, entry in sparse.items():
        shape, bits, values = _sparse_parts(name, entry, state)
        mask = torch.from_numpy(np.unpackbits(bits.numpy(), count=math.prod(shape)).astype(bool))
        if int(mask.sum()) != values.numel():
            raise CheckpointError(f"sparse tensor {name!r:.80} has {values.numel()} values for "
                                  f"{int(mask.sum())} non-zeros")
        t = torch.zeros(mask.numel(), dtype=values.dtype)
        t[mask] = values
        out[name] = t.reshape(shape)
    return out


def _sparse_parts(name, entry, state: dict) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(shape, bits, values) of one sparse entry, checked against each other before unpacking."""
    parts = [entry.get(k) for k in ("shape", "bits", "values")] if isinstance(entry, dict) else [None]
    if not isinstance(name, str) or name in state or len(parts) != 3 or not all(torch.is_tensor(p) for p in parts):
        raise CheckpointError(f"sparse entry {name!r:.80} is not a shape, bit mask and values")
    shape_t, bits, values = parts
    if shape_t.dtype != torch.long or shape_t.dim() != 1 or shape_t.numel() > 8 or bool((shape_t < 0).any()):
        raise CheckpointError(f"sparse tensor {name!r:.80} has a malformed shape {shape_t.tolist()!r:.60}")
    shape = [int(v) for v in shape_t]
    n = math.prod(shape)
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != -(-n // 8):
        raise CheckpointError(f"sparse tensor {name!r:.80} declares {n} weights but holds a bit mask of "
                              f"{bits.numel()} bytes")
    if not values.is_floating_point() or values.dim() != 1 or values.numel() > n:
        raise CheckpointError(f"sparse tensor {name!r:.80} has malformed values (dtype {values.dtype}, "
                              f"shape {tuple(values.shape)})")
    return shape, bits, values


def check_meta(meta) -> dict:
    """The metadata of a model file: an object whose ``input_shape``, if any, is 1 to 4 positive
    sizes (at most 2**26 values in all) and whose ``metrics``, if any, map names to plain values."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"the metadata is a {type(meta).__name__}, not an object")
    shape = meta.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and 1 <= len(shape) <= 4
                                  and all(type(v) is int and 0 < v <= 2 ** 16 for v in shape)
                                  and math.prod(shape) <= 2 ** 26):
        raise CheckpointError(f"the recorded input shape {shape!r:.60} is not 1 to 4 positive sizes")
    metrics = meta.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, (str, int, float))) for k, v in metrics.items()):
        raise CheckpointError("the recorded metrics are not a mapping of names to numbers or words")
    return meta


def load_file(path: str | os.PathLike, model: nn.Module | None = None, *,
              fallback: nn.Module | None = None) -> tuple[nn.Module, list[dict] | dict, dict]:
    """(model in eval mode, architecture, metadata) from a model file.

    The architecture is the list of layer specs for a format-1 file and the graph
    description (:func:`budgetprune.graphio.describe`) for a format-2 or 3 file; the model is an
    ``nn.Sequential`` or a ``torch.fx.GraphModule`` accordingly. With ``model`` (the
    architecture that was pruned, unpruned), the file's pruning plan is replayed on it instead
    (:func:`budgetprune.plan.replay`) and the architecture is the plan; a format-4 file (plan and
    weights only) needs it; ``fallback`` is used as ``model`` for such a file only (a file with a
    graph is then rebuilt from it).
    """
    obj = torch_load(path, "model file")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a budgetprune model file (no '{FORMAT}' header); "
                              "pass a model.pt written by budgetprune")
    version = obj.get("version", 0)
    if not isinstance(version, int):
        raise CheckpointError(f"{path} is a damaged budgetprune model file (format version {version!r:.20} "
                              "is not a number)")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer budgetprune (format {version}); upgrade")
    try:
        meta = check_meta(json.loads(obj.get("meta", "{}")))
        if model is None and "graph" not in obj and version >= 4:
            model = fallback
        if model is not None or version >= 4 and "graph" not in obj:
            if "plan" not in obj:
                raise CheckpointError("it holds no pruning plan to replay on the model passed (it was not "
                                      "written from a Pruner's result); load it without model=")
            if model is None:
                raise CheckpointError("it holds the pruning plan and weights of a network no self-contained file "
                                      "can describe: load it in Python with budgetprune.load(path, "
                                      "model=TheUnprunedModel())")
            architecture = json.loads(obj["plan"])
            model = plan_replay(architecture, model, unpack_sparse(obj["state_dict"], obj.get("sparse", {})))
        elif version >= 2:
            architecture = json.loads(obj["graph"])
            model = graphio.rebuild(architecture, unpack_sparse(obj["state_dict"], obj.get("sparse", {})))
        else:
            architecture = json.loads(obj["architecture"])
            model = _load_sequential(architecture, obj["state_dict"])
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except MemoryError:
        raise CheckpointError(f"{path} describes a model too large for this machine's memory") from None
    except (KeyError, TypeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path} is a damaged budgetprune model file ({type(exc).__name__}: "
                              f"{first_line(exc)})") from None
    return model.eval(), architecture, meta


def _load_sequential(specs: list[dict], state_dict: dict) -> nn.Sequential:
    """A format-1 model: the Sequential ``specs`` describes, with ``state_dict`` loaded strictly
    (built on the meta device and checked against the stored shapes before memory is allocated)."""
    if not isinstance(specs, list) or not isinstance(state_dict, dict) or \
            not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state_dict.items()):
        raise CheckpointError("malformed format-1 file: no list of layers and mapping of weights")
    with torch.device("meta"):
        model = build_sequential(specs)
    graphio.check_state_shapes(model, state_dict)
    model.to_empty(device="cpu")
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
