"""Attention layers the channel graph prunes: which calls are one, and what each computes with.

An attention layer reads its input's channels through the columns of a query/key/value
projection ``W_qkv`` (3E × C_in) and writes its output channels through the rows of an output
projection ``W_proj`` (C_out × E), E = heads × head width d. Its input and output channels are
pruned like a linear layer's. Its heads are pruned whole: head h is the rows h·d … h·d + d − 1 of
each of q, k and v (:func:`qkv_rows`) and the same columns of ``W_proj`` (:func:`head_columns`);
its gate multiplies its values, so z_h · softmax(q_h k_hᵀ) v_h is the head's output scaled by z_h
(:func:`value_scale`). Three families are recognised:

* ``"multihead"``: ``nn.MultiheadAttention`` as self-attention (a ViT block), or timm's
  ``Attention`` (timm's ViT, DeiT, ...; traced as one module, :func:`is_leaf`): tokens (N, L, C),
  every token attends to all L.
* ``"window"``: torchvision's ``shifted_window_attention`` (Swin), called by the module that
  returns it with that module's ``qkv`` and ``proj`` weights: channels-last maps (N, H, W, C)
  cut into windows of Wh × Ww tokens (the map padded to whole windows), each token attending to
  its window.
* ``"relative"``: torchvision's ``RelativePositionalMultiHeadAttention`` (MaxViT), traced as one
  module (:func:`is_leaf`): (N, G, P, C), each of the G groups of P tokens attending to itself.

Each recogniser returns an :class:`Attention` (the layer's shape and parameter paths), a
reason why the call is not pruned (its input's writers then stay ungated), or None when the
node is no attention call at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx, nn


@dataclass(frozen=True)
class Attention:
    """One attention layer, for its costs and its compaction (parameter paths are the model's)."""

    family: str  # "multihead" | "window" | "relative"
    source: str  # the node of its input tensor
    host: str  # the module whose output is the layer's output (gated there)
    in_features: int  # C_in
    embed_dim: int  # E: the width of q, k and v
    out_features: int  # C_out
    num_heads: int
    tokens: int  # positions per example the projections run over (padded to whole windows)
    window: int  # keys each query attends to
    qkv_weight: str
    qkv_bias: str | None
    proj_weight: str
    proj_bias: str | None
    batch_dim: int = 0  # where the examples are in the qkv projection's output (dim 0 repeated per window)
    head_params: tuple[tuple[str, int], ...] | None = ()  # parameters with one entry per head along an axis;
    # None where the heads cannot be pruned
    head_writer: str | None = None  # a linear layer whose outputs are per-head values (Swin V2's bias MLP)
    head_views: tuple[str, ...] = ()  # nodes ``view(x, -1, num_heads)`` whose head count compaction rewrites
    dropout: float = 0.0  # on the attention weights, in training ("multihead")
    tuple_output: bool = True  # the module returns (output, weights), as nn.MultiheadAttention does

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


def qkv_rows(embed_dim: int, head_dim: int, heads: torch.Tensor) -> torch.Tensor:
    """The rows of ``W_qkv`` (and of its bias) of the kept ``heads``: q, then k, then v, each in
    head order (row part·E + h·d + j for part 0, 1, 2)."""
    per_part = head_columns(head_dim, heads)
    return torch.cat([per_part + part * embed_dim for part in range(3)])


def head_columns(head_dim: int, heads: torch.Tensor) -> torch.Tensor:
    """The columns of ``W_proj`` that read the kept ``heads`` (h·d + j)."""
    return (heads.long().cpu()[:, None] * head_dim + torch.arange(head_dim)).flatten()


def value_scale(head_dim: int, z: torch.Tensor) -> torch.Tensor:
    """Factors of the qkv projection's outputs, (3E,) from per-head gates (heads,): 1 on the queries
    and keys, z_h on each value of head h."""
    values = z.repeat_interleave(head_dim, dim=-1)
    return torch.cat([torch.ones_like(values), torch.ones_like(values), values], dim=-1)


def pruned_qkv(weight: torch.Tensor, bias: torch.Tensor | None, head_dim: int, cols: torch.Tensor,
               heads: torch.Tensor, z_heads: torch.Tensor | None = None):
    """``(W_qkv, b_qkv)`` keeping the input columns ``cols`` and the rows of the kept ``heads``, each
    head's gate ``z_heads`` folded into its values."""
    rows = qkv_rows(weight.shape[0] // 3, head_dim, heads).to(weight.device)
    w = weight.detach().index_select(0, rows).index_select(1, cols.to(weight.device))
    b = bias.detach().index_select(0, rows) if bias is not None else None
    if z_heads is not None:
        scale = value_scale(head_dim, z_heads.to(weight.device, weight.dtype))
        w, b = w * scale[:, None], b * scale if b is not None else None
    return w, b


def pruned_proj(weight: torch.Tensor, bias: torch.Tensor | None, head_dim: int, rows: torch.Tensor,
                heads: torch.Tensor, z: torch.Tensor | None = None):
    """``(W_proj, b_proj)`` keeping the output ``rows`` and the columns of the kept ``heads``, the
    output gates ``z`` folded in."""
    w = weight.detach().index_select(0, rows.to(weight.device))
    w = w.index_select(1, head_columns(head_dim, heads).to(weight.device))
    b = bias.detach().index_select(0, rows.to(weight.device)) if bias is not None else None
    if z is not None:
        z = z.to(weight.device, weight.dtype)
        w, b = w * z[:, None], b * z if b is not None else None
    return w, b


def match(node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int],
          returned_by: dict[str, str]) -> Attention | str | None:
    """The attention layer ``node`` computes, why it is not pruned, or None (no attention call).
    ``calls`` counts the model's module calls and parameter reads; ``returned_by`` maps a node to
    the module (called once) whose forward returns it."""
    for recognise in (_multihead, _timm_self_attention, _window, _relative):
        found = recognise(node, modules, calls, returned_by)
        if found is not None:
            return found
    return None


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _multihead(node, modules, calls, returned_by) -> Attention | str | None:
    """``nn.MultiheadAttention(x, x, x)``, batch first, without masks or added key/value biases."""
    mod = modules.get(node.target) if node.op == "call_module" else None
    if not isinstance(mod, nn.MultiheadAttention):
        return None
    args = [_arg(node, i, name) for i, name in enumerate(("query", "key", "value"))]
    extra = {k: v for k, v in node.kwargs.items() if k not in ("query", "key", "value", "need_weights")}
    metas = node.meta.get("tensor_meta")
    out_shape = tuple(metas[0].shape) if isinstance(metas, (tuple, list)) and hasattr(metas[0], "shape") else None
    src = args[0]
    if not (isinstance(src, fx.Node) and src is args[1] and src is args[2]):
        return "which budgetprune prunes only as self-attention (one tensor as query, key and value)"
    if not mod.batch_first or not mod._qkv_same_embed_dim or mod.bias_k is not None or mod.add_zero_attn \
            or len(node.args) > 3 or any(v is not None and v is not False for v in extra.values()):
        return "which budgetprune prunes only with batch_first=True, no masks and no added key/value biases"
    if calls[node.target] != 1:
        return f"called {calls[node.target]} times (shared weights)"
    if out_shape is None or len(out_shape) != 3:
        return "whose output is not (N, L, E) tokens"
    path, e = node.target, mod.embed_dim
    bias = mod.in_proj_bias is not None
    return Attention("multihead", src.name, path, e, e, e, mod.num_heads, out_shape[1], out_shape[1],
                     f"{path}.in_proj_weight", f"{path}.in_proj_bias" if bias else None,
                     f"{path}.out_proj.weight", f"{path}.out_proj.bias" if mod.out_proj.bias is not None else None,
                     batch_dim=1)


_WINDOW_ARGS = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
                "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training")


