"""The run folder: one run at a time, resume only with the run's options, usable paths, file modes
and no leftovers of an interrupted write. No test here trains: PruneRun's stages are stubbed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import pytest

import budgetprune
from budgetprune import cli, io
from budgetprune.errors import ConfigError
from budgetprune.models import create_model
from budgetprune.pipeline import PruneConfig, PruneRun

OPTIONS = {"--model": "lenet5", "--data": "demo", "--budget": "0.25", "--teacher-epochs": "0", "--epochs": "2",
           "--finetune-epochs": "0", "--lowlr-epochs": "0"}
PRUNE = ["prune", *[x for kv in OPTIONS.items() for x in kv], "--no-progress"]
HOLD = ("import sys, time\n"
        "from budgetprune.runfolder import RunFolder\n"
        "with RunFolder(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n")


def run_cli(args, capsys):
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and err.startswith("budgetprune: error: ") and "Traceback" not in err


@pytest.fixture
def stages(monkeypatch):
    """PruneRun.run without training: each call records (config, resume, whether the lock is held)."""
    calls = []

    def fake(self, resume):
        calls.append((self.config, resume, (self.out / ".lock").is_file()))
    monkeypatch.setattr(PruneRun, "_run_stages", fake)
    return calls


@pytest.fixture
def holder(tmp_path):
    """``holder(folder)`` → a subprocess that holds the run folder ``folder`` until killed."""
    procs = []

    def start(folder: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc
    yield start
    for proc in procs:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def interrupted_run(folder: Path, **options) -> dict:
    """A run folder as an interrupted `prune` leaves it (config.json + checkpoint.pt); the saved config."""
    folder.mkdir(parents=True)
    config = asdict(PruneConfig(**{"budget": 0.25, "model": "lenet5", "data": "demo", "teacher_epochs": 0,
                                   "epochs": 2, "finetune_epochs": 0, "lowlr_epochs": 0, **options}))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "checkpoint.pt").write_bytes(b"checkpoint of an interrupted run")
    return config


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# -- one run at a time ----------------------------------------------------------------------

def test_second_run_in_a_held_folder_is_refused(tmp_path, holder, capsys):
    out = tmp_path / "run"
    proc = holder(out)
    (out / ".model.pt.abcd1234.tmp").write_bytes(b"being written by the holder")
    code, _, err = run_cli([*PRUNE, "--out", str(out)], capsys)
    assert code == 2 and one_line(err)
    assert "in use by another run" in err and f"pid {proc.pid}" in err and "--out" in err
    assert sorted(p.name for p in out.iterdir()) == [".lock", ".model.pt.abcd1234.tmp"]  # nothing written or removed


def test_demo_in_a_held_folder_is_refused(tmp_path, holder, capsys):
    out = tmp_path / "demo"
    holder(out)
    code, _, err = run_cli(["demo", "--out", str(out), "--no-progress"], capsys)
    assert code == 2 and one_line(err) and "in use by another run" in err


def test_python_api_takes_the_lock_too(tmp_path, holder, demo_subsets):
    out = tmp_path / "api"
    holder(out)
    train, test = demo_subsets(64, 32)
    with pytest.raises(ConfigError, match="in use by another run"):
        budgetprune.prune(create_model("lenet5"), train, test, budget=0.5, out=out, teacher_epochs=0, epochs=1,
                          log=None)


def test_crashed_holders_lock_does_not_block_the_next_run(tmp_path, holder, stages, capsys):
    out = tmp_path / "run"
    proc = holder(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((out / ".lock").read_text())["pid"] == proc.pid  # left behind by the crash
    code, _, err = run_cli([*PRUNE, "--out", str(out)], capsys)
    assert code == 0, err
    assert len(stages) == 1 and stages[0][2]  # the run held the folder
    assert not (out / ".lock").exists()  # released on exit


def test_lock_nests_in_its_thread_and_refuses_other_threads(tmp_path):
    from budgetprune.runfolder import RunFolder
    out = tmp_path / "run"
    errors = []

    def other_thread():
        try:
            with RunFolder(out):
                pass
        except ConfigError as exc:
            errors.append(str(exc))
    with RunFolder(out):
        with RunFolder(out):  # the CLI holds it around PruneRun.run, which enters it again
            assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
        assert (out / ".lock").exists()
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert len(errors) == 1 and "another thread of this process" in errors[0]
    with RunFolder(out):  # free again
        pass


def test_lock_without_fcntl_takes_over_a_dead_holders_lock_only(tmp_path, monkeypatch):
    from budgetprune import runfolder
    monkeypatch.setattr(runfolder, "fcntl", None)
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": host}))
    with runfolder.RunFolder(out):
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    assert not (out / ".lock").exists()
    for lock_holder in ({"pid": os.getppid(), "host": host}, {"pid": dead.pid, "host": host + "-elsewhere"}):
        (out / ".lock").write_text(json.dumps(lock_holder))
        with pytest.raises(ConfigError, match="in use by another run"):
            with runfolder.RunFolder(out):
                pass


# -- resume: the run's options or none --------------------------------------------------------

@pytest.mark.parametrize("changes, flags, named", [
    ({"--model": "lenet300"}, (), "--model lenet300 (run: lenet5)"),
    ({"--budget": "0.5", "--epochs": "3"}, (), "--budget 0.5 (run: 0.25), --epochs 3 (run: 2)"),
    ({"--data": "mnist"}, (), "--data mnist (run: demo)"),
    ({"--method": "l0"}, ("--no-fill",), "--method l0 (run: bar), --no-fill (run: without it)"),
])
def test_resume_with_changed_options_is_refused(tmp_path, capsys, changes, flags, named):
    out = tmp_path / "run"
    interrupted_run(out)
    before = listing(out)
    options = {**OPTIONS, **changes}
    args = ["prune", *[x for kv in options.items() for x in kv], *flags, "--out", str(out), "--resume"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and one_line(err), err
    assert named in err and str(out) in err and "choose another --out" in err
    assert listing(out) == before  # config.json untouched, nothing else written


def test_resume_keeps_the_runs_options_and_allows_device_data_root_progress(tmp_path, stages, capsys):
    out = tmp_path / "run"
    saved = interrupted_run(out, epochs=3, seed=7, method_options={"rounds": 1}, method="cs")
    code, _, err = run_cli([*PRUNE, "--epochs", "3", "--method", "cs", "--method-option", "rounds=1", "--out", str(out),
                            "--resume", "--device", "cpu", "--data-root", str(tmp_path / "elsewhere")], capsys)
    assert code == 0, err
    code, _, err = run_cli(["prune", "--out", str(out), "--resume", "--no-progress"], capsys)  # all from config.json
    assert code == 0, err
    (first, resume1, held1), (second, resume2, held2) = stages
    assert resume1 and resume2 and held1 and held2
    assert first.data_root == str(tmp_path / "elsewhere")
    for config in (first, second):
        assert (config.epochs, config.seed, config.method, config.method_options) == (3, 7, "cs", {"rounds": 1})
        assert config.budget == saved["budget"] and config.model == "lenet5"


def test_resume_without_config_json_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    interrupted_run(out)
    (out / "config.json").unlink()
    before = listing(out)
    code, _, err = run_cli([*PRUNE, "--out", str(out), "--resume"], capsys)
    assert code == 2 and one_line(err) and "no config.json" in err
    assert listing(out) == before and not (out / "config.json").exists()


def test_demo_resume_with_another_budget_is_refused(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    config = PruneConfig(budget=0.25, model="lenet5", data="demo", teacher_epochs=4, epochs=8, finetune_epochs=3,
                         lowlr_epochs=1)
    (out / "config.json").write_text(json.dumps(asdict(config)))
    (out / "checkpoint.pt").write_bytes(b"checkpoint of an interrupted demo")
    before = listing(out)
    code, _, err = run_cli(["demo", "--out", str(out), "--budget", "0.5", "--no-progress"], capsys)
    assert code == 2 and one_line(err) and "--budget 0.5 (run: 0.25)" in err
    assert listing(out) == before


def test_refused_run_leaves_no_folder_behind(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    code, _, err = run_cli([*PRUNE, "--out", str(out), "--resume"], capsys)
    assert code == 2 and "no interrupted run" in err
    code, _, err = run_cli([*PRUNE[:6], "--budget", "0.00001", "--out", str(out)], capsys)  # unreachable budget
    assert code == 2 and one_line(err)
    assert not (tmp_path / "new").exists()


# -- paths that cannot be written ---------------------------------------------------------------

@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.pt"
    io.save(create_model("lenet5"), path, meta={"input_shape": [1, 28, 28]})
    return path


def _unwritable(monkeypatch, folder: Path):
    """Make ``folder`` behave as an unwritable folder does for a user who is not root."""
    real_access, real_mkdir = os.access, Path.mkdir

    def access(path, mode, **kw):
        return False if (mode & os.W_OK) and Path(path) == folder else real_access(path, mode, **kw)

    def mkdir(self, *a, **kw):
        if self.parent == folder:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **kw)
    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(Path, "mkdir", mkdir)


@pytest.mark.parametrize("where, words", [
    ("afile", "is a file, not a folder"),
    ("afile/run", "lies under the file"),
    ("readonly/run", "cannot be created: "),
])
def test_unusable_out_is_one_line(tmp_path, capsys, monkeypatch, where, words):
    (tmp_path / "afile").write_text("a file")
    (tmp_path / "readonly").mkdir()
    _unwritable(monkeypatch, tmp_path / "readonly")
    code, _, err = run_cli([*PRUNE, "--out", str(tmp_path / where)], capsys)
    assert code == 2 and one_line(err) and words in err and "choose another --out" in err


@pytest.mark.parametrize("where, words", [
    ("afile/m.pt", "is a file, not a folder"),
    ("readonly/m.pt", "readonly is not writable"),
    (".", "is a folder"),
])
def test_export_to_an_unwritable_path_is_one_line(tmp_path, capsys, monkeypatch, model_file, where, words):
    (tmp_path / "afile").write_text("a file")
    (tmp_path / "readonly").mkdir()
    _unwritable(monkeypatch, tmp_path / "readonly")
    code, _, err = run_cli(["export", str(model_file), "--format", "torchscript", "--out", str(tmp_path / where)],
                           capsys)
    assert code == 2 and one_line(err) and words in err
    assert not (tmp_path / "readonly" / "m.pt").exists()


def test_export_write_refused_by_the_system_is_one_line(tmp_path, capsys, monkeypatch, model_file):
    import tempfile

    def refuse(*a, **kw):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code, _, err = run_cli(["export", str(model_file), "--format", "torchscript", "--out", str(tmp_path / "m.pt")],
                           capsys)
    assert code == 2 and one_line(err) and "Read-only file system" in err


# -- file modes and leftovers -----------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        io.write_json(tmp_path / "config.json", {"a": 1})
        io.torch_save(tmp_path / "model.pt", {"w": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == mode
    assert (tmp_path / "model.pt").stat().st_mode & 0o777 == mode


def test_interrupted_writes_are_cleaned_when_a_run_starts(tmp_path, stages, capsys):
    out = tmp_path / "run"
    out.mkdir()
    stale = [".model.pt.abcd1234.tmp", ".checkpoint.pt.x_9z0qrs.tmp", ".config.json.aaaaaaaa.tmp"]
    kept = [".notes.tmp", "model.pt.tmp", ".model.pt.tmp", "notes.txt"]
    for name in stale + kept:
        (out / name).write_bytes(b"x")
    (out / ".plots.abcdefgh.tmp").mkdir()  # a folder, not a temporary file
    code, _, err = run_cli([*PRUNE, "--out", str(out)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(kept + [".plots.abcdefgh.tmp", "config.json"])
