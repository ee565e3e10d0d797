"""Checks that a graph description read from a file can build nothing but the allowed network.

A model file is untrusted input. ``torch.fx`` turns a graph into Python source
(``GraphModule.recompile``) and ``exec``\\ s it, writing node names, placeholder names, module
paths and keyword-argument names into that source verbatim. So before
:func:`budgetprune.graphio.rebuild` builds anything, every string of the description that can
reach generated source or a lookup passes a strict grammar here (:func:`check_names`), and
every keyword argument must be a parameter of the called function's own signature
(:func:`check_keywords`). As a second, independent wall, the source ``torch.fx`` generates is
parsed and checked against the only shape a rebuilt ``forward`` may have
(:func:`check_forward_source`): one plain function whose statements assign the results of the
allow-listed calls to local names — nothing runs when the module is created, and nothing
outside the allow-list runs when it is called.
"""

from __future__ import annotations

import ast
import functools
import inspect
import keyword
import re

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import CheckpointError

MAX_NAME = 200
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INDEX = re.compile(r"[0-9]+")

#: The dtypes a description may name (tensor table entries, dtype arguments), by their torch name.
DTYPES: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)}

_DEVICE_TYPES = frozenset({"cpu", "cuda", "mps", "xpu", "meta"})


def _malformed(text: str) -> CheckpointError:
    return CheckpointError(f"malformed graph description: {text}")


def is_plain_name(name) -> bool:
    """An ASCII identifier, not a Python keyword, not a dunder, at most MAX_NAME characters."""
    return (isinstance(name, str) and len(name) <= MAX_NAME and _NAME.fullmatch(name) is not None
            and not keyword.iskeyword(name) and not name.startswith("__"))


def is_layer_name(name) -> bool:
    """A child module's name: a plain name or an index (``conv1``, ``0``)."""
    return is_plain_name(name) or (isinstance(name, str) and len(name) <= MAX_NAME
                                   and _INDEX.fullmatch(name) is not None)


def is_attribute_path(path) -> bool:
    """A dotted path whose parts are plain names or indices (``layer1.0.conv1``)."""
    return isinstance(path, str) and 0 < len(path) <= 4 * MAX_NAME and all(map(is_layer_name, path.split(".")))


def check_names(description: dict) -> None:
    """Every name of ``description`` that reaches generated code or a lookup, before anything is built.

    Node names and placeholder targets are plain names; module, tensor, ``call_module`` and
    ``get_attr`` paths are attribute paths (the layers inside a saved ``nn.Sequential`` are
    checked where they are built, :func:`budgetprune.architecture.build_layer`); dtypes come
    from :data:`DTYPES`; keyword-argument names are plain names (:func:`check_keywords` then
    checks them against the callee). No node may be named ``self``."""
    for field, kind in (("nodes", list), ("modules", dict), ("tensors", dict)):
        if not isinstance(description.get(field), kind):
            raise _malformed(f"'{field}' is not a {kind.__name__}")
    for name in description["modules"]:
        _check_path(name, "module")
    for name, spec in description["tensors"].items():
        _check_path(name, "tensor")
        if not isinstance(spec, dict):
            raise _malformed(f"tensor '{name}' has no spec")
        dtype_of(spec.get("dtype"))
    for entry in description["nodes"]:
        if not isinstance(entry, dict):
            raise _malformed(f"node entry {entry!r:.60} is not an object")
        name, op, target = entry.get("name"), entry.get("op"), entry.get("target")
        if not is_plain_name(name) or name == "self":
            raise _malformed(f"node name {name!r:.80} is not a plain identifier")
        if op in ("placeholder", "output") and not is_plain_name(target) or target == "self":
            raise _malformed(f"{op} node '{name}' has target {target!r:.80}")
        if op in ("call_module", "get_attr"):
            _check_path(target, f"{op} target")
        if op == "call_method" and not is_plain_name(target):
            raise _malformed(f"node '{name}' calls method {target!r:.80}")
        _check_keyword_names(entry.get("kwargs"), name)


def _check_path(path, what: str) -> None:
    if not is_attribute_path(path):
        raise _malformed(f"{what} name {path!r:.80} is not a valid attribute path")


