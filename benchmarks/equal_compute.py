"""BAR's settings at equal compute, chosen on held-out validation images (a benchmark, not a test).

A fixed total of epochs (``--total-epochs``, the teacher's included) is split between the
teacher, the prune stage and the fine-tune stage in several ways, and BAR's own settings vary
around each split: the schedule end (the budget move finished after a fraction of the prune
stage, then training at the budget), the gates' initial log α, the prune stage's recipe, and the
student's initialisation. Every contender trains on the same images and is compared on the same
``--validation`` images held out of them (chosen from the seed, as ``budgetprune prune
--validation`` chooses them); the test accuracy is reported beside and chooses nothing.
Torch-Pruning's one-shot magnitude pruner (``peer_accuracy.py``'s recipe: the same teacher,
budgetprune's fine-tune stage for the rest of the epochs) runs on the same split as the reference.

Each variant is a split plus :class:`~budgetprune.pipeline.PruneConfig` options; a teacher is
trained once per (seed, teacher epochs) and shared. Differences under two standard errors are
ties (``stats.tie``). Runs are kept in ``--work`` and, with the page, in ``--out``'s JSON; neither
is trained again, and the page and the JSON are rewritten from all finished runs of the chosen
factors, variants and seeds.

    python benchmarks/equal_compute.py --data-root ../shared/data --factors 8 --seeds 0 --jobs 2
    python benchmarks/equal_compute.py --data-root ../shared/data --factors 4,8,16 --seeds 0,1,2 \\
        --variants t8-p2-f2,t8-p1-f3,tp-magnitude-oneshot --jobs 2
    python benchmarks/equal_compute.py --data-root ../shared/data --total-epochs 60 --factors 8,16 \\
        --seeds 0,1,2 --variants t40-p10-f10,tp-magnitude-oneshot --out benchmarks/results/equal_compute_60

Writes ``benchmarks/results/equal_compute.{json,md,png}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from budgetprune import io  # noqa: E402
from common import HERE, RESULTS, Parser, machine, name_list, write_results  # noqa: E402
from stats import format_mean_std, mean_std, tie  # noqa: E402

TP = "tp-magnitude-oneshot"

#: name -> (teacher epochs, prune epochs, fine-tune epochs, low-lr epochs, PruneConfig options).
#: The fine-tune stage is cosine-annealed over its fine-tune + low-lr epochs (the default recipe).
#: Gates start at log α = 0 unless a variant says otherwise: the study and its committed results were
#: made when that was the default (today's default, open gates, is the ``-init3`` variants).
SPLITS = {
    "t8-p2-f2": (8, 2, 1, 1, {}),
    "t8-p1-f3": (8, 1, 2, 1, {}),
    "t8-p3-f1": (8, 3, 0, 1, {}),
    "t6-p4-f2": (6, 4, 1, 1, {}),
    "t6-p3-f3": (6, 3, 2, 1, {}),
    "t10-p1-f1": (10, 1, 0, 1, {}),
    "t8-p2-f2-end0.5": (8, 2, 1, 1, {"schedule_end": 0.5}),
    "t8-p1-f3-end0.5": (8, 1, 2, 1, {"schedule_end": 0.5}),
    "t8-p2-f2-same": (8, 2, 1, 1, {"prune_recipe": "same"}),
    "t8-p2-f2-init3": (8, 2, 1, 1, {"gate_init": 3.0}),
    "t8-p2-f2-init3-end0.5": (8, 2, 1, 1, {"gate_init": 3.0, "schedule_end": 0.5}),
    "t8-p1-f3-init3": (8, 1, 2, 1, {"gate_init": 3.0}),
    "t8-p2-f2-random": (8, 2, 1, 1, {"student_init": "random"}),
    "t8-p2-f2-batch": (8, 2, 1, 1, {"gate_sample": "batch"}),
    # the long budget (--total-epochs 60): the short default's split, five times longer, and around it
    "t40-p10-f10": (40, 10, 5, 5, {}),
    "t30-p20-f10": (30, 20, 5, 5, {}),
    "t40-p15-f5": (40, 15, 3, 2, {}),
    "t40-p10-f10-init3": (40, 10, 5, 5, {"gate_init": 3.0}),
    "t40-p10-f10-init3-end0.5": (40, 10, 5, 5, {"gate_init": 3.0, "schedule_end": 0.5}),
}
SPLITS = {name: (*split[:4], {"gate_init": 0.0, **split[4]}) for name, split in SPLITS.items()}
VARIANTS = list(SPLITS) + [TP]


def tp_teacher_epochs(total: int) -> int:
    """Torch-Pruning's reference trains the teacher two thirds of the epochs (8 of 12, 40 of 60: the
    teacher of BAR's default split, so both share it), then prunes once and fine-tunes the rest."""
    return round(2 * total / 3)


