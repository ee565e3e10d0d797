"""``benchmarks/padding_share.py``: each padding's projection, its fullness and the share of the
budget it leaves to the channels the method chose, as finalize's own rule counts them."""

from __future__ import annotations

import json

import pytest

from benchmark_scripts import benchmark_module


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("padding_share") as module:
        yield module


def test_resnet20_rows_and_page(bench, tmp_path):
    """ResNet-20 at 4× fewer FLOPs: one row per padding of the auto ladder and one for multiples of
    16; exact widths keep nearly all the chosen channels' share and end on the budget, every padded
    projection ends within it and leaves less; the page marks the paddings under PADDING_KEEPS."""
    assert bench.main(["--models", "resnet20", "--budgets", "4", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "padding_share.json").read_text())
    rows = {r["rung"]: r for r in record["rows"]}
    assert list(rows) == ["1", "2", "3", "4", "16"] and rows["4"]["padding"] == "exact widths"
    assert rows["4"]["chosen_share"] >= 0.95 and 0.95 <= rows["4"]["fullness"] <= 1.0
    for rung in ("1", "2", "3", "16"):
        assert rows[rung]["fullness"] <= 1.0 and rows[rung]["chosen_share"] < rows["4"]["chosen_share"]
    page = (tmp_path / "padding_share.md").read_text()
    under = [r for r in record["rows"] if r["chosen_share"] < record["keeps"] and r["padding"] != "exact widths"]
    assert page.count("**(under)**") == len(under) and record["command"] in page
