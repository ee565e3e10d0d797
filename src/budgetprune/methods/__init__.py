"""Pruning methods behind one protocol (:class:`~budgetprune.methods.base.Method`)."""

from .base import Method, available_methods, check_method_options, create_method, method_options, register_method
from . import (bar, constrained_l0, continuous_sparsification, information_bottleneck, interpolative,  # noqa: F401
               l0, magnitude, morphnet, random_baseline, sensitivity, vq)

__all__ = ["Method", "available_methods", "check_method_options", "create_method", "method_options", "register_method"]
