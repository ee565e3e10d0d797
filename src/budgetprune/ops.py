"""Channel operations a compacted network uses where pruned tensors no longer line up.

They are wrapped for ``torch.fx`` (they appear as single ``call_function`` nodes in a
compacted :class:`torch.fx.GraphModule`), are plain tensor code that TorchScript and the
ONNX exporter handle, and are the only non-``torch`` functions a saved model may call.

* :func:`index_add_channels` is the mixed-connectivity block's ``scatterAdd`` (seed 001,
  supplement 2): ``h_l = scatterAdd(h_{l-1}, Δ, I_out)``, i.e. ``h_l[I_out] = h_{l-1}[I_out] + Δ``
  and ``h_l[¬I_out] = h_{l-1}[¬I_out]``.
* :func:`scatter_channels` places a tensor's channels at ``index`` of a wider zero tensor (a
  new map added to the residual signal, Fig. 4c, when the signal itself lacks it).
* :func:`select_channels` keeps the channels at ``index`` (a block reading a subset
  ``h[I_in]`` of the residual signal).
* :func:`full_count_layer_norm` is a LayerNorm over the kept channels whose statistics still
  count the pruned ones, as the zeros they are in the gated network.
* :class:`SelfAttention` is ``nn.MultiheadAttention``'s self-attention with its input and output
  channels and its heads pruned.
* :func:`window_attention` is torchvision's ``shifted_window_attention`` (Swin) with its input
  and output channels and its heads pruned.
* :class:`RelativeAttention` is MaxViT's relative-position multi-head attention with its input
  and output channels and its heads pruned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from .attention import pruned_proj, pruned_qkv


def _spread(x: torch.Tensor, index: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``x``'s channels at ``index`` of ``width`` channels, zeros elsewhere, as one gather: ``x``
    padded with one zero channel, then ``index_select`` of a map that sends every position outside
    ``index`` to that zero channel. This is the form for ONNX: ``index_add`` exports as an index
    expanded to the full activation and a ScatterElements, which onnxruntime runs several times
    slower than a Gather along the channels (a 16×128×28×28 add: 21 ms against 4 ms on 2 cores)."""
    k, width = int(x.shape[dim]), int(width)  # static channel counts: the map depends on constants only, and
    # onnxruntime folds it when it loads the file
    mapping = torch.full((width,), k, dtype=index.dtype, device=index.device)
    mapping = mapping.index_copy(0, index, torch.arange(k, dtype=index.dtype, device=index.device))
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, 1]  # one zero channel at the end of dim
    return F.pad(x, pad).index_select(dim, mapping)


