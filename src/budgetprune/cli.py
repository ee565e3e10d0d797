"""The ``budgetprune`` command line: prune, demo, info, evaluate, export, list.

Problems a user can fix print one line ``budgetprune: error: ...`` and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from . import cpu_allocator, gate_start
from .budget import FILLED, PADDING_KEEPS
from .data.images import AUGMENTATIONS
from .errors import BudgetpruneError, CheckpointError, ConfigError, first_line, printable

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2)."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see '{self.prog} --help')")


def channel_multiple_arg(text: str) -> int | str:
    """``--channel-multiple``: ``auto`` or a positive whole number."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not 'auto' or a positive whole number of channels "
                                         "(1: exact widths)")
    return value


def _add_data_args(p: argparse.ArgumentParser, required: bool = True, augment: bool = True) -> None:
    p.add_argument("--data", required=required, help="dataset: demo, mnist, fashion-mnist, cifar10, cifar100, or "
                                                      "folder:PATH, your own images (one sub-folder per class)"
                                                      + ("" if required else " (required unless --resume)"))
    p.add_argument("--data-root", help="folder holding the dataset files (default $BUDGETPRUNE_DATA "
                                       "or ~/.cache/budgetprune/data)")
    p.add_argument("--download", action="store_true", help="fetch the dataset's canonical archives first")
    p.add_argument("--image-size", type=int, metavar="N",
                   help="folder:PATH: images resized and centre-cropped to N x N (default "
                        + ("32)" if augment else "the model file's input size)"))
    if augment:
        p.add_argument("--augment", choices=list(AUGMENTATIONS),
                       help="folder:PATH: training augmentation, none, flip (random horizontal flip) or crop-flip "
                            "(random crop of 25-100%% of the image resized to N x N, then the flip; default)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="folder:PATH: processes decoding images (default min(4, CPU count); 0: the main process)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="budgetprune", description="Train and prune a network under a resource budget.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("prune", help="train and prune a model under a budget")
    p.add_argument("--model", help="model name (see 'budgetprune list'), torchvision:NAME, timm:NAME or "
                                   "path/to/file.py:factory (your own code); required unless --resume")
    _add_data_args(p, required=False)
    p.add_argument("--budget",
                   help="allowed fraction of the unpruned cost (0.25) or pruning factor (4x) of --metric; "
                        "several metrics at once: volume=0.25,flops=0.2 (required unless --resume)")
    p.add_argument("--metric", help="volume (activations; the default), flops, params, latency (measured per layer "
                                    "on this device in eager PyTorch, cached; latency:onnxruntime or "
                                    "latency:torchscript in those runtimes) or nonzero (conv/linear weights; the "
                                    "default with --granularity weight)")
    p.add_argument("--granularity", choices=["channel", "weight"],
                   help="prune whole channels (default: a physically smaller net) or single weights (l0, "
                        "constrained-l0, cs, sensitivity: a sparse net under a nonzero budget)")
    p.add_argument("--method", help="pruning method: bar (default), l0, constrained-l0, cs, sensitivity, "
                                    "ib, morphnet, random, magnitude, vq or id (see the README's Methods)")
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the method (repeatable), e.g. rounds=3 for cs, kind=specific for "
                        "sensitivity, targets=layer for constrained-l0 (see the README's Methods)")
    p.add_argument("--out", required=True, help="run folder for the model, metrics, report and checkpoints")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out (options left out are the run's; those given "
                        "must match it, except --device, --data-root, --workers and --no-progress)")
    p.add_argument("--teacher", help="trained unpruned model (a budgetprune model.pt/teacher.pt or a state dict)")
    p.add_argument("--epochs", type=int, help="train+prune epochs (paper: 80; default 10)")
    p.add_argument("--finetune-epochs", type=int, help="fine-tune epochs with frozen gates (paper: 40; default 4)")
    p.add_argument("--lowlr-epochs", type=int, help="last fine-tune epochs: at lr/10 with --lr-schedule constant (paper: 10), "
                                                    "the cosine's tail otherwise (default 1)")
    p.add_argument("--teacher-epochs", type=int, help="epochs to train the unpruned teacher (default 5)")
    p.add_argument("--lr", type=float, help="learning rate of the network's weights (default 1e-3)")
    p.add_argument("--optimizer", help="teacher and fine-tune optimizer: adamw (decoupled weight decay; the "
                                       "default), adam (coupled L2; the paper's) or sgd")
    p.add_argument("--weight-decay", type=float, help="weight decay as --optimizer applies it (default 0.05; "
                                                      "the paper's Adam: 5e-4); never on gates")
    p.add_argument("--momentum", type=float, help="sgd: momentum (default 0.9)")
    p.add_argument("--nesterov", action="store_true", help="sgd: Nesterov momentum")
    p.add_argument("--lr-schedule", help="learning rate over each stage: cosine (default) or onecycle (both anneal "
                                         "the whole stage, --lowlr-epochs included), or constant (fine-tune ends "
                                         "with --lowlr-epochs at lr/10); the gates' rate stays constant")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up at the start of each stage, in epochs "
                                                       "(fractions allowed; default 0.5)")
    p.add_argument("--label-smoothing", type=float, help="label smoothing of the teacher's cross-entropy and of "
                                                         "distillation's hard-label term (default 0.1)")
    p.add_argument("--prune-recipe", help="prune stage: paper (default: Adam at --lr, L2 5e-4, constant rate, "
                                          "as BAR was tuned) or same (the recipe options above)")
    p.add_argument("--validation", type=float, metavar="N",
                   help="hold out N training images (or a fraction, 0.1) chosen from --seed, never trained on; "
                        "every epoch logs val_accuracy (default 0: none)")
    p.add_argument("--gate-lr", type=float, help="learning rate of the gate parameters (default 1e-2)")
    p.add_argument("--batch-size", type=int, help="batch size (default 64)")
    p.add_argument("--lam", type=float, help="weight λ of the method's penalty (default: the method's; bar 1e-5, "
                                              "l0 0.1/N)")
    p.add_argument("--gate-init", type=float, help="initial log α of Hard Concrete gates (default 3, gates open, "
                                                    "when the student starts from the teacher; 0, the paper's, with "
                                                    "--student-init random); s0 of cs (default 0)")
    p.add_argument("--gate-survival", type=float, metavar="FRACTION",
                   help="instead of a fixed start: Hard Concrete gates start at the lowest log α (0, 0.5, ..., 4) at "
                        "which the student with its gates sampled keeps its own ungated answer on this fraction of 1024 "
                        f"training images (e.g. {gate_start.SURVIVAL:g}; the log shows each start's fraction)")
    p.add_argument("--gate-sample", choices=["example", "batch"],
                   help="training samples of stochastic gates: one per example and channel (default) or one per "
                        "channel for the batch (folded into the layer's weights: a cheaper step)")
    p.add_argument("--cpu-buffers", choices=cpu_allocator.CHOICES,
                   help="training on the CPU: glibc's malloc keeps freed buffers for reuse (keep, the default: "
                        "faster steps, the process holds its peak memory) or the allocator is left as it is (system)")
    p.add_argument("--dual-lr", type=float, help="constrained-l0: learning rate of the multipliers (default 1e-2)")
    p.add_argument("--schedule", choices=["sigmoid", "linear", "exponential"], help="budget schedule")
    p.add_argument("--schedule-end", type=float,
                   help="fraction of the train+prune epochs after which the budget has reached its target and "
                        "the rest trains at it (default 1: at their end, the paper's)")
    p.add_argument("--student-init", choices=["teacher", "random"], help="start the student from (default teacher)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--device", help="cpu (default), cuda or cuda:N")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="training precision: fp32 (default), or autocast to bf16 or fp16 (fp16 with a gradient "
                        "scaler); gates, costs and barrier stay float32")
    p.add_argument("--no-fill", action="store_true",
                   help="do not reopen channels when the run ends under its budget (default: fill up to it)")
    p.add_argument("--block", choices=["auto", "mixed", "regular"],
                   help="residual sums of the compacted net: mixed (each tensor keeps its own channels, sums "
                        "gather them), regular (added tensors keep equal widths) or auto (per sum, the one that "
                        "runs faster in the --deploy-runtime); default: mixed under volume budgets alone (each kept "
                        "channel is one the method trained), auto with a FLOP, params or latency budget")
    p.add_argument("--deploy-runtime", choices=["eager", "torchscript", "onnxruntime", "none"],
                   help="where the result runs: --block auto weighs gathers at their cost there, and the "
                        "result's speed is timed there against the unpruned network's (metrics.json 'deployed'); "
                        "default: the latency budget's runtime, else onnxruntime when installed, else eager")
    p.add_argument("--deploy-batch", type=int,
                   help="the batch the result runs at where it is deployed (default 1): latency budgets time "
                        "their layers and the exported network at it, the auto padding is timed at it, and "
                        "metrics.json 'deployed' is measured at it")
    p.add_argument("--channel-multiple", type=channel_multiple_arg,
                   help="pad every kept width to a multiple of this many channels, counted in the budget "
                        "(onnxruntime's fast CPU convolutions need 8, or 16 with AVX-512); 1: exact widths (the "
                        "default under volume budgets alone); auto (the default with a FLOP, params or latency "
                        "budget): multiples of 8 in feature maps and token tensors, (batch, features) exact, "
                        "loosened (maps of 32 channels or more, then those keeping 32 or more, then exact) where "
                        f"that cannot end within {FILLED} of the budget or leaves the channels the method chose under "
                        f"{PADDING_KEEPS} of it; unless --deploy-runtime none, multiples of 16 are "
                        "timed against 8 and the padding against exact widths, each kept where it runs 1.05x faster")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    n = sub.add_parser("inspect", help="what in a model can be pruned, what cannot and why, and its costs")
    n.add_argument("--model", required=True, help="model name (see 'budgetprune list'), torchvision:NAME, "
                                                  "timm:NAME or path/to/file.py:factory")
    n.add_argument("--input-shape", default="1,28,28", help="one input without the batch dimension (default 1,28,28)")
    n.add_argument("--num-classes", type=int, default=10)

    d = sub.add_parser("demo", help="prune LeNet-5 on the embedded Fashion-MNIST subset (offline, minutes)")
    d.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    d.add_argument("--budget", default="0.25", help="budget (default 0.25 = 4x)")
    d.add_argument("--device", default="cpu")
    d.add_argument("--no-progress", action="store_true")

    i = sub.add_parser("info", help="per-layer widths, volume, FLOPs and params of a model file")
    i.add_argument("model_file")

    e = sub.add_parser("evaluate", help="test accuracy of a model file on a dataset")
    e.add_argument("model_file")
    _add_data_args(e, augment=False)
    e.add_argument("--device", default="cpu")

    x = sub.add_parser("export", help="write a model file as TorchScript or ONNX (checked against the model)")
    x.add_argument("model_file")
    x.add_argument("--format", required=True, choices=["torchscript", "onnx"], help="torchscript or onnx")
    x.add_argument("--out", required=True, help="file to write")
    x.add_argument("--input-shape", help="shape of one input without the batch dimension, e.g. 3,32,32 "
                                         "(default: the shape the model file records)")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")

    sub.add_parser("list", help="models, datasets, methods and metrics")
    return parser


