"""The training recipe (budgetprune.recipe): the learning-rate schedule against hand-worked values
and PyTorch's schedulers, label smoothing against a hand computation, the optimizers' weight
decay semantics, bad values as one-line errors, and a resumed cosine run equal to an
uninterrupted one."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import budgetprune
from budgetprune import cli
from budgetprune.errors import ConfigError
from budgetprune.objectives import distillation_loss, smoothed_cross_entropy
from budgetprune.pipeline import BEFORE_OPTION, PruneConfig, PruneRun
from budgetprune.recipe import PAPER, Recipe, lr_factor, make_optimizer, stage_schedule

COSINE = Recipe(schedule="cosine")


# -- the schedule ------------------------------------------------------------------------

def test_cosine_by_hand_at_start_middle_and_end():
    assert lr_factor(COSINE, 0, 10) == 1.0
    assert lr_factor(COSINE, 5, 10) == pytest.approx(0.5)  # (1 + cos(π/2)) / 2
    assert lr_factor(COSINE, 9, 10) == pytest.approx((1 - 0.9510565163) / 2)  # cos(0.9π) = −0.951
    assert lr_factor(COSINE, 25, 10) == lr_factor(COSINE, 9, 10)  # past the end: the last step's


def test_linear_warmup_then_constant_or_cosine():
    assert [lr_factor(PAPER, s, 10, warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(COSINE, 1, 10, warmup_steps=2) == 1.0  # the warm-up's last step
    assert lr_factor(COSINE, 2, 10, warmup_steps=2) == 1.0  # the cosine's first
    assert lr_factor(COSINE, 6, 10, warmup_steps=2) == pytest.approx(0.5)  # t = 4/8


def test_cosine_and_onecycle_match_pytorch_schedulers():
    def torch_rates(make, steps):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched, rates = make(opt), []
        for _ in range(steps):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return rates
    cosine = torch_rates(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20), 20)
    assert [lr_factor(COSINE, s, 20) for s in range(20)] == pytest.approx(cosine)
    one = Recipe(schedule="onecycle")
    torch_one = torch_rates(lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=20), 20)
    assert [lr_factor(one, s, 20) for s in range(20)] == pytest.approx(torch_one)
    # by hand: 1/25 at the start, 1 at the peak (30 % of 20 steps: step 5), 1/(25 · 10⁴) at the end
    assert lr_factor(one, 0, 20) == pytest.approx(0.04)
    assert lr_factor(one, 5, 20) == pytest.approx(1.0)
    assert lr_factor(one, 19, 20) == pytest.approx(4e-6)
    assert lr_factor(one, 3, 20, warmup_steps=4) == pytest.approx(1.0)  # --warmup-epochs moves the peak


def test_fine_tune_tail_at_lr_tenth_for_constant_only_and_gates_keep_their_rate():
    weights, gates = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.zeros(2))
    groups = [{"params": [weights], "name": "weights"},
              {"params": [gates], "lr": 1e-2, "weight_decay": 0.0, "name": "gates"}]
    opt = make_optimizer(groups, Recipe(lr=2e-3))
    set_step = stage_schedule(opt, Recipe(lr=2e-3), steps_per_epoch=10, epochs=3, lowlr_epochs=1, lowlr_factor=0.1)
    set_step(29)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3)
    set_step(30)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4)
    assert opt.param_groups[1]["lr"] == 1e-2 and opt.param_groups[1]["weight_decay"] == 0.0
    opt = make_optimizer(groups, Recipe(lr=2e-3, schedule="cosine"))
    set_step = stage_schedule(opt, Recipe(lr=2e-3, schedule="cosine"), 10, 3, lowlr_epochs=1, lowlr_factor=0.1)
    set_step(20)  # cosine spans all 40 steps: t = 1/2, no extra factor in the tail
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    set_step(30)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3 * (1 + math.cos(math.pi * 0.75)) / 2)
    assert opt.param_groups[1]["lr"] == 1e-2  # the gates follow no schedule


# -- label smoothing -----------------------------------------------------------------------

def test_label_smoothing_by_hand_and_in_distillation():
    logits, y, eps = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0]), 0.3
    logp = [2.0 - math.log(math.exp(2) + 1 + math.exp(-1)), -math.log(math.exp(2) + 1 + math.exp(-1)),
            -1.0 - math.log(math.exp(2) + 1 + math.exp(-1))]
    hand = (1 - eps) * -logp[0] + eps * sum(-v for v in logp) / 3  # target (1 − ε) one-hot + ε/K
    assert float(smoothed_cross_entropy(logits, y, eps)) == pytest.approx(hand)
    assert float(smoothed_cross_entropy(logits, y, eps)) == pytest.approx(
        float(F.cross_entropy(logits, y, label_smoothing=eps)))
    assert float(smoothed_cross_entropy(logits, y, eps)) > float(smoothed_cross_entropy(logits, y))
    teacher = torch.tensor([[1.0, 0.5, 0.0]])
    # only the hard term is smoothed: the difference is (1 − α)(CE_ε − CE_0)
    gap = distillation_loss(logits, y, teacher, 0.9, 4.0, eps) - distillation_loss(logits, y, teacher, 0.9, 4.0)
    assert float(gap) == pytest.approx(0.1 * (hand + logp[0]))


# -- the optimizers and their weight decay -------------------------------------------------

def _one_step(recipe: Recipe) -> float:
    """A weight at 1 with no gradient from the loss: one step moves it by weight decay alone."""
    w = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = make_optimizer([w], recipe)
    (w * 0.0).sum().backward()
    opt.step()
    return float(w.detach())


def test_adamw_decays_apart_from_the_gradient_adam_and_sgd_through_it():
    lr, wd = 1e-3, 0.1
    assert type(make_optimizer([torch.nn.Parameter(torch.ones(1))], Recipe(optimizer="adamw"))) is torch.optim.AdamW
    # AdamW (decoupled): w ← w − lr·wd·w, the Adam step of a zero gradient is 0
    assert _one_step(Recipe(optimizer="adamw", lr=lr, weight_decay=wd)) == pytest.approx(1 - lr * wd, abs=1e-9)
    # Adam (coupled L2): the gradient wd·w is normalised by Adam, the first step is lr·sign
    assert _one_step(Recipe(optimizer="adam", lr=lr, weight_decay=wd)) == pytest.approx(1 - lr, abs=1e-6)
    # SGD: w ← w − lr·wd·w (momentum's first step is the gradient); Nesterov: × (1 + momentum)
    assert _one_step(Recipe(optimizer="sgd", lr=0.1, weight_decay=wd)) == pytest.approx(1 - 0.1 * wd)
    assert _one_step(Recipe(optimizer="sgd", lr=0.1, weight_decay=wd, nesterov=True)) == pytest.approx(
        1 - 0.1 * wd * 1.9)


def test_the_prune_stage_keeps_the_papers_recipe_unless_asked():
    cfg = PruneConfig(optimizer="sgd", lr=0.05, weight_decay=1e-4, lr_schedule="cosine", warmup_epochs=0.25,
                      label_smoothing=0.1)
    assert cfg.recipe("teacher") == Recipe("sgd", 0.05, 1e-4, schedule="cosine", warmup_epochs=0.25,
                                           label_smoothing=0.1)
    assert cfg.recipe("finetune") == cfg.recipe("teacher")
    assert cfg.recipe("prune") == Recipe("adam", 0.05, 5e-4)
    cfg.prune_recipe = "same"
    assert cfg.recipe("prune") == cfg.recipe("teacher")


# -- bad values ---------------------------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--optimizer", "rmsprop"], "unknown --optimizer 'rmsprop': choose one of adam, adamw, sgd"),
    (["--lr-schedule", "step"], "unknown --lr-schedule 'step'"),
    (["--weight-decay", "-1"], "--weight-decay -1 must be 0 or more"),
    (["--momentum", "1"], "--momentum 1 must lie in [0, 1)"),
    (["--nesterov"], "--nesterov needs --optimizer sgd"),
    (["--warmup-epochs", "-0.5"], "--warmup-epochs -0.5 must be 0 or more"),
    (["--label-smoothing", "1"], "--label-smoothing 1 must lie in [0, 1)"),
    (["--prune-recipe", "mine"], "unknown --prune-recipe 'mine': choose paper or same"),
    (["--validation", "2.5"], "--validation 2.5: give a number of training images"),
    (["--validation", "-1"], "--validation -1.0: give a number"),
])
def test_bad_recipe_values_are_one_line_errors_with_exit_code_2(tmp_path, capsys, flags, words):
    code = cli.main(["prune", "--model", "lenet5", "--data", "demo", "--budget", "0.25", "--out", str(tmp_path / "r"),
                     *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "r").exists()


# -- resume -------------------------------------------------------------------------------

def test_an_old_config_without_the_recipe_options_resumes_with_the_old_recipe():
    old = {k: v for k, v in PruneConfig(optimizer="sgd", lr_schedule="cosine", label_smoothing=0.1,
                                        validation=5).__dict__.items() if k not in BEFORE_OPTION or k == "lr"}
    cfg = PruneConfig.from_dict(old)
    assert (cfg.optimizer, cfg.lr_schedule, cfg.warmup_epochs, cfg.label_smoothing, cfg.prune_recipe,
            cfg.validation, cfg.weight_decay, cfg.batch_size) == ("adam", "constant", 0.0, 0.0, "paper", 0, 5e-4, 64)
    assert cfg.recipe("teacher") == PAPER


@pytest.mark.slow
def test_a_cosine_run_with_warmup_resumed_equals_the_uninterrupted_one(tmp_path):
    """Stopped in each stage after its first epoch and resumed, a run whose schedule is cosine with a
    fractional warm-up (prune stage too) ends with the same weights, history and learning rates:
    each step's rate is a function of the stage's step alone."""
    from budgetprune.data import load_dataset
    splits = load_dataset("demo")
    train, test = splits.train.subset(torch.arange(480)), splits.test.subset(torch.arange(100))
    options = dict(budget=0.25, model="lenet5", data="demo", teacher_epochs=2, epochs=2, finetune_epochs=1,
                   lowlr_epochs=1, optimizer="adamw", weight_decay=0.05, lr_schedule="cosine", warmup_epochs=0.5,
                   label_smoothing=0.1, prune_recipe="same", validation=96, progress=False,
                   deploy_runtime="none")  # nothing timed: a timed padding may choose differently in each run

    class Stop(Exception):
        pass

    def run(folder, resume=False, stop_at=None):
        def log(line):
            if stop_at and line.startswith(stop_at):
                raise Stop
        torch.manual_seed(0)
        return PruneRun(budgetprune.create_model("lenet5"), train, test, PruneConfig(**options), tmp_path / folder,
                        log=log).run(resume)

    whole = run("a")
    for stop in ("[teacher] epoch 2/", "[prune] epoch 2/", "[finetune] epoch 2/"):  # each after its epoch 1
        with pytest.raises(Stop):
            run("b", resume=stop != "[teacher] epoch 2/", stop_at=stop)
    resumed = run("b", resume=True)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(resumed.history) == strip(whole.history)
    rates = [r["lr"] for r in whole.history]
    assert rates[0] < 1e-3 and rates[1] < rates[0]  # the teacher's cosine has annealed
    assert all("val_accuracy" in r for r in whole.history)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["val_accuracy"] == whole.metrics["val_accuracy"]
    assert resumed.metrics["validation_images"] == 96 and "unpruned_val_accuracy" in resumed.metrics
    assert json.loads((tmp_path / "b" / "config.json").read_text())["lr_schedule"] == "cosine"
