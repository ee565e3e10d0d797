"""Mean ± standard deviation over seeds, and when two such means tie, for the benchmark pages.

A difference between two means counts only when it exceeds two standard errors of the difference:
|mean_a − mean_b| ≥ 2·sqrt(se_a² + se_b²), with se = s/√n and s the sample standard deviation
(n − 1 in the denominator; Welch's unpooled standard error of a difference of two means). Under it
the two are a tie. With one value there is no spread to estimate: its s and se are 0."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of ``values`` (n − 1 in the denominator; 0 for one value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def standard_error(values: Sequence[float]) -> float:
    """The standard error of the mean of ``values``: s/√n (0 for one value)."""
    return mean_std(values)[1] / math.sqrt(len(values))


def tie(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether the means of ``a`` and ``b`` differ by less than two standard errors of their
    difference: |mean_a − mean_b| < 2·sqrt(se_a² + se_b²)."""
    gap = abs(mean_std(a)[0] - mean_std(b)[0])
    return gap < 2 * math.sqrt(standard_error(a) ** 2 + standard_error(b) ** 2)


def format_mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``values`` as "mean ± std", e.g. "90.12 ± 0.30"; one value alone as "90.12 (n = 1)" (it has no
    spread to show)."""
    mean, std = mean_std(values)
    if len(values) == 1:
        return f"{mean:.{digits}f} (n = 1)"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
