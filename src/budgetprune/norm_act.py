"""A BatchNorm and its activation in one module (timm's ``BatchNormAct2d``), pruned as a BatchNorm.

timm builds most of its convolutional networks (EfficientNet, MobileNet V3, RegNet, CSPNet, ...)
from ``BatchNormAct2d``: a subclass of ``nn.BatchNorm2d`` whose forward normalises with
``F.batch_norm`` and then applies two submodules of its own, ``drop`` and ``act``. Traced through,
it becomes a functional batch norm reading the module's parameters, which the channel graph
cannot gate. Kept whole in the trace (a leaf, :func:`is_leaf`), it is what the graph already
knows, an affine BatchNorm, whose output then passes through an activation that maps 0 to 0:

* a gate with one value per channel folds into its γ and β, as into any BatchNorm's (the module
  reads its own ``weight`` and ``bias``), so the activation sees z·BN(x), as in compaction;
* a gate sampled per example multiplies the activation's input (:func:`activation_site`), the
  same z·BN(x): after a SiLU or a GELU, z·act(y) would not be act(z·y) for a z between 0 and 1;
* compaction slices the module's channels and keeps its activation (:func:`sliced`).

The structure is checked, not assumed (:func:`is_norm_act`): a subclass of torch's BatchNorm with
``act`` (and optionally ``drop``) submodules that work channel by channel and map 0 to 0, whose
output in eval mode, on random inputs, is ``act(drop(batch_norm(x)))`` computed from its own
parameters and statistics. Any other BatchNorm subclass with a forward of its own is traced
through as before; one that keeps torch's forward is a BatchNorm (:func:`acts_as_batchnorm`).
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch.nn.functional as F
from torch import nn

_BatchNorm = nn.modules.batchnorm._BatchNorm
_checked: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def is_norm_act(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm followed by its own element-wise activation (module
    docstring); the answer is computed once per module."""
    if not isinstance(module, _BatchNorm) or type(module).forward is _BatchNorm.forward:
        return False
    if module not in _checked:
        _checked[module] = _behaves_as_norm_act(module)
    return _checked[module]


def examine(model: nn.Module) -> None:
    """Check every module of ``model`` (:func:`is_norm_act`) before it is traced: the check runs the
    module, which it must not do while torch.fx's tracer has patched module calls."""
    for module in model.modules():
        is_norm_act(module)


def acts_as_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is torch's BatchNorm or a subclass that keeps its forward and has no
    submodules (one that only renames it, or checks its input differently): a BatchNorm to the
    graph, folded and sliced as one."""
    return isinstance(module, _BatchNorm) and type(module).forward is _BatchNorm.forward and not module._modules


def is_leaf(module: nn.Module) -> bool:
    """Whether the tracer keeps ``module`` as one node: a BatchNorm subclass that
    :func:`acts_as_batchnorm` (traced through, its forward's input check would stop the trace), or
    a norm-activation module as :func:`examine` found before the trace (a module it did not see
    is traced through)."""
    return acts_as_batchnorm(module) or _checked.get(module, False)


def activation_site(module: nn.Module) -> nn.Module | None:
    """The submodule whose input is the BatchNorm's output (its ``act``), or None when ``module`` is
    not a norm-activation module."""
    return module.act if is_norm_act(module) else None


def sliced(module: nn.Module, keep: torch.Tensor, z: torch.Tensor | None) -> nn.Module:
    """A copy of a BatchNorm module (of any subclass) keeping channels ``keep``, with ``z`` folded
    into its γ and β (None: no scale); its other attributes and submodules (a norm-activation
    module's activation and dropout) are kept as they are."""
    new = copy.deepcopy(module)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            value = getattr(module, name)
            if value is None:
                continue
            value = value.detach().index_select(0, keep.to(value.device))
            if z is not None and name in ("weight", "bias"):
                value = value * z.to(value.device, value.dtype)
            if name in module._parameters:
                new._parameters[name] = nn.Parameter(value, requires_grad=module._parameters[name].requires_grad)
            else:
                new._buffers[name] = value.clone()
    new.num_features = int(keep.numel())
    return new


def _elementwise_zero_preserving(act: nn.Module, x: torch.Tensor) -> bool:
    """``act`` maps 0 to 0 and output channel c depends on input channel c alone (checked on x)."""
    half = x.shape[1] // 2
    zero = torch.zeros_like(x)
    out = act(x.clone())
    return out.shape == x.shape and bool((act(zero.clone()) == 0).all()) and \
        torch.allclose(act(x[:, :half].clone()), out[:, :half], rtol=1e-5, atol=1e-6)


def _behaves_as_norm_act(module: nn.Module) -> bool:
    """The check of :func:`is_norm_act`, run on a copy whose statistics and affine parameters are
    drawn at random (a fresh BatchNorm is nearly the identity, under which act∘BN and BN∘act agree)."""
    act = module._modules.get("act")
    drop = module._modules.get("drop", nn.Identity())
    if not isinstance(act, nn.Module) or not isinstance(drop, nn.Module) or not module.affine or \
            set(module._modules) - {"act", "drop"}:
        return False
    try:
        probe = copy.deepcopy(module).eval()
        act, drop = probe._modules["act"], probe._modules.get("drop", nn.Identity())
        gen = torch.Generator().manual_seed(0)
        device, dtype = module.weight.device, module.weight.dtype
        c = module.num_features

        def draw(low: float, high: float) -> torch.Tensor:
            return (low + (high - low) * torch.rand(c, generator=gen)).to(device, dtype)

        with torch.no_grad():
            probe.weight.copy_(draw(0.5, 2.0) * torch.sign(draw(-1.0, 1.0)))
            probe.bias.copy_(draw(-1.0, 1.0))
            stats = probe.track_running_stats and probe.running_mean is not None
            if stats:
                probe.running_mean.copy_(draw(-1.0, 1.0))
                probe.running_var.copy_(draw(0.5, 2.0))
            x = torch.randn((2, c, 3, 3), generator=gen).to(device, dtype)
            if not (_elementwise_zero_preserving(act, x) and _elementwise_zero_preserving(drop, x)):
                return False
            normed = F.batch_norm(x, probe.running_mean if stats else None, probe.running_var if stats else None,
                                  probe.weight, probe.bias, not stats, 0.0, probe.eps)
            return torch.allclose(probe(x.clone()), act(drop(normed)), rtol=1e-4, atol=1e-5)
    except Exception:  # noqa: BLE001 - a module that does not run on (N, C, H, W) inputs is not one
        return False