def is_window_attention(fn) -> bool:
    """Whether ``fn`` is torchvision's ``shifted_window_attention`` (torchvision is not imported)."""
    return getattr(fn, "__name__", None) == "shifted_window_attention" and \
        getattr(fn, "__module__", None) == "torchvision.models.swin_transformer"


def window_args(node: fx.Node) -> dict:
    """The arguments of a ``shifted_window_attention`` call by name."""
    return {name: _arg(node, i, name) for i, name in enumerate(_WINDOW_ARGS)}


def _window(node, modules, calls, returned_by) -> Attention | str | None:
    """``shifted_window_attention(x, qkv.weight, proj.weight, bias, window, heads, ...)`` on (N, H, W, C)."""
    if node.op != "call_function" or not is_window_attention(node.target):
        return None
    a = window_args(node)
    weights = {k: a[k] for k in ("qkv_weight", "proj_weight", "qkv_bias", "proj_bias")}
    own = all(v is None or isinstance(v, fx.Node) and v.op == "get_attr" and calls[v.target] == 1
              and len(v.users) == 1 for v in weights.values())
    src, in_shape, host = a["input"], _shape(a["input"]), returned_by.get(node.name)
    if not own or a["qkv_weight"] is None or a["proj_weight"] is None:
        return "whose projection weights are not parameters it alone reads"
    if host is None:
        return "which is not what a module called once returns"
    if in_shape is None or len(in_shape) != 4 or not isinstance(a["num_heads"], int) or \
            not all(isinstance(w, int) for w in a["window_size"]):
        return "whose input is not a channels-last map (N, H, W, C)"
    qkv, proj = (_shape(a[k]) for k in ("qkv_weight", "proj_weight"))
    h, w = in_shape[1], in_shape[2]
    wh, ww = a["window_size"]
    tokens = math.ceil(h / wh) * wh * math.ceil(w / ww) * ww
    bias = a["relative_position_bias"]
    table = bias.args[0] if isinstance(bias, fx.Node) and bias.op == "call_function" and \
        getattr(bias.target, "__name__", None) == "_get_relative_position_bias" and bias.args else None
    per_head, writer, views = None, None, ()  # None: the heads stay whole
    if a["logit_scale"] is None and isinstance(table, fx.Node) and table.op == "get_attr" and \
            calls[table.target] == 1 and len(table.users) == 1 and len(bias.users) == 1:
        per_head = ((table.target, 1),)
    elif a["logit_scale"] is not None:  # V2: a logit scale per head, the bias from an MLP's per-head outputs
        scale, found = a["logit_scale"], v2_bias_writer(bias, a["num_heads"], modules, calls)
        if found is not None and isinstance(scale, fx.Node) and scale.op == "get_attr" and \
                calls[scale.target] == 1 and len(scale.users) == 1 and _shape(scale) == (a["num_heads"], 1, 1):
            per_head, (writer, views) = ((scale.target, 0),), found
    return Attention("window", src.name, host, qkv[1], qkv[0] // 3, proj[0], a["num_heads"], tokens, wh * ww,
                     a["qkv_weight"].target, a["qkv_bias"].target if a["qkv_bias"] is not None else None,
                     a["proj_weight"].target, a["proj_bias"].target if a["proj_bias"] is not None else None,
                     head_params=per_head, head_writer=writer, head_views=views)