#: PruneConfig fields a resumed run may change: they do not change its result.
RESUME_MAY_CHANGE = ("device", "data_root", "progress", "workers", "deploy_runtime", "cpu_buffers")

#: PruneConfig fields set by the prune option of the same name.
_PLAIN_OPTIONS = ("model", "data", "data_root", "image_size", "augment", "workers", "method", "teacher",
                  "granularity", "epochs", "finetune_epochs", "lowlr_epochs", "teacher_epochs", "lr", "gate_lr",
                  "batch_size", "lam", "gate_init", "gate_survival", "gate_sample", "dual_lr", "schedule", "schedule_end",
                  "student_init", "seed", "device", "block", "channel_multiple", "precision", "deploy_runtime",
                  "deploy_batch", "cpu_buffers", "optimizer", "weight_decay",
                  "momentum", "lr_schedule", "warmup_epochs", "label_smoothing", "prune_recipe", "validation")


def cmd_prune(args) -> int:
    """``budgetprune prune``; under ``torchrun`` each process runs it as one rank of the run
    (rank 0 holds the folder's lock and writes; every rank checks the options first)."""
    from . import distributed
    from .runfolder import RunFolder

    missing = [f"--{name}" for name in ("model", "data", "budget") if getattr(args, name) is None]
    if missing and not args.resume:
        raise ConfigError(f"the following arguments are required: {', '.join(missing)} "
                          "(see 'budgetprune prune --help')")
    out = Path(args.out)
    try:
        with distributed.main_only(RunFolder(out)):  # no other run writes in out while these checks and the run go on
            config = _resumed_config(args, out) if args.resume else _new_config(args, out)
            config.progress = not args.no_progress and sys.stderr.isatty()
            config.device = distributed.init_from_env(config.device)
            distributed.barrier()  # every rank has checked the folder before rank 0 writes in it
            return _run(config, out, resume=args.resume, download=getattr(args, "download", False))
    finally:
        distributed.shutdown()


