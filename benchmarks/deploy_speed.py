"""Deployed speed of pruned networks: unpruned vs pruned (regular and mixed blocks, compacted from
the same masks) in eager PyTorch, TorchScript and onnxruntime (a benchmark, not a test).

For each model and FLOP budget (2× and 4× by default) a ``budgetprune.Pruner`` on random inputs
takes ``--steps`` AdamW steps and finalizes (the final projection meets the budget under mixed blocks,
the library's default). The final keep-masks and gate values of that one run are then compacted
twice with ``budgetprune.compact.compact``: ``mode="mixed"`` (index_select/index_add around
residual sums, only kept maps computed) and ``mode="regular"`` (tensors that are added keep equal
widths: the union of their channels). A second pruner, the same run with
``block="regular", channel_multiple=--multiple``, projects and fills under costs that count
every width padded to a multiple of ``--multiple`` channels (``padded``: onnxruntime's blocked CPU
convolutions need such widths). A third, with the library's default ``block="auto"`` (each
residual space mixed or regular, whichever onnxruntime runs faster by its gather cost) and the
same padding (``auto``); with ``--time-padding BATCH`` its padding is timed as the command line
times it (``time_padding``: multiples of 16 against 8, then the padding kept against exact widths,
in onnxruntime at that batch). Timing does not need accuracy, so the weights are untrained.

Where the masks come from (``--method``): ``magnitude`` (default) is the library's iterative
baseline, every layer's width scaled by one factor and the channels of a layer chosen by weight
magnitude: a pruning spread over every layer, residual streams included, each writer of a
stream keeping its own channels (``streams="apart"``, the method's default), so every residual
sum of the mixed network is a mixed one. ``--streams joint`` gives the ``padded`` and ``auto``
networks the method's other choice (the writers of a stream keep the same channels, so the
stream itself is thinned); the same-mask ``regular`` and ``mixed`` networks keep ``apart``.
``bar`` is BAR (``gate_init=3``) after the same few steps:
on untrained weights and random data its gates have not moved yet, so the projection works on
near-equal scores and removes whole residual branches (and most of a stem) while leaving the
residual streams whole; the mixed and regular networks are then often the same network. A
trained BAR run lies between the two; neither short run reproduces its widths.

Trained networks (``--runs``): finished ``budgetprune prune`` runs with FLOP budgets (the CLI's
defaults: BAR, auto blocks, auto padding) replace the untrained pruning of their model. The run's
teacher (``teacher.pt``, shared by the runs of one model) is the unpruned network; its own
``model.pt``, fine-tuned, is the ``auto`` network (what the user got); the channels it kept
(its pruning plan) are compacted both ways, ``regular`` and ``mixed``, with the teacher's weights
(timing needs the widths, not the fine-tuned weights). No ``padded`` network is built for a run.

Every network (the unpruned model itself, as a user has it, and the pruned ones) is exported
with ``budgetprune.export.to_torchscript`` and ``budgetprune.export.to_onnx`` (default opset),
and timed in three runtimes: eager PyTorch (``torch.no_grad``), the loaded TorchScript file, and
an onnxruntime ``InferenceSession`` (CPU, ``intra_op_num_threads`` = ``--threads``), at batch 1
and 16. Per model, runtime and batch each pruned network is timed by turns with the unpruned
one (``budgetprune.runtimes.paired_times``: one run of each per pair, ABBA order, ``--pairs``
pairs or as many as take ``--pair-seconds``), so a machine that slows down slows both runs of a
pair; its speedup is the inverse of the median of the pairs' time ratios (pruned ÷ unpruned), in
the same runtime and batch. Speedup ÷ FLOP reduction uses each compacted network's own FLOPs
(budgetprune's count at the timed input size).

    python benchmarks/deploy_speed.py                                      # every model, 2x and 4x
    python benchmarks/deploy_speed.py --models resnet20 --budgets 2 --pairs 3   # smoke run, < 1 min
    python benchmarks/deploy_speed.py --models efficientnet_b0,vit_b_16 --runtimes onnxruntime \
        --out benchmarks/results/deploy_speed_families              # other torchvision families
    python benchmarks/deploy_speed.py --models resnet20 --runs runs/deploy_resnet20/2x,runs/deploy_resnet20/4x \
        --out benchmarks/results/deploy_speed_trained                # trained BAR runs of resnet20

``--profile RUNS`` adds onnxruntime's own profile of every network, by op type (1 thread, the
largest batch): where the time of the unpruned and the default pruned network goes, and which
op types speed up less than the FLOPs fall (layout conversions, concatenations, channel shuffles).

Writes ``benchmarks/results/deploy_speed.{json,md,png}``; the exported files stay in ``--work``
(default ``runs/deploy_speed``) for inspection, and the JSON counts the ONNX op types of each.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (HERE, RESULTS, Parser, cpu_name, name_list, number_list, padding_label, pruning_steps,  # noqa: E402
                    write_results)
from budgetprune.quiet import Quiet  # noqa: E402
from torchvision_models import FAMILIES, SIZE_AT_LEAST, import_torchvision, make  # noqa: E402

import budgetprune  # noqa: E402
from budgetprune import Pruner  # noqa: E402
from budgetprune.cli import channel_multiple_arg  # noqa: E402
from budgetprune.pruner import check_channel_multiple  # noqa: E402
from budgetprune.blocks import GATHER_COST, gathered_positions  # noqa: E402
from budgetprune.compact import compact  # noqa: E402
from budgetprune.liveness import slot_sets  # noqa: E402
from budgetprune.errors import CheckpointError  # noqa: E402
from budgetprune.export import to_onnx, to_torchscript  # noqa: E402
from budgetprune.graph import ChannelGraph  # noqa: E402
from budgetprune.io import load_file  # noqa: E402
from budgetprune.plan import kept_masks  # noqa: E402
from budgetprune.resources import resource_report  # noqa: E402
from budgetprune.runtimes import onnxruntime_session, paired_times  # noqa: E402

#: Torchvision classification models (untrained, 10 classes, 3 × size × size) ...
TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large"]
#: ... any other torchvision family on request (``--models``), as ``torchvision_models.py`` builds it.
MORE_TORCHVISION = [name for name in FAMILIES if name not in TORCHVISION]
#: ... and budgetprune's own registry models, with the input of the data they are built for
#: (resnet20's defaults: 1 channel, 28 × 28, Fashion-MNIST).
REGISTRY = {"resnet20": (1, 28, 28)}
MODELS = ["resnet20", *TORCHVISION]  # the default run
KNOWN_MODELS = [*MODELS, *MORE_TORCHVISION]
RUNTIMES = ["eager", "torchscript", "onnxruntime"]
BLOCKS = ["regular", "mixed"]
#: The pruned networks per budget: both blocks compacted from the same masks, the regular block
#: with widths padded to a multiple, and auto blocks (weighed for onnxruntime) with the same
#: padding (each its own projection, counted with the padding).
NETWORKS = BLOCKS + ["padded", "auto"]
#: The networks of a trained run (``--runs``): its kept channels both ways, and the run's own result.
RUN_NETWORKS = BLOCKS + ["auto"]
#: What a finished run folder holds that the benchmark reads.
RUN_FILES = ("config.json", "metrics.json", "teacher.pt", "model.pt")
METHOD_NOTE = {"magnitude": ": every layer's width scaled by one factor, channels by weight magnitude, each writer "
                             "of a residual stream its own (`streams=\"apart\"`), so every residual stream is pruned "
                             "and every residual sum of the mixed network is mixed",
               "bar": ", `gate_init=3`: gates barely trained, the projection removes whole branches and "
                      "leaves residual streams whole"}
TARGET = 0.7  # issue 14: speedup ≥ 0.7 × FLOP reduction at batch 16 in onnxruntime


def padding_words(multiple) -> str:
    return check_channel_multiple(multiple).describe()


def arguments(argv) -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=lambda t: name_list(t, KNOWN_MODELS, "model(s)"), default=MODELS,
                   help=f"comma-separated (default {','.join(MODELS)}), from {','.join(KNOWN_MODELS)}")
    p.add_argument("--budgets", type=lambda t: number_list(float, t, "FLOP reduction factors", 1.0), default=[2.0, 4.0],
                   help="FLOP reduction factors (2 means flops=0.5)")
    p.add_argument("--runtimes", type=lambda t: name_list(t, RUNTIMES, "runtime(s)"), default=RUNTIMES)
    p.add_argument("--batches", type=lambda t: number_list(int, t, "batch sizes", 0), default=[1, 16])
    p.add_argument("--pairs", type=int, default=7,
                   help="paired runs (unpruned, pruned) per pruned network at least (median of their ratios)")
    p.add_argument("--pair-seconds", type=float, default=1.0,
                   help="more pairs while a network's pairs take less than this many seconds")
    p.add_argument("--quiet-busy", type=float, default=0.15,
                   help="measure while other processes use at most this share of all CPUs (see Quiet)")
    p.add_argument("--quiet-budget-min", type=float, default=12.0,
                   help="minutes the whole run may wait for a quiet machine (0: never wait)")
    p.add_argument("--size", type=int, default=224, help="pixels of the torchvision models' inputs")
    p.add_argument("--method", choices=["magnitude", "bar"], default="magnitude",
                   help="the pruning method that makes the masks (see the module docstring)")
    p.add_argument("--steps", type=int, default=4, help="AdamW steps of the pruner before finalize")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    p.add_argument("--multiple", type=channel_multiple_arg, default="auto",
                   help="channel multiple of the padded networks (onnxruntime's blocked CPU convolutions: 16 with "
                        "AVX-512, 8 with AVX2), or auto: the library's default (multiples of 8 in feature maps "
                        "and token tensors, loosened where that cannot end on the budget)")
    p.add_argument("--time-padding", type=int, default=0, metavar="BATCH",
                   help="prune the auto network as the command line does: with --multiple auto its padding is timed "
                        "in onnxruntime at this batch (multiples of 16 against 8, then against exact widths) and "
                        "kept where it runs faster (0: not timed, the Python API's default)")
    p.add_argument("--streams", choices=("apart", "joint"), default="apart",
                   help="the iterative methods' streams= option for the padded and auto networks (apart, the "
                        "default: each writer of a residual stream keeps its own channels; joint: the same ones); "
                        "the same-mask regular and mixed networks keep apart")
    p.add_argument("--volume", type=float, default=0.0, metavar="FACTOR",
                   help="also budget the activation volume at 1/FACTOR beside every FLOP budget (0: FLOPs alone); "
                        "for networks whose time follows the feature maps they move")
    p.add_argument("--profile", type=int, default=0, metavar="RUNS",
                   help="also profile every ONNX network by op type in onnxruntime (1 thread, the largest batch, "
                        "RUNS runs; 0: no profile): where each network's time goes")
    p.add_argument("--runs", type=run_list, default={},
                   help="comma-separated folders of finished `budgetprune prune` runs (FLOP budgets, one teacher per "
                        "model): their trained networks replace the untrained pruning of their model")
    p.add_argument("--work", default=str(HERE.parent / "runs" / "deploy_speed"), help="exported files go here")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.profile < 0:
        p.error(f"--profile must be 0 or more runs, not {args.profile}")
    if args.time_padding < 0:
        p.error(f"--time-padding must be 0 (not timed) or a batch of 1 or more, not {args.time_padding}")
    for flag in ("pairs", "size", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1, not {getattr(args, flag)}")
    if args.steps < 0:
        p.error(f"--steps must be 0 or more, not {args.steps}")
    if args.volume != 0 and not args.volume >= 1:
        p.error(f"--volume must be 0 (FLOPs alone) or a reduction factor of 1 or more, not {args.volume}")
    if not 0 < args.quiet_busy <= 1 or args.quiet_budget_min < 0:
        p.error("--quiet-busy must be in (0, 1] and --quiet-budget-min 0 or more")
    if args.pair_seconds < 0:
        p.error(f"--pair-seconds must be 0 or more, not {args.pair_seconds:g}")
    for name in args.runs:
        if name not in args.models:
            p.error(f"--runs has runs of {name}: add it to --models")
    for name in args.models:
        if name not in REGISTRY and args.size < SIZE_AT_LEAST.get(name, 32):
            p.error(f"--size {args.size} is too small for {name} ({SIZE_AT_LEAST.get(name, 32)} or more)")
    return args


def run_list(text: str) -> dict[str, list[Path]]:
    """``--runs``: the finished run folders of ``text``, by the registry model they pruned."""
    runs: dict[str, list[Path]] = {}
    fractions: dict[str, list[tuple[Path, float]]] = {}  # per model, each run's budget
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        folder = Path(item)
        missing = [f for f in RUN_FILES if not (folder / f).is_file()]
        if missing:
            raise argparse.ArgumentTypeError(f"{folder} is not a finished budgetprune run (no {', '.join(missing)}); "
                                             "pass the --out folder of a `budgetprune prune` run that completed")
        try:
            config = json.loads((folder / "config.json").read_text())
            metrics = json.loads((folder / "metrics.json").read_text())
            name, metric, fraction = config["model"], metrics["metric"], float(metrics["budget_fraction"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise argparse.ArgumentTypeError(f"{folder}: unreadable run record ({type(exc).__name__}: {exc})") from None
        if name not in REGISTRY:
            raise argparse.ArgumentTypeError(f"{folder} pruned {name!r}; runs of {', '.join(REGISTRY)} only")
        if metric != "flops":
            raise argparse.ArgumentTypeError(f"{folder} has a {metric} budget; the benchmark compares FLOP budgets "
                                             "(run it with --metric flops)")
        same = [f for f, other in fractions.get(name, []) if other == fraction]
        if same:
            raise argparse.ArgumentTypeError(f"{folder} and {same[0]} both pruned {name} to {1 / fraction:g}x FLOPs; "
                                             "pass one run per budget")
        fractions.setdefault(name, []).append((folder, fraction))
        runs.setdefault(name, []).append(folder)
    if not runs:
        raise argparse.ArgumentTypeError(f"expected run folders, not {text!r}")
    return runs


# --------------------------------------------------------------------------------------------- pruning


def build(name: str, size: int, models_module):
    """(unpruned model, input shape without the batch) of ``name``."""
    if name in REGISTRY:
        shape = REGISTRY[name]
        return budgetprune.create_model(name, in_channels=shape[0], num_classes=10, input_size=shape[1:]), shape
    return make(models_module, name, size), (3, size, size)


def pruned(unpruned: torch.nn.Module, shape: tuple, factor: float, method: str, steps: int, block: str,
           multiple: int = 1, runtime: str = "onnxruntime", timed_batch: int = 0, streams: str = "apart",
           volume: float = 0.0):
    """(model, pruner, compacted network, report) of one pruning of a copy of ``unpruned`` to
    1/``factor`` of its FLOPs, its costs counted with ``block`` (widths padded to ``multiple``);
    ``timed_batch`` > 0: the auto padding timed in ``runtime`` at that batch, as the command line does
    (``time_padding``); ``streams``: the iterative methods' option (``"apart"``: each writer of a
    residual stream keeps its own channels); ``volume`` > 0: a second budget, 1/``volume`` of the
    activation volume, beside the FLOPs."""
    torch.manual_seed(0)
    model = copy.deepcopy(unpruned).train()
    x, y = torch.randn(2, *shape), torch.randint(0, 10, (2,))
    options = {"gate_init": 3.0} if method == "bar" else {"method_options": {"streams": streams}}
    budget = f"flops={1.0 / factor!r}" + (f",volume={1.0 / volume!r}" if volume else "")
    pruner = Pruner(model, x, budget, total_steps=max(steps, 1), method=method,
                    block=block, channel_multiple=multiple, deploy_runtime=runtime, log=lambda line: None,
                    time_padding=timed_batch > 0, deploy_batch=max(timed_batch, 1), **options)
    # AdamW as in the README's loop: its steps are bounded (SGD at lr 1e-3 sends untrained resnet50's outputs to NaN)
    optimizer = torch.optim.AdamW(pruner.parameters(lr=1e-3), lr=1e-3)
    pruning_steps(model, pruner, optimizer, x, y, steps)
    small, report = pruner.finalize(x)
    return model, pruner, small, report


def prune(unpruned: torch.nn.Module, shape: tuple, factor: float, method: str, steps: int, multiple: int,
          timed_batch: int = 0, streams: str = "apart", volume: float = 0.0) -> dict:
    """Prune a copy of ``unpruned`` to 1/``factor`` of its FLOPs; compact the same masks in both
    blocks; prune another copy the same way with regular blocks padded to ``multiple`` channels, and
    one with the default blocks (its padding timed at ``timed_batch``, where > 0); those two with
    the iterative methods' ``streams``. ``volume`` > 0: every pruning has a volume budget too."""
    # each writer of a residual stream its own channels, so that every sum of the mixed network gathers
    model, pruner, small, report = pruned(unpruned, shape, factor, method, steps, "mixed", volume=volume)
    x = pruner.example
    # The final masks are the plan's; the gate values finalize folded are the frozen gates'.
    graph = pruner.graph
    masks = kept_masks(report["plan"], {gid: g.channels for gid, g in graph.groups.items()})
    values = pruner.method.by_group(lambda gate: gate.frozen)
    nets = {mode: compact(model, graph, masks, values, mode=mode).eval() for mode in BLOCKS}
    with torch.no_grad():
        reference = small(x)
        scale = float(reference.abs().max()) or 1.0
        check = {"mixed_vs_finalize": float((nets["mixed"](x) - reference).abs().max()) / scale,
                 "regular_vs_mixed": float((nets["regular"](x) - nets["mixed"](x)).abs().max()) / scale}
    if max(check.values()) > 1e-4:
        raise RuntimeError(f"compacted networks differ from finalize()'s (relative): {check}")
    full, full_volume = pruner.full["flops"], pruner.full["volume"]
    out = {"factor": factor, "nets": nets, "unpruned_flops": full, "relative_output_diff": check,
           "V_over_B": report["pruned"]["flops"] / pruner.budget.absolute(graph),
           "kept_channels": sum(int(m.sum()) for m in masks.values()),
           "channels": sum(int(m.numel()) for m in masks.values())}
    for mode in BLOCKS:
        cost = report["pruned_by_block"][mode]
        out[mode] = {"flops": cost["flops"], "params": cost["params"], "flop_reduction": full / cost["flops"],
                     "volume_reduction": full_volume / cost["volume"]}
    # what the mixed network's sums gather: with the two networks' times, the γ they imply
    out["mixed"]["gathered_positions"] = gathered_positions(graph, slot_sets(graph, masks, "mixed"))
    _, padded_pruner, out["nets"]["padded"], padded = pruned(unpruned, shape, factor, method, steps, "regular",
                                                              multiple, streams=streams, volume=volume)
    cost = padded["pruned"]
    out["padded"] = {"flops": cost["flops"], "params": cost["params"], "flop_reduction": full / cost["flops"],
                     "volume_reduction": full_volume / cost["volume"], "multiple": multiple, "padding": padded_pruner.block.describe_padding(),
                     "V_over_B": cost["flops"] / padded_pruner.budget.absolute(padded_pruner.graph)}
    _, auto_pruner, out["nets"]["auto"], auto = pruned(unpruned, shape, factor, method, steps, "auto", multiple,
                                                        timed_batch=timed_batch, streams=streams, volume=volume)
    cost = auto["pruned"]
    mixed = auto["plan"]["mixed_spaces"]
    out["auto"] = {"flops": cost["flops"], "params": cost["params"], "flop_reduction": full / cost["flops"],
                   "volume_reduction": full_volume / cost["volume"], "multiple": multiple, "padding": auto_pruner.block.describe_padding(),
                   "gather_cost": auto_pruner.block.gather_cost, "mixed_spaces": len(mixed),
                   "V_over_B": cost["flops"] / auto_pruner.budget.absolute(auto_pruner.graph),
                   **{k: auto[k] for k in ("wide_padding_timing", "padding_timing") if k in auto}}
    return out


