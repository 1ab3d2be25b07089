"""Masked softmax over the last dim, in Triton.

One program per row. Rows up to ``config.ROW_SINGLE_TILE_MAX_COLS`` are held in registers as one tile; longer
rows stream in ``config.ROW_LOOP_BLOCK`` tiles twice: first a running (max, sum) per lane (online softmax),
then the normalised output. The max is subtracted in natural units before the log2(e) multiply
that feeds exp2: folding log2(e) into the scale first (FlashAttention's trick) rounds scores near
-6e4 to 2^-7 and the softmax of such a row off by ~0.5%.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LOG2E, cast_out
from .config import (
    MASK_ADD,
    MASK_BOOL,
    MASK_NONE,
    ROW_MIN_BLOCK,
    ROW_SINGLE_TILE_MAX_COLS,
    TRITON_DTYPE_NAMES,
    AotVariant,
    aot_signature,
    is_interpreted,
    mask_args,
    power_of_two_configs,
    row_config,
    unsupported_dtype,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _masked_scores(x_ptr, mask_ptr, x_row, m_row, cols, n_cols, query, causal_offset, stride_x_col, stride_mask_col, scale,
                   MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr):
    # scale * x + additive mask in fp32, -inf where hidden. Hidden entries are never read from x, so NaN or Inf
    # under a bool or causal mask cannot reach the row.
    visible = cols < n_cols
    if IS_CAUSAL:
        visible = visible & (cols <= query + causal_offset)
    if MASK_KIND == 1:
        keep = tl.load(mask_ptr + m_row + cols * stride_mask_col, mask=visible, other=0)
        visible = visible & (keep != 0)
    s = tl.load(x_ptr + x_row + cols * stride_x_col, mask=visible, other=0.0).to(tl.float32) * scale
    if MASK_KIND == 2:
        s += tl.load(mask_ptr + m_row + cols * stride_mask_col, mask=visible, other=0.0).to(tl.float32)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def softmax_fwd_kernel(
    x_ptr, mask_ptr, y_ptr, n_cols, d1, d2,
    stride_x_d0, stride_x_d1, stride_x_row, stride_x_col, stride_mask_d0, stride_mask_d1, stride_mask_row, stride_mask_col,
    scale, causal_offset,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK: tl.constexpr, SINGLE_TILE: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    i2 = row % d2
    i1 = (row // d2) % d1
    i0 = row // (d1 * d2)
    x_row = i0 * stride_x_d0 + i1 * stride_x_d1 + i2 * stride_x_row
    m_row = i0 * stride_mask_d0 + i1 * stride_mask_d1 + i2 * stride_mask_row
    y_row_ptr = y_ptr + row * n_cols
    offs = tl.arange(0, BLOCK)
    if SINGLE_TILE:
        s = _masked_scores(x_ptr, mask_ptr, x_row, m_row, offs, n_cols, i2, causal_offset, stride_x_col,
                           stride_mask_col, scale, MASK_KIND, IS_CAUSAL)
        m = tl.max(s, axis=0)
        # A row with no visible key has max -inf: subtract 0 instead so exp2(-inf) = 0, not NaN.
        p = tl.exp2((s - tl.where(m == float("-inf"), 0.0, m)) * LOG2E)
        denom = tl.sum(p, axis=0)
        y = p / tl.where(denom == 0.0, 1.0, denom)
        tl.store(y_row_ptr + offs, cast_out(y, y_ptr.dtype.element_ty, INTERPRETED), mask=offs < n_cols)
    else:
        m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
        l_vec = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            s = _masked_scores(x_ptr, mask_ptr, x_row, m_row, start + offs, n_cols, i2, causal_offset, stride_x_col,
                               stride_mask_col, scale, MASK_KIND, IS_CAUSAL)
            m_new = tl.maximum(m_vec, s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_vec = l_vec * tl.exp2((m_vec - m_safe) * LOG2E) + tl.exp2((s - m_safe) * LOG2E)
            m_vec = m_new
        m = tl.max(m_vec, axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        denom = tl.sum(l_vec * tl.exp2((m_vec - m_safe) * LOG2E), axis=0)
        inv = tl.where(denom == 0.0, 0.0, 1.0 / denom)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            s = _masked_scores(x_ptr, mask_ptr, x_row, m_row, cols, n_cols, i2, causal_offset, stride_x_col,
                               stride_mask_col, scale, MASK_KIND, IS_CAUSAL)
            y = tl.exp2((s - m_safe) * LOG2E) * inv
            tl.store(y_row_ptr + cols, cast_out(y, y_ptr.dtype.element_ty, INTERPRETED), mask=cols < n_cols)


@triton.jit
def softmax_bwd_kernel(
    y_ptr, dy_ptr, dx_ptr, n_cols, d1, d2, stride_dy_d0, stride_dy_d1, stride_dy_row, stride_dy_col, scale,
    BLOCK: tl.constexpr, SINGLE_TILE: tl.constexpr, INTERPRETED: tl.constexpr,
):
    # dx = scale * y * (dy - sum(dy * y)): masked entries have y = 0, so their gradient is 0.
    row = tl.program_id(0).to(tl.int64)
    i2 = row % d2
    i1 = (row // d2) % d1
    i0 = row // (d1 * d2)
    dy_row_ptr = dy_ptr + i0 * stride_dy_d0 + i1 * stride_dy_d1 + i2 * stride_dy_row
    y_row_ptr = y_ptr + row * n_cols
    dx_row_ptr = dx_ptr + row * n_cols
    offs = tl.arange(0, BLOCK)
    if SINGLE_TILE:
        inside = offs < n_cols
        y = tl.load(y_row_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(dy_row_ptr + offs * stride_dy_col, mask=inside, other=0.0).to(tl.float32)
        dot = tl.sum(y * dy, axis=0)
        tl.store(dx_row_ptr + offs, cast_out(scale * y * (dy - dot), dx_ptr.dtype.element_ty, INTERPRETED), mask=inside)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            inside = cols < n_cols
            y = tl.load(y_row_ptr + cols, mask=inside, other=0.0).to(tl.float32)
            dy = tl.load(dy_row_ptr + cols * stride_dy_col, mask=inside, other=0.0).to(tl.float32)
            acc += y * dy
        dot = tl.sum(acc, axis=0)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            inside = cols < n_cols
            y = tl.load(y_row_ptr + cols, mask=inside, other=0.0).to(tl.float32)
            dy = tl.load(dy_row_ptr + cols * stride_dy_col, mask=inside, other=0.0).to(tl.float32)
            tl.store(dx_row_ptr + cols, cast_out(scale * y * (dy - dot), dx_ptr.dtype.element_ty, INTERPRETED), mask=inside)


# ---- launchers -------------------------------------------------------------------------------


def pick_config(n_cols: int) -> tuple[int, int, bool]:
    """(BLOCK, num_warps, SINGLE_TILE) for a row length: at most 8 values per thread (with 16, and a 64-bit
    address per element for strided rows, ptxas spilled on sm_80)."""
    return row_config(n_cols, 8)


def all_configs() -> list[tuple[int, int, bool]]:
    """Every (BLOCK, num_warps, SINGLE_TILE) pick_config can return (for the resource check)."""
    return [*power_of_two_configs(pick_config, ROW_MIN_BLOCK, ROW_SINGLE_TILE_MAX_COLS),
            pick_config(ROW_SINGLE_TILE_MAX_COLS + 1)]


def unsupported(x: torch.Tensor) -> str | None:
    """Why these kernels cannot take ``x`` (None when they can)."""
    return unsupported_dtype(x, SUPPORTED_DTYPES)


def softmax_forward(x: torch.Tensor, mask: torch.Tensor | None, scale: float, is_causal: bool,
                    causal_offset: int = 0) -> torch.Tensor:
    """x: ``[d0, d1, d2, N]`` any strides; mask: None, or bool (True = keep) / float (added) viewed as
    ``[d0, d1, d2, N]`` through broadcast strides. Causal: key j visible to query i (index in d2) iff
    ``j <= i + causal_offset``. Returns a contiguous ``[d0, d1, d2, N]`` in x's dtype."""
    d0, d1, d2, n = x.shape
    y = torch.empty((d0, d1, d2, n), dtype=x.dtype, device=x.device)
    rows = d0 * d1 * d2
    if rows == 0 or n == 0:
        return y
    kind, m, ms = mask_args(mask, x)
    block, warps, single = pick_config(n)
    softmax_fwd_kernel[(rows,)](
        x, m, y, n, d1, d2, *x.stride(), *ms, scale, causal_offset,
        MASK_KIND=kind, IS_CAUSAL=bool(is_causal), BLOCK=block, SINGLE_TILE=single, INTERPRETED=is_interpreted(),
        num_warps=warps,
    )
    return y


