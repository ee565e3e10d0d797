"""Running and timing a network in the runtimes users deploy with.

``eager`` is PyTorch itself; ``torchscript`` the module :func:`budgetprune.export.to_torchscript`
saves; ``onnxruntime`` an ``InferenceSession`` of the file :func:`budgetprune.export.to_onnx`
writes (CPU, or CUDA where onnxruntime has it and the example is on a GPU). The per-layer latency
table (:mod:`budgetprune.latency`) and the deployed speed of a run's result time networks here,
so a latency budget and the speed a run reports are measured in the runtime a user names.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from .errors import ConfigError
from .export import onnx_bytes, require, torchscript_module
from .quiet import Quiet

RUNTIMES = ("eager", "torchscript", "onnxruntime")


def copies_of_first(example: torch.Tensor, batch: int) -> torch.Tensor:
    """A batch of ``batch`` copies of ``example``'s first item: what a deployed network is timed on."""
    first = example[:1]
    return first.expand(batch, *first.shape[1:]).contiguous()


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime '{runtime}': choose one of {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime":
        require("onnx", "onnxruntime", purpose="timing in onnxruntime")
    return runtime


def runner(model: nn.Module, example: torch.Tensor, runtime: str = "eager",
           threads: int | None = None) -> Callable[[], object]:
    """A no-argument callable that runs ``model`` (eval mode) once on ``example`` in ``runtime``;
    onnxruntime uses ``threads`` intra-op threads (default: torch's thread count)."""
    check_runtime(runtime)
    model.eval()
    if runtime == "eager":
        return lambda: model(example)
    if runtime == "torchscript":
        module = torchscript_module(model, example)
        return lambda: module(example)
    session = onnxruntime_session(onnx_bytes(model, example), threads, cuda=example.is_cuda)
    feeds = {session.get_inputs()[0].name: example.detach().cpu().numpy()}
    return lambda: session.run(None, feeds)


def onnxruntime_session(model: bytes | str, threads: int | None = None, cuda: bool = False):
    """An onnxruntime ``InferenceSession`` of an ONNX file (a path, or its bytes) set up for timing:
    ``threads`` intra-op threads (default: torch's thread count), one inter-op thread, CUDA where
    asked and available."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # no warnings about the hardware-specific optimisations it applies
    # idle threads sleep rather than spin: a spinning pool of one session steals the cores of the
    # next session timed in the same process (one network measured 4.6 or 8.3 ms by turns)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if cuda and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return onnxruntime.InferenceSession(model, options, providers=providers)


def median_ms(run: Callable[[], object], repeats: int = 20, warmup: int = 3,
              device: torch.device | None = None) -> float:
    """Median wall time of ``run()`` in milliseconds over ``repeats`` calls after ``warmup`` ones
    (CUDA work is waited for on ``device``)."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            run()
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def default_runtime(metrics: list[str]) -> str:
    """The runtime a run reports its deployed speed in: the one its latency budget is measured in,
    else onnxruntime where it is installed, else eager PyTorch."""
    from .latency import LATENCY_METRICS

    for metric in metrics:
        if metric in LATENCY_METRICS:
            return LATENCY_METRICS[metric]
    try:
        check_runtime("onnxruntime")
    except ConfigError:
        return "eager"
    return "onnxruntime"


def paired_times(first: Callable[[], object], second: Callable[[], object], repeats: int = 30,
                 min_seconds: float = 1.0, warmup: int = 2,
                 device: torch.device | None = None) -> tuple[list[float], list[float]]:
    """Wall times in seconds of ``first()`` and ``second()`` run by turns, one call each per pair
    (ABBA order, so neither always runs first), ``repeats`` pairs or as many as take
    ``min_seconds`` (at most 5000). A machine that slows down slows both calls of a pair alike, so
    the ratio of a pair's times stays steady where separate rounds of each can drift apart (two
    copies of resnet20 in onnxruntime, idle machine: 0.988–1.007 of each other by pairs,
    0.995–1.031 by rounds; ``benchmarks/timing_pairs.py``)."""
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)

    def once(run):
        sync()
        start = time.perf_counter()
        run()
        sync()
        return time.perf_counter() - start

    with torch.no_grad():
        for _ in range(warmup):
            first(), second()
        pair = once(first) + once(second)
        pairs = min(5000, max(repeats, math.ceil(min_seconds / max(pair, 1e-6))))
        a, b = [], []
        for i in range(pairs):
            if i % 2:
                b.append(once(second))
                a.append(once(first))
            else:
                a.append(once(first))
                b.append(once(second))
    return a, b


def deployed_speed(unpruned: nn.Module, pruned: nn.Module, example: torch.Tensor, runtime: str,
                   repeats: int = 30, min_seconds: float = 1.0, quiet: Quiet | None = None) -> dict:
    """Latency of the unpruned and the pruned network in ``runtime`` on ``example`` (what a run
    reports in ``metrics.json``): the median milliseconds of each, and their ratio as the median
    of the ratios of paired runs (:func:`paired_times`), with the speedup its inverse. An export
    that fails is reported, not raised.

    The pairs run while other processes leave the CPUs alone where that can be had in a few
    seconds (``quiet``, default :class:`budgetprune.quiet.Quiet`: wait, and time again while they
    used more than its share): ``others_cpu`` is the share of all CPUs they used during the pairs
    kept, ``busy`` whether that was more than the share a quiet measurement allows (a caller
    should not choose by a busy measurement), ``timings`` how many times the pairs ran."""
    from .errors import ExportError

    try:
        runs = {"unpruned": runner(unpruned, example, runtime), "pruned": runner(pruned, example, runtime)}
    except (ExportError, ConfigError) as exc:
        return {"runtime": runtime, "error": str(exc)}
    quiet = quiet or Quiet()
    (full, small), share, timings = quiet.run(
        lambda: paired_times(runs["unpruned"], runs["pruned"], repeats, min_seconds, device=example.device))
    ratio = statistics.median(s / f for f, s in zip(full, small))
    cpu = {"cpu": torch.backends.cpu.get_cpu_capability()} if example.device.type == "cpu" else {}
    return {"runtime": runtime, "batch": int(example.shape[0]), "device": str(example.device), **cpu,
            "threads": torch.get_num_threads(), "unpruned_ms": 1e3 * statistics.median(full),
            "pruned_ms": 1e3 * statistics.median(small), "ratio": ratio, "speedup": 1.0 / ratio,
            "pairs": len(full), "others_cpu": share, "busy": share > quiet.busy, "timings": timings}