def timed_padding_lines(r: dict) -> list[str]:
    """``--time-padding``: per model and budget, the padding the `auto` pruner kept and the timings that
    chose it (multiples of 16 against 8, then the padding kept against exact widths)."""
    lines = [f"**The `auto` networks' padding is timed as the command line times it** (`time_padding`, onnxruntime, "
             f"deploy batch {r['settings']['time_padding']}): where multiples of 8 end on the budget, every width "
             "a multiple of 16 is projected too and kept where it runs at least 1.05× faster; the padding kept is "
             "then timed against exact widths. Speedups are of the wider padding over the narrower one.", ""]
    for m in r["models"]:
        for b in m.get("budgets", []):
            auto = b.get("auto", {})
            wide, exact = auto.get("wide_padding_timing"), auto.get("padding_timing")
            parts = ["16 against 8: " + (f"not kept ({wide['error']})" if "error" in wide else
                                        f"{wide['speedup']:.2f}×, " + ("kept" if wide["pays"] else "not kept"))
                     if wide else "16 not tried"]
            if exact:
                parts.append("against exact widths: " + (f"not timed ({exact['error']})" if "error" in exact else
                                                         f"{exact['speedup']:.2f}×, " + ("padding kept" if exact["pays"]
                                                                                       else "exact kept")))
            lines.append(f"- {m['model']} {b['factor']:g}×: {auto.get('padding', '?')}; " + "; ".join(parts))
    return lines + [""]


