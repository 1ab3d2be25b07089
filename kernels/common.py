"""@triton.jit helpers every kernel family shares: the ones that differ between the interpreter and a GPU.

Launchers pass ``INTERPRETED=is_interpreted()``; ahead-of-time compiles pass False, so on a GPU both helpers
reduce to a single instruction.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def cast_out(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` to nearest even, as the GPU's cvt.rn does. The interpreter truncates
    fp32 → bf16 (its numpy cast drops the low 16 bits, up to 1 ulp off), so there the rounding is done on
    the bit pattern first: add half an ulp (minus one when the kept lsb is 0, for ties-to-even), then
    clear the low half. NaN stays NaN and overflow goes to Inf, as on the GPU."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def mma(a, b, acc, INTERPRETED: tl.constexpr):
    """acc + a @ b on tensor cores. fp32 operands run as tf32x3 (three tf32 products, fp32 accuracy; plain
    tf32 would lose 13 mantissa bits). The interpreter's bf16 tl.dot multiplies raw bit patterns, so there the
    operands are upcast to fp32 (exact: bf16/fp16 → fp32 loses nothing)."""
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    return tl.dot(a, b, acc)
