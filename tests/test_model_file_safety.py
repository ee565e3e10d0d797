"""A model file is untrusted input: loading one never runs code, imports, writes or spawns
anything, and a damaged one gives one line before memory is allocated.

The threat: ``torch.fx`` writes node names, placeholder names, module paths and keyword-argument
names into the Python source of ``forward`` and executes it. These tests keep the reported
reproduction (a keyword name that escapes the function body with ``\\r``), try each other place
a name reaches generated code, check the second wall (the generated source's shape) on its
own, check damaged files on the command line, and fuzz every string and number field of real
saved files under an audit hook that records any process, import or file write.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import fx

import budgetprune
import budgetprune.data
from budgetprune import cli, graphio, graphsafety, io
from budgetprune.errors import CheckpointError

sys.path.insert(0, os.path.dirname(__file__))
from test_export import chain_model, residual_model  # noqa: E402


# -- side effects, recorded by an audit hook ---------------------------------------------------
_WATCHING: list[list] = []
_FORBIDDEN = ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
              "os.kill", "os.putenv", "os.unsetenv", "os.symlink", "os.link", "pty.spawn", "socket.", "ctypes.",
              "os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.truncate", "shutil.",
              "webbrowser.open", "urllib.Request")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _audit(event: str, args) -> None:
    if not _WATCHING:
        return
    if event.startswith(_FORBIDDEN):
        _WATCHING[-1].append((event, repr(args)[:120]))
    elif event == "import" and args[0] not in sys.modules:
        _WATCHING[-1].append((event, args[0]))
    elif event == "exec" and not getattr(args[0], "co_filename", "").startswith("<eval_with_key>"):
        _WATCHING[-1].append((event, repr(args[0])[:120]))  # code run other than fx's generated forward
    elif event == "open":
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITE_FLAGS):
            _WATCHING[-1].append((event, repr(args[0])[:120]))


sys.addaudithook(_audit)


class side_effects:
    """``with side_effects() as seen:`` — ``seen`` lists every forbidden event inside the block."""

    def __enter__(self):
        _WATCHING.append([])
        return _WATCHING[-1]

    def __exit__(self, *exc):
        _WATCHING.pop()
        return False


def test_the_side_effect_watch_sees_what_it_must(tmp_path):
    """The watch the tests below rely on records a process, a new import, a file write and code run."""
    sys.modules.pop("colorsys", None)
    with side_effects() as seen:
        os.system("true")
        import colorsys  # noqa: F401
        (tmp_path / "w").write_text("x")
        exec("y = 1")
    assert {"os.system", "import", "open", "exec"} <= {event for event, _ in seen}


# -- files ------------------------------------------------------------------------------------
def _file_parts(model, meta: dict) -> dict:
    """The dict io.save writes for ``model`` (graph and meta as Python objects, to edit)."""
    gm = graphio.trace(model)
    description = graphio.describe(gm)
    state, sparse = io.pack_sparse(graphio.saveable_state(gm, description))
    return {"format": io.FORMAT, "version": 3 if sparse else 2, "graph": description, "state_dict": state,
            "meta": meta, **({"sparse": sparse} if sparse else {})}


def _write(parts: dict, path) -> str:
    obj = dict(parts, graph=json.dumps(parts["graph"]), meta=json.dumps(parts["meta"]))
    torch.save(obj, path)
    return str(path)


@pytest.fixture
def lenet_file(tmp_path):
    """A model.pt as budgetprune writes one for LeNet-5."""
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    budgetprune.save(fx.symbolic_trace(budgetprune.create_model("lenet5")), path, meta={"input_shape": [1, 28, 28]})
    return path


@pytest.fixture(scope="module", autouse=True)
def _torch_lazy_imports_done(tmp_path_factory):
    """One clean load first: torch imports some of its own modules on first use (the meta
    device, fx's code generation); the watch is for what a file makes the loader import."""
    path = tmp_path_factory.mktemp("warm") / "m.pt"
    io.save(residual_model(), path, meta={"input_shape": [3, 8, 8]})
    io.load(path)
    g = fx.Graph()  # and a GraphModule whose forward fails: torch's error report imports more of torch
    g.output(g.call_function(torch.cat, (g.placeholder("x"), "not a dim")))
    with pytest.raises(TypeError):
        fx.GraphModule(torch.nn.Module(), g)(torch.zeros(1))


# -- the reported reproduction -------------------------------------------------------------------
def test_reported_reproduction_runs_nothing(lenet_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    o = torch.load(lenet_file, weights_only=True)
    g = json.loads(o["graph"])
    g["nodes"].insert(2, {"name": "evil", "op": "call_function", "target": "F.relu",
                          "args": {"tuple": [{"node": "features_0"}]},
                          "kwargs": {"dict": [["inplace = False)\r__import__('os').system('touch PWNED')\r"
                                               "def _g():\r    _ = dict(a", False]]}})
    o["graph"] = json.dumps(g)
    torch.save(o, "evil.pt")
    for attempt in (lambda: budgetprune.load("evil.pt"), lambda: io.load_file("evil.pt")):
        with side_effects() as seen, pytest.raises(CheckpointError) as err:
            attempt()
        assert not seen and not (tmp_path / "PWNED").exists()
        assert "keyword argument" in str(err.value) and "\n" not in str(err.value) and "\r" not in str(err.value)
    for command in (["info", "evil.pt"], ["export", "evil.pt", "--format", "torchscript", "--out", "e.ts"],
                    ["evaluate", "evil.pt", "--data", "demo"]):
        assert cli.main(command) == 2
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "e.ts").exists()


def test_reported_reproduction_through_prune_teacher(lenet_file, tmp_path, monkeypatch, capsys):
    """``prune --teacher`` reads the file before the architecture check: it must refuse it there."""
    monkeypatch.chdir(tmp_path)
    o = torch.load(lenet_file, weights_only=True)
    g = json.loads(o["graph"])
    g["nodes"][1]["kwargs"] = {"dict": [["x)\r__import__('os').system('touch PWNED')\rdef _g(a", 1]]}
    o["graph"] = json.dumps(g)
    torch.save(o, "teacher.pt")
    code = cli.main(["prune", "--model", "lenet5", "--data", "demo", "--budget", "0.5", "--teacher", "teacher.pt",
                     "--epochs", "1", "--out", "run", "--no-progress"])
    assert code == 2 and not (tmp_path / "PWNED").exists()
    assert "keyword argument" in capsys.readouterr().err


# -- every other place a name reaches generated code ------------------------------------------------
PAYLOAD = "x)\r__import__('os').system('touch PWNED')\rdef _g(a"


def _first(d, op):
    return next(n for n in d["nodes"] if n["op"] == op)


def _rename_module(d, old, new):
    d["modules"][new] = d["modules"].pop(old)
    for n in d["nodes"]:
        if n["op"] == "call_module" and n["target"] == old:
            n["target"] = new


@pytest.mark.parametrize("edit, words", [
    (lambda d: _first(d, "call_module").update(name=PAYLOAD), "node name"),
    (lambda d: _first(d, "call_module").update(name="a\nb"), "node name"),
    (lambda d: _first(d, "call_module").update(name="class"), "node name"),  # a keyword
    (lambda d: _first(d, "call_module").update(name="__class__"), "node name"),
    (lambda d: _first(d, "placeholder").update(target=PAYLOAD), "placeholder"),
    (lambda d: _first(d, "placeholder").update(target="self"), "placeholder"),
    (lambda d: _first(d, "placeholder").update(args={"tuple": [{"dtype": "float32"}]}), "arguments"),
    (lambda d: _rename_module(d, "stem", "stem\n"), "attribute path"),  # '$' would accept a trailing newline
    (lambda d: _rename_module(d, "stem", "stem(x)\r__import__('os')"), "attribute path"),
    (lambda d: _rename_module(d, "stem", "__class__"), "attribute path"),
    (lambda d: _first(d, "get_attr").update(target="_budgetprune_index_0\r__import__('os')"), "attribute path"),
    (lambda d: d["modules"]["block"]["layers"].update({"0)\rimport os\r#": d["modules"]["block"]["layers"].pop("0")}),
     "layer name"),
    (lambda d: _first(d, "call_method").update(target="view\r__import__('os')"), "method"),
    (lambda d: _first(d, "call_function")["kwargs"]["dict"].append(["__class__", 1]), "keyword argument"),
    (lambda d: _first(d, "call_function")["kwargs"]["dict"].append(["bogus", 1]), "does not take"),
    (lambda d: d["tensors"]["_budgetprune_index_0"].update(dtype="_dynamo"), "dtype"),  # torch would import it
    (lambda d: d["tensors"]["_budgetprune_index_0"].update(shape=[10 ** 4] * 4), "weights do not match"),
    (lambda d: _first(d, "call_function")["args"]["tuple"].append({"device": "cpu')\rimport os\r#"}), "device"),
])
def test_names_that_would_reach_generated_code_are_refused(edit, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parts = _file_parts(residual_model(), {"input_shape": [3, 8, 8]})
    edit(parts["graph"])
    path = _write(parts, tmp_path / "crafted.pt")
    with side_effects() as seen, pytest.raises(CheckpointError) as err:
        io.load(path)
    assert not seen and not (tmp_path / "PWNED").exists()
    assert words in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_keyword_arguments_are_checked_against_the_callee():
    """Allowed: parameters of the function (F.relu's ``inplace``), the method (``view``'s ``dtype``
    through aten's schema) and the module; anything else is refused by name."""
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.nn.functional.relu, (x,), {"inplace": False})
    b = g.call_method("view", (a,), {"dtype": torch.float32})
    g.output(g.call_function(torch.cat, ([b, b],), {"dim": 1}))
    gm = fx.GraphModule(torch.nn.Module(), g)
    description = graphio.describe(gm)
    rebuilt = graphio.rebuild(json.loads(json.dumps(description)), {})
    t = torch.randn(2, 3)
    assert torch.equal(rebuilt(t), gm(t))
    for node, key in ((1, "inplac"), (2, "size_"), (3, "axis")):
        bad = copy.deepcopy(description)
        bad["nodes"][node]["kwargs"]["dict"].append([key, 1])
        with pytest.raises(CheckpointError, match=f"keyword argument.*{key}.*does not take"):
            graphio.rebuild(bad, {})


# -- the second wall: the generated source ----------------------------------------------------
def _check(source: str) -> None:
    graphsafety.check_forward_source(textwrap.dedent(source), graphio._SOURCE_FUNCTIONS, graphio.METHODS,
                                     {"shape", "dtype", "device", "ndim"})


def test_generated_source_of_real_models_passes():
    for model in (residual_model(), graphio.trace(chain_model()), fx.symbolic_trace(budgetprune.create_model("resnet20"))):
        gm = model if isinstance(model, fx.GraphModule) else graphio.trace(model)
        _check(gm.graph.python_code("self").src)


@pytest.mark.parametrize("source", [
    "import os\ndef forward(self, x):\n    return x",
    "__import__('os').system('true')\ndef forward(self, x):\n    return x",
    "@staticmethod\ndef forward(self, x):\n    return x",
    "def forward(self, x, y=__import__('os')):\n    return x",
    "def forward(self, x: __import__('os')):\n    return x",
    "def forward(self, *x):\n    return x",
    "def forward(self, x):\n    import os\n    return x",
    "def forward(self, x):\n    os.system('true')\n    return x",
    "def forward(self, x):\n    y = __import__('os')\n    return x",
    "def forward(self, x):\n    y = x.__class__\n    return x",
    "def forward(self, x):\n    y = x.numpy()\n    return x",
    "def forward(self, x):\n    y = self.__dict__\n    return x",
    "def forward(self, x):\n    y = getattr(x, '__class__')\n    return x",
    "def forward(self, x):\n    y = torch.load('f')\n    return x",
    "def forward(self, x):\n    y = torch._C._nn.linear.__globals__\n    return x",
    "def forward(self, x):\n    y = (lambda: 1)()\n    return x",
    "def forward(self, x):\n    y = [a for a in x]\n    return x",
    "def forward(self, x):\n    y = x if x else x\n    return x",
    "def forward(self, x):\n    y = torch.cat(*x)\n    return x",
    "def forward(self, x):\n    y = torch.cat(x, **x)\n    return x",
    "def forward(self, x):\n    y = undefined_name\n    return x",
    "def forward(self, x):\n    y = x ** x\n    return x",
    "def forward(self, x):\n    x.shape = 3\n    return x",
    "def forward(self, x):\n    while True: pass",
    "def forward(self, x):\n    return x\ndef _g(): pass",
    "torch.fx._symbolic_trace.wrap('os')\ndef forward(self, x):\n    return x",
    "def forward(self, x):\n    return x)",
])
def test_generated_source_outside_the_allowed_shape_is_refused(source):
    with pytest.raises(CheckpointError, match="code"):
        _check(source)


# -- damaged files on the command line ------------------------------------------------------------
def _damaged(kind: str, parts: dict) -> dict:
    parts = copy.deepcopy(parts)
    if kind == "meta is a list":
        parts["meta"] = [1, 2]
    elif kind == "negative input shape":
        parts["meta"] = {"input_shape": [-1, 28, 28]}
    elif kind == "textual input shape":
        parts["meta"] = {"input_shape": "1,28,28"}
    elif kind == "huge input shape":
        parts["meta"] = {"input_shape": [1, 100000, 100000]}
    elif kind == "input shape the model does not take":
        parts["meta"] = {"input_shape": [3, 5, 5]}
    elif kind == "sparse section of 10^12 weights":
        parts.update(version=3, sparse={"extra": {"shape": torch.tensor([10 ** 6, 10 ** 6]),
                                                  "bits": torch.zeros(16, dtype=torch.uint8), "values": torch.zeros(0)}})
    elif kind == "sparse values that do not fit the mask":
        parts.update(version=3, sparse={"extra": {"shape": torch.tensor([8]), "bits": torch.tensor([255], dtype=torch.uint8),
                                                  "values": torch.zeros(3)}})
    elif kind == "textual version":
        parts["version"] = "2"
    elif kind == "graph is not JSON":
        parts["graph"] = "{"
    elif kind == "state dict is a list":
        parts["state_dict"] = [torch.zeros(1)]
    return parts


DAMAGES = ["meta is a list", "negative input shape", "textual input shape", "huge input shape",
           "input shape the model does not take", "sparse section of 10^12 weights",
           "sparse values that do not fit the mask", "textual version", "graph is not JSON", "state dict is a list"]


@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_files_give_one_line_on_every_command(kind, lenet_file, tmp_path, capsys):
    o = torch.load(lenet_file, weights_only=True)
    parts = dict(o, graph=json.loads(o["graph"]), meta=json.loads(o["meta"]))
    parts = _damaged(kind, parts)
    path = tmp_path / "damaged.pt"
    obj = dict(parts, graph=parts["graph"] if isinstance(parts["graph"], str) else json.dumps(parts["graph"]),
               meta=json.dumps(parts["meta"]))
    torch.save(obj, path)
    for command in (["info", str(path)], ["evaluate", str(path), "--data", "demo"],
                    ["export", str(path), "--format", "torchscript", "--out", str(tmp_path / "m.ts")]):
        capsys.readouterr()
        assert cli.main(command) == 2, (kind, command)
        err = capsys.readouterr().err
        assert err.startswith("budgetprune: error: ") and err.count("\n") == 1, (kind, command, err)
    assert not (tmp_path / "m.ts").exists()


def test_a_small_file_declaring_a_huge_layer_allocates_nothing(lenet_file, tmp_path):
    """Linear(20000, 20000) declared over LeNet's 500x800 weights: refused before 1.6 GB is allocated
    (peak memory of the loading process measured against the same process before the load)."""
    o = torch.load(lenet_file, weights_only=True)
    g = json.loads(o["graph"])
    g["modules"]["classifier.1"] = {"op": "linear", "in_features": 20000, "out_features": 20000, "bias": True}
    o["graph"] = json.dumps(g)
    path = tmp_path / "huge.pt"
    torch.save(o, path)
    script = textwrap.dedent(f"""
        import resource, budgetprune
        from budgetprune.errors import CheckpointError
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            budgetprune.load({str(path)!r})
        except CheckpointError as exc:
            print("refused:", exc)
        print("grew_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120).stdout
    assert "refused:" in out and "(20000, 20000)" in out, out
    grew = int(out.split("grew_kib")[1])
    assert grew < 200_000, f"loading grew the process by {grew} KiB"


# -- format 1 (a list of layer specs of an nn.Sequential) -------------------------------------------
def _format1(specs: list, state: dict, path, meta=None) -> str:
    torch.save({"format": io.FORMAT, "version": 1, "architecture": json.dumps(specs), "state_dict": state,
                "meta": json.dumps(meta or {"input_shape": [1, 28, 28]})}, path)
    return str(path)


def _lenet_format1(lenet_file, evil_layer: dict | None = None) -> tuple[list, dict]:
    """LeNet-5 as a format-1 file (its specs and state by position), optionally with one more layer at 2."""
    model, description, _ = io.load_file(lenet_file)
    names = [name for name, _ in io.named_layer_specs(description)]
    specs = [spec for _, spec in io.named_layer_specs(description)]
    state = {}
    for i, name in enumerate(names):
        j = i + 1 if evil_layer is not None and i >= 2 else i
        state.update({f"{j}.{k[len(name) + 1:]}": v for k, v in model.state_dict().items()
                      if k.startswith(name + ".")})
    if evil_layer is not None:
        specs.insert(2, evil_layer)
    return specs, state


@pytest.mark.parametrize("name", [
    'r") if getattr(__import__("os"), "system")("touch PWNED") else getattr(self, "r',
    'r")\rgetattr(__import__("os"), "system")("touch PWNED")\rdef _g(self):\r    return getattr(self, "r',
    "a\nb", "__class__", "x y"])
def test_format1_layer_names_that_would_reach_traced_code_are_refused(name, lenet_file, tmp_path, monkeypatch, capsys):
    """A nested Sequential's layer name reaches the source fx writes when the loaded model is traced
    again (info, prune --teacher, save): refused where the layers are built, for both formats."""
    monkeypatch.chdir(tmp_path)
    name = name.replace("\\r", "\r").replace("\\n", "\n")
    specs, state = _lenet_format1(lenet_file, {"op": "sequential", "layers": {name: {"op": "identity"}}})
    path = _format1(specs, state, tmp_path / "f1.pt")
    with side_effects() as seen, pytest.raises(CheckpointError, match="layer name"):
        io.load(path)
    assert cli.main(["info", path]) == 2
    assert cli.main(["prune", "--model", "lenet5", "--data", "demo", "--budget", "0.5", "--teacher", path,
                     "--epochs", "1", "--out", "run", "--no-progress"]) == 2
    assert not seen and not (tmp_path / "PWNED").exists()
    parts = _file_parts(residual_model(), {"input_shape": [3, 8, 8]})  # format 2 holds nested layers too
    parts["graph"]["modules"]["block"]["layers"][name] = parts["graph"]["modules"]["block"]["layers"].pop("0")
    with pytest.raises(CheckpointError, match="layer name"):
        io.load(_write(parts, tmp_path / "f2.pt"))


def test_format1_files_still_load_and_trace_again(lenet_file, tmp_path):
    specs, state = _lenet_format1(lenet_file)
    model = io.load(_format1(specs, state, tmp_path / "f1.pt"))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), io.load(lenet_file)(x))
    budgetprune.ChannelGraph.build(model, x[:1])  # what info and prune --teacher do


@pytest.mark.parametrize("source", [
    "def forward(self, x):\n    self = x.detach()\n    y = self.data.zero_(x)\n    return x",  # self rebound
    "def forward(self, torch):\n    y = torch.cat(torch)\n    return y",  # an input shadowing a global
    "def forward(self, x):\n    getattr = x\n    return x",
    "def forward(self, x):\n    budgetprune_ops_select_channels = x\n    return x",
])
def test_generated_source_that_rebinds_the_model_or_a_global_is_refused(source):
    with pytest.raises(CheckpointError, match="a local named"):
        _check(source.replace("\\n", "\n"))


def test_a_node_named_self_is_refused(tmp_path):
    """With a node named ``self`` fx writes ``self = ...`` and every later ``self.a.b(...)`` would call
    a method of that value instead of a layer of the model."""
    parts = _file_parts(residual_model(), {"input_shape": [3, 8, 8]})
    _first(parts["graph"], "call_module")["name"] = "self"
    with pytest.raises(CheckpointError, match="node name 'self'"):
        io.load(_write(parts, tmp_path / "self.pt"))


def _memory_after_load(path) -> tuple[str, int]:
    """(what budgetprune.load said, KiB the process grew by while loading), in a fresh process."""
    script = textwrap.dedent(f"""
        import resource, budgetprune
        from budgetprune.errors import CheckpointError
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            budgetprune.load({str(path)!r})
            print("loaded")
        except CheckpointError as exc:
            print("refused:", exc)
        print("grew_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120).stdout
    return out.split("grew_kib")[0], int(out.split("grew_kib")[1])


@pytest.mark.parametrize("where", ["dense weight", "sparse bit mask"])
def test_tensors_not_backed_by_their_data_are_refused_before_any_copy(where, lenet_file, tmp_path):
    """A stored tensor that is one value expanded to 2**28 (stride 0) costs a few bytes in the file
    and 1 GiB once copied: refused when the file is read, with the process measured not to grow."""
    o = torch.load(lenet_file, weights_only=True)
    if where == "dense weight":
        o["state_dict"]["features.0.weight"] = torch.ones(1).expand(2 ** 28)
    else:
        o.update(version=3, sparse={"extra": {"shape": torch.tensor([2 ** 28]),
                                              "bits": torch.full((1,), 255, dtype=torch.uint8).expand(2 ** 25),
                                              "values": torch.ones(1).expand(2 ** 28)}})
    path = tmp_path / "expanded.pt"
    torch.save(o, path)
    assert path.stat().st_size < 3_000_000
    said, grew = _memory_after_load(path)
    assert "refused:" in said and "not backed by its own data" in said, said
    assert grew < 200_000, f"loading grew the process by {grew} KiB"


def test_a_checkpoint_with_damaged_parts_gives_one_line_on_resume(tmp_path, monkeypatch, capsys):
    """`prune --resume` on a checkpoint.pt whose parts are not what budgetprune writes."""
    from test_reproducibility import TINY, _demo_small
    monkeypatch.setattr(budgetprune.data, "load_dataset", lambda *a, **k: _demo_small())
    out = tmp_path / "run"
    args = ["prune", "--model", "lenet5", "--data", "demo", "--budget", "0.25", "--out", str(out), "--no-progress",
            *TINY]
    assert cli.main(args) == 0
    good = torch.load(out / "checkpoint.pt", weights_only=True)
    damages = {"a list": [1, 2], "no history": {k: v for k, v in good.items() if k != "history"},
               "history not text": dict(good, history=3), "bad random state": dict(good, rng=torch.zeros(3)),
               "epoch as text": dict(good, epoch="1"), "weights of another shape": dict(
                   good, model={k: v[:1] for k, v in good["model"].items()}),
               "network not JSON": dict(good, arch="{")}
    for why, damaged in damages.items():
        torch.save(damaged, out / "checkpoint.pt")
        (out / "metrics.json").unlink(missing_ok=True)
        capsys.readouterr()
        assert cli.main(args + ["--resume"]) == 2, why
        err = capsys.readouterr().err
        assert err.startswith("budgetprune: error: ") and err.count("\n") == 1 and "checkpoint" in err, (why, err)


def test_info_prints_the_file_s_words_without_terminal_escapes(lenet_file, tmp_path, capsys):
    o = torch.load(lenet_file, weights_only=True)
    o["meta"] = json.dumps({"input_shape": [1, 28, 28],
                            "metrics": {"accuracy\x1b[2J\x1b]0;title\x07": "0.99\r forged", "clip": "\x9b31m"}})
    torch.save(o, tmp_path / "ansi.pt")
    assert cli.main(["info", str(tmp_path / "ansi.pt")]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\r\x9b") and "\\x1b[2J" in out and "\\r forged" in out


@pytest.mark.parametrize("output", ["size", "tuple"])
def test_evaluate_on_a_file_whose_network_is_no_classifier_gives_one_line(output, tmp_path, capsys):
    """A file that loads but whose forward returns a size or a tuple: evaluate says so in one line."""
    g = fx.Graph()
    x = g.placeholder("x")
    size = g.call_method("size", (x,))
    g.output(size if output == "size" else (x, x))
    path = tmp_path / "odd.pt"
    io.save(fx.GraphModule(torch.nn.Module(), g), path, meta={"input_shape": [1, 28, 28]})
    assert cli.main(["evaluate", str(path), "--data", "demo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be scored" in err


# -- the fuzzer ---------------------------------------------------------------------------------
_NASTY = ["", " ", "\n", "\r", "x\ny", "x\rimport os", "a)\r__import__('os').system('touch PWNED')\rdef _g(b",
          "__class__", "__import__", "__builtins__", "class", "self", "os.system", "torch.load", "_dynamo",
          "torch._dynamo", "F.relu", "operator.add", "getattr", "view", "x" * 300, "é", "ｘ", "0", "1.5", "-1",
          "${HOME}", "'", "\"", "\\", "\x00", "inplace", "dim", "float32", "cuda:99", "meta", "1e400"]
_NUMBERS = [0, 1, -1, 2, 3, 7, 2 ** 31, 10 ** 12, -(10 ** 12), 0.5, -0.0, 1e308, True, False, None, "1", [1], {}]


def _leaves(obj, path=()):
    """(path, is_key) of every string, number, bool and null of a JSON-able object, and of every key."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield path + (k,), True
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    else:
        yield path, False


def _mutate(obj, rng: random.Random):
    """``obj`` with one leaf value or key replaced (nasty strings, extreme numbers, other names of
    the same file, a flipped character), or one list item deleted or duplicated."""
    obj = copy.deepcopy(obj)
    leaves = list(_leaves(obj))
    names = [p[-1] for p, is_key in leaves if is_key and isinstance(p[-1], str)]
    path, is_key = rng.choice(leaves)
    parent = obj
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if is_key:
        new = rng.choice(_NASTY + names)
        if new not in parent:
            parent[new] = parent.pop(last)
        return obj
    value = parent[last]
    kind = rng.random()
    if isinstance(parent, list) and kind < 0.1:
        if rng.random() < 0.5:
            del parent[last]
        else:
            parent.insert(last, copy.deepcopy(value))
    elif isinstance(value, str) and kind < 0.5:
        if value and rng.random() < 0.5:
            i = rng.randrange(len(value))
            parent[last] = value[:i] + rng.choice(["\r", "\n", ")", "(", "_", ".", "x", "'"]) + value[i + 1:]
        else:
            parent[last] = rng.choice(_NASTY + names)
    else:
        parent[last] = rng.choice(_NUMBERS + _NASTY[:12])
    return obj


def _fuzz(parts: dict, cases: int, seed: int, tmp_path, example: torch.Tensor) -> dict:
    """Load ``cases`` mutated copies of ``parts``; every outcome is a one-line CheckpointError or a
    model that runs or fails like any model (never a side effect). Returns the outcome counts."""
    clean = io.load(_write(parts, tmp_path / "clean.pt"))  # warm-up: torch's lazy imports happen here
    with torch.no_grad():
        reference = clean(example)
    rng = random.Random(seed)
    counts = {"refused": 0, "loaded": 0, "loaded_equal": 0}
    top = {"graph": parts["graph"], "meta": parts["meta"], "version": parts["version"], "format": parts["format"]}
    before = set(os.listdir(tmp_path))
    for case in range(cases):
        mutated = _mutate(top, rng)
        obj = dict(parts, **{k: mutated.get(k) for k in top})
        path = tmp_path / "fuzz.pt"
        try:
            torch.save(dict(obj, graph=json.dumps(obj["graph"]), meta=json.dumps(obj["meta"])), path)
        except (TypeError, ValueError):
            continue  # a value JSON cannot hold (not a file a user could be handed)
        with side_effects() as seen:
            try:
                model = io.load(path)
            except CheckpointError as exc:
                counts["refused"] += 1
                assert "\n" not in str(exc) and "\r" not in str(exc), (case, str(exc))
                model = None
            if model is not None:
                counts["loaded"] += 1
                try:
                    fx.symbolic_trace(model)  # traced again, as info, prune --teacher and save do
                except Exception:
                    pass  # a graph torch.fx cannot trace again: an ordinary error
                try:
                    with torch.no_grad():
                        out = model(example)
                    counts["loaded_equal"] += isinstance(out, torch.Tensor) and out.shape == reference.shape \
                        and torch.equal(out, reference)
                except Exception:
                    pass  # a valid graph that does not compute: an ordinary error, nothing more
        assert not seen, (case, seen, mutated)
    assert set(os.listdir(tmp_path)) == before | {"fuzz.pt"}
    return counts


@pytest.mark.parametrize("model, example, cases", [
    (residual_model, torch.randn(2, 3, 8, 8), 700),
    (lambda: graphio.trace(chain_model()), torch.randn(2, 3, 8, 8), 400),
])
def test_fuzzed_model_files_refuse_or_load_and_never_act(model, example, cases, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parts = _file_parts(model(), {"input_shape": list(example.shape[1:]), "metrics": {"method": "bar"}})
    counts = _fuzz(parts, cases, seed=1234, tmp_path=tmp_path, example=example)
    assert not (tmp_path / "PWNED").exists()
    # the mutator reaches both outcomes: most files are refused, and the harmless edits still load
    assert counts["refused"] > cases // 3 and counts["loaded_equal"] > 0, counts
