"""Saving compacted graphs without pickled code, and exporting them to TorchScript and ONNX.

A model file (format 2) holds a JSON description of the model's ``torch.fx`` graph; loading it
rebuilds the graph from a whitelist of modules, functions and methods only. These tests check
the round trip of a chain and of a residual graph with budgetprune's channel ops, that
anything outside the whitelist is refused on saving and on loading, that format-1 files still
load, the TorchScript and ONNX exports, and the ``budgetprune export`` command.
"""

from __future__ import annotations

import importlib.util
import json
import operator
import os
import sys

import pytest
import torch
from torch import fx, nn

import budgetprune
from budgetprune import cli, graphio, io, ops
from budgetprune.architecture import SelectFeatures, build_sequential, module_spec
from budgetprune.errors import CheckpointError, ConfigError
from budgetprune.export import to_onnx, to_torchscript

HAVE_ORT = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAVE_ORT, reason="onnx/onnxscript/onnxruntime not installed "
                                                     "(pip install 'budgetprune[export]')")


def _randomise_batchnorms(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    return model.eval()


def chain_model() -> nn.Sequential:
    """A compacted-style chain: odd widths, a depthwise conv, kept input features of the classifier."""
    torch.manual_seed(0)
    return _randomise_batchnorms(nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(5, 5, 3, padding=1, groups=5, bias=False), nn.BatchNorm2d(5), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), SelectFeatures([0, 3, 4, 7, 8, 11, 19]),
        nn.Linear(7, 6), nn.LeakyReLU(0.1), nn.Dropout(0.2), nn.Linear(6, 4)))


