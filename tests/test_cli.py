"""End-to-end runs of the command line on the embedded data, and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import budgetprune
from budgetprune import cli
from budgetprune.data import load_dataset
from budgetprune.pipeline import PruneConfig, PruneRun

FAST = ["--teacher-epochs", "1", "--epochs", "2", "--finetune-epochs", "1", "--lowlr-epochs", "0"]


def run_cli(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One short real run of `budgetprune prune` shared by the tests that read its files."""
    out = tmp_path_factory.mktemp("run") / "lenet5"
    code = cli.main(["prune", "--model", "lenet5", "--data", "demo", "--budget", "4x", "--out", str(out),
                     "--no-progress", *FAST])
    assert code == 0
    return out


@pytest.mark.slow
def test_prune_end_to_end_meets_budget(finished_run):
    m = json.loads((finished_run / "metrics.json").read_text())
    assert m["method"] == "bar" and m["metric"] == "volume" and m["budget_fraction"] == pytest.approx(0.25)
    assert m["pruned"]["volume"] <= m["budget"] + 1e-9
    assert 0.95 <= m["budget_ratio"] <= 1.0  # the fill uses the budget left under B
    for key in ("volume", "flops", "params"):
        assert m["pruned"][key] < m["full"][key]
    assert set(m["widths"]) == {"features.0", "features.3", "classifier.1"}
    assert 0.1 < m["test_accuracy"] <= 1.0 and 0.1 < m["unpruned_test_accuracy"] <= 1.0
    assert m["classes"] == 10  # the width of the pruned network's logits: what the collapse note weighs against
    assert m["compaction_max_abs_diff"] <= 1e-5
    assert m["channels_reopened_by_fill"] >= 0
    assert set(m["lowest_kept_gate"]) == set(m["widths"]) and all(0 < v <= 1 for v in m["lowest_kept_gate"].values())
    assert all(0 < n <= m["widths"][g]["kept"] for g, n in m["faint_kept_channels"].items())
    history = json.loads((finished_run / "history.json").read_text())
    assert [h["stage"] for h in history] == ["teacher", "prune", "prune", "finetune"]
    config = json.loads((finished_run / "config.json").read_text())
    assert config["epochs"] == 2 and config["model"] == "lenet5"
    report = (finished_run / "report.md").read_text()
    assert "widths.png" in report and (finished_run / "widths.png").stat().st_size > 1000
    # a volume budget's default form: mixed blocks at exact widths, so nothing is padded or timed against it
    assert m["block"] == "mixed" and m["channel_multiple"] == 1 and m["padding"][0] == 1
    assert "- Residual blocks: mixed (sums gather each branch's channels); exact widths" in report
    assert "padding_timing" not in m and "wide_padding_timing" not in m
    assert config["block"] == "mixed" and config["channel_multiple"] == 1  # resolved, so a resumed run keeps it
    # the result's own deployed speed, in onnxruntime where it is installed
    from budgetprune.runtimes import default_runtime
    deployed = m["deployed"]
    assert deployed["runtime"] == default_runtime(["volume"]) and deployed["batch"] == 1
    assert deployed["unpruned_ms"] > 0 and deployed["pruned_ms"] > 0
    assert deployed["speedup"] == pytest.approx(1 / deployed["ratio"]) and deployed["pairs"] >= 30
    assert f"Deployed speed in {deployed['runtime']}" in report


