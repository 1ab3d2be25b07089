"""Attention sinks (gpt-oss): a learnable logit per head that joins every row's softmax denominator and contributes
no value, so a row may put weight "nowhere".

Applied to the kernels' output and row statistics, so both kernel backends and every attention path (dense, packed,
split-KV decoding) take it without a kernel change. With the kernels' statistics m (row max) and 1/l (l = Σ exp(s − m)
over the visible keys), the row's log-sum-exp is lse = m + log l and the sink's softmax share is
sigmoid(sink − lse); every key's probability, and so the output, scales by w = sigmoid(lse − sink):

    out' = w · out,    1/l' = w / l    (the backward kernels recompute P' = exp(s − m) / l' from the second).

The backward is the ordinary one on out' and 1/l' (the sink is a key whose value is 0: dP_sink = 0, so
delta = rowsum(dO · O') is unchanged in form), and the sink's own gradient is dsink = −Σ_rows P_sink · delta.
The cost is one elementwise pass over the output forward and one over dO and O backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import describe


def check_sinks(sinks: Tensor | None, heads: int, device: torch.device) -> None:
    """``sinks``: a float tensor ``[H]`` on q's device (None: no sinks)."""
    if sinks is None:
        return
    if not isinstance(sinks, Tensor) or not sinks.is_floating_point():
        raise TypeError(f"sinks must be a float tensor [H]; got {describe(sinks) if isinstance(sinks, Tensor) else sinks!r}")
    if sinks.shape != (heads,):
        raise ValueError(f"sinks must have shape [H] = ({heads},); got {describe(sinks)}")
    if sinks.device != device:
        raise ValueError(f"sinks is on {sinks.device} but q is on {device}")


def _rows(sinks: Tensor, stats: Tensor) -> Tensor:
    # The heads are dim 1 of both statistics layouts ([B, H, Lq] dense, [total_q, H] packed).
    return sinks.float().view(1, -1, *([1] * (stats.dim() - 2)))


def lse_of(row_max: Tensor, inv_l: Tensor) -> Tensor:
    """The log-sum-exp of a row's visible scores from the kernels' statistics: the max m and 1/l, where
    l = Σ exp(s − m) ≥ 1 when anything is visible and the kernels store 1/l = 0 when nothing is (then −inf)."""
    return torch.where(inv_l > 0, row_max - inv_l.log(), float("-inf"))


def apply_sinks(out: Tensor, row_max: Tensor, inv_l: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """(out', 1/l') from the kernels' output ``[..., D]`` and statistics ``[...]`` (``[B, H, Lq]`` or
    ``[total_q, H]``) and the sinks ``[H]``. A row that sees nothing keeps zeros."""
    w = torch.sigmoid(lse_of(row_max, inv_l) - _rows(sinks, row_max))
    return (out.float() * w.unsqueeze(-1)).to(out.dtype), inv_l * w


def sinks_grad(grad: Tensor, out: Tensor, row_max: Tensor, inv_l: Tensor, sinks: Tensor) -> Tensor:
    """dsink ``[H]`` (fp32) from dO and O' ``[..., D]`` and the statistics after `apply_sinks`: −Σ P_sink · delta over
    every row of each head (a row that sees nothing has O' = 0, so delta = 0 there)."""
    lse = lse_of(row_max, inv_l)
    p_sink = torch.where(torch.isfinite(lse), (_rows(sinks, lse) - lse).exp(), 0.0)
    delta = (grad.float() * out.float()).sum(-1)
    return -(p_sink * delta).sum([i for i in range(delta.dim()) if i != 1])
