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
    is_interpreted,
    mask_args,
    power_of_two_configs,
    row_config,
    unsupported_dtype,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _masked_scores(X, M, x_row, m_row, cols, n_cols, query, causal_offset, sxk, smk, scale,
                   MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr):
    # scale * x + additive mask in fp32, -inf where hidden. Hidden entries are never read from X, so NaN or Inf
    # under a bool or causal mask cannot reach the row.
    visible = cols < n_cols
    if IS_CAUSAL:
        visible = visible & (cols <= query + causal_offset)
    if MASK_KIND == 1:
        keep = tl.load(M + m_row + cols * smk, mask=visible, other=0)
        visible = visible & (keep != 0)
    s = tl.load(X + x_row + cols * sxk, mask=visible, other=0.0).to(tl.float32) * scale
    if MASK_KIND == 2:
        s += tl.load(M + m_row + cols * smk, mask=visible, other=0.0).to(tl.float32)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def softmax_fwd_kernel(
    X, M, Y, n_cols, d1, d2,
    sx0, sx1, sx2, sx3, sm0, sm1, sm2, sm3,
    scale, causal_offset,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK: tl.constexpr, SINGLE_TILE: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    i2 = row % d2
    i1 = (row // d2) % d1
    i0 = row // (d1 * d2)
    x_row = i0 * sx0 + i1 * sx1 + i2 * sx2
    m_row = i0 * sm0 + i1 * sm1 + i2 * sm2
    y_ptr = Y + row * n_cols
    offs = tl.arange(0, BLOCK)
    if SINGLE_TILE:
        s = _masked_scores(X, M, x_row, m_row, offs, n_cols, i2, causal_offset, sx3, sm3, scale, MASK_KIND, IS_CAUSAL)
        m = tl.max(s, axis=0)
        # A row with no visible key has max -inf: subtract 0 instead so exp2(-inf) = 0, not NaN.
        p = tl.exp2((s - tl.where(m == float("-inf"), 0.0, m)) * LOG2E)
        denom = tl.sum(p, axis=0)
        y = p / tl.where(denom == 0.0, 1.0, denom)
        tl.store(y_ptr + offs, cast_out(y, Y.dtype.element_ty, INTERPRETED), mask=offs < n_cols)
    else:
        m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
        l_vec = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            s = _masked_scores(X, M, x_row, m_row, start + offs, n_cols, i2, causal_offset, sx3, sm3, scale,
                               MASK_KIND, IS_CAUSAL)
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
            s = _masked_scores(X, M, x_row, m_row, cols, n_cols, i2, causal_offset, sx3, sm3, scale,
                               MASK_KIND, IS_CAUSAL)
            y = tl.exp2((s - m_safe) * LOG2E) * inv
            tl.store(y_ptr + cols, cast_out(y, Y.dtype.element_ty, INTERPRETED), mask=cols < n_cols)


@triton.jit
def softmax_bwd_kernel(
    Y, DY, DX, n_cols, d1, d2, sd0, sd1, sd2, sd3, scale,
    BLOCK: tl.constexpr, SINGLE_TILE: tl.constexpr, INTERPRETED: tl.constexpr,
):
    # dx = scale * y * (dy - sum(dy * y)): masked entries have y = 0, so their gradient is 0.
    row = tl.program_id(0).to(tl.int64)
    i2 = row % d2
    i1 = (row // d2) % d1
    i0 = row // (d1 * d2)
    dy_ptr = DY + i0 * sd0 + i1 * sd1 + i2 * sd2
    y_ptr = Y + row * n_cols
    dx_ptr = DX + row * n_cols
    offs = tl.arange(0, BLOCK)
    if SINGLE_TILE:
        inside = offs < n_cols
        y = tl.load(y_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs * sd3, mask=inside, other=0.0).to(tl.float32)
        dot = tl.sum(y * dy, axis=0)
        tl.store(dx_ptr + offs, cast_out(scale * y * (dy - dot), DX.dtype.element_ty, INTERPRETED), mask=inside)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            inside = cols < n_cols
            y = tl.load(y_ptr + cols, mask=inside, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + cols * sd3, mask=inside, other=0.0).to(tl.float32)
            acc += y * dy
        dot = tl.sum(acc, axis=0)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            inside = cols < n_cols
            y = tl.load(y_ptr + cols, mask=inside, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + cols * sd3, mask=inside, other=0.0).to(tl.float32)
            tl.store(dx_ptr + cols, cast_out(scale * y * (dy - dot), DX.dtype.element_ty, INTERPRETED), mask=inside)


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


def aot_variants() -> list[AotVariant]:
    """Every compiled form the launchers above can pick: each config of `all_configs()` for each dtype,
    mask kind (and mask element type) and causal flag, forward and backward."""
    out = []
    strides = lambda p: {f"{p}{i}": "i64" for i in range(4)}
    for dtype in SUPPORTED_DTYPES:
        dt = TRITON_DTYPE_NAMES[dtype]
        masks = [(MASK_NONE, dt), (MASK_BOOL, "u8"), (MASK_ADD, dt)] + ([(MASK_ADD, "fp32")] if dt != "fp32" else [])
        for block, warps, single in all_configs():
            for kind, mdt in masks:
                for causal in (False, True):
                    sig = {"X": f"*{dt}", "M": f"*{mdt}", "Y": f"*{dt}", "n_cols": "i32", "d1": "i32", "d2": "i32",
                           **strides("sx"), **strides("sm"), "scale": "fp32", "causal_offset": "i64",
                           "MASK_KIND": "constexpr", "IS_CAUSAL": "constexpr", "BLOCK": "constexpr",
                           "SINGLE_TILE": "constexpr", "INTERPRETED": "constexpr"}
                    out.append(AotVariant(
                        "softmax_fwd", softmax_fwd_kernel, sig,
                        {"MASK_KIND": kind, "IS_CAUSAL": causal, "BLOCK": block, "SINGLE_TILE": single,
                         "INTERPRETED": False}, warps,
                        f"{dt} BLOCK={block} warps={warps} {'tile' if single else 'loop'} mask={kind}:{mdt} causal={int(causal)}",
                        aligned=("X", "M", "Y"),
                    ))
            sig = {"Y": f"*{dt}", "DY": f"*{dt}", "DX": f"*{dt}", "n_cols": "i32", "d1": "i32", "d2": "i32",
                   **strides("sd"), "scale": "fp32", "BLOCK": "constexpr", "SINGLE_TILE": "constexpr",
                   "INTERPRETED": "constexpr"}
            out.append(AotVariant(
                "softmax_bwd", softmax_bwd_kernel, sig, {"BLOCK": block, "SINGLE_TILE": single, "INTERPRETED": False}, warps,
                f"{dt} BLOCK={block} warps={warps} {'tile' if single else 'loop'}", aligned=("Y", "DY", "DX"),
            ))
    return out
