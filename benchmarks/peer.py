"""What the Torch-Pruning comparisons share (peer_torch_pruning.py: torchvision models, FLOPs only;
peer_accuracy.py: trained networks, accuracy at equal FLOPs): how a Torch-Pruning pruner is built,
the FLOP counters (``torch.utils.flop_counter``'s, budgetprune's ``resource_report``), and the
versions a result was made with.

Torch-Pruning (github.com/VainF/Torch-Pruning, PyPI ``torch-pruning``) is the optional ``bench``
extra, pinned: ``pip install -c constraints.txt ".[bench]"`` (torch-pruning 1.6.1, torch stays 2.13).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from budgetprune.errors import first_line
from budgetprune.graph import ChannelGraph
from budgetprune.resources import resource_report

LAYERS = (nn.Conv2d, nn.Linear)


def outputs(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, LAYERS)]


def base_pruner(tp, model: nn.Module, x: torch.Tensor, importance, ratio: float, steps: int = 1,
                global_pruning: bool = False, **options):
    """Torch-Pruning's ``BasePruner`` (``MagnitudePruner``/``MetaPruner`` are its deprecated aliases)
    removing ``ratio`` of the channels over ``steps`` iterative steps, the final classifier layer
    ignored (never pruned); ``options`` go to the pruner (``num_heads``, ``out_channel_groups``, ...)."""
    return tp.pruner.BasePruner(model, x, importance=importance, pruning_ratio=ratio, iterative_steps=steps,
                                global_pruning=global_pruning, ignored_layers=[layers(model)[-1]], **options)


def bp_count(model, x) -> dict | str:
    """budgetprune's counter (conv/linear MACs, params): a dict, or the one-line error."""
    try:
        report = resource_report(ChannelGraph.build(model, x), metrics=("flops", "params"))
        return {"flops": report["flops"], "params": report["params"]}
    except Exception as exc:  # noqa: BLE001 - a model budgetprune cannot trace
        return f"{type(exc).__name__}: {first_line(exc, 160)}"


def aten_macs(model, x) -> float | str:
    """Multiply-accumulates per input of the conv/matmul operators torch runs (``torch.utils.flop_counter``),
    whatever calls them: functional ``F.linear`` and attention included. Counted on a copy in train
    mode, where ``nn.MultiheadAttention`` takes its decomposed path (the eval fast path is not counted)."""
    try:
        clone = copy.deepcopy(model).train()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            clone(x)
        return counter.get_total_flops() / 2 / x.shape[0]
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {first_line(exc, 160)}"


def budgetprune_state() -> str:
    """budgetprune's version and commit, and whether its sources differed from the commit (its counter ran)."""
    import budgetprune
    from common import source_state
    state = source_state()
    if state is None:
        return f"{getattr(budgetprune, '__version__', '?')} (no git)"
    head, dirty = state
    tail = f", with uncommitted changes in {', '.join(dirty)}" if dirty else ""
    return f"{getattr(budgetprune, '__version__', '?')} at {head}{tail}"


def version(dist: str) -> str | None:
    """The installed version of distribution ``dist`` (None if it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version as installed
    try:
        return installed(dist)
    except PackageNotFoundError:
        return None
