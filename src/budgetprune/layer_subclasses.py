"""Subclasses of torch's ``nn.Linear`` and ``nn.Conv2d`` that compute what torch's class computes.

timm wraps ``nn.Linear`` in a ``Linear`` of its own (a dtype cast for TorchScript), and many
codebases subclass the layers without changing what they compute. torch.fx keeps only torch's own
classes whole, so such a module is traced through to a functional ``linear`` or ``conv2d`` that
reads its parameters, which the channel graph cannot prune: the layers feeding it stay ungated
(timm's MobileNetV3 and GhostNet lost their 1280-channel head convolution, which feeds the
classifier, that way).

A subclass that gives exactly what the torch class's own forward gives (checked on random inputs,
in eval mode, before the trace: :func:`examine`) is traced as one module and pruned, folded and
compacted as the torch layer; compaction builds the torch class, which computes the same. A
subclass that keeps torch's forward is one without a check.

A ``Conv2d`` subclass that computes something else but prunes like a convolution is a layer too:
one whose output channels are its weight's rows and its input channels its weight's columns, so
that a copy keeping some rows and columns gives exactly those output channels of the whole module
run with the other inputs at zero (checked the same way; timm's ``Conv2dSame`` pads its input by
the input's own size, TensorFlow's "same", before torch's convolution). Compaction keeps its class
(:func:`sliced`). One whose weight is transformed as a whole (a standardised weight: removing an
input changes every output) fails both checks and is traced through as before.
"""

from __future__ import annotations

import contextlib
import copy
import weakref

import torch
from torch import nn

_LAYERS = (nn.Linear, nn.Conv2d)
_checked: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()
#: The subclasses that compute something else than their class but slice like it (see above).
_sliceable: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def _torch_class(module: nn.Module) -> type | None:
    """The torch layer class ``module`` is a subclass of (not the class itself), or None."""
    return next((cls for cls in _LAYERS if isinstance(module, cls) and type(module) is not cls), None)


def examine(model: nn.Module) -> None:
    """Check every layer subclass of ``model`` that has a forward of its own (it runs the module,
    which it must not do while torch.fx's tracer has patched module calls)."""
    for module in model.modules():
        cls = _torch_class(module)
        if cls is not None and type(module).forward is not cls.forward and module not in _checked:
            _checked[module] = _computes_as(module, cls)
            if not _checked[module] and cls is nn.Conv2d:
                _sliceable[module] = _slices_as_conv(module)


def refused(model: nn.Module) -> dict[str, str]:
    """``{module name: why}`` for the layer subclasses of ``model`` that :func:`examine` found to
    compute something else than their torch class: traced through, they are no layers to the graph
    (the reason a budget then says it cannot reach)."""
    out = {}
    for name, module in model.named_modules():
        cls = _torch_class(module)
        if cls is not None and _checked.get(module) is False and not _sliceable.get(module, False):
            out[name] = (f"a {type(module).__name__} computes something other than torch's {cls.__name__} (checked on "
                         "random inputs: a transformed weight, a padding of its own), so it is no layer to prune")
    return out


def computes_as_torch_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a subclass of torch's Linear or Conv2d that computes what the torch
    class computes: it keeps its forward, or :func:`examine` found it equal."""
    cls = _torch_class(module)
    if cls is None:
        return False
    return type(module).forward is cls.forward or _checked.get(module, False)


def prunes_as_torch_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a layer subclass the graph prunes as its torch class: it computes what
    the class computes, or slices like a convolution (:func:`sliced` then compacts it)."""
    return computes_as_torch_layer(module) or _sliceable.get(module, False)


def sliced(module: nn.Module, new: nn.Module) -> nn.Module:
    """The compacted layer for ``module``: ``new`` (torch's class, holding the kept rows and columns)
    where ``module`` computes what torch's class computes, else a copy of ``module`` with ``new``'s
    parameters and channel counts (its own forward: timm's ``Conv2dSame`` keeps its padding).
    ``module`` may be a copy of the one examined (compaction works on one): it is checked again."""
    cls = _torch_class(module)
    if cls is None or type(module).forward is cls.forward or _checked.get(module, False) or \
            _computes_as(module, cls):
        return new
    out = copy.deepcopy(module)
    out.weight, out.bias = new.weight, new.bias
    out.in_channels, out.out_channels, out.groups = new.in_channels, new.out_channels, new.groups
    return out


def _slices_as_conv(module: nn.Conv2d) -> bool:
    """Whether a copy of ``module`` keeping every other output channel and input channel (both the
    same channels for a depthwise convolution) gives exactly those output channels of ``module``
    run with the other inputs at zero, on random inputs in eval mode. A grouped convolution that is
    not depthwise is not checked (refused)."""
    depthwise = module.groups == module.in_channels == module.out_channels
    if module.groups != 1 and not depthwise or module.out_channels < 2 or module.in_channels < 2:
        return False
    try:
        with _evaluated(module):
            weight = module.weight
            gen = torch.Generator().manual_seed(1)
            (kh, kw), (dh, dw) = module.kernel_size, module.dilation
            x = torch.randn((2, module.in_channels, (kh - 1) * dh + 6, (kw - 1) * dw + 5),
                            generator=gen).to(weight.device, weight.dtype)
            rows = torch.arange(0, module.out_channels, 2, device=weight.device)
            cols = rows if depthwise else torch.arange(0, module.in_channels, 2, device=weight.device)
            zeroed = torch.zeros_like(x)
            zeroed[:, cols] = x[:, cols]
            full = module(zeroed)
            part = copy.deepcopy(module)
            part.weight = nn.Parameter(weight[rows] if depthwise else weight[rows][:, cols])
            part.bias = None if module.bias is None else nn.Parameter(module.bias[rows])
            part.in_channels, part.out_channels = len(cols), len(rows)
            part.groups = len(rows) if depthwise else 1
            ours = part(x[:, cols])
            return isinstance(ours, torch.Tensor) and ours.shape == full[:, rows].shape and \
                torch.allclose(ours, full[:, rows], rtol=1e-5, atol=1e-6)
    except Exception:  # noqa: BLE001 - a module that does not slice like a convolution is not one
        return False


def _computes_as(module: nn.Module, cls: type) -> bool:
    try:
        with _evaluated(module):
            weight = module.weight
            gen = torch.Generator().manual_seed(0)
            if cls is nn.Linear:
                shape = (2, module.in_features)
            else:
                (kh, kw), (dh, dw) = module.kernel_size, module.dilation
                shape = (2, module.in_channels, (kh - 1) * dh + 5, (kw - 1) * dw + 5)
            x = torch.randn(shape, generator=gen).to(weight.device, weight.dtype)
            ours, theirs = module(x), cls.forward(module, x)
            return isinstance(ours, torch.Tensor) and ours.shape == theirs.shape and \
                torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    except Exception:  # noqa: BLE001 - a module that does not run like the torch layer is not one
        return False


@contextlib.contextmanager
def _evaluated(module: nn.Module):
    """``module`` in eval mode without gradients for a check, its modes restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training
