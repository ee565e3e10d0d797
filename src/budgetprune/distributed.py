"""torch.distributed for budgetprune: who this process is, and the few collectives a pruner and
a run need to give every process the same decisions.

Everything here is a no-op in one process (no process group, or a world of one), so callers
call it unconditionally. Processes started by ``torchrun`` find their rank and world size in
the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
:func:`init_from_env` joins that group (gloo on the CPU, NCCL on CUDA).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: the group's, or before it is joined, the one ``torchrun`` gave it."""
    if active():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes files and prints."""
    return rank() == 0


def launched() -> bool:
    """Whether ``torchrun`` (or another launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str) -> str:
    """Join the process group ``torchrun`` describes in the environment, when there is one, and
    return the device this process trains on: ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per
    process); other devices are kept."""
    if not launched():
        return device
    if not dist.is_available():
        raise ConfigError("this torch has no torch.distributed: run in one process, without torchrun")
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        if torch.cuda.is_available():
            torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return device


def shutdown() -> None:
    """Leave the process group :func:`init_from_env` joined (nothing when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main_only(context) -> contextlib.AbstractContextManager:
    """``context`` on rank 0, a context that does nothing on the other ranks (a run folder's lock)."""
    return context if is_main() else contextlib.nullcontext()


def barrier() -> None:
    if active():
        dist.barrier()


def new_group():
    """A process group of every rank apart from the default one, so that collectives issued from
    autograd hooks never interleave with DistributedDataParallel's (None in one process)."""
    return dist.new_group() if active() else None


def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0, group=None) -> None:
    """Every tensor in place takes rank ``src``'s values."""
    if not active():
        return
    for t in tensors:
        dist.broadcast(t.data, src, group=group)


def broadcast_module(module: nn.Module, src: int = 0, group=None) -> None:
    """Every parameter and buffer of ``module`` takes rank ``src``'s values."""
    broadcast_tensors(list(module.parameters()) + list(module.buffers()), src, group)


def average_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """``tensor`` in place becomes its mean over the ranks."""
    if active():
        dist.all_reduce(tensor, group=group)
        tensor.div_(dist.get_world_size(group))
    return tensor


def sum_values(values: list[float], device: torch.device | str = "cpu") -> list[float]:
    """The sums of ``values`` over the ranks (the values themselves in one process)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def average_gradients(params: Iterable[nn.Parameter], group=None) -> list:
    """Hooks that average each parameter's gradient over the ranks once backward has accumulated
    it (what DistributedDataParallel does for a model's parameters, for parameters it does not
    hold). Averaging a gradient that is already the same on every rank leaves it unchanged, so
    gradient accumulation over several backward passes stays exact. Returns the hook handles."""
    if not active():
        return []

    def hook(p: torch.Tensor) -> None:
        if p.grad is not None:
            average_(p.grad, group)
    return [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]


_computing = False  # rank 0 is inside from_main's compute
_calls = 0  # from_main calls so far: the same count on every rank, as for any collective
#: How long the other ranks wait for rank 0's result: a first latency table of a large network can
#: take longer than a collective's 10 (NCCL) or 30 (gloo) minutes; a rank 0 that dies ends the
#: others anyway (torchrun stops every process of a run when one fails).
MAIN_WAIT = datetime.timedelta(hours=2)


def from_main(compute, group=None, device: torch.device | str | None = None):
    """``compute()`` on rank 0, its result (picklable) on every rank, broadcast in ``group`` (on
    ``device``: a GPU under NCCL; None, the group's own).

    Until rank 0 has it, the other ranks wait on the process group's store (the rendezvous's TCP
    store), idle: a rank waiting inside an NCCL collective spins a CPU core, and what rank 0
    computes is often a timing (a latency table, the padding against exact widths, the deployed
    speed) that busy CPUs would slow and that :class:`budgetprune.quiet.Quiet` would set aside as
    busy. An error on rank 0 is raised on every rank (its message kept), so the others never wait
    for a result that will not come. Called again inside ``compute`` (the latency table a
    decision's cost models read), it computes in place: the others wait for the outer result."""
    global _computing, _calls
    if not active() or _computing:
        return compute()
    _calls += 1
    key = f"budgetprune/from_main/{_calls}"
    outcome, failed = None, None
    if is_main():
        _computing = True
        try:
            outcome = ("result", compute())
        except Exception as error:  # sent on, then raised here as it was
            failed = error
            outcome = ("error", error if _picklable(error) else RuntimeError(f"{type(error).__name__}: {error}"))
        finally:
            _computing = False
        _signal(key)
    else:
        _wait_for(key)
    kind, value = broadcast_object(outcome, group=group, device=device)
    if kind == "error":
        raise failed if failed is not None else value
    return value


def _store():
    """The default process group's store, or None where this torch does not give it (the other
    ranks then wait in the broadcast itself)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _signal(key: str) -> None:
    store = _store()
    if store is not None:
        store.set(key, "1")


def _wait_for(key: str) -> None:
    store = _store()
    if store is not None:
        store.wait([key], MAIN_WAIT)  # blocks on the store's socket: no CPU meanwhile


def _picklable(value) -> bool:
    try:
        pickle.loads(pickle.dumps(value))
    except Exception:
        return False
    return True


def broadcast_object(obj, src: int = 0, group=None, device: torch.device | str | None = None):
    """Rank ``src``'s ``obj`` (any picklable value) on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src, group=group, device=device)
    return box[0]


def gather_parts(part: torch.Tensor, total: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The rows of every rank's ``part`` in one tensor of ``total`` rows, where rank r holds rows
    r, r + N, r + 2N, ... (the parts of ``iterate_batches(part=True)``), on every rank and on the
    device ``part`` is on (the collective itself runs on ``device``: the GPU under NCCL)."""
    if not active():
        return part
    world = dist.get_world_size()
    rows = -(-total // world)  # the largest part
    padded = torch.zeros(rows, *part.shape[1:], dtype=part.dtype, device=device)
    padded[:len(part)] = part.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.empty(total, *part.shape[1:], dtype=part.dtype, device=device)
    for r, p in enumerate(parts):
        out[r::world] = p[:len(range(r, total, world))]
    return out.to(part.device)


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's part of a global batch: every ``world_size``-th index from its rank. A batch
    that does not divide evenly is first padded with its own first indices (as
    ``DistributedSampler`` pads an epoch), so every rank gets the same number, at least one."""
    if not active():
        return indices
    world = dist.get_world_size()
    pad = -len(indices) % world
    if pad:
        indices = torch.cat([indices, indices.repeat(pad // max(len(indices), 1) + 1)[:pad]])
    return indices[dist.get_rank()::world]
