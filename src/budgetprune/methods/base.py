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


#: Run-wide settings a method takes from the run's configuration, and the flag that sets each.
RUN_SETTINGS = {"lam": "--lam", "schedule": "--schedule", "hardness": "--schedule-hardness (schedule_hardness)",
                "schedule_end": "--schedule-end",
                "gate_lr": "--gate-lr", "gate_init": "--gate-init", "s0": "--gate-init", "dual_lr": "--dual-lr",
                "dataset_size": "the training data", "granularity": "--granularity"}


def check_method_options(name: str, options: dict) -> None:
    """Refuse options that are run settings (they have their own flag) or unknown to method ``name``."""
    shared = sorted(set(options) & set(RUN_SETTINGS))
    if shared:
        raise ConfigError(f"method option(s) {', '.join(shared)} are run settings: set "
                          f"{', '.join(dict.fromkeys(RUN_SETTINGS[k] for k in shared))} instead")
    create_method(name, **options)  # unknown names, wrong types and values


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
        _check_option_type(name, key, value, params[key])
    picked = {k: v for k, v in (shared or {}).items() if k in accepted and v is not None}
    try:
        return _REGISTRY[name](**{**picked, **options})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"method '{name}': {exc}") from None


def _option_kind(param: inspect.Parameter) -> str | None:
    """What a constructor parameter takes, from its default or else its annotation."""
    default = param.default
    if default is not inspect.Parameter.empty and default is not None:
        for kind in (bool, int, float, str, dict):
            if isinstance(default, kind):
                return kind.__name__
        return None
    note = str(param.annotation)
    for kind in ("dict", "bool", "float", "int", "str"):
        if note.startswith(kind) or f" {kind}" in note or f"|{kind}" in note:
            return kind
    return None


def _check_option_type(method: str, key: str, value, param: inspect.Parameter) -> None:
    """A one-line error when an option's value is not of the kind the method takes."""
    kind = _option_kind(param)
    if value is None and param.default is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {"bool": isinstance(value, bool), "int": number and isinstance(value, int), "float": number,
          "str": isinstance(value, str), "dict": isinstance(value, dict), None: True}[kind]
    if not ok:
        words = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a text",
                 "dict": "a JSON object such as {\"features.0\": 2}"}[kind]
        shown = "" if param.default in (inspect.Parameter.empty, None) else f" (default {param.default!r})"
        raise ConfigError(f"method '{method}' option {key} must be {words}{shown}, not {value!r}")


class Method(nn.Module):
    """Base class: subclasses add gates/state in :meth:`attach`."""

    name = "base"

    #: Whether :meth:`penalty` reads the forward pass of the same step (so it must be called
    #: between the forward pass and the backward pass, as in a plain loop).
    penalty_reads_forward = False

    #: Names of buffers the method fills from the batches it sees (statistics): under
    #: torch.distributed the pruner averages them over the processes before :meth:`after_step`.
    rank_statistics: tuple[str, ...] = ()

    def attach(self, model: nn.Module, graph: ChannelGraph, budgets: list[Budget]) -> None:
        raise NotImplementedError

    def check(self, model: nn.Module, graph: ChannelGraph) -> None:
        """Raise :class:`ConfigError` for options that do not fit ``model`` (called before any training)."""

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
