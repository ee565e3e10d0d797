"""Where Hard Concrete gates start on a trained network: the lowest log α whose noise it survives.

A Hard Concrete gate at log α drops each channel of each example with some probability while it
trains (seed 001, supplement Eq. 4 and 5). Seed 001 starts every gate at log α ≈ 0 (ẑ = 0.5, a
sample is exactly 0 with probability 0.17), which suits a network trained from scratch. On a
trained network that noise is a shock whose size depends on the network
(``benchmarks/results/gate_init.md``: a trained ResNet-20 keeps its answer on a small fraction of
training images with gates sampled at 0, and pruned from there ends well below the same run from
budgetprune's default 3, :data:`~budgetprune.gates.OPEN_LOG_ALPHA`;
``benchmarks/results/gate_init_lenet5/gate_init.md``: a trained LeNet-5 survives 0 far better, and
its runs from 0, 1, 2 and 3 tie). A network more fragile than that ResNet-20 may not survive even 3.

:func:`choose_start` measures this on the user's own network and data: it samples the gates at
each log α of :data:`START_GRID` (0, 0.5, ..., 4) on a few training batches and keeps the lowest
start at which the gated network still gives the ungated network's answer on at least a given
fraction of the examples (:data:`SURVIVAL` by default).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable

import torch
from torch import nn

from . import distributed
from .errors import CheckpointError, ConfigError
from .gates import HardConcreteGate

#: The starts tried, lowest first: seed 001's 0 up to 4 (ẑ = 1, a sample is 0 with probability 0.003).
START_GRID = tuple(0.5 * i for i in range(9))

#: The fraction of examples on which the gated network must keep the ungated network's answer by
#: default: on the two networks of the pages above it picks ResNet-20's measured good start (3) and
#: for LeNet-5 a start that tied with every other.
SURVIVAL = 0.85

#: log α at which a sample is exactly 1 but with probability ~1e-8: the ungated reference.
UNGATED_LOG_ALPHA = 30.0


def hard_concrete_gates(method: nn.Module) -> list[HardConcreteGate]:
    """The Hard Concrete gates of a pruning method (none for methods with other gates)."""
    gates = getattr(method, "gates", None)
    values = gates.values() if isinstance(gates, (dict, nn.ModuleDict)) else []
    return [g for g in values if isinstance(g, HardConcreteGate)]


def top1_agreement(output, reference) -> torch.Tensor:
    """Per example: whether a classifier's output has the reference's top-1 class (outputs of shape
    (N, classes), or a tuple/list/dict whose first tensor is)."""
    out, ref = first_tensor(output), first_tensor(reference)
    if out is None or out.dim() != 2 or out.shape[1] < 2:
        shape = "no tensor" if out is None else f"shape {tuple(out.shape)}"
        raise ConfigError(f"choosing the gates' start compares a classifier's (batch, classes) outputs, and the "
                          f"model returned {shape}: pass agree=fn(output, reference) giving a per-example "
                          "bool tensor, or set gate_init")
    return out.argmax(1) == ref.argmax(1)


def first_tensor(output) -> torch.Tensor | None:
    """``output`` if it is a tensor, else the first tensor inside a tuple, list or dict (None if none)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return next((t for t in map(first_tensor, output) if t is not None), None)
    return None


def batch_inputs(batch):
    """A batch's inputs: the batch itself, or the first item of an (inputs, targets, ...) batch."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def to_device(inputs, device: torch.device):
    """``inputs`` on ``device``: a tensor, or the tensors inside a dict, list or tuple of them (other
    values as they are)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(to_device(v, device) for v in inputs)
    return inputs


