"""benchmarks/pruner_overhead.py: a small run records the allocator it ran under and, with
``--profile``, which operators the pruner added; the operator accounting against steps whose
operators are known."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmark_scripts import BENCHMARKS, benchmark_module

SCRIPT = BENCHMARKS / "pruner_overhead.py"


@pytest.fixture(scope="module")
def overhead():
    with benchmark_module("pruner_overhead") as module:
        yield module


def test_added_operations_names_what_the_second_step_adds(overhead):
    x = torch.randn(64, 64)
    plain = lambda: x * 2  # noqa: E731
    more = lambda: (x * 2, torch.cumsum(x, 0), torch.cumsum(x, 1))  # noqa: E731
    added = overhead.added_operations(plain, more, steps=3)
    rows = {r["op"]: r for r in added["top"]}
    assert rows["aten::cumsum"]["plain_calls"] == 0 and rows["aten::cumsum"]["pruned_calls"] == 2
    assert rows["aten::cumsum"]["added_ms"] > 0
    assert added["steps"] == 3 and added["pruned_calls"] >= added["plain_calls"] + 2
    # sorted by the time added, largest first
    assert [r["added_ms"] for r in added["top"]] == sorted((r["added_ms"] for r in added["top"]), reverse=True)


def test_a_small_run_records_its_allocator_and_profile(tmp_path):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4294967296")
    env.pop("LD_PRELOAD", None)
    run = subprocess.run([sys.executable, str(SCRIPT), "--model", "resnet20", "--size", "32", "--batch", "4",
                          "--rounds", "1", "--steps", "1", "--warmup", "1", "--profile", "1", "--plain-product", "--relu-inplace",
                          "--constant-gates", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    record = json.loads((tmp_path / "pruner_overhead.json").read_text())
    assert record["allocator"] == "`MALLOC_MMAP_THRESHOLD_=4294967296`"  # the user's setting, left alone
    assert record["command"].startswith("MALLOC_MMAP_THRESHOLD_=4294967296 python benchmarks/pruner_overhead.py")
    (row,) = record["rows"]
    assert row["ratio"] > 0 and row["groups"] > 0 and row["cpu_buffers_kept"] is False
    # with in-place ReLUs the in-place products keep fewer maps for backward than autograd's products,
    # which keep more than no gates
    kept = row["forward_mib"]
    assert row["in_place_products"] > 0 and kept["plain"] < kept["pruned"] < kept["plain_product"]
    assert row["plain_product_ratio"] > 0
    ops = {r["op"]: r for r in row["profile"]["top"]}
    assert row["profile"]["pruned_calls"] > row["profile"]["plain_calls"]
    assert any(r["plain_calls"] == 0 and r["pruned_calls"] > 0 for r in ops.values()), ops  # the hooks' own operators
    page = (tmp_path / "pruner_overhead.md").read_text()
    assert "`MALLOC_MMAP_THRESHOLD_=4294967296`" in page and "### Where `bar` adds time" in page
    assert "plain product: step (s), ratio, kept (MiB)" in page and "(`--relu-inplace`)" in page
    assert row["constant_gates_ratio"] > 0 and "constant gates: step (s), ratio" in page


def test_constant_gates_multiply_every_gated_output_and_train(overhead):
    """The products-alone loop: one fixed per-example gate per output group, multiplied in at the
    group's gate site (the output equals the hand-gated network's), each receiving a gradient."""
    import copy

    import budgetprune
    torch.manual_seed(0)
    model = budgetprune.create_model("resnet20")
    x = torch.randn(4, 1, 28, 28)
    pruner = budgetprune.Pruner(copy.deepcopy(model), x, "flops=0.5", total_steps=1)
    gated = copy.deepcopy(model)
    gates = overhead.constant_gates(gated, pruner, batch=4)
    outputs = [g for g in pruner.graph.groups.values() if g.position == "output"]
    assert len(gates) == len(outputs) > 0 and all(z.shape == (4, g.channels) for z, g in zip(gates, outputs))
    out = gated(x)
    assert not torch.allclose(out, model(x))
    with torch.no_grad():
        for z in gates:
            z.fill_(1.0)
    torch.testing.assert_close(gated(x), model(x))  # gates of 1: the plain network
    with torch.no_grad():
        for z in gates:
            z.uniform_()
    gated(x).square().sum().backward()
    assert all(z.grad is not None and float(z.grad.abs().sum()) > 0 for z in gates)


def test_the_page_names_the_allocator_the_run_had(overhead):
    assert "kept for reuse" in overhead.allocation({}, kept=True)
    assert "glibc's defaults" in overhead.allocation({}, kept=False)
    assert overhead.allocation({"LD_PRELOAD": "libtcmalloc.so"}, kept=False) == "`LD_PRELOAD=libtcmalloc.so`"


def test_forward_memory_is_what_the_pass_leaves_allocated(overhead):
    """A ReLU's output, kept for backward (by the ReLU and by the two linear layers that read it),
    stays; the layers' outputs and the logits, which no backward reads, are freed; the
    cross-entropy keeps its log-softmax."""

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(256, 10, bias=False), torch.nn.Linear(256, 10, bias=False)

        def forward(self, x):
            h = torch.relu(x)
            return self.a(h) + self.b(h)

    x, y = torch.randn(64, 256, requires_grad=True), torch.randint(0, 10, (64,))
    kept = overhead.forward_memory_mib(Twice(), x, y) * 2 ** 20
    floats = 64 * 256 + 64 * 10  # h and the log-softmax
    assert floats * 4 <= kept <= floats * 4 + 256  # and a few scalars (the loss, the total weight)
