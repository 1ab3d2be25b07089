"""CUDA C++ attention launchers (csrc/attention_fwd.cu, attention_bwd.cu): flash-style forward and a
deterministic backward; same contract as kernels/attention.py."""

from __future__ import annotations

import torch

from .. import _ext
from ..kernels.config import PLAN_CACHES, split_plan
from ._args import ptr, stream, unsupported_dtype


def max_head_dim(dtype: torch.dtype, device: torch.device) -> int:
    """The widest head dim the kernels are instantiated for (csrc/attention.h), 0 for a dtype they lack."""
    mod = _ext.module_for(device)
    if str(dtype).removeprefix("torch.") not in mod.dtype_codes:
        return 0
    return mod.attention_max_head_dim["float" if dtype == torch.float32 else "half"]


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why these kernels cannot take the inputs (None when they can)."""
    why = unsupported_dtype(q)
    if why:
        return why
    # A value head dim other than q's runs at the wider of the two (the ops zero-pad the narrower operands).
    max_d, width = max_head_dim(q.dtype, q.device), max(q.shape[-1], v.shape[-1])
    if width > max_d:
        return f"head dim {width} with {q.dtype} (supported: 1..{max_d})"
    return None


# These kernels cap scores (Gemma 2's softcap, `AttentionArgs::softcap`); `ops.attention.capable_backend` reads this.
SOFTCAP = True
# and skip the key tiles outside a sliding window (`_key_band`); `ops.attention` reads this.
WINDOW = True
# and add ALiBi's bias per score from the slopes (`AttentionArgs::alibi`), no bias tensor; `ops.attention` reads this.
ALIBI = True


def _key_band(is_causal: bool, window: tuple[int, int] | None, lq: int, lk: int) -> tuple[bool, int, int]:
    """How these kernels take causal masking and a sliding window ``(left, right)`` (−1 = unbounded):
    ``(band, right, left)``; with ``band`` query i (diagonal i + offset) sees keys
    ``i + offset − left <= j <= i + offset + right`` only, and tiles outside that band are never visited. Causal caps
    ``right`` at 0 (flash-attn's rule); an unbounded side becomes ``lq + lk + 1`` (past every key, and the kernels'
    int32 index arithmetic stays in range). ``lq``/``lk`` are the lengths (the maxima when packed)."""
    left, right = (-1, -1) if window is None else window
    if is_causal:
        right = 0
    if left < 0 and right < 0:
        return False, 0, 0
    unbounded = lq + lk + 1
    return True, unbounded if right < 0 else min(right, unbounded), unbounded if left < 0 else min(left, unbounded)


def _band_span(band: tuple[bool, int, int], block_m: int, block_n: int, lk: int) -> int:
    """The most keys one ``block_m``-row query tile visits under a `_key_band` (all ``lk`` without a band): what the
    split-KV forward splits, each program's chunks starting at its own tile's first visited key."""
    on, right, left = band
    return min(lk, left + right + block_m + block_n) if on else lk


def _args(mod, q, k, v, mask, kpm, scale, band: tuple[bool, int, int], causal_offset, dropout_p, seed,
          softcap: float = 0.0, alibi: torch.Tensor | None = None) -> dict:
    """The bindings' argument block; ``band`` is `_key_band`'s (causal and window); ``alibi`` fp32 slopes ``[B, H]``
    (any strides, a broadcast batch dim stride 0)."""
    b, h, lq, d = q.shape
    return {
        "q": q.data_ptr(), "k": k.data_ptr(), "v": v.data_ptr(), "q_stride": list(q.stride()),
        "k_stride": list(k.stride()), "v_stride": list(v.stride()),
        "mask": ptr(mask), "mask_stride": [0] * 4 if mask is None else list(mask.stride()),
        "mask_kind": _ext.mask_kind(mod, mask, q.dtype),
        "kpm": ptr(kpm), "kpm_stride": [0, 0] if kpm is None else list(kpm.stride()),
        "B": b, "H": h, "Hkv": k.shape[1], "Lq": lq, "Lk": k.shape[2], "D": d, "scale": float(scale),
        "causal": band[0], "causal_offset": int(causal_offset), "window_right": band[1], "window_left": band[2],
        "dropout_p": float(dropout_p),
        "softcap": float(softcap),
        "alibi": ptr(alibi), "alibi_stride": [0, 0] if alibi is None else list(alibi.stride()),
        "seed": ptr(seed), "dtype": _ext.dtype_code(mod, q.dtype),
        "out": 0, "row_max": 0, "inv_l": 0, "dout": 0, "do_stride": [0] * 4, "delta": 0, "dq": 0, "dk": 0, "dv": 0,
        "dmask": 0, "splits": 1, "split_len": 0, "o_part": 0, "m_part": 0, "l_part": 0,
        "cu_q": 0, "cu_k": 0, "total_q": 0, "total_k": 0, "smem_per_sm": 0,
    }


def _as_dense(t: torch.Tensor) -> torch.Tensor:
    # A packed [total, heads, D] tensor as the [1, heads, total, D] view whose strides the kernels read.
    return t.permute(1, 0, 2).unsqueeze(0)


def _packed_args(mod, q, k, v, cu_q, cu_k, max_q, max_k, scale, is_causal, bottom_right, dropout_p, seed,
                 softcap: float, window: tuple[int, int] | None, alibi: torch.Tensor | None = None) -> dict:
    # csrc/attention.h's packed form: B sequences, the longest lengths, batch strides 0, causal_offset a flag (ALiBi's
    # diagonal too: each sequence's own); alibi's batch index is the sequence's.
    args = _args(mod, _as_dense(q), _as_dense(k), _as_dense(v), None, None, scale,
                 _key_band(is_causal, window, max_q, max_k), int(bottom_right), dropout_p, seed, softcap, alibi)
    for name in ("q_stride", "k_stride", "v_stride"):
        args[name][0] = 0
    return args | {"B": cu_q.numel() - 1, "Lq": max_q, "Lk": max_k, "cu_q": cu_q.data_ptr(), "cu_k": cu_k.data_ptr(),
                   "total_q": q.shape[0], "total_k": k.shape[0]}


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      kpm: torch.Tensor | None, scale: float, is_causal: bool, causal_offset: int, dropout_p: float,
                      seed: torch.Tensor | None, softcap: float = 0.0, window: tuple[int, int] | None = None,
                      alibi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``[B, H, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` any strides; mask a ``[B, H, Lq, Lk]`` view (bool or float);
    kpm bool ``[B, Lk]``; softcap > 0 caps the scaled scores; window as `_key_band`; alibi fp32 slopes ``[B, H]``
    (ALiBi's bias −slope·|i + causal_offset − j|). Returns out (contiguous), the fp32 row max and reciprocal row sum
    ``[B, H, Lq]``."""
    b, h, lq, d = q.shape
    out = torch.empty((b, h, lq, d), dtype=q.dtype, device=q.device)
    row_max = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    inv_l = torch.empty_like(row_max)
    # The module is looked up per call and keys the plan: tests swap in other builds of it (sanitizers, mutants).
    mod = _ext.module_for(q.device)
    key = (mod, q.shape, q.stride(), k.shape, k.stride(), v.stride(), q.dtype, q.device,
           None if mask is None else (mask.dtype, mask.stride()), None if kpm is None else kpm.stride(), scale,
           is_causal, causal_offset, dropout_p, softcap, window, None if alibi is None else alibi.stride())
    found = _FWD_PLANS.get(key)
    if found is None:
        band = _key_band(is_causal, window, lq, k.shape[2])
        found = _FWD_PLANS[key] = _forward_plan(mod, q, k, v, mask, kpm, scale, band, causal_offset, dropout_p, softcap,
                                                alibi)
        if len(_FWD_PLANS) > _FWD_PLANS_MAX:
            _FWD_PLANS.clear()
    fixed, splits = found
    args = {**fixed, "q": q.data_ptr(), "k": k.data_ptr(), "v": v.data_ptr(), "mask": ptr(mask), "kpm": ptr(kpm),
            "seed": ptr(seed), "alibi": ptr(alibi), "out": out.data_ptr(), "row_max": row_max.data_ptr(),
            "inv_l": inv_l.data_ptr()}
    parts = []  # alive until the launch is queued (the caching allocator then orders reuse on the stream)
    if splits > 1:
        for name, extra in (("o_part", (d,)), ("m_part", ()), ("l_part", ())):
            parts.append(torch.empty((splits, b * h * lq, *extra), dtype=torch.float32, device=q.device))
            args[name] = parts[-1].data_ptr()
    mod.attention_forward(args, stream(q))
    return out, row_max, inv_l


