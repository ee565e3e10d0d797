"""How a LayerNorm over a pruned stream runs: its full-count form written out as elementwise ops
against the form compaction writes, ``F.layer_norm`` of the zero-padded channels then a slice
(:func:`budgetprune.ops.full_count_layer_norm`), in onnxruntime and eager PyTorch (a benchmark,
not a test).

A LayerNorm whose input stream lost channels must still normalise over the full count (the
pruned channels were zeros in it). Each shape below, (tokens, full channels, kept channels), is
run both ways at batch 16 with one thread, by pairs (:func:`budgetprune.runtimes.paired_times`):
the ratio is the elementwise form's time over the padded form's (above 1: the padded form is
faster). The outputs are checked equal.

    python benchmarks/layer_norm_speed.py

Writes ``benchmarks/results/layer_norm_speed.{json,md}``.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Parser, machine, write_results  # noqa: E402

from budgetprune.ops import full_count_layer_norm  # noqa: E402
from budgetprune.runtimes import paired_times, runner  # noqa: E402

#: (tokens, full channels, kept channels): MaxViT-T's first stage at 224 px (56 × 56 tokens, 64
#: channels) thinned two ways, its third (14 × 14, 256) and last (7 × 7, 512) stages
SHAPES = ((3136, 64, 40), (3136, 64, 32), (196, 256, 128), (49, 512, 300))
BATCH = 16


def elementwise_layer_norm(x, channels: int, weight, bias, eps: float):
    """The full-count LayerNorm written out: μ = Σx / C, σ² = (Σ(x − μ)² + (C − k)·μ²) / C."""
    mean = x.sum(dim=-1, keepdim=True) / channels
    centred = x - mean
    var = (centred.square().sum(dim=-1, keepdim=True) + (channels - x.shape[-1]) * mean.square()) / channels
    return centred * torch.rsqrt(var + eps) * weight + bias


class Norm(nn.Module):
    def __init__(self, fn, channels: int, kept: int):
        super().__init__()
        self.fn, self.channels = fn, channels
        self.weight, self.bias = nn.Parameter(torch.rand(kept) + 0.5), nn.Parameter(torch.randn(kept))

    def forward(self, x):
        return self.fn(x, self.channels, self.weight, self.bias, 1e-5)


def main(argv=None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=1.0, help="paired runs per measurement, at least (default 1)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for tokens, channels, kept in SHAPES:
        x = torch.randn(BATCH, tokens, kept)
        written, padded = Norm(elementwise_layer_norm, channels, kept), Norm(full_count_layer_norm, channels, kept)
        padded.load_state_dict(written.state_dict())
        with torch.no_grad():
            diff = float((written(x) - padded(x)).abs().max())
        if diff > 1e-4:
            raise RuntimeError(f"the two forms differ by {diff:.3g} at {(tokens, channels, kept)}")
        row = {"tokens": tokens, "channels": channels, "kept": kept, "max_abs_diff": diff}
        for runtime in ("onnxruntime", "eager"):
            fns = [runner(m, x, runtime, threads=1) for m in (written, padded)]
            with torch.no_grad():
                a, b = paired_times(*fns, repeats=30, min_seconds=args.seconds)
            row[runtime] = {"elementwise_ms": 1e3 * statistics.median(a), "padded_ms": 1e3 * statistics.median(b),
                            "ratio": statistics.median(s / t for s, t in zip(a, b)), "pairs": len(a)}
        rows.append(row)
        print(f"{tokens} tokens, {kept} of {channels}: onnxruntime {row['onnxruntime']['ratio']:.2f}×, "
              f"eager {row['eager']['ratio']:.2f}×", flush=True)
    command = "python benchmarks/layer_norm_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {"command": command.strip(), "machine": machine(), "batch": BATCH, "rows": rows}
    lines = ["# A LayerNorm over a pruned stream: written out against padded and sliced", "",
             f"Command: `{record['command']}`. Batch {BATCH}, one thread, paired runs (ABBA, at least "
             f"{args.seconds:g} s), medians; ratio = the elementwise form's time over the padded form's "
             f"(above 1: `F.layer_norm` of the zero-padded channels, then a slice, is faster). "
             f"Machine: {record['machine']}.", "",
             "| tokens | channels | kept | onnxruntime: elementwise ms | padded ms | ratio | eager: elementwise ms | "
             "padded ms | ratio |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        o, e = r["onnxruntime"], r["eager"]
        lines.append(f"| {r['tokens']} | {r['channels']} | {r['kept']} | {o['elementwise_ms']:.3f} | "
                     f"{o['padded_ms']:.3f} | {o['ratio']:.2f} | {e['elementwise_ms']:.3f} | {e['padded_ms']:.3f} | "
                     f"{e['ratio']:.2f} |")
    out = write_results(args.out, "layer_norm_speed", record, "\n".join(lines) + "\n")
    print(f"wrote {out / 'layer_norm_speed.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
