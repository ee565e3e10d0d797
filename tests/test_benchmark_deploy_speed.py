"""``benchmarks/deploy_speed.py --runs``: the networks of a finished run (its teacher, its own
result, its kept channels compacted both ways) and the folders it refuses."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

import budgetprune
from budgetprune import io
from budgetprune.errors import CheckpointError
from benchmark_scripts import benchmark_module


@pytest.fixture(scope="module")
def deploy_speed():
    with benchmark_module("deploy_speed") as module:
        yield module


RUN_RECORD = {"method": "magnitude", "metric": "flops", "budget_fraction": 0.5, "test_accuracy": 0.5,
              "unpruned_test_accuracy": 0.6}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run folder as ``budgetprune prune`` leaves it, made with a Pruner on random data: the
    teacher (``teacher.pt``), the result (``model.pt``, with its plan) and the run's records;
    with the pruned network, finalize's report and the pruner."""
    folder = tmp_path_factory.mktemp("run") / "2x"
    torch.manual_seed(0)
    teacher = budgetprune.create_model("resnet20").eval()
    model = budgetprune.create_model("resnet20")
    model.load_state_dict(teacher.state_dict())
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    pruner = budgetprune.Pruner(model, x, "flops=0.5", total_steps=2, method="magnitude", log=lambda line: None)
    optimizer = torch.optim.AdamW(pruner.parameters(lr=1e-3), lr=1e-3)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), y) + pruner.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()
    small, report = pruner.finalize(x)
    folder.mkdir()
    io.save(teacher, folder / "teacher.pt")  # as the run's teacher stage writes it
    budgetprune.save(small, folder / "model.pt")
    (folder / "config.json").write_text(json.dumps({"model": "resnet20"}))
    (folder / "metrics.json").write_text(json.dumps({**RUN_RECORD, "padding": report["padding"],
                                                     "pad_tied": report.get("pad_tied")}))
    return folder, small, report, pruner


def test_a_finished_run_gives_its_own_network_and_its_channels_both_ways(deploy_speed, finished_run):
    folder, small, report, pruner = finished_run
    runs = deploy_speed.run_list(str(folder))
    assert list(runs) == ["resnet20"]
    teacher, shape = deploy_speed.run_teacher("resnet20", runs["resnet20"])
    assert shape == (1, 28, 28)
    out = deploy_speed.from_run(runs["resnet20"][0], teacher, shape)
    assert out["factor"] == 2.0 and out["networks"] == ["regular", "mixed", "auto"]
    x = torch.randn(3, *shape)
    with torch.no_grad():
        # auto is the run's own network; regular and mixed compute the same function
        torch.testing.assert_close(out["nets"]["auto"](x), small(x))
        torch.testing.assert_close(out["nets"]["regular"](x), out["nets"]["mixed"](x), rtol=1e-5, atol=1e-5)
    # FLOPs traced from the compacted networks, against the pruner's own cost model
    assert out["unpruned_flops"] == pytest.approx(pruner.full["flops"])
    assert out["auto"]["flops"] == pytest.approx(report["pruned"]["flops"])
    assert out["V_over_B"] == pytest.approx(report["pruned"]["flops"] / (0.5 * pruner.full["flops"]))
    # the same kept channels: a regular block keeps the union of the channels it adds, never fewer
    assert out["regular"]["flops"] >= out["mixed"]["flops"]
    kept = sum(len(v) for v in report["plan"]["kept"].values())
    assert out["kept_channels"] == kept < out["channels"]


def test_runs_of_one_model_must_share_their_teacher(deploy_speed, finished_run, tmp_path):
    other = tmp_path / "4x"
    shutil.copytree(finished_run[0], other)
    torch.manual_seed(1)
    io.save(budgetprune.create_model("resnet20").eval(), other / "teacher.pt")  # another teacher
    (other / "metrics.json").write_text(json.dumps({**RUN_RECORD, "budget_fraction": 0.25}))  # another budget
    runs = deploy_speed.run_list(f"{finished_run[0]},{other}")
    with pytest.raises(CheckpointError, match="different teachers.*--teacher"):
        deploy_speed.run_teacher("resnet20", runs["resnet20"])


