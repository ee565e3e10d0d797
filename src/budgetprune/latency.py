"""The latency metrics: a per-layer table of measured run times on the current device.

For every conv/linear layer of a graph, a layer of the same kind, kernel, stride and input
size is timed on the device at a grid of widths (¼, ½, ¾ and all of its input and output
channels; median of repeated runs). A least-squares fit of the table to
``t ≈ c_io · n_in · n_out + c_out · n_out`` gives the same bilinear form the FLOP count has,
so the latency is a budget like FLOPs: hard cost, expectation under the gates and the
projection all work unchanged (:mod:`budgetprune.resources`).

The metric names the runtime the layers are timed in (:mod:`budgetprune.runtimes`):
``latency`` is eager PyTorch, ``latency:torchscript`` and ``latency:onnxruntime`` the runtimes
the exported files run in. onnxruntime's fast CPU convolutions need widths that are multiples
of 8 or 16 channels; the grid's widths are such multiples for most layers, so the table
predicts a network pruned with padded widths (``channel_multiple``) and under-predicts others.
A table of layers timed alone is only close to the whole network: a runtime budget is checked
on the exported result (:mod:`budgetprune.measured`).

Tables are built once per device, runtime, layer shape and batch and cached as JSON in
``$BUDGETPRUNE_CACHE/latency.json`` (default ``~/.cache/budgetprune``), keyed by the device's
name, so a second run on the same machine measures nothing. Times are in milliseconds per
call at ``batch`` examples (the deployment's batch, ``deploy_batch``; 1 by default: the latency
of one input), which is part of each layer's key.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch
from torch import nn

from . import distributed, io
from .runtimes import check_runtime, median_ms, runner

GRID = (0.25, 0.5, 0.75, 1.0)
#: The latency metrics, by the runtime their table is measured in.
LATENCY_METRICS = {"latency": "eager", "latency:torchscript": "torchscript", "latency:onnxruntime": "onnxruntime"}


def is_latency(metric: str) -> bool:
    return metric in LATENCY_METRICS


def cache_path() -> Path:
    root = os.environ.get("BUDGETPRUNE_CACHE") or Path.home() / ".cache" / "budgetprune"
    return Path(root) / "latency.json"


def device_name(device: torch.device, runtime: str = "eager") -> str:
    """A name that identifies the hardware (and the runtime, other than eager PyTorch) the table
    was measured on."""
    if device.type == "cuda":
        name = f"cuda:{torch.cuda.get_device_name(device)}"
    else:
        cpu = platform.processor() or platform.machine()
        name = f"{device.type}:{cpu}:{os.cpu_count()} cores:{torch.get_num_threads()} threads"
    return name if runtime == "eager" else f"{runtime}:{name}"


def _layer_spec(graph, layer, module: nn.Module, batch: int) -> dict:
    node = next(n for n in graph.gm.graph.nodes if n.op == "call_module" and n.target == layer.name)
    shape = list(node.args[0].meta["tensor_meta"].shape)
    spec = {"kind": layer.kind, "in": int(shape[1]) if layer.kind == "conv" else int(shape[-1]),
            "out": layer.out_channels, "spatial": [int(s) for s in (shape[2:] if layer.kind == "conv" else shape[1:-1])],
            "batch": batch,
            "bias": module.bias is not None, "depthwise": bool(layer.depthwise)}
    if layer.kind == "conv":
        spec.update(kernel=list(module.kernel_size), stride=list(module.stride), padding=list(module.padding),
                    dilation=list(module.dilation))
    if layer.groups > 1:
        spec["groups"] = layer.groups  # timed as a grouped conv, at widths that are multiples of it
    return spec


def _build(spec: dict, n_in: int, n_out: int, device: torch.device) -> tuple[nn.Module, torch.Tensor]:
    if spec["kind"] == "linear":
        return nn.Linear(n_in, n_out, bias=spec["bias"]).to(device).eval(), \
            torch.randn(spec["batch"], *spec["spatial"], n_in, device=device)  # tokens (N, L, C) too
    groups = n_out if spec["depthwise"] else spec.get("groups", 1)
    conv = nn.Conv2d(n_in if not spec["depthwise"] else n_out, n_out, spec["kernel"], spec["stride"], spec["padding"],
                     spec["dilation"], groups=groups, bias=spec["bias"]).to(device).eval()
    x = torch.randn(spec["batch"], conv.in_channels, *spec["spatial"], device=device)
    return conv, x


def measure_layer(spec: dict, device: torch.device, repeats: int = 20, runtime: str = "eager") -> dict:
    """Time one layer shape at the grid of widths in ``runtime`` and fit ``c_io``, ``c_out`` (ms)."""
    g = spec.get("groups", 1)  # a grouped conv keeps a multiple of its groups on both sides
    ins = [spec["in"]] if spec["depthwise"] else sorted({g * max(1, round(f * spec["in"] / g)) for f in GRID})
    outs = sorted({g * max(1, round(f * spec["out"] / g)) for f in GRID})
    rows = []
    for n_in in ins:
        for n_out in outs:
            module, x = _build(spec, n_in if not spec["depthwise"] else n_out, n_out, device)
            rows.append((n_in, n_out, median_ms(runner(module, x, runtime), repeats, device=device)))
    if spec["depthwise"]:
        a = torch.tensor([[0.0, float(o)] for _, o, _ in rows], dtype=torch.float64)
    else:
        a = torch.tensor([[float(i * o), float(o)] for i, o, _ in rows], dtype=torch.float64)
    t = torch.tensor([[r[2]] for r in rows], dtype=torch.float64)
    coef = torch.linalg.lstsq(a, t).solution.flatten().clamp_min(0.0)
    if float(coef.sum()) == 0.0:  # timer resolution: fall back to the time per output channel
        coef = torch.tensor([0.0, max(r[2] for r in rows) / max(outs)], dtype=torch.float64)
    return {"table": [list(r) for r in rows], "c_io": float(coef[0]), "c_out": float(coef[1])}


def _valid_entry(entry) -> bool:
    """A cached measurement: finite, non-negative ``c_io`` and ``c_out``."""
    return isinstance(entry, dict) and all(
        isinstance(entry.get(k), (int, float)) and not isinstance(entry.get(k), bool)
        and 0.0 <= entry[k] < float("inf") for k in ("c_io", "c_out"))


def layer_coefficients(graph, device: torch.device | None = None, batch: int | None = None, repeats: int = 20,
                       runtime: str = "eager") -> dict[str, tuple[float, float]]:
    """``{layer: (c_io, c_out)}`` in ms for ``graph`` on ``device`` in ``runtime`` at ``batch``
    examples per call (default: the graph's ``latency_batch``, the deployment's), measured or
    from the cache. Under torch.distributed rank 0 measures (on its device) and every rank takes
    its table, while the others wait idle: ranks timing at once on shared CPUs would slow each
    other's measurements and end with different tables."""
    check_runtime(runtime)
    return distributed.from_main(lambda: _measured_or_cached(graph, device, batch, repeats, runtime))


def _measured_or_cached(graph, device, batch, repeats, runtime) -> dict[str, tuple[float, float]]:
    batch = graph.latency_batch if batch is None else batch
    modules = dict(graph.gm.named_modules())
    if device is None:
        param = next(graph.gm.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    name = device_name(device, runtime)
    path = cache_path()
    try:
        cache = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError, RecursionError):
        cache = {}  # an unreadable cache is rebuilt, never fatal
    if not isinstance(cache, dict):
        cache = {}
    if not isinstance(cache.get(name), dict):
        cache[name] = {}
    table = cache[name]
    out, changed = {}, False
    for layer in graph.layers.values():
        spec = _layer_spec(graph, layer, modules[layer.name], batch)
        key = json.dumps(spec, sort_keys=True)
        if not _valid_entry(table.get(key)):  # not measured yet, or a damaged entry: measure it
            table[key] = measure_layer(spec, device, repeats, runtime)
            changed = True
        out[layer.name] = (table[key]["c_io"], table[key]["c_out"])
    if changed:
        try:
            io.write_json(path, cache)
        except OSError:
            pass  # a read-only home: the table is still used for this run
    return out
