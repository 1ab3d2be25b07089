"""@triton.jit helpers every kernel family shares: the ones that differ between the interpreter and a GPU.

Launchers pass ``INTERPRETED=is_interpreted()``; ahead-of-time compiles pass False, so on a GPU both helpers
reduce to a single instruction.
"""

from __future__ import annotations

import triton
import triton.language as tl

# exp(x) = exp2(x · log2 e): the kernels' softmax runs in the exp2 domain (one MUFU.EX2 per element).
LOG2E = tl.constexpr(1.4426950408889634)


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


@triton.jit
def _mix32(x):
    # A 32-bit integer finaliser (lowbias32: two multiply-xorshift rounds): every input bit flips about half the
    # output bits, so consecutive counters give independent-looking draws.
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def dropout_keep(seed, rows, cols, dropout_p):
    """Counter-based dropout draws for a ``[len(rows), len(cols)]`` tile of a ``[R, C]`` grid: ``rows`` int64,
    ``cols`` int32 indices. The 64-bit row index is hashed with the 64-bit seed once per row, then each element
    costs one more hash of (row hash ^ column): one 32-bit word per element, where Philox needs four and spilled
    the attention backward. Keep iff the top 24 bits of the draw >= p·2^24."""
    seed64 = tl.cast(seed, tl.int64)
    # int64 -> uint32 casts keep the low word.
    k0 = tl.cast(seed64, tl.uint32)
    k1 = tl.cast(seed64 >> 32, tl.uint32)
    row_hash = _mix32(_mix32(rows.to(tl.uint32) ^ k0) ^ (rows >> 32).to(tl.uint32) ^ k1)
    draw = _mix32(row_hash[:, None] ^ cols.to(tl.uint32)[None, :])
    return (draw >> 8) >= tl.cast(dropout_p * 16777216.0, tl.uint32)


def _interpret_with_one_patch_per_launch() -> None:
    """Under the interpreter, `triton.language` patched once per launch, not at every helper call
    (kernels/interpreter.py)."""
    from .config import is_interpreted
    from .interpreter import skip_repeated_patching

    if is_interpreted():
        skip_repeated_patching()


# Last in the file: Triton keys each compiled kernel by its helpers' first lines too, so nothing above may move.
_interpret_with_one_patch_per_launch()
