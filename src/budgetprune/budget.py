"""Budgets: how much of a resource the pruned network may use, and meeting it exactly.

A :class:`Budget` is a constraint object (in the spirit of Cooper): a metric and the
fraction of the unpruned network's cost allowed. :func:`enforce_budget` is the shared
final projection every method goes through, so every method ends within its budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import BudgetError
from .graph import ChannelGraph
from .resources import METRICS, CostModel


@dataclass(frozen=True)
class Budget:
    """At most ``fraction`` × (the unpruned network's ``metric``)."""

    metric: str
    fraction: float

    @property
    def factor(self) -> float:
        """The pruning factor 1/fraction (``4x`` for a quarter)."""
        return 1.0 / self.fraction

    def absolute(self, graph: ChannelGraph) -> float:
        return self.fraction * CostModel(graph, self.metric).full()

    def check_reachable(self, graph: ChannelGraph) -> None:
        """Raise :class:`BudgetError` if even the smallest allowed network is over budget."""
        cm = CostModel(graph, self.metric)
        full, low = cm.full(), cm.minimum()
        if self.fraction * full < low:
            raise BudgetError(
                f"{self.metric} budget {self.fraction:.4g} (= {self.fraction * full:.4g}) is unreachable: "
                f"keeping one channel per layer already costs {low:.4g} = {low / full:.4g} of the full "
                f"network; use --budget {max(low / full * 1.05, 1e-4):.3g} or more")


def parse_budget(value: str | float, metric: str = "volume") -> Budget:
    """``0.25``, ``"0.25"``, ``"25%"`` or the pruning factor ``"4x"`` → Budget(metric, 0.25)."""
    if metric not in METRICS:
        raise BudgetError(f"unknown metric '{metric}': choose one of {', '.join(METRICS)}")
    text = str(value).strip().lower()
    try:
        if text.endswith("x"):
            factor = float(text[:-1])
            if not factor > 1.0:
                raise BudgetError(f"pruning factor '{value}' must be greater than 1 (e.g. 4x keeps a quarter)")
            fraction = 1.0 / factor
        elif text.endswith("%"):
            fraction = float(text[:-1]) / 100.0
        else:
            fraction = float(text)
    except ValueError:
        raise BudgetError(f"budget '{value}' is not a number: give a fraction such as 0.25 or a factor "
                          "such as 4x") from None
    if not 0.0 < fraction < 1.0:
        raise BudgetError(f"budget '{value}' must be a fraction strictly between 0 and 1 (e.g. 0.25) "
                          "or a pruning factor above 1 (e.g. 4x)")
    return Budget(metric, fraction)


def enforce_budget(graph: ChannelGraph, masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
                   budget: Budget) -> dict[str, torch.Tensor]:
    """Drop the lowest score-per-cost channels until ``budget`` holds (DESIGN's shared projection).

    At each step every group offers its kept channel of lowest score; the one with the
    smallest score / (cost saved by removing it) goes. A group never drops below its
    ``min_keep`` channels (the fatal-pruning guard). The last removal can overshoot (one
    wide-area map may save far more than needed), so channels this projection removed are
    then put back, most recently removed first, wherever they still fit under the budget.
    Masks are not modified in place.
    """
    cm = CostModel(graph, budget.metric)
    limit = budget.fraction * cm.full()
    masks = {gid: m.detach().clone().bool().cpu() for gid, m in masks.items()}
    scores = {gid: s.detach().float().cpu() for gid, s in scores.items()}
    counts = {gid: int(m.sum()) for gid, m in masks.items()}
    dropped = _drop_until(graph, cm, limit, masks, counts, scores)
    if dropped is None:
        raise BudgetError(f"{budget.metric} budget {budget.fraction:.4g} cannot be met without removing the "
                          "last channel of a layer; raise the budget")
    if dropped and cm.evaluate(counts) < 0.95 * limit:
        # The last removal overshot: try the cheaper channels instead of it.
        gid, idx, saved = dropped[-1]
        alt_masks = {g: m.clone() for g, m in masks.items()}
        alt_counts = {**counts, gid: counts[gid] + 1}
        alt_masks[gid][idx] = True
        more = _drop_until(graph, cm, limit, alt_masks, alt_counts, scores, max_saving=saved)
        if more is not None and cm.evaluate(alt_counts) > cm.evaluate(counts):
            masks, counts, dropped = alt_masks, alt_counts, dropped[:-1] + more
    for gid, idx, _ in reversed(dropped):  # put back whatever still fits
        if masks[gid][idx]:
            continue
        if cm.evaluate({**counts, gid: counts[gid] + 1}) <= limit:
            masks[gid][idx] = True
            counts[gid] += 1
    return masks


def _drop_until(graph, cm, limit, masks, counts, scores, max_saving: float = float("inf")):
    """Greedy lowest score-per-cost removal (in place) until the cost is ≤ ``limit``.

    Only channels whose removal saves less than ``max_saving`` are candidates. Returns the
    removed ``(group, index, saving)`` in order, or None if the limit cannot be reached.
    """
    dropped: list[tuple[str, int, float]] = []
    current = cm.evaluate(counts)
    while current > limit:
        best = None
        for gid, m in masks.items():
            if counts[gid] <= graph.groups[gid].min_keep:
                continue
            saved = current - cm.evaluate({**counts, gid: counts[gid] - 1})
            if saved <= 0 or saved >= max_saving:
                continue
            kept_scores = scores[gid].masked_fill(~m, float("inf"))
            idx = int(torch.argmin(kept_scores))
            ratio = float(kept_scores[idx]) / saved
            if best is None or ratio < best[0]:
                best = (ratio, gid, idx, saved)
        if best is None:
            return None
        _, gid, idx, saved = best
        masks[gid][idx] = False
        counts[gid] -= 1
        current = cm.evaluate(counts)
        dropped.append((gid, idx, saved))
    return dropped


def fill_budget(graph: ChannelGraph, masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
                budgets: Budget | list[Budget]) -> dict[str, torch.Tensor]:
    """Reopen the most promising closed channels while every budget still holds.

    The counterpart of :func:`enforce_budget` for a run that ends *under* its budget (BAR's
    barrier is 0 below a, so V can drift below B in the last epochs; a penalised method may
    end far below). At each step every group offers its closed channel of highest score;
    the one with the highest score / (cost added, summed over the budgets as fractions of
    their limits) is reopened if all budgets still hold after it, else that group is done.
    It stops when no group can grow. The caller decides what a reopened channel computes
    (:func:`budgetprune.compact.silence_channels` makes it a function-preserving addition).
    Masks are not modified in place.
    """
    budgets = [budgets] if isinstance(budgets, Budget) else list(budgets)
    models = [(CostModel(graph, b.metric), b.fraction * CostModel(graph, b.metric).full()) for b in budgets]
    masks = {gid: m.detach().clone().bool().cpu() for gid, m in masks.items()}
    scores = {gid: s.detach().float().cpu() for gid, s in scores.items()}
    counts = {gid: int(m.sum()) for gid, m in masks.items()}
    open_groups = {gid for gid, m in masks.items() if not bool(m.all())}
    while open_groups:
        best = None
        for gid in list(open_groups):
            grown = {**counts, gid: counts[gid] + 1}
            costs = [(cm.evaluate(grown), cm.evaluate(counts), limit) for cm, limit in models]
            if any(new > limit for new, _, limit in costs):
                open_groups.discard(gid)  # costs only grow with more channels: this group is done
                continue
            added = sum((new - old) / limit for new, old, limit in costs)
            closed_scores = scores[gid].masked_fill(masks[gid], float("-inf"))
            idx = int(torch.argmax(closed_scores))
            ratio = (float(closed_scores[idx]) + 1e-12) / max(added, 1e-12)
            if best is None or ratio > best[0]:
                best = (ratio, gid, idx)
        if best is None:
            break
        _, gid, idx = best
        masks[gid][idx] = True
        counts[gid] += 1
        if bool(masks[gid].all()):
            open_groups.discard(gid)
    return masks
