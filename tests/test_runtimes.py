"""Running a network in eager PyTorch, TorchScript and onnxruntime (budgetprune.runtimes)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import budgetprune
from budgetprune.errors import ConfigError
from budgetprune.quiet import Quiet
from budgetprune.runtimes import RUNTIMES, check_runtime, deployed_speed, median_ms, paired_times, runner

from test_compaction import attach_random, make_model


def _tensor(out) -> torch.Tensor:
    out = out[0] if isinstance(out, (list, tuple)) else out
    return torch.from_numpy(out) if isinstance(out, np.ndarray) else out


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_each_runtime_computes_the_compacted_network(runtime):
    model, graph = make_model("resnet20")
    bar = attach_random(model, graph, seed=2)
    masks = bar.keep_masks()
    bar.freeze(masks, None)
    net = budgetprune.compact(model, graph, masks, {g: v * masks[g].float() for g, v in bar.gate_values().items()})
    x = torch.randn(3, 1, 28, 28)
    run = runner(net, x, runtime)
    with torch.no_grad():
        assert torch.allclose(_tensor(run()), net(x), atol=1e-4)
    assert median_ms(run, repeats=3, warmup=1) > 0


def test_unknown_runtime_is_one_line():
    with pytest.raises(ConfigError, match="unknown runtime 'tensorrt': choose one of eager, torchscript, onnxruntime"):
        check_runtime("tensorrt")


def test_paired_times_run_the_two_by_turns_for_the_pairs_or_the_seconds_asked():
    calls = []
    first, second = (lambda: calls.append("a")), (lambda: calls.append("b"))
    a, b = paired_times(first, second, repeats=6, min_seconds=0.0, warmup=1)
    assert len(a) == len(b) == 6
    # warm-up pair, the pair that sizes the run, then ABBA: neither always runs first
    assert "".join(calls) == "ab" + "ab" + "ab" + "ba" * 1 + "ab" + "ba" + "ab" + "ba"
    slow = lambda: time.sleep(0.002)  # noqa: E731
    a, _ = paired_times(slow, slow, repeats=3, min_seconds=0.1, warmup=0)
    assert 15 <= len(a) <= 30  # ~0.1 s of 4 ms pairs, not 3


def test_deployed_speed_ratio_is_the_median_of_paired_ratios(monkeypatch):
    """A machine that slows down halfway: each pair still measures the pruned network at half the
    unpruned one's time, while the medians of each alone mix the two speeds."""
    from budgetprune import runtimes

    slow = iter([1.0] * 20 + [3.0] * 30)
    def fake(first, second, repeats, min_seconds, device=None):
        factors = [next(slow) for _ in range(repeats)]
        return [0.010 * f for f in factors], [0.005 * f * (1.3 if i == 0 else 1) for i, f in enumerate(factors)]
    monkeypatch.setattr(runtimes, "paired_times", fake)
    model, _ = make_model("resnet20")
    # the machine itself is not watched (budget 0): a busy moment would time the stand-in pairs again
    speed = deployed_speed(model, model, torch.randn(1, 1, 28, 28), "eager", repeats=50, quiet=Quiet(budget=0))
    assert speed["ratio"] == pytest.approx(0.5) and speed["speedup"] == pytest.approx(2.0)
    assert speed["unpruned_ms"] == pytest.approx(30.0) and speed["pairs"] == 50
