"""Mixed precision: the pruner's numbers stay float32 under autocast, a bf16 run meets its budget
as an fp32 run does, and a bad precision is one line and exit code 2."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import budgetprune
from budgetprune import cli
from budgetprune.attach import gate_values
from budgetprune.errors import ConfigError
from budgetprune.pipeline import PruneConfig, PruneRun
from budgetprune.precision import autocast, check_precision, float32

FAST = ["--teacher-epochs", "1", "--epochs", "2", "--finetune-epochs", "1", "--lowlr-epochs", "0",
        "--deploy-runtime", "none"]  # the result's speed is not timed here (tests/test_cli.py times it)


def _pruner(method="bar", **kw):
    torch.manual_seed(0)
    model = budgetprune.create_model("lenet5")
    return budgetprune.Pruner(model, torch.randn(4, 1, 28, 28), budget="4x", method=method, total_steps=10, **kw)


@pytest.mark.parametrize("method", ["bar", "constrained-l0", "cs", "ib"])
def test_penalty_is_float32_under_autocast(method):
    pruner = _pruner(method)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = pruner.model(torch.randn(4, 1, 28, 28))
        penalty = pruner.penalty()
    assert logits.dtype == torch.bfloat16  # the gated network itself runs in bf16
    assert penalty.dtype == torch.float32
    (logits.float().sum() + penalty).backward()
    gates = [p for g in pruner.method_parameters(1.0) for p in g["params"]]
    assert gates and all(p.grad is not None and p.grad.dtype == torch.float32 for p in gates)


def test_penalty_and_step_run_with_autocast_off():
    """A method whose penalty multiplies matrices would compute it in bf16 under autocast without
    the pruner's float32 region."""
    pruner = _pruner()
    seen = []
    gate = next(iter(pruner.method.gates.values())).log_alpha
    pruner.method.penalty = lambda progress: gate[None] @ gate[:, None]
    pruner.method.after_step = lambda progress: seen.append(torch.is_autocast_enabled("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (gate[None] @ gate[:, None]).dtype == torch.bfloat16
        assert pruner.penalty().dtype == torch.float32
        pruner.step()
    assert seen == [False]


def test_gate_values_are_float32_under_autocast():
    class MatmulGate(nn.Module):  # a gate whose sampling multiplies matrices
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.eye(3))

        def forward(self, batch_size):
            return torch.ones(batch_size, 3) @ self.w

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gate_values(MatmulGate(), 2, True).dtype == torch.float32


def test_finalize_under_autocast_meets_budget():
    pruner = _pruner()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        small, report = pruner.finalize()
    assert report["pruned"]["volume"] <= pruner.budget.absolute(pruner.graph) + 1e-9
    assert next(small.parameters()).dtype == torch.float32


def _run(tmp_path, precision, demo_subsets):
    train, test = demo_subsets(512, 128)
    cfg = PruneConfig(budget=0.25, model="lenet5", data="demo", teacher_epochs=1, epochs=2, finetune_epochs=1,
                      lowlr_epochs=0, gate_init=3.0, progress=False, precision=precision)
    torch.manual_seed(0)
    run = PruneRun(budgetprune.create_model("lenet5"), train, test, cfg, tmp_path / precision, log=lambda s: None)
    return run.run().metrics


def test_bf16_run_meets_the_budget_like_fp32(tmp_path, demo_subsets):
    fp32, bf16 = (_run(tmp_path, p, demo_subsets) for p in ("fp32", "bf16"))
    for m in (fp32, bf16):
        assert m["pruned"]["volume"] <= m["budget"] + 1e-9
        assert 0.95 <= m["budget_ratio"] <= 1.0
        assert m["compaction_max_abs_diff"] <= 1e-5
    assert bf16["test_accuracy"] > 0.3 and abs(bf16["test_accuracy"] - fp32["test_accuracy"]) < 0.15


def test_bf16_cli_run_writes_its_precision(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["prune", "--model", "lenet5", "--data", "demo", "--budget", "4x", "--out", str(out),
                     "--precision", "bf16", "--no-progress", "--teacher-epochs", "0", "--epochs", "1",
                     "--finetune-epochs", "0", "--lowlr-epochs", "0", "--deploy-runtime", "none"]) == 0
    assert json.loads((out / "config.json").read_text())["precision"] == "bf16"
    m = json.loads((out / "metrics.json").read_text())
    assert m["pruned"]["volume"] <= m["budget"] + 1e-9 and 0.95 <= m["budget_ratio"] <= 1.0


def test_bad_precision_is_one_line_and_exit_2(tmp_path, capsys):
    code = cli.main(["prune", "--model", "lenet5", "--data", "demo", "--budget", "4x", "--out",
                     str(tmp_path / "run"), "--precision", "fp8", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("budgetprune: error: ") and err.count("\n") == 1, err
    assert "fp8" in err and "bf16" in err
    with pytest.raises(ConfigError, match="unknown precision 'half'"):
        PruneConfig(precision="half").validate()


def test_precision_torch_cannot_run_is_refused_naming_the_fix(monkeypatch):
    import budgetprune.precision as precision
    monkeypatch.setattr(precision, "_autocast_problem", lambda kind, dtype: "no kernel")
    with pytest.raises(ConfigError, match="--precision fp16 does not run on cpu .*use --precision bf16"):
        check_precision("fp16", "cpu")
    check_precision("fp32", "cpu")  # never probed


def test_regions():
    with autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu")
        with float32("cpu"):
            assert not torch.is_autocast_enabled("cpu")
    with autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")


def test_fp16_run_keeps_its_gradient_scaler_in_checkpoints(tmp_path, demo_subsets):
    """fp16 autocasts on this torch's CPU too; the stage's scaler rides in each checkpoint."""
    train, test = demo_subsets(256, 64)
    cfg = PruneConfig(budget=0.25, model="lenet5", data="demo", teacher_epochs=1, epochs=1, finetune_epochs=0,
                      lowlr_epochs=0, progress=False, precision="fp16")
    run = PruneRun(budgetprune.create_model("lenet5"), train, test, cfg, tmp_path / "fp16", log=lambda s: None)
    m = run.run().metrics
    assert m["pruned"]["volume"] <= m["budget"] + 1e-9
    assert set(run.scalers) >= {"teacher", "prune"} and all(s.is_enabled() for s in run.scalers.values())
    ckpt = torch.load(tmp_path / "fp16" / "checkpoint.pt", weights_only=True)
    assert ckpt["scaler"]["scale"] > 0