def _check_keyword_names(kwargs, where: str) -> None:
    """The keys of an encoded ``{"dict": [[key, value], ...]}``: plain names only."""
    if not (isinstance(kwargs, dict) and list(kwargs) == ["dict"] and isinstance(kwargs["dict"], list)):
        raise _malformed(f"node '{where}' has keyword arguments {kwargs!r:.80}")
    for pair in kwargs["dict"]:
        if not (isinstance(pair, list) and len(pair) == 2 and is_plain_name(pair[0])):
            raise _malformed(f"node '{where}' has a keyword argument named {pair!r:.80}")


def dtype_of(name) -> torch.dtype:
    """The dtype :data:`DTYPES` names ``name``; one-line error for anything else."""
    if not isinstance(name, str) or name not in DTYPES:
        raise _malformed(f"unknown dtype {name!r:.60}")
    return DTYPES[name]


def device_of(text) -> torch.device:
    """A device of a known type (``cpu``, ``cuda:1``, ...)."""
    try:
        device = torch.device(text) if isinstance(text, str) and len(text) <= 20 else None
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in _DEVICE_TYPES:
        raise _malformed(f"unknown device {text!r:.60}")
    return device


# -- keyword arguments against the callee's signature ------------------------------------------
_SIGNATURE_STANDS_IN = {F.max_pool2d: F.max_pool2d_with_indices,  # boolean-dispatch wrappers: (*args, **kwargs)
                        F.adaptive_max_pool2d: F.adaptive_max_pool2d_with_indices}


@functools.cache
def _function_keywords(fn) -> frozenset[str]:
    """The parameters ``fn`` takes by keyword (Python signature, else torch's operator schemas)."""
    fn = _SIGNATURE_STANDS_IN.get(fn, fn)
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params):
        return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    from torch.fx.operator_schemas import get_signature_for_torch_op
    signatures = get_signature_for_torch_op(fn) or []
    return frozenset(name for sig in signatures for name in sig.parameters)


@functools.cache
def _method_keywords(name: str) -> frozenset[str]:
    """The keyword parameters of ``Tensor.<name>`` (aten's schemas for the op of that name)."""
    packet = getattr(torch.ops.aten, name, None)
    names = set()
    for overload in packet.overloads() if packet is not None else ():
        names.update(arg.name for arg in getattr(packet, overload)._schema.arguments)
    return frozenset(names - {"self"})


def _module_keywords(module: nn.Module) -> frozenset[str]:
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    return frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def check_keywords(node: fx.Node, root: nn.Module) -> None:
    """Each keyword argument of ``node`` is a parameter of the function, method or module it calls."""
    if not node.kwargs:
        return
    if node.op == "call_function":
        allowed = _function_keywords(node.target)
    elif node.op == "call_method":
        allowed = _method_keywords(node.target)
    elif node.op == "call_module":
        allowed = _module_keywords(root.get_submodule(node.target))
    else:
        allowed = frozenset()
    unknown = sorted(set(node.kwargs) - allowed)
    if unknown:
        raise _malformed(f"node '{node.name}' passes keyword argument(s) {', '.join(unknown)} that its "
                         f"{node.op.replace('_', ' ')} does not take")


# -- the generated source ---------------------------------------------------------------------
_BINARY = (ast.Add, ast.Sub, ast.Mult)
_UNARY = (ast.USub, ast.UAdd)


@functools.cache
def _global_paths(functions: tuple, dtypes: tuple) -> frozenset[str]:
    """How torch.fx writes each allowed function and dtype into source (``torch.cat``,
    ``torch.nn.functional.relu``, ``torch.float16``, ``budgetprune_ops_select_channels``)."""
    g = fx.Graph()
    x = g.placeholder("x")
    for fn in functions:
        g.call_function(fn, (x, x))  # rendering only: two arguments fit every operator form
    for dtype in dtypes:
        g.call_function(torch.flatten, (x, dtype))
    g.output(x)
    paths = set()
    for node in ast.walk(ast.parse(g.python_code("self").src)):
        if isinstance(node, ast.Call):
            path = _dotted(node.func)
            if path is not None:
                paths.add(path)
        elif isinstance(node, ast.Attribute):
            path = _dotted(node)
            if path is not None and path.startswith("torch.") and path.removeprefix("torch.") in DTYPES:
                paths.add(path)
    return frozenset(paths - {"x"})


