"""Running a network in eager PyTorch, TorchScript and onnxruntime (budgetprune.runtimes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import budgetprune
from budgetprune.errors import ConfigError
from budgetprune.runtimes import RUNTIMES, check_runtime, median_ms, runner

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
