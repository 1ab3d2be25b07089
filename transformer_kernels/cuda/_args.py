"""What every CUDA launcher passes to the bindings besides the tensors' data."""

from __future__ import annotations

import torch


def ptr(t: torch.Tensor | None) -> int:
    """The data pointer, 0 for an absent tensor."""
    return 0 if t is None else t.data_ptr()


def stream(t: torch.Tensor) -> int:
    """The current stream of ``t``'s device (0 for CPU tensors: the simulator has no streams)."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


def seed64(seed: int) -> int:
    """A dropout seed as the bindings' uint64."""
    return int(seed) & (2**64 - 1)