def flops_of(net: torch.nn.Module, shape: tuple) -> float:
    """budgetprune's FLOP count of ``net`` at one input of ``shape``."""
    graph = ChannelGraph.build(copy.deepcopy(net), torch.zeros(1, *shape))
    return resource_report(graph, metrics=("flops",))["flops"]


def run_teacher(name: str, folders: list[Path]) -> tuple[torch.nn.Module, tuple]:
    """(the unpruned ``name`` with the runs' trained teacher weights, input shape); the runs must share them."""
    first, _, meta = load_file(folders[0] / "teacher.pt")
    state = first.state_dict()
    for folder in folders[1:]:
        other = load_file(folder / "teacher.pt")[0].state_dict()
        if other.keys() != state.keys() or any(not torch.equal(v, state[k]) for k, v in other.items()):
            raise CheckpointError(f"the runs of {name} have different teachers ({folders[0]}, {folder}): prune "
                                  f"the later ones with --teacher {folders[0]}/teacher.pt")
    shape = tuple(meta.get("input_shape") or REGISTRY[name])
    teacher = budgetprune.create_model(name, in_channels=shape[0], num_classes=_classes(state), input_size=shape[1:])
    try:
        teacher.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{folders[0]}/teacher.pt does not fit {name}: {str(exc).splitlines()[0]}") from None
    return teacher.eval(), shape


