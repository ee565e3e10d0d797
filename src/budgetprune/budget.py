"""Budgets: how much of a resource the pruned network may use, and meeting it exactly.

A :class:`Budget` is a constraint object (in the spirit of Cooper): a metric and the
fraction of the unpruned network's cost allowed. :func:`enforce_budget` is the shared
final projection every method goes through, so every method ends within its budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import BudgetError
from .graph import ALWAYS, ChannelGraph
from .liveness import BlockMode, padding_of
from .resources import BUDGET_METRICS, CostModel


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
        return self.fraction * CostModel(graph, self.metric).full()  # the full network: the same in both modes

    def check_reachable(self, graph: ChannelGraph, mode: str = "mixed") -> None:
        """Raise :class:`BudgetError` if even the smallest allowed network is over budget
        (counted with ``mode``'s residual blocks)."""
        cm = CostModel(graph, self.metric, mode)
        full, low = cm.full(), cm.minimum()
        if self.fraction * full >= low:
            return
        why = _blocking(graph)
        if not graph.groups:
            raise BudgetError(f"{self.metric} budget {self.fraction:.4g} is unreachable: nothing in the model can be "
                              f"pruned ({why}); ChannelGraph.summary() or `budgetprune inspect` lists every layer")
        if low / full * 1.05 >= 1.0:  # no budget under 1 would do: say what blocks pruning instead
            raise BudgetError(
                f"{self.metric} budget {self.fraction:.4g} is unreachable: the prunable layers hold only "
                f"{max(1.0 - low / full, 0.0):.1%} of the network's {self.metric}: with one channel left in each, "
                f"it still costs {low / full:.4g} of it" + (f" (not prunable: {why})" if why else ""))
        raise BudgetError(
            f"{self.metric} budget {self.fraction:.4g} (= {self.fraction * full:.4g}) is unreachable: "
            f"keeping one channel per layer already costs {low:.4g} = {low / full:.4g} of the full "
            f"network; use --budget {max(low / full * 1.05, 1e-4):.3g} or more" + (f" (not prunable: {why})" if why else ""))


def _blocking(graph: ChannelGraph, shown: int = 3) -> str:
    """The first layers that cannot be pruned and why (the first blocking op of each), those that
    merely feed the network's output last."""
    items = sorted(graph.ungated.items(), key=lambda kv: "network output" in kv[1])
    text = "; ".join(f"{name}: {why}" for name, why in items[:shown])
    return text + (f"; and {len(items) - shown} more" if len(items) > shown else "")


def parse_budget(value: str | float, metric: str = "volume") -> Budget:
    """``0.25``, ``"0.25"``, ``"25%"`` or the pruning factor ``"4x"`` → Budget(metric, 0.25)."""
    if metric not in BUDGET_METRICS:
        raise BudgetError(f"unknown metric '{metric}': choose one of {', '.join(BUDGET_METRICS)}")
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


def parse_budgets(value: str | float, metric: str = "volume") -> list[Budget]:
    """One budget (``0.25``, ``4x`` for ``metric``) or several, one per metric:
    ``"volume=0.25,flops=0.2"`` or ``"volume=4x,params=10%"``. The first is the primary one."""
    text = str(value).strip()
    if "=" not in text:
        return [parse_budget(text, metric)]
    out: list[Budget] = []
    for part in text.split(","):
        name, sep, amount = part.partition("=")
        name = name.strip().lower()
        if not sep or not name or not amount.strip():
            raise BudgetError(f"budget part '{part.strip()}' is not METRIC=VALUE: write e.g. volume=0.25,flops=0.2")
        if any(b.metric == name for b in out):
            raise BudgetError(f"budget names '{name}' twice: give each metric once")
        out.append(parse_budget(amount, name))
    return out


def _as_list(budgets: Budget | list[Budget]) -> list[Budget]:
    return [budgets] if isinstance(budgets, Budget) else list(budgets)


class _Costs:
    """The hard costs of a set of masks under several budgets, as fractions of their limits.

    Every method but :meth:`ratios` takes the masks or their :meth:`ratios` (a list), so a
    search that needs several of them evaluates each set of masks once."""

    def __init__(self, graph: ChannelGraph, budgets: list[Budget], mode: str = "mixed"):
        self.mode = mode
        self.models = [(CostModel(graph, b.metric, mode), b.absolute(graph)) for b in budgets]

    def ratios(self, masks) -> list[float]:
        return [cm.hard(masks) / limit for cm, limit in self.models]

    def _of(self, masks_or_ratios) -> list[float]:
        return masks_or_ratios if isinstance(masks_or_ratios, list) else self.ratios(masks_or_ratios)

    def fits(self, masks) -> bool:
        return all(r <= 1.0 for r in self._of(masks))

    def load(self, masks) -> float:
        """Σ over the violated budgets of cost/limit (how far over budget)."""
        return sum(r for r in self._of(masks) if r > 1.0)

    def total(self, masks) -> float:
        return sum(self._of(masks))

    def excess(self, masks) -> float:
        """Σ over the budgets of max(cost/limit − 1, 0)."""
        return sum(max(r - 1.0, 0.0) for r in self._of(masks))

    def slack(self, masks) -> float:
        """min over the budgets of 1 − cost/limit (negative when one is violated)."""
        return min(1.0 - r for r in self._of(masks))


def budget_ratios(graph: ChannelGraph, masks: dict[str, torch.Tensor], budgets: Budget | list[Budget],
                  mode: str = "mixed") -> list[float]:
    """Each budget's hard cost of ``masks`` over its limit, counted with ``mode``'s blocks and padding."""
    return _Costs(graph, _as_list(budgets), mode).ratios(masks)


def chosen_share(graph: ChannelGraph, chosen: dict[str, torch.Tensor], final: dict[str, torch.Tensor],
                 budgets: Budget | list[Budget], mode: str = "mixed") -> float:
    """How much of what the ``chosen`` channels (the method's masks) could use of each budget they
    keep in ``final``: the cost of the chosen channels still kept, over the cost of all of them
    capped at the budget's limit, both counted at exact widths with ``mode``'s blocks; the lowest
    over the budgets. A projection at exact widths keeps nearly all of it (it drops chosen channels
    only while they exceed the budget); a padding that must pay for its padded widths by dropping
    chosen channels keeps less, the rest of the budget going to channels that only align widths."""
    exact = mode.exact() if isinstance(mode, BlockMode) else mode
    kept = {g: chosen[g] & final[g] for g in chosen}
    shares = []
    for cm, limit in _Costs(graph, _as_list(budgets), exact).models:
        usable = min(cm.hard(chosen), limit)
        shares.append(cm.hard(kept) / usable if usable > 0 else 1.0)
    return min(shares)


def starved_by_padding(graph: ChannelGraph, chosen: dict[str, torch.Tensor], final: dict[str, torch.Tensor],
                       budgets: Budget | list[Budget], mode) -> str | None:
    """Why a padded projection ``final`` is not kept (its :func:`chosen_share` under
    :data:`PADDING_KEEPS`), or None."""
    share = chosen_share(graph, chosen, final, budgets, mode)
    if share >= PADDING_KEEPS:
        return None
    return f"leaves the channels the method chose {share:.2f} of the budget, under {PADDING_KEEPS}"


def _toggle(masks, pairs, value):
    """``masks`` with channel ``idx`` of ``gid`` set to ``value`` for every (gid, idx) in ``pairs``."""
    out = dict(masks)
    for gid in {g for g, _ in pairs}:
        out[gid] = masks[gid].clone()
    for gid, idx in pairs:
        out[gid][idx] = value
    return out


def tie_masks(graph: ChannelGraph, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``masks`` with each set of tied channels (a grouped convolution's, :attr:`ChannelGroup.units`)
    kept wherever one of them is: a per-channel decision made valid for compaction."""
    out = {}
    for gid, m in masks.items():
        group = graph.groups.get(gid)
        if group is not None and group.units != group.channels:
            m = m.bool().view(-1, group.units).any(0).repeat(group.channels // group.units)
        out[gid] = m
    return out


def _units(graph: ChannelGraph, gid: str, values: torch.Tensor, every: torch.Tensor):
    """Per-unit sums of per-channel ``values`` (channel c belongs to unit c mod units), and
    whether the per-channel bool ``every`` holds for all channels of each unit."""
    u = graph.groups[gid].units
    return values.view(-1, u).sum(0), every.view(-1, u).all(0)


def _unit_pairs(graph: ChannelGraph, gid: str, unit: int) -> tuple[tuple[str, int], ...]:
    return tuple((gid, c) for c in graph.groups[gid].members(unit))


def _empties_a_guard(graph: ChannelGraph, masks, pairs) -> bool:
    """Whether removing ``pairs`` leaves a layer that must run without an alive input
    (:attr:`budgetprune.graph.ChannelGraph.input_guards`)."""
    gone: dict[str, list[int]] = {}
    for g, c in pairs:
        gone.setdefault(g, []).append(c)
    for guard in graph.input_guards:
        if gone.keys().isdisjoint(g for g, _ in guard):
            continue
        if not any(bool((_without(masks[g], gone[g]) if g in gone else masks[g])[chans].any()) for g, chans in guard):
            return True
    return False


def _last_guarded(graph: ChannelGraph, masks) -> dict[str, torch.Tensor]:
    """Per group with one, a bool per channel: the last alive channel of a guarded input
    (:attr:`budgetprune.graph.ChannelGraph.input_guards`), which no removal may take."""
    last: dict[str, torch.Tensor] = {}
    for guard in graph.input_guards:
        alive = [(g, chans[masks[g][chans]]) for g, chans in guard]
        if sum(c.numel() for _, c in alive) == 1:
            g, c = next((g, c) for g, c in alive if c.numel())
            last.setdefault(g, torch.zeros_like(masks[g]))[c] = True
    return last


def _without(mask: torch.Tensor, channels: list[int]) -> torch.Tensor:
    out = mask.clone()
    out[channels] = False
    return out


def with_kept_minimum(graph: ChannelGraph, masks, scores) -> dict[str, torch.Tensor]:
    """``masks`` with every group the fatal-pruning guard protects back to its ``min_keep`` channels:
    its closed units (a channel, or the channels tied to it) of highest score reopened. A method
    whose own criterion closed all of a protected group (a filter decayed under the sensitivity
    method's threshold: a ResNet's only shortcut, which cut the network in two) hands masks no
    projection may keep. Not in place."""
    for gid, group in graph.groups.items():
        if gid not in masks or int(masks[gid].sum()) >= group.min_keep:
            continue
        unit_scores, unit_kept = _units(graph, gid, scores[gid].float(), masks[gid])
        for unit in torch.argsort(unit_scores.masked_fill(unit_kept, float("-inf")), descending=True).tolist():
            masks = _toggle(masks, _unit_pairs(graph, gid, unit), True)
            if int(masks[gid].sum()) >= group.min_keep:
                break
    return masks


def with_guarded_inputs(graph: ChannelGraph, masks, scores) -> dict[str, torch.Tensor]:
    """``masks`` with every protected group at its ``min_keep`` channels (:func:`with_kept_minimum`)
    and, for every layer that must run left without an alive input, its writers' channel (with the
    channels tied to it) of highest score reopened (a method's gates may all have closed on a piece
    of a split; :attr:`budgetprune.graph.ChannelGraph.input_guards`). Not in place."""
    masks = with_kept_minimum(graph, masks, scores)
    for guard in graph.input_guards:
        if any(bool(masks[g][chans].any()) for g, chans in guard):
            continue
        gid, chans = max(guard, key=lambda gc: float(scores[gc[0]][gc[1]].max()))
        best = int(chans[torch.argmax(scores[gid][chans])])
        masks = _toggle(masks, _unit_pairs(graph, gid, best % graph.groups[gid].units), True)
    return masks


class _Writers:
    """Which channels of other groups write the same slot as a given channel (a residual sum).

    With regular blocks, removing one writer of a residual slot saves nothing (the slot stays
    for the others), so the projection also offers removing the slot from every writer at once."""

    def __init__(self, graph: ChannelGraph):
        self.groups = graph.groups
        self.by_group: dict[str, list] = {}
        for info in graph.tensors.values():
            for seg in info.segments:
                if len(seg.sources) > 1:
                    for gid, off in seg.sources:
                        if gid is not ALWAYS:
                            self.by_group.setdefault(gid, []).append((off, seg.length, seg.sources))

    def closure(self, gid: str, idx: int) -> tuple[tuple[str, int], ...] | None:
        """Every (group, channel) sharing a slot with ``(gid, idx)`` or tied to it (a grouped
        convolution's channels), transitively; None when an always-alive input shares a slot
        (the slot cannot go)."""
        seen, todo = {(gid, idx)}, [(gid, idx)]
        while todo:
            g, c = todo.pop()
            for tied in self.groups[g].members(c):
                if (g, tied) not in seen:
                    seen.add((g, tied))
                    todo.append((g, tied))
            for off, length, sources in self.by_group.get(g, ()):
                if not off <= c < off + length:
                    continue
                for other, o_off in sources:
                    if other is ALWAYS:
                        return None
                    pair = (other, o_off + c - off)
                    if pair not in seen:
                        seen.add(pair)
                        todo.append(pair)
        return tuple(sorted(seen))


#: The fraction of its budget a projected and filled network should reach: one ending lower had
#: room a finer step could have used (the projection then tries the channels cheaper than its last
#: removal; ``channel_multiple="auto"`` tries a finer padding).
FILLED = 0.95

#: The least share of the budget a padding must leave to the channels the method chose
#: (:func:`chosen_share`) for ``channel_multiple="auto"`` to keep it; a padding that leaves less is
#: passed over for the next, finer one (exact widths last). Padded widths are paid for by dropping
#: chosen channels elsewhere. On ResNet-20 at 16× less volume, where one 28×28 map padded from 1
#: channel to 8 costs two thirds of the budget, padding to 8 left BAR's trained masks 0.12 of it
#: and removed every residual branch (magnitude masks: 0.17–0.26). On the deploy benchmark's
#: networks at 2× and 4× fewer FLOPs (``benchmarks/results/padding_share.md``) the paddings kept
#: left 0.46–0.95 (multiples of 16 on mobilenet_v3_small at 4×: 0.46). The line sits between the
#: two; what a share between it and 1 costs in accuracy has not been measured.
PADDING_KEEPS = 0.45

#: Put-back tries in a row that did not fit before the projection stops trying (each try is a
#: full cost evaluation, about a second on a ViT-B; a network of tens of thousands of channels
#: has as many candidates).
PUT_BACK_MISSES = 64


def enforce_budget(graph: ChannelGraph, masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
                   budget: Budget | list[Budget], mode: str = "mixed") -> dict[str, torch.Tensor]:
    """Drop the lowest score-per-cost channels until every budget holds (DESIGN's shared projection).

    At each step every group offers its kept channel of lowest score; the one with the
    smallest score / (cost saved by removing it, as a fraction of the budget) goes. Where one
    channel saves nothing (a residual slot other writers keep), the group offers the slot removed
    from every writer, or else, if it may go, the whole layer. A group never drops below its
    ``min_keep`` channels (the fatal-pruning guard), and a layer that must run keeps an alive input
    (:attr:`budgetprune.graph.ChannelGraph.input_guards`). Far from the
    budget, channels go in batches: each group's saving per channel is measured once, and
    the channels of lowest score / saving are removed together until half of the excess is
    gone (the same order as one-by-one removal while a group's saving per channel does not
    change, which is exact for the volume), so a network with tens of thousands of channels
    is projected in a few dozen cost evaluations per group. The last removal can overshoot
    (one wide-area map may save far more than needed): where the result ends under
    :data:`FILLED` of a budget, the greedy runs again from before it with only cheaper removals
    (each costing less than it) and that is kept where it ends fuller; then the channels this
    projection removed are put back, most recently removed first, wherever they still fit (until
    :data:`PUT_BACK_MISSES` tries in a row do not).
    ``mode`` is the residual block the costs are counted for (see
    :mod:`budgetprune.resources`); with widths padded to a multiple
    (:class:`budgetprune.liveness.BlockMode`) see :func:`_project_padded`. Masks are not
    modified in place.
    """
    budgets = _as_list(budget)
    if padding_of(mode).multiple > 1:
        return _project_padded(graph, masks, scores, budgets, mode)
    return _project(graph, masks, scores, budgets, mode)


#: How many shrunken budgets :func:`_project_padded` tries before it gives up.
PADDED_TRIES = 12


def _project_padded(graph: ChannelGraph, masks, scores, budgets: list[Budget], mode) -> dict[str, torch.Tensor]:
    """:func:`enforce_budget` for widths padded to a multiple.

    Padded costs stay flat over most single removals (a width of 30 pads to 32 like 31 does), so
    the greedy search that weighs a removal by what it saves cannot run on them. The projection
    runs on the exact widths instead, to budgets shrunk by the padding's share (the padded cost
    over the budget, measured on the previous try) until the padded network fits. The fill that
    follows (:func:`fill_budget` with the same mode) then turns the padding into kept channels:
    a channel reopened into a padded width costs nothing. The first try shrinks each budget by the
    padding's share in the masks given; each later try starts from the last one's masks, which
    already fit a larger budget (the greedy order of removal is the same), so it only removes the
    difference."""
    exact = mode.exact()  # the same blocks (auto: chosen per masks) without the padding
    padded = _Costs(graph, budgets, mode)
    share = [p / e if e > 0 else 1.0
             for p, e in zip(padded.ratios(masks), _Costs(graph, budgets, exact).ratios(masks))]
    shrunk = [Budget(b.metric, b.fraction / max(s, 1.0)) for b, s in zip(budgets, share)]
    out = masks
    for attempt in range(PADDED_TRIES):
        out = _project(graph, out, scores, shrunk, exact)
        ratios = padded.ratios(out)
        if max(ratios) <= 1.0:
            return out
        least = 1.0 + 0.005 * 2 ** attempt  # a padded cost that barely moves: shrink faster each try
        shrunk = [Budget(b.metric, b.fraction / max(r, least)) if r > 1.0 else b for b, r in zip(shrunk, ratios)]
    names = ", ".join(f"{b.metric} {b.fraction:.4g}" for b in budgets)
    raise BudgetError(f"budget ({names}) cannot be met with widths padded to multiples of {padding_of(mode).multiple}: "
                      "raise the budget or lower the channel multiple")


def _project(graph: ChannelGraph, masks, scores, budgets: list[Budget], mode: str) -> dict[str, torch.Tensor]:
    """:func:`enforce_budget` on exact widths."""
    costs = _Costs(graph, budgets, mode)
    masks = tie_masks(graph, {gid: m.detach().clone().bool().cpu() for gid, m in masks.items()})
    scores = {gid: s.detach().float().cpu() for gid, s in scores.items()}
    masks = with_guarded_inputs(graph, masks, scores)
    masks, dropped = _drop_until(graph, costs, masks, scores)
    if dropped is None:
        names = ", ".join(f"{b.metric} {b.fraction:.4g}" for b in budgets)
        raise BudgetError(f"budget ({names}) cannot be met without removing the last channel of a layer "
                          "whose loss would cut the network; raise the budget")
    if dropped and max(costs.ratios(masks)) < FILLED:
        # The last removal overshot: try the cheaper channels instead of it (a first-conv map of
        # LeNet-5 is 576 units of volume where the gates were 253 over: four second-conv maps
        # of 64 cover it, keeping what the method chose and its widths near the budget)
        pairs, _, cost = dropped[-1]
        alt, more = _drop_until(graph, costs, _toggle(masks, pairs, True), scores, max_cost=sum(cost))
        if more is not None and costs.total(alt) > costs.total(masks):
            masks, dropped = alt, dropped[:-1] + more
    return _put_back(costs, masks, dropped)


def _put_back(costs: _Costs, masks, dropped) -> dict[str, torch.Tensor]:
    """Put back the channels the projection removed, most recent first, wherever they still fit.

    The removals that fit the remaining slack by the cost they had when removed are tried as
    one run, halved until the run fits (each try is one full cost evaluation; a network of tens
    of thousands of channels has as many candidates); a single one that does not fit is passed
    over. After :data:`PUT_BACK_MISSES` tries in a row that did not fit the search stops."""
    slack = [1.0 - r for r in costs.ratios(masks)]
    todo = [(pairs, cost) for pairs, _, cost in reversed(dropped)]
    i, misses = 0, 0
    while i < len(todo) and misses < PUT_BACK_MISSES:
        run, total = [], [0.0] * len(slack)
        for pairs, cost in todo[i:]:
            total = [t + c for t, c in zip(total, cost)]
            if any(t > room + 1e-12 for t, room in zip(total, slack)):
                break
            run.append(pairs)
        if not run:  # the next removal alone no longer fits the slack
            i += 1
            continue
        k, fitted = len(run), False
        while k and misses < PUT_BACK_MISSES:
            grown = masks
            for pairs in run[:k]:
                if not any(grown[g][c] for g, c in pairs):
                    grown = _toggle(grown, pairs, True)
            fitted = costs.fits(grown)
            if fitted:
                break
            misses += 1
            k //= 2
        if not fitted:
            i += 1
            continue
        masks, i, misses = grown, i + k, 0
        slack = [1.0 - r for r in costs.ratios(masks)]
    return masks


def uniform_widths(graph: ChannelGraph, masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
                   budget: Budget | list[Budget], mode: str = "mixed",
                   joint_streams: bool = False) -> dict[str, torch.Tensor]:
    """Scale every layer's width by one factor s so that every budget holds (seed 001, section
    5.1: the baselines "scale the width of all layers uniformly to satisfy the budget").

    Group g keeps its ``max(1, round(s · C_g))`` kept channels of highest score (never more
    than it keeps now); s is the largest factor, found by bisection, at which every budget
    holds. Each layer ranks its channels by its own scores, so the writers of a residual stream
    keep different channels and the stream keeps their union (mixed-connectivity blocks gather
    them). With ``joint_streams=True`` they rank the stream's slots together
    (:func:`slot_scores`) and keep the same ones, so the stream itself is thinned by s. That is
    not the default: on MaxViT-T at 4× fewer FLOPs (onnxruntime, batch 16) the thinned streams
    made their window partitions 2.2× faster, but left the layers inside the blocks wider at the
    same budget (activation volume 2.01× smaller instead of 3.20×), and the network ran 2.59×
    faster instead of 2.72× (``benchmarks/results/deploy_speed_families/joint_streams_fused_norm/``
    and ``joint_streams/before/``). Falls back to
    :func:`enforce_budget` when even one channel per layer is over budget. Masks are not
    modified in place.
    """
    budgets = _as_list(budget)
    costs = _Costs(graph, budgets, mode)
    masks = tie_masks(graph, {gid: m.detach().clone().bool().cpu() for gid, m in masks.items()})
    scores = {gid: s.detach().float().cpu() for gid, s in scores.items()}
    if joint_streams:
        scores = slot_scores(graph, scores)
    kept = {gid: _units(graph, gid, scores[gid], masks[gid]) for gid in masks}  # (unit scores, unit kept)
    # joint: a stream's writers break ties alike (by slot), so equal totals keep the same slots
    order = {gid: torch.argsort(us.masked_fill(~uk, float("-inf")), descending=True, stable=joint_streams)
             for gid, (us, uk) in kept.items()}

    def scaled(s: float) -> dict[str, torch.Tensor]:
        out = {}
        for gid, m in masks.items():
            group = graph.groups[gid]
            k = min(int(kept[gid][1].sum()), max(1, round(s * group.units)))
            keep = torch.zeros(group.units, dtype=torch.bool)
            keep[order[gid][:k]] = True
            out[gid] = keep.repeat(group.channels // group.units)
        return with_guarded_inputs(graph, out, scores)

    masks = with_guarded_inputs(graph, masks, scores)
    if costs.fits(masks):
        return masks
    s = _largest_fitting_scale(costs, scaled)
    return enforce_budget(graph, masks, scores, budgets, mode) if s is None else scaled(s)


def slot_scores(graph: ChannelGraph, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``scores`` with each channel that shares a residual slot with channels of other groups
    (:meth:`_Writers.closure`: the writers of one slot of a residual sum, transitively, and the
    channels tied to them) scored by the sum over all of them: one score per slot, the same in
    every writer, so writers that keep their best k channels keep the same slots (the coupled
    channels scored together, as dependency-group pruning does). Channels of no shared slot keep
    their own score."""
    writers = _Writers(graph)
    out = {gid: s.clone() for gid, s in scores.items()}
    done: set[tuple[str, int]] = set()
    for gid in writers.by_group:
        if gid not in scores:
            continue
        for c in range(graph.groups[gid].channels):
            if (gid, c) in done:
                continue
            closure = writers.closure(gid, c)
            if closure is None or len(closure) < 2:
                continue
            total = sum(float(scores[g][i]) for g, i in closure if g in scores)
            for g, i in closure:
                if g in out:
                    out[g][i] = total
            done.update(closure)
    return out


def _largest_fitting_scale(costs: _Costs, scaled, steps: int = 40) -> float | None:
    """The largest s in [0, 1] (to 2^-steps) at which ``costs.fits(scaled(s))``, by bisection
    (fitting is monotone in s); None when even ``scaled(0)`` does not fit."""
    lo, hi = 0.0, 1.0
    if not costs.fits(scaled(lo)):
        return None
    if costs.fits(scaled(hi)):
        return hi
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if costs.fits(scaled(mid)):
            lo = mid
        else:
            hi = mid
    return lo


def uniform_share(graph: ChannelGraph, budget: Budget | list[Budget], mode: str = "mixed") -> float:
    """The share s of every layer's channels at which the network meets every budget: the
    largest s such that keeping ``max(1, round(s · C_g))`` channels of every group g (the same
    first channels, so a residual sum's writers keep the same ones) costs at most each limit.

    A per-layer target that means what a network-wide budget means (seed 003's layer-wise
    constraints, moved from single weights to channels: a layer keeping a share s of its
    channels keeps about s² of its weights, not s). s is the top of its rounding step (a layer
    of C channels may aim up to half a channel over what the thinned network keeps; the final
    projection meets the budget). Where even one channel per group is over a budget, the share
    of one channel of the widest group (a target the gates can reach; the final projection then
    cuts whole layers where it can)."""
    costs = _Costs(graph, _as_list(budget), mode)

    def scaled(s: float) -> dict[str, torch.Tensor]:
        out = {}
        for gid, group in graph.groups.items():
            keep = torch.zeros(group.units, dtype=torch.bool)
            keep[:max(1, round(s * group.units))] = True
            out[gid] = keep.repeat(group.channels // group.units)
        return out

    s = _largest_fitting_scale(costs, scaled)
    return 1.0 / max(g.units for g in graph.groups.values()) if s is None else s


def _drop_until(graph, costs: _Costs, masks, scores, max_cost: float = float("inf")):
    """Greedy lowest score-per-cost removal until every budget holds.

    Only removals that lower the budgets' summed cost / limit (:meth:`_Costs.total`) by less
    than ``max_cost`` are candidates (the cheaper channels that can replace one that overshot;
    the bound is on the cost, not on the saving in units of :meth:`_Costs.load`: a removal that
    ends the violation saves exactly the load left, which every cover of it does). Returns the new
    masks and the removals ``(pairs, saving, cost)`` in order: ``pairs`` the (group, channel)
    removed together (one, or every writer of a residual slot), ``saving`` in units of
    :meth:`_Costs.load` and ``cost`` the drop of each budget's cost / limit when they went
    (None if the budgets cannot be met).
    """
    dropped: list[tuple[tuple[tuple[str, int], ...], float, tuple[float, ...]]] = []
    writers = _Writers(graph) if costs.mode in ("regular", "auto") else None  # auto: a space may be regular
    ratios = costs.ratios(masks)  # each set of masks is evaluated once: the load is read from its ratios
    current = costs.load(ratios)
    while current > 0.0:
        offers = []  # (score / saving, group, pairs, saving, cost, trial, its ratios)
        last = _last_guarded(graph, masks)  # a guarded input's last alive channel is no candidate
        for gid, m in masks.items():
            unit_scores, unit_kept = _units(graph, gid, scores[gid], m)
            if gid in last:
                unit_kept = unit_kept & _units(graph, gid, scores[gid], ~last[gid])[1]
            if not bool(unit_kept.any()):
                continue
            idx = int(torch.argmin(unit_scores.masked_fill(~unit_kept, float("inf"))))
            pairs = _unit_pairs(graph, gid, idx)  # one channel, or the channels tied to it
            if int(m.sum()) - len(pairs) < graph.groups[gid].min_keep or _empties_a_guard(graph, masks, pairs):
                continue
            trial = _toggle(masks, pairs, False)
            trial_ratios = costs.ratios(trial)
            saved = current - costs.load(trial_ratios)
            if saved <= 0 and writers is not None:  # a residual slot: remove it from every writer
                closure = writers.closure(gid, idx)
                if closure is not None and all(int(masks[g].sum()) - sum(1 for h, _ in closure if h == g)
                                               >= graph.groups[g].min_keep for g, _ in closure):
                    closure = tuple((g, i) for g, i in closure if masks[g][i])
                    if not _empties_a_guard(graph, masks, closure):
                        pairs, trial = closure, _toggle(masks, closure, False)
                        trial_ratios = costs.ratios(trial)
                        saved = current - costs.load(trial_ratios)
                if saved <= 0 and graph.groups[gid].min_keep == 0:
                    # or the whole layer: where another writer keeps the slot (a residual stream an
                    # unpruned layer writes too), a channel saves nothing, but a pruned-away layer is gone
                    whole = tuple((gid, int(c)) for c in torch.nonzero(m).flatten())
                    if not _empties_a_guard(graph, masks, whole):
                        pairs, trial = whole, _toggle(masks, whole, False)
                        trial_ratios = costs.ratios(trial)
                        saved = current - costs.load(trial_ratios)
            cost = tuple(a - b for a, b in zip(ratios, trial_ratios))
            if saved <= 0 or sum(cost) >= max_cost - 1e-9:  # the same channel costs the same, to rounding
                continue
            score = sum(float(scores[g][i]) for g, i in pairs)
            offers.append((score / saved, gid, pairs, saved, cost, trial, trial_ratios))
        if not offers:
            return masks, None
        single = [o for o in offers if {g for g, _ in o[2]} == {o[1]}  # one unit of one group: its saving per unit
                  and len(o[2]) == graph.groups[o[1]].channels // graph.groups[o[1]].units]
        batch = _batch(graph, masks, scores, single,
                       keep=lambda gid: 1 if graph.groups[gid].min_keep else 0, room=0.5 * costs.excess(ratios),
                       lowest=True)
        if graph.input_guards and len(batch) >= 2:  # removals that together would empty a guarded input
            kept, batch, taken = batch, [], []
            for item in kept:
                if not _empties_a_guard(graph, masks, taken + list(item[0])):
                    batch.append(item)
                    taken += item[0]
        if len(batch) >= 2:
            masks = {gid: m.clone() for gid, m in masks.items()}
            for pairs, saved, cost in batch:
                for gid, idx in pairs:
                    masks[gid][idx] = False
            dropped.extend(batch)
            ratios = costs.ratios(masks)
        else:
            _, gid, pairs, saved, cost, masks, ratios = min(offers, key=lambda o: o[0])
            dropped.append((pairs, saved, cost))
        current = costs.load(ratios)
    return masks, dropped


def _batch(graph, masks, scores, offers, keep, room: float, lowest: bool) -> list[tuple[tuple[tuple[str, int]], float, tuple]]:
    """The units to toggle together: each group's units (channels, or tied channels) at its
    measured saving (or cost) per unit, best score / saving first, while their summed saving
    stays ≤ ``room``.

    ``lowest`` takes kept units of lowest score (removal; ``keep(group)`` of them stay),
    else closed units of highest score (reopening; ``keep`` is unused)."""
    ranked = []
    for _, gid, _, saved, cost, *_ in offers:
        unit_scores, candidates = _units(graph, gid, scores[gid], masks[gid] if lowest else ~masks[gid])
        idx = torch.nonzero(candidates).flatten()
        if lowest:
            order = idx[torch.argsort(unit_scores[idx])][:max(len(idx) - keep(gid), 0)]
        else:
            order = idx[torch.argsort(unit_scores[idx], descending=True)]
        for i in order.tolist():
            s = float(unit_scores[i])
            ranked.append(((s / saved) if lowest else -(s + 1e-12) / saved, gid, i, saved, cost))
    ranked.sort(key=lambda r: r[0])
    chosen, used = [], 0.0
    for _, gid, i, saved, cost in ranked:
        if used + saved > room:
            break
        used += saved
        chosen.append((_unit_pairs(graph, gid, i), saved, cost))
    return chosen


def reopenable_channels(graph: ChannelGraph, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Closed channels that can be reopened without changing the network's function.

    A sole writer's channel always can (its outgoing weights are zeroed). A channel that
    writes into a residual sum (a ``shared`` group) can only where another writer keeps its
    slot alive: it then adds a zero output to a live slot. Reviving a dead slot would let the
    ops that map 0 to non-zero (a pre-activation BatchNorm, a sigmoid) output a constant there.
    """
    writers = _Writers(graph)
    out = {}
    for gid, m in masks.items():
        allowed = ~m.bool().cpu()
        if graph.groups[gid].shared:
            for c in torch.nonzero(allowed).flatten().tolist():
                pairs = writers.closure(gid, c)
                allowed[c] = pairs is None or any(bool(masks[g][i]) for g, i in pairs
                                                  if g != gid or i not in graph.groups[gid].members(c))
        group = graph.groups[gid]
        out[gid] = allowed.view(-1, group.units).all(0).repeat(group.channels // group.units)
    return out


def fill_budget(graph: ChannelGraph, masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
                budgets: Budget | list[Budget], reopenable: dict[str, torch.Tensor] | None = None,
                mode: str = "mixed") -> dict[str, torch.Tensor]:
    """Reopen the most promising closed channels while every budget still holds.

    The counterpart of :func:`enforce_budget` for a run that ends *under* its budget (BAR's
    barrier is 0 below a, so V can drift below B in the last epochs; a penalised method may
    end far below). At each step every group offers its closed channel of highest score;
    the one with the highest score / (cost added, summed over the budgets as fractions of
    their limits) is reopened if all budgets still hold after it, else that group is done.
    Far below the budget, channels are reopened in batches (each group's cost per channel
    measured once, best score / cost first, up to half of the room left), checked against
    every budget before they are kept. Only the channels set in ``reopenable[group]`` can be
    reopened (default: every closed channel; a group not listed: none; see
    :func:`reopenable_channels`). The caller decides what a reopened channel computes
    (:func:`budgetprune.compact.silence_channels` makes it a function-preserving addition).
    Masks are not modified in place.
    """
    costs = _Costs(graph, _as_list(budgets), mode)
    masks = {gid: m.detach().clone().bool().cpu() for gid, m in masks.items()}
    scores = {gid: s.detach().float().cpu() for gid, s in scores.items()}
    closed = {gid: (reopenable[gid].bool().cpu() if reopenable is not None and gid in reopenable
                    else torch.ones_like(m)) & ~m for gid, m in masks.items()}
    if reopenable is not None:
        closed = {gid: c if gid in reopenable else torch.zeros_like(c) for gid, c in closed.items()}
    open_groups = {gid for gid, c in closed.items() if bool(c.any())}
    ratios = costs.ratios(masks)  # each set of masks is evaluated once
    while open_groups:
        current = costs.total(ratios)
        offers = []  # (score / cost, group, index, cost, cost, grown, its ratios)
        for gid in sorted(open_groups):
            unit_scores, unit_closed = _units(graph, gid, scores[gid], closed[gid] & ~masks[gid])
            if not bool(unit_closed.any()):
                open_groups.discard(gid)
                continue
            closed_scores = unit_scores.masked_fill(~unit_closed, float("-inf"))
            idx = int(torch.argmax(closed_scores))
            grown = _toggle(masks, _unit_pairs(graph, gid, idx), True)
            grown_ratios = costs.ratios(grown)
            if not costs.fits(grown_ratios):
                open_groups.discard(gid)  # costs only grow with more channels: this group is done
                continue
            added = max(costs.total(grown_ratios) - current, 1e-12)
            offers.append(((float(closed_scores[idx]) + 1e-12) / added, gid, idx, added, added, grown, grown_ratios))
        if not offers:
            break
        blocked = {gid: masks[gid] | ~closed[gid] for gid in masks}  # what the batch may not reopen
        batch = _batch(graph, blocked, scores, offers, keep=None, room=0.5 * costs.slack(ratios), lowest=False)
        grown = None
        while len(batch) >= 2:  # the per-channel costs are estimates: halve the batch until it fits
            trial = {gid: m.clone() for gid, m in masks.items()}
            for pairs, _, _ in batch:
                for gid, idx in pairs:
                    trial[gid][idx] = True
            trial_ratios = costs.ratios(trial)
            if costs.fits(trial_ratios):
                grown, grown_ratios = trial, trial_ratios
                break
            batch = batch[:len(batch) // 2]
        if grown is None:
            *_, grown, grown_ratios = max(offers, key=lambda o: o[0])
        masks, ratios = grown, grown_ratios
        for gid in list(open_groups):
            if not bool(_units(graph, gid, scores[gid], closed[gid] & ~masks[gid])[1].any()):
                open_groups.discard(gid)
    return masks


def project_and_fill(graph: ChannelGraph, masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
                     budgets: Budget | list[Budget], mode: str = "mixed",
                     fill: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(final masks, reopened channel indices per group)``: :func:`enforce_budget`, then with
    ``fill`` :func:`fill_budget` reopening closed channels while every budget holds (finalize's
    hard decision for one block mode and padding)."""
    budgets = _as_list(budgets)
    final = enforce_budget(graph, masks, scores, budgets, mode=mode)
    if not fill:
        return final, {}
    filled = fill_budget(graph, final, scores, budgets, reopenable=reopenable_channels(graph, final), mode=mode)
    return filled, {g: torch.nonzero(filled[g] & ~final[g]).flatten() for g in final}
