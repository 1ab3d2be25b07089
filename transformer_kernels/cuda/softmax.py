"""CUDA C++ masked softmax launchers (csrc/softmax.cu): warp-per-row up to 1024 columns, block-per-row above."""

from __future__ import annotations

import torch

from .. import _ext
from ._args import ptr, stream, unsupported_dtype

# Which kernel runs every row: "auto" (by length), or "warp"/"block" forced for every length (the tests force
# both so each kernel sees every length; see tools/testing.py:force_softmax_algo).
algo = "auto"


unsupported = unsupported_dtype


def softmax_forward(x: torch.Tensor, mask: torch.Tensor | None, scale: float, is_causal: bool,
                    causal_offset: int = 0) -> torch.Tensor:
    """x ``[d0, d1, d2, N]`` any strides; mask None or a bool/float view of x's shape (broadcast strides).
    Returns a contiguous ``[d0, d1, d2, N]`` in x's dtype (same contract as kernels/softmax.py)."""
    mod = _ext.module_for(x.device)
    d0, d1, d2, n = x.shape
    y = torch.empty((d0, d1, d2, n), dtype=x.dtype, device=x.device)
    mod.softmax_forward(
        x.data_ptr(), ptr(mask), y.data_ptr(), d0 * d1 * d2, n, d1, d2, list(x.stride()),
        [0] * 4 if mask is None else list(mask.stride()), float(scale), bool(is_causal), int(causal_offset),
        _ext.dtype_code(mod, x.dtype), _ext.mask_kind(mod, mask, x.dtype), mod.softmax_algos[algo], stream(x),
    )
    return y


def softmax_backward(grad: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """grad ``[d0, d1, d2, N]`` any strides, y the contiguous forward output; returns contiguous dx."""
    mod = _ext.module_for(y.device)
    d0, d1, d2, n = y.shape
    dx = torch.empty_like(y)
    mod.softmax_backward(
        y.data_ptr(), grad.data_ptr(), dx.data_ptr(), d0 * d1 * d2, n, d1, d2, list(grad.stride()), float(scale),
        _ext.dtype_code(mod, y.dtype), mod.softmax_algos[algo], stream(y),
    )
    return dx