@pytest.mark.slow
def test_a_flop_budget_run_builds_auto_blocks_and_times_its_padding(tmp_path):
    """Under a FLOP budget the command line's default form is the fastest: auto blocks, the auto
    padding, each padding kept only where it timed faster in the deploy runtime."""
    out = tmp_path / "run"
    assert cli.main(["prune", "--model", "lenet5", "--data", "demo", "--budget", "flops=0.25", "--out", str(out),
                     "--no-progress", "--teacher-epochs", "1", "--epochs", "1", "--finetune-epochs", "0",
                     "--lowlr-epochs", "0"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    assert m["block"] == "auto" and m["channel_multiple"] == "auto" and m["mixed_spaces"] == []  # a chain: no sums
    assert "- Residual blocks: auto (0 residual spaces kept mixed, the others regular)" in report
    deployed = m["deployed"]
    # multiples of 16, where multiples of 8 were kept, timed against them in the same runtime
    wide = m.get("wide_padding_timing")
    padded = 16 if wide and wide.get("pays") else 8
    if wide is not None:
        assert wide["runtime"] == deployed["runtime"] and (wide["multiple"], wide["against"]) == (16, 8)
        assert (f"Multiples of 16: no usable timing in {wide['runtime']}" if "error" in wide
                else f"Multiples of 16 timed in {wide['runtime']}") in report
    # the auto padding, timed against exact widths in the same runtime, is kept only where it paid
    timing = m.get("padding_timing")
    if timing is None:
        assert m["padding"][0] == 1  # the padding ladder itself ended at exact widths: nothing to time
    elif "error" in timing:  # the padding is kept when it cannot be timed
        assert m["padding"][0] == padded and f"Padding: no usable timing in {timing['runtime']}" in report
    else:
        assert timing["runtime"] == deployed["runtime"] and m["padding"][0] == (padded if timing["pays"] else 1)
        assert ("padding kept" if timing["pays"] else "exact widths kept") in report


@pytest.mark.slow
def test_saved_model_loads_safely_and_matches_metrics(finished_run, capsys):
    path = finished_run / "model.pt"
    raw = torch.load(path, weights_only=True)  # no arbitrary unpickling needed
    assert raw["format"] == "budgetprune-model"
    model = budgetprune.load(path)
    m = json.loads((finished_run / "metrics.json").read_text())
    convs = [mod for mod in model.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [m["widths"]["features.0"]["kept"], m["widths"]["features.3"]["kept"]]
    splits = load_dataset("demo")
    acc = budgetprune.engine.evaluate(model, splits.test, torch.device("cpu"))["accuracy"]
    assert acc == pytest.approx(m["test_accuracy"], abs=1e-9)
    code, out, _ = run_cli(["info", str(path)], capsys)
    assert code == 0 and f"volume {m['pruned']['volume']:.6g}" in out
    code, out, _ = run_cli(["evaluate", str(path), "--data", "demo"], capsys)
    assert code == 0 and f"accuracy {acc:.4f}" in out


@pytest.mark.slow
def test_teacher_for_another_architecture_is_refused(finished_run, capsys, tmp_path):
    code, _, err = run_cli(["prune", "--model", "vgg_small", "--data", "demo", "--budget", "0.5",
                            "--teacher", str(finished_run / "teacher.pt"), "--out", str(tmp_path / "r"), *FAST],
                           capsys)
    assert code == 2 and "another architecture" in err and err.count("\n") == 1


@pytest.mark.slow
def test_existing_run_folder_needs_resume(finished_run, capsys):
    code, _, err = run_cli(["prune", "--model", "lenet5", "--data", "demo", "--budget", "0.5",
                            "--out", str(finished_run)], capsys)
    assert code == 2 and "--resume" in err


@pytest.mark.parametrize("args, words", [
    (["--budget", "0"], "between 0 and 1"),
    (["--budget", "1"], "between 0 and 1"),
    (["--budget", "1.5"], "between 0 and 1"),
    (["--budget", "0.5x"], "greater than 1"),
    (["--budget", "0.001"], "unreachable"),
    (["--budget", "lots"], "not a number"),
    (["--model", "lenet7"], "unknown model 'lenet7'"),
    (["--data", "imagenet"], "unknown dataset"),
    (["--metric", "energy"], "unknown metric 'energy'"),
    (["--method", "magic"], "unknown method 'magic'"),
    (["--data", "fashion-mnist", "--data-root", "/nonexistent/folder"], "/nonexistent/folder"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    (["--epochs", "0"], "--epochs"),
    (["--channel-multiple", "0"], "not 'auto' or a positive whole number"),
    (["--block", "regular", "--channel-multiple", "-8"], "not 'auto' or a positive whole number"),
    (["--gate-sample", "sometimes"], "--gate-sample"),
    (["--deploy-batch", "0"], "--deploy-batch must be a whole number"),
])
def test_bad_input_is_one_line_and_exit_2(args, words, capsys, tmp_path):
    base = {"--model": "lenet5", "--data": "demo", "--budget": "0.25", "--out": str(tmp_path / "run")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["prune", *FAST, *[x for kv in base.items() for x in kv]]
    code, _, err = run_cli(argv, capsys)
    assert code == 2
    assert err.startswith("budgetprune: error: ") and err.count("\n") == 1, err
    assert words in err


def test_malformed_data_folder_names_the_file(tmp_path, capsys):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (folder / name).write_bytes(b"not an idx file at all")
    code, _, err = run_cli(["prune", "--model", "lenet5", "--data", "fashion-mnist", "--data-root", str(tmp_path),
                            "--budget", "0.25", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "idx" in err and str(folder) in err and err.count("\n") == 1


def test_usage_errors_are_one_line(capsys):
    code, _, err = run_cli(["prune", "--model", "lenet5"], capsys)
    assert code == 2 and err.count("\n") == 1 and "required" in err
    code, _, err = run_cli(["info", "/nonexistent/model.pt"], capsys)
    assert code == 2 and "does not exist" in err


def test_resume_without_checkpoint_is_refused(tmp_path, capsys):
    code, _, err = run_cli(["prune", "--model", "lenet5", "--data", "demo", "--budget", "0.25", "--resume",
                            "--out", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "no interrupted run" in err


def test_cli_runs_as_a_program_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "budgetprune.cli", "prune", "--model", "nope", "--data", "demo",
                           "--budget", "0.5", "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "unknown model 'nope'" in proc.stderr


# -- interruption, resume and divergence (Python API, same engine) -------------------------

def _small_run(out, log=lambda s: None, **kw):
    splits = load_dataset("demo")
    train = splits.train.subset(range(640))
    test = splits.test.subset(range(200))
    cfg = PruneConfig(budget=0.25, model="lenet5", data="demo", teacher_epochs=1, epochs=3, finetune_epochs=1,
                      lowlr_epochs=1, progress=False, **kw)
    return PruneRun(budgetprune.create_model("lenet5"), train, test, cfg, out, log=log)


def test_train_teacher_runs_the_teacher_stage_alone_and_a_second_call_loads_its_file(tmp_path, monkeypatch):
    import budgetprune.pipeline as pl
    teacher = _small_run(tmp_path / "t").train_teacher()
    assert (tmp_path / "t" / "teacher.pt").exists() and not (tmp_path / "t" / "model.pt").exists()
    monkeypatch.setattr(pl, "train_epoch", lambda *a, **k: pytest.fail("the teacher was trained again"))
    again = _small_run(tmp_path / "t").train_teacher(resume=True)
    x = load_dataset("demo").test[0][0].unsqueeze(0)
    assert torch.equal(teacher.eval()(x), again.eval()(x))


@pytest.mark.slow
def test_interrupted_run_resumes_without_losing_an_epoch(tmp_path, monkeypatch):
    import budgetprune.pipeline as pl
    real = pl.train_epoch
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # teacher 1, prune 1, then Ctrl-C during prune epoch 2
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(pl, "train_epoch", flaky)
    lines = []
    with pytest.raises(KeyboardInterrupt):
        _small_run(tmp_path, log=lines.append, gate_survival=0.5).run()
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["stage"] == "prune" and ckpt["epoch"] == 1
    chosen = [line for line in lines if line.startswith("gates start at log α")]
    assert len(chosen) == 1
    monkeypatch.setattr(pl, "train_epoch", real)
    lines.clear()
    result = _small_run(tmp_path, log=lines.append, gate_survival=0.5).run(resume=True)
    stages = [(h["stage"], h["epoch"]) for h in result.history]
    assert stages == [("teacher", 1), ("prune", 1), ("prune", 2), ("prune", 3), ("finetune", 1), ("finetune", 2)]
    assert result.metrics["pruned"]["volume"] <= result.metrics["budget"]
    # the resumed prune stage kept the gates where they were: the start is not measured again, and
    # the first process's choice is what the run reports
    assert not [line for line in lines if line.startswith("gates start")]
    start = result.metrics["gate_start"]["log_alpha"]
    assert chosen[0].startswith(f"gates start at log α {start:g},")


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import budgetprune.pipeline as pl
    real = pl.distillation_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] > 12 else loss  # prune epoch 2 (10 steps per epoch)
    monkeypatch.setattr(pl, "distillation_loss", poisoned)
    with pytest.raises(budgetprune.errors.TrainingDiverged) as info:
        _small_run(tmp_path).run()
    msg = str(info.value)
    assert "nan" in msg and "checkpoint" in msg and "--resume" in msg and "\n" not in msg
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["stage"] == "prune" and ckpt["epoch"] == 1
