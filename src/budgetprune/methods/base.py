"""The method protocol every pruning method implements (see DESIGN.md).

A method owns its own state (gates, multipliers) as an ``nn.Module`` so that
``state_dict()`` / ``load_state_dict()`` make a run resumable. It never touches the
training loop: the engine calls :meth:`penalty` for the loss, :meth:`after_step` after each
optimiser step, and asks for :meth:`keep_masks`, :meth:`scores` and :meth:`gate_values`
when it hard-prunes.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..budget import Budget
from ..errors import ConfigError
from ..graph import ChannelGraph

_REGISTRY: dict[str, type["Method"]] = {}


def register_method(name: str):
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_options(name: str) -> list[str]:
    """The keyword options method ``name`` takes."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method '{name}': choose one of {', '.join(available_methods())}")
    return [p for p in inspect.signature(_REGISTRY[name]).parameters if p not in ("self", "args", "kwargs")]


def create_method(name: str, shared: dict | None = None, **options) -> "Method":
    """A new method ``name`` with ``options``; of ``shared`` (run-wide settings such as
    ``gate_lr`` or ``dataset_size``) it takes only those it has, and a None there keeps the
    method's own default."""
    accepted = method_options(name)
    unknown = set(options) - set(accepted)
    if unknown:
        raise ConfigError(f"method '{name}' has no option(s) {', '.join(sorted(unknown))}; "
                          f"it takes {', '.join(accepted) or 'none'}")
    params = inspect.signature(_REGISTRY[name]).parameters
    for key, value in options.items():
        _check_option_type(name, key, value, params[key].default)
    picked = {k: v for k, v in (shared or {}).items() if k in accepted and v is not None}
    try:
        return _REGISTRY[name](**{**picked, **options})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"method '{name}': {exc}") from None


def _check_option_type(method: str, key: str, value, default) -> None:
    """A one-line error when an option's value is not of its default's kind (a number, a flag, a text)."""
    if default is inspect.Parameter.empty or default is None:
        return
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (isinstance(value, int) or isinstance(default, float))
        kind = "an integer" if isinstance(default, int) else "a number"
    elif isinstance(default, str):
        ok, kind = isinstance(value, str), "a text"
    else:
        return
    if not ok:
        raise ConfigError(f"method '{method}' option {key} must be {kind} (default {default!r}), not {value!r}")


class Method(nn.Module):
    """Base class: subclasses add gates/state in :meth:`attach`."""

    name = "base"

    def attach(self, model: nn.Module, graph: ChannelGraph, budgets: list[Budget]) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        """Remove every hook from the model."""

    def penalty(self, progress: float) -> torch.Tensor:
        """Term added to the data loss at ``progress`` ∈ [0, 1] of the training phase."""
        raise NotImplementedError

    def after_step(self, progress: float) -> None:
        """Called after each optimiser step (dual ascent, clamps, ...)."""

    def scores(self) -> dict[str, torch.Tensor]:
        """Keep-score per channel of each group (higher = more worth keeping)."""
        raise NotImplementedError

    def keep_masks(self) -> dict[str, torch.Tensor]:
        """The method's own hard decision, before the budget projection."""
        raise NotImplementedError

    def gate_values(self) -> dict[str, torch.Tensor]:
        """Per-channel scale the pruned model folds into its weights (1 where none)."""
        return {gid: torch.ones_like(m, dtype=torch.float32) for gid, m in self.keep_masks().items()}

    def freeze(self, masks: dict[str, torch.Tensor], values: dict[str, torch.Tensor] | None = None) -> None:
        """Fix the gates to the final masks for evaluation.

        ``values`` (per group, 0 on pruned channels) overrides :meth:`gate_values` × masks,
        e.g. for channels the budget fill reopened with value 1.
        """

    def param_groups(self, lr: float) -> list[dict]:
        """Optimiser groups for the method's own parameters (empty if none)."""
        return []

    def status(self) -> dict[str, float]:
        """Numbers for the per-epoch log line (e.g. V, b, f)."""
        return {}
