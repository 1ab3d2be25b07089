"""CUDA C++ rotary embedding launcher (csrc/rotary.cu): a block per token, q and k in one launch."""

from __future__ import annotations

import torch

from .. import _ext
from ._args import ptr, stream, unsupported_dtype

MAX_HEAD_DIM = 256


def unsupported(q: torch.Tensor) -> str | None:
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} (supported: up to {MAX_HEAD_DIM})"
    return unsupported_dtype(q)


def rotary(q: torch.Tensor, k: torch.Tensor, q_out: torch.Tensor, k_out: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor, position_ids: torch.Tensor | None, interleaved: bool, backward: bool) -> None:
    """The contract of kernels/rotary.py's `rotary`."""
    mod = _ext.module_for(q.device)
    b, h, seq, d = q.shape
    half = cos.shape[-1] // 2
    if position_ids is not None:
        position_ids = position_ids.long()  # the kernel reads int64 positions; int32 ones are copied (B·L values)
        cos_b, cos_l, pos_b, pos_l = 0, cos.stride(0), position_ids.stride(0), position_ids.stride(1)
    else:
        cos_b, cos_l, pos_b, pos_l = cos.stride(0), cos.stride(1), 0, 0
    mod.rotary({"q": q.data_ptr(), "k": k.data_ptr(), "q_out": q_out.data_ptr(), "k_out": k_out.data_ptr(),
                "cos": cos.data_ptr(), "sin": sin.data_ptr(), "pos": ptr(position_ids), "B": b, "L": seq, "Hq": h,
                "Hk": k.shape[1], "half": half, "n_pass": 0 if q_out.data_ptr() == q.data_ptr() else d - 2 * half,
                "n_positions": cos.shape[0], "step": 2 if interleaved else 1, "pair": 1 if interleaved else half,
                "q_strides": q.stride()[:3], "k_strides": k.stride()[:3], "q_out_strides": q_out.stride()[:3],
                "k_out_strides": k_out.stride()[:3], "cos_b": cos_b, "cos_l": cos_l, "pos_b": pos_b, "pos_l": pos_l,
                "backward": int(backward), "dtype": _ext.dtype_code(mod, q.dtype),
                "cos_dtype": _ext.dtype_code(mod, cos.dtype)}, stream(q))
