"""CUDA C++ attention launchers (csrc/attention_fwd.cu, attention_bwd.cu): flash-style forward and a
deterministic backward; same contract as kernels/attention.py."""

from __future__ import annotations

import torch

from .. import _ext
from ..kernels.config import split_plan
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
    max_d = max_head_dim(q.dtype, q.device)
    if q.shape[-1] > max_d:
        return f"head dim {q.shape[-1]} with {q.dtype} (supported: 1..{max_d})"
    if v.shape[-1] != q.shape[-1]:
        return f"value head dim {v.shape[-1]} differs from the query/key head dim {q.shape[-1]}"
    return None


def _args(mod, q, k, v, mask, kpm, scale, is_causal, causal_offset, dropout_p, seed) -> dict:
    b, h, lq, d = q.shape
    return {
        "q": q.data_ptr(), "k": k.data_ptr(), "v": v.data_ptr(), "q_stride": list(q.stride()),
        "k_stride": list(k.stride()), "v_stride": list(v.stride()),
        "mask": ptr(mask), "mask_stride": [0] * 4 if mask is None else list(mask.stride()),
        "mask_kind": _ext.mask_kind(mod, mask, q.dtype),
        "kpm": ptr(kpm), "kpm_stride": [0, 0] if kpm is None else list(kpm.stride()),
        "B": b, "H": h, "Hkv": k.shape[1], "Lq": lq, "Lk": k.shape[2], "D": d, "scale": float(scale),
        "causal": bool(is_causal), "causal_offset": int(causal_offset), "dropout_p": float(dropout_p),
        "seed": ptr(seed), "dtype": _ext.dtype_code(mod, q.dtype),
        "out": 0, "row_max": 0, "inv_l": 0, "dout": 0, "do_stride": [0] * 4, "delta": 0, "dq": 0, "dk": 0, "dv": 0,
        "dmask": 0, "splits": 1, "split_len": 0, "o_part": 0, "m_part": 0, "l_part": 0,
    }


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      kpm: torch.Tensor | None, scale: float, is_causal: bool, causal_offset: int, dropout_p: float,
                      seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``[B, H, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` any strides; mask a ``[B, H, Lq, Lk]`` view (bool or float);
    kpm bool ``[B, Lk]``. Returns out (contiguous), the fp32 row max and reciprocal row sum ``[B, H, Lq]``."""
    mod = _ext.module_for(q.device)
    b, h, lq, d = q.shape
    out = torch.empty((b, h, lq, d), dtype=q.dtype, device=q.device)
    row_max = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    inv_l = torch.empty_like(row_max)
    args = _args(mod, q, k, v, mask, kpm, scale, is_causal, causal_offset, dropout_p, seed)
    args |= {"out": out.data_ptr(), "row_max": row_max.data_ptr(), "inv_l": inv_l.data_ptr()}
    if out.numel():
        # Split-KV when the plain grid would not fill the GPU (decoding): partials merged by a second kernel.
        block_m, block_n = mod.attention_forward_tile(args["dtype"], d)
        plan = split_plan(b, h, lq, k.shape[2], block_m, block_n, block_m, q.device)
        if plan.splits > 1:
            parts = [torch.empty((plan.splits, b * h * lq, *extra), dtype=torch.float32, device=q.device)
                     for extra in ((d,), (), ())]
            args |= {"splits": plan.splits, "split_len": plan.split_len,
                     **{name: t.data_ptr() for name, t in zip(("o_part", "m_part", "l_part"), parts, strict=True)}}
    mod.attention_forward(args, stream(q))
    return out, row_max, inv_l


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       row_max: torch.Tensor, inv_l: torch.Tensor, mask: torch.Tensor | None, kpm: torch.Tensor | None,
                       scale: float, is_causal: bool, causal_offset: int, dropout_p: float, seed: torch.Tensor | None,
                       mask_grad: bool = False,
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
    args = _args(mod, q, k, v, mask, kpm, scale, is_causal, causal_offset, dropout_p, seed)
    args |= {"out": out.data_ptr(), "row_max": row_max.data_ptr(), "inv_l": inv_l.data_ptr(),
             "dout": dout.data_ptr(), "do_stride": list(dout.stride()), "delta": delta.data_ptr(),
             "dq": dq.data_ptr(), "dk": dk.data_ptr(), "dv": dv.data_ptr(), "dmask": ptr(dmask)}
    mod.attention_backward(args, stream(q))
    return dq, dk, dv, dmask