def total_epochs(variant: str, total: int) -> int:
    if variant == TP:
        return total
    t, p, f, low, _ = SPLITS[variant]
    return t + p + f + low


def teacher_epochs(variant: str, total: int) -> int:
    return tp_teacher_epochs(total) if variant == TP else SPLITS[variant][0]


def describe(variant: str, total: int) -> str:
    """A variant in words, for the table."""
    if variant == TP:
        t = tp_teacher_epochs(total)
        return (f"Torch-Pruning group magnitude, one shot: teacher {t}, fine-tune {total - t} "
                "(budgetprune's fine-tune stage)")
    if variant not in SPLITS:  # a variant of an older version of this script, read from --work
        return variant
    t, p, f, low, opts = SPLITS[variant]
    words = f"teacher {t}, prune {p}, fine-tune {f + low}"
    return words + "".join(f", {k} {v}" for k, v in opts.items())


# -- one job, in its own process ---------------------------------------------------------------

def _data(data: str, data_root: str, validation: float, seed: int):
    import torch
    torch.set_num_threads(1)
    from budgetprune.data import load_dataset
    from budgetprune.data.validation import split_validation
    splits = load_dataset(data, root=data_root)
    fit, val = split_validation(splits.train, validation, seed)
    return splits, fit, val


def _teacher_folder(job: dict) -> Path:
    epochs = teacher_epochs(job["variant"], job["total"])
    return Path(job["work"]) / job["model"] / f"seed{job['seed']}" / f"teacher-{epochs}"


def _settings(job: dict, fit):
    import peer_accuracy
    t = teacher_epochs(job["variant"], job["total"])
    return peer_accuracy.Settings(job["data"], len(fit), t, max(job["total"] - t, 1), 0, 0, 1, 10)


def teacher_job(job: dict) -> dict:
    """Train the (seed, teacher epochs) teacher on the training part (or load it), once, before the
    runs that share it; its test accuracy is kept beside it."""
    import peer_accuracy
    splits, fit, _ = _data(job["data"], job["data_root"], job["validation"], job["seed"])
    start = time.time()
    folder = _teacher_folder(job)
    setup = peer_accuracy.prepare(job["model"], job["seed"], fit, splits.test, splits.info, _settings(job, fit),
                                  folder, log=lambda s: None)
    io.write_json(folder / "teacher_accuracy.json", {"test_accuracy": setup.teacher_accuracy})
    return {"teacher_accuracy": setup.teacher_accuracy, "seconds": time.time() - start}


def _setup(job: dict, splits, fit):
    """peer_accuracy's Setup from the teacher :func:`teacher_job` trained (read only: several runs
    share it at once)."""
    import peer_accuracy
    folder = _teacher_folder(job)
    accuracy = json.loads((folder / "teacher_accuracy.json").read_text())["test_accuracy"]
    return peer_accuracy.from_teacher(job["model"], job["seed"], fit, splits.test, splits.info,
                                      folder / "teacher.pt", accuracy), _settings(job, fit)


