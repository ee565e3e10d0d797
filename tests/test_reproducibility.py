"""Divergence (a one-line TrainingDiverged that says what to rerun) and reproducibility (every
random stream from --seed)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

import budgetprune
import budgetprune.data
from budgetprune import cli
from budgetprune.data import load_dataset
from budgetprune.data.tensors import DataSplits
from budgetprune.engine import train_epoch
from budgetprune.recipe import Recipe, make_optimizer
from budgetprune.errors import TrainingDiverged
from budgetprune.pipeline import PruneConfig, PruneRun
from budgetprune.pruner import Pruner

TINY = ["--teacher-epochs", "1", "--epochs", "1", "--finetune-epochs", "1", "--lowlr-epochs", "0"]
SMALL = dict(teacher_epochs=1, epochs=2, finetune_epochs=1, lowlr_epochs=0, progress=False,
             deploy_runtime="none")  # the result's speed is not timed here (tests/test_cli.py times it)


def _demo_small():
    splits = load_dataset("demo")
    return DataSplits(splits.train.subset(torch.arange(640)), splits.test.subset(torch.arange(200)), splits.info)


@pytest.fixture
def small_demo_cli(monkeypatch):
    """`--data demo` on the command line reads 640 training and 200 test images (seconds per run)."""
    monkeypatch.setattr(budgetprune.data, "load_dataset", lambda *a, **k: _demo_small())


def _prune(out, *extra):
    code = cli.main(["prune", "--model", "lenet5", "--data", "demo", "--budget", "0.25", "--out", str(out),
                     "--no-progress", *TINY, *extra])
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


# -- reproducibility ---------------------------------------------------------------------

@pytest.mark.slow
def test_the_same_command_and_seed_twice_gives_identical_metrics(small_demo_cli, tmp_path):
    # an explicit channel multiple: the default auto padding is timed against exact widths, a choice
    # two runs may make differently (README, "Reproducibility and divergence")
    first = _prune(tmp_path / "a", "--seed", "3", "--channel-multiple", "1")
    torch.manual_seed(12345)  # whatever the process drew before must not matter
    second = _prune(tmp_path / "b", "--seed", "3", "--channel-multiple", "1")
    assert "padding_timing" not in first
    assert first.pop("deployed")["runtime"] == second.pop("deployed")["runtime"]  # timings differ
    assert first == second  # the rest of metrics.json holds no timings
    for name in ("history.json",):
        a = [{k: v for k, v in row.items() if k != "seconds"} for row in json.loads((tmp_path / "a" / name).read_text())]
        b = [{k: v for k, v in row.items() if k != "seconds"} for row in json.loads((tmp_path / "b" / name).read_text())]
        assert a == b
    same = budgetprune.load(tmp_path / "a" / "model.pt").state_dict()
    again = budgetprune.load(tmp_path / "b" / "model.pt").state_dict()
    assert all(torch.equal(same[k], again[k]) for k in same)
    # another seed: other initial weights, gate noise and batches, so other trained weights
    _prune(tmp_path / "c", "--seed", "4")
    other = budgetprune.load(tmp_path / "c" / "teacher.pt").state_dict()
    teacher = budgetprune.load(tmp_path / "a" / "teacher.pt").state_dict()
    assert not all(torch.equal(teacher[k], other[k]) for k in teacher)


def test_the_seed_fixes_the_initial_weights_of_a_created_model(small_demo_cli, tmp_path, monkeypatch):
    import budgetprune.pipeline as pipeline
    created = []

    class Stop(Exception):
        pass

    def stop(self, resume=False):
        created.append(copy.deepcopy(self.model.state_dict()))
        raise Stop
    monkeypatch.setattr(pipeline.PruneRun, "run", stop)
    for folder, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        torch.manual_seed(len(created))
        with pytest.raises(Stop):
            cli.main(["prune", "--model", "lenet5", "--data", "demo", "--budget", "0.25", "--out",
                      str(tmp_path / folder), "--no-progress", "--seed", seed, *TINY])
    a, b, c = created
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["bar", "ib"])
def test_api_runs_do_not_depend_on_the_callers_random_state_and_give_it_back(method):
    """Gate initialisation (ib: Gaussian) and gate noise come from ``seed``, not from whatever
    the caller's generator holds; the caller's generator continues as if nothing had run."""
    splits = _demo_small()
    torch.manual_seed(0)
    model = budgetprune.create_model("lenet5")
    results = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        _, m = budgetprune.prune(copy.deepcopy(model), splits.train, splits.test, budget=0.25, method=method,
                                 log=None, **SMALL)
        after = torch.rand(3)
        torch.manual_seed(caller_seed)
        assert torch.equal(after, torch.rand(3))  # the caller's stream is given back untouched
        results.append(m)  # nothing timed (deploy_runtime "none"): the whole metrics compare
    assert results[0] == results[1]


# -- divergence ----------------------------------------------------------------------------

def test_an_exploding_loss_stops_the_epoch_before_its_step_is_applied():
    from budgetprune.engine import DivergenceCheck
    check = DivergenceCheck()
    check.check_loss(2.3, 1e9, step=0)  # a large penalty (a barrier near its wall) is no divergence
    check.check_loss(2.3e3 - 1, None, step=1)
    with pytest.raises(TrainingDiverged, match="exploded to 2.4e\\+03 at step 2"):
        check.check_loss(2.4e3, None, step=2)
    with pytest.raises(TrainingDiverged, match="penalty became inf"):
        check.check_loss(1.0, float("inf"), step=3)
    # a well-fitted start (loss 0.01) does not make the limit tiny: it is floored at 1 nat
    DivergenceCheck(reference=0.01).check_loss(50.0, None, step=0)


def test_weights_that_overflow_in_the_last_step_of_an_epoch_are_caught():
    """A finite loss whose gradient is not: the step leaves NaN weights, and no later loss of
    this epoch would show it; they must not reach the epoch's checkpoint."""
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.arange(8) % 2)
    model = torch.nn.Linear(4, 2)
    opt = make_optimizer(list(model.parameters()), Recipe(weight_decay=0.0))

    def loss_fn(logits, y, idx, x):
        w = model.weight[0, 0]
        return torch.nn.functional.cross_entropy(logits, y) + (w - w.detach()).abs().sqrt()  # value +0, grad NaN
    with pytest.raises(TrainingDiverged, match="the weights weight became NaN or infinite by step 1"):
        train_epoch(model, data, opt, loss_fn, device=torch.device("cpu"), batch_size=8,
                    generator=torch.Generator().manual_seed(0), show_progress=False)


