"""The run report: ``report.md`` with a per-layer width plot (matplotlib, PNG); for a run that
pruned single weights, each layer's non-zero weights instead."""

from __future__ import annotations

from pathlib import Path

from . import io
from .gates import FAINT_GATE
from .graph import ChannelGraph
from .liveness import Padding, describe_padding


def layer_widths(graph: ChannelGraph, masks: dict[str, list[int]]) -> dict[str, dict[str, int]]:
    """Per prunable group: full width and kept width."""
    return {gid: {"full": g.channels, "kept": len(masks.get(gid, range(g.channels)))}
            for gid, g in graph.groups.items()}


def plot_widths(widths: dict[str, dict[str, int]], path: Path, title: str, unit: str = "channels / neurons") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(widths)
    full = [widths[n]["full"] for n in names]
    kept = [widths[n]["kept"] for n in names]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(names) + 2), 3.6))
    xs = range(len(names))
    ax.bar(xs, full, color="#d0d7de", label="unpruned")
    ax.bar(xs, kept, color="#1f6feb", label="kept")
    for x, k in zip(xs, kept):
        ax.text(x, k, str(k), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(unit)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    io.atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)


def measured_latency_lines(record: dict | None) -> list[str]:
    """report.md's lines on a latency budget timed in a runtime (:mod:`budgetprune.measured`): the
    kept network's measured latency next to its budget, and how many projections were timed."""
    if not record:
        return []
    if "error" in record:
        return [f"- Latency budget not timed in its runtime ({record['error']}): the per-layer table's budget is met"]
    if "kept_try" not in record:  # a run folder written before the kept try was recorded
        return []
    kept = record["tries"][record["kept_try"]]["measured"]
    lines = []
    for metric, v in kept.items():
        over = v["ratio"] / v["fraction"]
        lines.append(f"- {metric} measured (batch {record['batch']}): {v['pruned_ms']:.4g} ms against "
                     f"{v['unpruned_ms']:.4g} ms unpruned, {v['ratio']:.3f} of it: **{over:.3f} of the budget** "
                     f"{v['fraction']:g}" + ("" if over <= 1.0 else " (over it: no projection measured within the "
                                              "budget; see the log)")
                     + f"; {len(record['tries'])} projection(s) timed")
    return lines


#: A result whose deployed speedup is under this share of its FLOP (or parameter) reduction gets
#: a note: its time follows something the budget does not count (README, "Deployed speed").
SPEEDUP_SHARE = 0.7
#: The budget metrics such a note is about: those blind to the memory the layers move.
COMPUTE_METRICS = ("flops", "params")


#: A result scoring at most this multiple of guessing's accuracy (1 / classes), pruned from a network
#: that scored at least twice as much, gets a note (:func:`collapse_note`).
CHANCE_MULTIPLE = 1.5


def collapse_note(metrics: dict, history: list[dict] | None = None) -> str | None:
    """A note for a result that pruning left no better than guessing: its test accuracy, guessing's
    among ``metrics["classes"]``, the unpruned network's, the first epoch after the teacher's at which
    the test accuracy had fallen that low (from ``history``), and what to change. None otherwise,
    or where the number of classes is unknown.

    Why: a pruned network at chance is no result, and nothing else in a finished run says so (the
    sensitivity method's aimed decay left ResNet-20 at 10 % at 16× volume on one seed of three,
    ``benchmarks/results/methods_16_resnet20_mixed_exact/``)."""
    classes = metrics.get("classes")
    if not isinstance(classes, int) or classes < 2:
        return None
    chance = 1.0 / classes
    accuracy, unpruned = metrics["test_accuracy"], metrics["unpruned_test_accuracy"]
    if accuracy > CHANCE_MULTIPLE * chance or unpruned < 2 * CHANCE_MULTIPLE * chance:
        return None
    fell = next((f"{row['stage']} epoch {row['epoch']}" for row in history or []
                 if row.get("stage") != "teacher" and row.get("test_accuracy", 1.0) <= CHANCE_MULTIPLE * chance),
                None)
    other = "" if metrics.get("method") == "bar" else " (e.g. --method bar)"
    return (f"note: the pruned network scores {100 * accuracy:.1f} % on the test set, about what guessing among "
            f"{classes} classes scores ({100 * chance:.1f} %; unpruned {100 * unpruned:.1f} %): pruning left "
            f"nothing of what it had learnt"
            + (f" (its test accuracy had fallen that low by {fell}: history.json)" if fell else "")
            + f". Give it a larger budget, a longer prune stage (--epochs) or another method{other}")


