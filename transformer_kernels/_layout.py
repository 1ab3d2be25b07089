"""Tensor-layout helpers the launchers of both kernel backends and the ops share."""

from __future__ import annotations

import itertools

import torch


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is contiguous (the kernels read rows with unit stride), else a copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def widen_head_dim(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` with its last dim zero-padded to ``width`` (``t`` itself when it has that width)."""
    return t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))


def narrow_head_dim(t: torch.Tensor, width: int) -> torch.Tensor:
    """The first ``width`` entries of the last dim, contiguous (``t`` itself when it has that width)."""
    return t if t.shape[-1] == width else t[..., :width].contiguous()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., C]`` as ``[rows, C]`` (a view when the strides allow; also for zero rows or C = 0)."""
    return t.reshape(t.shape[:-1].numel(), t.shape[-1])


def col_sum(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dBias when no GEMM carries it: a column sum of ``[M, N]`` in fp32, in a fixed order."""
    return t.float().sum(0).to(dtype)


def packed_bounds(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """``(q0, q1, k0, k1)`` per packed sequence: its rows of q and of k/v (read on the host)."""
    return [(q0, q1, k0, k1) for (q0, q1), (k0, k1) in zip(itertools.pairwise(cu_seqlens_q.tolist()),
                                                           itertools.pairwise(cu_seqlens_k.tolist()), strict=True)]
