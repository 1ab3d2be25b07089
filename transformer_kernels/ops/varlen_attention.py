"""`varlen_attention`: attention over packed variable-length sequences (no padding computed), flash-attn's
``flash_attn_varlen_func`` contract; the kernel backends run as a torch.library custom op (fake impl, autograd), the
torch backend loops `eager.attention` over the sequences.

Sequence b holds rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k/v;
a query sees only its own sequence's keys.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backends, eager
from .._layout import narrow_head_dim, packed_bounds, widen_head_dim
from ..masks import alibi_bias
from ._checks import (
    autocast_dtype,
    cast_all,
    check_alibi_slopes,
    check_attention_options,
    check_qkv,
    check_seed,
    check_softcap,
    check_window,
    describe,
)
from ._dispatch import call, custom_op, register_autograd
from ._sinks import apply_sinks, check_sinks, sinks_grad
from .attention import FAMILY, capable_backend, draw_seed, row_lse

OP = "varlen_attention"


@custom_op("transformer_kernels::varlen_attention")
def _varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                      sinks: Tensor | None, alibi: Tensor | None, dropout_p: float, is_causal: bool, scale: float,
                      softcap: float, window_left: int, window_right: int, bottom_right: bool, seed: Tensor | None,
                      backend: str) -> tuple[Tensor, Tensor, Tensor]:
    check_seed(seed, q.device)
    width = max(q.shape[-1], v.shape[-1])
    with backends.on_device(q):
        out, row_max, inv_l = backends.launchers(FAMILY, backend).varlen_forward(
            *(widen_head_dim(t, width) for t in (q, k, v)), cu_q, cu_k, max_q, max_k, scale, is_causal, bottom_right,
            dropout_p, seed, softcap=softcap, window=(window_left, window_right), alibi=alibi)
    out = narrow_head_dim(out, v.shape[-1])
    if sinks is not None:
        out, inv_l = apply_sinks(out, row_max, inv_l, sinks)
    return out, row_max, inv_l


@_varlen_attention.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, sinks, alibi, dropout_p, is_causal, scale, softcap, window_left,
      window_right, bottom_right, seed, backend):
    stats = q.shape[:-1]
    return (q.new_empty((*stats, v.shape[-1])), q.new_empty(stats, dtype=torch.float32),
            q.new_empty(stats, dtype=torch.float32))


@custom_op("transformer_kernels::varlen_attention_backward")
def _varlen_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, row_max: Tensor,
                               inv_l: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                               sinks: Tensor | None, alibi: Tensor | None, dropout_p: float, is_causal: bool,
                               scale: float, softcap: float, window_left: int, window_right: int, bottom_right: bool,
                               seed: Tensor | None, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv and, with sinks, their fp32 gradient ``[H]`` (else an empty tensor)."""
    check_seed(seed, q.device)
    dsinks = q.new_empty(0, dtype=torch.float32) if sinks is None else sinks_grad(grad, out, row_max, inv_l, sinks)
    d, width = q.shape[-1], max(q.shape[-1], v.shape[-1])
    grad, q_, k_, v_, out = (widen_head_dim(t, width) for t in (grad, q, k, v, out))
    with backends.on_device(q):
        dq, dk, dv = backends.launchers(FAMILY, backend).varlen_backward(
            grad, q_, k_, v_, out, row_max, inv_l, cu_q, cu_k, max_q, max_k, scale, is_causal, bottom_right, dropout_p,
            seed, softcap=softcap, window=(window_left, window_right), alibi=alibi)
    return narrow_head_dim(dq, d), narrow_head_dim(dk, d), narrow_head_dim(dv, v.shape[-1]), dsinks


