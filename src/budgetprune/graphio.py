"""A ``torch.fx.GraphModule`` ↔ a JSON-able description, for safe saving and loading.

:func:`describe` turns a (compacted) GraphModule into plain data: its graph as a list of
nodes ``{name, op, target, args, kwargs}``, a ``modules`` table (qualified name → layer spec,
see :mod:`budgetprune.architecture`) and a ``tensors`` table (the tensors that ``get_attr``
nodes read, such as channel index buffers: dtype and shape; their values live in the state
dict). :func:`rebuild` turns that data and a state dict back into a GraphModule.

Nothing is ever looked up by an arbitrary name: modules come from the layer table, functions
from :data:`FUNCTIONS` (stable names such as ``"operator.add"``, ``"F.relu"``,
``"budgetprune.ops.index_add_channels"``) and methods from :data:`METHODS`. A model using
anything else cannot be saved, and a file naming anything else cannot be loaded; both raise
a one-line :class:`~budgetprune.errors.CheckpointError`.

A description read from a file is untrusted, and ``torch.fx`` writes names into the Python
source it generates and executes. :func:`rebuild` therefore (1) checks every name against a
strict grammar and every keyword argument against the callee's signature before it builds
anything (:mod:`budgetprune.graphsafety`), (2) builds the layers on the ``meta`` device and
compares each declared shape with the stored tensors before it allocates memory, and (3)
parses the source ``torch.fx`` generates and refuses anything but assignments of allow-listed
calls before that source is executed.

Arguments are encoded as JSON with one-key tagged objects for what JSON lacks:
``{"node": name}``, ``{"tuple": [...]}``, ``{"dict": [[key, value], ...]}``,
``{"slice": [start, stop, step]}``, ``{"dtype": "int64"}``, ``{"device": "cpu"}``,
``{"float": "inf"}`` and ``{"ellipsis": null}``.
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .architecture import SelectFeatures, build_layer, module_spec
from .errors import CheckpointError, first_line
from .fx_registry import forget_unused_wraps
from .graphsafety import check_forward_source, check_keywords, check_names, device_of, dtype_of, \
    is_attribute_path, is_plain_name
from .ops import CHANNEL_OPS, SelfAttention

FORMAT = "budgetprune-graph"
VERSION = 1

_F_NAMES = ("relu", "relu6", "leaky_relu", "elu", "celu", "selu", "gelu", "silu", "mish", "sigmoid", "hardswish",
            "hardsigmoid", "hardtanh", "softplus", "adaptive_avg_pool2d", "adaptive_max_pool2d", "avg_pool2d",
            "max_pool2d", "dropout", "dropout2d", "linear", "conv2d", "layer_norm")

#: The functions a saved graph may call, by stable name: pure tensor operations only.
FUNCTIONS: dict[str, Callable] = {
    **{f"operator.{name}": getattr(operator, name) for name in ("add", "sub", "mul", "neg", "iadd", "isub", "imul",
                                                                "getitem")},
    **{f"torch.{name}": getattr(torch, name) for name in ("cat", "flatten", "relu", "sigmoid", "tanh", "add", "sub",
                                                          "mul", "neg", "permute", "transpose")},
    **{f"F.{name}": getattr(F, name) for name in _F_NAMES},
    **{f"budgetprune.ops.{name}": fn for name, fn in CHANNEL_OPS.items()},
    "getattr": getattr,  # only for the attributes in _GETATTR_NAMES (fx records x.shape this way)
}
_FUNCTION_NAMES = {fn: name for name, fn in FUNCTIONS.items()}
_GETATTR_NAMES = {"shape", "dtype", "device", "ndim"}

#: The tensor methods a saved graph may call.
METHODS = frozenset({"view", "reshape", "flatten", "size", "dim", "mean", "amax", "sum", "relu", "relu_", "sigmoid",
                     "tanh", "neg", "contiguous", "clone", "detach", "index_select", "index_add", "mul", "add", "sub",
                     "expand_as", "permute", "transpose", "expand"})

_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")


# -- describe ------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping budgetprune's ``SelectFeatures`` and ``SelfAttention`` as one module each."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (SelectFeatures, SelfAttention)) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` itself if it is a GraphModule, else its ``torch.fx`` trace (``SelectFeatures`` kept whole)."""
    if isinstance(model, fx.GraphModule):
        return model
    forget_unused_wraps()  # a trace patches every registered wrap: drop those of modules gone
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:
        raise CheckpointError(f"{type(model).__name__} cannot be saved: torch.fx cannot trace it "
                              f"({first_line(exc)})") from None
    return fx.GraphModule(model, graph, type(model).__name__)


