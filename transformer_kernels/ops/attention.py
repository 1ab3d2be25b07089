"""`attention`: scaled dot-product attention; the kernel backends run as a torch.library custom op (fake impl,
autograd); the torch backend is eager.py's composition, differentiated by autograd.

Call-compatible with ``F.scaled_dot_product_attention``, plus the package's extras (docs/ARCHITECTURE.md): a
``[B, Lk]`` key-padding mask (True = padding) and the causal alignment for ``Lq != Lk``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backends, eager
from .._layout import narrow_head_dim, widen_head_dim
from ..masks import alibi_bias, band_mask
from ._checks import (
    autocast_dtype,
    cast_all,
    check_alibi_slopes,
    check_attention_options,
    check_mask,
    check_qkv,
    check_seed,
    check_softcap,
    check_window,
    describe,
)
from ._dispatch import call, custom_op, register_autograd
from ._sinks import apply_sinks, check_sinks, lse_of, sinks_grad

OP = "attention"
FAMILY = "attention"


def draw_seed(device: torch.device) -> Tensor:
    """The dropout seed of one kernel call, int64 ``[1]``: drawn by torch's default generator of ``device``
    (torch.manual_seed reproduces it) and left there for the kernels to read, never read on the host: no device
    sync, and under CUDA-graph capture the draw is part of the graph, so every replay gets a new seed (the
    generator's offset advances per replay)."""
    return torch.randint(0, 2**62, (1,), device=device)


def _kernel_mask(attn_mask: Tensor | None, q: Tensor, lk: int) -> Tensor | None:
    """The mask as a ``[B, H, Lq, Lk]`` view (stride 0 on broadcast dims, never expanded in memory); float
    masks of another precision are cast first (only their own elements are copied)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in (q.dtype, torch.float32):
        attn_mask = attn_mask.to(torch.float32)
    return attn_mask.expand(*q.shape[:-1], lk)


@custom_op("transformer_kernels::attention")
def _attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
               sinks: Tensor | None, alibi: Tensor | None, dropout_p: float, is_causal: bool, scale: float,
               softcap: float, window_left: int, window_right: int, causal_offset: int, seed: Tensor | None,
               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    check_seed(seed, q.device)
    width, dv = max(q.shape[-1], v.shape[-1]), v.shape[-1]
    with backends.on_device(q):
        out, row_max, inv_l = backends.launchers(FAMILY, backend).attention_forward(
            *(widen_head_dim(t, width) for t in (q, k, v)), _kernel_mask(attn_mask, q, k.shape[-2]), key_padding_mask,
            scale, is_causal, causal_offset, dropout_p, seed, softcap=softcap,
            window=(window_left, window_right), alibi=alibi)
    out = narrow_head_dim(out, dv)
    if sinks is not None:
        out, inv_l = apply_sinks(out, row_max, inv_l, sinks)
    return out, row_max, inv_l


@_attention.register_fake
def _(q, k, v, attn_mask, key_padding_mask, sinks, alibi, dropout_p, is_causal, scale, softcap, window_left,
      window_right, causal_offset, seed, backend):
    stats = q.shape[:-1]
    return (q.new_empty((*stats, v.shape[-1])), q.new_empty(stats, dtype=torch.float32),
            q.new_empty(stats, dtype=torch.float32))


@custom_op("transformer_kernels::attention_backward")
def _attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, row_max: Tensor, inv_l: Tensor,
                        attn_mask: Tensor | None, key_padding_mask: Tensor | None, sinks: Tensor | None,
                        alibi: Tensor | None, dropout_p: float, is_causal: bool, scale: float, softcap: float, window_left: int,
                        window_right: int, causal_offset: int, seed: Tensor | None, mask_grad: bool, backend: str,
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv, with ``mask_grad`` dS as fp32 ``[B, H, Lq, Lk]`` (the float mask's gradient before its broadcast
    dims are summed; an empty tensor without), and with sinks their fp32 gradient ``[H]`` (else empty)."""
    check_seed(seed, q.device)
    d, width = q.shape[-1], max(q.shape[-1], v.shape[-1])
    dsinks = q.new_empty(0, dtype=torch.float32) if sinks is None else sinks_grad(grad, out, row_max, inv_l, sinks)
    grad, q_, k_, v_, out = (widen_head_dim(t, width) for t in (grad, q, k, v, out))
    with backends.on_device(q):
        dq, dk, dv, dmask = backends.launchers(FAMILY, backend).attention_backward(
            grad, q_, k_, v_, out, row_max, inv_l, _kernel_mask(attn_mask, q, k.shape[-2]), key_padding_mask, scale,
            is_causal, causal_offset, dropout_p, seed, mask_grad, softcap=softcap,
            window=(window_left, window_right), alibi=alibi)
    return (narrow_head_dim(dq, d), narrow_head_dim(dk, d), narrow_head_dim(dv, v.shape[-1]),
            q.new_empty(0, dtype=torch.float32) if dmask is None else dmask, dsinks)


@_attention_backward.register_fake
def _(grad, q, k, v, out, row_max, inv_l, attn_mask, key_padding_mask, sinks, alibi, dropout_p, is_causal, scale,
      softcap, window_left, window_right, causal_offset, seed, mask_grad, backend):
    dmask_shape = (*q.shape[:-1], k.shape[-2]) if mask_grad else (0,)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(dmask_shape, dtype=torch.float32), q.new_empty(0 if sinks is None else sinks.shape,
                                                                        dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    (q, k, v, attn_mask, kpm, sinks, alibi, dropout_p, is_causal, scale, softcap, window_left, window_right,
     causal_offset, seed, backend) = inputs
    out, row_max, inv_l = output
    ctx.save_for_backward(q, k, v, out, row_max, inv_l, attn_mask, kpm, sinks, alibi, seed)
    ctx.args = (dropout_p, is_causal, scale, softcap, window_left, window_right, causal_offset, backend)


def _sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """``grad`` ``[B, H, Lq, Lk]`` summed over the dims a mask of ``shape`` was broadcast along (torch's fixed
    reduction order: deterministic), then viewed as ``shape``."""
    lead = grad.dim() - len(shape)
    padded = (1,) * lead + tuple(shape)
    dims = [i for i, n in enumerate(padded) if n == 1 and grad.shape[i] != 1]
    return (grad.sum(dims, keepdim=True) if dims else grad).reshape(shape)


def _backward(ctx, grad: Tensor, _grad_max: Tensor, _grad_inv_l: Tensor):
    q, k, v, out, row_max, inv_l, attn_mask, kpm, sinks, alibi, seed = ctx.saved_tensors
    dropout_p, is_causal, scale, softcap, window_left, window_right, causal_offset, backend = ctx.args
    # A float mask that requires grad (T5's position bias, a learned ALiBi slope) gets dS, the gradient of the
    # scores it is added to; otherwise the kernels store nothing more.
    mask_grad = ctx.needs_input_grad[3]
    dq, dk, dv, ds, dsinks = call(_attention_backward, grad, q, k, v, out, row_max, inv_l, attn_mask, kpm, sinks,
                                  alibi, dropout_p, is_causal, scale, softcap, window_left, window_right, causal_offset,
                                  seed, mask_grad, backend)
    dmask = _sum_to(ds, attn_mask.shape).to(attn_mask.dtype) if mask_grad else None
    dsinks = dsinks.to(sinks.dtype) if ctx.needs_input_grad[5] else None
    return dq, dk, dv, dmask, None, dsinks, None, None, None, None, None, None, None, None, None, None


register_autograd(_attention, _backward, _setup_context)


def _check_inputs(q, k, v, attn_mask, key_padding_mask, sinks, softcap, dropout_p, enable_gqa, causal_alignment,
                  alibi_slopes=None) -> None:
    check_qkv(q, k, v, 4, "[B, heads, L, D]")
    (b, h, lq, d), (bk, hkv, lk, dk) = q.shape, k.shape
    if bk != b or v.shape[0] != b or v.shape[1] != hkv or v.shape[2] != lk or dk != d:
        raise ValueError(f"expected q [B, H, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    check_attention_options(h, hkv, enable_gqa, dropout_p, causal_alignment)
    if attn_mask is not None and attn_mask.dim() > 4:
        raise ValueError(f"attn_mask must broadcast to [B, H, Lq, Lk] = {(b, h, lq, lk)}; got {describe(attn_mask)}")
    check_mask("attn_mask", attn_mask, (b, h, lq, lk), q.device)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor [B, Lk] (True = padding)")
        if key_padding_mask.shape != (b, lk):
            raise ValueError(f"key_padding_mask must have shape [B, Lk] = {(b, lk)}; got {describe(key_padding_mask)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    check_sinks(sinks, h, q.device)
    check_softcap(softcap)
    check_alibi_slopes(alibi_slopes, b, h, q.device)


def attention(
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
    sinks: Tensor | None = None,
    softcap: float | None = None,
    window: tuple[int, int] | None = None,
    alibi_slopes: Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product attention, call-compatible with ``F.scaled_dot_product_attention``.

    q ``[B, H, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` with any strides (H % Hkv == 0; Hkv < H needs
    ``enable_gqa=True``), fp32/fp16/bf16 (fp64 on the torch backend), D up to 256 on the kernels.
    attn_mask: broadcastable to ``[B, H, Lq, Lk]``, bool (True = may attend) or float (added), read through its
    strides. key_padding_mask: bool ``[B, Lk]``, True = padding. is_causal: query i sees keys
    ``j <= i + offset``, offset 0 (``causal_alignment="top_left"``, SDPA's) or ``Lk - Lq`` ("bottom_right", for
    KV-cache decoding). Rows with no visible key give zeros and zero gradients. Dropout draws its seed on q's
    device from torch's default generator (reproducible with ``torch.manual_seed``; no host sync; CUDA-graph
    safe: each replay draws anew) and backward regenerates the same mask. Returns a contiguous ``[B, H, Lq, D]``
    tensor in q's dtype; with ``return_lse`` also each row's log-sum-exp of its visible scaled scores, fp32
    ``[B, H, Lq]`` (−inf for a row that sees nothing; it carries no gradient, as flash-attn's), which
    `merge_attention` uses to combine attention over disjoint key sets. sinks: ``[H]`` float, gpt-oss's attention
    sinks — a learnable logit per query head added to each row's softmax denominator (a row may attend "nowhere"),
    with its gradient; the lse then includes it. softcap: Gemma 2's logit soft-capping, each scaled score s becomes
    softcap·tanh(s / softcap) before masks are applied (None or 0: none), with its gradient, on the cuda and torch
    backends (`auto` picks cuda where it would run triton; triton named explicitly raises NotImplementedError).
    window: ``(left, right)`` sliding window (−1 = unbounded on that side): query i sees keys
    ``i + offset − left <= j <= i + offset + right`` only (offset as for causal: ``causal_alignment``'s diagonal;
    with ``is_causal`` too, ``right`` is 0) — Mistral's and Gemma's sliding windows, flash-attn's ``window_size``. The
    CUDA kernels take it without a mask tensor (key tiles outside every row's window are never loaded); the Triton
    kernels get it folded into the mask (`WINDOW`).
    alibi_slopes: ``[H]`` or ``[B, H]`` float, ALiBi (BLOOM, MPT): −slope·|i + offset − j| is added to the scaled
    score of query i and key j (offset as for causal; flash-attn's ``alibi_slopes``), no gradient. The CUDA kernels
    generate it per score from the slopes (`ALIBI`: no bias tensor); the Triton kernels and the torch backend get it
    as an fp32 bias ``[1 or B, H, Lq, Lk]`` added to the mask (`masks.alibi_bias`), built on the device per call.
    """
    if isinstance(q, Tensor):
        q, k, v = cast_all(autocast_dtype(q), q, k, v)
    _check_inputs(q, k, v, attn_mask, key_padding_mask, sinks, softcap, dropout_p, enable_gqa, causal_alignment,
                  alibi_slopes)
    window_left, window_right = (-1, -1) if window is None else check_window(window)
    name = backends.resolve_for(OP, FAMILY, q.device, backend, q, k, v)
    if softcap:
        name = capable_backend(name, backend, OP, q, k, v, softcap=True)
    lq, lk = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    offset = 0 if causal_alignment == "top_left" else lk - lq
    alibi = None
    if alibi_slopes is not None and name != "torch" and backends.launchers(FAMILY, name).ALIBI:
        alibi = alibi_slopes.float().expand(q.shape[0], q.shape[1])  # [B, H]; a per-head [H] broadcast, stride 0
    elif alibi_slopes is not None:
        attn_mask = _alibi_into_mask(attn_mask, alibi_slopes, lq, lk, offset)
    if max(window_left, window_right) >= 0 and name != "torch" and not backends.launchers(FAMILY, name).WINDOW:
        attn_mask = _window_into_mask(attn_mask, lq, lk, (window_left, window_right), offset, q.device)
        window_left = window_right = -1
    if name == "torch":
        return eager.attention(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, offset,
                               return_lse=return_lse, sinks=sinks, softcap=softcap, window=window)
    seed = draw_seed(q.device) if dropout_p > 0.0 else None
    out, row_max, inv_l = call(_attention, q, k, v, attn_mask, key_padding_mask, sinks, alibi, float(dropout_p),
                               bool(is_causal), scale, float(softcap or 0.0), window_left, window_right, offset, seed,
                               name)
    return (out, row_lse(row_max, inv_l)) if return_lse else out


def _alibi_into_mask(attn_mask: Tensor | None, slopes: Tensor, lq: int, lk: int, offset: int | Tensor) -> Tensor:
    """``attn_mask`` with ALiBi's bias added (`masks.alibi_bias`; ``offset`` an int or a diagonal per sequence):
    fp32 ``[1 or B, H, Lq, Lk]``, −inf where a bool mask hides a key; a float mask's gradient flows through the sum."""
    bias = alibi_bias(slopes, lq, lk, offset)
    bias = bias.unsqueeze(0) if bias.dim() == 3 else bias
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        return torch.where(attn_mask, bias, float("-inf"))
    return attn_mask + bias


def _window_into_mask(attn_mask: Tensor | None, lq: int, lk: int, window: tuple[int, int], offset: int,
                      device: torch.device) -> Tensor:
    """``attn_mask`` with a sliding window folded in, for kernels that take no window (built on the device from the
    shapes: no host sync): a bool mask AND the window, a float one −inf outside it (its gradient flows through)."""
    inside = band_mask(lq, lk, offset, *window, device)
    if attn_mask is None:
        return inside
    if attn_mask.dtype == torch.bool:
        return attn_mask & inside
    return torch.where(inside, attn_mask, float("-inf"))


def capable_backend(name: str, requested: str | None, op: str, q: Tensor, k: Tensor, v: Tensor, *,
                    softcap: bool = False, window: bool = False, alibi: bool = False) -> str:
    """The backend that runs a call whose soft cap (``softcap``), packed sliding window (``window``) or packed ALiBi
    (``alibi``) must be in the kernels: ``name`` when they take it (torch always; cuda all three), else under `auto`
    the CUDA kernels where they can take the inputs (the torch backend where not); a backend named explicitly that
    cannot raises (never silently uncapped, unwindowed or unbiased)."""
    if name == "torch":
        return name
    kernels = backends.launchers(FAMILY, name)
    missing = [f for f, needed, has in (("softcap", softcap, kernels.SOFTCAP), ("window", window, kernels.WINDOW),
                                        ("alibi_slopes", alibi, kernels.ALIBI)) if needed and not has]
    if not missing:
        return name
    if (requested if requested is not None else backends.get_backend()) != "auto":
        raise NotImplementedError(f"backend {name!r} cannot run {op} with {missing[0]} yet (its kernels do not take "
                                  f"it): backend='cuda', 'torch' or 'auto' runs it")
    cuda_ok = backends.status("cuda", q.device)[0] and not backends.launchers(FAMILY, "cuda").unsupported(q, k, v)
    return "cuda" if cuda_ok else "torch"


def row_lse(row_max: Tensor, inv_l: Tensor) -> Tensor:
    """`lse_of` the kernels' statistics, returned without a gradient (as flash-attn's)."""
    return lse_of(row_max, inv_l).detach()


def merge_attention(out1: Tensor, lse1: Tensor, out2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over the union of two disjoint key sets from the attention over each (``return_lse=True``): out
    ``[..., D]`` and lse ``[...]`` (``[B, H, Lq]`` with ``[B, H, Lq, D]``, ``[total_q, H]`` with packed
    ``[total_q, H, D]``). Each output is weighted by exp(lse_i − lse), lse = log(exp(lse1) + exp(lse2)), in fp32;
    a row that sees nothing in one set takes the other's values, in neither gives 0 and −inf. Returns (out in
    out1's dtype, lse fp32). Exact for attention without dropout."""
    if out1.shape != out2.shape or lse1.shape != lse2.shape or out1.shape[:-1] != lse1.shape:
        raise ValueError(f"merge_attention needs out1/out2 [..., D] of one shape and lse1/lse2 of their leading dims; "
                         f"got {describe(out1)}, {describe(lse1)}, {describe(out2)}, {describe(lse2)}")
    lse = torch.logaddexp(lse1.float(), lse2.float())
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, 0.0)
    w1 = torch.where(finite, (lse1.float() - safe).exp(), 0.0).unsqueeze(-1)
    w2 = torch.where(finite, (lse2.float() - safe).exp(), 0.0).unsqueeze(-1)
    return (out1.float() * w1 + out2.float() * w2).to(out1.dtype), lse