def residual_model() -> fx.GraphModule:
    """A small residual GraphModule as compaction writes them: channel ops reading index buffers."""
    torch.manual_seed(0)
    root = nn.Module()
    root.stem, root.bn, root.act = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()
    root.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.Conv2d(4, 3, 1))
    root.side, root.pool, root.fc = nn.Conv2d(6, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Linear(8, 5)
    for name, index in (("_budgetprune_index_0", [0, 2, 3, 5]), ("_budgetprune_index_1", [1, 2, 4]),
                        ("_budgetprune_index_2", [0, 5])):
        root.register_buffer(name, torch.tensor(index))
    g = fx.Graph()
    h = g.call_module("act", (g.call_module("bn", (g.call_module("stem", (g.placeholder("x"),)),)),))
    sub = g.call_function(ops.select_channels, (h, g.get_attr("_budgetprune_index_0")))
    h = g.call_function(ops.index_add_channels, (h, g.get_attr("_budgetprune_index_1"), g.call_module("block", (sub,))))
    new = g.call_function(ops.scatter_channels, (g.call_module("side", (h,)), g.get_attr("_budgetprune_index_2"), 6))
    h = g.call_function(operator.add, (h, new))
    h = g.call_function(torch.cat, ([h, g.call_function(operator.getitem, (sub, (slice(None), slice(0, 2))))],),
                        {"dim": 1})
    flat = g.call_function(torch.flatten, (g.call_module("pool", (h,)), 1))
    g.output(g.call_module("fc", (g.call_method("view", (flat, g.call_method("size", (flat, 0)), -1)),)))
    return _randomise_batchnorms(fx.GraphModule(root, g))


def round_trip(gm: fx.GraphModule) -> fx.GraphModule:
    """describe → JSON text → rebuild, with the state dict as io.save stores it."""
    description = graphio.describe(gm)
    state = graphio.saveable_state(gm, description)
    return graphio.rebuild(json.loads(json.dumps(description)), state)


def assert_same_model(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    assert not b.training


def test_chain_round_trip_is_exact_and_keeps_the_layer_specs():
    seq = chain_model()
    again = round_trip(graphio.trace(seq))
    assert_same_model(seq, again, torch.randn(3, 3, 8, 8))
    assert isinstance(again.get_submodule("9"), SelectFeatures)  # kept whole, not inlined
    description = graphio.describe(graphio.trace(seq))
    assert io.layer_specs(description) == [module_spec(m) for m in seq]  # same vocabulary as format 1


def test_residual_graph_round_trip_is_exact():
    gm = residual_model()
    x = torch.randn(2, 3, 8, 8)
    description = graphio.describe(gm)
    targets = {n["target"] for n in description["nodes"] if n["op"] == "call_function"}
    assert {"budgetprune.ops.index_add_channels", "budgetprune.ops.scatter_channels",
            "budgetprune.ops.select_channels", "operator.add", "torch.cat", "torch.flatten"} <= targets
    assert description["tensors"]["_budgetprune_index_0"] == {"dtype": "int64", "shape": [4], "parameter": False}
    assert description["modules"]["block"]["op"] == "sequential"
    assert description["modules"]["block"]["layers"]["0"]["groups"] == 4
    again = round_trip(gm)
    assert_same_model(gm, again, x)
    # the channel ops stay single nodes when the rebuilt module is traced again
    retraced = fx.symbolic_trace(again)
    called = {n.target for n in retraced.graph.nodes if n.op == "call_function"}
    used = {n.target for n in gm.graph.nodes if n.op == "call_function" and n.target in ops.CHANNEL_OPS.values()}
    assert len(used) == 3 and used <= called


def test_save_and_load_files(tmp_path):
    gm, seq = residual_model(), chain_model()
    io.save(gm, tmp_path / "res.pt", meta={"input_shape": [3, 8, 8]})
    io.save(seq, tmp_path / "seq.pt", [{"ignored": "specs"}])
    raw = torch.load(tmp_path / "res.pt", weights_only=True)
    assert raw["version"] == 2 and set(raw) == {"format", "version", "graph", "state_dict", "meta"}
    model, description, meta = io.load_file(tmp_path / "res.pt")
    assert isinstance(model, fx.GraphModule) and description["format"] == "budgetprune-graph"
    assert meta == {"input_shape": [3, 8, 8]}
    assert_same_model(gm, model, torch.randn(2, 3, 8, 8))
    assert_same_model(seq, budgetprune.load(tmp_path / "seq.pt"), torch.randn(2, 3, 8, 8))
    budgetprune.save(model, tmp_path / "again.pt")  # a loaded GraphModule saves through the public API
    assert_same_model(gm, budgetprune.load(tmp_path / "again.pt"), torch.randn(2, 3, 8, 8))


def test_format_1_files_still_load(tmp_path):
    seq = chain_model()
    specs = [module_spec(m) for m in seq]
    path = tmp_path / "v1.pt"
    torch.save({"format": "budgetprune-model", "version": 1, "architecture": json.dumps(specs),
                "state_dict": seq.state_dict(), "meta": json.dumps({"input_shape": [3, 8, 8]})}, path)
    model, architecture, meta = io.load_file(path)
    assert isinstance(model, nn.Sequential) and architecture == specs and meta["input_shape"] == [3, 8, 8]
    assert io.named_layer_specs(architecture)[0] == ("0", specs[0])
    assert_same_model(seq, model, torch.randn(2, 3, 8, 8))
    assert isinstance(build_sequential(specs)[9], SelectFeatures)


@fx.wrap
def _local_op(x):
    return x * 2


@pytest.mark.parametrize("make, words", [
    (lambda g, x: g.call_function(torch.fft.fft, (x,)), "fft_fft"),
    (lambda g, x: g.call_function(_local_op, (x,)), "_local_op"),
    (lambda g, x: g.call_method("numpy", (x,)), "Tensor.numpy"),
    (lambda g, x: g.call_function(getattr, (x, "__class__")), "getattr"),
])
def test_unlisted_operations_are_refused_at_save(make, words, tmp_path):
    g = fx.Graph()
    g.output(make(g, g.placeholder("x")))
    with pytest.raises(CheckpointError) as err:
        io.save(fx.GraphModule(nn.Module(), g), tmp_path / "m.pt")
    message = str(err.value)
    assert words in message and "cannot be saved" in message and "\n" not in message
    assert not (tmp_path / "m.pt").exists()


def test_unlisted_module_is_refused_at_save(tmp_path):
    class Custom(nn.Module):
        def forward(self, x):
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = Custom()

    g = fx.Graph()
    g.output(g.call_module("c", (g.placeholder("x"),)))
    with pytest.raises(CheckpointError, match="node 'c'.*Custom cannot be saved"):
        io.save(fx.GraphModule(Net(), g), tmp_path / "m.pt")


def _crafted(tmp_path, edit) -> str:
    """A real model file whose description ``edit`` has tampered with."""
    gm = residual_model()
    description = graphio.describe(gm)
    edit(description)
    path = tmp_path / "crafted.pt"
    torch.save({"format": "budgetprune-model", "version": 2, "graph": json.dumps(description),
                "state_dict": graphio.saveable_state(gm, graphio.describe(gm)), "meta": "{}"}, path)
    return path


def _node(description, op):
    return next(n for n in description["nodes"] if n["op"] == op)


@pytest.mark.parametrize("edit, words", [
    (lambda d: _node(d, "call_function").update(target="os.system"), "'os.system'"),
    (lambda d: _node(d, "call_method").update(target="__reduce__"), "'__reduce__'"),
    (lambda d: d["modules"]["fc"].update(op="os.system"), "'os.system'"),
    (lambda d: _node(d, "placeholder").update(target="x=__import__('os').system('true')"), "placeholder"),
    (lambda d: d["tensors"]["_budgetprune_index_0"].update(dtype="__builtins__"), "dtype"),
    (lambda d: _node(d, "call_function")["args"]["tuple"].append({"eval": "1"}), "tag"),
])
def test_crafted_descriptions_are_refused_at_load(edit, words, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    with pytest.raises(CheckpointError) as err:
        io.load(_crafted(tmp_path, edit))
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not calls


def test_weights_must_match_the_description(tmp_path):
    def drop_fc(d):
        d["modules"]["fc"]["out_features"] = 4
    with pytest.raises(CheckpointError, match="weights do not match"):
        io.load(_crafted(tmp_path, drop_fc))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load: deprecated, still works
def test_torchscript_round_trip(tmp_path):
    gm = round_trip(residual_model())
    result = to_torchscript(gm, tmp_path / "m.ts", torch.randn(2, 3, 8, 8))
    assert result["method"] == "script" and result["verified"] and result["max_abs_diff"] <= 1e-5
    loaded = torch.jit.load(tmp_path / "m.ts")
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(x), gm(x), atol=1e-5)


def test_torchscript_falls_back_to_tracing_with_a_warning(tmp_path):
    class Unscriptable(nn.Module):
        def forward(self, x):
            return (lambda t: t * 2)(x)  # TorchScript has no lambdas

    with pytest.warns(UserWarning, match="falling back to torch.jit.trace"):
        result = to_torchscript(Unscriptable(), tmp_path / "m.ts", torch.randn(2, 3))
    assert result["method"] == "trace" and result["max_abs_diff"] == 0


@needs_onnx
@pytest.mark.parametrize("opset, exporter", [(17, "torchscript"), (18, "dynamo")])
def test_onnx_round_trip(opset, exporter, tmp_path):
    import onnxruntime

    gm = round_trip(residual_model())
    result = to_onnx(gm, tmp_path / "m.onnx", torch.randn(2, 3, 8, 8), opset=opset)
    assert result["verified"] and result["max_abs_diff"] <= 1e-4
    assert result["opset"] == opset and result["exporter"] == exporter
    import onnx

    # the mixed block's adds and scatters run as channel gathers: no scatter over the activation in
    # the graph onnxruntime runs (a ScatterElements with an index expanded to the activation's shape
    # runs several times slower); the scatter building each gather's small index map is folded
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "m.optimized.onnx")
    onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    op_types = {node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node}
    assert "Gather" in op_types and not {"ScatterElements", "ScatterND", "Expand"} & op_types
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 8, 8)  # another batch size: the batch dimension is dynamic
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(out), gm(x), atol=1e-4)


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        y, _ = self.attention(x, x, x, need_weights=False)
        return self.head(y.mean(1))