def _new_config(args, out: Path):
    from .pipeline import PruneConfig
    if (out / "checkpoint.pt").exists() or (out / "metrics.json").exists():
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    config = PruneConfig(**_given_options(args, PruneConfig()))
    config.validate()
    return config


def _resumed_config(args, out: Path):
    """The saved config of the run in ``out``, with the options that may change taken from ``args``."""
    if not (out / "checkpoint.pt").exists():
        raise ConfigError(f"{out} holds no interrupted run to resume (no checkpoint.pt); drop --resume")
    from .pipeline import diverged_lr
    config = _saved_config(out)
    given = _given_options(args, config)
    may_change = RESUME_MAY_CHANGE + (("lr",) if diverged_lr(out) is not None else ())  # a lower one, after a divergence
    _refuse_changes(config, given, out, may_change)
    for name in may_change:
        if name in given:
            setattr(config, name, given[name])
    config.validate()
    return config


def _saved_config(out: Path):
    from .pipeline import PruneConfig
    path = out / "config.json"
    if not path.is_file():
        raise ConfigError(f"{out} holds a checkpoint but no config.json, so the run's options are unknown; "
                          "start afresh with another --out")
    try:
        saved = json.loads(path.read_text())
        return PruneConfig.from_dict(saved)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        first = first_line(exc)
        raise ConfigError(f"{path} cannot be read ({first}); start afresh with another --out") from None