def run_job(job: dict) -> dict:
    """One (seed, factor, variant): its validation and test accuracy and FLOP reduction."""
    import budgetprune
    from budgetprune.engine import evaluate
    import peer_accuracy
    from peer import version

    splits, fit, val = _data(job["data"], job["data_root"], job["validation"], job["seed"])
    setup, settings = _setup(job, splits, fit)
    folder = Path(job["work"]) / job["model"] / f"seed{job['seed']}" / f"{job['variant']}-{job['factor']:g}"
    start = time.time()
    variant, factor = job["variant"], job["factor"]
    if variant == TP:
        import torch_pruning as tp
        net, record = peer_accuracy.run_tp(tp, setup, TP, factor, settings, log=lambda s: None)
        extra = {"torch_pruning": version("torch-pruning")}
    else:
        _, p, f, low, opts = SPLITS[variant]
        net, m = budgetprune.prune(setup.new_model(), fit, splits.test, budget=1.0 / factor, metric="flops",
                                   method="bar", teacher=setup.teacher_file, out=folder,
                                   resume=(folder / "checkpoint.pt").exists(), log=lambda s: None,
                                   epochs=p, finetune_epochs=f, lowlr_epochs=low, seed=job["seed"],
                                   progress=False, **opts)
        extra = {"budget_ratio": m["budget_ratio"]}
    costs = peer_accuracy.costs(net, setup.example)
    return {"model": job["model"], "data": job["data"], "seed": job["seed"], "factor": factor, "variant": variant,
            "val_accuracy": 100 * evaluate(net, val, peer_accuracy.CPU)["accuracy"],
            "test_accuracy": 100 * evaluate(net, splits.test, peer_accuracy.CPU)["accuracy"],
            "teacher_test_accuracy": 100 * setup.teacher_accuracy,
            "flops_reduction": setup.full["flops"] / costs["flops"], "seconds": time.time() - start, **extra}


def _teacher_key(job: dict) -> tuple:
    return job["seed"], teacher_epochs(job["variant"], job["total"])


def _failure(job: dict, exc: BaseException, what: str = "") -> str:
    return (f"{job['variant']} {job['factor']:g}x seed {job['seed']}: {what}{type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}")


def schedule_runs(pool, todo: list[dict], report, failed: list[str], train_teacher=None, run=None) -> None:
    """Run ``todo`` on ``pool``: each (seed, teacher epochs) teacher once, and each run as soon as its
    own teacher is ready, so that no worker waits while another teacher is still training. A
    finished run goes to ``report(job, run)``; a failed run, or every run of a failed teacher, is
    added to ``failed`` (one line each) and the others go on."""
    train_teacher, run = train_teacher or teacher_job, run or run_job
    waiting: dict[tuple, list[dict]] = {}
    for job in todo:
        waiting.setdefault(_teacher_key(job), []).append(job)
    pending = {pool.submit(train_teacher, jobs[0]): ("teacher", key) for key, jobs in waiting.items()}
    while pending:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in done:
            kind, item = pending.pop(future)
            if kind == "teacher":
                try:
                    print(f"teacher ready: {future.result()}", flush=True)
                except Exception as exc:  # its runs cannot start; the others go on
                    for job in waiting[item]:
                        failed.append(_failure(job, exc, "teacher "))
                        print(f"FAILED {failed[-1]}", flush=True)
                    continue
                pending.update({pool.submit(run, job): ("run", job) for job in waiting[item]})
                continue
            try:
                result = future.result()
            except Exception as exc:  # one failed run is reported; the others go on
                failed.append(_failure(item, exc))
                print(f"FAILED {failed[-1]}", flush=True)
                continue
            report(item, result)


def committed_runs(path: Path, base: dict) -> dict[tuple, dict]:
    """The runs of an earlier page at ``path`` made with the same model, data, total epochs and
    validation images, by (seed, variant, factor): finished work, not trained again (the page is
    rewritten from them and the new runs)."""
    if not path.exists():
        return {}
    record = json.loads(path.read_text())
    same = all(record.get(k) == base[k] for k in ("model", "data", "validation")) and \
        record.get("total_epochs") == base["total"]
    return {(r["seed"], r["variant"], float(r["factor"])): r for r in record.get("runs", [])} if same else {}


# -- the page --------------------------------------------------------------------------------