def describe(gm: fx.GraphModule) -> dict:
    """The JSON-able description of ``gm`` (see the module docstring); refuses what cannot be rebuilt."""
    if type(gm.graph._codegen) is not fx.graph.CodeGen:
        raise CheckpointError("the graph cannot be saved: it uses a custom calling convention (pytree codegen); "
                              "trace the model with torch.fx.symbolic_trace")
    modules: dict[str, dict] = {}
    nodes = [_describe_node(gm, node, modules) for node in gm.graph.nodes]
    tensors = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and not _covered(gm, node.target, modules):
            tensors[node.target] = _tensor_spec(gm, node)
    return {"format": FORMAT, "version": VERSION, "nodes": nodes, "modules": modules, "tensors": tensors}


def _describe_node(gm: fx.GraphModule, node: fx.Node, modules: dict[str, dict]) -> dict:
    target = node.target
    if node.op in ("call_module", "get_attr") and not is_attribute_path(target) or \
            node.op == "placeholder" and not is_plain_name(target) or not is_plain_name(node.name) or \
            any(not is_plain_name(key) for key in node.kwargs):
        raise CheckpointError(f"node '{node.name}' ({node.op} '{target}') cannot be saved: a model file needs "
                              "plain attribute, node and keyword names and positional inputs")
    if node.op == "call_module":
        modules[target] = _module_spec(gm, node)
    elif node.op == "call_function":
        target = _FUNCTION_NAMES.get(target) if _hashable(target) else None
        if target is None:
            _refuse(node, _qualified_name(node.target))
        _check_getattr(target, node.args, node.name)
    elif node.op == "call_method" and target not in METHODS:
        _refuse(node, f"Tensor.{target}")
    elif node.op == "get_attr":
        _tensor_at(gm, target, node.name)
    return {"name": node.name, "op": node.op, "target": target,
            "args": _encode(node.args, node.name), "kwargs": _encode(node.kwargs, node.name)}


def _module_spec(gm: fx.GraphModule, node: fx.Node) -> dict:
    try:
        return module_spec(gm.get_submodule(node.target))
    except CheckpointError as exc:
        raise CheckpointError(f"node '{node.name}' (module '{node.target}'): {exc}; budgetprune saves standard "
                              "torch.nn layers only") from None


def _refuse(node: fx.Node, what: str):
    raise CheckpointError(f"node '{node.name}' calls '{what}', which cannot be saved: a budgetprune model file "
                          "may call only the torch operations listed in budgetprune.graphio.FUNCTIONS / METHODS")


def _check_getattr(name: str, args, where: str) -> None:
    if name == "getattr" and (len(args) != 2 or not isinstance(args[1], str) or args[1] not in _GETATTR_NAMES):
        raise CheckpointError(f"node '{where}' reads attribute {args[1:]!r} with getattr, which cannot be saved "
                              f"(allowed: {', '.join(sorted(_GETATTR_NAMES))})")


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _qualified_name(fn) -> str:
    return f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__qualname__', None) or repr(fn)}"


def _tensor_at(root: nn.Module, target: str, where: str) -> torch.Tensor:
    try:
        value = root.get_submodule(target.rpartition(".")[0]) if "." in target else root
        value = getattr(value, target.rpartition(".")[2])
    except AttributeError:
        value = None
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"node '{where}' reads '{target}', which is not a tensor of the model")
    return value


def _covered(gm: fx.GraphModule, target: str, modules: dict[str, dict]) -> bool:
    """Whether ``target`` is a parameter or buffer of a described module (rebuilt with it)."""
    for name in modules:
        if target.startswith(name + "."):
            return target[len(name) + 1:] in gm.get_submodule(name).state_dict()
    return False


def _tensor_spec(gm: fx.GraphModule, node: fx.Node) -> dict:
    value = _tensor_at(gm, node.target, node.name)
    return {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
            "parameter": isinstance(value, nn.Parameter)}


