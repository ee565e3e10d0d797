"""benchmarks/stats.py: mean ± std over seeds and the two-standard-error tie, against hand-worked values."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import stats  # noqa: E402


def test_mean_and_sample_standard_deviation_by_hand():
    # mean 2; squared deviations 1, 0, 1 → s² = 2/(3−1) = 1
    assert stats.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert stats.standard_error([1.0, 2.0, 3.0]) == pytest.approx(1 / math.sqrt(3))
    assert stats.mean_std([5.0]) == (5.0, 0.0) and stats.standard_error([5.0]) == 0.0
    with pytest.raises(ValueError):
        stats.mean_std([])


def test_tie_is_under_two_standard_errors_of_the_difference():
    a = [1.0, 2.0, 3.0]                      # se = 1/√3 each → bound 2·sqrt(2/3) ≈ 1.633
    assert stats.tie(a, [v + 1.6 for v in a])
    assert not stats.tie(a, [v + 1.7 for v in a])
    assert stats.tie(a, a)
    assert not stats.tie([1.0], [1.0 + 1e-9])  # one value: no spread, any gap counts


def test_format():
    assert stats.format_mean_std([90.0, 90.3, 90.06]) == "90.12 ± 0.16"
    assert stats.format_mean_std([1.0, 2.0, 3.0], digits=1) == "2.0 ± 1.0"
    assert stats.format_mean_std([90.123]) == "90.12 (n = 1)"  # one value has no spread: no "± 0.00"
    assert stats.format_mean_std([80.0, 80.0]) == "80.00 ± 0.00"