def summarise(runs: list[dict]) -> dict:
    """Per factor: per variant the seeds' accuracies; the best by validation among the variants
    run on the most seeds (a one-seed screen is not compared with a three-seed mean); ties with
    it; and each variant's mean difference from the best on the seeds both ran (paired: the same
    seed shares the teacher, the split and the data order)."""
    out: dict = {}
    for r in runs:
        out.setdefault(f"{r['factor']:g}", {}).setdefault(r["variant"], []).append(r)
    table = {}
    for factor, by_variant in out.items():
        val = {v: {r["seed"]: r["val_accuracy"] for r in rows} for v, rows in by_variant.items()}
        most = max(len(x) for x in val.values())
        best = max((v for v in val if len(val[v]) == most), key=lambda v: mean_std(list(val[v].values()))[0])

        def paired(v):
            shared = sorted(set(val[v]) & set(val[best]))
            return (sum(val[v][s] - val[best][s] for s in shared) / len(shared), shared) if shared else (None, [])

        def verdict(v):
            if v == best:
                return "—"
            if min(len(val[v]), len(val[best])) < 2:
                return "one seed"
            return "tie" if tie(list(val[v].values()), list(val[best].values())) else "worse"
        table[factor] = {"best_by_validation": best, "variants": {
            v: {"seeds": sorted(val[v]), "val": [val[v][s] for s in sorted(val[v])],
                "test": [r["test_accuracy"] for r in sorted(rows, key=lambda r: r["seed"])],
                "flops_reduction": [r["flops_reduction"] for r in rows],
                "vs_best": verdict(v), "paired_gap": paired(v)[0], "paired_seeds": paired(v)[1]}
            for v, rows in by_variant.items()}}
    return table


def _gap(r: dict) -> str:
    if r.get("paired_gap") is None:
        return "–"
    return f"{r['paired_gap']:+.2f} (seed {','.join(map(str, r['paired_seeds']))})"


def page(record: dict) -> str:
    lines = ["# BAR's settings at equal compute (chosen on validation)", "",
             f"Command: `{record['command']}`", "",
             f"{record['model']} on {record['data']}, {record['total_epochs']} epochs in total per contender (the "
             f"teacher's included); {record['validation']:g} training images held out (chosen from the seed) and "
             "never trained on. **Chosen by validation accuracy**; the test accuracy is reported, never used to "
             "choose. Accuracy in % (mean ± std over seeds); 'tie' = within two standard errors of the "
             "difference from the best (benchmarks/stats.py); the best is taken among the variants run on "
             "the most seeds; 'one seed': no spread to judge by, and a difference of a few tenths is noise, so "
             "such a variant is shown by its difference from the best on the same seed. FLOP budgets (the full model's FLOPs / factor). "
             f"Machine: {record['machine']}, {record['jobs']} runs at once, one thread each.", ""]
    for factor, s in sorted(record["results"].items(), key=lambda kv: float(kv[0])):
        lines += [f"## {factor}× FLOPs", "",
                  "| variant | what | seeds | val accuracy | vs best (val) | val − best's, same seeds | test accuracy "
                  "| FLOPs ÷ |", "|---|---|---|---|---|---|---|---|"]
        rows = sorted(s["variants"].items(), key=lambda kv: (-len(kv[1]["seeds"]), -mean_std(kv[1]["val"])[0]))
        for v, r in rows:
            name = f"{v} **(best val)**" if v == s["best_by_validation"] else v
            red = r["flops_reduction"]
            lines.append(f"| {name} | {describe(v, record['total_epochs'])} | {','.join(map(str, r['seeds']))} | "
                         f"{format_mean_std(r['val'])} | {r['vs_best']} | {_gap(r)} | {format_mean_std(r['test'])} | "
                         f"{min(red):.2f}–{max(red):.2f} |")
        lines.append("")
    lines += ["![each variant against the best, on the same seeds](equal_compute.png)", ""]
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from budgetprune import io
    results = sorted(record["results"].items(), key=lambda kv: float(kv[0]))
    if not results:
        return
    rows = max(len(s["variants"]) for _, s in results)
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 0.35 * rows + 2.0), squeeze=False)
    for ax, (factor, s) in zip(axes[0], results):
        v = s["variants"]
        names = sorted((n for n in v if v[n]["paired_gap"] is not None), key=lambda n: v[n]["paired_gap"])
        gaps = [v[n]["paired_gap"] for n in names]
        colors = ["tab:gray" if n == TP else "tab:blue" for n in names]
        ax.barh(range(len(names)), gaps, color=colors)
        ax.set_yticks(range(len(names)), [f"{n} (n={len(v[n]['paired_seeds'])})" for n in names], fontsize=8)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(f"validation accuracy − {s['best_by_validation']}'s on the same seeds (points)")
        ax.set_title(f"{record['model']}, {factor}× FLOPs, {record['total_epochs']} epochs")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    io.atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)