# Forward launches by signature (shapes, strides, dtypes, device, mask layout, scalars): the bindings' argument
# block without its pointers, and the split-KV decision; a repeated call fills in the pointers only.
_FWD_PLANS: dict[tuple, tuple] = {}
_FWD_PLANS_MAX = 1024
PLAN_CACHES.append(_FWD_PLANS)


def _forward_plan(mod, q, k, v, mask, kpm, scale, band, causal_offset, dropout_p, softcap, alibi) -> tuple:
    """(the forward's arguments to ``mod`` but the pointers, the number of KV splits)."""
    b, h, lq, d = q.shape
    args = _args(mod, q, k, v, mask, kpm, scale, band, causal_offset, dropout_p, None, softcap, alibi)
    args["smem_per_sm"] = _ext.smem_per_sm(q.device)  # the forward's key tile follows it (csrc: attention_forward_narrow)
    splits = 1
    if b * h * lq * d:
        # Split-KV when the plain grid would not fill the GPU (decoding): partials merged by a second kernel.
        block_m, block_n = mod.attention_forward_tile(args["dtype"], d, args["smem_per_sm"])
        plan = split_plan(b, h, lq, _band_span(band, block_m, block_n, k.shape[2]), block_m, block_n, block_m, q.device)
        if plan.splits > 1:
            splits = plan.splits
            args |= {"splits": plan.splits, "split_len": plan.split_len}
    return args, splits


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       row_max: torch.Tensor, inv_l: torch.Tensor, mask: torch.Tensor | None, kpm: torch.Tensor | None,
                       scale: float, is_causal: bool, causal_offset: int, dropout_p: float, seed: torch.Tensor | None,
                       mask_grad: bool = False, softcap: float = 0.0, window: tuple[int, int] | None = None,
                       alibi: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of `attention_forward` for ``dout`` (any strides, e.g. expanded); contiguous dq, dk, dv and, with
    ``mask_grad``, the float mask's gradient dS as fp32 ``[B, H, Lq, Lk]`` (None without)."""
    mod = _ext.module_for(q.device)
    b, h, lq, d = q.shape
    # The kernels write every gradient element, except when there is nothing to attend (no queries, keys or head
    # dim: csrc/attention_bwd.cu returns early), where the gradients are zeros.
    alloc = torch.zeros if b * h * d == 0 or lq == 0 or k.shape[2] == 0 else torch.empty
    dq, dk, dv = (alloc(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    dmask = alloc((b, h, lq, k.shape[2]), dtype=torch.float32, device=q.device) if mask_grad else None
    delta = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    out = out.contiguous()
    args = _args(mod, q, k, v, mask, kpm, scale, _key_band(is_causal, window, lq, k.shape[2]), causal_offset, dropout_p,
                 seed, softcap, alibi)
    args |= {"out": out.data_ptr(), "row_max": row_max.data_ptr(), "inv_l": inv_l.data_ptr(),
             "dout": dout.data_ptr(), "do_stride": list(dout.stride()), "delta": delta.data_ptr(),
             "dq": dq.data_ptr(), "dk": dk.data_ptr(), "dv": dv.data_ptr(), "dmask": ptr(dmask),
             "smem_per_sm": _ext.smem_per_sm(q.device)}  # the backward's tiles follow it (attention_backward_narrow)
    mod.attention_backward(args, stream(q))
    return dq, dk, dv, dmask


def varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                   max_q: int, max_k: int, scale: float, is_causal: bool, bottom_right: bool, dropout_p: float,
                   seed: torch.Tensor | None, softcap: float = 0.0, window: tuple[int, int] | None = None,
                   alibi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed sequences; the contract of kernels/attention.py:varlen_forward, and alibi fp32 ``[B, H]``."""
    mod = _ext.module_for(q.device)
    total_q, h, d = q.shape
    out = torch.empty((total_q, h, d), dtype=q.dtype, device=q.device)
    row_max = torch.empty((total_q, h), dtype=torch.float32, device=q.device)
    inv_l = torch.empty_like(row_max)
    if out.numel() and cu_q.numel() > 1:
        args = _packed_args(mod, q, k, v, cu_q, cu_k, max_q, max_k, scale, is_causal, bottom_right, dropout_p, seed,
                            softcap, window, alibi)
        args |= {"out": out.data_ptr(), "row_max": row_max.data_ptr(), "inv_l": inv_l.data_ptr(),
                 "smem_per_sm": _ext.smem_per_sm(q.device)}
        mod.attention_forward(args, stream(q))
    return out, row_max, inv_l


def varlen_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    row_max: torch.Tensor, inv_l: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int,
                    max_k: int, scale: float, is_causal: bool, bottom_right: bool, dropout_p: float,
                    seed: torch.Tensor | None, softcap: float = 0.0, window: tuple[int, int] | None = None,
                    alibi: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `varlen_forward`; the contract of kernels/attention.py:varlen_backward."""
    mod = _ext.module_for(q.device)
    # Every row belongs to one sequence and the passes write each row of theirs; with nothing to attend the
    # kernels do not run and the gradients are zeros.
    nothing = q.numel() == 0 or k.shape[0] == 0 or cu_q.numel() < 2 or max_q == 0 or max_k == 0
    alloc = torch.zeros if nothing else torch.empty
    dq, dk, dv = (alloc(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if nothing:
        return dq, dk, dv
    delta = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    out = out.contiguous()
    args = _packed_args(mod, q, k, v, cu_q, cu_k, max_q, max_k, scale, is_causal, bottom_right, dropout_p, seed,
                        softcap, window, alibi)
    do_stride = list(_as_dense(dout).stride())
    do_stride[0] = 0
    args |= {"out": out.data_ptr(), "row_max": row_max.data_ptr(), "inv_l": inv_l.data_ptr(),
             "dout": dout.data_ptr(), "do_stride": do_stride, "delta": delta.data_ptr(),
             "dq": dq.data_ptr(), "dk": dk.data_ptr(), "dv": dv.data_ptr(), "smem_per_sm": _ext.smem_per_sm(q.device)}
    mod.attention_backward(args, stream(q))
    return dq, dk, dv