def _dotted(expr) -> str | None:
    """``a.b.c`` of a Name/Attribute chain, else None."""
    parts = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if not isinstance(expr, ast.Name):
        return None
    return ".".join([expr.id, *reversed(parts)])


class _SourceCheck:
    """Walks the AST of a generated ``forward``; raises on the first form it does not allow."""

    def __init__(self, global_paths: frozenset[str], methods: frozenset[str], attributes: frozenset[str]):
        self.global_paths = global_paths
        self.methods = methods
        self.attributes = attributes
        self.locals: set[str] = set()
        self.reserved = {"self", "getattr", "slice", "device", "inf", "nan"} | {p.split(".")[0] for p in global_paths}

    def refuse(self, node: ast.AST, why: str):
        raise CheckpointError(f"the model file's graph generates code budgetprune does not run ({why} at "
                              f"line {getattr(node, 'lineno', '?')}); the file is damaged or was crafted")

    def function(self, tree: ast.Module) -> None:
        *wraps, fn = tree.body or [None]
        for statement in wraps:
            if not self.is_wrap(statement):
                self.refuse(statement, "statements outside forward()")
        if not isinstance(fn, ast.FunctionDef):
            self.refuse(tree, "no forward()")
        a = fn.args
        if fn.name != "forward" or fn.decorator_list or fn.returns is not None or a.posonlyargs or a.vararg \
                or a.kwonlyargs or a.kwarg or a.defaults or not a.args or a.args[0].arg != "self" \
                or any(arg.annotation is not None for arg in a.args):
            self.refuse(fn, "a forward() signature other than (self, inputs...)")
        self.locals = set()
        for arg in a.args[1:]:
            self.bind(arg, arg.arg)
        for statement in fn.body:
            self.statement(statement)

    def bind(self, node: ast.AST, name: str) -> None:
        """A new local ``name``: never one the source reads as the model or a global (``self``,
        ``torch``, ``getattr``, ``budgetprune_ops_...``): rebinding it would redirect those reads."""
        if name in self.reserved:
            self.refuse(node, f"a local named {name!r}")
        self.locals.add(name)

    def is_wrap(self, s: ast.stmt) -> bool:
        """``torch.fx._symbolic_trace.wrap("budgetprune_ops_...")``: keeps a channel op one node when
        the rebuilt module is traced again (only for the allow-listed functions' names)."""
        call = s.value if isinstance(s, ast.Expr) else None
        return isinstance(call, ast.Call) and _dotted(call.func) == "torch.fx._symbolic_trace.wrap" \
            and not call.keywords and len(call.args) == 1 and isinstance(call.args[0], ast.Constant) \
            and call.args[0].value in self.global_paths and is_plain_name(call.args[0].value)

    def statement(self, s: ast.stmt) -> None:
        if isinstance(s, ast.Assign) and all(isinstance(t, ast.Name) for t in s.targets):
            self.expression(s.value)
            for target in s.targets:
                self.bind(target, target.id)
        elif isinstance(s, ast.AugAssign) and isinstance(s.target, ast.Name) and isinstance(s.op, _BINARY):
            self.local(s.target)
            self.expression(s.value)
        elif isinstance(s, ast.Return) and s.value is not None:
            self.expression(s.value)
        else:
            self.refuse(s, f"a {type(s).__name__} statement")

    def local(self, node: ast.Name) -> None:
        if node.id not in self.locals:
            self.refuse(node, f"the name {node.id!r}")

    def expression(self, e: ast.expr) -> None:
        if isinstance(e, ast.Constant):
            return
        if isinstance(e, ast.Name):
            if e.id not in ("inf", "nan"):
                self.local(e)
        elif isinstance(e, (ast.Tuple, ast.List)):
            for item in e.elts:
                self.expression(item)
        elif isinstance(e, ast.Dict) and all(isinstance(k, ast.Constant) for k in e.keys):
            for value in e.values:
                self.expression(value)
        elif isinstance(e, ast.Slice):
            for part in (e.lower, e.upper, e.step):
                if part is not None:
                    self.expression(part)
        elif isinstance(e, ast.Subscript) and isinstance(e.value, ast.Name):
            self.local(e.value)
            self.expression(e.slice)
        elif isinstance(e, ast.UnaryOp) and isinstance(e.op, _UNARY):
            self.expression(e.operand)
        elif isinstance(e, ast.BinOp) and isinstance(e.op, _BINARY):
            self.expression(e.left)
            self.expression(e.right)
        elif isinstance(e, ast.Attribute):
            self.attribute(e)
        elif isinstance(e, ast.Call):
            self.call(e)
        else:
            self.refuse(e, f"a {type(e).__name__} expression")

    def attribute(self, e: ast.Attribute) -> None:
        """``x.shape`` of a local, ``self.a.b`` (a module or tensor of the model), ``torch.float16``."""
        if isinstance(e.value, ast.Name) and e.value.id in self.locals:
            if e.attr not in self.attributes:
                self.refuse(e, f"the attribute {e.attr!r}")
        elif self.is_model_path(e):
            return
        elif _dotted(e) not in self.global_paths:
            self.refuse(e, f"the name {_dotted(e) or e.attr!r}")

    def is_model_path(self, e: ast.expr) -> bool:
        """``self``, ``self.a``, ``getattr(self.a, "0").b``: plain names and indices below ``self``."""
        while True:
            if isinstance(e, ast.Name):
                return e.id == "self"
            if isinstance(e, ast.Attribute) and is_plain_name(e.attr):
                e = e.value
            elif isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and e.func.id == "getattr" \
                    and len(e.args) == 2 and not e.keywords and isinstance(e.args[1], ast.Constant) \
                    and is_layer_name(e.args[1].value):
                e = e.args[0]
            else:
                return False

    def call(self, e: ast.Call) -> None:
        func = e.func
        if isinstance(func, ast.Name) and func.id == "device":
            if not all(isinstance(v, ast.Constant) for v in [*e.args, *(k.value for k in e.keywords)]):
                self.refuse(e, "a device() of non-constant arguments")
        elif isinstance(func, ast.Name) and func.id == "slice":
            pass  # its arguments are checked below
        elif isinstance(func, ast.Name) and func.id == "getattr":
            if self.is_model_path(e):
                return
            if not (len(e.args) == 2 and not e.keywords and isinstance(e.args[1], ast.Constant)
                    and e.args[1].value in self.attributes):
                self.refuse(e, "a getattr() of something else than a tensor's shape, dtype, device or ndim")
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in self.locals:
            if func.attr not in self.methods:
                self.refuse(e, f"the method {func.attr!r}")
        elif not (self.is_model_path(func) and not _is_self(func)) and _dotted(func) not in self.global_paths:
            self.refuse(e, f"a call of {_dotted(func) or type(func).__name__!r}")
        for arg in e.args:
            if isinstance(arg, ast.Starred):
                self.refuse(arg, "a starred argument")
            self.expression(arg)
        for kw in e.keywords:
            if kw.arg is None or not is_plain_name(kw.arg):
                self.refuse(e, "a keyword argument that is not a plain name")
            self.expression(kw.value)


def _is_self(e: ast.expr) -> bool:
    return isinstance(e, ast.Name) and e.id == "self"


def check_forward_source(source: str, functions, methods, attributes) -> None:
    """Raise :class:`CheckpointError` unless ``source`` (what ``torch.fx`` generated for a rebuilt
    graph) is one ``def forward(self, ...)`` of assignments of allow-listed calls: ``functions``
    (callables), tensor ``methods`` and ``attributes`` (names) of local values, the model's own
    modules and tensors, arithmetic (+, -, *), indexing and constants."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise CheckpointError(f"the model file's graph generates invalid code ({exc.msg}); the file is damaged "
                              "or was crafted") from None
    paths = _global_paths(tuple(functions), tuple(DTYPES.values()))
    _SourceCheck(paths, frozenset(methods), frozenset(attributes)).function(tree)