def _classes(state: dict) -> int:
    """The number of classes of a registry classifier's state dict (its last weight's rows)."""
    return int([v for k, v in state.items() if k.endswith("weight")][-1].shape[0])


def from_run(folder: Path, teacher: torch.nn.Module, shape: tuple) -> dict:
    """A finished run's networks, as :func:`prune` returns them: its kept channels compacted both
    ways with the teacher's weights, and its own (fine-tuned) network as ``auto``."""
    metrics = json.loads((folder / "metrics.json").read_text())
    run_net, plan, _ = load_file(folder / "model.pt", model=teacher)  # the plan replayed on the architecture
    if not isinstance(plan, dict) or plan.get("granularity") != "channel":
        raise CheckpointError(f"{folder}/model.pt holds no channel pruning plan")
    graph = ChannelGraph.build(copy.deepcopy(teacher), torch.zeros(1, *shape), gate_inputs=plan["gate_inputs"])
    masks = kept_masks(plan, {gid: g.channels for gid, g in graph.groups.items()})
    nets = {mode: compact(teacher, graph, masks, mode=mode).eval() for mode in BLOCKS}
    nets["auto"] = run_net.eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        reference = nets["mixed"](x)
        scale = float(reference.abs().max()) or 1.0
        check = {"regular_vs_mixed": float((nets["regular"](x) - reference).abs().max()) / scale}
    if check["regular_vs_mixed"] > 1e-4:
        raise RuntimeError(f"{folder}: the regular and mixed compactions differ (relative): {check}")
    full = flops_of(teacher, shape)
    out = {"factor": 1.0 / metrics["budget_fraction"], "run": str(folder), "networks": RUN_NETWORKS, "nets": nets,
           "unpruned_flops": full, "relative_output_diff": check, "method": metrics.get("method"),
           "test_accuracy": metrics.get("test_accuracy"), "teacher_test_accuracy": metrics.get("unpruned_test_accuracy"),
           "kept_channels": sum(int(m.sum()) for m in masks.values()),
           "channels": sum(int(m.numel()) for m in masks.values())}
    for mode in RUN_NETWORKS:
        flops = flops_of(nets[mode], shape)
        out[mode] = {"flops": flops, "params": sum(p.numel() for p in nets[mode].parameters()),
                     "flop_reduction": full / flops}
    out["mixed"]["gathered_positions"] = gathered_positions(graph, slot_sets(graph, masks, "mixed"))
    out["auto"].update(block=plan.get("block"), mixed_spaces=len(plan.get("mixed_spaces", [])),
                       padding=metrics.get("padding"), pad_tied=metrics.get("pad_tied"))
    out["V_over_B"] = out["auto"]["flops"] / (full * metrics["budget_fraction"])
    return out


# --------------------------------------------------------------------------------------------- runtimes


def export_all(nets: dict, shape: tuple, folder: Path) -> dict:
    """Export every network to TorchScript and ONNX in ``folder``; per network the export records."""
    folder.mkdir(parents=True, exist_ok=True)
    example = torch.randn(1, *shape)
    records = {}
    for key, net in nets.items():
        stem = key.replace("/", "_")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ts = to_torchscript(net, folder / f"{stem}.pt", example)
            ox = to_onnx(net, folder / f"{stem}.onnx", example)
        records[key] = {"torchscript": {k: ts[k] for k in ("method", "max_abs_diff")},
                        "onnx": {k: ox[k] for k in ("exporter", "opset", "max_abs_diff")},
                        "onnx_ops": onnx_ops(folder / f"{stem}.onnx"),
                        "onnx_bytes": (folder / f"{stem}.onnx").stat().st_size}
    return records