@contextlib.contextmanager
def _training_step_conditions(model: nn.Module, method: nn.Module, gates: list[HardConcreteGate]):
    """The model as a training step sees it (BatchNorm on batch statistics, gates sampled) but with
    dropout off, no gradients, and everything restored afterwards: modes, BatchNorm's running
    statistics, the gates' log α and the random number streams."""
    modes = [(m, m.training) for m in list(model.modules()) + list(method.modules())]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    log_alphas = [g.log_alpha.detach().clone() for g in gates]
    devices = sorted({b.device.index for b in model.buffers() if b.device.type == "cuda"} |
                     {p.device.index for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.train()
            method.train()
            for m in model.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    m.eval()
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
            for g, saved in zip(gates, log_alphas):
                g.log_alpha.copy_(saved)
        for m, mode in modes:
            m.train(mode)


def _seed(seed: int, device: torch.device) -> None:
    """Seed the random streams the gates draw from: the CPU's and, on a GPU, that device's only
    (the streams :func:`_training_step_conditions` restores)."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def place(gates: list[HardConcreteGate], start: float) -> None:
    """Shift every gate's log α by one amount so that the lowest is ``start`` (each keeps its small
    initial jitter above it)."""
    with torch.no_grad():
        low = min(float(g.log_alpha.min()) for g in gates)
        for g in gates:
            g.log_alpha.add_(start - low)


def survival_table(model: nn.Module, method: nn.Module, batches: Iterable, *, grid: Iterable[float] = START_GRID,
                   forward: Callable | None = None, agree: Callable | None = None,
                   inputs: Callable | None = None, seed: int = 0) -> dict[float, float]:
    """For each start of ``grid``: the fraction of the examples of ``batches`` on which the network
    with its gates sampled at that log α gives the ungated network's answer (``agree``; default
    :func:`top1_agreement`). ``inputs(batch)`` takes a batch's inputs (default
    :func:`batch_inputs`), which go to the gates' device (:func:`to_device`); ``forward(model,
    inputs)`` runs them (default ``model(inputs)``). ``model`` is what runs: the pruned network or a
    module around it (a trainer's model); its modes and buffers are restored afterwards. Every
    start sees the same gate noise (batch ``b`` from seed ``seed + b``), so the fractions differ by
    the start alone; under torch.distributed they are over every rank's batches."""
    gates = hard_concrete_gates(method)
    if not gates:
        raise ConfigError("only Hard Concrete gates have a start to choose: use method bar, l0 or constrained-l0, "
                          "or drop gate_survival")
    grid = sorted(float(v) for v in grid)
    if not grid:
        raise ConfigError("choosing the gates' start needs at least one log α to try")
    forward = forward or (lambda m, x: m(x))
    agree = agree or top1_agreement
    inputs = inputs or batch_inputs
    device = gates[0].log_alpha.device
    agreed, seen = torch.zeros(len(grid), dtype=torch.float64), 0
    with _training_step_conditions(model, method, gates):
        for b, batch in enumerate(batches):
            x = to_device(inputs(batch), device)
            place(gates, UNGATED_LOG_ALPHA)
            reference = forward(model, x)
            for i, start in enumerate(grid):
                place(gates, start)
                _seed(seed + b, device)  # each batch its own noise, the same at every start
                same = agree(forward(model, x), reference)
                agreed[i] += float(same.float().sum())
            seen += int(same.numel())
    if distributed.active():
        totals = distributed.sum_values(agreed.tolist() + [seen], device=device)
        agreed, seen = torch.tensor(totals[:-1], dtype=torch.float64), int(totals[-1])
    if seen == 0:
        raise ConfigError("choosing the gates' start needs at least one batch of training inputs")
    return {start: float(a) / seen for start, a in zip(grid, agreed)}


def choose_start(table: dict[float, float], survival: float = SURVIVAL) -> float:
    """The lowest start of ``table`` whose agreement is at least ``survival`` (the highest start of
    the table where none is)."""
    survival = check_survival(survival)
    if not table:
        raise ConfigError("choosing the gates' start needs at least one measured log α")
    passing = [start for start, fraction in sorted(table.items()) if fraction >= survival]
    return passing[0] if passing else max(table)


def describe(table: dict[float, float], start: float, survival: float, examples: int | None = None) -> str:
    """One log line: where the gates start and why."""
    on = f" of {examples} training images" if examples else ""
    cells = ", ".join(f"{s:g}: {100 * f:.0f} %" for s, f in sorted(table.items()))
    why = (f"the lowest start at which the network with its gates sampled keeps its answer on at least "
           f"{100 * survival:.0f} %{on}" if table[start] >= survival else
           f"no start keeps the network's answer on {100 * survival:.0f} %{on}: the highest")
    return f"gates start at log α {start:g}, {why} ({cells})"


def check_survival(survival) -> float:
    """``survival`` if it is a fraction in (0, 1], else a one-line error."""
    if isinstance(survival, bool) or not isinstance(survival, (int, float)) or not 0.0 < survival <= 1.0:
        raise ConfigError(f"the gates' survival must be a fraction in (0, 1], got {survival!r:.40}")
    return float(survival)


def check_record(record) -> dict | None:
    """A chosen start as a saved pruner state holds it (:meth:`~budgetprune.Pruner.choose_gate_start`),
    checked (it is read from a file): ``{"log_alpha": finite, "survival": (0, 1], "agreement": up to
    64 pairs [finite start, fraction in [0, 1]]}``, or None."""
    if record is None:
        return None

    def finite(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    rows = record.get("agreement") if isinstance(record, dict) else None
    ok = (isinstance(record, dict) and set(record) == {"log_alpha", "survival", "agreement"}
          and finite(record["log_alpha"]) and finite(record["survival"]) and 0.0 < record["survival"] <= 1.0
          and isinstance(rows, list) and len(rows) <= 64
          and all(isinstance(row, (list, tuple)) and len(row) == 2 and finite(row[0]) and finite(row[1])
                  and 0.0 <= row[1] <= 1.0 for row in rows))
    if not ok:
        raise CheckpointError("the saved pruner state has a damaged gate_start record (log_alpha, survival and up "
                              "to 64 [start, fraction] pairs expected); start the run again without --resume")
    return {"log_alpha": float(record["log_alpha"]), "survival": float(record["survival"]),
            "agreement": [[float(a), float(b)] for a, b in rows]}
