"""Pruning methods behind one protocol (:class:`~budgetprune.methods.base.Method`)."""

from .base import Method, available_methods, create_method, register_method
from . import bar  # noqa: F401  (registers "bar")

__all__ = ["Method", "available_methods", "create_method", "register_method"]