def _given_options(args, base) -> dict:
    """The PruneConfig fields the prune command line sets, resolved (``--budget 4x`` → budget 0.25,
    ``--data folder:PATH`` with PATH absolute).

    Options left off the command line are left out. A ``--budget`` without ``--metric`` is read
    in ``base``'s metric (the saved run's on --resume) unless ``--granularity`` changes it.
    """
    from .budget import parse_budgets
    from .data.folder import absolute_folder_data, is_folder_data
    from .pipeline import PruneConfig
    given = {name: getattr(args, name) for name in _PLAIN_OPTIONS if getattr(args, name, None) is not None}
    if is_folder_data(given.get("data")):
        given["data"] = absolute_folder_data(given["data"])  # config.json holds a path any folder resumes from
    granularity = given.get("granularity", base.granularity)
    metric = args.metric or (base.metric if granularity == base.granularity
                             else PruneConfig(granularity=granularity).metric)
    if args.budget is not None:
        first, *more = parse_budgets(args.budget, metric)
        given.update(budget=first.fraction, metric=first.metric, extra_budgets={b.metric: b.fraction for b in more})
    elif args.metric is not None:
        given["metric"] = args.metric
    if args.method_option:
        given["method_options"] = parse_method_options(args.method_option)
    if args.no_fill:
        given["fill_budget"] = False
    if args.nesterov:
        given["nesterov"] = True
    return given


