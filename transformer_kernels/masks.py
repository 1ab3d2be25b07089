"""torch.nn's mask conventions turned into the functional ops' contract (used by the drop-in layers)."""

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
