"""Cross-entropy over rows of logits, in Triton: the loss of each row and, in place of the logits, their gradient.

The fused linear + cross-entropy (ops/cross_entropy.py) hands this kernel one chunk of logits at a time, so the
full ``[tokens, vocab]`` logits never exist. One program per row, two passes over it in BLOCK columns:
1. online max and sum of exp (the running-max softmax, exact for any vocabulary), the sum of the logits (label
   smoothing's uniform term) and the target's logit; then ``lse = m + log(s)`` and
   ``loss = lse − (1 − ε)·z_t − ε·mean(z) + λ·lse²`` (λ: the z-loss, PaLM's penalty on the log-partition);
2. (with the gradient) ``dz = ((1 + 2λ·lse)·softmax(z) − (1 − ε)·onehot(t) − ε / V) · scale`` written over the logits, times
   ``1 − tanh²`` of the softcap when there is one (``z = c·tanh(raw / c)``, Gemma 2's final logit softcap).
An ignored row (target == ignore_index) has loss 0 and gradient 0 whatever its scale (a mean over no rows scales by
1/0). A target outside [0, V) that is not ignored gives a NaN loss instead of reading out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import cast_out
from .config import TRITON_DTYPE_NAMES, AotVariant, aot_signature, is_interpreted, unsupported_dtype

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Columns per step: 4096 fp32 values over 8 warps is 16 registers per thread for the tile (a 128k vocabulary in 32
# steps); vocabularies up to 1024 take one 1024-wide step.
BLOCKS = (1024, 4096)
_WARPS = 8


@triton.jit
def _capped(z, softcap, HAS_SOFTCAP: tl.constexpr):
    # c·tanh(z / c), tanh(u) = 2·sigmoid(2u) − 1 (Triton has no portable tanh that the interpreter also runs).
    if HAS_SOFTCAP:
        z = softcap * (2.0 * tl.sigmoid(2.0 * z / softcap) - 1.0)
    return z


@triton.jit
def cross_entropy_rows_kernel(
    logits_ptr, target_ptr, scale_ptr, loss_ptr, lse_ptr, n_cols, stride_row, stride_scale, ignore_index,
    label_smoothing, softcap, z_loss, HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(target_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = tl.full((), -float("inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    z_sum = tl.zeros((), tl.float32)
    z_target = tl.zeros((), tl.float32)
    for start in range(0, n_cols, BLOCK):
        inside = start + cols < n_cols
        z = _capped(tl.load(base + start + cols, mask=inside, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        z_sum += tl.sum(tl.where(inside, z, 0.0))
        z_target += tl.sum(tl.where(start + cols == target, z, 0.0))
        z = tl.where(inside, z, -float("inf"))
        m_new = tl.maximum(m, tl.max(z))
        # A tile of -inf logits so far (a masked vocabulary) keeps the sums at 0 instead of exp(-inf + inf) = NaN.
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe))
        m = m_new
    lse = m + tl.log(s)
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < n_cols)
    loss = lse - (1.0 - label_smoothing) * z_target - label_smoothing * (z_sum / n_cols) + z_loss * lse * lse
    loss = tl.where(ignored, 0.0, tl.where(in_range, loss, float("nan")))
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    if WRITE_GRAD:
        # where, not a product: the scale of a mean over no rows is inf and an ignored row's gradient is 0.
        scale = tl.where(ignored, 0.0, tl.load(scale_ptr + row * stride_scale))
        uniform = label_smoothing / n_cols
        p_weight = 1.0 + 2.0 * z_loss * lse
        for start in range(0, n_cols, BLOCK):
            inside = start + cols < n_cols
            raw = tl.load(base + start + cols, mask=inside, other=0.0).to(tl.float32)
            z = _capped(raw, softcap, HAS_SOFTCAP)
            dz = p_weight * tl.exp(z - lse) - uniform - tl.where(start + cols == target, 1.0 - label_smoothing, 0.0)
            if HAS_SOFTCAP:
                t = z / softcap
                dz = dz * (1.0 - t * t)
            tl.store(base + start + cols, cast_out(dz * scale, logits_ptr.dtype.element_ty, INTERPRETED), mask=inside)


# ---- launcher ---------------------------------------------------------------------------------------------------


def unsupported(x: torch.Tensor) -> str | None:
    """Why the kernel cannot take logits of ``x``'s dtype (x: the op's input; the logits share its dtype)."""
    return unsupported_dtype(x, SUPPORTED_DTYPES)


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | None, loss: torch.Tensor,
                       lse: torch.Tensor, ignore_index: int, label_smoothing: float, softcap: float | None,
                       z_loss: float) -> None:
    """logits ``[C, V]`` (unit last stride), target int64 ``[C]``; writes loss and lse (fp32 ``[C]``). With
    ``scale`` (fp32, ``[C]`` or ``[1]`` for one scale for every row) the logits are overwritten with the loss's
    gradient times the row's scale."""
    rows, n = logits.shape
    if rows == 0:
        return
    cross_entropy_rows_kernel[(rows,)](
        logits, target, loss if scale is None else scale, loss, lse, n, logits.stride(0),
        0 if scale is None or scale.numel() == 1 else 1, ignore_index, label_smoothing, softcap or 1.0, z_loss,
        HAS_SOFTCAP=softcap is not None, WRITE_GRAD=scale is not None, BLOCK=BLOCKS[0] if n <= BLOCKS[0] else BLOCKS[1],
        INTERPRETED=is_interpreted(), num_warps=_WARPS)


def aot_variants() -> list[AotVariant]:
    """Both tiles for each dtype, with and without the gradient and the softcap."""
    out = []
    for dtype in SUPPORTED_DTYPES:
        dt = TRITON_DTYPE_NAMES[dtype]
        sig = aot_signature(cross_entropy_rows_kernel, {"*_ptr": "*fp32", "logits_ptr": f"*{dt}", "target_ptr": "*i64",
                                                        "stride_row": "i64", "ignore_index": "i64",
                                                        "label_smoothing": "fp32", "softcap": "fp32",
                                                        "z_loss": "fp32"})
        for block in BLOCKS:
            for grad in (False, True):
                for cap in (False, True):
                    consts = {"HAS_SOFTCAP": cap, "WRITE_GRAD": grad, "BLOCK": block, "INTERPRETED": False}
                    label = f"{dt} BLOCK={block} {'grad' if grad else 'loss'}{' softcap' if cap else ''}"
                    out.append(AotVariant("cross_entropy_rows", cross_entropy_rows_kernel, sig, consts, _WARPS, label,
                                          aligned=("logits_ptr",)))
    return out
