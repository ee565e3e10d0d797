"""What a model's own package declares opaque to torch.fx, for the models that cannot be traced
through.

timm marks the modules and functions of its models whose forward branches on tensor shapes or
values (a VGG head that first enlarges an input smaller than its kernel, MobileViT's unfolding of
patches, EfficientViT's window attention) with ``timm.layers.register_notrace_module`` and
``register_notrace_function``, and traces its models with them as leaves
(``timm.layers.create_feature_extractor``). :func:`budgetprune.graph.trace` does the same where
a plain trace fails: the marked modules are called as one node and the marked functions as one
call, which the channel graph then probes or leaves ungated like any op it does not know. Only
packages the program has already imported are asked: budgetprune never imports timm.

A marked subclass of a layer the graph reads by its class (a convolution, a linear layer, a
normalisation) is left out: called whole it would be taken for its torch class (timm's
``Conv2dSame`` pads by its input's size first).
"""

from __future__ import annotations

import sys

from torch import nn

#: Classes whose subclasses the channel graph reads as the class itself: never leaves by a mark.
READ_BY_CLASS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                 nn.MultiheadAttention)


def marked() -> tuple[tuple[type, ...], tuple]:
    """``(module classes, functions)`` the imported packages mark as not to be traced through."""
    fx_marks = sys.modules.get("timm.layers._fx")
    if fx_marks is None:
        return (), ()
    try:
        modules = tuple(m for m in fx_marks.get_notrace_modules()
                        if isinstance(m, type) and not issubclass(m, READ_BY_CLASS))
        functions = tuple(f for f in fx_marks.get_notrace_functions() if callable(f))
    except Exception:  # another timm version's registry: no marks rather than no trace
        return (), ()
    return modules, functions