@fx.wrap
def index_add_channels(base: torch.Tensor, index: torch.Tensor, delta: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``base`` with ``delta`` added to its channels ``index`` (in ``dim``: 1, or -1 for tokens), out of place.

    Eager PyTorch and TorchScript run ``index_add`` (the fastest there); the ONNX export adds a
    gathered ``delta`` instead (:func:`_spread`)."""
    dim = dim % base.dim()  # a positive dim: the ONNX exporter needs it
    if torch.jit.is_scripting():  # TorchScript compiles no branch after this one (the ONNX check is Python only)
        return base.index_add(dim, index, delta)
    if torch.onnx.is_in_onnx_export():
        return base + _spread(delta, index, base.shape[dim], dim)
    return base.index_add(dim, index, delta)


@fx.wrap
def scatter_channels(x: torch.Tensor, index: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    """A zero tensor with ``width`` channels (in ``dim``) holding ``x``'s channels at ``index``
    (a gather in the ONNX export, as in :func:`index_add_channels`)."""
    dim = dim % x.dim()
    if torch.jit.is_scripting():  # TorchScript compiles no branch after this one (the ONNX check is Python only)
        return _zeros_with(x, width, dim).index_add(dim, index, x)
    if torch.onnx.is_in_onnx_export():
        return _spread(x, index, width, dim)
    return _zeros_with(x, width, dim).index_add(dim, index, x)


def _zeros_with(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros shaped like ``x`` with ``width`` channels in ``dim``."""
    shape = list(x.shape)
    shape[dim] = width
    return x.new_zeros(shape)


@fx.wrap
def slice_channels(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``x[:, start:stop]`` (a view; onnx ``Slice``)."""
    return x.narrow(1, start, stop - start)


@fx.wrap
def select_channels(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``x[:, index]`` (``x[..., index]`` for ``dim`` -1)."""
    return x.index_select(dim % x.dim(), index)


@fx.wrap
def full_count_layer_norm(x: torch.Tensor, channels: int, weight: torch.Tensor, bias: torch.Tensor | None,
                          eps: float) -> torch.Tensor:
    """LayerNorm over the last dim of ``x`` (the kept channels) with the mean and variance of
    ``channels`` values, the ``channels - x.shape[-1]`` pruned ones being zeros:
    μ = Σx / C and σ² = (Σ(x − μ)² + (C − k)·μ²) / C (biased variance), then
    ``(x − μ) / sqrt(σ² + eps) · weight + bias``.

    Computed as that definition reads: ``F.layer_norm`` of ``x`` padded with the zeros, then the
    kept channels sliced out, so runtimes run their fused LayerNorm kernel. Written out as
    elementwise ops instead (as before), onnxruntime (1 thread, batch 16) took 1.52–1.58× as long
    on MaxViT-T's first-stage tensors (3136 tokens, 32–40 of 64 channels), where its LayerNorms
    spend their time, and 0.88–0.97× as long on tensors of 49–196 tokens; eager PyTorch
    0.86–1.07× (``benchmarks/layer_norm_speed.py --seconds 3``,
    ``benchmarks/results/layer_norm_speed.md``)."""
    pad = channels - x.shape[-1]
    weight = F.pad(weight, (0, pad)) if weight is not None else None
    bias = F.pad(bias, (0, pad)) if bias is not None else None
    return F.layer_norm(F.pad(x, (0, pad)), (channels,), weight, bias, eps)[..., :x.shape[-1]]


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens (N, L, ·) whose input and output widths and heads are
    pruned: ``nn.MultiheadAttention`` (batch first), or timm's ``Attention`` (a ViT's), with
    ``in_features`` input channels and ``out_features`` output channels, ``num_heads`` heads of
    ``embed_dim / num_heads`` (the unpruned head width: the attention's scale 1/√d stays).
    It computes what the unpruned module computes on the kept channels, called like it: as
    ``nn.MultiheadAttention`` (``attn(x, x, x, need_weights=False)``) it returns ``(output, None)``;
    with ``tuple_output=False``, as timm's (``attn(x)``), the output alone. ``proj_bias``: whether
    the output projection has a bias (None: as the input projection)."""

    def __init__(self, in_features: int, embed_dim: int, out_features: int, num_heads: int, bias: bool = True,
                 dropout: float = 0.0, tuple_output: bool = True, proj_bias: bool | None = None):
        super().__init__()
        self.in_features, self.embed_dim, self.out_features = in_features, embed_dim, out_features
        self.num_heads, self.bias, self.dropout = num_heads, bias, dropout
        self.tuple_output, self.proj_bias = tuple_output, proj_bias
        self.in_proj = nn.Linear(in_features, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, out_features, bias=bias if proj_bias is None else proj_bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                need_weights: bool = False):
        n, length = query.shape[0], query.shape[1]
        heads = self.in_proj(query).view(n, length, 3, self.num_heads, self.embed_dim // self.num_heads)
        q, k, v = heads.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, L, head dim)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, self.embed_dim))
        return (out, None) if self.tuple_output else out

    @classmethod
    def pruned(cls, mha: nn.MultiheadAttention, cols: torch.Tensor, rows: torch.Tensor,
               z: torch.Tensor | None = None, heads: torch.Tensor | None = None,
               z_heads: torch.Tensor | None = None) -> "SelfAttention":
        """``mha`` keeping input channels ``cols``, output channels ``rows`` and ``heads`` (all: None);
        ``z`` (per kept output) is folded into the out-projection, ``z_heads`` (per kept head) into the
        values."""
        return cls.from_projections(mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias,
                                    mha.num_heads, float(mha.dropout), True, cols, rows, z, heads, z_heads)

    @classmethod
    def from_projections(cls, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None, proj_weight: torch.Tensor,
                         proj_bias: torch.Tensor | None, num_heads: int, dropout: float, tuple_output: bool,
                         cols: torch.Tensor, rows: torch.Tensor, z: torch.Tensor | None = None,
                         heads: torch.Tensor | None = None, z_heads: torch.Tensor | None = None) -> "SelfAttention":
        """The attention with query/key/value projection ``qkv_weight`` (3E × C_in, rows q, k, v, each
        head by head) and output projection ``proj_weight`` (C_out × E), pruned as :meth:`pruned` does."""
        d = qkv_weight.shape[0] // 3 // num_heads
        heads = torch.arange(num_heads) if heads is None else heads
        w_in, b_in = pruned_qkv(qkv_weight, qkv_bias, d, cols, heads, z_heads)
        w_out, b_out = pruned_proj(proj_weight, proj_bias, d, rows, heads, z)
        in_bias, out_bias = b_in is not None, b_out is not None
        new = cls(int(cols.numel()), int(heads.numel()) * d, int(rows.numel()), int(heads.numel()), in_bias,
                  dropout, tuple_output, None if out_bias == in_bias else out_bias).to(w_in.device, w_in.dtype)
        _copy_linear(new.in_proj, w_in, b_in)
        _copy_linear(new.out_proj, w_out, b_out)
        return new


def _copy_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)


@fx.wrap
def window_attention(input: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor,
                     relative_position_bias: torch.Tensor, window_size: list[int], num_heads: int,
                     shift_size: list[int], attention_dropout: float = 0.0, dropout: float = 0.0,
                     qkv_bias: torch.Tensor | None = None, proj_bias: torch.Tensor | None = None,
                     logit_scale: torch.Tensor | None = None, training: bool = True) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` (Swin, Liu et al. 2021, Eq. 4 and section 3.2:
    W-MSA / SW-MSA with relative position bias; V2's cosine attention with ``logit_scale``) where the
    input width ``C_in``, the attention width ``E`` and the output width ``C_out`` may differ: torchvision
    takes all three from the input (``C``); here ``E = qkv_weight.shape[0] / 3`` (``num_heads`` heads of
    ``E / num_heads``) and ``C_out = proj_weight.shape[0]``. Same arguments and the same operations in
    the same order, so on unpruned weights it computes what torchvision's function computes."""
    b, h, w, _ = input.shape
    embed = qkv_weight.shape[0] // 3
    head_dim, out_width = embed // num_heads, proj_weight.shape[0]
    pad_r = (window_size[1] - w % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - h % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_h, pad_w, c_in = x.shape
    shift_size = [0 if window_size[i] >= (pad_h, pad_w)[i] else shift_size[i] for i in range(2)]
    if sum(shift_size) > 0:  # cyclic shift
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_h // window_size[0]) * (pad_w // window_size[1])
    x = x.view(b, pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1], c_in)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b * num_windows, window_size[0] * window_size[1], c_in)
    if logit_scale is not None and qkv_bias is not None:  # V2: no bias on the keys
        qkv_bias = torch.cat([qkv_bias[:embed], torch.zeros_like(qkv_bias[embed:2 * embed]), qkv_bias[2 * embed:]])
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift_size) > 0:  # tokens from different regions of a shifted window do not attend to each other
        mask = x.new_zeros((pad_h, pad_w))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for hs in h_slices:
            for ws in w_slices:
                mask[hs[0]:hs[1], ws[0]:ws[1]] = count
                count += 1
        mask = mask.view(pad_h // window_size[0], window_size[0], pad_w // window_size[1], window_size[1])
        mask = mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))
        attn = attn.view(x.size(0) // num_windows, num_windows, num_heads, x.size(1), x.size(1))
        attn = (attn + mask.unsqueeze(1).unsqueeze(0)).view(-1, num_heads, x.size(1), x.size(1))
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), num_heads * head_dim)
    x = F.dropout(F.linear(x, proj_weight, proj_bias), p=dropout, training=training)
    x = x.view(b, pad_h // window_size[0], pad_w // window_size[1], window_size[0], window_size[1], out_width)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, pad_h, pad_w, out_width)
    if sum(shift_size) > 0:  # reverse cyclic shift
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


class RelativeAttention(nn.Module):
    """torchvision's ``RelativePositionalMultiHeadAttention`` (MaxViT, Tu et al. 2022, section 3.1:
    self-attention within each of G groups of P tokens, with a learned bias per head and relative
    position) on (B, G, P, ``in_features``) with ``num_heads`` heads of ``head_dim`` and
    ``out_features`` outputs; torchvision's takes all three widths from ``feat_dim``. ``scale`` is the
    unpruned ``feat_dim ** -0.5`` torchvision multiplies the keys by. The same operations in the same
    order, and the same parameter and buffer names."""

    def __init__(self, in_features: int, num_heads: int, head_dim: int, out_features: int, max_seq_len: int,
                 scale: float):
        super().__init__()
        self.n_heads, self.head_dim, self.max_seq_len, self.scale_factor = num_heads, head_dim, max_seq_len, scale
        size = int(math.sqrt(max_seq_len))
        self.to_qkv = nn.Linear(in_features, 3 * num_heads * head_dim)
        self.merge = nn.Linear(num_heads * head_dim, out_features)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", torch.zeros(max_seq_len, max_seq_len, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, g, p, _ = x.shape
        heads, dh = self.n_heads, self.head_dim
        q, k, v = torch.chunk(self.to_qkv(x), 3, dim=-1)
        q = q.reshape(b, g, p, heads, dh).permute(0, 1, 3, 2, 4)
        k = k.reshape(b, g, p, heads, dh).permute(0, 1, 3, 2, 4)
        v = v.reshape(b, g, p, heads, dh).permute(0, 1, 3, 2, 4)
        k = k * self.scale_factor
        dot_prod = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(self.max_seq_len, self.max_seq_len, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        dot_prod = F.softmax(dot_prod + bias, dim=-1)
        out = torch.einsum("B G H I J, B G H J D -> B G H I D", dot_prod, v)
        return self.merge(out.permute(0, 1, 3, 2, 4).reshape(b, g, p, heads * dh))

    @classmethod
    def pruned(cls, attn: nn.Module, cols: torch.Tensor, rows: torch.Tensor, z: torch.Tensor | None = None,
               heads: torch.Tensor | None = None, z_heads: torch.Tensor | None = None) -> "RelativeAttention":
        """MaxViT's ``attn`` keeping input channels ``cols``, output channels ``rows`` and ``heads`` (all:
        None); ``z`` (per kept output) is folded into the merge projection, ``z_heads`` (per kept head)
        into the values."""
        heads = torch.arange(attn.n_heads) if heads is None else heads
        w_in, b_in = pruned_qkv(attn.to_qkv.weight, attn.to_qkv.bias, attn.head_dim, cols, heads, z_heads)
        w_out, b_out = pruned_proj(attn.merge.weight, attn.merge.bias, attn.head_dim, rows, heads, z)
        new = cls(int(cols.numel()), int(heads.numel()), attn.head_dim, int(rows.numel()), attn.max_seq_len,
                  float(attn.scale_factor)).to(w_in.device, w_in.dtype)
        _copy_linear(new.to_qkv, w_in, b_in)
        _copy_linear(new.merge, w_out, b_out)
        table = attn.relative_position_bias_table.detach()
        with torch.no_grad():
            new.relative_position_bias_table.copy_(table.index_select(1, heads.to(table.device)))
            new.relative_position_index.copy_(attn.relative_position_index)
        return new


#: Functions a saved compacted network may call besides torch's own (see budgetprune.io).
CHANNEL_OPS = {f.__name__: f for f in (index_add_channels, scatter_channels, select_channels, slice_channels,
                                        full_count_layer_norm)}
