"""CUDA C++ cross-entropy rows launcher (csrc/cross_entropy.cu): a block per row, any vocabulary."""

from __future__ import annotations

import torch

from .. import _ext
from ._args import ptr, stream, unsupported_dtype

unsupported = unsupported_dtype


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | None, loss: torch.Tensor,
                       lse: torch.Tensor, ignore_index: int, label_smoothing: float, softcap: float | None,
                       z_loss: float) -> None:
    """The contract of kernels/cross_entropy.py's `cross_entropy_rows`."""
    mod = _ext.module_for(logits.device)
    rows, n = logits.shape
    mod.cross_entropy_rows({"logits": logits.data_ptr(), "target": target.data_ptr(), "scale": ptr(scale),
                            "loss": loss.data_ptr(), "lse": lse.data_ptr(), "rows": rows, "cols": n,
                            "row_stride": logits.stride(0),
                            "scale_stride": 0 if scale is None or scale.numel() == 1 else 1,
                            "ignore_index": ignore_index, "label_smoothing": float(label_smoothing),
                            "softcap": float(softcap or 0.0), "z_loss": float(z_loss),
                            "dtype": _ext.dtype_code(mod, logits.dtype)},
                           stream(logits))
