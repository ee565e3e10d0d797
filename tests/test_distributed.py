"""Two processes (gloo on the CPU): a Pruner inside a user's DistributedDataParallel loop, and
``torchrun -m budgetprune prune``, end with the same masks and weights on every rank and meet the
budget."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import budgetprune
from budgetprune import distributed

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(method: str, optimizer: str, seed: int) -> dict:
    """A plain loop with a Pruner (a DDP one when a process group is up): three epochs of four
    global batches of 64 from the same shuffled order on every rank, each rank on its shard."""
    from budgetprune.data import load_dataset
    from budgetprune.engine import iterate_batches
    torch.manual_seed(seed)
    model = budgetprune.create_model("lenet5")
    train = load_dataset("demo").train.subset(range(256))
    pruner = budgetprune.Pruner(model, train[0][0].unsqueeze(0), budget="4x", method=method,
                                total_steps=3 * 4, gate_init=3.0)
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed.active() else model
    groups = pruner.parameters(lr=1e-3)
    opt = torch.optim.Adam(groups, lr=1e-3) if optimizer == "adam" else torch.optim.SGD(groups, lr=0.05)
    gen = torch.Generator().manual_seed(0)  # the same global batches on every rank
    for _ in range(3):
        for idx, x, y in iterate_batches(train, 64, shuffle=True, generator=gen):
            mine = distributed.shard(torch.arange(len(idx)))
            loss = torch.nn.functional.cross_entropy(net(x[mine]), y[mine]) + pruner.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            pruner.step()
    state = {k: v.clone() for k, v in pruner.state_dict()["method"].items()}
    small, report = pruner.finalize(train[0][0].unsqueeze(0).repeat(4, 1, 1, 1))
    return {"masks": report["masks"], "pruned": report["pruned"], "budget": pruner.budget.absolute(pruner.graph),
            "weights": small.state_dict(), "method_state": state}


def _user_loop(rank: int, port: int, out: str, method: str, optimizer: str) -> None:
    """One rank of :func:`_train`; writes what it ends with to ``out/rank.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        # different initial weights and gates per rank: rank 0's must win
        torch.save(_train(method, optimizer, seed=100 + rank), Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def _assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def _two_ranks(tmp_path, method: str, optimizer: str = "adam") -> dict:
    mp.spawn(_user_loop, args=(_free_port(), str(tmp_path), method, optimizer), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(WORLD))
    _assert_same(r0["method_state"], r1["method_state"], "method state")
    _assert_same(r0["masks"], r1["masks"], "masks")
    _assert_same(r0["weights"], r1["weights"], "weights")
    assert r0["pruned"]["volume"] <= r0["budget"] + 1e-9
    return r0


@pytest.mark.parametrize("method", ["bar", "sensitivity"])
def test_pruner_in_a_ddp_loop_gives_every_rank_the_same_result(tmp_path, method):
    _two_ranks(tmp_path, method)


def test_two_ranks_equal_one_process_on_the_same_global_batches(tmp_path):
    """MorphNet's gates on LeNet-5 (no BatchNorm) are the method's own deterministic parameters, so
    two half batches with averaged gradients are one whole batch, up to float rounding."""
    two = _two_ranks(tmp_path, "morphnet", "sgd")
    one = _train("morphnet", "sgd", seed=100)
    assert two["masks"] == one["masks"]
    for key in ("method_state", "weights"):
        for name, t in one[key].items():
            torch.testing.assert_close(two[key][name], t, rtol=1e-4, atol=1e-5, msg=f"{key} {name}")


def _split_evaluation(rank: int, port: int, out: str) -> None:
    """One rank evaluating a seeded LeNet-5 on 201 demo images split between the ranks, and
    computing its logits (a teacher's for distillation) the same way."""
    from budgetprune.data import load_dataset
    from budgetprune.engine import evaluate, iterate_batches, predict_logits
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model, data = budgetprune.create_model("lenet5"), load_dataset("demo").test.subset(range(201))
        mine = torch.cat([idx for idx, _, _ in iterate_batches(data, 16, part=True)])
        cpu = torch.device("cpu")
        torch.save({"result": evaluate(model, data, cpu, batch_size=16, split=True), "mine": mine,
                    "logits": predict_logits(model, data, cpu, batch_size=16, split=True)}, Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_evaluation_is_split_between_the_ranks_and_summed(tmp_path):
    from budgetprune.data import load_dataset
    from budgetprune.engine import evaluate, predict_logits
    mp.spawn(_split_evaluation, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(WORLD))
    assert len(r0["mine"]) == 101 and len(r1["mine"]) == 100  # each example once, on one rank
    assert sorted(torch.cat([r0["mine"], r1["mine"]]).tolist()) == list(range(201))
    torch.manual_seed(0)
    model, data = budgetprune.create_model("lenet5"), load_dataset("demo").test.subset(range(201))
    whole = evaluate(model, data, torch.device("cpu"), batch_size=16)
    logits = predict_logits(model, data, torch.device("cpu"), batch_size=16)
    for r in (r0, r1):
        assert r["result"]["accuracy"] == whole["accuracy"]
        assert r["result"]["loss"] == pytest.approx(whole["loss"], rel=1e-6)
        torch.testing.assert_close(r["logits"], logits)  # every row in dataset order, on both ranks


def _pipeline_run(rank: int, port: int, out: str, results: str) -> None:
    """One rank of the run pipeline: interrupted in its second prune epoch, then resumed."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        import budgetprune.pipeline as pl
        from budgetprune.data import load_dataset
        splits = load_dataset("demo")
        train, test = splits.train.subset(range(384)), splits.test.subset(range(128))
        cfg = pl.PruneConfig(budget=0.25, model="lenet5", data="demo", teacher_epochs=1, epochs=2, finetune_epochs=1,
                             lowlr_epochs=0, gate_init=3.0, progress=False, deploy_runtime="none")
        real, calls = pl.train_epoch, []

        def interrupted(*args, **kwargs):  # teacher 1, prune 1, then Ctrl-C on every rank
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real(*args, **kwargs)
        pl.train_epoch = interrupted
        torch.manual_seed(rank)  # each rank builds other weights: rank 0's must win
        with pytest.raises(KeyboardInterrupt):
            pl.PruneRun(budgetprune.create_model("lenet5"), train, test, cfg, out, log=lambda _: None).run()
        pl.train_epoch = real
        dist.barrier()
        result = pl.PruneRun(budgetprune.create_model("lenet5"), train, test, cfg, out,
                             log=lambda _: None).run(resume=True)
        torch.manual_seed(rank)  # the same initial weights as the interrupted run
        whole = pl.PruneRun(budgetprune.create_model("lenet5"), train, test, cfg, Path(out + "-whole"),
                            log=lambda _: None).run()  # the same run, not interrupted
        torch.save({"weights": result.model.state_dict(), "whole": whole.model.state_dict(),
                    "history": [h["stage"] for h in result.history],
                    "ratio": result.metrics["budget_ratio"], "kept": result.metrics["kept_channels"]},
                   Path(results) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_run_pipeline_resumes_in_two_processes_with_the_same_weights(tmp_path):
    out = tmp_path / "run"
    mp.spawn(_pipeline_run, args=(_free_port(), str(out), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(WORLD))
    _assert_same(r0["weights"], r1["weights"], "weights")
    _assert_same(r0["weights"], r0["whole"], "resumed vs uninterrupted weights")  # every rank resumes rank 0's state
    assert r0["kept"] == r1["kept"]
    assert r0["history"] == ["teacher", "prune", "prune", "finetune"]  # the resume lost no epoch
    assert 0.95 <= r0["ratio"] <= 1.0
    m = json.loads((out / "metrics.json").read_text())
    assert m["pruned"]["volume"] <= m["budget"] + 1e-9
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["checkpoint.pt", "config.json", "history.json", "metrics.json", "model.pt", "report.md", "teacher.pt",
         "widths.png"])


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun is not installed next to this Python")
def test_torchrun_command_line(tmp_path):
    out = tmp_path / "run"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--nproc_per_node", str(WORLD), "--master_port", str(_free_port()),
                           "-m", "budgetprune", "prune", "--model", "lenet5", "--data", "demo", "--budget", "4x",
                           "--out", str(out), "--no-progress", "--teacher-epochs", "0", "--epochs", "1",
                           "--finetune-epochs", "0", "--lowlr-epochs", "0", "--deploy-runtime", "none"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("done: test accuracy") == 1  # rank 0 speaks for both
    assert "in 2 processes" in proc.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["pruned"]["volume"] <= m["budget"] + 1e-9 and 0.95 <= m["budget_ratio"] <= 1.0


def test_one_process_is_untouched():
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    idx = torch.arange(5)
    assert torch.equal(distributed.shard(idx), idx)


@pytest.mark.parametrize("rank, said", [("0", True), ("1", False)])
def test_an_interrupt_under_torchrun_is_reported_once(rank, said, monkeypatch, capsys):
    from budgetprune import cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setitem(cli.COMMANDS, "list", interrupted)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    assert cli.main(["list"]) == cli.EXIT_INTERRUPTED
    assert ("--resume" in capsys.readouterr().err) == said


def test_the_demo_under_torchrun_is_refused_in_one_line(monkeypatch, capsys, tmp_path):
    from budgetprune import cli
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["demo", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "without torchrun" in err and "prune" in err
    assert not (tmp_path / "demo").exists()


class _Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("not picklable")


def _from_main_ranks(rank: int, port: int, out: str) -> None:
    """One rank of :func:`budgetprune.distributed.from_main`: rank 0 takes 1.5 s (sleeping) to
    compute; then rank 0 raises a ConfigError, then an error that cannot be pickled; then both
    ranks ask for a latency table (a stand-in measurement counting its calls, each rank its own
    cache, so rank 1 could only get its table by measuring or from rank 0)."""
    import time

    from budgetprune import latency
    from budgetprune.errors import ConfigError
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    result: dict = {}
    try:
        broadcast, entered = distributed.broadcast_object, []

        def recorded(*args, **kwargs):  # when this rank enters the collective
            entered.append(time.time())
            return broadcast(*args, **kwargs)
        distributed.broadcast_object = recorded
        start = time.process_time()
        result["value"] = distributed.from_main(lambda: (time.sleep(1.5), {"rank": rank, "done": time.time()})[1])
        result["cpu_s"] = time.process_time() - start  # what waiting for rank 0 cost this process
        result["entered"] = entered[0]
        distributed.broadcast_object = broadcast
        result["nested"] = distributed.from_main(lambda: [distributed.from_main(lambda: rank), "outer"])
        for name, error in (("config", ConfigError("the budget is over the model (fix: ...)")),
                            ("unpicklable", _Unpicklable("a lock in it"))):
            try:
                distributed.from_main(lambda: (_ for _ in ()).throw(error))
            except Exception as raised:
                result[name] = (type(raised).__name__, str(raised))
        os.environ["BUDGETPRUNE_CACHE"] = str(Path(out) / f"cache{rank}")
        calls = []

        def fake_measure(spec, device, repeats=20, runtime="eager"):
            calls.append(spec["out"])
            return {"table": [], "c_io": 1e-3 * spec["out"] * (1 + rank), "c_out": 0.01}

        latency.measure_layer = fake_measure
        graph = budgetprune.ChannelGraph.build(budgetprune.create_model("lenet5"), torch.zeros(1, 1, 28, 28))
        result["table"] = latency.layer_coefficients(graph)
        result["measured"] = len(calls)
        # a latency budget end to end: its cost models, built again inside finalize's decision, take the table
        torch.manual_seed(rank)  # different gates per rank: rank 0's decide
        x = torch.zeros(2, 1, 28, 28)
        pruner = budgetprune.Pruner(budgetprune.create_model("lenet5"), x, "latency=0.5", total_steps=1)
        result["masks"] = pruner.finalize(x)[1]["masks"]
        result["measured_after_finalize"] = len(calls)
        torch.save(result, Path(out) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_rank_zero_computes_while_the_others_wait_idle(tmp_path):
    mp.spawn(_from_main_ranks, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(WORLD))
    assert r0["value"] == r1["value"] and r0["value"]["rank"] == 0
    # rank 1 waited on the store, not inside the collective (where an NCCL rank spins a core), and idle
    assert r1["entered"] >= r0["value"]["done"] - 0.05
    assert r1["cpu_s"] < 0.5
    assert r0["nested"] == r1["nested"] == [0, "outer"]  # a from_main inside one computes in place
    for r in (r0, r1):  # rank 0's error, raised on every rank with its message
        assert r["config"] == ("ConfigError", "the budget is over the model (fix: ...)")
    assert r0["unpicklable"] == ("_Unpicklable", "a lock in it")
    assert r1["unpicklable"] == ("RuntimeError", "_Unpicklable: a lock in it")
    assert r0["measured"] == 4 and r1["measured"] == 0  # one rank times the layers
    assert r0["measured_after_finalize"] == 4 and r1["measured_after_finalize"] == 0  # rank 0's cache since
    _assert_same(r0["masks"], r1["masks"], "masks")
    assert r1["table"] == r0["table"]  # rank 0's table (rank 1's stand-in would double c_io)
    assert sorted(c_io for c_io, _ in r0["table"].values()) == pytest.approx([1e-3 * n for n in (10, 20, 50, 500)])
