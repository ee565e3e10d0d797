"""The note a run gives when its deployed speedup falls far short of its budget's reduction
(:func:`budgetprune.report.deploy_note`), on hand-made metrics."""

import pytest

from budgetprune.report import deploy_note, write_report


def metrics(speedup, metric="flops", runtime="onnxruntime", **extra):
    return {"metric": metric, "granularity": "channel",
            "reduction_factor": {"volume": 2.46, "flops": 4.0, "params": 4.22},
            "deployed": {"runtime": runtime, "batch": 16, "device": "cpu", "threads": 2, "unpruned_ms": 35.2,
                         "pruned_ms": 35.2 / speedup, "speedup": speedup}, **extra}


def test_a_memory_bound_result_gets_a_note_with_the_budgets_that_follow_time():
    note = deploy_note(metrics(2.23))  # MnasNet 0.5 at 4x FLOPs: 2.23 < 0.7 * 4
    assert note.startswith("note: the result runs 2.23× faster in onnxruntime (batch 16) for 4.00× fewer flops")
    assert "activation volume fell 2.46×" in note and "the metric latency:onnxruntime (timed there)" in note
    assert "--budget flops=0.25,volume=0.4" in note
    assert "the metric latency (timed" in deploy_note(metrics(1.0, runtime="eager"))  # eager's has no suffix


@pytest.mark.parametrize("m", [
    metrics(2.8),                                  # 0.7 of 4x: keeps up
    metrics(1.5, metric="volume"),                 # the budget counts the memory already
    metrics(1.5, metric="latency:onnxruntime"),    # the budget is time
    metrics(1.5, granularity="weight"),            # single weights: nothing gets smaller to run
    metrics(1.5, budgets={"flops": {}, "volume": {}}),               # a volume budget bounds it already
    metrics(1.5, budgets={"flops": {}, "latency:onnxruntime": {}}),  # so does a latency budget
    {**metrics(1.5), "deployed": None},            # not timed
    {**metrics(1.5), "deployed": {"runtime": "onnxruntime", "error": "not installed"}},
])
def test_no_note_where_the_speed_keeps_up_or_is_not_about_compute(m):
    assert deploy_note(m) is None


def test_the_report_carries_the_note(tmp_path):
    m = {**metrics(2.23), "method": "bar", "budget_fraction": 0.25, "budget": 1.0, "budget_ratio": 0.999,
         "full": {"volume": 2.46, "flops": 4.0, "params": 4.22}, "pruned": {"volume": 1.0, "flops": 1.0, "params": 1.0},
         "widths": {}, "test_accuracy": 0.9, "unpruned_test_accuracy": 0.91, "accuracy_change": -0.01,
         "cost_before_projection": 1.0, "channels_dropped_by_projection": 0, "compaction_max_abs_diff": 0.0,
         "model": "mnasnet", "data": "demo"}
    write_report(tmp_path, m, [])
    assert "- The result runs 2.23× faster in onnxruntime" in (tmp_path / "report.md").read_text()


def test_the_report_names_the_smallest_kept_gate_and_the_faint_channels(tmp_path):
    m = {**metrics(1.0), "method": "bar", "budget_fraction": 0.25, "budget": 1.0, "budget_ratio": 0.999,
         "full": {"volume": 2.46, "flops": 4.0, "params": 4.22}, "pruned": {"volume": 1.0, "flops": 1.0, "params": 1.0},
         "widths": {}, "test_accuracy": 0.9, "unpruned_test_accuracy": 0.91, "accuracy_change": -0.01,
         "cost_before_projection": 1.0, "channels_dropped_by_projection": 0, "compaction_max_abs_diff": 0.0,
         "model": "resnet20", "data": "demo", "lowest_kept_gate": {"conv1": 1.0, "layer3.2.conv2": 5.8e-5},
         "faint_kept_channels": {"layer3.2.conv2": 3}}
    write_report(tmp_path, m, [])
    assert ("- Smallest gate folded into a kept channel: 5.8e-05 (layer3.2.conv2); 3 kept channel(s) under 0.01 "
            "pass almost none of their signal") in (tmp_path / "report.md").read_text()
    write_report(tmp_path, {**m, "lowest_kept_gate": {"conv1": 0.5}, "faint_kept_channels": {}}, [])
    assert "- Smallest gate folded into a kept channel: 0.5 (conv1)\n" in (tmp_path / "report.md").read_text()