def _refuse_changes(saved, given: dict, out: Path, may_change: tuple[str, ...] = RESUME_MAY_CHANGE) -> None:
    """One-line ConfigError naming each option in ``given`` that differs from the ``saved`` run and
    could change its result (all but ``may_change``)."""
    from dataclasses import fields
    changed = [_describe_change(f.name, given[f.name], getattr(saved, f.name)) for f in fields(saved)
               if f.name in given and f.name not in may_change and given[f.name] != getattr(saved, f.name)]
    if changed:
        raise ConfigError(f"--resume with options that differ from the run in {out}: {', '.join(changed)}; "
                          "rerun with the run's options or choose another --out")


def _describe_change(name: str, value, saved) -> str:
    """``--budget 0.5 (run: 0.25)``."""
    def show(v):
        if isinstance(v, dict):
            return ",".join(f"{k}={json.dumps(x) if not isinstance(x, str) else x}" for k, x in v.items()) or "none"
        if isinstance(v, float):
            return f"{v:g}"
        return "not set" if v is None else str(v)
    if name == "fill_budget":
        return "--no-fill (run: without it)" if value is False else "without --no-fill (run: --no-fill)"
    option = {"extra_budgets": "--budget, other metrics", "method_options": "--method-option"}.get(
        name, "--" + name.replace("_", "-"))
    return f"{option} {show(value)} (run: {show(saved)})"


