"""The oracle: every op of the package written in plain, readable PyTorch.

Every kernel and module is compared with these functions. They follow the contracts of docs/ARCHITECTURE.md:
accumulation in fp32 (fp64 stays fp64, for gradcheck), fully masked query rows give zeros (and zero
gradients), and masks follow ``F.scaled_dot_product_attention`` (bool ``True`` = may attend, float
added) at the functional level and ``torch.nn`` (bool ``True`` = masked out) at the layer level.
Layer-level functions take a ``state`` dict with the same keys as the ``torch.nn`` module's
``state_dict()``, so ``encoder_layer(x, layer.state_dict(), ...)`` reproduces ``layer(x)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

# The polarity conversion of torch.nn's masks is part of the layers' contract, shared with them rather than restated.
from ._layout import packed_bounds
from .masks import nn_masks_to_sdpa
from .ops._checks import ACTIVATIONS, CAUSAL_ALIGNMENTS

GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu"}


def _acc(x: Tensor) -> Tensor:
    """The accumulation dtype: fp64 stays fp64 (gradcheck), everything else computes in fp32."""
    return x if x.dtype == torch.float64 else x.float()


# ---------------------------------------------------------------------------------------------
# masks and softmax
# ---------------------------------------------------------------------------------------------


def causal_mask(lq: int, lk: int, alignment: str = "top_left", device: torch.device | None = None) -> Tensor:
    """``[lq, lk]`` bool, True where query ``i`` may see key ``j``: ``j <= i + offset`` with offset 0
    (``top_left``, SDPA's rule) or ``lk - lq`` (``bottom_right``, KV-cache decoding)."""
    if alignment not in CAUSAL_ALIGNMENTS:
        raise ValueError(f"causal_alignment must be one of {CAUSAL_ALIGNMENTS}, got {alignment!r}")
    offset = 0 if alignment == "top_left" else lk - lq
    i = torch.arange(lq, device=device).unsqueeze(-1)
    j = torch.arange(lk, device=device)
    return j <= i + offset


def window_mask(lq: int, lk: int, window: tuple[int, int], alignment: str = "top_left",
                device: torch.device | None = None) -> Tensor:
    """``[lq, lk]`` bool, True where query ``i`` may see key ``j`` under a sliding window ``(left, right)``
    (−1 = unbounded on that side) around its diagonal ``i + offset`` (offset as `causal_mask`):
    ``i + offset − left <= j <= i + offset + right``."""
    left, right = window
    offset = 0 if alignment == "top_left" else lk - lq
    diagonal = torch.arange(lq, device=device).unsqueeze(-1) + offset
    j = torch.arange(lk, device=device)
    keep = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if left >= 0:
        keep = keep & (j >= diagonal - left)
    if right >= 0:
        keep = keep & (j <= diagonal + right)
    return keep


def _softmax_keep(scores: Tensor, keep: Tensor | None) -> Tensor:
    """Softmax over the last dim of fp32/fp64 ``scores`` where ``keep`` (broadcastable bool) says which
    entries count. A row with nothing to keep, or whose kept scores are all -inf, gives zeros."""
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    if scores.shape[-1] == 0:
        return scores
    row_max = scores.amax(dim=-1, keepdim=True)
    empty = row_max == float("-inf")
    # Subtracting the max keeps exp() in range; an empty row subtracts 0 so exp(-inf) = 0, not NaN.
    p = torch.exp(scores - row_max.masked_fill(empty, 0.0).detach())
    denom = p.sum(dim=-1, keepdim=True)
    return p / denom.masked_fill(empty, 1.0)


def _stored(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` as a kernel keeps it for backward: stored in the inputs' ``dtype``. An identity for fp32/fp64 inputs;
    for fp16/bf16 it makes the reference run in low precision round what every fused kernel (and PyTorch's own
    low-precision ops) saves, so the accuracy rule's bound includes that rounding."""
    return t.to(dtype).to(t.dtype) if dtype.itemsize < t.dtype.itemsize else t


class _SoftmaxFromStoredOutput(torch.autograd.Function):
    """Softmax rows whose backward reads only the output stored in ``dtype``, as a fused softmax's does:
    dx = y (g - sum(y g))."""

    @staticmethod
    def forward(ctx, scores: Tensor, keep: Tensor | None, dtype: torch.dtype) -> Tensor:
        y = _softmax_keep(scores, keep).to(dtype)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        (y,) = ctx.saved_tensors
        y, g = _acc(y), _acc(grad)
        return y * (g - (y * g).sum(dim=-1, keepdim=True)), None, None


def masked_softmax(
    x: Tensor,
    mask: Tensor | None = None,
    scale: float = 1.0,
    is_causal: bool = False,
    causal_alignment: str = "top_left",
) -> Tensor:
    """Softmax over the last dim of ``scale * x``.

    x: ``[..., Lq, Lk]`` (or ``[..., Lk]`` without causal). mask: broadcastable to x; bool ``True`` =
    keep, float added to the scaled scores. ``is_causal`` hides key ``j > i + offset`` for row ``i`` of
    dim -2. Rows with no visible entry are zeros. Returns x's shape and dtype.
    """
    s = _acc(x) * scale
    keep = None
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask
        else:
            s = s + _acc(mask).to(s.dtype)
    if is_causal:
        if x.dim() < 2:
            raise ValueError(f"is_causal needs x with at least 2 dims, got shape {tuple(x.shape)}")
        c = causal_mask(x.shape[-2], x.shape[-1], causal_alignment, x.device)
        keep = c if keep is None else keep & c
    return _SoftmaxFromStoredOutput.apply(s, keep, x.dtype)


def attention_bias(
    lq: int,
    lk: int,
    *,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
    causal_alignment: str = "top_left",
    window: tuple[int, int] | None = None,
    device: torch.device | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Folds every mask kind into (keep: bool broadcastable to [B, H, lq, lk] or None,
    bias: float to add or None). ``attn_mask`` uses SDPA polarity, ``key_padding_mask`` [B, lk] the
    torch.nn one (True = padding), ``window`` as `window_mask`."""
    keep, bias = None, None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = attn_mask
        else:
            bias = attn_mask
    if key_padding_mask is not None:
        kp = ~key_padding_mask.bool()[:, None, None, :]
        keep = kp if keep is None else keep & kp
    if is_causal:
        c = causal_mask(lq, lk, causal_alignment, device)
        keep = c if keep is None else keep & c
    if window is not None:
        w = window_mask(lq, lk, window, causal_alignment, device)
        keep = w if keep is None else keep & w
    return keep, bias


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    key_padding_mask: Tensor | None = None,
    causal_alignment: str = "top_left",
    dropout_mask: Tensor | None = None,
    return_weights: bool = False,
    low_precision: bool = False,
    sinks: Tensor | None = None,
    softcap: float | None = None,
    window: tuple[int, int] | None = None,
    alibi_slopes: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention as in ``F.scaled_dot_product_attention`` plus the package's extras (docs/ARCHITECTURE.md).

    q: ``[B, H, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` with ``H % Hkv == 0`` (each group of ``H // Hkv``
    query heads shares one K/V head). ``dropout_mask``: bool keep-mask broadcastable to
    ``[B, H, Lq, Lk]``; without it, dropout draws one from torch's generator. A key that no query may see
    contributes nothing, even when its K/V hold NaN or Inf (padded positions). ``low_precision``: round the
    scores and the probabilities to q's dtype before each matmul, as a fused fp16/bf16 kernel does (the
    "reference in low precision" of the accuracy rule). ``sinks`` ``[H]``: gpt-oss's attention sinks, one more
    logit per head in every row's softmax that carries no value (a row with no visible key still gives zeros).
    ``softcap``: Gemma 2's soft-capping, scaled scores s → softcap·tanh(s / softcap), before any mask.
    ``window``: ``(left, right)`` sliding window around each query's diagonal (`window_mask`).
    ``alibi_slopes`` ``[H]`` or ``[B, H]``: ALiBi, −slope·|i + offset − j| added to each scaled score (offset the
    diagonal of ``causal_alignment``).
    Returns ``[B, H, Lq, D]`` in q's dtype (and the
    ``[B, H, Lq, Lk]`` weights when ``return_weights``).
    """
    h, hkv = q.shape[-3], k.shape[-3]
    if h % hkv != 0:
        raise ValueError(f"query heads {h} must be a multiple of key/value heads {hkv}")
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=-3)
        v = v.repeat_interleave(h // hkv, dim=-3)
    lq, lk = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    rnd = (lambda t: _stored(t, q.dtype)) if low_precision else (lambda t: t)
    keep, bias = attention_bias(
        lq,
        lk,
        attn_mask=attn_mask,
        key_padding_mask=key_padding_mask,
        is_causal=is_causal,
        causal_alignment=causal_alignment,
        window=window,
        device=q.device,
    )
    if bias is not None and bias.dtype != torch.bool:
        # An additive -inf hides its key exactly like a bool False.
        hidden = torch.isneginf(bias)
        keep = ~hidden if keep is None else keep & ~hidden
    k, v = _acc(k), _acc(v)
    if keep is not None:
        seen = keep.expand(*q.shape[:-1], lk).any(dim=-2).unsqueeze(-1)  # [B, H, Lk, 1]
        k, v = k.where(seen, 0.0), v.where(seen, 0.0)
    scores = torch.matmul(_acc(q), k.transpose(-2, -1)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = rnd(scores)
    if bias is not None:
        scores = scores + _acc(bias).to(scores.dtype)
    if alibi_slopes is not None:
        offset = 0 if causal_alignment == "top_left" else lk - lq
        i = torch.arange(lq, device=q.device, dtype=torch.float64).view(-1, 1)
        j = torch.arange(lk, device=q.device, dtype=torch.float64).view(1, -1)
        slopes = alibi_slopes.double().view(*alibi_slopes.shape, 1, 1)
        scores = scores - (slopes * (i + offset - j).abs()).to(scores.dtype)
    if sinks is None:
        p = _softmax_keep(scores, keep)
    else:
        hidden = scores if keep is None else scores.masked_fill(~keep, float("-inf"))
        sink = _acc(sinks).to(scores.dtype).view(-1, 1, 1).expand(*scores.shape[:-1], 1)
        p = torch.softmax(torch.cat([hidden, sink], -1), dim=-1)[..., :lk]
    weights = p
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand(p.shape, device=p.device) >= dropout_p
        p = p * dropout_mask / (1.0 - dropout_p)
    out = torch.matmul(rnd(p), v).to(q.dtype)
    return (out, weights.to(q.dtype)) if return_weights else out


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    dropout_mask: Tensor | None = None,
    causal_alignment: str = "top_left",
    **kwargs,
) -> Tensor:
    """Packed sequences, each sequence's attention on its own: q ``[total_q, H, D]``, k/v ``[total_k, Hkv, D]``,
    sequence b at rows ``cu_seqlens[b]:cu_seqlens[b+1]``; ``kwargs`` as `scaled_dot_product_attention` (without
    masks). ``dropout_mask``: bool keep-mask ``[total_q·H, max Lk]`` whose row ``(cu_seqlens_q[b] + i)·H + h`` serves
    query i of sequence b, head h (the kernels' draw). A sequence with no keys gives zeros. Returns
    ``[total_q, H, Dv]``."""
    h = q.shape[1]
    outs = []
    for q0, q1, k0, k1 in packed_bounds(cu_seqlens_q, cu_seqlens_k):
        if q1 == q0 or k1 == k0:
            outs.append(q.new_zeros(q1 - q0, h, v.shape[-1]))
            continue
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        keep = None
        if dropout_mask is not None:
            keep = dropout_mask[q0 * h:q1 * h].view(q1 - q0, h, -1).transpose(0, 1)[None, :, :, :k1 - k0]
        out = scaled_dot_product_attention(qs, ks, vs, dropout_mask=keep, causal_alignment=causal_alignment,
                                           enable_gqa=True, **kwargs)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


# ---------------------------------------------------------------------------------------------
# projections, feed-forward, normalisation
# ---------------------------------------------------------------------------------------------


def activation(x: Tensor, name: str) -> Tensor:
    """relu, gelu (erf), gelu_tanh, silu."""
    if name == "relu":
        return F.relu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation_name: str | None = None,
    residual: Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: Tensor | None = None,
) -> Tensor:
    """``act(x @ weight.T + bias)``, then dropout (with a given keep-mask), then ``+ residual``.
    x: ``[..., K]``, weight: ``[N, K]``, bias: ``[N]`` → ``[..., N]``."""
    y = torch.matmul(_acc(x), _acc(weight).t())
    if bias is not None:
        y = y + _acc(bias)
    if activation_name is not None:
        y = activation(_stored(y, x.dtype), activation_name)
    if dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand(y.shape, device=y.device) >= dropout_p
        y = y * dropout_mask / (1.0 - dropout_p)
    if residual is not None:
        y = y + _acc(residual)
    return y.to(x.dtype)


def gated_linear(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    b_gate: Tensor | None = None,
    b_up: Tensor | None = None,
    activation_name: str = "silu",
) -> Tensor:
    """``act(x W_gate^T + b_gate) * (x W_up^T + b_up)``: swiglu with silu, geglu with gelu."""
    gate = torch.matmul(_acc(x), _acc(w_gate).t())
    up = torch.matmul(_acc(x), _acc(w_up).t())
    if b_gate is not None:
        gate = gate + _acc(b_gate)
    if b_up is not None:
        up = up + _acc(b_up)
    return (activation(_stored(gate, x.dtype), activation_name) * _stored(up, x.dtype)).to(x.dtype)


def feed_forward(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    activation_name: str = "gelu",
    residual: Tensor | None = None,
) -> Tensor:
    """``linear2(act(linear1(x))) (+ residual)``; x ``[..., E]``, w1 ``[F, E]``, w2 ``[E, F]``.
    The hidden activation stays in the accumulation dtype (no rounding in between)."""
    h = activation(torch.matmul(_acc(x), _acc(w1).t()) + (0 if b1 is None else _acc(b1)), activation_name)
    y = torch.matmul(h, _acc(w2).t()) + (0 if b2 is None else _acc(b2))
    if residual is not None:
        y = y + _acc(residual)
    return y.to(x.dtype)


def gated_feed_forward(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    kind: str = "swiglu",
    residual: Tensor | None = None,
) -> Tensor:
    """``W_down (act(x W_gate^T) * x W_up^T)`` (LLaMA-style swiglu, or geglu); no biases."""
    if kind not in GATED_ACTIVATIONS:
        raise ValueError(f"kind must be one of {tuple(GATED_ACTIVATIONS)}, got {kind!r}")
    gate = activation(torch.matmul(_acc(x), _acc(w_gate).t()), GATED_ACTIVATIONS[kind])
    y = torch.matmul(gate * torch.matmul(_acc(x), _acc(w_up).t()), _acc(w_down).t())
    if residual is not None:
        y = y + _acc(residual)
    return y.to(x.dtype)


def layer_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float = 1e-5,
    residual: Tensor | None = None,
    return_residual: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the last dim of ``x (+ residual)``, statistics in fp32. With
    ``return_residual`` also returns the pre-norm sum (the residual stream of pre-norm blocks)."""
    s = _acc(x) if residual is None else _acc(x) + _acc(residual)
    mean = s.mean(dim=-1, keepdim=True)
    var = (s - mean).pow(2).mean(dim=-1, keepdim=True)
    y = (s - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * _acc(weight)
    if bias is not None:
        y = y + _acc(bias)
    y = y.to(x.dtype)
    return (y, s.to(x.dtype)) if return_residual else y


def rms_norm(
    x: Tensor,
    weight: Tensor | None,
    eps: float = 1e-6,
    residual: Tensor | None = None,
    return_residual: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm over the last dim of ``x (+ residual)``: ``s / sqrt(mean(s^2) + eps) * weight``."""
    s = _acc(x) if residual is None else _acc(x) + _acc(residual)
    y = s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * _acc(weight)
    y = y.to(x.dtype)
    return (y, s.to(x.dtype)) if return_residual else y


# ---------------------------------------------------------------------------------------------
# heads
# ---------------------------------------------------------------------------------------------


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``[B, L, H*D]`` → ``[B, H, L, D]``."""
    b, length, e = x.shape
    if e % num_heads != 0:
        raise ValueError(f"embed dim {e} is not divisible by num_heads {num_heads}")
    return x.view(b, length, num_heads, e // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """``[B, H, L, D]`` → ``[B, L, H*D]``."""
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)


def qkv_projection(
    x: Tensor, w_qkv: Tensor, b_qkv: Tensor | None, num_heads: int, num_kv_heads: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """x ``[B, L, E]``, w_qkv ``[(H + 2*Hkv) * D, E]`` (rows: all q heads, then k heads, then v heads)
    → q ``[B, H, L, D]``, k and v ``[B, Hkv, L, D]``."""
    hkv = num_heads if num_kv_heads is None else num_kv_heads
    d = w_qkv.shape[0] // (num_heads + 2 * hkv)
    y = linear(x, w_qkv, b_qkv)
    q, k, v = y.split([num_heads * d, hkv * d, hkv * d], dim=-1)
    return split_heads(q, num_heads), split_heads(k, hkv), split_heads(v, hkv)


def out_projection(attn: Tensor, w_o: Tensor, b_o: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """attn ``[B, H, L, D]`` → merge heads → ``@ w_o.T + b_o (+ residual)`` → ``[B, L, E]``."""
    return linear(merge_heads(attn), w_o, b_o, residual=residual)


# ---------------------------------------------------------------------------------------------
# torch.nn-level layers (state dicts with torch.nn's keys, torch.nn's mask polarity)
# ---------------------------------------------------------------------------------------------


def multi_head_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    state: Mapping[str, Tensor],
    num_heads: int,
    *,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    need_weights: bool = False,
    average_attn_weights: bool = True,
    batch_first: bool = False,
    prefix: str = "",
) -> tuple[Tensor, Tensor | None]:
    """``torch.nn.MultiheadAttention.forward`` (no dropout, no bias_kv/zero_attn) from its state dict.

    query ``[Lq, B, E]`` (``[B, Lq, E]`` with batch_first), key/value ``[Lk, B, Ek/Ev]``. Masks use
    torch.nn polarity: bool True = not allowed; a float key_padding_mask is added. ``is_causal`` is
    applied (top-left) when attn_mask is None. Returns (output, weights or None); fully masked query
    rows give zeros where torch.nn gives NaN.
    """
    if not batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    b, lq, e = query.shape
    lk = key.shape[1]
    d = e // num_heads
    in_b = state.get(prefix + "in_proj_bias")
    if prefix + "in_proj_weight" in state:
        w_q, w_k, w_v = state[prefix + "in_proj_weight"].chunk(3)
    else:
        w_q, w_k, w_v = (state[prefix + f"{n}_proj_weight"] for n in "qkv")
    b_q, b_k, b_v = (None, None, None) if in_b is None else in_b.chunk(3)
    q = split_heads(linear(query, w_q, b_q), num_heads)
    k = split_heads(linear(key, w_k, b_k), num_heads)
    v = split_heads(linear(value, w_v, b_v), num_heads)
    mask, kpm = nn_masks_to_sdpa(attn_mask, key_padding_mask, b, num_heads, lq, lk, q.dtype)
    out, weights = scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=is_causal and attn_mask is None,
        key_padding_mask=kpm,
        scale=1.0 / math.sqrt(d),
        return_weights=True,
    )
    out = out_projection(out, state[prefix + "out_proj.weight"], state.get(prefix + "out_proj.bias"))
    if not batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, weights.mean(dim=1) if average_attn_weights else weights


def _norm(x: Tensor, state: Mapping[str, Tensor], name: str, eps: float) -> Tensor:
    return layer_norm(x, state.get(name + ".weight"), state.get(name + ".bias"), eps)


def _ffn(x: Tensor, state: Mapping[str, Tensor], act: str) -> Tensor:
    return feed_forward(
        x, state["linear1.weight"], state.get("linear1.bias"), state["linear2.weight"], state.get("linear2.bias"), act
    )


def encoder_layer(
    src: Tensor,
    state: Mapping[str, Tensor],
    nhead: int,
    *,
    activation_name: str = "relu",
    norm_first: bool = False,
    eps: float = 1e-5,
    src_mask: Tensor | None = None,
    src_key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
    batch_first: bool = False,
) -> Tensor:
    """``torch.nn.TransformerEncoderLayer`` in eval mode from its state dict (pre- or post-norm)."""

    def sa(x: Tensor) -> Tensor:
        return multi_head_attention(
            x, x, x, state, nhead, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
            is_causal=is_causal, batch_first=batch_first, prefix="self_attn.",
        )[0]

    x = src
    if norm_first:
        x = x + sa(_norm(x, state, "norm1", eps))
        return x + _ffn(_norm(x, state, "norm2", eps), state, activation_name)
    x = _norm(x + sa(x), state, "norm1", eps)
    return _norm(x + _ffn(x, state, activation_name), state, "norm2", eps)


def decoder_layer(
    tgt: Tensor,
    memory: Tensor,
    state: Mapping[str, Tensor],
    nhead: int,
    *,
    activation_name: str = "relu",
    norm_first: bool = False,
    eps: float = 1e-5,
    tgt_mask: Tensor | None = None,
    memory_mask: Tensor | None = None,
    tgt_key_padding_mask: Tensor | None = None,
    memory_key_padding_mask: Tensor | None = None,
    tgt_is_causal: bool = False,
    memory_is_causal: bool = False,
    batch_first: bool = False,
) -> Tensor:
    """``torch.nn.TransformerDecoderLayer`` in eval mode: masked self-attention, cross-attention over
    ``memory``, feed-forward; pre- or post-norm."""

    def sa(x: Tensor) -> Tensor:
        return multi_head_attention(
            x, x, x, state, nhead, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask,
            is_causal=tgt_is_causal, batch_first=batch_first, prefix="self_attn.",
        )[0]

    def ca(x: Tensor) -> Tensor:
        return multi_head_attention(
            x, memory, memory, state, nhead, attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask,
            is_causal=memory_is_causal, batch_first=batch_first, prefix="multihead_attn.",
        )[0]

    x = tgt
    if norm_first:
        x = x + sa(_norm(x, state, "norm1", eps))
        x = x + ca(_norm(x, state, "norm2", eps))
        return x + _ffn(_norm(x, state, "norm3", eps), state, activation_name)
    x = _norm(x + sa(x), state, "norm1", eps)
    x = _norm(x + ca(x), state, "norm2", eps)
    return _norm(x + _ffn(x, state, activation_name), state, "norm3", eps)


# ---------------------------------------------------------------------------------------------
# rotary position embedding and the language-model loss
# ---------------------------------------------------------------------------------------------


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None = None,
           interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """transformers' ``apply_rotary_pos_emb`` in fp32: ``x·cos + rotate(x)·sin`` on the first R = cos.shape[-1]
    dims of q ``[B, H, L, D]`` and k ``[B, Hk, L, D]``, the rest passed through. cos, sin: ``[L, R]`` or
    ``[B, L, R]``, or with ``position_ids`` (``[L]`` or ``[B, L]``) a ``[P, R]`` table read at those positions.
    ``rotate`` pairs i with i + R/2 as ``(−x2, x1)`` (GPT-NeoX), or 2i with 2i + 1 when ``interleaved`` (GPT-J)."""
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # over the heads
    r = cos.shape[-1]

    def rotate(x: Tensor) -> Tensor:
        xr = _acc(x[..., :r])
        if interleaved:
            turned = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
        else:
            turned = torch.cat((-xr[..., r // 2:], xr[..., : r // 2]), dim=-1)
        y = xr * _acc(cos) + turned * _acc(sin)
        return torch.cat((y.to(x.dtype), x[..., r:]), dim=-1)

    return rotate(q), rotate(k)


def linear_cross_entropy(x: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
                         ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                         softcap: float | None = None, z_loss: float = 0.0) -> Tensor:
    """``F.cross_entropy(logits, target, …)`` of ``logits = x @ weightᵀ + bias`` (``[..., V]``), capped to
    ``c·tanh(logits / c)`` first when ``softcap`` is given, all in fp32, plus ``z_loss · logsumexp(logits)²`` per
    row that is not ignored (reduced as the loss). Returns the loss in x's dtype."""
    logits = F.linear(_acc(x), _acc(weight), None if bias is None else _acc(bias))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits, target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    per_row = F.cross_entropy(logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                              reduction="none")
    counted = target != ignore_index
    per_row = per_row + z_loss * torch.logsumexp(logits, dim=-1).square() * counted
    if reduction == "none":
        return per_row.view(x.shape[:-1]).to(x.dtype)
    total = per_row.sum()
    return (total / counted.sum() if reduction == "mean" else total).to(x.dtype)