#: Element-wise steps between Swin V2's bias table and the attention call (``16 * sigmoid(b)``).
_BIAS_STEPS = {"sigmoid", "mul"}


def v2_bias_writer(bias, num_heads: int, modules: dict[str, nn.Module],
                   calls: dict[str, int]) -> tuple[str, tuple[str, ...]] | None:
    """Swin V2's relative position bias, ``16 * sigmoid(_get_relative_position_bias(mlp(table).view(-1,
    heads), index, window))``: the linear layer whose ``heads`` outputs are the per-head biases and the
    ``view`` giving them their head axis, when every step is read only by the next (so a head's bias
    can go with its head); None otherwise."""
    cur = bias
    while isinstance(cur, fx.Node) and cur.op == "call_function" and len(cur.users) == 1 and \
            getattr(cur.target, "__name__", None) in _BIAS_STEPS:
        tensors = [x for x in cur.args if isinstance(x, fx.Node)]
        if len(tensors) != 1 or any(not isinstance(x, (fx.Node, int, float)) for x in cur.args):
            return None
        cur = tensors[0]
    if not (isinstance(cur, fx.Node) and cur.op == "call_function" and len(cur.users) == 1 and
            getattr(cur.target, "__name__", None) == "_get_relative_position_bias" and cur.args):
        return None
    view = cur.args[0]
    if not (isinstance(view, fx.Node) and view.op == "call_method" and view.target in ("view", "reshape") and
            len(view.users) == 1 and tuple(view.args[1:]) == (-1, num_heads) and not view.kwargs):
        return None
    linear = view.args[0]
    mod = modules.get(linear.target) if isinstance(linear, fx.Node) and linear.op == "call_module" else None
    if not isinstance(mod, nn.Linear) or mod.out_features != num_heads or calls[linear.target] != 1 or \
            len(linear.users) != 1:
        return None
    return linear.target, (view.name,)


def _is_torchvision(module: nn.Module, file: str, name: str) -> bool:
    """Whether ``module`` is torchvision's class ``name`` of ``torchvision.models.<file>`` (not imported)."""
    cls = type(module)
    return cls.__name__ == name and cls.__module__ == f"torchvision.models.{file}"