def onnx_ops(path: Path) -> dict:
    import onnx

    proto = onnx.load(str(path))
    return dict(sorted(Counter(node.op_type for node in proto.graph.node).items()))


def runners(runtime: str, nets: dict, folder: Path, x: torch.Tensor, threads: int) -> dict:
    """Per network a no-argument callable that runs it once on ``x`` in ``runtime``."""
    if runtime == "eager":
        return {key: (lambda net=net: net(x)) for key, net in nets.items()}
    if runtime == "torchscript":
        loaded = {key: torch.jit.load(str(folder / f"{key.replace('/', '_')}.pt"), map_location="cpu").eval()
                  for key in nets}
        return {key: (lambda m=m: m(x)) for key, m in loaded.items()}
    feed = x.numpy()
    out = {}
    for key in nets:
        session = onnxruntime_session(str(folder / f"{key.replace('/', '_')}.onnx"), threads)
        inputs = {session.get_inputs()[0].name: feed}
        out[key] = lambda s=session, i=inputs: s.run(None, i)
    return out


def op_profile(path: Path, x: torch.Tensor, runs: int) -> dict[str, float]:
    """Milliseconds per run by ONNX op type of the file at ``path`` on ``x`` (onnxruntime's
    profiler, one thread, the kernels' own times summed; layout conversions of the blocked
    convolutions show as ``ReorderInput`` / ``ReorderOutput``)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 1, 1, 3
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    for _ in range(runs + 3):  # 3 warm-up runs, left out below
        session.run(None, feed)
    trace = Path(session.end_profiling())
    try:
        events = json.loads(trace.read_text())
    finally:
        trace.unlink(missing_ok=True)
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")  # one per run
    if len(starts) != runs + 3:
        raise RuntimeError(f"onnxruntime's profile of {path.name} has {len(starts)} runs, not {runs + 3}")
    by_op: Counter = Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= starts[3]:
            by_op[e["args"]["op_name"]] += e["dur"]  # µs
    return {op: us / runs / 1e3 for op, us in by_op.most_common()}


def paired(fns: dict, pairs: int, seconds: float, quiet: Quiet, bar) -> dict:
    """Per pruned network (every key of ``fns`` after the first, the unpruned one): its runs and
    the unpruned network's, by turns (:func:`budgetprune.runtimes.paired_times`), after the
    machine is quiet (and again, up to twice, if it was not meanwhile)."""
    names = list(fns)
    base = names[0]
    for fn in fns.values():  # warm-up: TorchScript's profiling executor optimizes on the first calls
        for _ in range(3):
            fn()
    out = {}
    for name in names[1:]:
        (a, b), share, _ = quiet.run(lambda: paired_times(fns[base], fns[name], repeats=pairs, min_seconds=seconds,
                                                          warmup=1))
        ratios = [y / x for x, y in zip(a, b)]
        out[name] = {"unpruned_ms": [1e3 * t for t in a], "ms": [1e3 * t for t in b],
                     "ratio": statistics.median(ratios),
                     "ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3,
                     "others_cpu_share": share}
        bar.update(1)
    return out


# --------------------------------------------------------------------------------------------- the run


def measure_model(name: str, args, models_module, quiet: Quiet, bar) -> dict:
    torch.manual_seed(0)
    trained = args.runs.get(name)  # finished runs of this model, else None: pruned here
    unpruned, shape = run_teacher(name, trained) if trained else build(name, args.size, models_module)
    unpruned.eval()
    nets = {"unpruned": unpruned}
    budgets = []
    seconds = {"prune": time.perf_counter()}
    for source in trained or args.budgets:
        bar.set_description(f"{name}: " + (f"run {source}" if trained else f"prune {source:g}x"))
        p = from_run(source, unpruned, shape) if trained else prune(unpruned, shape, source, args.method, args.steps,
                                                                   args.multiple, args.time_padding, args.streams,
                                                                   args.volume)
        for mode in p.get("networks", NETWORKS):
            nets[f"{p['factor']:g}x/{mode}"] = p["nets"][mode]
        budgets.append({k: v for k, v in p.items() if k != "nets"})
    bar.set_description(f"{name}: export")
    folder = Path(args.work) / name
    seconds["export"] = time.perf_counter()
    exports = export_all(nets, shape, folder)
    profile = None
    seconds["profile"] = time.perf_counter()
    if args.profile:
        bar.set_description(f"{name}: profile")
        x = torch.randn(max(args.batches), *shape)
        profile = {"batch": max(args.batches), "runs": args.profile,
                   "ms": {key: quiet.run(lambda k=key: op_profile(folder / f"{k.replace('/', '_')}.onnx", x,
                                                                    args.profile))[0] for key in nets}}
    seconds["timing"] = time.perf_counter()
    latency = []
    for runtime in args.runtimes:
        for batch in args.batches:
            bar.set_description(f"{name}: {runtime} b{batch}")
            x = torch.randn(batch, *shape)
            with torch.no_grad():
                fns = runners(runtime, nets, folder, x, args.threads)
                load_before, t0, waited = os.getloadavg()[0], time.perf_counter(), quiet.waited
                runs = paired(fns, args.pairs, args.pair_seconds, quiet, bar)
            del fns
            unpruned_ms = [t for r in runs.values() for t in r["unpruned_ms"]]
            latency.append({"runtime": runtime, "batch": batch,
                            "seconds": time.perf_counter() - t0, "waited_for_quiet_seconds": quiet.waited - waited,
                            "load_average_1min": [load_before, os.getloadavg()[0]],
                            "ms": {"unpruned": statistics.median(unpruned_ms),
                                   **{k: statistics.median(r["ms"]) for k, r in runs.items()}},
                            "speedup": {k: 1.0 / r["ratio"] for k, r in runs.items()},
                            "pairs": {k: len(r["ms"]) for k, r in runs.items()},
                            "ratio_quartiles": {k: r["ratio_quartiles"] for k, r in runs.items()},
                            "others_cpu_share": {k: r["others_cpu_share"] for k, r in runs.items()},
                            "runs_ms": {k: {"unpruned": r["unpruned_ms"], "pruned": r["ms"]} for k, r in runs.items()}})
            gc.collect()
    seconds["end"] = time.perf_counter()
    marks = list(seconds.values())
    seconds = {k: b - a for k, a, b in zip(seconds, marks, marks[1:])}
    return {"model": name, "trained": bool(trained), "input_shape": list(shape), "seconds": seconds,
            "unpruned_flops": budgets[0]["unpruned_flops"],
            "unpruned_params": sum(p.numel() for p in unpruned.parameters()), "budgets": budgets,
            "exports": exports, "latency": latency, "profile": profile}


def rows_of(result: dict) -> list[dict]:
    """One flat row per (model, budget, runtime, batch, block) with speedup and its ratio to the FLOP reduction."""
    rows = []
    for m in result["models"]:
        if "error" in m:
            continue
        for lat in m["latency"]:
            base = lat["ms"]["unpruned"]
            rows.append({"model": m["model"], "budget": None, "runtime": lat["runtime"], "batch": lat["batch"],
                         "block": "unpruned", "ms": base, "flop_reduction": 1.0, "volume_reduction": 1.0,
                         "speedup": 1.0, "speedup_over_flop_reduction": 1.0})
            for b in m["budgets"]:
                for mode in b.get("networks", NETWORKS):
                    key = f"{b['factor']:g}x/{mode}"
                    red, speedup = b[mode]["flop_reduction"], lat["speedup"][key]
                    rows.append({"model": m["model"], "budget": b["factor"], "runtime": lat["runtime"],
                                 "batch": lat["batch"], "block": mode, "ms": lat["ms"][key], "flop_reduction": red,
                                 "volume_reduction": b[mode].get("volume_reduction"),  # absent in older results
                                 "speedup": speedup, "speedup_over_flop_reduction": speedup / red})
    return rows


def implied_gamma(result: dict) -> list[dict]:
    """Per (model, budget, runtime, batch): the gather cost γ (MACs per gathered channel and
    position) that the same-mask mixed and regular networks' times imply, with time ∝ MACs at the
    unpruned network's rate: γ = ((t_mixed − t_regular) / t_unpruned · F_unpruned − (F_mixed −
    F_regular)) / gathered positions, FLOPs F per example, each t / t_unpruned the inverse of
    the network's paired speedup."""
    out = []
    for m in result["models"]:
        if "error" in m:
            continue
        for lat in m["latency"]:
            for b in m["budgets"]:
                gathered = b["mixed"].get("gathered_positions", 0)
                if not gathered:
                    continue
                t = {k: 1.0 / lat["speedup"][f"{b['factor']:g}x/{k}"] for k in ("mixed", "regular")}
                extra = (t["mixed"] - t["regular"]) * m["unpruned_flops"]
                out.append({"model": m["model"], "budget": b["factor"], "runtime": lat["runtime"], "batch": lat["batch"],
                            "gamma": (extra - (b["mixed"]["flops"] - b["regular"]["flops"])) / gathered})
    return out