# -- the command -----------------------------------------------------------------------------

def main(argv=None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(HERE.parent.parent / "shared" / "data"))
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--model", default="lenet5")
    p.add_argument("--total-epochs", type=int, default=12, help="per contender, the teacher's included")
    p.add_argument("--factors", default="8", help="comma-separated FLOP reduction factors (default 8)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--variants", type=lambda t: name_list(t, VARIANTS, "variant"), default=None,
                   help=f"comma-separated, of {', '.join(VARIANTS)} (default: all of --total-epochs)")
    p.add_argument("--validation", type=float, default=10000, help="training images held out (default 10000)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs at once (one thread each)")
    p.add_argument("--work", default=str(HERE.parent / "runs" / "equal_compute"))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: rewrite the page from the finished runs in --work")
    args = p.parse_args(argv)
    try:
        factors = [float(f) for f in args.factors.split(",") if f.strip()]
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--factors and --seeds are comma-separated numbers (got {args.factors!r}, {args.seeds!r})")
    if not factors or any(f <= 1 for f in factors) or not seeds or any(s < 0 for s in seeds):
        p.error("--factors must be above 1 and --seeds 0 or more")
    if args.jobs < 1 or args.validation <= 0:
        p.error("--jobs must be at least 1 and --validation above 0 (the choice is made on it)")
    if args.variants is None:
        args.variants = [v for v in VARIANTS if total_epochs(v, args.total_epochs) == args.total_epochs]
    wrong = [v for v in args.variants if total_epochs(v, args.total_epochs) != args.total_epochs]
    if wrong:
        p.error(f"variants {', '.join(wrong)} are not {args.total_epochs} epochs in total: pick others or "
                "another --total-epochs")
    if args.total_epochs < 3:
        p.error("--total-epochs must be 3 or more (Torch-Pruning's reference trains a teacher two thirds of them)")
    base = dict(model=args.model, data=args.data, data_root=args.data_root, validation=args.validation,
                work=args.work, total=args.total_epochs)
    work = Path(args.work)
    cache = work / "runs"
    cache.mkdir(parents=True, exist_ok=True)

    def cached(job: dict) -> Path:
        return cache / f"{job['model']}_{job['data']}_seed{job['seed']}_{job['variant']}_{job['factor']:g}x_" \
                       f"{job['total']}ep_val{job['validation']:g}.json"

    committed = committed_runs(Path(args.out) / "equal_compute.json", base)

    def finished(job: dict) -> dict | None:
        """The job's run, from this machine's cache or from the results committed in --out."""
        if cached(job).exists():
            return json.loads(cached(job).read_text())
        return committed.get((job["seed"], job["variant"], job["factor"]))

    jobs = [base | {"seed": s, "factor": f, "variant": v} for s in seeds for f in factors for v in args.variants]
    todo = [] if args.report_only else [j for j in jobs if finished(j) is None]
    t0 = time.time()
    failed: list[str] = []

    def report(job: dict, run: dict) -> None:
        io.write_json(cached(job), run)
        print(f"{run['variant']} {run['factor']:g}x seed {run['seed']}: val {run['val_accuracy']:.2f} "
              f"test {run['test_accuracy']:.2f} FLOPs ÷ {run['flops_reduction']:.2f} ({run['seconds']:.0f} s)",
              flush=True)

    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        schedule_runs(pool, todo, report, failed)
    runs = [run for run in map(finished, jobs) if run is not None]
    record = {"command": "python benchmarks/equal_compute.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": args.model, "data": args.data, "total_epochs": args.total_epochs, "validation": args.validation,
              "machine": machine(), "jobs": args.jobs, "splits": {v: list(s) for v, s in SPLITS.items()},
              "runs": runs, "results": summarise(runs), "wall_seconds": time.time() - t0}
    out = write_results(args.out, "equal_compute", record, page(record))
    plot(record, out / "equal_compute.png")
    print(page(record))
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