def is_leaf(module: nn.Module) -> bool:
    """Attention modules the channel graph traces as one node, to prune as a whole."""
    return _is_torchvision(module, "maxvit", "RelativePositionalMultiHeadAttention") or is_timm_attention(module)


def is_timm_attention(module: nn.Module) -> bool:
    """Whether ``module`` is timm's ``Attention`` (timm is not imported) in its plain form: fused
    query/key/value and output projections, no query/key or output normalisation, no output gate,
    no dropout after the projection (the pruned module has none)."""
    cls = type(module)
    if cls.__name__ != "Attention" or not cls.__module__.startswith("timm."):
        return False
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    heads, d = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    plain = all(isinstance(getattr(module, name, nn.Identity()), nn.Identity) for name in ("q_norm", "k_norm", "norm"))
    drop = getattr(module, "proj_drop", nn.Identity())
    return isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int) and \
        isinstance(d, int) and qkv.out_features == 3 * heads * d == 3 * proj.in_features and plain and \
        getattr(module, "gate", None) is None and \
        (isinstance(drop, nn.Identity) or isinstance(drop, nn.Dropout) and drop.p == 0.0) and \
        isinstance(getattr(module, "attn_drop", None), nn.Dropout)


def _absent(value) -> bool:
    """An optional argument left out: None or False, or the model's own optional input (a ViT's
    ``forward(x, attn_mask=None, is_causal=False)``) that the traced call, made with the example
    input alone, left at its default None or False. The pruned network is the traced one: it takes
    no mask."""
    if value is None or value is False:
        return True
    return isinstance(value, fx.Node) and value.op == "placeholder" and value.args in ((None,), (False,))


def _one_call_on(node: fx.Node, calls: dict[str, int], dims: int, wrong_shape: str) -> str | None:
    """Why an attention module's call is not pruned (None: it is): a module called more than once
    shares its weights; its input must be a tensor and its output ``dims``-dimensional."""
    if calls[node.target] != 1:
        return f"called {calls[node.target]} times (shared weights)"
    src, shape = node.args[0] if node.args else None, _shape(node)
    if not isinstance(src, fx.Node) or shape is None or len(shape) != dims:
        return wrong_shape
    return None


def _timm_self_attention(node, modules, calls, returned_by) -> Attention | str | None:
    """timm's ``Attention(x)`` on tokens (N, L, C), without a mask."""
    mod = modules.get(node.target) if node.op == "call_module" else None
    if mod is None or not is_timm_attention(mod):
        return None
    if len(node.args) > 1 or not all(_absent(v) for v in node.kwargs.values()):
        return "which budgetprune prunes only without an attention mask"
    why = _one_call_on(node, calls, 3, "whose output is not (N, L, E) tokens")
    if why is not None:
        return why
    src, shape, path = node.args[0], _shape(node), node.target
    return Attention("multihead", src.name, path, mod.qkv.in_features, mod.num_heads * mod.head_dim,
                     mod.proj.out_features, mod.num_heads, shape[1], shape[1],
                     f"{path}.qkv.weight", f"{path}.qkv.bias" if mod.qkv.bias is not None else None,
                     f"{path}.proj.weight", f"{path}.proj.bias" if mod.proj.bias is not None else None,
                     dropout=float(mod.attn_drop.p), tuple_output=False)


def _relative(node, modules, calls, returned_by) -> Attention | str | None:
    """MaxViT's ``RelativePositionalMultiHeadAttention`` on (N, G, P, C)."""
    mod = modules.get(node.target) if node.op == "call_module" else None
    if mod is None or not _is_torchvision(mod, "maxvit", "RelativePositionalMultiHeadAttention"):
        return None
    why = _one_call_on(node, calls, 4, "whose input is not (N, G, P, C) groups of tokens")
    if why is not None:
        return why
    src, shape, path = node.args[0], _shape(node), node.target
    return Attention("relative", src.name, path, mod.to_qkv.in_features, mod.n_heads * mod.head_dim,
                     mod.merge.out_features, mod.n_heads, shape[1] * shape[2], shape[2],
                     f"{path}.to_qkv.weight", f"{path}.to_qkv.bias", f"{path}.merge.weight", f"{path}.merge.bias",
                     head_params=((f"{path}.relative_position_bias_table", 1),))