def deploy_note(metrics: dict) -> str | None:
    """The note a result's deployed speed calls for, if any: :func:`busy_note`, else
    :func:`compute_note` or :func:`volume_form_note` (which read the speed: not from a busy timing)."""
    return busy_note(metrics) or compute_note(metrics) or volume_form_note(metrics)


def busy_note(metrics: dict) -> str | None:
    """A note for a deployed speed timed while other processes kept the machine busy
    (:class:`budgetprune.quiet.Quiet`): they slow the unpruned and the pruned network unalike, so
    the speedup is not what the deployment will see."""
    deployed = metrics.get("deployed")
    if not deployed or "error" in deployed or not deployed.get("busy"):
        return None
    return (f"note: the deployed speed ({deployed['speedup']:.2f}× in {deployed['runtime']}) was timed while other "
            f"processes used {deployed['others_cpu']:.0%} of the CPUs, which slows the unpruned and the pruned "
            "network unalike: time the two again on a quiet machine (budgetprune.runtimes.deployed_speed) before "
            "relying on it")


def volume_form_note(metrics: dict) -> str | None:
    """A note for a channel-pruned result under volume budgets alone, built in the volume budget's
    default form (mixed blocks at exact widths, :func:`budgetprune.pruner.default_form`), that runs
    slower than its unpruned network where it is deployed: its gathers and unaligned widths cost
    more time there than its channels save, and the fastest form or a FLOP budget beside would buy
    the speed back (with channels the method trained: README, "The deployed form follows the budget")."""
    deployed = metrics.get("deployed")
    if (not deployed or "error" in deployed or deployed["speedup"] >= 1 or metrics.get("metric") != "volume"
            or metrics.get("granularity", "channel") != "channel"
            or any(m != "volume" for m in metrics.get("budgets", {}))
            or (metrics.get("block"), metrics.get("channel_multiple")) == ("auto", "auto")):
        return None
    fraction = metrics.get("budget_fraction")
    volume = f"volume={fraction:.3g}," if fraction else ""
    return (f"note: the result runs slower than the unpruned network in {deployed['runtime']} (batch "
            f"{deployed['batch']}: {deployed['speedup']:.2f}× its speed). A volume budget builds mixed blocks at "
            f"exact widths, so that it pays only for channels the method trained, and here their gathers and "
            f"unaligned widths cost more time than the channels save. Where it must also run faster, add a FLOP "
            f"budget beside the volume (--budget {volume}flops=0.5) or build the fastest form (--block auto "
            f"--channel-multiple auto), at the cost of some trained channels")


def compute_note(metrics: dict) -> str | None:
    """A note for a channel-pruned result under a FLOP or parameter budget that runs much slower
    than that budget's reduction promises: its speedup (``deployed``), the reduction, its
    activation volume's reduction, and the budgets that follow time. None where the speed was not
    measured or keeps up, or where a volume or latency budget already bounds the result.

    Why: memory-bound networks (depthwise and narrow layers: MobileNet V3 small, MnasNet 0.5,
    ShuffleNet V2 0.5) pruned to a quarter of their FLOPs ran only 2.0–2.5× faster in onnxruntime
    at batch 16, about as much as their activation volume fell (2.4–2.5×;
    ``benchmarks/results/deploy_speed_families/volume/``)."""
    deployed, metric = metrics.get("deployed"), metrics.get("metric")
    if (not deployed or "error" in deployed or metric not in COMPUTE_METRICS
            or metrics.get("granularity", "channel") != "channel"
            or any(m == "volume" or m.startswith("latency") for m in metrics.get("budgets", {}))):
        return None
    reduction = metrics["reduction_factor"][metric]
    if deployed["speedup"] >= SPEEDUP_SHARE * reduction:
        return None
    volume = metrics["reduction_factor"].get("volume")
    latency = "latency" + (f":{deployed['runtime']}" if deployed["runtime"] != "eager" else "")
    return (f"note: the result runs {deployed['speedup']:.2f}× faster in {deployed['runtime']} (batch "
            f"{deployed['batch']}) for {reduction:.2f}× fewer {metric}"
            + (f"; its activation volume fell {volume:.2f}×" if volume else "")
            + f". Its time goes where {metric} do not count (the feature maps its layers read and write, the "
            f"ops between them, the runtime's overhead). To budget time, use the metric {latency} (timed there) "
            f"or add a volume budget beside it, e.g. --budget {metric}={1 / reduction:.3g},volume=0.4"
            + (_SIXTEEN if _blocks_of_sixteen(metrics) else ""))