def _run_records(folder):
    """A folder with a run's records (the model files are not read before the run is measured)."""
    folder.mkdir()
    for name in ("teacher.pt", "model.pt"):
        (folder / name).write_bytes(b"")
    (folder / "config.json").write_text(json.dumps({"model": "resnet20"}))
    (folder / "metrics.json").write_text(json.dumps(RUN_RECORD))
    return folder


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "model.pt").unlink(), "not a finished budgetprune run \\(no model.pt\\)"),
    (lambda f: (f / "metrics.json").write_text(json.dumps({"metric": "volume", "budget_fraction": 0.5})),
     "volume budget"),
    (lambda f: (f / "config.json").write_text(json.dumps({"model": "lenet5"})), "runs of resnet20 only"),
    (lambda f: (f / "config.json").write_text("{"), "unreadable run record"),
])
def test_a_folder_that_is_not_a_usable_run_is_one_line_and_exit_2(deploy_speed, tmp_path, capsys, damage, message):
    damage(_run_records(tmp_path / "run"))
    with pytest.raises(SystemExit) as exc:
        deploy_speed.arguments(["--models", "resnet20", "--runs", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err)


def test_runs_of_a_model_not_measured_are_refused(deploy_speed, tmp_path, capsys):
    _run_records(tmp_path / "run")
    with pytest.raises(SystemExit) as exc:
        deploy_speed.arguments(["--models", "resnet18", "--runs", str(tmp_path / "run")])
    assert exc.value.code == 2 and "add it to --models" in capsys.readouterr().err


def test_the_op_profile_counts_the_timed_runs_by_op_type(deploy_speed, tmp_path):
    pytest.importorskip("onnxruntime")
    from budgetprune.export import to_onnx

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 26 * 26, 10))
    x = torch.randn(2, 1, 28, 28)
    to_onnx(net.eval(), tmp_path / "net.onnx", x[:1])
    ms = deploy_speed.op_profile(tmp_path / "net.onnx", x, runs=4)
    assert {"Conv", "Gemm"} <= set(ms) and all(v > 0 for v in ms.values())
    assert not list(tmp_path.glob("*.json"))  # the profiler's trace is removed
    page = deploy_speed.profile_tables({"models": [{
        "model": "net", "budgets": [{"factor": 2.0, "auto": {"flop_reduction": 2.0}}],
        "profile": {"batch": 2, "runs": 4, "ms": {"unpruned": {"Conv": 2.0, "Gemm": 1.0},
                                                  "2x/auto": {"Conv": 0.5, "Gemm": 1.0}}}}]})
    assert "| Conv | 2.000 | 0.500 (4.00×) |" in page and "| **all** | 3.000 | 1.500 (2.00×) |" in page


def test_a_trained_run_is_timed_and_written(deploy_speed, finished_run, tmp_path):
    folder = finished_run[0]
    code = deploy_speed.main(["--models", "resnet20", "--runs", str(folder), "--runtimes", "eager", "--batches", "1",
                              "--threads", "1", "--pairs", "1", "--pair-seconds", "0", "--quiet-budget-min", "0",
                              "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert code == 0
    record = json.loads((tmp_path / "out" / "deploy_speed.json").read_text())
    assert record["models"][0]["trained"] and record["settings"]["runs"] == {"resnet20": [str(folder)]}
    pruned = [r for r in record["rows"] if r["block"] != "unpruned"]
    assert sorted(r["block"] for r in pruned) == ["auto", "mixed", "regular"] and all(r["speedup"] > 0 for r in pruned)
    page = (tmp_path / "out" / "deploy_speed.md").read_text()
    assert "resnet20 is trained" in page and f"`{folder}`, magnitude" in page


def test_two_runs_of_one_budget_are_refused(deploy_speed, tmp_path, capsys):
    _run_records(tmp_path / "a")
    _run_records(tmp_path / "b")
    with pytest.raises(SystemExit) as exc:
        deploy_speed.arguments(["--models", "resnet20", "--runs", f"{tmp_path / 'a'},{tmp_path / 'b'}"])
    assert exc.value.code == 2 and "both pruned resnet20 to 2x FLOPs" in capsys.readouterr().err


def test_streams_reach_the_iterative_method_of_the_padded_and_auto_networks(deploy_speed):
    """``--streams joint`` goes to the magnitude pruners as ``method_options``; BAR gets none."""
    unpruned = budgetprune.create_model("resnet20").eval()
    _, pruner, _, _ = deploy_speed.pruned(unpruned, (1, 28, 28), 2.0, "magnitude", 1, "auto", "auto",
                                          runtime="eager", streams="joint")
    assert pruner.method.streams == "joint"
    _, pruner, _, _ = deploy_speed.pruned(unpruned, (1, 28, 28), 2.0, "magnitude", 1, "mixed", runtime="eager")
    assert pruner.method.streams == "apart"
    assert deploy_speed.arguments(["--models", "resnet20", "--streams", "joint"]).streams == "joint"


def test_a_volume_budget_goes_beside_every_flop_budget(deploy_speed, capsys):
    """``--volume 4`` prunes to 1/4 of the activation volume as well as the FLOP budget; a factor
    under 1 is refused in one line."""
    unpruned = budgetprune.create_model("resnet20").eval()
    _, pruner, _, report = deploy_speed.pruned(unpruned, (1, 28, 28), 2.0, "magnitude", 1, "mixed",
                                               runtime="eager", volume=4.0)
    assert [(b.metric, b.fraction) for b in pruner.budgets] == [("flops", 0.5), ("volume", 0.25)]
    assert report["pruned"]["volume"] <= 0.25 * pruner.full["volume"] + 1e-6
    assert deploy_speed.arguments(["--models", "resnet20", "--volume", "4"]).volume == 4.0
    with pytest.raises(SystemExit) as exc:
        deploy_speed.arguments(["--models", "resnet20", "--volume", "0.5"])
    assert exc.value.code == 2 and "--volume must be 0 (FLOPs alone) or a reduction factor" in capsys.readouterr().err