@_varlen_attention_backward.register_fake
def _(grad, q, k, v, out, row_max, inv_l, cu_q, cu_k, max_q, max_k, sinks, alibi, dropout_p, is_causal, scale,
      softcap, window_left, window_right, bottom_right, seed, backend):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(0 if sinks is None else sinks.shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    (q, k, v, cu_q, cu_k, max_q, max_k, sinks, alibi, dropout_p, is_causal, scale, softcap, window_left,
     window_right, bottom_right, seed, backend) = inputs
    out, row_max, inv_l = output
    ctx.save_for_backward(q, k, v, out, row_max, inv_l, cu_q, cu_k, sinks, alibi, seed)
    ctx.args = (max_q, max_k, dropout_p, is_causal, scale, softcap, window_left, window_right, bottom_right, backend)


def _backward(ctx, grad: Tensor, _grad_max: Tensor, _grad_inv_l: Tensor):
    q, k, v, out, row_max, inv_l, cu_q, cu_k, sinks, alibi, seed = ctx.saved_tensors
    max_q, max_k, dropout_p, is_causal, scale, softcap, window_left, window_right, bottom_right, backend = ctx.args
    dq, dk, dv, dsinks = call(_varlen_attention_backward, grad, q, k, v, out, row_max, inv_l, cu_q, cu_k, max_q, max_k,
                              sinks, alibi, dropout_p, is_causal, scale, softcap, window_left, window_right,
                              bottom_right, seed, backend)
    dsinks = dsinks.to(sinks.dtype) if ctx.needs_input_grad[7] else None
    return dq, dk, dv, None, None, None, None, dsinks, *([None] * 10)


register_autograd(_varlen_attention, _backward, _setup_context)


def _check_cu(name: str, cu: Tensor, total: int, max_len: int, batch: int, q: Tensor) -> Tensor:
    """cu_seqlens as contiguous int32 ``[B + 1]``, its values checked: on the host for CPU tensors; on a GPU by
    asynchronous device asserts (no host sync: a bad value stops the stream with a device-side assert naming the
    check instead of a ValueError)."""
    if not isinstance(cu, Tensor) or cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1:
        raise TypeError(f"{name} must be a 1-D int32 (or int64) tensor [B + 1]; got "
                        f"{describe(cu) if isinstance(cu, Tensor) else type(cu).__name__}")
    if cu.device != q.device:
        raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu.numel() != batch + 1 or cu.numel() == 0:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both have B + 1 entries; got {batch + 1} and "
                         f"{cu.numel()} ({name})")
    if total >= 2**31:
        raise ValueError(f"{name}: {total} rows do not fit int32 offsets")
    # The value checks cost ~24 small device ops (or a host read); a model passes the same cu_seqlens tensor to every
    # layer of a step, so they run once per tensor, its contents (version counter) and what they were checked against.
    signature = (cu._version, name, total, max_len)
    checked = getattr(cu, _CHECKED_ATTR, ())
    if signature not in checked:
        lengths = cu[1:] - cu[:-1]
        checks = (
            (cu[0] == 0, f"{name}[0] must be 0"),
            (cu[-1] == total, f"{name}[-1] must equal the rows of its tensor ({total})"),
            ((lengths >= 0).all(), f"{name} must be non-decreasing"),
            ((lengths <= max_len).all(), f"a sequence is longer than its max_seqlen ({max_len}) per {name}"),
        )
        for ok, why in checks:
            if cu.is_cuda:
                torch._assert_async(ok, why)
            elif not bool(ok):
                raise ValueError(f"{why}; got {cu.tolist()}")
        if not torch.compiler.is_compiling():
            setattr(cu, _CHECKED_ATTR, (*checked[-3:], signature))
    return cu.to(torch.int32).contiguous()


# The signatures under which a cu_seqlens tensor's values passed `_check_cu`, kept on the tensor itself (they live and
# die with it; a dict keyed by tensors would cost more per call than it saves).
_CHECKED_ATTR = "_transformer_kernels_cu_checked"