def _encode(value, where: str):
    """JSON-able form of one node argument."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, dict):
        return {"dict": [[_encode(k, where), _encode(v, where)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"slice": [_encode(v, where) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": None}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    raise CheckpointError(f"node '{where}' has an argument of type {type(value).__name__} ({value!r:.60}) "
                          "that cannot be saved")


def saveable_state(gm: fx.GraphModule, description: dict) -> dict[str, torch.Tensor]:
    """The tensors :func:`rebuild` needs: the described modules' state and the ``tensors`` table (CPU)."""
    state = {}
    for key, value in gm.state_dict().items():
        if any(key.startswith(name + ".") for name in description["modules"]):
            state[key] = value
    for target in description["tensors"]:
        state[target] = _tensor_at(gm, target, target)
    return {k: v.detach().cpu() for k, v in state.items()}


def named_layer_specs(description: dict) -> list[tuple[str, dict]]:
    """(module name, layer spec) of the called modules, in the order the graph first calls them."""
    seen = {}
    for node in description["nodes"]:
        if node["op"] == "call_module" and node["target"] not in seen:
            seen[node["target"]] = description["modules"][node["target"]]
    return list(seen.items())


# -- rebuild -------------------------------------------------------------------------------
def rebuild(description: dict, state_dict: dict[str, torch.Tensor]) -> fx.GraphModule:
    """The GraphModule ``description`` describes, with ``state_dict`` loaded strictly, in eval mode.

    Safe on untrusted input (see the module docstring): any problem is a one-line
    :class:`CheckpointError`, raised before code is generated or memory is allocated."""
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise CheckpointError("the model file holds no budgetprune graph description")
    version = description.get("version", 0)
    if not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"the graph description is format {version!r:.20}, not one this budgetprune reads; "
                              "upgrade budgetprune")
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) and torch.is_tensor(v)
                                                   for k, v in state_dict.items()):
        raise CheckpointError("the model file's state dict is not a mapping of names to tensors")
    try:
        check_names(description)
        with torch.device("meta"), warnings.catch_warnings():  # declared sizes cost nothing until checked
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            root = _build_root(description["modules"], description["tensors"])
        graph = _build_graph(description["nodes"], description["modules"], root)
        check_forward_source(graph.python_code("self").src, _SOURCE_FUNCTIONS, METHODS, _GETATTR_NAMES)
        forget_unused_wraps()  # its code registers its channel ops again: drop the registrations of modules gone
        gm = fx.GraphModule(root, graph, "CompactedNet")
        check_state_shapes(gm, state_dict)
        gm.to_empty(device="cpu")
    except CheckpointError:
        raise
    except Exception as exc:  # a malformed (hand-edited or truncated) description
        raise CheckpointError(f"malformed graph description: {first_line(exc)}") from None
    _load_state(gm, state_dict)
    return gm.eval()


_SOURCE_FUNCTIONS = tuple(fn for fn in FUNCTIONS.values() if fn is not getattr)  # getattr: checked on its own