#: The hint for a CPU whose onnxruntime convolutions work on 16 channels while the widths are padded
#: to 8: on such a CPU (AVX-512) squeezenet1_0, mnasnet0_5 and mobilenet_v3_small at 4× fewer
#: FLOPs ran 1.36×, 1.36× and 1.28× faster padded to 16 than to 8 (onnxruntime, batch 16;
#: ``benchmarks/results/deploy_speed_families/multiple_8_vs_16/``).
_SIXTEEN = (". This CPU has AVX-512, whose convolutions in onnxruntime work on blocks of 16 channels, and the "
            "widths were padded to multiples of 8: --channel-multiple 16 ran such networks about 1.3× faster")


def _blocks_of_sixteen(metrics: dict) -> bool:
    """Whether the result was timed in onnxruntime on an AVX-512 CPU with its widths padded to a
    multiple that is not one of 16 (``--channel-multiple 8``, or an auto padding loosened to end on
    the budget), and multiples of 16 were not timed in the run itself (``wide_padding_timing``)."""
    deployed, multiple = metrics["deployed"], (metrics.get("padding") or [1])[0]
    return deployed.get("runtime") == "onnxruntime" and deployed.get("cpu") == "AVX512" and \
        multiple > 1 and multiple % 16 != 0 and "wide_padding_timing" not in metrics  # a timed 16 lost


def note_sentence(note: str) -> str:
    """A log note (``"note: the result …"``) as a sentence of the report (``"The result …"``)."""
    text = note.removeprefix("note: ")
    return text[0].upper() + text[1:]


