"""CUDA C++ LayerNorm/RMSNorm launchers (csrc/norm.cu): any row length, deterministic parameter gradients."""

from __future__ import annotations

import torch

from .. import _ext
from .._layout import unit_last_stride
from ._args import ptr, stream, unsupported_dtype

unsupported = unsupported_dtype


def _args(mod, x, residual, weight, bias, eps, rms) -> dict:
    rows, n = x.shape
    return {"x": x.data_ptr(), "residual": ptr(residual), "weight": weight.data_ptr(), "bias": ptr(bias),
            "rows": rows, "cols": n, "x_row_stride": x.stride(0),
            "res_row_stride": 0 if residual is None else residual.stride(0), "eps": float(eps), "rms": int(rms),
            "dtype": _ext.dtype_code(mod, x.dtype), "y": 0, "sum": 0, "mean": 0, "rstd": 0, "dy": 0, "dy_row_stride": 0,
            "dx": 0, "dw": 0, "db": 0, "dw_partial": 0, "db_partial": 0}


def norm_forward(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                 eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual ``[rows, N]``; weight, bias ``[N]``. Returns y, the pre-norm sum (x itself without a
    residual), the fp32 mean (empty for RMS) and rstd (same contract as kernels/norm.py)."""
    x, residual = unit_last_stride(x), None if residual is None else unit_last_stride(residual)
    mod = _ext.module_for(x.device)
    rows, n = x.shape
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    s = x if residual is None else torch.empty_like(y)
    mean = torch.empty(0 if rms else rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    args = _args(mod, x, residual, weight, bias, eps, rms)
    args |= {"y": y.data_ptr(), "sum": 0 if residual is None else s.data_ptr(), "mean": ptr(mean),
             "rstd": rstd.data_ptr()}
    mod.norm_forward(args, stream(x))
    return y, s, mean, rstd


def norm_backward(dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                  mean: torch.Tensor, rstd: torch.Tensor, has_bias: bool, rms: bool,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns (dx, dweight, dbias or None); dx is also the residual's gradient."""
    x, dy = unit_last_stride(x), unit_last_stride(dy)
    residual = None if residual is None else unit_last_stride(residual)
    mod = _ext.module_for(x.device)
    rows, n = x.shape
    chunks = max(mod.norm_backward_chunks(rows, n, _ext.dtype_code(mod, x.dtype)), 1)
    dx = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    dw = torch.empty_like(weight)
    db = torch.empty_like(weight) if has_bias else None
    dw_part = torch.empty((chunks, n), dtype=torch.float32, device=x.device)
    db_part = torch.empty_like(dw_part) if has_bias else None
    args = _args(mod, x, residual, weight, None, 0.0, rms)
    args |= {"dy": dy.data_ptr(), "dy_row_stride": dy.stride(0), "mean": ptr(mean), "rstd": rstd.data_ptr(),
             "dx": dx.data_ptr(), "dw": dw.data_ptr(), "db": ptr(db), "dw_partial": dw_part.data_ptr(),
             "db_partial": ptr(db_part)}
    mod.norm_backward(args, stream(x))
    return dx, dw, db
