"""Masks built for the functional ops: torch.nn's conventions turned into the ops' contract (used by the drop-in
layers), and the key band of causal masking and sliding windows as a bool mask (the torch backend, and the kernels
that take no window)."""

from __future__ import annotations

import torch
from torch import Tensor


def nn_masks_to_sdpa(attn_mask: Tensor | None, key_padding_mask: Tensor | None, b: int, h: int, lq: int, lk: int,
                     dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """torch.nn masks → the functional contract. attn_mask ``[Lq, Lk]`` or ``[B*H, Lq, Lk]`` (bool True = masked
    out, float added) becomes SDPA polarity broadcastable to ``[B, H, Lq, Lk]``; a bool key_padding_mask
    ``[B, Lk]`` (True = padding) is returned as is, a float one is folded into the additive mask."""
    mask = None
    if attn_mask is not None:
        mask = attn_mask.view(b, h, lq, lk) if attn_mask.dim() == 3 else attn_mask
        mask = ~mask if mask.dtype == torch.bool else mask.to(dtype)
    kpm = None
    if key_padding_mask is not None:
        if key_padding_mask.dtype == torch.bool:
            kpm = key_padding_mask
        else:
            add = key_padding_mask.to(dtype)[:, None, None, :]
            if mask is None:
                mask = add
            elif mask.dtype == torch.bool:
                mask = torch.zeros_like(add).masked_fill(~mask, float("-inf")) + add
            else:
                mask = mask + add
    return mask, kpm


def band_mask(lq: int, lk: int, offset: int | Tensor, left: int, right: int, device: torch.device) -> Tensor:
    """Bool ``[Lq, Lk]`` (or ``offset``'s batch dims in front), True where query i sees key j in the band
    ``i + offset − left <= j <= i + offset + right`` (−1: that side unbounded; causal is right 0). ``offset``: the
    diagonal, an int or a tensor ``[..., 1, 1]`` (a diagonal per sequence); built on the device, no host sync."""
    rel = torch.arange(lk, device=device) - torch.arange(lq, device=device)[:, None] - offset
    keep = rel >= -left if left >= 0 else torch.ones_like(rel, dtype=torch.bool)
    return keep & (rel <= right) if right >= 0 else keep


def alibi_bias(slopes: Tensor, lq: int, lk: int, offset: int | Tensor) -> Tensor:
    """ALiBi's bias (Press et al.; BLOOM, MPT), fp32 ``[H, Lq, Lk]`` from slopes ``[H]`` or ``[B, H, Lq, Lk]`` from
    ``[B, H]``: −slope·|i + offset − j| for query i and key j, ``offset`` the diagonal (0 top-left, Lk − Lq
    bottom-right: flash-attn's ``alibi_slopes`` rule), an int or a ``[B, 1, 1, 1]`` tensor (a diagonal per sequence:
    the result is ``[B, H, Lq, Lk]``). Built on the device from the shapes: no host sync."""
    dist = (torch.arange(lk, device=slopes.device) - torch.arange(lq, device=slopes.device)[:, None] - offset).abs()
    return -slopes.float()[..., None, None] * dist