def _check_inputs(q, k, v, sinks, softcap, dropout_p, enable_gqa, causal_alignment, max_seqlen_q, max_seqlen_k,
                  ) -> None:
    check_qkv(q, k, v, 3, "[total, heads, D] (packed sequences)")
    (_, h, d), (total_k, hkv, dk) = q.shape, k.shape
    if v.shape[0] != total_k or v.shape[1] != hkv or dk != d:
        raise ValueError(f"expected q [total_q, H, D], k [total_k, Hkv, D], v [total_k, Hkv, Dv]; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    check_attention_options(h, hkv, enable_gqa, dropout_p, causal_alignment)
    check_sinks(sinks, h, q.device)
    check_softcap(softcap)
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise TypeError(f"{name} must be a non-negative Python int (it sizes the launch grid); got {n!r}")


def _torch_varlen(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, dropout_p: float, is_causal: bool,
                  scale: float, bottom_right: bool, sinks: Tensor | None, softcap: float | None,
                  window: tuple[int, int] | None, alibi: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The torch backend: each sequence through eager.attention (reads cu_seqlens on the host), ALiBi (slopes
    ``[B, H]``) as its bias. Returns the output and the rows' log-sum-exp ``[total_q, H]``."""
    outs, lses = [], []
    for b, (q0, q1, k0, k1) in enumerate(packed_bounds(cu_q, cu_k)):
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        offset = (k1 - k0) - (q1 - q0) if bottom_right else 0
        bias = None if alibi is None else alibi_bias(alibi[b], q1 - q0, k1 - k0, offset).unsqueeze(0)
        out, lse = eager.attention(qs, ks, vs, bias, None, dropout_p, is_causal, scale, offset, return_lse=True,
                                   sinks=sinks, softcap=softcap, window=window)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0].transpose(0, 1))
    if not outs:
        return q.new_empty(q.shape[0], q.shape[1], v.shape[-1]), q.new_empty(q.shape[:2], dtype=torch.float32)
    return torch.cat(outs), torch.cat(lses)


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    causal_alignment: str = "top_left",
    *,
    sinks: Tensor | None = None,
    softcap: float | None = None,
    window: tuple[int, int] | None = None,
    alibi_slopes: Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over packed variable-length sequences.

    q ``[total_q, H, D]``, k/v ``[total_k, Hkv, D]`` (any strides; H % Hkv == 0, Hkv < H needs
    ``enable_gqa=True``); cu_seqlens_q/k int32 (int64 accepted) ``[B + 1]`` on q's device, cumulative sequence
    starts from 0 to the totals (sequences of length 0 allowed in either); max_seqlen_q/k Python ints at least the
    longest lengths: they size the launch, so no host sync is needed on a GPU (values are checked there by
    asynchronous device asserts, on the CPU by ValueErrors). is_causal: per sequence, query i sees keys
    ``j <= i + offset``, offset 0 ("top_left") or ``Lk - Lq`` of that sequence ("bottom_right"). Dropout, fully
    hidden rows (zeros) and dtypes as in `attention`. Returns a contiguous ``[total_q, H, D]`` tensor in q's dtype,
    and with ``return_lse`` each row's log-sum-exp, fp32 ``[total_q, H]``; sinks ``[H]``, softcap, window and
    alibi_slopes (``[H]`` or ``[B, H]``, B the sequences; window and ALiBi around each sequence's own diagonal) as in
    `attention` (the Triton kernels take no ALiBi: `auto` sends it to cuda, as the soft cap).
    """
    if isinstance(q, Tensor):
        q, k, v = cast_all(autocast_dtype(q), q, k, v)
    _check_inputs(q, k, v, sinks, softcap, dropout_p, enable_gqa, causal_alignment, max_seqlen_q, max_seqlen_k)
    window_left, window_right = (-1, -1) if window is None else check_window(window)
    batch = cu_seqlens_q.numel() - 1 if isinstance(cu_seqlens_q, Tensor) else -1
    cu_q = _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, batch, q)
    cu_k = _check_cu("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, batch, q)
    check_alibi_slopes(alibi_slopes, batch, q.shape[1], q.device)
    alibi = None if alibi_slopes is None else alibi_slopes.float().expand(batch, q.shape[1])  # [B, H]
    name = backends.resolve_for(OP, FAMILY, q.device, backend, q, k, v)
    windowed = max(window_left, window_right) >= 0
    if softcap or windowed or alibi is not None:
        # A packed call has no dense mask to fold a window or ALiBi into: the kernels must take them.
        name = capable_backend(name, backend, OP, q, k, v, softcap=bool(softcap), window=windowed,
                               alibi=alibi is not None)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    bottom_right = causal_alignment == "bottom_right"
    if name == "torch":
        out, lse = _torch_varlen(q, k, v, cu_q, cu_k, dropout_p, is_causal, scale, bottom_right, sinks, softcap,
                                 window, alibi)
        return (out, lse) if return_lse else out
    seed = draw_seed(q.device) if dropout_p > 0.0 else None
    out, row_max, inv_l = call(_varlen_attention, q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, sinks, alibi,
                               float(dropout_p), bool(is_causal), scale, float(softcap or 0.0), window_left,
                               window_right, bottom_right, seed, name)
    return (out, row_lse(row_max, inv_l)) if return_lse else out
