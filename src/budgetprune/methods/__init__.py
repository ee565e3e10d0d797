"""Pruning methods behind one protocol (:class:`~budgetprune.methods.base.Method`)."""

from .base import Method, available_methods, create_method, register_method
from . import bar, constrained_l0, information_bottleneck, l0, magnitude, morphnet, random_baseline  # noqa: F401,E501

__all__ = ["Method", "available_methods", "create_method", "register_method"]
