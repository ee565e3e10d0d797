"""Models from elsewhere, by a ``--model`` spec: ``torchvision:NAME``, ``timm:NAME`` or
``path/to/file.py:factory``.

torchvision and timm are never dependencies of budgetprune: they are imported only when a spec
names them, and a one-line error says what to install otherwise. ``file.py:factory`` runs that
file of yours, as ``python file.py`` would (it is the code you name, never a file budgetprune
reads as data), and calls ``factory`` with those of ``in_channels``, ``num_classes`` and
``input_size`` it takes.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from torch import nn

from ..errors import ConfigError, first_line

SOURCES = ("torchvision", "timm")


def is_external(spec: str) -> bool:
    return isinstance(spec, str) and (spec.partition(":")[0] in SOURCES or ".py:" in spec)


def external_model(spec: str, *, in_channels: int, num_classes: int,
                   input_size: tuple[int, int] | None) -> nn.Module:
    """The model ``spec`` names (see the module docstring); ``input_size``: the data's image size
    (None: the model's own where it is made for one)."""
    if ".py:" in spec:
        path, _, factory = spec.rpartition(":")
        model = _from_file(Path(path), factory, in_channels=in_channels, num_classes=num_classes,
                           input_size=(28, 28) if input_size is None else tuple(input_size))
    else:
        source, _, name = spec.partition(":")
        model = (_torchvision if source == "torchvision" else _timm)(name, in_channels=in_channels,
                                                                     num_classes=num_classes,
                                                                     input_size=input_size)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {spec} gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def _import(package: str, spec: str):
    try:
        return importlib.import_module(package)
    except Exception as exc:  # noqa: BLE001 - a missing or broken install: one line
        raise ConfigError(f"--model {spec}: {package} cannot be imported ({first_line(exc)}); install a "
                          f"{package} built for your torch") from None


def _unknown(source: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{source}:{close[0]}'?)" if close else ""
    return ConfigError(f"{source} has no classification model '{name}'{hint}")


#: torchvision's classification models built for one image size, by name prefix: the argument
#: that sets it (ViT: square images, one side; MaxViT: (height, width)).
_TORCHVISION_SIZED = {"vit_": "image_size", "maxvit_": "input_size"}


def _torchvision(name: str, *, in_channels: int, num_classes: int, input_size: tuple[int, int] | None) -> nn.Module:
    models = _import("torchvision.models", f"torchvision:{name}")
    known = models.list_models(module=models)  # the classification models
    if name not in known:
        raise _unknown("torchvision", name, known)
    if in_channels != 3:
        raise ConfigError(f"torchvision's {name} takes 3-channel images and this dataset's have {in_channels}; "
                          "use colour images or a model for your inputs")
    sized = {arg for prefix, arg in _TORCHVISION_SIZED.items() if name.startswith(prefix)} if input_size else set()
    kwargs = {}
    if "image_size" in sized:
        if input_size[0] != input_size[1]:
            raise ConfigError(f"torchvision's {name} takes square images and this dataset's are "
                              f"{input_size[0]}×{input_size[1]}; resize them to a square")
        kwargs["image_size"] = input_size[0]
    if "input_size" in sized:
        kwargs["input_size"] = tuple(input_size)
    return _built(f"torchvision:{name}", lambda: models.get_model(name, weights=None, num_classes=num_classes,
                                                                   **kwargs))


def _timm(name: str, *, in_channels: int, num_classes: int, input_size: tuple[int, int] | None) -> nn.Module:
    """A timm model for the data; one built for a fixed image size (its pretrained config's
    ``fixed_input_size``: ViT, Swin, LeViT, ...) is built for the data's (``img_size``)."""
    timm = _import("timm", f"timm:{name}")
    known = list(timm.list_models())
    if name not in known:
        raise _unknown("timm", name, known)
    cfg = timm.get_pretrained_cfg(name)
    kwargs = {}
    if input_size and cfg is not None and getattr(cfg, "fixed_input_size", False) and \
            tuple(cfg.input_size[1:]) != tuple(input_size):
        kwargs["img_size"] = tuple(input_size)
    return _built(f"timm:{name}", lambda: timm.create_model(name, pretrained=False, num_classes=num_classes,
                                                            in_chans=in_channels, **kwargs))


def _built(spec: str, build) -> nn.Module:
    """``build()``, whose failure (the model refuses the data's channels or image size) is one line."""
    try:
        return build()
    except Exception as exc:  # noqa: BLE001 - the package's own message, in one line
        raise ConfigError(f"--model {spec} cannot be built for this data ({type(exc).__name__}: "
                          f"{first_line(exc)})") from None


def _from_file(path: Path, factory: str, **arguments) -> nn.Module:
    if path.suffix != ".py" or not path.is_file():
        raise ConfigError(f"--model {path}:{factory}: {path} is not a Python file")
    if not factory.isidentifier():
        raise ConfigError(f"--model {path}:{factory}: '{factory}' is not a function name")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"budgetprune_user_model_{digest}"
    try:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look a module up by name
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file: its first error in one line
        sys.modules.pop(module_name, None)
        raise ConfigError(f"--model {path}:{factory}: running {path} failed ({type(exc).__name__}: "
                          f"{first_line(exc)})") from None
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise ConfigError(f"--model {path}:{factory}: {path} defines no function '{factory}'")
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    try:
        return fn(**{k: v for k, v in arguments.items() if takes_all or k in params})
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"--model {path}:{factory}: {factory}() failed ({type(exc).__name__}: "
                          f"{first_line(exc)})") from None
