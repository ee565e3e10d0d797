"""Pruning methods behind one protocol (:class:`~budgetprune.methods.base.Method`)."""

from .base import Method, available_methods, create_method, register_method
from . import bar, constrained_l0, l0, magnitude, random_baseline  # noqa: F401  (register the methods)

__all__ = ["Method", "available_methods", "create_method", "register_method"]