@needs_onnx
def test_onnx_export_of_multihead_attention_in_eval_mode(tmp_path):
    """In eval mode without gradients nn.MultiheadAttention runs a fused op ONNX has no operator
    for (torchvision's ViT failed to export); the export runs it as plain ops and gives the
    process its fast path back."""
    model = SelfAttention().eval()
    assert torch.backends.mha.get_fastpath_enabled()
    result = to_onnx(model, tmp_path / "m.onnx", torch.randn(2, 5, 16))
    assert result["verified"] and result["max_abs_diff"] <= 1e-4
    assert torch.backends.mha.get_fastpath_enabled()


def large_output_model() -> nn.Module:
    """Convolutions whose outputs reach about 1e12, as an untrained Inception V3's do in eval mode
    (its BatchNorms' running statistics untouched): float32 rounding alone differs there by far
    more than 1e-4 between two correct implementations."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Conv2d(8 if i else 3, 8, 3, padding=1) for i in range(6)]).eval()
    with torch.no_grad():
        for conv in model:
            conv.weight.mul_(100.0)
    return model


@needs_onnx
def test_export_checks_are_relative_to_large_outputs(tmp_path):
    model, x = large_output_model(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        scale = float(model(x).abs().max())
    assert scale > 1e9
    result = to_onnx(model, tmp_path / "m.onnx", x)  # onnxruntime's rounding: far over 1e-4 absolute here
    assert result["verified"] and result["max_abs_diff"] <= 1e-4 * scale
    assert to_torchscript(model, tmp_path / "m.ts", x)["verified"]


class TwoHeads(nn.Module):
    """Boxes in pixels beside scores: outputs of very different sizes."""

    def forward(self, x):
        return {"boxes": x * 1e6, "scores": x.sigmoid()}


@needs_onnx
@pytest.mark.parametrize("boxes, scores, accepted", [
    (1e-7, 0.0, True),     # 0.1 off on boxes of 1e6: 1e-7 of their size
    (1e-3, 0.0, False),    # 1e3 off on boxes of 1e6: 1e-3 of their size
    (0.0, 1e-3, False),    # the scores off by 1e-3: large boxes beside them do not loosen their check
    (0.0, float("nan"), False),
])
def test_each_output_is_checked_against_its_own_size(boxes, scores, accepted, monkeypatch, tmp_path):
    from budgetprune import export

    model, x = TwoHeads(), torch.rand(2, 3) + 0.5

    def run(path, args):  # the file's outputs, off by the given share of each output's size
        out = model(*args)
        return [out["boxes"] * (1 + boxes), out["scores"] + scores]

    monkeypatch.setattr(export, "_run_onnxruntime", run)
    if accepted:
        assert to_onnx(model, tmp_path / "m.onnx", x)["verified"]
    else:
        with pytest.raises(budgetprune.errors.ExportError, match="of the output's size, over the tolerance"):
            to_onnx(model, tmp_path / "m.onnx", x)
        assert not (tmp_path / "m.onnx").exists()


def test_an_export_that_computes_something_else_is_refused_and_removed(tmp_path):
    class Noisy(nn.Module):  # every run adds fresh noise: no file can reproduce an earlier output
        def forward(self, x):
            return x + 0.01 * torch.rand_like(x)

    with pytest.raises(budgetprune.errors.ExportError, match="does not reproduce the model's outputs"):
        to_torchscript(Noisy(), tmp_path / "m.ts", torch.randn(2, 3))
    assert not (tmp_path / "m.ts").exists()


def test_onnx_without_its_packages_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` fail
    with pytest.raises(ConfigError, match=r"onnxscript.*pip install 'budgetprune\[export\]'"):
        to_onnx(chain_model(), tmp_path / "m.onnx", torch.randn(2, 3, 8, 8), opset=18)


@pytest.fixture
def saved_model(tmp_path):
    path = tmp_path / "model.pt"
    io.save(residual_model(), path, meta={"input_shape": [3, 8, 8]})
    return path


def run_cli(args, capsys):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("onnx", marks=needs_onnx)])
def test_cli_export(fmt, saved_model, tmp_path, capsys):
    out_file = tmp_path / f"m.{fmt}"
    code, out, err = run_cli(["export", saved_model, "--format", fmt, "--out", out_file], capsys)
    assert code == 0 and err == "" and out_file.stat().st_size > 1000
    assert "max abs difference" in out and "(3, 8, 8)" in out


@pytest.mark.parametrize("args, words", [
    (["--format", "pickle"], "invalid choice: 'pickle'"),
    (["--input-shape", "three,8,8"], "--input-shape must be"),
    (["--input-shape", "5,8,8"], "does not take inputs of shape (5, 8, 8)"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_cli_export_bad_input(args, words, saved_model, tmp_path, capsys):
    argv = ["export", saved_model, "--format", "torchscript", "--out", tmp_path / "m.ts"]
    if args[0] in argv:
        argv[argv.index(args[0]) + 1] = args[1]
    else:
        argv += args
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err.startswith("budgetprune: error: ") and err.count("\n") == 1, err
    assert words in err
    assert not (tmp_path / "m.ts").exists()


def test_cli_export_bad_files(tmp_path, capsys):
    io.save(chain_model(), tmp_path / "noshape.pt")  # no input shape recorded
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    for path, words in ((tmp_path / "missing.pt", "does not exist"), (tmp_path / "other.pt", "not a budgetprune"),
                        (tmp_path / "noshape.pt", "pass --input-shape")):
        code, _, err = run_cli(["export", path, "--format", "onnx", "--out", tmp_path / "m.onnx"], capsys)
        assert code == 2 and err.count("\n") == 1 and words in err, err
