"""budgetprune: train and prune a network under an explicit resource budget.

    >>> import budgetprune
    >>> small, metrics = budgetprune.prune(model, train_set, test_set, budget=0.25)
    >>> budgetprune.save(small, "model.pt"); same = budgetprune.load("model.pt")

or, inside your own training loop, :class:`Pruner` (penalty, step, finalize).
"""

from .api import load, load_teacher, prune, save
from .budget import Budget, enforce_budget, parse_budget
from .compact import compact
from .errors import BudgetpruneError
from .graph import ChannelGraph
from .models import available_models, create_model
from .pipeline import PruneConfig
from .pruner import Pruner

__version__ = "0.1.0"

__all__ = ["Budget", "BudgetpruneError", "ChannelGraph", "PruneConfig", "Pruner", "available_models", "compact",
           "create_model", "enforce_budget", "load", "load_teacher", "parse_budget", "prune", "save"]