def parse_method_options(items: list[str]) -> dict:
    """``["rounds=3", "kind=specific", "layer_lam={\"conv1\": 2}"]`` → a dict; a value is read
    as JSON (numbers, true/false, objects) and otherwise kept as text."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--method-option '{item}' is not KEY=VALUE: write e.g. --method-option rounds=3")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value.strip()
    return out


def _run(config, out: Path, resume: bool, download: bool = False) -> int:
    from .api import load_teacher
    from .data import load_dataset
    from .distributed import is_main, world_size
    from .io import write_json
    from .models import create_model
    from .pipeline import PruneRun
    from .methods import available_methods
    from .seeding import seed_model_init

    if config.method not in available_methods():
        raise ConfigError(f"unknown method '{config.method}': choose one of {', '.join(available_methods())}")
    config.validate()
    splits = load_dataset(config.data, root=config.data_root, download=download, progress=config.progress,
                          image_size=config.image_size, augment=config.augment, workers=config.workers)
    if splits.note and is_main():
        print(f"budgetprune: {splits.note}", flush=True)
    info = splits.info
    seed_model_init(config.seed)  # the same --seed, the same initial weights
    model = create_model(config.model, in_channels=info.in_channels, num_classes=info.num_classes,
                         input_size=info.image_size)
    teacher = None
    if config.teacher:
        teacher = load_teacher(config.teacher, model, splits.train[0][0].unsqueeze(0))
    run = PruneRun(model, splits.train, splits.test, config, out, teacher=teacher, log=print)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", asdict(config))
        budgets = ", ".join(f"{b.metric} {b.fraction:.4g} ({b.factor:.3g}x)" for b in config.budgets())
        processes = f" in {world_size()} processes" if world_size() > 1 else ""
        print(f"budgetprune: {config.method} on {config.model} / {config.data}, budget {budgets}; run folder {out}"
              + processes, flush=True)
    try:
        run.run(resume=resume)
    finally:
        splits.close()  # the DataLoader workers of a folder of images
    return 0


def cmd_demo(args) -> int:
    from .budget import parse_budget
    from .distributed import launched
    from .pipeline import PruneConfig
    from .runfolder import RunFolder
    if launched():
        raise ConfigError("the demo runs in one process: run 'budgetprune demo' without torchrun, or "
                          "'torchrun ... -m budgetprune prune --model lenet5 --data demo --budget 4x --out DIR'")
    out = Path(args.out)
    budget = parse_budget(args.budget, "volume")
    config = PruneConfig(budget=budget.fraction, model="lenet5", data="demo", teacher_epochs=4, epochs=8,
                         finetune_epochs=3, lowlr_epochs=1, device=args.device)
    config.progress = not args.no_progress and sys.stderr.isatty()
    with RunFolder(out):
        finished = (out / "metrics.json").exists() and (out / "checkpoint.pt").exists()
        resume = (out / "checkpoint.pt").exists() and not finished
        if finished:
            _clear_run_folder(out)  # a finished earlier demo run: start afresh
        if resume:
            _refuse_changes(_saved_config(out), asdict(config), out)
        code = _run(config, out, resume=resume)
    print(f"report: {out / 'report.md'}  model: {out / 'model.pt'}  (try: budgetprune info {out / 'model.pt'})")
    return code


def _clear_run_folder(out: Path) -> None:
    """Remove everything in the run folder ``out`` but its lock."""
    import shutil
    from .runfolder import LOCK_NAME
    for child in out.iterdir():
        if child.name == LOCK_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def cmd_info(args) -> int:
    import torch
    from .graph import ChannelGraph
    from .io import load_file, named_layer_specs
    from .resources import resource_report
    from .sparsity import density

    model, specs, meta = load_file(args.model_file)
    shape = meta.get("input_shape")
    if not shape:
        raise ConfigError(f"{args.model_file} does not record its input shape")
    graph = ChannelGraph.build(model, torch.zeros(1, *shape))
    res = resource_report(graph)
    print(f"{args.model_file}: input {tuple(shape)}, {sum(p.numel() for p in model.parameters())} parameters")
    for metric, value in meta.get("metrics", {}).items():
        print(f"  {printable(metric)}: {printable(value)}")  # the file's words: no terminal escapes
    layers = [(name, s) for name, s in named_layer_specs(specs) if s["op"] in ("conv2d", "linear")]
    w = max([8] + [len(name) + 2 for name, _ in layers])
    nonzero = density(model)
    print(f"  {'layer':<{w}}{'type':<10}{'in':>8}{'out':>8}{'area':>8}{'nonzero':>10}")
    for name, s in layers:
        if name in graph.layers:
            layer = graph.layers[name]
            nz = nonzero.get(name, {"nonzero": 0, "total": 1})
            print(f"  {name:<{w}}{s['op']:<10}{layer.in_features:>8}{layer.out_channels:>8}{layer.out_area:>8}"
                  f"{nz['nonzero'] / nz['total']:>10.1%}")
    kept, total = sum(v["nonzero"] for v in nonzero.values()), sum(v["total"] for v in nonzero.values())
    print(f"  volume {res['volume']:.6g}   flops (MACs) {res['flops']:.6g}   params {res['params']:.6g}   "
          f"non-zero weights {kept} of {total} ({kept / max(total, 1):.1%})")
    return 0


def cmd_evaluate(args) -> int:
    from .data import load_dataset
    from .data.folder import is_folder_data
    from .engine import evaluate
    from .inputs import check_classifier
    from .io import load_file
    from .pipeline import resolve_device

    model, specs, meta = load_file(args.model_file)
    shape = tuple(meta.get("input_shape") or ())
    image_size = args.image_size
    if image_size is None and is_folder_data(args.data) and len(shape) == 3 and shape[1] == shape[2]:
        image_size = shape[1]  # the size the model was trained on
    splits = load_dataset(args.data, root=args.data_root, download=args.download, image_size=image_size,
                          workers=args.workers)
    data_shape = tuple(splits.test[0][0].shape)
    if shape and shape != data_shape:
        fix = (f"pass --image-size {shape[1]}" if is_folder_data(args.data) and len(shape) == 3 and shape[0] == 3
               and shape[1] == shape[2] else "evaluate it on the dataset it was trained on")
        raise ConfigError(f"{args.model_file} takes inputs of shape {shape} but {args.data} images are "
                          f"{data_shape}; {fix}")
    try:
        check_classifier(model, splits.test[0][0].unsqueeze(0))
    except ConfigError as exc:
        raise CheckpointError(f"{args.model_file} cannot be scored on {args.data}: {exc}") from None
    device = resolve_device(args.device)
    try:
        res = evaluate(model.to(device), splits.test, device, workers=args.workers)
    finally:
        splits.close()
    if splits.note:
        print(splits.note)
    print(f"{args.model_file} on {args.data} test ({len(splits.test)} images): accuracy {res['accuracy']:.4f}, "
          f"loss {res['loss']:.4f}")
    return 0


def _input_shape(text: str) -> tuple[int, ...]:
    """``"3,32,32"`` → ``(3, 32, 32)``; one-line ConfigError otherwise."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise ConfigError(f"--input-shape must be positive sizes separated by commas, e.g. 3,32,32; got '{text}'")
    return shape