def softmax_backward(grad: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """grad: ``[d0, d1, d2, N]`` any strides (an expanded grad is read in place); y: contiguous forward
    output. Returns contiguous dx."""
    d0, d1, d2, n = y.shape
    dx = torch.empty_like(y)
    rows = d0 * d1 * d2
    if rows == 0 or n == 0:
        return dx
    block, warps, single = pick_config(n)
    softmax_bwd_kernel[(rows,)](y, grad, dx, n, d1, d2, *grad.stride(), scale,
                                BLOCK=block, SINGLE_TILE=single, INTERPRETED=is_interpreted(), num_warps=warps)
    return dx


# Runtime scalars that are not 32-bit ints (the rest of the AOT signature is derived from the kernels). Strides are
# 64-bit: they come from arbitrary views.
_AOT_TYPES = {"scale": "fp32", "causal_offset": "i64", "stride_*": "i64"}


def aot_variants() -> list[AotVariant]:
    """Every compiled form the launchers above can pick: each config of `all_configs()` for each dtype,
    mask kind (and mask element type) and causal flag, forward and backward."""
    out = []
    for dtype in SUPPORTED_DTYPES:
        dt = TRITON_DTYPE_NAMES[dtype]
        masks = [(MASK_NONE, dt), (MASK_BOOL, "u8"), (MASK_ADD, dt)] + ([(MASK_ADD, "fp32")] if dt != "fp32" else [])
        for block, warps, single in all_configs():
            tiling = f"BLOCK={block} warps={warps} {'tile' if single else 'loop'}"
            for kind, mdt in masks:
                for causal in (False, True):
                    sig = aot_signature(softmax_fwd_kernel, {**_AOT_TYPES, "*_ptr": f"*{dt}", "mask_ptr": f"*{mdt}"})
                    out.append(AotVariant(
                        "softmax_fwd", softmax_fwd_kernel, sig,
                        {"MASK_KIND": kind, "IS_CAUSAL": causal, "BLOCK": block, "SINGLE_TILE": single,
                         "INTERPRETED": False}, warps,
                        f"{dt} {tiling} mask={kind}:{mdt} causal={int(causal)}", aligned=("x_ptr", "mask_ptr", "y_ptr"),
                    ))
            out.append(AotVariant(
                "softmax_bwd", softmax_bwd_kernel, aot_signature(softmax_bwd_kernel, {**_AOT_TYPES, "*_ptr": f"*{dt}"}),
                {"BLOCK": block, "SINGLE_TILE": single, "INTERPRETED": False}, warps, f"{dt} {tiling}",
                aligned=("y_ptr", "dy_ptr", "dx_ptr"),
            ))
    return out
