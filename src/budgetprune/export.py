"""Exporting a (compacted) model to TorchScript or ONNX, checked against the model itself.

Both exports run the written file on the example input and compare its outputs with the
model's: TorchScript through ``torch.jit.load``, ONNX through onnxruntime when it is
installed. Each output tensor must agree to 1e-5 (TorchScript) or 1e-4 (ONNX) of max(1, its
largest finite |value|): float32 outputs of size 1e12 (an untrained Inception V3 in eval mode)
differ by 1e5 in their last bits between two correct implementations, and scaling each tensor by
its own size keeps a large output (boxes in pixels) from loosening the check of a small one
(scores). ONNX export needs the optional packages of the ``export`` extra
(``pip install 'budgetprune[export]'``); TorchScript needs nothing beyond torch.

ONNX and torch 2.13: the default (dynamo, ``torch.export``-based) exporter implements opset
18 and later only; asked for an older opset it converts its output down and, where that
conversion fails (it does for ReduceMean with axes inputs), silently keeps opset 18. So an
opset below 18 is exported with the TorchScript-based exporter (``dynamo=False``: deprecated,
still in torch 2.13, needs ``onnx``) and opset 18 or later with the dynamo exporter (needs
``onnx`` and ``onnxscript``). Both export a dynamic batch dimension.
"""

from __future__ import annotations

import contextlib
import importlib
import io as _bytes_io
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, ExportError, first_line
from .io import atomic_write, folder_problem

TORCHSCRIPT_TOLERANCE = 1e-5
ONNX_TOLERANCE = 1e-4
#: The lowest opset torch's dynamo ONNX exporter implements (older ones use the TorchScript exporter).
DYNAMO_MIN_OPSET = 18
#: Packages each torch.onnx exporter needs; onnxruntime is only used to check the written file.
ONNX_PACKAGES = {"dynamo": ("onnx", "onnxscript"), "torchscript": ("onnx",)}


def to_torchscript(model: nn.Module, path: str | os.PathLike, example) -> dict:
    """Write ``model`` as TorchScript to ``path`` and check it reproduces the model's outputs.

    ``torch.jit.script`` is tried first; where it fails, ``torch.jit.trace`` on ``example``
    is used with a warning (control flow is then fixed to the example's path). Returns
    ``{"path", "format", "method", "verified", "max_abs_diff"}``; raises :class:`ExportError`
    when the written file does not reproduce the outputs.
    """
    check_output_file(path)
    args = _as_args(example)
    with _eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.jit")  # deprecated, works
        module, method = _script_or_trace(model, args)
        buffer = _bytes_io.BytesIO()
        torch.jit.save(module, buffer)
        _write(path, buffer.getvalue())
        loaded = torch.jit.load(str(path), map_location="cpu")
        expected, actual = model(*args), loaded(*args)
    diff = _verify(expected, actual, TORCHSCRIPT_TOLERANCE, path, "TorchScript")
    return {"path": str(path), "format": "torchscript", "method": method, "verified": True, "max_abs_diff": diff}


def _script_or_trace(model: nn.Module, args: tuple):
    """(``torch.jit.script(model)``, "script"), or the traced module and "trace" where scripting fails."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*instance-level annotations.*")  # fx's empty containers
        try:
            return torch.jit.script(model), "script"
        except Exception as exc:
            reason = first_line(exc)
    warnings.warn(f"torch.jit.script failed ({reason}); falling back to torch.jit.trace, which fixes the "
                  "model's control flow to the example input's path", stacklevel=3)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            return torch.jit.trace(model, args), "trace"
    except Exception as exc:
        raise ExportError(f"cannot export to TorchScript: scripting failed ({reason}) and tracing failed "
                          f"({first_line(exc)})") from None


def to_onnx(model: nn.Module, path: str | os.PathLike, example, opset: int = 17) -> dict:
    """Write ``model`` as ONNX with ``torch.onnx.export`` (batch dimension dynamic).

    Opset 18 and later use torch's dynamo exporter, older ones its TorchScript-based exporter
    (see the module docstring). When onnxruntime is installed the file is run on ``example``
    and compared with the model (to 1e-4 of each output's size, see the module docstring);
    otherwise it is not verified and the result says
    so. Returns ``{"path", "format", "exporter", "opset", "verified", "max_abs_diff", "note"}``.
    Raises :class:`ConfigError` when an optional package is missing and :class:`ExportError`
    when the export fails or does not reproduce the outputs.
    """
    exporter = "dynamo" if opset >= DYNAMO_MIN_OPSET else "torchscript"
    check_output_file(path)
    args = _as_args(example)
    data = onnx_bytes(model, example, opset)
    _write(path, data)
    with _eval_mode(model), torch.no_grad():
        expected = model(*args)
    result = {"path": str(path), "format": "onnx", "exporter": exporter, "opset": _opset_of(data),
              "verified": False, "max_abs_diff": None,
              "note": "onnxruntime is not installed: the exported file was not run"}
    if _installed("onnxruntime"):
        diff = _verify(expected, _run_onnxruntime(path, args), ONNX_TOLERANCE, path, "ONNX")
        result.update(verified=True, max_abs_diff=diff, note="checked with onnxruntime")
    return result


def onnx_bytes(model: nn.Module, example, opset: int = 17) -> bytes:
    """The ONNX file of ``model`` (in eval mode, batch dimension dynamic) as bytes, not written
    or checked: what :func:`to_onnx` writes."""
    exporter = "dynamo" if opset >= DYNAMO_MIN_OPSET else "torchscript"
    require(*ONNX_PACKAGES[exporter], purpose=f"ONNX export (opset {opset})")
    with _eval_mode(model), torch.no_grad(), _without_mha_fastpath():
        export = _export_dynamo if exporter == "dynamo" else _export_torchscript
        return export(model, _as_args(example), opset)


def torchscript_module(model: nn.Module, example) -> torch.jit.ScriptModule:
    """``model`` (in eval mode) as the TorchScript module :func:`to_torchscript` saves, not saved."""
    with _eval_mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.jit")
        return _script_or_trace(model, _as_args(example))[0].eval()


def check_output_file(path: str | os.PathLike) -> None:
    """Raise a one-line :class:`ConfigError` when an export cannot be written to ``path``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; name the file to write, e.g. {path / 'model.onnx'}")
    problem = folder_problem(path.parent)
    if problem:
        raise ConfigError(f"--out {path} cannot be written: its folder {path.parent} {problem}; "
                          "choose another --out")


def _write(path, data: bytes) -> None:
    """Write the exported file atomically; one-line :class:`ExportError` when the system refuses."""
    try:
        atomic_write(path, lambda fh: fh.write(data))
    except OSError as exc:
        raise ExportError(f"cannot write {path} ({exc.strerror or exc}); choose an --out in a writable "
                          "folder") from None


def _export_dynamo(model: nn.Module, args: tuple, opset: int) -> bytes:
    """The ONNX bytes of torch's dynamo (``torch.export``) exporter."""
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} if torch.is_tensor(a) and a.dim() > 0 else None for a in args)
    with _quiet("dynamo"):
        program = torch.onnx.export(model, args, dynamo=True, opset_version=opset, dynamic_shapes=dynamic,
                                    external_data=False, verbose=False)
    return program.model_proto.SerializeToString()