def cmd_export(args) -> int:
    import torch
    from .export import check_output_file, to_onnx, to_torchscript
    from .io import load_file

    check_output_file(args.out)
    model, _, meta = load_file(args.model_file)
    shape = _input_shape(args.input_shape) if args.input_shape else tuple(meta.get("input_shape") or ())
    if not shape:
        raise ConfigError(f"{args.model_file} does not record its input shape; pass --input-shape, e.g. 3,32,32")
    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:
        first = first_line(exc)
        raise ConfigError(f"{args.model_file} does not take inputs of shape {shape} ({first}); "
                          "pass the --input-shape it was trained on") from None
    if args.format == "torchscript":
        result = to_torchscript(model, args.out, example)
        how = f"torch.jit.{result['method']}"
    else:
        result = to_onnx(model, args.out, example, opset=args.opset)
        how = f"opset {result['opset']}, {result['exporter']} exporter"
    check = (f"max abs difference {result['max_abs_diff']:.3g} on 2 random inputs of shape {shape}"
             if result["verified"] else f"not checked: {result['note']}")
    print(f"{args.out}: {args.format} ({how}); {check}")
    return 0


def cmd_inspect(args) -> int:
    import torch

    from .graph import ChannelGraph
    from .models import create_model
    from .resources import resource_report
    shape = _input_shape(args.input_shape)
    if len(shape) != 3:
        raise ConfigError(f"--input-shape must be C,H,W (e.g. 3,32,32); got '{args.input_shape}'")
    kwargs = {"in_channels": shape[0], "num_classes": args.num_classes, "input_size": shape[1:]}
    model = create_model(args.model, **kwargs)
    graph = ChannelGraph.build(model, torch.zeros(1, *shape), gate_inputs=True)
    print(graph.summary())
    full = resource_report(graph)
    print(f"unpruned: volume {full['volume']:.6g}, FLOPs {full['flops']:.6g}, params {full['params']:.6g}")
    return 0


def cmd_list(args) -> int:
    from .data import available_datasets
    from .methods import available_methods
    from .models import available_models
    from .resources import BUDGET_METRICS
    print("models:  ", ", ".join(available_models()))
    print("datasets:", ", ".join(available_datasets()), "(or folder:PATH, your own images)")
    print("methods: ", ", ".join(available_methods()))
    print("metrics: ", ", ".join(BUDGET_METRICS))
    return 0


COMMANDS = {"prune": cmd_prune, "demo": cmd_demo, "info": cmd_info, "evaluate": cmd_evaluate, "export": cmd_export,
            "inspect": cmd_inspect, "list": cmd_list}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except BudgetpruneError as exc:
        print(f"budgetprune: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        from .distributed import is_main
        if is_main():  # under torchrun every process is interrupted; one says so
            print("budgetprune: interrupted; every finished epoch is saved: rerun the same command with --resume "
                  "to continue", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