def test_lr_1e6_is_a_one_line_divergence_and_the_folder_takes_a_fresh_run(tmp_path, capsys):
    """The issue's probe: before, the loss stayed finite (~3e30) until compaction raised an
    'internal error' traceback, and --resume repeated it."""
    out = tmp_path / "run"
    args = ["prune", "--model", "lenet5", "--data", "demo", "--budget", "0.25", "--lr", "1e6", "--out", str(out),
            "--no-progress", *TINY]
    for _ in range(2):  # nothing of the failed run blocks the same command again
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and "internal error" not in err
        assert "budgetprune: error: the loss exploded" in err and "teacher epoch 1" in err
        assert "nothing to resume: rerun without --resume with a lower --lr (now 1e+06)" in err
        assert not (out / "checkpoint.pt").exists() and not (out / "metrics.json").exists()


@pytest.mark.slow
def test_a_resume_with_a_lower_lr_continues_from_the_last_good_checkpoint(tmp_path):
    """Prune epoch 2 diverges at lr 1e6; resumed at lr 1e-3 the run ends exactly as one that
    never diverged (the checkpoint of prune epoch 1, its optimizer state and random streams)."""
    splits = _demo_small()

    class Stop(Exception):
        pass

    def run(folder, lr, resume=False, log=lambda s: None):
        torch.manual_seed(0)
        cfg = PruneConfig(budget=0.25, model="lenet5", data="demo", lr=lr, **SMALL)
        return PruneRun(budgetprune.create_model("lenet5"), splits.train, splits.test, cfg, tmp_path / folder,
                        log=log).run(resume)

    def stop(line):
        if line.startswith("[prune] epoch 2/"):
            raise Stop

    whole = run("a", 1e-3)
    with pytest.raises(Stop):
        run("b", 1e-3, log=stop)
    with pytest.raises(TrainingDiverged) as info:
        run("b", 1e6, resume=True)
    msg = str(info.value)
    assert "in prune epoch 2" in msg and "the last good checkpoint (after prune epoch 1)" in msg
    assert msg.endswith("rerun with --resume and a lower --lr (now 1e+06)") and "\n" not in msg
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert (ckpt["stage"], ckpt["epoch"]) == ("prune", 1)
    resumed = run("b", 1e-3, resume=True)
    assert [(h["stage"], h["epoch"]) for h in resumed.history] == [(h["stage"], h["epoch"]) for h in whole.history]
    # the resumed epochs ran at the rates of the run at lr 1e-3 (whatever its schedule), none at 1e6
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in whole.history]
    assert max(h["lr"] for h in resumed.history) <= 1e-3
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compaction_compares_outputs_relative_to_their_size(tmp_path):
    huge = torch.full((4, 10), 3e30)
    near = huge * (1 + 1e-6)  # a float32 rounding difference at that size: ~3e24
    assert Pruner._check_outputs(huge, near, "compacted") == float((near - huge).max()) > 1e24
    with pytest.raises(RuntimeError, match="internal error"):
        Pruner._check_outputs(torch.ones(4, 10), torch.ones(4, 10) + 0.01, "compacted")
    with pytest.raises(TrainingDiverged, match="NaN or infinite"):
        Pruner._check_outputs(huge, huge * float("inf"), "compacted")
    # the run says what to do about it: the trained weights are unusable
    splits = _demo_small()
    run = PruneRun(budgetprune.create_model("lenet5"), splits.train, splits.test, PruneConfig(budget=0.25, **SMALL),
                   tmp_path, log=lambda s: None)

    class Exploded:
        def finalize(self, inputs):
            Pruner._check_outputs(huge, huge * float("inf"), "compacted")

    with pytest.raises(TrainingDiverged, match="NaN or infinite.*rerun with another --out and a lower --lr"):
        run._hard_prune(Exploded())