def _export_torchscript(model: nn.Module, args: tuple, opset: int) -> bytes:
    """The ONNX bytes of torch's TorchScript-based exporter (``dynamo=False``)."""
    inputs = {f"input_{i}": a for i, a in enumerate(args)}
    outputs = {f"output_{i}": t for i, t in enumerate(_flatten(model(*args)))}  # named: fx's .graph confuses it
    buffer = _bytes_io.BytesIO()
    with _quiet("torchscript"):
        torch.onnx.export(model, args, buffer, dynamo=False, opset_version=opset, input_names=list(inputs),
                          output_names=list(outputs),
                          dynamic_axes={n: {0: "batch"} for n, t in {**inputs, **outputs}.items() if t.dim() > 0})
    return buffer.getvalue()


@contextlib.contextmanager
def _quiet(exporter: str):
    """Silence an exporter's progress printing and warnings; its failure becomes one :class:`ExportError`."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(_bytes_io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except Exception as exc:
        raise ExportError(f"torch.onnx.export ({exporter} exporter) failed: {first_line(exc)}") from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _opset_of(data: bytes) -> int | None:
    import onnx

    proto = onnx.load_from_string(data)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _run_onnxruntime(path, args: tuple):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def require(*packages: str, purpose: str) -> None:
    """Raise a one-line :class:`ConfigError` naming the extra to install when a package is missing."""
    missing = [name for name in packages if not _installed(name)]
    if missing:
        raise ConfigError(f"{purpose} needs the package(s) {', '.join(missing)}: pip install 'budgetprune[export]'")


def _installed(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _without_mha_fastpath():
    """``nn.MultiheadAttention`` in eval mode without gradients runs one fused op
    (``aten::_native_multi_head_attention``, torchvision's ViT, ``nn.TransformerEncoder``) that
    ONNX has no operator for; with its fast path off it runs the same attention as plain ops the
    exporters know. The setting is process-wide: it is restored after the export."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _as_args(example) -> tuple:
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def _flatten(value) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(v)]
    return []


def _differences(expected, actual) -> tuple[float, float]:
    """(largest absolute difference, largest difference of any output tensor over max(1, its
    largest finite |value|)): inf where the outputs' structures differ, NaN where a difference is."""
    a, b = _flatten(expected), _flatten(actual)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf"), float("inf")
    largest, relative = 0.0, 0.0
    for x, y in zip(a, b):
        if not x.numel():
            continue
        x, y = x.float(), y.float()
        finite = x[torch.isfinite(x)]
        scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
        diff = float((x - y).abs().max())
        if diff != diff:  # NaN: the file computes something else
            return diff, diff
        largest, relative = max(largest, diff), max(relative, diff / scale)
    return largest, relative


def _verify(expected, actual, tolerance: float, path, what: str) -> float:
    """The largest absolute difference of the written file's outputs from the model's; raises
    :class:`ExportError` (and removes the file) where one output tensor is off by more than
    ``tolerance`` of max(1, its largest value)."""
    diff, relative = _differences(expected, actual)
    if not relative <= tolerance:
        Path(path).unlink(missing_ok=True)  # never leave a file that computes something else
        raise ExportError(f"the {what} file {Path(path)} does not reproduce the model's outputs "
                          f"(max abs difference {diff:.3g}, {relative:.3g} of the output's size, over the "
                          f"tolerance {tolerance:g} of max(1, its largest value))")
    return diff

