"""Latency budgets in a deployment runtime, checked by timing the compacted network there.

A ``latency:onnxruntime`` or ``latency:torchscript`` budget is counted with a per-layer table
(:mod:`budgetprune.latency`): each layer timed alone. A whole network runs differently (memory
traffic between layers, the ops between them, the runtime's fusions; at 224 px onnxruntime takes
1.5–2× the sum of the layers), so the table's ratio of pruned to unpruned cost is only close to
the measured one: 3–35 % over it on resnet20, resnet18 and mobilenet_v2
(``benchmarks/latency_budget.py``). So the projection's result is compacted, exported and timed
against the unpruned network in the budget's runtime (paired runs, at the batch it is deployed
at: ``deploy_batch``, 1 by default); while the
measured ratio is not within :data:`BAND` of the budget, the projection runs again from the same
masks to another budget, up to :data:`MEASURED_TRIES` times, aiming at :data:`AIM` of it: first
the budget scaled by the measured excess, then by false position between the tries over and under
the aim (:func:`_next_fraction`; what the table leaves out, the ops between the layers and the runtime's overhead, does
not scale with it). Of the tries measured within the budget, the one closest to the aim is kept (where none is,
the fastest one timed, and the record says ``met: false``):
a network timed again later measures a few percent apart (sub-millisecond networks on a busy
machine more), so a result aimed at the middle of [0.9, 1] stays inside it. The tries are timed
alike: one whose unpruned network ran much slower than in the tries before is timed again
(:func:`steady_speed`), as a busier machine slows a small network more than a large one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .budget import Budget
from .errors import BudgetError, first_line
from .latency import LATENCY_METRICS
from .runtimes import deployed_speed

#: Latency metrics measured in a deployment runtime, by runtime (eager PyTorch is not checked).
RUNTIME_LATENCIES = {metric: runtime for metric, runtime in LATENCY_METRICS.items() if runtime != "eager"}
#: Projections tried at most (the first included) before the one closest to the aim is kept.
MEASURED_TRIES = 7
#: A tightened budget aims at this share of the measured budget ...
AIM = 0.95
#: ... and the search stops at a result measured within this share of it.
BAND = (0.92, 0.98)
#: Timed runs of each network per measurement at least (run by turns with the unpruned one, for a
#: second at least: :func:`budgetprune.runtimes.paired_times`).
REPEATS = 60
#: A try whose unpruned network ran more than this many times slower than in the fastest try before
#: it was timed while the machine was busier, which slows the two networks unalike: it is timed again
#: (ShuffleNet V2 x0.5, batch 16, onnxruntime: nearly the same pruned network measured 0.52 of the
#: unpruned one's time where that took 20.3 ms, and 0.44 where it took 14.2 ms).
STEADY = 1.25
#: ... up to this many more times; the measurement whose unpruned run was fastest counts.
RETIMES = 2


#: Auto padding is kept only where the padded network runs at least this much faster than the
#: same budget at exact widths (a smaller gain is within what two timings of one network differ by).
PADDING_PAYS = 1.05


def padding_speedup(exact: nn.Module, padded: nn.Module, example: torch.Tensor, runtime: str) -> dict:
    """How much faster the ``padded`` network runs than the ``exact`` one in ``runtime`` on
    ``example`` (paired runs, :func:`budgetprune.runtimes.deployed_speed`): ``exact_ms``,
    ``padded_ms``, ``speedup`` (the median of the pairs' exact/padded ratios), ``pairs``,
    ``others_cpu`` (the share of the CPUs other processes used meanwhile) and ``pays`` (speedup at
    least :data:`PADDING_PAYS`); ``error`` instead when one cannot be exported or timed, or when
    other processes kept the machine busy however long it waited (:class:`budgetprune.quiet.Quiet`:
    a busy machine slows the two networks unalike). The padding is then kept: the timing only
    ever drops it.

    Why: onnxruntime's blocked CPU convolutions need channel counts that are multiples of 8:
    resnet20 at 2× fewer FLOPs ran 1.82× faster than unpruned with its widths padded and 0.72×
    at exact widths (batch 1, ``benchmarks/results/deploy_speed.md``), but LeNet-5 ran no faster
    padded, while the padding cost it 0.63 points of accuracy at 8× fewer FLOPs (README,
    "Benchmark")."""
    try:
        speed = deployed_speed(exact, padded, example, runtime)
    except Exception as exc:  # noqa: BLE001 - a timing that fails (a runtime's own error) costs the run nothing
        speed = {"error": f"{type(exc).__name__}: {first_line(exc, 300)}"}
    if "error" in speed:
        return {"runtime": runtime, "error": speed["error"]}
    if speed["busy"]:
        return {"runtime": runtime, "batch": speed["batch"], "others_cpu": speed["others_cpu"],
                "measured_speedup": speed["speedup"],
                "error": f"the machine was busy: other processes used {speed['others_cpu']:.0%} of its CPUs while "
                         f"it was timed (measured {speed['speedup']:.2f}×, not trusted)"}
    return {"runtime": runtime, "batch": speed["batch"], "exact_ms": speed["unpruned_ms"],
            "padded_ms": speed["pruned_ms"], "speedup": speed["speedup"], "pairs": speed["pairs"],
            "others_cpu": speed["others_cpu"], "pays": speed["speedup"] >= PADDING_PAYS}


def meet_measured_latency(project: Callable[[list[Budget]], tuple[dict, dict]],
                          compacted: Callable[[dict | None], nn.Module], budgets: list[Budget],
                          example: torch.Tensor, log: Callable[[str], None] = lambda line: None):
    """``project(budgets) -> (masks, reopened)``, tightened until the network ``compacted(masks)``
    measures within every runtime latency budget against the unpruned network ``compacted(None)``
    (the model itself: :func:`budgetprune.compact.unpruned_copy`) on ``example``.

    Returns ``(masks, reopened, record)``; ``record`` is None without such a budget, else per try
    the budgets projected to and the measured ratios, the try kept (``kept_try``), its measured
    ratio over the budget (``measured_over_budget``, the worst of several budgets) and whether
    that is within the budget (``met``). Where no try measured within it (the time pruning does
    not shrink, between and around the layers, is more than the budget leaves), the fastest try
    measured is kept, ``met`` is False and the log says so with the budget that can be met."""
    masks, reopened = project(budgets)
    timed = [b for b in budgets if b.metric in RUNTIME_LATENCIES]
    if not timed:
        return masks, reopened, None
    unpruned = compacted(None)
    record = {"batch": int(example.shape[0]), "tries": []}
    current = list(budgets)
    candidates = []  # per timed try: (masks, reopened, its measured ratio over the budget, the worst budget's)
    stopped = f"all {MEASURED_TRIES} projections were timed"
    for attempt in range(MEASURED_TRIES):
        try:
            net = compacted(masks)
        except RuntimeError as exc:  # compaction's own internal check; the user's budget itself must compact
            if not record["tries"]:
                raise
            log(f"a tighter projection could not be compacted ({first_line(exc, 300)}); the tries timed before "
                "decide")
            stopped = "a tighter projection could not be compacted"
            break
        measured = {}
        for b in timed:
            speed = steady_speed(unpruned, net, example, RUNTIME_LATENCIES[b.metric],
                                 fastest_unpruned_ms(record["tries"], b.metric))
            if "error" in speed:
                record["error"] = speed["error"]
                if not candidates:
                    log(f"{b.metric}: the result could not be timed ({speed['error']}); it meets the table's budget")
                    return masks, reopened, record
                log(f"{b.metric}: a projection could not be timed ({speed['error']}); the tries timed before decide")
                break
            measured[b.metric] = {"unpruned_ms": speed["unpruned_ms"], "pruned_ms": speed["pruned_ms"],
                                  "ratio": speed["ratio"], "fraction": b.fraction,
                                  **({"retimed": speed["retimed"]} if speed.get("retimed") else {}),
                                  **({"others_cpu": speed["others_cpu"]} if speed.get("busy") else {})}
        if "error" in record:
            stopped = "a projection could not be timed"
            break
        record["tries"].append({"projected_to": {b.metric: b.fraction for b in current if b.metric in measured},
                                "measured": measured})
        over = {m: v["ratio"] / v["fraction"] for m, v in measured.items()}
        log("measured " + "; ".join(_measured_line(m, v, over[m]) for m, v in measured.items()))
        worst = max(over.values())
        candidates.append((masks, reopened, worst))
        if BAND[0] <= worst <= BAND[1] or attempt + 1 == MEASURED_TRIES:
            break  # on the budget, or no try left to time another projection
        fractions = {b.metric: _next_fraction(b.metric, record["tries"], AIM * b.fraction, b.fraction)
                     for b in timed}
        if all(abs(fractions[b.metric] - b.fraction) < 1e-4 * b.fraction for b in current if b.metric in fractions):
            stopped = "the search no longer moved"
            break
        projected = _project_towards(project, current, fractions, log)
        if projected is None:
            stopped = "no network between the last one timed and the one asked for could be projected"
            break
        current, (masks, reopened) = projected
    within = [i for i, c in enumerate(candidates) if c[2] <= 1.0]
    index = (min(within, key=lambda i: abs(candidates[i][2] - AIM)) if within  # the one closest to the aim
             else min(range(len(candidates)), key=lambda i: candidates[i][2]))  # else the fastest
    masks, reopened, worst = candidates[index]
    record.update(kept_try=index, measured_over_budget=worst, met=worst <= 1.0)
    if not within:
        log(_over_budget_warning(record, budgets, stopped))
    return masks, reopened, record


def _measured_line(metric: str, measured: dict, over: float) -> str:
    retimed = measured.get("retimed", 0)
    again = f" (timed again, {retimed} more timing{'s' if retimed > 1 else ''}: the unpruned network ran " \
        "slower than before)" if retimed else ""
    busy = f" (while other processes used {measured['others_cpu']:.0%} of the CPUs: it may measure otherwise on a " \
        "quiet machine)" if "others_cpu" in measured else ""
    return f"{metric}: {measured['pruned_ms']:.4g} ms of {measured['unpruned_ms']:.4g} ms unpruned = " \
        f"{over:.3f} of the budget{again}{busy}"


def fastest_unpruned_ms(tries: list[dict], metric: str) -> float | None:
    """The fastest the unpruned network ran in the ``tries`` of a search (its record's "tries"),
    for ``metric``; None before the first: :func:`steady_speed`'s reference."""
    return min((t["measured"][metric]["unpruned_ms"] for t in tries if metric in t["measured"]), default=None)


def steady_speed(unpruned: nn.Module, net: nn.Module, example: torch.Tensor, runtime: str,
                 reference_ms: float | None, repeats: int = REPEATS) -> dict:
    """:func:`budgetprune.runtimes.deployed_speed` of ``net`` against ``unpruned``, timed again (up to
    :data:`RETIMES` times) while the unpruned network runs more than :data:`STEADY` times slower than
    its fastest time in the tries before (``reference_ms``; None on the first try): the measurement
    whose unpruned run was fastest, with ``retimed``, how many more timings were made."""
    speed = deployed_speed(unpruned, net, example, runtime, repeats=repeats)
    retimed = 0
    while "error" not in speed and reference_ms is not None and retimed < RETIMES and \
            speed["unpruned_ms"] > STEADY * reference_ms:
        again = deployed_speed(unpruned, net, example, runtime, repeats=repeats)
        retimed += 1
        if "error" in again:
            break
        speed = min(speed, again, key=lambda s: s["unpruned_ms"])
    return {**speed, "retimed": retimed}


#: Where the projection refuses a fraction (too few channels left to drop), the halfway points (in
#: log scale) towards the last fraction projected tried before the search stops.
HALVINGS = 4


def _project_towards(project, current: list[Budget], fractions: dict[str, float], log):
    """``(budgets, project(budgets))`` with the timed budgets moved to ``fractions``; where the
    projection refuses them (:class:`BudgetError`: the network cannot get that small), the geometric
    means towards the ``current`` fractions, up to :data:`HALVINGS` times. None where all are refused."""
    for _ in range(HALVINGS + 1):
        trial = [Budget(b.metric, fractions[b.metric]) if b.metric in fractions else b for b in current]
        try:
            return trial, project(trial)
        except BudgetError as exc:
            log(f"the measured latency budget cannot be tightened to "
                f"{', '.join(f'{m}={f:.4g}' for m, f in fractions.items())} ({exc}); trying halfway")
        fractions = {b.metric: math.sqrt(fractions[b.metric] * b.fraction) for b in current if b.metric in fractions}
    return None


def _over_budget_warning(record: dict, budgets: list[Budget], stopped: str) -> str:
    """The one-line warning of a runtime latency budget that no projection measured within: what the
    network kept measured, why the search stopped, and a budget a new run can expect to meet (the
    ratio measured, over the share of the budget the search aims at: a network timed again measures
    a few percent apart)."""
    kept = record["tries"][record["kept_try"]]["measured"]
    parts = [f"{m} at {v['ratio']:.3g} of the unpruned network's time ({v['ratio'] / v['fraction']:.2f} of the "
             f"budget {v['fraction']:g})" for m, v in kept.items()]
    ask = ",".join(f"{b.metric}={math.ceil(kept[b.metric]['ratio'] / AIM * 100) / 100:g}" if b.metric in kept
                   else f"{b.metric}={b.fraction:g}" for b in budgets)
    return (f"warning: the measured latency stays over its budget ({stopped}): the fastest network timed ran "
            f"{'; '.join(parts)}, and it is kept. Where narrower networks measured no faster, what pruning channels "
            "does not shrink (the ops between and around the layers: concatenations, channel shuffles, layout "
            f"conversions, the runtime's own overhead) takes more than the budget leaves; --budget {ask} can be met")


def _next_fraction(metric: str, tries: list[dict], target: float, limit: float) -> float:
    """The fraction to project ``metric`` to next so that its measured ratio reaches ``target``
    (never above the user's ``limit``).

    Where the tries bracket the target (the largest fraction measured under it, and the smallest
    above that one measured over it): false position between those two, kept a tenth of the bracket
    inside it, so each try narrows the bracket and never repeats one. A network's latency is
    not monotone in its widths (unaligned channel counts run slower kernels), so the bracket is
    taken by fraction, not by the ratios nearest the target: with ratios nearest the target a
    narrower network that measured slower sent the search back to a fraction already tried.
    Without a bracket: the secant through the last two tries where latency grows with the budget,
    else the last one scaled by the measured excess."""
    points = [(t["projected_to"][metric], t["measured"][metric]["ratio"]) for t in tries if metric in t["measured"]]
    under = [p for p in points if p[1] <= target]
    low = max(under) if under else None  # the widest network measured under the target
    # the narrowest measured over it, wider than that (a narrower one that measured slower brackets nothing)
    high = min((p for p in points if p[1] > target and (low is None or p[0] > low[0])), default=None)
    if low is not None and high is not None:
        (f0, r0), (f1, r1) = low, high  # r0 <= target < r1
        guess = f0 + (target - r0) * (f1 - f0) / (r1 - r0)
        margin = 0.1 * (f1 - f0)
        return min(max(guess, f0 + margin), f1 - margin, limit)
    f1, r1 = points[-1]
    guess = f1 * target / r1
    if len(points) >= 2:
        f0, r0 = points[-2]
        if f0 != f1 and r0 != r1 and (r0 - r1) / (f0 - f1) > 0:  # latency grows with the budget
            guess = f1 + (target - r1) * (f0 - f1) / (r0 - r1)
    return min(max(guess, 0.05 * f1), limit)
