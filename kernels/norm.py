"""LayerNorm and RMSNorm over the last dim, in Triton, with an optional fused residual add.

Forward: one program per row. The residual is added first (s = x + residual, stored for the residual stream),
then statistics in fp32: mean and variance from the row held in registers (one pass over memory) up to
`config.ROW_SINGLE_TILE_MAX_COLS`, else in `config.ROW_LOOP_BLOCK` tiles (mean first, then the centred variance, so a large mean
cannot cancel the variance away). The mean (LayerNorm) and 1/std are saved for backward.

Backward: each program walks `ROWS_PER_PROGRAM` rows, several per step (`pick_backward_config`), writes dX for
each and keeps its partial sums of dWeight (and dBias) in registers; the partials ``[programs, N]`` are summed
afterwards in a fixed order, so results are bitwise reproducible (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import unit_last_stride
from .common import cast_out
from .config import (
    ROW_MIN_BLOCK,
    ROW_SINGLE_TILE_MAX_COLS,
    TRITON_DTYPE_NAMES,
    AotVariant,
    aot_signature,
    is_interpreted,
    next_power_of_2,
    power_of_two_configs,
    row_config,
    unsupported_dtype,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Rows per backward program: 16384 rows of a 4096-wide model give 1024 programs, enough to fill every SM up to its
# occupancy (the dW/dB partials, programs × N fp32, stay an eighth of dY's bytes).
ROWS_PER_PROGRAM = 16
_ROWS_PER_PROGRAM = tl.constexpr(ROWS_PER_PROGRAM)


@triton.jit
def _sum_row(x_ptr, residual_ptr, sum_ptr, x_row, s_row, cols, n_cols, HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr,
             INTERPRETED: tl.constexpr):
    # x (+ residual) in fp32; the sum is stored in the input dtype for the residual stream.
    inside = cols < n_cols
    s = tl.load(x_ptr + x_row + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(residual_ptr + x_row + cols, mask=inside, other=0.0).to(tl.float32)
        if STORE_SUM:
            tl.store(sum_ptr + s_row + cols, cast_out(s, sum_ptr.dtype.element_ty, INTERPRETED), mask=inside)
    return s


@triton.jit
def norm_fwd_kernel(
    x_ptr, residual_ptr, sum_ptr, weight_ptr, bias_ptr, y_ptr, mean_ptr, rstd_ptr, n_cols, stride_x_row, eps,
    RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    SINGLE_TILE: tl.constexpr, INTERPRETED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = row * stride_x_row
    out_row = row * n_cols
    offs = tl.arange(0, BLOCK)
    if SINGLE_TILE:
        s = _sum_row(x_ptr, residual_ptr, sum_ptr, x_row, out_row, offs, n_cols, HAS_RESIDUAL, True, INTERPRETED)
        if RMS:
            mean = 0.0
            var = tl.sum(s * s, axis=0) / n_cols
        else:
            mean = tl.sum(s, axis=0) / n_cols
            centred = tl.where(offs < n_cols, s - mean, 0.0)
            var = tl.sum(centred * centred, axis=0) / n_cols
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(weight_ptr + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
        y = (s - mean) * rstd * w
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs, mask=offs < n_cols, other=0.0).to(tl.float32)
        tl.store(y_ptr + out_row + offs, cast_out(y, y_ptr.dtype.element_ty, INTERPRETED), mask=offs < n_cols)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            s = _sum_row(x_ptr, residual_ptr, sum_ptr, x_row, out_row, start + offs, n_cols, HAS_RESIDUAL, True, INTERPRETED)
            if RMS:
                acc += s * s
            else:
                acc += s
        if RMS:
            mean = 0.0
            var = tl.sum(acc, axis=0) / n_cols
        else:
            mean = tl.sum(acc, axis=0) / n_cols
            acc = tl.zeros([BLOCK], tl.float32)
            for start in range(0, n_cols, BLOCK):
                cols = start + offs
                s = _sum_row(x_ptr, residual_ptr, sum_ptr, x_row, out_row, cols, n_cols, HAS_RESIDUAL, False, INTERPRETED)
                centred = tl.where(cols < n_cols, s - mean, 0.0)
                acc += centred * centred
            var = tl.sum(acc, axis=0) / n_cols
        rstd = 1.0 / tl.sqrt(var + eps)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            s = _sum_row(x_ptr, residual_ptr, sum_ptr, x_row, out_row, cols, n_cols, HAS_RESIDUAL, False, INTERPRETED)
            y = (s - mean) * rstd * tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(bias_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            tl.store(y_ptr + out_row + cols, cast_out(y, y_ptr.dtype.element_ty, INTERPRETED), mask=cols < n_cols)
    if not RMS:
        tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def norm_bwd_kernel(
    dy_ptr, x_ptr, residual_ptr, weight_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, db_partial_ptr, n_rows, n_cols,
    stride_dy_row, stride_x_row,
    RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    # xhat = (s - mean)·rstd, g = w·dy:  dx = rstd·(g - mean(g) - xhat·mean(g·xhat))  (RMS: no mean(g) term),
    # dw = Σ_rows dy·xhat, db = Σ_rows dy. Whole rows sit in the tile (n_cols <= BLOCK), ROWS of them per step: their
    # loads are issued together (one row per step left the SM waiting on memory). Rows past the end load as zeros
    # and add nothing. dX is also the residual's gradient.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    w = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    db = tl.zeros([BLOCK], tl.float32)
    for step in range(0, _ROWS_PER_PROGRAM, ROWS):
        rows = (pid * _ROWS_PER_PROGRAM + step + tl.arange(0, ROWS)).to(tl.int64)
        row_ok = rows < n_rows
        ok = row_ok[:, None] & inside[None, :]
        # x + residual again in fp32, exactly the sum the forward normalised (the stored sum is rounded).
        x_off = rows[:, None] * stride_x_row + cols[None, :]
        s = tl.load(x_ptr + x_off, mask=ok, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            s += tl.load(residual_ptr + x_off, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy_row + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        mean = 0.0 if RMS else tl.load(mean_ptr + rows, mask=row_ok, other=0.0)[:, None]
        xhat = tl.where(ok, (s - mean) * rstd[:, None], 0.0)
        g = w[None, :] * dy
        dx = g - xhat * (tl.sum(g * xhat, axis=1) / n_cols)[:, None]
        if not RMS:
            dx -= (tl.sum(g, axis=1) / n_cols)[:, None]
        tl.store(dx_ptr + rows[:, None] * n_cols + cols[None, :],
                 cast_out(dx * rstd[:, None], dx_ptr.dtype.element_ty, INTERPRETED), mask=ok)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    partial = pid.to(tl.int64) * n_cols
    tl.store(dw_partial_ptr + partial + cols, dw, mask=inside)
    if HAS_BIAS:
        tl.store(db_partial_ptr + partial + cols, db, mask=inside)


# ---- launchers -------------------------------------------------------------------------------


def pick_config(n_cols: int) -> tuple[int, int, bool]:
    """(BLOCK, num_warps, SINGLE_TILE) for the forward: at most 16 fp32 values of the row per thread."""
    return row_config(n_cols, 16)


MAX_BACKWARD_COLS = 8192  # a whole row and its dW/dB partials in registers: at 16384 every dtype spilled


# Rows × columns of one backward step: up to 8 rows of up to 1024 columns (16 fp32 values a thread at 16 warps,
# 112-128 registers, 0 spills on sm_80/sm_90), 4096 values above (4 rows of 2048 spilled 48-72 bytes; 8 a thread is
# also the one-row rule that a whole 16384-wide row broke in every dtype). The register file bounds the rows in
# flight: a row of N columns keeps ~7 fp32 values per column live. Up to this many columns: (values per step, fp32
# values per thread).
_BACKWARD_TILE = {1024: (8192, 16), MAX_BACKWARD_COLS: (4096, 8)}
_BACKWARD_MAX_ROWS = 8


def pick_backward_config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK, num_warps, ROWS) for the backward: ROWS whole rows per step (see `_BACKWARD_TILE`)."""
    block = max(ROW_MIN_BLOCK, next_power_of_2(n_cols))
    elements, per_thread = next(tile for cols, tile in _BACKWARD_TILE.items() if block <= cols)
    rows = max(1, min(_BACKWARD_MAX_ROWS, elements // block))
    return block, min(16, max(1, block * rows // (32 * per_thread))), rows


def all_configs() -> list[tuple[int, int, bool]]:
    """Every forward config pick_config can return (for the resource check)."""
    return [*power_of_two_configs(pick_config, ROW_MIN_BLOCK, ROW_SINGLE_TILE_MAX_COLS),
            pick_config(ROW_SINGLE_TILE_MAX_COLS + 1)]


def all_backward_configs() -> list[tuple[int, int, int]]:
    return power_of_two_configs(pick_backward_config, ROW_MIN_BLOCK, MAX_BACKWARD_COLS)


def unsupported(x: torch.Tensor) -> str | None:
    """Why these kernels cannot take ``x`` (None when they can)."""
    why = unsupported_dtype(x, SUPPORTED_DTYPES)
    if why:
        return why
    if x.shape[-1] > MAX_BACKWARD_COLS:
        return f"hidden size {x.shape[-1]} (supported: 1..{MAX_BACKWARD_COLS})"
    return None


def norm_forward(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                 eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual: ``[rows, N]`` with unit stride along N; weight, bias: ``[N]``. Returns (y, s, mean, rstd):
    y the normalised output, s = x + residual (x itself without a residual), and the fp32 row statistics
    (mean is empty for RMS norm)."""
    rows, n = x.shape
    # One row stride serves x and the residual.
    if x.stride(1) != 1 or (residual is not None and residual.stride() != x.stride()):
        x = x.contiguous()
        residual = None if residual is None else residual.contiguous()
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    s = x if residual is None else torch.empty_like(y)
    mean = torch.empty(0 if rms else rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0 or n == 0:
        return y, s, mean, rstd
    block, warps, single = pick_config(n)
    norm_fwd_kernel[(rows,)](
        x, x if residual is None else residual, s, weight, weight if bias is None else bias, y, rstd if rms else mean,
        rstd, n, x.stride(0), eps, RMS=rms, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
        BLOCK=block, SINGLE_TILE=single, INTERPRETED=is_interpreted(), num_warps=warps)
    return y, s, mean, rstd


def norm_backward(dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                  mean: torch.Tensor, rstd: torch.Tensor, has_bias: bool, rms: bool,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """dy ``[rows, N]`` (an expanded grad is copied); x and residual the forward's inputs. Returns (dx, dweight,
    dbias): dx is also the residual's gradient, dweight/dbias are in weight's dtype."""
    rows, n = x.shape
    dy = unit_last_stride(dy)
    if x.stride(1) != 1 or (residual is not None and residual.stride() != x.stride()):
        x = x.contiguous()
        residual = None if residual is None else residual.contiguous()
    dx = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    programs = max(1, triton.cdiv(rows, ROWS_PER_PROGRAM))
    # Every program writes its whole partial row; only without rows (no launch) must they read as zeros.
    alloc = torch.empty if rows and n else torch.zeros
    dw_part = alloc((programs, n), dtype=torch.float32, device=x.device)
    db_part = alloc((programs, n) if has_bias else (0,), dtype=torch.float32, device=x.device)
    if rows and n:
        block, warps, step_rows = pick_backward_config(n)
        norm_bwd_kernel[(programs,)](
            dy, x, x if residual is None else residual, weight, rstd if rms else mean, rstd, dx, dw_part,
            db_part if has_bias else dw_part, rows, n, dy.stride(0), x.stride(0), RMS=rms,
            HAS_RESIDUAL=residual is not None, HAS_BIAS=has_bias, BLOCK=block, ROWS=step_rows,
            INTERPRETED=is_interpreted(), num_warps=warps)
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(weight.dtype) if has_bias else None
    return dx, dw, db


# Runtime scalars and pointers that are not the input dtype or 32-bit ints (the rest of the AOT signature is derived
# from the kernels).
_AOT_TYPES = {"eps": "fp32", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "dw_partial_ptr": "*fp32", "db_partial_ptr": "*fp32"}


def aot_variants() -> list[AotVariant]:
    """Every forward config (single tile per power of two, the loop) and backward config, for each dtype, LayerNorm
    and RMSNorm, with the residual and bias on (the most registers)."""
    out = []
    for dtype in SUPPORTED_DTYPES:
        types = {**_AOT_TYPES, "*_ptr": f"*{TRITON_DTYPE_NAMES[dtype]}"}
        fwd_sig, bwd_sig = aot_signature(norm_fwd_kernel, types), aot_signature(norm_bwd_kernel, types)
        dt = TRITON_DTYPE_NAMES[dtype]
        for rms in (False, True):
            kind = "rms" if rms else "ln"
            for block, warps, single in all_configs():
                consts = {"RMS": rms, "HAS_RESIDUAL": True, "HAS_BIAS": not rms, "BLOCK": block, "SINGLE_TILE": single,
                          "INTERPRETED": False}
                out.append(AotVariant("norm_fwd", norm_fwd_kernel, fwd_sig, consts, warps,
                                      f"{dt} {kind} BLOCK={block} warps={warps} {'tile' if single else 'loop'}",
                                      aligned=("x_ptr", "residual_ptr", "sum_ptr", "weight_ptr", "bias_ptr", "y_ptr",
                                               "stride_x_row")))
            for block, warps, rows in all_backward_configs():
                consts = {"RMS": rms, "HAS_RESIDUAL": True, "HAS_BIAS": not rms, "BLOCK": block, "ROWS": rows,
                          "INTERPRETED": False}
                out.append(AotVariant("norm_bwd", norm_bwd_kernel, bwd_sig, consts, warps,
                                      f"{dt} {kind} BLOCK={block} warps={warps} rows={rows}",
                                      aligned=("dy_ptr", "x_ptr", "residual_ptr", "weight_ptr", "dx_ptr", "dw_partial_ptr",
                                               "db_partial_ptr", "stride_dy_row", "stride_x_row")))
    return out
