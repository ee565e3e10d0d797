"""Freed CPU buffers kept for reuse while a Pruner trains on the CPU (budgetprune.cpu_allocator):
observed in fresh processes by what the kernel holds after a 64 MiB tensor is freed (glibc's
defaults return it, kept buffers stay), and left alone where the user chose an allocator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from budgetprune import cpu_allocator
from budgetprune.errors import ConfigError
from budgetprune.pipeline import PruneConfig

glibc_only = pytest.mark.skipif(cpu_allocator.platform.libc_ver()[0] != "glibc" or not os.path.exists("/proc/self/statm"),
                                reason="glibc's malloc on Linux only")

_PROCESS = textwrap.dedent("""
    import json, os, sys, torch, budgetprune
    from budgetprune import Pruner, cpu_allocator

    def resident_mib():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    lines = []
    model = budgetprune.create_model("lenet5", in_channels=1, num_classes=10, input_size=(28, 28))
    pruners = [Pruner(model, torch.randn(2, 1, 28, 28), "flops=0.5", total_steps=10, log=lines.append,
                      cpu_buffers=sys.argv[1])]
    if sys.argv[1] == "keep":  # a second pruner in the same process: set once, said once
        other = budgetprune.create_model("lenet5", in_channels=1, num_classes=10, input_size=(28, 28))
        pruners.append(Pruner(other, torch.randn(2, 1, 28, 28), "flops=0.5", total_steps=10, log=lines.append))
    big = torch.ones(64 << 18)  # 64 MiB, every page written
    before = resident_mib()
    del big
    print(json.dumps({"kept": [p.cpu_buffers_kept for p in pruners], "lines": lines, "why_not": cpu_allocator.why_not(),
                      "returned_mib": before - resident_mib()}))
""")


def _fresh_process(choice: str, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    out = subprocess.run([sys.executable, "-c", _PROCESS, choice], env={**clean, **env}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_a_pruner_on_the_cpu_keeps_freed_buffers_for_reuse():
    got = _fresh_process("keep")
    assert got["kept"] == [True, True]
    assert got["returned_mib"] < 1  # the freed 64 MiB stays in the process for the next step
    assert len(got["lines"]) == 1 and "keeps freed buffers" in got["lines"][0] and "--cpu-buffers system" in got["lines"][0]


@glibc_only
def test_system_leaves_glibcs_defaults():
    got = _fresh_process("system")
    assert got["kept"] == [False] and got["lines"] == []
    assert got["returned_mib"] > 60  # glibc's default: a fresh mapping, returned on free


@glibc_only
def test_an_allocator_the_user_configured_is_left_alone():
    got = _fresh_process("keep", MALLOC_ARENA_MAX="2")
    assert got["kept"] == [False, False] and got["lines"] == []
    assert "MALLOC_ARENA_MAX" in got["why_not"]
    assert got["returned_mib"] > 60


def test_off_the_cpu_nothing_changes():
    lines = []
    assert cpu_allocator.prepare(torch.device("cuda"), "keep", lines.append) is False
    assert lines == []


@pytest.mark.parametrize("value", ["yes", True, None])
def test_a_wrong_choice_is_a_one_line_error(value):
    with pytest.raises(ConfigError, match="cpu_buffers must be 'keep'"):
        cpu_allocator.check_cpu_buffers(value)
    with pytest.raises(ConfigError, match="cpu.buffers must be") as error:  # the option's check, or its type's
        PruneConfig(model="lenet5", data="demo", cpu_buffers=value).validate()
    assert "\n" not in str(error.value)


class _Mallopt:
    """A stand-in for glibc's mallopt that refuses mmap thresholds over ``limit``; records the calls."""

    def __init__(self, limit):
        self.limit, self.calls = limit, []

    def __call__(self, param, value):
        self.calls.append((param, value))
        return int(param != cpu_allocator.M_MMAP_THRESHOLD or value <= self.limit)


@pytest.mark.parametrize("limit, expect", [
    (2 ** 31, [(cpu_allocator.M_MMAP_THRESHOLD, cpu_allocator.LARGEST),
               (cpu_allocator.M_TRIM_THRESHOLD, cpu_allocator.LARGEST)]),
    (32 << 20, [(cpu_allocator.M_MMAP_THRESHOLD, cpu_allocator.LARGEST),  # refused: the documented maximum
                (cpu_allocator.M_MMAP_THRESHOLD, 32 << 20), (cpu_allocator.M_TRIM_THRESHOLD, cpu_allocator.LARGEST)]),
    (0, [(cpu_allocator.M_MMAP_THRESHOLD, cpu_allocator.LARGEST), (cpu_allocator.M_MMAP_THRESHOLD, 32 << 20)]),
], ids=["accepted", "older_glibc", "refused"])
def test_the_mmap_threshold_goes_first_and_falls_back(monkeypatch, limit, expect):
    """A trim threshold set alone would turn glibc's adjusting mmap threshold off at 128 KiB:
    the mmap threshold is set first, at 32 MiB where 2 GiB is refused, and nothing more where
    both are."""
    fake = _Mallopt(limit)
    monkeypatch.setattr(cpu_allocator, "_applied", False)
    monkeypatch.setattr(cpu_allocator, "why_not", lambda: None)
    monkeypatch.setattr(cpu_allocator, "_mallopt", lambda: fake)
    assert cpu_allocator.keep_freed_buffers() is (limit > 0)
    assert fake.calls == expect


def test_no_mallopt_is_no_error(monkeypatch):
    def missing():
        raise AttributeError("no mallopt in this C library")
    monkeypatch.setattr(cpu_allocator, "_applied", False)
    monkeypatch.setattr(cpu_allocator, "why_not", lambda: None)
    monkeypatch.setattr(cpu_allocator, "_mallopt", missing)
    assert cpu_allocator.keep_freed_buffers() is False


def test_the_command_line_refuses_another_choice_in_one_line(tmp_path, capsys):
    from budgetprune.cli import main
    assert main(["prune", "--model", "lenet5", "--data", "demo", "--budget", "0.5", "--cpu-buffers", "always",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--cpu-buffers" in err and "'keep', 'system'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
