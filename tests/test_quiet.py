"""budgetprune.quiet: the others' share of the CPUs is worked by hand from /proc/stat-like samples,
a measurement during which they were busy is repeated, the waiting stays bounded, and the timings
that choose something (the deployed speed, the padding) say when the machine was busy."""

import pytest
import torch

import budgetprune
from budgetprune.quiet import BUSY, Quiet


class Machine:
    """Stand-in ``/proc/stat`` readings: (busy CPU seconds, total CPU seconds, own CPU seconds), and
    per turn how many CPU seconds the other processes use out of 10 (2 CPUs for 5 s) while this one
    uses 1."""

    def __init__(self, others_per_turn):
        self.clock = [0.0, 0.0, 0.0]
        self.others = list(others_per_turn)
        self.turns = 0

    def sample(self):
        return tuple(self.clock)

    def turn(self):
        used = self.others[min(self.turns, len(self.others) - 1)]
        self.turns += 1
        self.clock = [self.clock[0] + used + 1.0, self.clock[1] + 10.0, self.clock[2] + 1.0]
        return self.turns


def watched(machine, **options):
    quiet = Quiet(**options)
    quiet.enabled = True
    quiet.sample = machine.sample
    quiet.wait = lambda: None  # the waiting itself is timed by the clock: tested on its own below
    return quiet


def test_the_others_share_is_their_busy_time_less_this_process_over_all_cpu_time():
    # 6 busy CPU seconds of 8 in all, 2 of them this process's: the others used 4 / 8
    assert Quiet.others((10.0, 20.0, 1.0), (16.0, 28.0, 3.0)) == pytest.approx(0.5)
    assert Quiet.others((10.0, 20.0, 1.0), (11.0, 28.0, 3.0)) == 0.0  # own time counted in a later tick
    assert Quiet.others((1.0, 5.0, 0.0), (1.0, 5.0, 0.0)) == 0.0  # no tick between the samples
    with pytest.raises(ValueError, match="share of the CPUs"):
        Quiet(busy=1.5)


def test_a_measurement_is_repeated_while_the_others_were_busy_and_says_how_busy():
    quiet_machine = Machine([0.5])
    assert watched(quiet_machine).run(quiet_machine.turn) == (1, pytest.approx(0.05), 1)
    once_busy = Machine([6.0, 0.5])  # 60 % of the CPUs during the first turn, 5 % during the second
    assert watched(once_busy).run(once_busy.turn) == (2, pytest.approx(0.05), 2)
    always = Machine([6.0])
    result, share, attempts = watched(always, retries=2).run(always.turn)
    assert (result, attempts) == (3, 3) and share == pytest.approx(0.6) and share > BUSY


def test_waiting_is_bounded_by_its_budget_and_stops_at_a_quiet_sample(monkeypatch):
    import budgetprune.quiet as quiet_module

    now = [0.0]
    monkeypatch.setattr(quiet_module.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(quiet_module.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    samples = iter([(0.0, 0.0, 0.0), (2.0, 2.0, 0.0)] * 1000)  # the others use every CPU
    quiet = Quiet(budget=1.0, max_wait=0.5)
    quiet.enabled, quiet.sample = True, lambda: next(samples)
    quiet.wait()
    assert quiet.waited == pytest.approx(0.5, abs=0.11)  # one wait: at most max_wait
    quiet.wait(), quiet.wait()
    assert quiet.waited == pytest.approx(1.0, abs=0.11)  # in all: at most the budget
    calm = iter([(0.0, 0.0, 0.0), (0.1, 2.0, 0.0)])
    quiet = Quiet(budget=5.0, max_wait=5.0)
    quiet.enabled, quiet.sample = True, lambda: next(calm)
    quiet.wait()
    assert quiet.waited == pytest.approx(0.1)  # the first sample pair was quiet: one sleep


def test_deployed_speed_reports_the_others_share_and_whether_the_machine_was_busy(monkeypatch):
    from budgetprune import runtimes

    machine = Machine([])

    def pairs(first, second, repeats, min_seconds, device=None):
        machine.turn()  # the pairs take a turn of the stand-in machine's clock
        return [0.010] * repeats, [0.005] * repeats

    monkeypatch.setattr(runtimes, "paired_times", pairs)
    model = budgetprune.create_model("lenet5")
    machine.others = [6.0]
    speed = runtimes.deployed_speed(model, model, torch.randn(1, 1, 28, 28), "eager", repeats=4,
                                    quiet=watched(machine, retries=1))
    assert speed["busy"] and speed["others_cpu"] == pytest.approx(0.6) and speed["timings"] == 2
    assert speed["speedup"] == pytest.approx(2.0)
    machine.others, machine.turns = [0.2], 0
    speed = runtimes.deployed_speed(model, model, torch.randn(1, 1, 28, 28), "eager", repeats=4,
                                    quiet=watched(machine))
    assert not speed["busy"] and speed["others_cpu"] == pytest.approx(0.02) and speed["timings"] == 1


def test_a_busy_timing_of_the_padding_is_not_acted_on(monkeypatch):
    """Timed while other processes kept the machine busy, the padded network's timing is no
    decision: it comes back as an error, and finalize keeps the padding (as when the timing fails),
    in the log and the report."""
    import budgetprune.measured as measured

    monkeypatch.setattr(measured, "deployed_speed", lambda exact, padded, example, runtime: {
        "runtime": runtime, "batch": 1, "unpruned_ms": 1.0, "pruned_ms": 2.0, "speedup": 0.5, "pairs": 30,
        "others_cpu": 0.62, "busy": True})
    timing = measured.padding_speedup(None, None, torch.zeros(1), "onnxruntime")
    assert "pays" not in timing and timing["measured_speedup"] == 0.5
    assert timing["error"] == ("the machine was busy: other processes used 62% of its CPUs while it was timed "
                               "(measured 0.50×, not trusted)")
    torch.manual_seed(0)
    logs = []
    pruner = budgetprune.Pruner(budgetprune.create_model("lenet5"), torch.randn(8, 1, 28, 28), "flops=0.125",
                                total_steps=1, method="magnitude", time_padding=True, deploy_runtime="eager",
                                log=logs.append)
    pruner.step()
    _, report = pruner.finalize()
    assert report["padding"][0] == 8 and report["padding_timing"]["error"].startswith("the machine was busy")
    assert any(line.startswith("no usable timing of the padded network in eager (the machine was busy")
               for line in logs)