def test_the_command_line_resumes_a_diverged_run_only_with_a_lower_lr(tmp_path, small_demo_cli, capsys):
    """After a divergence the run folder records the learning rate; `--resume` must lower it
    (and may), every other option must still match the run, and the resumed run finishes."""
    splits = _demo_small()
    out = tmp_path / "run"

    class Stop(Exception):
        pass

    def stop(line):
        if line.startswith("[prune] epoch 2/"):
            raise Stop

    cfg = PruneConfig(budget=0.25, model="lenet5", data="demo", lr=1e-3, **SMALL)
    with pytest.raises(Stop):
        PruneRun(budgetprune.create_model("lenet5"), splits.train, splits.test, cfg, out, log=stop).run()
    cfg.lr = 1e6
    with pytest.raises(TrainingDiverged):
        PruneRun(budgetprune.create_model("lenet5"), splits.train, splits.test, cfg, out, log=lambda s: None).run(True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))  # as `prune --lr 1e6` writes it
    assert json.loads((out / "diverged.json").read_text())["lr"] == 1e6

    def resume(*extra):
        capsys.readouterr()
        code = cli.main(["prune", "--out", str(out), "--resume", "--no-progress", *extra])
        return code, capsys.readouterr().err

    code, err = resume()
    assert code == 2 and "diverged at --lr 1e+06: resume it with a lower --lr" in err
    code, err = resume("--lr", "1e-3", "--epochs", "5")
    assert code == 2 and "--epochs 5 (run: 2)" in err and "--lr" not in err
    assert resume("--lr", "1e-3")[0] == 0
    assert not (out / "diverged.json").exists()
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-3
    assert json.loads((out / "metrics.json").read_text())["budget_ratio"] <= 1.0
    code, err = resume("--lr", "1e-4")  # a finished run that did not diverge: lr is the run's again
    assert code == 2 and "--lr 0.0001 (run: 0.001)" in err