def check_state_shapes(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """The stored tensors are exactly those ``model`` (built on any device) declares, shape for shape."""
    declared = model.state_dict()
    missing, unexpected = sorted(set(declared) - set(state_dict)), sorted(set(state_dict) - set(declared))
    wrong = [f"{k}: file {tuple(state_dict[k].shape)}, described {tuple(v.shape)}"
             for k, v in declared.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        detail = "; ".join(part for part in (
            f"missing {', '.join(missing[:5])}" if missing else "",
            f"unexpected {', '.join(unexpected[:5])}" if unexpected else "", "; ".join(wrong[:3])) if part)
        raise CheckpointError(f"the weights do not match the graph description ({detail[:300]})")


def _check_path(path: str, what: str) -> None:
    if not is_attribute_path(path):
        raise CheckpointError(f"malformed graph description: {what} name {path!r:.80} is not a valid attribute path")


def _owner(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module that holds the last part of ``path`` (plain containers created on the way), and that part."""
    *parents, last = path.split(".")
    module = root
    for part in parents:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    return module, last


def _build_root(modules: dict[str, dict], tensors: dict[str, dict]) -> nn.Module:
    root = nn.Module()
    for name in sorted(modules, key=lambda n: n.count(".")):
        _check_path(name, "module")
        owner, last = _owner(root, name)
        owner.add_module(last, build_layer(modules[name]))
    for target, spec in tensors.items():
        _check_path(target, "tensor")
        if any(target.startswith(name + ".") for name in modules):
            raise CheckpointError(f"malformed graph description: tensor '{target}' lies inside a saved module")
        owner, last = _owner(root, target)
        shape = spec.get("shape")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(type(n) is int and n >= 0 for n in shape)):
            raise CheckpointError(f"malformed graph description: tensor '{target}' has shape {shape!r:.60}")
        value = torch.empty(shape, dtype=dtype_of(spec["dtype"]))
        if spec.get("parameter"):
            owner.register_parameter(last, nn.Parameter(value, requires_grad=value.is_floating_point()))
        else:
            owner.register_buffer(last, value)
    return root


def _build_graph(nodes: list[dict], modules: dict[str, dict], root: nn.Module) -> fx.Graph:
    if len(nodes) > MAX_NODES:
        raise CheckpointError(f"malformed graph description: {len(nodes)} nodes (at most {MAX_NODES})")
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for entry in nodes:
        name, op = entry["name"], entry["op"]
        if op not in _OPS or name in env:
            raise CheckpointError(f"malformed graph description: node {name!r:.80} has op {op!r:.40}")
        args, kwargs = _decode(entry["args"], env), _decode(entry["kwargs"], env)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict) or \
                op in ("placeholder", "get_attr") and (args or kwargs) or op == "output" and (len(args) != 1 or kwargs):
            raise CheckpointError(f"malformed graph description: node '{name}' ({op}) has arguments "
                                  f"{args!r:.60} {kwargs!r:.60}")
        target = _target(entry, modules, root, args)
        node = graph.create_node(op, target, args, kwargs, name=name)
        check_keywords(node, root)
        if op == "call_function" and target in CHANNEL_OPS.values():
            node.meta["is_wrapped"] = True  # stays a leaf when the GraphModule is traced again
        env[name] = node
    graph.lint()
    return graph


def _target(entry: dict, modules: dict[str, dict], root: nn.Module, args):
    """The checked target of one node: a whitelisted function, method, module or tensor."""
    op, target, name = entry["op"], entry["target"], entry["name"]
    if op == "call_function":
        if target not in FUNCTIONS:
            raise CheckpointError(f"node '{name}' calls '{target}', which budgetprune does not load "
                                  "(not in budgetprune.graphio.FUNCTIONS); the file is not a budgetprune model")
        _check_getattr(target, args, name)
        return FUNCTIONS[target]
    if op == "call_method":
        if target not in METHODS or not args or not isinstance(args[0], fx.Node):
            raise CheckpointError(f"node '{name}' calls method '{target}', which budgetprune does not load "
                                  "(not in budgetprune.graphio.METHODS)")
        return target
    if op == "call_module" and target not in modules:
        raise CheckpointError(f"node '{name}' calls module '{target}', which the description does not list")
    if op == "get_attr":
        _check_path(target, "tensor")
        _tensor_at(root, target, name)
    return target  # placeholder and output targets: plain names (graphsafety.check_names)


#: The most items one argument list may hold, and the most nodes a graph may have: a file cannot
#: make a small graph fan out into an arbitrary amount of work (a concatenation of 65,536 copies).
MAX_ITEMS, MAX_NODES = 4096, 100_000


def _decode(value, env: dict[str, fx.Node]):
    """The node argument a JSON value encodes (inverse of :func:`_encode`)."""
    if isinstance(value, list):
        if len(value) > MAX_ITEMS:
            raise CheckpointError(f"malformed graph description: an argument of {len(value)} items "
                                  f"(at most {MAX_ITEMS})")
        return [_decode(v, env) for v in value]
    if not isinstance(value, dict):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise CheckpointError(f"malformed graph description: argument {value!r:.60}")
    if len(value) != 1 or next(iter(value)) not in _TAGS:
        raise CheckpointError(f"malformed graph description: unknown argument tag in {value!r:.80}")
    tag, body = next(iter(value.items()))
    return _TAGS[tag](body, env)


def _decode_node(name, env):
    if name not in env:
        raise CheckpointError(f"malformed graph description: argument names node {name!r} before it is defined")
    return env[name]


def _decode_float(text, env):
    if text not in ("inf", "-inf", "nan"):
        raise CheckpointError(f"malformed graph description: float {text!r}")
    return float(text)


_TAGS = {
    "node": _decode_node,
    "tuple": lambda body, env: tuple(_decode(body, env)),
    "dict": lambda body, env: {_decode(k, env): _decode(v, env) for k, v in body},
    "slice": lambda body, env: slice(*_decode(body, env)),
    "float": _decode_float,
    "ellipsis": lambda body, env: Ellipsis,
    "dtype": lambda body, env: dtype_of(body),
    "device": lambda body, env: device_of(body),
}


def _load_state(gm: fx.GraphModule, state_dict) -> None:
    try:
        gm.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"the weights do not match the graph description ({detail})") from None

