"""What every CUDA launcher passes to the bindings besides the tensors' data."""

from __future__ import annotations

import torch

from .. import _ext


def ptr(t: torch.Tensor | None) -> int:
    """The data pointer, 0 for an absent tensor."""
    return 0 if t is None else t.data_ptr()


def stream(t: torch.Tensor) -> int:
    """The current stream of ``t``'s device (0 for CPU tensors: the simulator has no streams)."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def unsupported_dtype(x: torch.Tensor) -> str | None:
    """Why the kernels cannot take ``x``'s dtype (None when csrc/types.h has it): the `unsupported` of the families
    whose kernels take any size."""
    codes = _ext.module_for(x.device).dtype_codes
    return None if str(x.dtype).removeprefix("torch.") in codes else f"dtype {x.dtype} (supported: {tuple(codes)})"
