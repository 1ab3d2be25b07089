"""Rotary position embedding of q and k in one launch, in Triton: forward and backward are one kernel.

One program per token (b, l): it reads the token's cos/sin row once (from a per-token ``[B, L, R]`` or ``[L, R]``
table, or a ``[P, R]`` table at ``position_ids[b, l]``) and rotates every head of q, then of k, in tiles of heads.
A rotation pairs element ``i`` with ``i + R/2`` (GPT-NeoX, "rotate half") or ``2i`` with ``2i + 1`` (GPT-J,
interleaved); in both layouts, with x1 the first of each pair and x2 its partner:
``y1 = x1·cos1 − x2·sin1``, ``y2 = x2·cos2 + x1·sin2`` (cos/sin read at each element's own index, so tables whose
two halves differ are honoured as transformers' ``q·cos + rotate_half(q)·sin`` does). The backward is the
transposed rotation: ``dx1 = dy1·cos1 + dy2·sin2``, ``dx2 = dy2·cos2 − dy1·sin1``. Dims past R pass through
(copied when the output is a new tensor; untouched in place). Math in fp32, one rounding per output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cast_out
from .config import TRITON_DTYPE_NAMES, AotVariant, aot_signature, is_interpreted, next_power_of_2, unsupported_dtype

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
# Half-widths of a rotation tile: R/2 rounded up to a power of two, at least 16 (R ≤ D ≤ 256).
BLOCK_HALVES = (16, 32, 64, 128)
# Elements of a head tile's half: 2048 over 4 warps is 16 fp32 values per thread per operand (x1, x2, y1, y2).
_TILE_ELEMENTS = 2048
_MAX_BLOCK_H = 16
_WARPS = 4


@triton.jit
def _rotate_heads(x_ptr, y_ptr, n_heads, b, pos_l, stride_xb, stride_xh, stride_xl, stride_yb, stride_yh, stride_yl,
                  cos1, cos2, sin_a, sin_b, first, pair, j_in, rot, n_pass, BLOCK_H: tl.constexpr,
                  BLOCK_HALF: tl.constexpr, INTERPRETED: tl.constexpr):
    out_ty = y_ptr.dtype.element_ty
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        head_in = (heads < n_heads)[:, None]
        x_row = x_ptr + b * stride_xb + pos_l * stride_xl + heads[:, None].to(tl.int64) * stride_xh
        y_row = y_ptr + b * stride_yb + pos_l * stride_yl + heads[:, None].to(tl.int64) * stride_yh
        inside = head_in & j_in[None, :]
        x1 = tl.load(x_row + first[None, :], mask=inside, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + (first + pair)[None, :], mask=inside, other=0.0).to(tl.float32)
        tl.store(y_row + first[None, :], cast_out(x1 * cos1 + x2 * sin_a, out_ty, INTERPRETED), mask=inside)
        tl.store(y_row + (first + pair)[None, :], cast_out(x2 * cos2 + x1 * sin_b, out_ty, INTERPRETED), mask=inside)
        # The dims past the rotated ones are copied as they are (n_pass is 0 in place); their gradient too.
        for p0 in range(0, n_pass, BLOCK_HALF):
            p = rot + p0 + tl.arange(0, BLOCK_HALF)
            keep = head_in & (p < rot + n_pass)[None, :]
            tl.store(y_row + p[None, :], tl.load(x_row + p[None, :], mask=keep, other=0.0), mask=keep)


@triton.jit
def rotary_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, pos_ptr, seq_len, n_q_heads, n_k_heads, half, n_pass,
    n_positions, step, pair, backward, stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl, stride_qob,
    stride_qoh, stride_qol, stride_kob, stride_koh, stride_kol, stride_cb, stride_cl, stride_pb, stride_pl,
    HAS_POS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERPRETED: tl.constexpr,
):
    token = tl.program_id(0)
    b = (token // seq_len).to(tl.int64)
    t = (token % seq_len).to(tl.int64)  # the token's index along L
    j = tl.arange(0, BLOCK_HALF)
    first = j * step  # the pair's first element (step 1: GPT-NeoX, 2: GPT-J); its partner is `pair` further
    j_in = j < half
    if HAS_POS:
        pos = tl.load(pos_ptr + b * stride_pb + t * stride_pl).to(tl.int64)
        # A position outside the table reads nothing there and gives NaN: loud, without a host-side check (which
        # would synchronise every call).
        valid = (pos >= 0) & (pos < n_positions)
        c_row = tl.where(valid, pos, 0) * stride_cl
        bad = tl.where(valid, 0.0, float("nan"))
    else:
        c_row = b * stride_cb + t * stride_cl
        bad = 0.0
    cos1 = tl.load(cos_ptr + c_row + first, mask=j_in, other=0.0).to(tl.float32) + bad
    cos2 = tl.load(cos_ptr + c_row + first + pair, mask=j_in, other=0.0).to(tl.float32) + bad
    sin1 = tl.load(sin_ptr + c_row + first, mask=j_in, other=0.0).to(tl.float32) + bad
    sin2 = tl.load(sin_ptr + c_row + first + pair, mask=j_in, other=0.0).to(tl.float32) + bad
    # forward: y1 = x1·cos1 − x2·sin1, y2 = x2·cos2 + x1·sin2; backward (the transpose): x2's term takes sin2 and
    # x1's takes −sin1.
    sin_a = tl.where(backward != 0, sin2, -sin1)[None, :]
    sin_b = tl.where(backward != 0, -sin1, sin2)[None, :]
    rot = 2 * half
    _rotate_heads(q_ptr, q_out_ptr, n_q_heads, b, t, stride_qb, stride_qh, stride_ql, stride_qob, stride_qoh,
                  stride_qol, cos1[None, :], cos2[None, :], sin_a, sin_b, first, pair, j_in, rot, n_pass, BLOCK_H,
                  BLOCK_HALF, INTERPRETED)
    _rotate_heads(k_ptr, k_out_ptr, n_k_heads, b, t, stride_kb, stride_kh, stride_kl, stride_kob, stride_koh,
                  stride_kol, cos1[None, :], cos2[None, :], sin_a, sin_b, first, pair, j_in, rot, n_pass, BLOCK_H,
                  BLOCK_HALF, INTERPRETED)


# ---- launcher ---------------------------------------------------------------------------------------------------


def unsupported(q: torch.Tensor) -> str | None:
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} (supported: up to {MAX_HEAD_DIM})"
    return unsupported_dtype(q, SUPPORTED_DTYPES)


def pick_config(half: int) -> tuple[int, int]:
    """(BLOCK_HALF, BLOCK_H): the rotation's half-width rounded up, and heads per step (16 for R ≤ 256: a 32-head
    Llama token in two steps)."""
    block_half = max(BLOCK_HALVES[0], next_power_of_2(half))
    return block_half, max(1, min(_MAX_BLOCK_H, _TILE_ELEMENTS // block_half))


def rotary(q: torch.Tensor, k: torch.Tensor, q_out: torch.Tensor, k_out: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor, position_ids: torch.Tensor | None, interleaved: bool, backward: bool) -> None:
    """Rotates q ``[B, H, L, D]`` and k ``[B, Hk, L, D]`` (unit last stride) into q_out, k_out (the same tensors
    for in place). cos, sin: ``[B, L, R]`` per token (stride 0 on a broadcast batch), or ``[P, R]`` indexed by
    position_ids ``[B, L]`` (int32/int64, stride 0 on a broadcast batch); unit last stride, equal strides.
    ``backward``: the transposed rotation (dq, dk from the gradients of the outputs)."""
    b, h, seq, d = q.shape
    half = cos.shape[-1] // 2
    n_pass = 0 if q_out.data_ptr() == q.data_ptr() else d - 2 * half
    if b * seq == 0:
        return
    if position_ids is not None:
        cos_strides, pos_strides = (0, cos.stride(0)), (position_ids.stride(0), position_ids.stride(1))
    else:
        cos_strides, pos_strides = (cos.stride(0), cos.stride(1)), (0, 0)
    block_half, block_h = pick_config(half)
    rotary_kernel[(b * seq,)](
        q, k, q_out, k_out, cos, sin, cos if position_ids is None else position_ids, seq, h, k.shape[1], half, n_pass,
        cos.shape[0], 2 if interleaved else 1, 1 if interleaved else half, int(backward), *q.stride()[:3],
        *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3], *cos_strides, *pos_strides,
        HAS_POS=position_ids is not None, BLOCK_H=block_h, BLOCK_HALF=block_half, INTERPRETED=is_interpreted(),
        num_warps=_WARPS)


def aot_variants() -> list[AotVariant]:
    """Every configuration: each tile width, with and without position ids, for each dtype."""
    out = []
    for dtype in SUPPORTED_DTYPES:
        dt = TRITON_DTYPE_NAMES[dtype]
        sig = aot_signature(rotary_kernel, {"*_ptr": f"*{dt}", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                                            "pos_ptr": "*i64"})
        for block_half in BLOCK_HALVES:
            _, block_h = pick_config(block_half)
            for has_pos in (False, True):
                consts = {"HAS_POS": has_pos, "BLOCK_H": block_h, "BLOCK_HALF": block_half, "INTERPRETED": False}
                label = f"{dt} R<={2 * block_half}{' position_ids' if has_pos else ''}"
                out.append(AotVariant("rotary", rotary_kernel, sig, consts, _WARPS, label))
    return out