def environment(args) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import onnx
    import onnxruntime

    try:
        torchvision = version("torchvision")  # not imported: a CUDA build needs the schemas import_torchvision defines
    except PackageNotFoundError:
        torchvision = None

    def git(*a):
        try:
            done = subprocess.run(["git", *a], cwd=HERE.parent, capture_output=True, text=True, timeout=30)
            return done.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {"git_commit": git("rev-parse", "HEAD"),
            "uncommitted_changes_in_src": (git("status", "--porcelain", "--", "src") or "").splitlines(),
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "budgetprune": budgetprune.__version__
            if hasattr(budgetprune, "__version__") else None,
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "onnxruntime_intra_op_threads": args.threads, "onnxruntime_inter_op_threads": 1,
            "cpu": cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "shared_machine": "2 CPU cores; other processes are waited out (Quiet)"}


def main(argv=None) -> int:
    args = arguments(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/deploy_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    models_module = import_torchvision() if any(m not in REGISTRY for m in args.models) else None
    start = time.perf_counter()
    per_model = {name: len(args.runs[name]) * len(RUN_NETWORKS) if name in args.runs else
                 len(args.budgets) * len(NETWORKS) for name in args.models}
    ticks = len(args.runtimes) * len(args.batches) * sum(per_model.values())
    results = []
    quiet = Quiet(args.quiet_busy, 60 * args.quiet_budget_min)
    with tqdm(total=ticks, unit="network", dynamic_ncols=True) as bar:
        for name in args.models:
            try:
                results.append(measure_model(name, args, models_module, quiet, bar))
            except Exception as exc:  # one model's failure is recorded, the others still run
                results.append({"model": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})
                tqdm.write(f"{name}: failed: {results[-1]['error']}")
            gc.collect()
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "work")}
    settings["runs"] = {name: [str(folder) for folder in folders] for name, folders in args.runs.items()}
    record = {"command": command.strip(), "waited_for_quiet_seconds": quiet.waited, "settings": settings,
              "environment": environment(args), "wall_seconds": time.perf_counter() - start, "models": results}
    record["rows"] = rows_of(record)
    record["implied_gamma"] = implied_gamma(record)
    out = write_results(args.out, "deploy_speed", record, markdown(record))
    plot(record, out / "deploy_speed.png")
    print(f"results in {out}/deploy_speed.{{json,md,png}} ({record['wall_seconds'] / 60:.1f} min)")
    return 0


# --------------------------------------------------------------------------------------------- report


