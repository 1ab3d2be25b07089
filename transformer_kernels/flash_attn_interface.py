"""flash-attn's functions on our kernels: code written against flash-attn switches with one import,

    from transformer_kernels.flash_attn_interface import flash_attn_func, flash_attn_with_kvcache

with flash-attn's argument names, defaults, layouts (``[B, L, H, D]``; packed ``[total, H, D]``) and semantics:
``causal`` aligned bottom-right, grouped-query attention when k/v have fewer heads, ``softmax_scale`` default
1/sqrt(D), rows that see no key give 0, the log-sum-exp ``[B, H, Lq]`` fp32. ``[B, L, H, D]`` tensors are read through
``transpose(1, 2)`` views (no layout copies); outputs are contiguous ``[B, Lq, H, D]`` as flash-attn's.

How each feature runs here: ``window_size`` is `ops.attention`'s ``window`` (in the CUDA kernels key tiles
outside every row's window are never loaded; the Triton kernels get it folded into the mask, dense, or packed where
`auto` sends it); ``flash_attn_with_kvcache`` applies rotary with `ops.rotary` and
is `ops.attention_with_kvcache`: k/v appended into the cache in place (index writes at each sequence's
``cache_seqlens``, device tensors: no host sync), a decoding step on triton reading the cache, paged or dense, in
place through the block table, anything else through a gathered copy and a mask of each sequence's valid keys;
``softcap`` caps the scores in the CUDA kernels (`attention`'s rule: `auto` picks cuda); ``alibi_slopes`` is
`attention`'s, `varlen_attention`'s and `attention_with_kvcache`'s (there, each sequence's queries sit at its end).
Refused by name (``NotImplementedError``) rather than ignored: ``return_attn_probs``, ``deterministic=True`` (our
attention backward is deterministic under ``torch.use_deterministic_algorithms(True)``), ``cache_batch_idx``,
``cache_leftpad``, ``block_table`` on the varlen functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .ops._checks import check_window
from .ops.kvcache import cache_lengths


def _refuse(alibi_slopes: Tensor | None = None, deterministic: bool = False, return_attn_probs: bool = False,
            **others: object) -> None:
    refused = {"alibi_slopes": alibi_slopes is not None, "deterministic": deterministic,
               "return_attn_probs": return_attn_probs, **{name: value is not None for name, value in others.items()}}
    for name, given in refused.items():
        if given:
            hint = (" (use torch.use_deterministic_algorithms(True): our backward is deterministic under it)"
                    if name == "deterministic" else "")
            raise NotImplementedError(f"transformer_kernels.flash_attn_interface does not support `{name}`{hint}")


def _heads_first(t: Tensor) -> Tensor:
    return t.transpose(1, 2)  # [B, L, H, D] seen as [B, H, L, D]


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None,
                    causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Tensor | None = None, deterministic: bool = False, return_attn_probs: bool = False,
                    *, backend: str | None = None) -> Tensor:
    """q ``[B, Lq, H, D]``, k/v ``[B, Lk, Hkv, D]`` → ``[B, Lq, H, D]`` (flash-attn's ``flash_attn_func``)."""
    _refuse(deterministic=deterministic, return_attn_probs=return_attn_probs)
    out = ops.attention(_heads_first(q), _heads_first(k), _heads_first(v), dropout_p=dropout_p, is_causal=causal,
                        scale=softmax_scale, enable_gqa=q.shape[2] != k.shape[2], causal_alignment="bottom_right",
                        softcap=softcap, window=check_window(window_size, "window_size"), alibi_slopes=alibi_slopes,
                        backend=backend)
    return out.transpose(1, 2).contiguous()


def flash_attn_qkvpacked_func(qkv: Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None,
                              causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                              alibi_slopes: Tensor | None = None, deterministic: bool = False,
                              return_attn_probs: bool = False, *, backend: str | None = None) -> Tensor:
    """qkv ``[B, L, 3, H, D]`` (views of it are read; the gradient lands in one ``[B, L, 3, H, D]`` tensor)."""
    q, k, v = qkv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, backend=backend)


def flash_attn_kvpacked_func(q: Tensor, kv: Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None,
                             causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: Tensor | None = None, deterministic: bool = False,
                             return_attn_probs: bool = False, *, backend: str | None = None) -> Tensor:
    """q ``[B, Lq, H, D]``, kv ``[B, Lk, 2, Hkv, D]``."""
    k, v = kv.unbind(2)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, backend=backend)


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0,
                           softmax_scale: float | None = None, causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           alibi_slopes: Tensor | None = None, deterministic: bool = False,
                           return_attn_probs: bool = False, block_table: Tensor | None = None, *,
                           backend: str | None = None) -> Tensor:
    """q ``[total_q, H, D]``, k/v ``[total_k, Hkv, D]``, cu_seqlens int32 ``[B + 1]`` → ``[total_q, H, D]``."""
    _refuse(deterministic=deterministic, return_attn_probs=return_attn_probs, block_table=block_table)
    return ops.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=dropout_p,
                                is_causal=causal, scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1],
                                causal_alignment="bottom_right", softcap=softcap,
                                window=check_window(window_size, "window_size"), alibi_slopes=alibi_slopes,
                                backend=backend)


