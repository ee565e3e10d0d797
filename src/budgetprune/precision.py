"""Mixed precision: the autocast region of a training step, its gradient scaler, and the float32
islands a pruner keeps inside it.

``fp32`` trains in float32 (no autocast). ``bf16`` and ``fp16`` run the forward pass under
``torch.autocast`` on the run's device type, so convolutions and matrix products compute in the
lower precision while torch keeps reductions and losses in float32. ``fp16`` has a small range, so
its losses are scaled by a :class:`torch.amp.GradScaler` (``bf16`` has float32's range and needs
none). Everything here is written for any device type torch can autocast on (``cpu``, ``cuda``, ...):
no call names a device.

The pruner's own numbers (gate probabilities, hard and expected costs, the barrier) are computed
in float32 whatever the region around them (:func:`float32`): a barrier near its wall and a cost
summed over millions of activations lose their meaning at 8 bits of mantissa.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import ConfigError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(name: str, device: torch.device | str | None = None) -> None:
    """Raise a one-line :class:`ConfigError` when ``name`` is not a precision, or when torch cannot
    autocast to it on ``device``'s type (checked by running one small layer there)."""
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    if name == "fp32" or device is None:
        return
    kind = torch.device(device).type
    problem = _autocast_problem(kind, PRECISIONS[name])
    if problem:
        other = "bf16" if name == "fp16" else "fp32"
        raise ConfigError(f"--precision {name} does not run on {kind} with torch {torch.__version__} ({problem}); "
                          f"use --precision {other}")


def _autocast_problem(kind: str, dtype: torch.dtype) -> str | None:
    """Why a small conv and linear layer do not compute in ``dtype`` under autocast on ``kind``
    (None when they do)."""
    if not torch.amp.is_autocast_available(kind):
        return f"torch has no autocast for {kind}"
    try:
        conv = torch.nn.Conv2d(1, 2, 3).to(kind)
        with torch.autocast(kind, dtype=dtype):
            y = conv(torch.ones(1, 1, 4, 4, device=kind))
            z = torch.nn.functional.linear(y.flatten(1), torch.ones(3, y[0].numel(), device=kind))
    except RuntimeError as exc:
        return str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
    if y.dtype != dtype or z.dtype != dtype:
        return f"autocast computes in {y.dtype} there"
    return None


def autocast(device: torch.device | str, precision: str):
    """The autocast region of a forward pass (and loss) at ``precision`` on ``device``'s type;
    a region that changes nothing for ``fp32``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=PRECISIONS[precision])


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """A loss scaler: enabled for ``fp16`` only (a pass-through otherwise, so a loop calls it alike)."""
    kind = torch.device(device).type
    return torch.amp.GradScaler(kind, enabled=precision == "fp16")


def float32(device: torch.device | str):
    """A region in which autocast is off on ``device``'s type: what runs there computes in the dtype
    of its inputs (float32 for a pruner's gates and costs)."""
    kind = torch.device(device).type
    if not torch.amp.is_autocast_available(kind):
        return contextlib.nullcontext()
    return torch.autocast(kind, enabled=False)