def markdown(r: dict) -> str:
    env, s = r["environment"], r["settings"]
    rows = r["rows"]
    lines = ["# Deployed speed: unpruned vs pruned (regular, mixed, padded regular and padded auto blocks) in eager "
             "PyTorch, "
             "TorchScript and onnxruntime", "", f"Command: `{r['command']}`", "",
             ("Untrained models (those marked trained below excepted)" if any(m.get("trained") for m in r["models"])
              else "Untrained models") + f", 10 classes, random inputs (torchvision models 3×{s['size']}×{s['size']}; resnet20, "
             "budgetprune's registry model for Fashion-MNIST, 1×28×28). Per FLOP budget"
             + (f" (every one with a budget of 1/{s['volume']:g} of the activation volume beside it, "
                "`flops=…,volume=…`)" if s.get("volume") else "") + " one `budgetprune.Pruner` "
             f"(method `{s['method']}`{METHOD_NOTE[s['method']]}) takes {s['steps']} AdamW steps (lr 1e-3, batch 2) "
             "and finalizes (projection to the budget under mixed blocks); its final masks and gate values are "
             "compacted twice, "
             "`mode=\"regular\"` and `mode=\"mixed\"` (same channels, outputs equal to finalize's). A third "
             "pruner, the same but with `block=\"regular\", channel_multiple=" + repr(s.get("multiple", 16)) + "`, "
             "projects and fills under costs counted with its regular-block widths padded ("
             + padding_words(s.get("multiple", 16)) + "; its own masks; `padded` below). A fourth, with the "
             "library's default `block=\"auto\"` weighed for onnxruntime and the same padding, keeps each residual "
             "space mixed or regular by what it saves against its gathers' cost (`auto` below; how many spaces "
             "it kept mixed is in the JSON). "
             "Exports: `budgetprune.export.to_torchscript` and `to_onnx` (opset 17, TorchScript-based "
             f"exporter). onnxruntime {env['onnxruntime']} CPU with intra_op_num_threads={s['threads']}, "
             f"inter_op_num_threads=1, idle threads not spinning (a spinning pool of one session slows the next "
             f"session timed); torch {env['torch']} with {env['torch_threads']} threads. Timing: per model, "
             "runtime and batch each pruned network runs by turns with "
             f"the unpruned one (one run each per pair, ABBA order), {s['pairs']} pairs or as many as take "
             f"{s['pair_seconds']:g} s; its speedup is the inverse of the median of its pairs' time ratios, and "
             "ms is its median run (the unpruned row: the median of all its runs). "
             f"**The machine may be shared**: its {env['cpu_count']} CPU cores ({env['cpu']}) may run other "
             "processes, which stall every parallel region of a 2-thread run (resnet20 at batch 1 took 670 ms "
             "instead of 2 ms beside another test suite). So each measurement first "
             f"waits until the other processes use at most {s['quiet_busy']:.0%} of the CPUs (`/proc/stat`) and is "
             "repeated, up to twice, when they used more meanwhile; the run waited "
             f"{r['waited_for_quiet_seconds'] / 60:.1f} min in all (at most {s['quiet_budget_min']:g}), and "
             f"{quiet_share(r)} measurements ran with the others "
             "under that share. Absolute times stay noisier than on a quiet machine; the pairing keeps "
             "the ratios fair, as a slowdown slows both runs of a pair. Speedup: over the unpruned model in the same runtime "
             "and batch. FLOP red.: the compacted network's own FLOP reduction (budgetprune's count; a regular "
             "block keeps the union of the channels of the tensors it adds, so it may keep more FLOPs than the "
             "budget). Volume red.: its activation volume reduction (the feature-map entries it writes per "
             "example, budgetprune's `volume` count), which the time of memory-bound layers (depthwise convolutions, "
             "BatchNorms, activations, concatenations) follows more closely than FLOPs. "
             f"git {env['git_commit']}"
             + (f" (uncommitted changes in src: {len(env['uncommitted_changes_in_src'])} files)"
                if env["uncommitted_changes_in_src"] else "") + f". Wall time {r['wall_seconds'] / 60:.1f} min.", ""]
    for m in r["models"]:
        if m.get("trained"):
            lines += [f"**{m['model']} is trained** (`--runs`): the unpruned network is the runs' teacher, "
                      "`auto` is each run's own fine-tuned result (its blocks and padding), `regular` and `mixed` "
                      "its kept channels compacted both ways with the teacher's weights; no `padded` network.", ""]
            lines += [f"- {b['factor']:g}×: `{b['run']}`, {b['method']}, test accuracy "
                      f"{_percent(b['teacher_test_accuracy'])} unpruned → {_percent(b['test_accuracy'])}, "
                      f"V/B {b['V_over_B']:.3f}, padding {padding_label(b['auto']['padding'], b['auto']['pad_tied'])}, "
                      f"{b['auto']['mixed_spaces']} mixed residual space(s)" for b in m["budgets"]]
            lines.append("")
    if s.get("time_padding"):
        lines += timed_padding_lines(r)
    failed = [m for m in r["models"] if "error" in m]
    for m in failed:
        lines.append(f"- **{m['model']} failed**: {m['error']}")
    if failed:
        lines.append("")
    lines += ["## Summary", ""]
    slower = [row for row in rows if row["block"] != "unpruned" and row["speedup"] < 1.0]
    if slower:
        lines += [f"Pruned networks slower than the unpruned one ({len(slower)} of "
                  f"{sum(x['block'] != 'unpruned' for x in rows)}):", ""]
        for runtime in s["runtimes"]:
            for batch in s["batches"]:
                these = [x for x in slower if x["runtime"] == runtime and x["batch"] == batch]
                if these:
                    lines.append(f"- {runtime}, batch {batch}: " + "; ".join(
                        f"{x['model']} {x['budget']:g}× {x['block']} {x['speedup']:.2f}×" for x in these))
    else:
        lines.append("No pruned network is slower than the unpruned one.")
    lines += ["", "Speedup ÷ FLOP reduction, min – max over models and budgets (target ≥ "
              f"{TARGET} at batch 16 in onnxruntime):", "",
              "| runtime | batch | " + " | ".join(NETWORKS) + " |", "|---|---:|" + "---|" * len(NETWORKS)]
    for runtime in s["runtimes"]:
        for batch in s["batches"]:
            cells = []
            for mode in NETWORKS:
                v = [x for x in rows if x["runtime"] == runtime and x["batch"] == batch and x["block"] == mode]
                if not v:
                    cells.append("–")
                    continue
                lo = min(v, key=lambda x: x["speedup_over_flop_reduction"])
                hi = max(v, key=lambda x: x["speedup_over_flop_reduction"])
                cells.append(f"{lo['speedup_over_flop_reduction']:.2f} ({lo['model']} {lo['budget']:g}×) – "
                             f"{hi['speedup_over_flop_reduction']:.2f} ({hi['model']} {hi['budget']:g}×)")
            lines.append(f"| {runtime} | {batch} | " + " | ".join(cells) + " |")
    gammas = implied_gamma(r)
    if gammas:
        lines += ["", "Gather cost γ the same-mask mixed and regular networks imply (MACs per gathered channel and "
                  "position: γ = ((t_mixed − t_regular) / t_unpruned · FLOPs_unpruned − (FLOPs_mixed − FLOPs_regular)) "
                  "÷ gathered positions; `block=\"auto\"` keeps a residual space mixed where what it saves exceeds "
                  "γ per gathered position):", "",
                  "| runtime | batch | median γ | min – max | in `GATHER_COST` |", "|---|---:|---:|---|---:|"]
        for runtime in s["runtimes"]:
            for batch in s["batches"]:
                v = sorted(g["gamma"] for g in gammas if g["runtime"] == runtime and g["batch"] == batch)
                if v:
                    lines.append(f"| {runtime} | {batch} | {statistics.median(v):.0f} | {v[0]:.0f} – {v[-1]:.0f} | "
                                 f"{GATHER_COST.get(runtime, float('nan')):g} |")
    lines += ["", "## Every measurement", "",
              "| model | budget | runtime | batch | block | FLOP red. | volume red. | ms | speedup | speedup ÷ FLOP red. |",
              "|---|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    for x in rows:
        budget = "–" if x["budget"] is None else f"{x['budget']:g}×"
        flag = " **slower**" if x["speedup"] < 1.0 else ""
        ratio = "" if x["block"] == "unpruned" else f"{x['speedup_over_flop_reduction']:.2f}"
        volume = "" if x.get("volume_reduction") is None else f"{x['volume_reduction']:.2f}×"
        lines.append(f"| {x['model']} | {budget} | {x['runtime']} | {x['batch']} | {x['block']} | "
                     f"{x['flop_reduction']:.2f}× | {volume} | {x['ms']:.3f} | {x['speedup']:.2f}×{flag} | {ratio} |")
    lines += profile_tables(r)
    lines += ["", "## ONNX graphs", "",
              "Node counts of the exported files (ops whose count differs between the networks of a model; "
              "`Conv` for scale):", ""]
    for m in r["models"]:
        if "error" in m:
            continue
        ops = {k: e["onnx_ops"] for k, e in m["exports"].items()}
        kinds = sorted({op for c in ops.values() for op in c})
        differing = [op for op in kinds if len({c.get(op, 0) for c in ops.values()}) > 1 or op == "Conv"]
        lines += [f"**{m['model']}**", "", "| network | nodes | " + " | ".join(differing) + " |",
                  "|---|---:|" + "---:|" * len(differing)]
        for key, c in ops.items():
            lines.append(f"| {key} | {sum(c.values())} | " + " | ".join(str(c.get(op, 0)) for op in differing) + " |")
        lines.append("")
    lines += ["![speedup vs FLOP reduction](deploy_speed.png)", ""]
    return "\n".join(lines)


def profile_tables(r: dict) -> list[str]:
    """Per profiled model: milliseconds by ONNX op type, the unpruned network and each budget's
    default (``auto``) network, with each op type's own speedup."""
    lines = []
    for m in r["models"]:
        prof = m.get("profile")
        if not prof:
            continue
        ms = prof["ms"]
        keys = [f"{b['factor']:g}x/auto" for b in m["budgets"]]
        ops = sorted({op for k in ["unpruned", *keys] for op in ms[k]}, key=lambda op: -ms["unpruned"].get(op, 0.0))
        lines += ["", f"### Where the time goes: {m['model']}", "",
                  f"onnxruntime's profiler, 1 thread, batch {prof['batch']}, {prof['runs']} runs: milliseconds per "
                  "run by op type (kernel times summed; `ReorderInput`/`ReorderOutput` convert to and from the "
                  "blocked layout of onnxruntime's convolutions), the default (`auto`) network of each budget, and "
                  "each op type's speedup. FLOP red. is the whole network's.", "",
                  "| op type | unpruned ms | " + " | ".join(f"{k.split('/')[0]} ms (speedup)" for k in keys) + " |",
                  "|---|---:|" + "---:|" * len(keys)]

        def cell(key, op=None):
            t = sum(ms[key].values()) if op is None else ms[key].get(op, 0.0)
            base = sum(ms["unpruned"].values()) if op is None else ms["unpruned"].get(op, 0.0)
            return f"{t:.3f}" + (f" ({base / t:.2f}×)" if t > 0 and base > 0 else "")

        for op in ops:
            lines.append(f"| {op} | {ms['unpruned'].get(op, 0.0):.3f} | " + " | ".join(cell(k, op) for k in keys) + " |")
        lines.append(f"| **all** | {sum(ms['unpruned'].values()):.3f} | " + " | ".join(cell(k) for k in keys) + " |")
        lines.append("| FLOP red. | | " + " | ".join(f"{b['auto']['flop_reduction']:.2f}×" for b in m["budgets"]) + " |")
    return lines


def _percent(accuracy) -> str:
    return "?" if accuracy is None else f"{100 * accuracy:.2f} %"


def quiet_share(r: dict) -> str:
    """'N of M': the measurements during which the other processes stayed under --quiet-busy."""
    shares = [v for m in r["models"] if "error" not in m for lat in m["latency"]
              for v in lat["others_cpu_share"].values()]
    return f"{sum(v <= r['settings']['quiet_busy'] for v in shares)} of {len(shares)}"


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [x for x in r["rows"] if x["block"] != "unpruned"]
    runtimes = r["settings"]["runtimes"]
    fig, axes = plt.subplots(1, len(runtimes), figsize=(4.6 * len(runtimes), 4.4), squeeze=False, sharey=True)
    models = [m["model"] for m in r["models"] if "error" not in m]
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(models)}
    top = max([x["flop_reduction"] for x in rows] + [x["speedup"] for x in rows] + [2.0]) * 1.15
    batches = r["settings"]["batches"]
    for ax, runtime in zip(axes[0], runtimes):
        ax.plot([1, top], [1, top], color="gray", ls=":", lw=1, label="speedup = FLOP reduction")
        ax.plot([1, top], [TARGET, TARGET * top], color="gray", ls="--", lw=1, label=f"{TARGET} × FLOP reduction")
        ax.axhline(1.0, color="red", lw=0.8, alpha=0.5)
        for x in rows:
            if x["runtime"] != runtime:
                continue
            big = x["batch"] == max(batches)
            ax.scatter(x["flop_reduction"], x["speedup"], color=colors[x["model"]],
                       marker={"mixed": "o", "regular": "s", "auto": "D"}.get(x["block"], "^"), s=36 if big else 22,
                       facecolors=colors[x["model"]] if big else "none", linewidths=1.1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(matplotlib.ticker.FixedLocator([0.25, 0.5, 1, 2, 4, 8, 16]))
            axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g×"))
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("FLOP reduction")
        ax.set_title(runtime)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("measured speedup over the unpruned model")
    handles = [plt.Line2D([], [], color=colors[m], marker="o", ls="", label=m) for m in models]
    handles += [plt.Line2D([], [], color="k", marker="o", ls="", label="mixed block"),
                plt.Line2D([], [], color="k", marker="s", ls="", label="regular block"),
                plt.Line2D([], [], color="k", marker="^", ls="", label="regular, padded widths"),
                plt.Line2D([], [], color="k", marker="D", ls="", label="auto, padded widths"),
                plt.Line2D([], [], color="k", marker="o", ls="", label=f"batch {max(batches)}"),
                plt.Line2D([], [], color="k", marker="o", ls="", fillstyle="none", label="other batch")]
    handles += axes[0][0].get_legend_handles_labels()[0][:2]
    axes[0][-1].legend(handles=handles, fontsize=7, loc="upper left")
    fig.suptitle("Deployed speedup vs FLOP reduction (CPU, shared machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