def flash_attn_varlen_qkvpacked_func(qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
                                     softmax_scale: float | None = None, causal: bool = False,
                                     window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                                     alibi_slopes: Tensor | None = None, deterministic: bool = False,
                                     return_attn_probs: bool = False, *, backend: str | None = None) -> Tensor:
    """qkv ``[total, 3, H, D]``."""
    q, k, v = qkv.unbind(1)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                                  backend=backend)


def _full_table(half: Tensor, interleaved: bool) -> Tensor:
    """flash-attn's ``[positions, R/2]`` cos/sin as the ``[positions, R]`` table `ops.rotary` reads (the value of
    each pair at both of its elements)."""
    return half.repeat_interleave(2, dim=-1) if interleaved else torch.cat((half, half), dim=-1)


def _rotate_new(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, start: Tensor, along: bool,
                backend: str | None) -> tuple[Tensor, Tensor]:
    """q ``[B, Lq, H, D]`` and the new keys ``[B, L_new, Hkv, D]`` rotated as flash-attn does: k at ``start + i``
    (``start``: ``cache_seqlens`` as ``[B, 1]``); q at the same positions when ``along`` (causal or windowed), else
    every query at ``start``. One launch for both where their positions coincide (a decoding step: one query, one
    key), else one each (the other operand an empty tensor of no heads)."""
    cos, sin = (_full_table(t, interleaved) for t in (cos, sin))
    lq, new = q.shape[1], k.shape[1]
    k_positions = start + torch.arange(new, device=q.device)
    if lq == new and (along or lq == 1):
        q, k = ops.rotary(_heads_first(q), _heads_first(k), cos, sin, k_positions, interleaved, backend=backend)
        return q.transpose(1, 2), k.transpose(1, 2)
    q_positions = start + (torch.arange(lq, device=q.device) if along else torch.zeros(lq, dtype=start.dtype,
                                                                                      device=q.device))
    rotated = []
    for t, positions in ((q, q_positions), (k, k_positions)):
        none = t.new_empty((t.shape[0], t.shape[1], 0, t.shape[-1]))
        rotated.append(ops.rotary(_heads_first(t), _heads_first(none), cos, sin, positions, interleaved,
                                  backend=backend)[0].transpose(1, 2))
    return rotated[0], rotated[1]


def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor | None = None,
                            v: Tensor | None = None, rotary_cos: Tensor | None = None, rotary_sin: Tensor | None = None,
                            cache_seqlens: int | Tensor | None = None, cache_batch_idx: Tensor | None = None,
                            cache_leftpad: Tensor | None = None, block_table: Tensor | None = None,
                            softmax_scale: float | None = None, causal: bool = False,
                            window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: Tensor | None = None, num_splits: int = 0,
                            return_softmax_lse: bool = False, *, backend: str | None = None
                            ) -> Tensor | tuple[Tensor, Tensor]:
    """flash-attn's decoding call: q ``[B, Lq, H, D]``; k_cache/v_cache ``[B, L_cache, Hkv, D]``, or paged
    ``[num_blocks, block_size, Hkv, D]`` with ``block_table`` int32 ``[B, max_blocks]``; optional new k/v
    ``[B, L_new, Hkv, D]`` written into the cache in place at positions ``cache_seqlens[b] + i`` (the cache must have
    room); ``cache_seqlens`` an int or int32 ``[B]`` (None: the whole cache). With ``rotary_cos/sin``
    (``[positions, R/2]``) k is rotated at those positions, and q at the same ones when causal or windowed, else all at
    ``cache_seqlens``. ``num_splits`` is a scheduling hint (ours plans its own split-KV). Returns ``[B, Lq, H, D]``
    (and the fp32 ``[B, H, Lq]`` log-sum-exp with ``return_softmax_lse``). Inference only, as flash-attn's."""
    _refuse(cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad)
    window = check_window(window_size, "window_size")
    if (k is None) != (v is None):
        raise ValueError("flash_attn_with_kvcache: pass both k and v, or neither")
    if rotary_cos is not None and k is None:
        raise ValueError("flash_attn_with_kvcache: rotary_cos/sin apply to the new k and v: pass them too")
    if rotary_cos is not None:
        start = cache_lengths(cache_seqlens, k_cache, block_table, q.shape[0])[:, None].long()
        q, k = _rotate_new(q, k, rotary_cos, rotary_sin, rotary_interleaved, start, along=causal or window != (-1, -1),
                           backend=backend)
    return ops.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, block_table, scale=softmax_scale,
                                      is_causal=causal, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                                      return_lse=return_softmax_lse, backend=backend)


__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]