def test_an_avx512_cpu_with_widths_padded_to_eight_is_told_about_sixteen():
    """onnxruntime's convolutions on an AVX-512 CPU work on 16 channels: a result padded to 8 and
    timed there is pointed at --channel-multiple 16; padded otherwise, timed elsewhere or on another
    CPU, or where the run timed multiples of 16 itself (``wide_padding_timing``: slower, or unable to
    end on the budget), it is not."""
    def timed(cpu, runtime="onnxruntime", padding=(8, 0, 2, 0), wide=None):
        m = metrics(2.23, runtime=runtime, padding=list(padding))
        m["deployed"]["cpu"] = cpu
        if wide is not None:
            m["wide_padding_timing"] = wide
        return deploy_note(m)
    assert timed("AVX512").endswith("--channel-multiple 16 ran such networks about 1.3× faster")
    slower = {"runtime": "onnxruntime", "multiple": 16, "against": 8, "batch": 1, "ms": 1.0, "against_ms": 1.0,
              "speedup": 1.0, "pairs": 30, "pays": False}
    unmet = {"runtime": "onnxruntime", "multiple": 16, "against": 8, "error": "ends at 0.9 of the budget, under 0.95"}
    for note in (timed("AVX2"), timed("AVX512", padding=(16, 0, 2, 0)), timed("AVX512", padding=(1, 0, 1, 0)),
                 timed("AVX512", runtime="eager"), deploy_note(metrics(2.23)), timed("AVX512", wide=slower),
                 timed("AVX512", wide=unmet)):
        assert note is not None and "--channel-multiple 16" not in note


def volume_run(speedup, **extra):
    return {**metrics(speedup, metric="volume"), "budget_fraction": 0.25, "budgets": {"volume": {}},
            "block": "mixed", "channel_multiple": 1, **extra}


def test_a_volume_budget_result_slower_than_its_source_gets_a_note_with_the_way_back():
    note = deploy_note(volume_run(0.82))  # e.g. a MobileNet V2 whose every residual sum gathers
    assert note.startswith("note: the result runs slower than the unpruned network in onnxruntime (batch 16: "
                           "0.82× its speed)")
    assert "--budget volume=0.25,flops=0.5" in note and "--block auto --channel-multiple auto" in note


@pytest.mark.parametrize("m", [
    volume_run(1.01),                                       # faster than its source: nothing to say
    volume_run(0.9, block="auto", channel_multiple="auto"),  # already the fastest form
    volume_run(0.9, budgets={"volume": {}, "flops": {}}),    # a FLOP budget bounds it (and its form is auto)
    volume_run(0.9, granularity="weight"),                   # single weights
    {**volume_run(0.9), "deployed": None},                   # not timed
])
def test_no_volume_note_where_it_is_fast_enough_or_already_the_fastest_form(m):
    assert deploy_note(m) is None


def test_a_speed_timed_on_a_busy_machine_gets_that_note_and_not_one_read_from_it(tmp_path):
    """A timing during which other processes kept the CPUs busy is not read for advice: the note
    says how busy the machine was instead of what the speed falls short of, in the log's words and
    the report's."""
    busy = metrics(2.23)
    busy["deployed"].update(others_cpu=0.62, busy=True)
    note = deploy_note(busy)
    assert note.startswith("note: the deployed speed (2.23× in onnxruntime) was timed while other processes used "
                           "62% of the CPUs") and "fewer flops" not in note
    quiet = metrics(2.23)
    quiet["deployed"].update(others_cpu=0.01, busy=False)
    assert deploy_note(quiet).startswith("note: the result runs 2.23× faster")
    m = {**busy, "method": "bar", "budget_fraction": 0.25, "budget": 1.0, "budget_ratio": 0.999,
         "full": {"volume": 2.46, "flops": 4.0, "params": 4.22}, "pruned": {"volume": 1.0, "flops": 1.0, "params": 1.0},
         "widths": {}, "test_accuracy": 0.9, "unpruned_test_accuracy": 0.91, "accuracy_change": -0.01,
         "cost_before_projection": 1.0, "channels_dropped_by_projection": 0, "compaction_max_abs_diff": 0.0,
         "model": "mnasnet", "data": "demo"}
    write_report(tmp_path, m, [])
    assert "- The deployed speed (2.23× in onnxruntime) was timed while other processes used 62% of the CPUs" in \
        (tmp_path / "report.md").read_text()
