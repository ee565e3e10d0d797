"""The model registry (timm-style): a name → a function building the model."""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

from ..errors import ConfigError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn`` under its own name."""
    _MODELS[fn.__name__] = fn
    return fn


def available_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, *, in_channels: int = 1, num_classes: int = 10,
                 input_size: tuple[int, int] | None = None, **kwargs) -> nn.Module:
    """Build a registered model for inputs of ``in_channels`` × ``input_size`` (default 28 × 28);
    ``torchvision:NAME``, ``timm:NAME`` and ``path/to/file.py:factory`` build models from elsewhere
    (see :mod:`budgetprune.models.external`), a model made for one image size at ``input_size``
    when given, else at its own."""
    from .external import external_model, is_external
    if is_external(name):
        return external_model(name, in_channels=in_channels, num_classes=num_classes, input_size=input_size)
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown model '{name}'{hint}: choose one of {', '.join(available_models())}")
    return _MODELS[name](in_channels=in_channels, num_classes=num_classes,
                         input_size=(28, 28) if input_size is None else tuple(input_size), **kwargs)