def write_report(out: Path, metrics: dict, history: list[dict]) -> None:
    """Write ``widths.png`` and ``report.md`` into the run folder ``out``."""
    m = metrics
    title = (f"{m.get('model') or 'model'} — {m['method']} at {m['metric']} budget "
             f"{m['budget_fraction']:.4g} ({1 / m['budget_fraction']:.3g}×)")
    per_weight = m.get("granularity") == "weight"
    unit = "weights" if per_weight else "channels"
    if per_weight:
        shown = {name: {"full": d["total"], "kept": d["nonzero"]} for name, d in m["density"].items()}
        plot_widths(shown, out / "widths.png", title, unit="non-zero weights")
    else:
        shown = m["widths"]
        plot_widths(shown, out / "widths.png", title)
    collapse = collapse_note(m, history)
    lines = [f"# Pruning report: {title}", "",
             f"- Test accuracy: **{m['test_accuracy']:.4f}** (unpruned {m['unpruned_test_accuracy']:.4f}, "
             f"change {100 * m['accuracy_change']:+.2f} points)",
             *([f"- **{note_sentence(collapse)}**"] if collapse else []),
             f"- Budget: {m['metric']} ≤ {m['budget']:.6g}; reached {m['pruned'][m['metric']]:.6g} = "
             f"**{m['budget_ratio']:.4f}** of the budget",
             f"- {unit.capitalize()} dropped by the exact-budget projection: {m.get(f'{unit}_dropped_by_projection', 0)}",
             f"- {unit.capitalize()} reopened to fill the budget ("
             + ("at value 0" if per_weight else "zero outgoing weights at reopening")
             + f"): {m.get(f'{unit}_reopened_by_fill', 0)}",
             f"- Compacted vs gated outputs, max abs difference: {m['compaction_max_abs_diff']:.2e}"]
    if not per_weight and "block" in m:
        blocks = {"auto": f"auto ({len(m.get('mixed_spaces') or [])} residual spaces kept mixed, the others regular)",
                  "mixed": "mixed (sums gather each branch's channels)",
                  "regular": "regular (added tensors keep equal widths)"}.get(m["block"], m["block"])
        padding = describe_padding(Padding(*m.get("padding", [1])), m.get("pad_tied", True))
        lines.append(f"- Residual blocks: {blocks}; {padding}")
        wide = m.get("wide_padding_timing")
        if wide and "error" in wide:
            lines.append(f"- Multiples of {wide['multiple']}: no usable timing in {wide['runtime']} ({wide['error']}): "
                         f"multiples of {wide['against']} kept")
        elif wide:
            lines.append(f"- Multiples of {wide['multiple']} timed in {wide['runtime']} (batch {wide['batch']}): "
                         f"{wide['ms']:.3f} ms, multiples of {wide['against']} {wide['against_ms']:.3f} ms, "
                         f"{wide['speedup']:.2f}× faster: multiples of "
                         f"{wide['multiple'] if wide['pays'] else wide['against']} kept")
        timing = m.get("padding_timing")
        if timing and "error" in timing:
            lines.append(f"- Padding: no usable timing in {timing['runtime']} ({timing['error']}): padding kept")
        elif timing:
            lines.append(f"- Padding timed in {timing['runtime']} (batch {timing['batch']}): padded "
                         f"{timing['padded_ms']:.3f} ms, exact widths {timing['exact_ms']:.3f} ms, "
                         f"{timing['speedup']:.2f}× faster padded: "
                         + ("padding kept" if timing["pays"] else "exact widths kept"))
    if m.get("lowest_kept_gate"):
        group, gate = min(m["lowest_kept_gate"].items(), key=lambda item: item[1])
        faint = sum((m.get("faint_kept_channels") or {}).values())
        lines.append(f"- Smallest gate folded into a kept channel: {gate:.3g} ({group})"
                     + (f"; {faint} kept channel(s) under {FAINT_GATE:g} pass almost none of their signal" if faint
                        else ""))
    lines += measured_latency_lines(m.get("measured_latency"))
    deployed = m.get("deployed")
    if deployed and "error" in deployed:
        lines.append(f"- Deployed speed in {deployed['runtime']}: not measured ({deployed['error']})")
    elif deployed:
        lines.append(f"- Deployed speed in {deployed['runtime']} (batch {deployed['batch']}, {deployed['device']}, "
                     f"{deployed['threads']} threads): unpruned {deployed['unpruned_ms']:.3f} ms, pruned "
                     f"{deployed['pruned_ms']:.3f} ms: **{deployed['speedup']:.2f}×**"
                     + (" (slower: see the README's \"Deployed speed\")" if deployed["speedup"] < 1 else ""))
        note = deploy_note(m)
        if note:
            lines.append(f"- {note_sentence(note)}")
    if per_weight:
        lines.append(f"- Non-zero weights after fine-tuning: {m['nonzero_after_finetune']} (pruned weights stay 0); "
                     f"model file {m.get('model_file_bytes', 0) / 1024:.1f} KiB, sparse weights stored as bit mask "
                     "+ values. The network's shape is unchanged, so volume and FLOPs are too.")
    lines += ["", "| resource | unpruned | pruned | reduction |", "|---|---:|---:|---:|"]
    for k in m["full"]:
        lines.append(f"| {k} | {m['full'][k]:.6g} | {m['pruned'][k]:.6g} | {m['reduction_factor'][k]:.2f}× |")
    lines += ["", "FLOPs count multiply-accumulates of conv and linear layers; volume counts the "
              "activations of conv/linear outputs (seed 001, Eq. 4).", ""]
    if per_weight:
        lines += ["## Layer density", "", "![non-zero weights per layer](widths.png)", "",
                  "| layer | weights | non-zero | density |", "|---|---:|---:|---:|"]
        for name, w in shown.items():
            lines.append(f"| {name} | {w['full']} | {w['kept']} | {w['kept'] / max(w['full'], 1):.2%} |")
    else:
        lines += ["## Layer widths", "", "![layer widths](widths.png)", "",
                  "| layer | unpruned | kept |", "|---|---:|---:|"]
        for name, w in shown.items():
            lines.append(f"| {name} | {w['full']} | {w['kept']} |")
    lines += ["", "## Training history", "",
              "| stage | epoch | loss | train acc | test acc | V | b | f | seconds |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for h in history:
        def fmt(key, spec=".4g"):
            return format(h[key], spec) if key in h else ""
        lines.append(f"| {h['stage']} | {h['epoch']} | {fmt('loss', '.4f')} | {fmt('train_accuracy', '.4f')} | "
                     f"{fmt('test_accuracy', '.4f')} | {fmt('V')} | {fmt('b')} | {fmt('f')} | {fmt('seconds', '.1f')} |")
    io.write_text(out / "report.md", "\n".join(lines) + "\n")
