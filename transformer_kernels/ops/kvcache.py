"""`attention_with_kvcache`: a decoding or prefill step against a KV cache (flash-attn's ``flash_attn_with_kvcache``
contract, its layouts): the new keys/values appended into the cache in place, attention over each sequence's valid
prefix, the cache dense ``[B, L_cache, Hkv, D]`` or paged ``[num_blocks, block_size, Hkv, D]`` with a block table.

A decoding step (one query per sequence) on the triton backend reads a paged or dense cache in place through its
block table (`kernels/attention.py: attn_decode_paged_kernel`, the GQA group's heads in one program). Every other
call — several queries, the cuda or torch backend, a soft cap — gathers a paged cache into one contiguous copy and
attends through a ``[B, 1, Lq, Lk]`` mask of each sequence's valid keys and its bottom-right causal/window band
(the diagonal moves with each sequence's length, which one causal offset cannot say). Inference only (no gradient).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backends
from ..masks import band_mask
from ._checks import check_alibi_slopes, check_softcap, check_window, describe
from ._dispatch import call, custom_op
from ._sinks import lse_of
from .attention import FAMILY, _alibi_into_mask, attention

OP = "attention"  # the backend order of attention


@custom_op("transformer_kernels::paged_decode")
def _paged_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seqlens: Tensor, scale: float,
                  window_left: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    with backends.on_device(q):
        return backends.launchers(FAMILY, backend).paged_decode(q, k_cache, v_cache, block_table, seqlens, scale,
                                                                window_left)


@_paged_decode.register_fake
def _(q, k_cache, v_cache, block_table, seqlens, scale, window_left, backend):
    stats = q.shape[:-1]
    return q.new_empty(q.shape), q.new_empty(stats, dtype=torch.float32), q.new_empty(stats, dtype=torch.float32)


def _visible(lq: int, lk: int, seqlen_k: Tensor, causal: bool, window: tuple[int, int]) -> Tensor:
    """Bool ``[B, 1, Lq, Lk]``, True where query i sees key j: ``j < seqlen_k`` and the band around the bottom-right
    diagonal ``i + seqlen_k − Lq`` of each sequence (causal: right 0)."""
    lens = seqlen_k.reshape(-1, 1, 1, 1)
    band = band_mask(lq, lk, lens - lq, window[0], 0 if causal else window[1], seqlen_k.device)
    return band & (torch.arange(lk, device=seqlen_k.device) < lens)


def cache_lengths(cache_seqlens: int | Tensor | None, k_cache: Tensor, block_table: Tensor | None,
                  b: int) -> Tensor:
    """Each sequence's keys already in the cache, int32 ``[B]`` on the cache's device: ``cache_seqlens`` (an int or a
    tensor), or the whole cache (its capacity) when None."""
    if cache_seqlens is None:
        capacity = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
        return torch.full((b,), capacity, dtype=torch.int32, device=k_cache.device)
    if isinstance(cache_seqlens, int):
        return torch.full((b,), cache_seqlens, dtype=torch.int32, device=k_cache.device)
    return cache_seqlens.to(device=k_cache.device, dtype=torch.int32).reshape(b)


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_new: Tensor | None, v_new: Tensor | None,
           block_table: Tensor | None) -> None:
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor; got {describe(t) if isinstance(t, Tensor) else t!r}")
    if not q.dtype == k_cache.dtype == v_cache.dtype or not q.device == k_cache.device == v_cache.device:
        raise ValueError(f"q and the caches need one dtype and device; got {describe(q)}, {describe(k_cache)}, "
                         f"{describe(v_cache)}")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k_cache and v_cache must match but in the head dim; got {describe(k_cache)}, "
                         f"{describe(v_cache)}")
    if q.shape[-1] != k_cache.shape[-1] or q.shape[2] % k_cache.shape[2]:
        raise ValueError(f"q [B, Lq, H, D] needs the cache's D and a multiple of its Hkv heads; got {describe(q)}, "
                         f"{describe(k_cache)}")
    if (k_new is None) != (v_new is None):
        raise ValueError("attention_with_kvcache: pass both k_new and v_new, or neither")
    if block_table is not None:
        if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != q.shape[0]:
            raise ValueError(f"block_table must be int32 [B, max_blocks]; got {describe(block_table)}")
    elif k_cache.shape[0] < q.shape[0]:
        raise ValueError(f"the cache holds {k_cache.shape[0]} sequences, q {q.shape[0]}")


def attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_new: Tensor | None = None,
                           v_new: Tensor | None = None, cache_seqlens: int | Tensor | None = None,
                           block_table: Tensor | None = None, *, scale: float | None = None, is_causal: bool = False,
                           window: tuple[int, int] | None = None, softcap: float | None = None,
                           alibi_slopes: Tensor | None = None, return_lse: bool = False,
                           backend: str | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """q ``[B, Lq, H, D]``; k_cache/v_cache ``[B, L_cache, Hkv, D]``, or paged ``[num_blocks, block_size, Hkv, D]``
    with ``block_table`` int32 ``[B, max_blocks]`` (sequence b's key j in block ``block_table[b, j // block_size]``);
    optional k_new/v_new ``[B, L_new, Hkv, D]`` written into the cache in place at positions ``cache_seqlens[b] + i``
    (device index writes: no host sync; the cache must have room); ``cache_seqlens`` an int or int32 ``[B]`` (None:
    the whole cache). Sequence b attends over its first ``cache_seqlens[b] + L_new`` keys, causal and window aligned
    bottom-right (flash-attn's rule), ``softcap`` as in `attention`, ``alibi_slopes`` (``[H]`` or ``[B, H]``) as
    flash-attn's: −slope·|(cache_seqlens[b] + L_new − Lq + i) − j| for query i and key j, each sequence's queries
    sitting at its end. Returns ``[B, Lq, H, D]`` contiguous (and the
    fp32 ``[B, H, Lq]`` log-sum-exp with ``return_lse``)."""
    _check(q, k_cache, v_cache, k_new, v_new, block_table)
    left, right = (-1, -1) if window is None else check_window(window)
    check_softcap(softcap)
    b, lq, heads, d = q.shape
    check_alibi_slopes(alibi_slopes, b, heads, q.device)
    device = q.device
    paged = block_table is not None
    block = k_cache.shape[1]
    lens = cache_lengths(cache_seqlens, k_cache, block_table, b)
    new = 0
    if k_new is not None:
        new = k_new.shape[1]
        positions = lens[:, None].long() + torch.arange(new, device=device)  # [B, L_new]
        rows = torch.arange(b, device=device)[:, None]
        slot = (block_table[rows, positions // block].long(), positions % block) if paged else (rows, positions)
        with torch.no_grad():
            k_cache[slot] = k_new.to(k_cache.dtype)
            v_cache[slot] = v_new.to(v_cache.dtype)
    seqlens = lens + new
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    heads_first = q.transpose(1, 2)  # [B, H, Lq, D] view
    name = backends.resolve_for(OP, FAMILY, device, backend, heads_first, k_cache, v_cache)
    if lq == 1 and name == "triton" and not softcap and alibi_slopes is None and v_cache.shape[-1] == d:
        # One query at the end of its sequence: causal changes nothing and a window's right side sees past the keys.
        table = block_table if paged else torch.arange(b, dtype=torch.int32, device=device)[:, None]
        out, row_max, inv_l = call(_paged_decode, heads_first, k_cache, v_cache, table, seqlens, scale, left, name)
        out = out.transpose(1, 2).contiguous()
        return (out, lse_of(row_max, inv_l).detach()) if return_lse else out
    if paged:
        keys, values = (c[block_table.long()].flatten(1, 2) for c in (k_cache, v_cache))  # [B, blocks · block, Hkv, D]
    else:
        keys, values = k_cache[:b], v_cache[:b]
    mask = _visible(lq, keys.shape[1], seqlens, is_causal, (left, right))
    if alibi_slopes is not None:
        # The gathered keys run to the capacity, not to each sequence's end: the bias takes each sequence's diagonal
        # (its queries' positions) and the hidden keys stay −inf.
        mask = _alibi_into_mask(mask, alibi_slopes, lq, keys.shape[1], (seqlens - lq).view(b, 1, 1, 1))
    out = attention(heads_first, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=scale,
                    enable_gqa=q.shape[2] != keys.shape[2], return_lse=return_lse, softcap=softcap, backend=name)
    if return_lse:
        return out[0].transpose(1, 2).contiguous(), out[1]
    return out.transpose(1, 2).contiguous()
