"""Fused scaled-dot-product attention in Triton: FlashAttention-2 forward and backward.

Forward: one program per (query tile, batch·head), folded into grid x so any B·H fits (or, when that grid would not
fill the GPU, per key split too: `attn_fwd_split_kernel` + `attn_fwd_combine_kernel`). The query tile stays
in registers while key/value tiles stream past it; the softmax is online (running max and sum, rescaling the
accumulator) in fp32, in the exp2 domain: the scale folded into one FMA per score, except under a float mask,
whose scores stay in natural units until after the max is subtracted (see `_score_tile`), so rows whose scores
all sit near -6e4 keep full precision. The key loop runs in two stages: interior tiles (every key exists and,
causal, every query of the tile may see it: no visibility test without a mask or padding), then the edge tiles
(the last partial tile, the diagonal); tiles above the diagonal are never visited. The row max and the
reciprocal row sum are saved for the backward pass.

Backward: a preprocess computes delta = rowsum(dO·O) and each row's log2 normaliser; one program per key tile
accumulates dK and dV over every query tile of every query head in its GQA group (and dQ with atomics, or a separate
pass per query tile: `_backward_passes`). Only for a float mask that requires grad a last pass writes its gradient dS.

Masks (read through their strides, never expanded): a bool or float `attn_mask` viewed as [B, H, Lq, Lk]
(stride 0 on broadcast dims), a `[B, Lk]` key-padding mask (True = padding), and causal with an offset
(key j visible to query i iff j <= i + offset). A key no query of a tile may see is zeroed in K/V before it
reaches a dot product, so NaN or Inf in padded positions cannot leak; fully masked rows give zeros.

Dropout: `common.dropout_keep` on row (b·H + h)·Lq + i and column j, regenerated identically in backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._layout import unit_last_stride
from .common import LOG2E, cast_out, dropout_keep, mma
from .config import (
    MASK_ADD,
    MASK_NONE,
    PLAN_CACHES,
    TRITON_DTYPE_NAMES,
    AotVariant,
    Autotuned,
    aot_signature,
    is_interpreted,
    length_class,
    mask_args,
    next_power_of_2,
    spans_past_int32,
    split_plan,
    unsupported_dtype,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Largest head dim per dtype; every pass has a spill-free tile for each up to it on sm_80 and sm_90.
MAX_HEAD_DIM = {torch.float16: 256, torch.bfloat16: 256, torch.float32: 256}
# fp32 products run as tf32x3 on tensor cores up to this head-dim block and as ieee FMA products above it: tf32x3
# holds a high and a low tf32 copy of each operand, and with masks and dropout no fp32 tile above D = 64 compiled
# without spills; FMA products hold each operand once (about 1/3 of tf32x3's throughput, at least its accuracy).
FP32_TENSOR_CORE_MAX_D = tl.constexpr(64)
MIN_BLOCK_D = 16  # tl.dot needs every dimension >= 16
FLOAT_MASK = tl.constexpr(MASK_ADD)  # the mask kind of the mask-gradient pass, readable inside @triton.jit
HEAD_DIM_BLOCKS = (16, 32, 64, 128, 256)


@triton.jit
def _dot(a, b, acc, INTERPRETED: tl.constexpr):
    """acc + a @ b (`mma`), fp32 above FP32_TENSOR_CORE_MAX_D as ieee FMA products. Every product here has the
    head dim as its inner dim (q·kᵀ, do·vᵀ) or its output's columns (p·v, pᵀ·do, dsᵀ·q, ds·k), and no fp32 tile
    has another dim above 64, so the wider of a's columns and b's columns is the head-dim block."""
    wide = a.shape[1] > FP32_TENSOR_CORE_MAX_D or b.shape[1] > FP32_TENSOR_CORE_MAX_D
    if a.dtype == tl.float32 and wide and not INTERPRETED:
        return tl.dot(a, b, acc, input_precision="ieee")
    return mma(a, b, acc, INTERPRETED)


@triton.jit
def _keep(seed, bh, first, h, num_heads, seqlen_q, offs_m, start_n, dropout_p, BLOCK_N: tl.constexpr,
          VARLEN: tl.constexpr):
    # Element (row, key j) of the draw grid, rows numbered by `_row_index`: forward, both backward passes and the
    # mask helper all call this, whatever their tile sizes. The rows are recomputed per tile rather than kept live
    # across the key loop: registers are what the widest tiles run out of.
    rows = _row_index(bh, first, h, num_heads, seqlen_q, offs_m, VARLEN)
    return dropout_keep(seed, rows, start_n + tl.arange(0, BLOCK_N), dropout_p)


@triton.jit
def _corner(base_ptr, start_r, stride_r, start_c, stride_c):
    # The address of element (start_r, start_c) through 64-bit offsets: the WIDE kernels address a tile from its
    # corner, so only offsets inside one tile are 32-bit.
    return base_ptr + tl.cast(start_r, tl.int64) * stride_r + tl.cast(start_c, tl.int64) * stride_c


@triton.jit
def _key_tile(k_base, v_base, start_n, offs_n, stride_kn, stride_vn, WIDE: tl.constexpr):
    # (K base, V base, key offsets) of the key tile at start_n: the WIDE form moves the bases to the tile's first
    # key through 64-bit offsets and keeps the offsets relative to it.
    if WIDE:
        k_base = _corner(k_base, start_n, stride_kn, 0, 0)
        v_base = _corner(v_base, start_n, stride_vn, 0, 0)
        offs_n = offs_n - start_n
    return k_base, v_base, offs_n


@triton.jit
def _key_cols(kpm_ptr, kpm_row, stride_kpm_n, offs_n, seqlen_k, HAS_KPM: tl.constexpr, EDGE: tl.constexpr):
    # Keys that exist and are not padding: the only columns ever loaded from K and V. A tile that is not an EDGE
    # one lies wholly below seqlen_k: no bound test.
    if EDGE:
        ok = offs_n < seqlen_k
    else:
        ok = tl.full(offs_n.shape, 1, tl.int1)
    if HAS_KPM:
        ok = ok & (tl.load(kpm_ptr + kpm_row + offs_n * stride_kpm_n, mask=ok, other=1) == 0)
    return ok


@triton.jit
def _score_tile(qk, start_m, start_n, offs_m, offs_n, col_ok, seqlen_q, mask_base, stride_mask_m, stride_mask_n, sm_scale,
                causal_offset, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, WIDE: tl.constexpr):
    # Scores in natural units with -inf where hidden, and the visibility. Natural units until after the max is
    # subtracted: multiplying a score near -6e4 by log2(e) first would round it to 2^-7 and the probabilities
    # of such a row off by ~0.5%. A float mask entry of -inf hides its key like a bool False.
    visible = col_ok[None, :] & (offs_m[:, None] < seqlen_q)
    if IS_CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
    s = qk * sm_scale
    if WIDE:
        mask_ptrs = _corner(mask_base, start_m, stride_mask_m, start_n, stride_mask_n) + \
            (offs_m - start_m)[:, None] * stride_mask_m + (offs_n - start_n)[None, :] * stride_mask_n
    else:
        mask_ptrs = mask_base + offs_m[:, None] * stride_mask_m + offs_n[None, :] * stride_mask_n
    if MASK_KIND == 1:
        keep = tl.load(mask_ptrs, mask=visible, other=0)
        visible = visible & (keep != 0)
    if MASK_KIND == 2:
        bias = tl.load(mask_ptrs, mask=visible, other=0.0)
        bias = bias.to(tl.float32)
        visible = visible & (bias != float("-inf"))
        s = s + bias
    return tl.where(visible, s, float("-inf")), visible


@triton.jit
def _seen_by_any(visible):
    # [BLOCK_N] mask of keys that at least one query of the tile may see.
    return tl.max(visible.to(tl.int32), axis=0) > 0


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, start_m, start_n, bh, first, h, num_heads, k_base, v_base, kpm_ptr, kpm_row,
              stride_kpm_n, mask_base, stride_mask_m, stride_mask_n, stride_kn, stride_vn, offs_m, offs_d, D, seqlen_q,
              seqlen_k, sm_scale, causal_offset, dropout_p, seed,
              MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
              WIDE: tl.constexpr, VARLEN: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRETED: tl.constexpr,
              EDGE: tl.constexpr):
    # EDGE: the tile may hold keys past seqlen_k or, with IS_CAUSAL, above the diagonal. The key loops visit the
    # interior tiles (neither) first; with no mask and no padding their scores need no visibility test at all.
    # fp32 (the accuracy path) tests every tile in natural units, as before this form: its D = 128 tiles spilled
    # (8-16 bytes on sm_80, where ptxas took 80-96 registers) with the interior form.
    fp32 = q.dtype == tl.float32
    edge = EDGE or fp32
    offs_n = start_n + tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    col_ok = _key_cols(kpm_ptr, kpm_row, stride_kpm_n, offs_n, seqlen_k, HAS_KPM, edge)
    k_base, v_base, rel_n = _key_tile(k_base, v_base, start_n, offs_n, stride_kn, stride_vn, WIDE)
    kt = tl.load(k_base + rel_n[None, :] * stride_kn + offs_d[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
    qk = _dot(q, kt, tl.zeros([q.shape[0], BLOCK_N], tl.float32), INTERPRETED)
    if MASK_KIND == FLOAT_MASK or fp32:
        s, visible = _score_tile(qk, start_m, start_n, offs_m, offs_n, col_ok, seqlen_q, mask_base, stride_mask_m,
                                 stride_mask_n, sm_scale, causal_offset, MASK_KIND, IS_CAUSAL, WIDE)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with nothing visible yet has max -inf: subtract 0 instead so exp2(-inf) = 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2((s - m_safe[:, None]) * LOG2E)
    else:
        if edge or HAS_KPM or MASK_KIND != 0:
            qk, visible = _score_tile(qk, start_m, start_n, offs_m, offs_n, col_ok, seqlen_q, mask_base,
                                      stride_mask_m, stride_mask_n, 1.0, causal_offset, MASK_KIND, IS_CAUSAL, WIDE)
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * sm_scale)  # = the max of the scaled scores (sm_scale > 0)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        # One FMA per score (FlashAttention's form): the scale folded into the exp2 argument. Without a float mask a
        # score is q·k alone, so the natural-units argument of `_score_tile` does not arise.
        p = tl.exp2(qk * (sm_scale * LOG2E) - (m_safe * LOG2E)[:, None])
    alpha = tl.exp2((m_i - m_safe) * LOG2E)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_base + rel_n[:, None] * stride_vn + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    if MASK_KIND != 0:
        v = tl.where(_seen_by_any(visible)[:, None], v, 0.0)
    if DROPOUT:
        # l_i keeps the undropped sum: dropout applies to the normalised probabilities.
        p = tl.where(_keep(seed, bh, first, h, num_heads, seqlen_q, offs_m, start_n, dropout_p, BLOCK_N, VARLEN), p,
                     0.0)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], INTERPRETED)
    return acc, m_new, l_i


@triton.jit
def _query_tile(num_heads, group, seqlen_q, BLOCK_M: tl.constexpr):
    # Program id → (b·H + h, first query row, b, h, kv head): B·H is folded into grid x, so any B·H fits.
    n_m = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // n_m
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    return bh, (pid % n_m) * BLOCK_M, b, h, h // group


@triton.jit
def _sequence(b, cu_q_ptr, cu_k_ptr, seqlen_q, seqlen_k, causal_offset, VARLEN: tl.constexpr):
    # (q batch index, Lq, k batch index, Lk, causal offset) of sequence b. Packed (VARLEN), sequence b holds rows
    # cu_q[b]..cu_q[b+1] of q and cu_k[b]..cu_k[b+1] of k/v; the launcher passes each tensor's row stride as its
    # batch stride, so a sequence's first row stands in for the batch index; seqlen_q/k are the maxima (they size
    # the grid) and causal_offset is 1 for bottom-right alignment (offset Lk - Lq of this sequence), 0 top-left.
    if VARLEN:
        q0 = tl.load(cu_q_ptr + b)
        k0 = tl.load(cu_k_ptr + b)
        lq = tl.load(cu_q_ptr + b + 1) - q0
        lk = tl.load(cu_k_ptr + b + 1) - k0
        return q0.to(tl.int64), lq, k0.to(tl.int64), lk, causal_offset * (lk - lq)
    return b, seqlen_q, b, seqlen_k, causal_offset


@triton.jit
def _row_index(bh, first, h, num_heads, seqlen, offs, VARLEN: tl.constexpr):
    # Rows of (batch·head bh = b·H + h, positions offs) in the outputs, the saved statistics and the dropout draw:
    # dense [B, H, L] order bh·L + i; packed [total, H] order (first + i)·H + h (first: the sequence's first row,
    # `_sequence`).
    if VARLEN:
        return (first + offs) * num_heads + h
    return bh.to(tl.int64) * seqlen + offs


@triton.jit
def _load_rows(base_ptr, b, h, stride_b, stride_h, stride_m, start_m, offs_m, offs_d, seqlen_q, D, WIDE: tl.constexpr):
    # A [rows, head dim] tile of a [B, H, L, D] tensor with unit stride along D; rows past Lq and the padding of D
    # up to BLOCK_D read as 0.
    ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < D)
    base = base_ptr + b * stride_b + h * stride_h
    if WIDE:
        base = _corner(base, start_m, stride_m, 0, 0)
        offs_m = offs_m - start_m
    return tl.load(base + offs_m[:, None] * stride_m + offs_d[None, :], mask=ok, other=0.0)


@triton.jit
def _key_range(start_m, seqlen_q, seqlen_k, causal_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    # (hi, full) for the query tile at start_m: keys below hi are visited; tiles below full are visible to every
    # row of the tile (no causal compare). Causal: up to the last valid row's limit, so a key no query sees is
    # never loaded.
    if IS_CAUSAL:
        hi = tl.minimum(tl.maximum(tl.minimum(start_m + BLOCK_M, seqlen_q) + causal_offset, 0), seqlen_k)
        full = tl.minimum(tl.maximum(start_m + causal_offset + 1, 0) // BLOCK_N * BLOCK_N, hi)
    else:
        hi = seqlen_k
        full = seqlen_k
    return hi, full


@triton.jit
def _interior_end(full, seqlen_k, q, BLOCK_N: tl.constexpr):
    # The end of the forward's interior tiles: those of `_key_range`'s `full` that also lie wholly inside the keys
    # (the rest are EDGE tiles, `_fwd_tile`). A multiple of BLOCK_N: `full` is one or is above seqlen_k's last one.
    # fp32 (the accuracy path) keeps `full`: its tiles test every key (`_fwd_tile`).
    if q.dtype == tl.float32:
        return full
    return tl.minimum(full, seqlen_k // BLOCK_N * BLOCK_N)


@triton.jit(do_not_specialize=["causal_offset"])
def attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, row_max_ptr, inv_l_ptr, mask_ptr, kpm_ptr, cu_q_ptr, cu_k_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n, stride_kpm_b, stride_kpm_n,
    num_heads, group, seqlen_q, seqlen_k, sm_scale, causal_offset, dropout_p, seed_ptr, seqlen_q_class, seqlen_k_class,
    D: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    WIDE: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    bh, start_m, b, h, hk = _query_tile(num_heads, group, seqlen_q, BLOCK_M)
    bq, seqlen_q, bk, seqlen_k, causal_offset = _sequence(b, cu_q_ptr, cu_k_ptr, seqlen_q, seqlen_k, causal_offset,
                                                          VARLEN)
    if VARLEN:
        # The grid covers the longest sequence: a tile past this one's end visits no keys and stores nothing
        # (an early return instead costs registers: the whole body moves under a branch).
        seqlen_k = tl.where(start_m < seqlen_q, seqlen_k, 0)
    # The dropout seed is read on the device (torch's generator drew it there): no launch reads it on the host,
    # so a captured CUDA graph draws a new seed on every replay.
    seed = tl.load(seed_ptr) if DROPOUT else 0
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = _load_rows(q_ptr, bq, h, stride_qb, stride_qh, stride_qm, start_m, offs_m, offs_d, seqlen_q, D, WIDE)
    k_base = k_ptr + bk * stride_kb + hk * stride_kh
    v_base = v_ptr + bk * stride_vb + hk * stride_vh
    mask_base = mask_ptr + b * stride_mask_b + h * stride_mask_h
    kpm_row = b * stride_kpm_b
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi, interior = _key_range(start_m, seqlen_q, seqlen_k, causal_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)
    interior = _interior_end(interior, seqlen_k, q, BLOCK_N)
    for start_n in range(0, interior, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, start_m, start_n, bh, bq, h, num_heads, k_base, v_base, kpm_ptr,
                                  kpm_row, stride_kpm_n, mask_base, stride_mask_m, stride_mask_n, stride_kn, stride_vn,
                                  offs_m, offs_d, D, seqlen_q, seqlen_k, sm_scale, causal_offset, dropout_p, seed,
                                  MASK_KIND, HAS_KPM, False, DROPOUT, WIDE, VARLEN, BLOCK_N, INTERPRETED, False)
    for start_n in range(interior, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, start_m, start_n, bh, bq, h, num_heads, k_base, v_base,
                                  kpm_ptr, kpm_row, stride_kpm_n, mask_base, stride_mask_m, stride_mask_n,
                                  stride_kn, stride_vn, offs_m, offs_d, D, seqlen_q, seqlen_k, sm_scale,
                                  causal_offset, dropout_p, seed, MASK_KIND, HAS_KPM, IS_CAUSAL, DROPOUT, WIDE, VARLEN,
                                  BLOCK_N, INTERPRETED, True)
    # A row with no visible key has l = 0: its output and (through inv_l = 0) its gradients are zeros.
    inv_l = tl.where(l_i == 0.0, 0.0, 1.0 / tl.where(l_i == 0.0, 1.0, l_i))
    out = acc * inv_l[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    row_ok = offs_m < seqlen_q
    rows = _row_index(bh, bq, h, num_heads, seqlen_q, offs_m, VARLEN)
    tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], cast_out(out, out_ptr.dtype.element_ty, INTERPRETED),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(row_max_ptr + rows, tl.where(m_i == float("-inf"), 0.0, m_i), mask=row_ok)
    tl.store(inv_l_ptr + rows, inv_l, mask=row_ok)


@triton.jit(do_not_specialize=["causal_offset"])
def attn_fwd_split_kernel(
    q_ptr, k_ptr, v_ptr, o_part_ptr, m_part_ptr, l_part_ptr, mask_ptr, kpm_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n, stride_kpm_b, stride_kpm_n,
    num_heads, group, seqlen_q, seqlen_k, sm_scale, causal_offset, dropout_p, seed_ptr, split_len,
    D: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRETED: tl.constexpr,
):
    # Split-KV forward (decoding: few queries, many keys): grid axis 1 splits the key range into chunks of
    # split_len (a multiple of BLOCK_N), so B·H programs become B·H·splits and fill the GPU. Each program runs the
    # online softmax over its chunk only and writes its partial (unnormalised output, max, sum) for
    # attn_fwd_combine_kernel.
    bh, start_m, b, h, hk = _query_tile(num_heads, group, seqlen_q, BLOCK_M)
    split = tl.program_id(1)
    seed = tl.load(seed_ptr) if DROPOUT else 0
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, b, h, stride_qb, stride_qh, stride_qm, start_m, offs_m, offs_d, seqlen_q, D, False)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    mask_base = mask_ptr + b * stride_mask_b + h * stride_mask_h
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi, interior = _key_range(start_m, seqlen_q, seqlen_k, causal_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)
    interior = _interior_end(interior, seqlen_k, q, BLOCK_N)
    lo_n = split * split_len
    hi_n = tl.minimum(lo_n + split_len, hi)
    for start_n in range(lo_n, tl.minimum(hi_n, interior), BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, start_m, start_n, bh, 0, h, num_heads, k_base, v_base, kpm_ptr,
                                  b * stride_kpm_b, stride_kpm_n, mask_base, stride_mask_m, stride_mask_n, stride_kn,
                                  stride_vn, offs_m, offs_d, D, seqlen_q, seqlen_k, sm_scale, causal_offset, dropout_p,
                                  seed, MASK_KIND, HAS_KPM, False, DROPOUT, False, False, BLOCK_N, INTERPRETED, False)
    for start_n in range(tl.maximum(lo_n, interior), hi_n, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, start_m, start_n, bh, 0, h, num_heads, k_base, v_base,
                                  kpm_ptr, b * stride_kpm_b, stride_kpm_n, mask_base, stride_mask_m, stride_mask_n,
                                  stride_kn, stride_vn, offs_m, offs_d, D, seqlen_q, seqlen_k, sm_scale,
                                  causal_offset, dropout_p, seed, MASK_KIND, HAS_KPM, IS_CAUSAL, DROPOUT, False, False,
                                  BLOCK_N, INTERPRETED, True)
    total_rows = (tl.num_programs(0) // tl.cdiv(seqlen_q, BLOCK_M)).to(tl.int64) * seqlen_q  # B·H·Lq
    rows = split * total_rows + bh.to(tl.int64) * seqlen_q + offs_m
    row_ok = offs_m < seqlen_q
    tl.store(o_part_ptr + rows[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])
    tl.store(m_part_ptr + rows, m_i, mask=row_ok)
    tl.store(l_part_ptr + rows, l_i, mask=row_ok)


@triton.jit
def attn_fwd_combine_kernel(o_part_ptr, m_part_ptr, l_part_ptr, out_ptr, row_max_ptr, inv_l_ptr, total_rows,
                            num_splits, dropout_p, D: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_D: tl.constexpr, INTERPRETED: tl.constexpr):
    # The split partials of each row merged in split order (deterministic): each rescaled to the row's overall
    # max, then normalised once; the same row max and reciprocal sum as attn_fwd_kernel saves, so the backward
    # pass cannot tell the two forwards apart.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    ok = rows < total_rows
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for split in range(0, num_splits):
        m = tl.maximum(m, tl.load(m_part_ptr + split * total_rows + rows, mask=ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for split in range(0, num_splits):
        part = split * total_rows + rows
        w = tl.exp2((tl.load(m_part_ptr + part, mask=ok, other=float("-inf")) - m_safe) * LOG2E)
        l_sum += tl.load(l_part_ptr + part, mask=ok, other=0.0) * w
        acc += tl.load(o_part_ptr + part[:, None] * BLOCK_D + offs_d[None, :], mask=ok[:, None], other=0.0) * w[:, None]
    inv_l = tl.where(l_sum == 0.0, 0.0, 1.0 / tl.where(l_sum == 0.0, 1.0, l_sum))
    out = acc * inv_l[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    tl.store(out_ptr + rows[:, None] * D + offs_d[None, :], cast_out(out, out_ptr.dtype.element_ty, INTERPRETED),
             mask=ok[:, None] & (offs_d[None, :] < D))
    tl.store(row_max_ptr + rows, m_safe, mask=ok)
    tl.store(inv_l_ptr + rows, inv_l, mask=ok)


@triton.jit
def attn_bwd_preprocess_kernel(out_ptr, do_ptr, row_max_ptr, inv_l_ptr, delta_ptr, lse2_ptr, cu_q_ptr, stride_dob,
                               stride_doh, stride_dom, num_heads, seqlen_q, D: tl.constexpr, WIDE: tl.constexpr,
                               VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # Once per row: delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij, the softmax-backward correction, and the log2
    # normaliser lse2_i = m_i·log2(e) − log2(1/l_i) (FlashAttention's LSE in log2 units), so the passes recompute
    # p = exp2(q·k·scale·log2(e) − lse2) with one FMA per score (`_probs`); log2 is a ~20-instruction software
    # routine, here once per row instead of once per tile. A row that sees nothing has 1/l = 0: lse2 = +inf, p = 0.
    bh, start_m, b, h, _ = _query_tile(num_heads, 1, seqlen_q, BLOCK_M)
    bq, seqlen_q, _, _, _ = _sequence(b, cu_q_ptr, cu_q_ptr, seqlen_q, seqlen_q, 0, VARLEN)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < D)
    rows = _row_index(bh, bq, h, num_heads, seqlen_q, offs_m, VARLEN)
    o = tl.load(out_ptr + rows[:, None] * D + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    do = _load_rows(do_ptr, bq, h, stride_dob, stride_doh, stride_dom, start_m, offs_m, offs_d, seqlen_q, D, WIDE)
    row_ok = offs_m < seqlen_q
    tl.store(delta_ptr + rows, tl.sum(o * do.to(tl.float32), axis=1), mask=row_ok)
    m = tl.load(row_max_ptr + rows, mask=row_ok, other=0.0)
    inv_l = tl.load(inv_l_ptr + rows, mask=row_ok, other=1.0)
    lse2 = m * LOG2E - tl.log2(tl.where(inv_l == 0.0, 1.0, inv_l))  # no log2(0) evaluated, even interpreted
    tl.store(lse2_ptr + rows, tl.where(inv_l == 0.0, float("inf"), lse2), mask=row_ok)


@triton.jit
def _probs(q, kt, start_m, start_n, offs_m, offs_n, col_ok, rows, row_max_ptr, inv_l_ptr, lse2_ptr, seqlen_q,
           mask_base, stride_mask_m, stride_mask_n, sm_scale, causal_offset,
           MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, WIDE: tl.constexpr, INTERPRETED: tl.constexpr):
    # Recomputes the forward probabilities of one tile and which are visible. Rows past seqlen_q load q and dO as 0
    # and lse2 as +inf (1/l as 0): their probabilities and dS are exactly 0.
    qk = _dot(q, kt, tl.zeros([q.shape[0], kt.shape[1]], tl.float32), INTERPRETED)
    row_ok = offs_m < seqlen_q
    if MASK_KIND == FLOAT_MASK or q.dtype == tl.float32:
        # Natural units from the saved row max and 1/l: a float mask as in the forward (`_score_tile`), and fp32, the
        # accuracy path, in its tested form (with lse2, 21 fp32 two-pass tiles at D = 32-256 took 8-72 bytes of stack).
        s, visible = _score_tile(qk, start_m, start_n, offs_m, offs_n, col_ok, seqlen_q, mask_base, stride_mask_m,
                                 stride_mask_n, sm_scale, causal_offset, MASK_KIND, IS_CAUSAL, WIDE)
        m = tl.load(row_max_ptr + rows, mask=row_ok, other=0.0)
        inv_l = tl.load(inv_l_ptr + rows, mask=row_ok, other=0.0)
        return tl.exp2((s - m[:, None]) * LOG2E) * inv_l[:, None], visible
    # One FMA per score, as in the forward: the scale, max and 1/l folded into the exp2 argument (the preprocess's
    # lse2). A hidden score is -inf here as there: p = 0.
    qk, visible = _score_tile(qk, start_m, start_n, offs_m, offs_n, col_ok, seqlen_q, mask_base, stride_mask_m,
                              stride_mask_n, 1.0, causal_offset, MASK_KIND, IS_CAUSAL, WIDE)
    lse2 = tl.load(lse2_ptr + rows, mask=row_ok, other=float("inf"))
    return tl.exp2(qk * (sm_scale * LOG2E) - lse2[:, None]), visible


@triton.jit
def _dkdv_tile(dk, dv, k, v, start_m, start_n, bh, bq, h, num_heads, q_ptr, do_ptr, row_max_ptr, inv_l_ptr, lse2_ptr,
               delta_ptr, mask_base,
               stride_mask_m, stride_mask_n, stride_qb, stride_qh, stride_qm, stride_dob, stride_doh, stride_dom,
               offs_n, offs_d, col_ok, D, seqlen_q, seqlen_k, sm_scale, causal_offset, dropout_p, seed, dq_acc_ptr,
               MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, WIDE: tl.constexpr,
               VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, FUSED_DQ: tl.constexpr, INTERPRETED: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_rows(q_ptr, bq, h, stride_qb, stride_qh, stride_qm, start_m, offs_m, offs_d, seqlen_q, D, WIDE)
    do = _load_rows(do_ptr, bq, h, stride_dob, stride_doh, stride_dom, start_m, offs_m, offs_d, seqlen_q, D, WIDE)
    rows = _row_index(bh, bq, h, num_heads, seqlen_q, offs_m, VARLEN)
    p, visible = _probs(q, tl.trans(k), start_m, start_n, offs_m, offs_n, col_ok, rows, row_max_ptr, inv_l_ptr,
                        lse2_ptr, seqlen_q, mask_base, stride_mask_m, stride_mask_n, sm_scale, causal_offset, MASK_KIND,
                        IS_CAUSAL, WIDE, INTERPRETED)
    dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, k.shape[0]], tl.float32), INTERPRETED)
    if DROPOUT:
        keep = _keep(seed, bh, bq, h, num_heads, seqlen_q, offs_m, start_n, dropout_p, k.shape[0], VARLEN)
        scale = 1.0 / (1.0 - dropout_p)
        dv = _dot(tl.trans(tl.where(keep, p * scale, 0.0).to(do.dtype)), do, dv, INTERPRETED)
        dp = tl.where(keep, dp * scale, 0.0)
    else:
        dv = _dot(tl.trans(p.to(do.dtype)), do, dv, INTERPRETED)
    delta = tl.load(delta_ptr + rows, mask=offs_m < seqlen_q, other=0.0)
    # Hidden entries get exactly 0, even where a padded V holds NaN and made dp NaN.
    ds = tl.where(visible, p * (dp - delta[:, None]), 0.0)
    dk = _dot(tl.trans(ds.to(q.dtype)), q, dk, INTERPRETED)
    if FUSED_DQ:
        # The fifth product: this tile's share of dQ = dS·K, added in fp32 (FlashAttention-2's order). A separate
        # dQ pass would recompute QKᵀ and dO·Vᵀ (seven products); atomics make the sum order vary between runs.
        # Keys no row of the tile may see are zeroed as the dQ pass does (a masked-out K may hold NaN: 0·NaN).
        kq = tl.where(_seen_by_any(visible)[:, None], k, 0.0) if MASK_KIND != 0 else k
        dq = _dot(ds.to(k.dtype), kq, tl.zeros([BLOCK_M, k.shape[1]], tl.float32), INTERPRETED)
        tl.atomic_add(dq_acc_ptr + rows[:, None] * D + offs_d[None, :], dq * sm_scale, sem="relaxed",
                      mask=(offs_m < seqlen_q)[:, None] & (offs_d < D)[None, :])
    return dk, dv


@triton.jit(do_not_specialize=["causal_offset"])
def attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, dq_acc_ptr, row_max_ptr, inv_l_ptr, lse2_ptr, delta_ptr, mask_ptr, kpm_ptr,
    cu_q_ptr, cu_k_ptr, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n, stride_kpm_b, stride_kpm_n,
    num_heads, group, seqlen_q, seqlen_k, sm_scale, causal_offset, dropout_p, seed_ptr, seqlen_q_class, seqlen_k_class,
    D: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    WIDE: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    FUSED_DQ: tl.constexpr, INTERPRETED: tl.constexpr,
):
    n_n = tl.cdiv(seqlen_k, BLOCK_N)
    pid = tl.program_id(0)
    bhk = pid // n_n
    start_n = (pid % n_n) * BLOCK_N
    hkv = num_heads // group
    b = (bhk // hkv).to(tl.int64)
    hk = (bhk % hkv).to(tl.int64)
    bq, seqlen_q, bk, seqlen_k, causal_offset = _sequence(b, cu_q_ptr, cu_k_ptr, seqlen_q, seqlen_k, causal_offset,
                                                          VARLEN)
    if VARLEN:
        # The grid covers the longest sequence: a tile past this one's end visits no queries and stores nothing.
        seqlen_q = tl.where(start_n < seqlen_k, seqlen_q, 0)
    seed = tl.load(seed_ptr) if DROPOUT else 0
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    col_ok = _key_cols(kpm_ptr, b * stride_kpm_b, stride_kpm_n, offs_n, seqlen_k, HAS_KPM, True)
    kv_ok = col_ok[:, None] & d_ok[None, :]
    k_base, v_base, rel_n = _key_tile(k_ptr + bk * stride_kb + hk * stride_kh,
                                      v_ptr + bk * stride_vb + hk * stride_vh, start_n, offs_n, stride_kn, stride_vn,
                                      WIDE)
    k = tl.load(k_base + rel_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(v_base + rel_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if IS_CAUSAL:
        # Query tiles before `lo` see none of these keys; from `full` on they see all of them.
        lo = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
        full = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M, seqlen_q)
        full = tl.maximum(full, lo)
    else:
        lo = 0
        full = 0
    # Every query head of the GQA group adds into the same dK/dV: summed here, in a fixed order.
    for g in range(0, group):
        h = hk * group + g
        bh = b * num_heads + h
        mask_base = mask_ptr + b * stride_mask_b + h * stride_mask_h
        if IS_CAUSAL:
            for start_m in range(lo, full, BLOCK_M):
                dk, dv = _dkdv_tile(dk, dv, k, v, start_m, start_n, bh, bq, h, num_heads, q_ptr, do_ptr, row_max_ptr,
                                    inv_l_ptr, lse2_ptr, delta_ptr, mask_base, stride_mask_m, stride_mask_n, stride_qb,
                                    stride_qh, stride_qm, stride_dob, stride_doh, stride_dom, offs_n, offs_d, col_ok,
                                    D, seqlen_q, seqlen_k, sm_scale, causal_offset, dropout_p, seed, dq_acc_ptr,
                                    MASK_KIND, True, DROPOUT, WIDE, VARLEN, BLOCK_M, FUSED_DQ, INTERPRETED)
        for start_m in range(full, seqlen_q, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, start_m, start_n, bh, bq, h, num_heads, q_ptr, do_ptr, row_max_ptr,
                                inv_l_ptr, lse2_ptr, delta_ptr, mask_base, stride_mask_m, stride_mask_n, stride_qb, stride_qh,
                                stride_qm, stride_dob, stride_doh, stride_dom, offs_n, offs_d, col_ok, D, seqlen_q,
                                seqlen_k, sm_scale, causal_offset, dropout_p, seed, dq_acc_ptr, MASK_KIND, False,
                                DROPOUT, WIDE, VARLEN, BLOCK_M, FUSED_DQ, INTERPRETED)
    rows = _row_index(bhk, bk, hk, hkv, seqlen_k, offs_n, VARLEN)
    out_ok = (offs_n[:, None] < seqlen_k) & d_ok[None, :]
    tl.store(dk_ptr + rows[:, None] * D + offs_d[None, :], cast_out(dk * sm_scale, dk_ptr.dtype.element_ty,
                                                                    INTERPRETED), mask=out_ok)
    tl.store(dv_ptr + rows[:, None] * D + offs_d[None, :], cast_out(dv, dv_ptr.dtype.element_ty, INTERPRETED), mask=out_ok)


@triton.jit
def _dq_tile(dq, q, do, delta, start_m, start_n, bh, first, h, num_heads, rows, k_base, v_base, kpm_ptr, kpm_row,
             stride_kpm_n, row_max_ptr, inv_l_ptr, lse2_ptr, mask_base, stride_mask_m, stride_mask_n, stride_kn, stride_vn,
             offs_m, offs_d, D, seqlen_q, seqlen_k, sm_scale, causal_offset, dropout_p, seed,
             MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
             WIDE: tl.constexpr, VARLEN: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRETED: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    col_ok = _key_cols(kpm_ptr, kpm_row, stride_kpm_n, offs_n, seqlen_k, HAS_KPM, True)
    kv_ok = col_ok[:, None] & (offs_d[None, :] < D)
    k_base, v_base, rel_n = _key_tile(k_base, v_base, start_n, offs_n, stride_kn, stride_vn, WIDE)
    k = tl.load(k_base + rel_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(v_base + rel_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
    p, visible = _probs(q, tl.trans(k), start_m, start_n, offs_m, offs_n, col_ok, rows, row_max_ptr, inv_l_ptr,
                        lse2_ptr, seqlen_q, mask_base, stride_mask_m, stride_mask_n, sm_scale, causal_offset, MASK_KIND,
                        IS_CAUSAL, WIDE, INTERPRETED)
    dp = _dot(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], tl.float32), INTERPRETED)
    if DROPOUT:
        dp = tl.where(_keep(seed, bh, first, h, num_heads, seqlen_q, offs_m, start_n, dropout_p, BLOCK_N, VARLEN),
                      dp * (1.0 / (1.0 - dropout_p)), 0.0)
    ds = tl.where(visible, p * (dp - delta[:, None]), 0.0)
    if MASK_KIND != 0:
        k = tl.where(_seen_by_any(visible)[:, None], k, 0.0)
    return _dot(ds.to(k.dtype), k, dq, INTERPRETED)


@triton.jit(do_not_specialize=["causal_offset"])
def attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, row_max_ptr, inv_l_ptr, lse2_ptr, delta_ptr, mask_ptr, kpm_ptr, cu_q_ptr, cu_k_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_dob, stride_doh,
    stride_dom,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n, stride_kpm_b, stride_kpm_n,
    num_heads, group, seqlen_q, seqlen_k, sm_scale, causal_offset, dropout_p, seed_ptr, seqlen_q_class, seqlen_k_class,
    D: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    WIDE: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    bh, start_m, b, h, hk = _query_tile(num_heads, group, seqlen_q, BLOCK_M)
    bq, seqlen_q, bk, seqlen_k, causal_offset = _sequence(b, cu_q_ptr, cu_k_ptr, seqlen_q, seqlen_k, causal_offset,
                                                          VARLEN)
    if VARLEN:
        # The grid covers the longest sequence: a tile past this one's end visits no keys and stores nothing
        # (an early return instead costs registers: the whole body moves under a branch).
        seqlen_k = tl.where(start_m < seqlen_q, seqlen_k, 0)
    seed = tl.load(seed_ptr) if DROPOUT else 0
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < D)
    q = _load_rows(q_ptr, bq, h, stride_qb, stride_qh, stride_qm, start_m, offs_m, offs_d, seqlen_q, D, WIDE)
    do = _load_rows(do_ptr, bq, h, stride_dob, stride_doh, stride_dom, start_m, offs_m, offs_d, seqlen_q, D, WIDE)
    rows = _row_index(bh, bq, h, num_heads, seqlen_q, offs_m, VARLEN)
    delta = tl.load(delta_ptr + rows, mask=offs_m < seqlen_q, other=0.0)
    k_base = k_ptr + bk * stride_kb + hk * stride_kh
    v_base = v_ptr + bk * stride_vb + hk * stride_vh
    mask_base = mask_ptr + b * stride_mask_b + h * stride_mask_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi, full = _key_range(start_m, seqlen_q, seqlen_k, causal_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)
    for start_n in range(0, full, BLOCK_N):
        dq = _dq_tile(dq, q, do, delta, start_m, start_n, bh, bq, h, num_heads, rows, k_base, v_base, kpm_ptr,
                      b * stride_kpm_b, stride_kpm_n, row_max_ptr, inv_l_ptr, lse2_ptr, mask_base, stride_mask_m, stride_mask_n,
                      stride_kn, stride_vn, offs_m, offs_d, D, seqlen_q, seqlen_k, sm_scale, causal_offset, dropout_p,
                      seed, MASK_KIND, HAS_KPM, False, DROPOUT, WIDE, VARLEN, BLOCK_N, INTERPRETED)
    if IS_CAUSAL:
        for start_n in range(full, hi, BLOCK_N):
            dq = _dq_tile(dq, q, do, delta, start_m, start_n, bh, bq, h, num_heads, rows, k_base, v_base, kpm_ptr,
                          b * stride_kpm_b, stride_kpm_n, row_max_ptr, inv_l_ptr, lse2_ptr, mask_base, stride_mask_m,
                          stride_mask_n, stride_kn, stride_vn, offs_m, offs_d, D, seqlen_q, seqlen_k, sm_scale,
                          causal_offset, dropout_p, seed, MASK_KIND, HAS_KPM, True, DROPOUT, WIDE, VARLEN, BLOCK_N,
                          INTERPRETED)
    tl.store(dq_ptr + rows[:, None] * D + offs_d[None, :], cast_out(dq * sm_scale, dq_ptr.dtype.element_ty,
                                                                    INTERPRETED), mask=ok)


@triton.jit(do_not_specialize=["causal_offset"])
def attn_bwd_dmask_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, ds_ptr, row_max_ptr, inv_l_ptr, delta_ptr, mask_ptr, kpm_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_dob, stride_doh,
    stride_dom,
    stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n, stride_kpm_b, stride_kpm_n,
    num_heads, group, seqlen_q, seqlen_k, sm_scale, causal_offset, dropout_p, seed_ptr,
    D: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRETED: tl.constexpr,
):
    # The gradient of a float mask, dS = P * (dP - delta) (the mask enters the scores unscaled), into a contiguous
    # fp32 [B, H, Lq, Lk] that ops/attention.py sums over the mask's broadcast dims. Its own pass, one program per
    # (query tile, key tile, batch·head), launched only when the mask requires grad: the dK/dV and dQ passes stay
    # as they are. Every element is written (hidden ones as 0), so the buffer needs no zero fill.
    n_m = tl.cdiv(seqlen_q, BLOCK_M)
    n_n = tl.cdiv(seqlen_k, BLOCK_N)
    pid = tl.program_id(0)
    bh = pid // (n_m * n_n)
    start_m = (pid // n_n) % n_m * BLOCK_M
    start_n = pid % n_n * BLOCK_N
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    hk = h // group
    seed = tl.load(seed_ptr) if DROPOUT else 0
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr, b, h, stride_qb, stride_qh, stride_qm, start_m, offs_m, offs_d, seqlen_q, D, WIDE)
    do = _load_rows(do_ptr, b, h, stride_dob, stride_doh, stride_dom, start_m, offs_m, offs_d, seqlen_q, D, WIDE)
    col_ok = _key_cols(kpm_ptr, b * stride_kpm_b, stride_kpm_n, offs_n, seqlen_k, HAS_KPM, True)
    kv_ok = col_ok[:, None] & (offs_d[None, :] < D)
    k_base, v_base, rel_n = _key_tile(k_ptr + b * stride_kb + hk * stride_kh, v_ptr + b * stride_vb + hk * stride_vh,
                                      start_n, offs_n, stride_kn, stride_vn, WIDE)
    k = tl.load(k_base + rel_n[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(v_base + rel_n[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
    rows = bh.to(tl.int64) * seqlen_q + offs_m
    # A float mask's probabilities come from the row max and 1/l (natural units): no lse2, row_max_ptr stands in.
    p, visible = _probs(q, tl.trans(k), start_m, start_n, offs_m, offs_n, col_ok, rows, row_max_ptr, inv_l_ptr,
                        row_max_ptr, seqlen_q, mask_ptr + b * stride_mask_b + h * stride_mask_h, stride_mask_m, stride_mask_n,
                        sm_scale, causal_offset, FLOAT_MASK, IS_CAUSAL, WIDE, INTERPRETED)
    dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), INTERPRETED)
    if DROPOUT:
        dp = tl.where(_keep(seed, bh, 0, h, num_heads, seqlen_q, offs_m, start_n, dropout_p, BLOCK_N, False),
                      dp * (1.0 / (1.0 - dropout_p)), 0.0)
    delta = tl.load(delta_ptr + rows, mask=offs_m < seqlen_q, other=0.0)
    ds = tl.where(visible, p * (dp - delta[:, None]), 0.0)
    # One 64-bit corner, 32-bit offsets inside the tile.
    corner = ds_ptr + (bh.to(tl.int64) * seqlen_q + start_m) * seqlen_k + start_n
    ok = (offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k)
    tl.store(corner + (offs_m - start_m)[:, None] * seqlen_k + (offs_n - start_n)[None, :], ds, mask=ok)


@triton.jit
def dropout_mask_kernel(keep_ptr, seqlen_q, seqlen_k, dropout_p, seed_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # The keep-mask the attention kernels draw, materialised (tests and the reference comparison only).
    n_m = tl.cdiv(seqlen_q, BLOCK_M)
    n_n = tl.cdiv(seqlen_k, BLOCK_N)
    pid = tl.program_id(0)
    bh = pid // (n_m * n_n)
    offs_m = (pid // n_n) % n_m * BLOCK_M + tl.arange(0, BLOCK_M)
    start_n = pid % n_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    keep = _keep(tl.load(seed_ptr), bh, 0, 0, 1, seqlen_q, offs_m, start_n, dropout_p, BLOCK_N, False)
    ptr = keep_ptr + (bh.to(tl.int64) * seqlen_q + offs_m[:, None]) * seqlen_k + offs_n[None, :]
    tl.store(ptr, keep.to(tl.int8), mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))


@triton.jit
def _gqa_program(num_heads, group, BLOCK_M: tl.constexpr):
    # A GQA-packed decoding program (grid: batch x KV head x chunk of BLOCK_M heads of its group, key splits): its batch
    # index, KV head, query heads (the rows), which rows are heads of the group, and its key split.
    hkv = num_heads // group
    chunks = tl.cdiv(group, BLOCK_M)
    pid = tl.program_id(0)
    g = pid % chunks * BLOCK_M + tl.arange(0, BLOCK_M)
    hk = (pid // chunks % hkv).to(tl.int64)
    return (pid // (hkv * chunks)).to(tl.int64), hk, hk * group + g, g < group, tl.program_id(1)


@triton.jit
def _store_gqa_partials(o_part_ptr, m_part_ptr, l_part_ptr, acc, m_i, l_i, b, heads, row_ok, split, num_heads, group,
                        offs_d, BLOCK_M: tl.constexpr):
    # The rows' split partials in the [splits, B·H·Lq] order of the split-KV forward (Lq = 1), for its combine kernel.
    programs = tl.num_programs(0) // tl.cdiv(group, BLOCK_M)  # batch x KV heads
    rows = split * (programs * group).to(tl.int64) + b * num_heads + heads
    tl.store(o_part_ptr + rows[:, None] * acc.shape[1] + offs_d[None, :], acc, mask=row_ok[:, None])
    tl.store(m_part_ptr + rows, m_i, mask=row_ok)
    tl.store(l_part_ptr + rows, l_i, mask=row_ok)


@triton.jit(do_not_specialize=["causal_offset"])
def attn_decode_gqa_kernel(
    q_ptr, k_ptr, v_ptr, o_part_ptr, m_part_ptr, l_part_ptr, mask_ptr, kpm_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mask_b, stride_mask_n, stride_kpm_b, stride_kpm_n,
    num_heads, group, seqlen_k, sm_scale, causal_offset, split_len,
    D: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KPM: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRETED: tl.constexpr,
):
    # A decoding step (one query per head) with the query heads of a GQA group packed into one program's rows: each
    # K/V tile is read once for the group instead of once per query head (FlashDecoding's GQA packing; 4x less K/V
    # traffic at 32/8 heads), and the products fill BLOCK_M rows with queries instead of one. Grid: (batch x KV head
    # x chunk of BLOCK_M heads of its group, key splits); each program writes the split partials of its rows in the
    # split-KV forward's layout, so attn_fwd_combine_kernel merges them. No dropout (inference), masks broadcast
    # over heads (the launcher checks both). Added after the other kernels: their line numbers, and so the keys of
    # their committed resource-table entries, stay as they were.
    b, hk, heads, row_ok, split = _gqa_program(num_heads, group, BLOCK_M)
    offs_m = tl.zeros([BLOCK_M], tl.int32)  # every row is query 0 of its head
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi, interior = _key_range(0, 1, seqlen_k, causal_offset, 1, BLOCK_N, IS_CAUSAL)
    interior = _interior_end(interior, seqlen_k, q, BLOCK_N)
    lo_n = split * split_len
    hi_n = tl.minimum(lo_n + split_len, hi)
    for start_n in range(lo_n, tl.minimum(hi_n, interior), BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, 0, start_n, 0, 0, 0, num_heads, k_base, v_base, kpm_ptr,
                                  b * stride_kpm_b, stride_kpm_n, mask_ptr + b * stride_mask_b, 0, stride_mask_n,
                                  stride_kn, stride_vn, offs_m, offs_d, D, 1, seqlen_k, sm_scale, causal_offset, 0.0, 0,
                                  MASK_KIND, HAS_KPM, False, False, False, False, BLOCK_N, INTERPRETED, False)
    for start_n in range(tl.maximum(lo_n, interior), hi_n, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, 0, start_n, 0, 0, 0, num_heads, k_base, v_base, kpm_ptr,
                                  b * stride_kpm_b, stride_kpm_n, mask_ptr + b * stride_mask_b, 0, stride_mask_n,
                                  stride_kn, stride_vn, offs_m, offs_d, D, 1, seqlen_k, sm_scale, causal_offset,
                                  0.0, 0, MASK_KIND, HAS_KPM, IS_CAUSAL, False, False, False, BLOCK_N, INTERPRETED, True)
    _store_gqa_partials(o_part_ptr, m_part_ptr, l_part_ptr, acc, m_i, l_i, b, heads, row_ok, split, num_heads, group,
                        offs_d, BLOCK_M)


@triton.jit(do_not_specialize=["window_left"])
def attn_decode_paged_kernel(
    q_ptr, k_ptr, v_ptr, o_part_ptr, m_part_ptr, l_part_ptr, table_ptr, seqlens_ptr,
    stride_qb, stride_qh, stride_kblock, stride_krow, stride_kh, stride_vblock, stride_vrow, stride_vh, stride_table_b,
    num_heads, group, block_size, sm_scale, window_left, split_len,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRETED: tl.constexpr,
):
    # A decoding step over a paged KV cache read in place (vLLM's and flash-attn's layout): key j of sequence b is
    # row j % block_size of cache block table[b, j // block_size]; the sequence holds seqlens[b] keys and its query
    # sits at the last of them. The GQA packing, grid and partials of attn_decode_gqa_kernel; only the blocks of a
    # sequence's keys inside its window are read (a split past them does nothing).
    b, hk, heads, row_ok, split = _gqa_program(num_heads, group, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    seqlen = tl.load(seqlens_ptr + b)
    first = seqlen - 1 - window_left  # the window's first key (window_left past the capacity: none)
    start = tl.maximum(first, 0) // BLOCK_N * BLOCK_N + split * split_len
    end = tl.minimum(start + split_len, seqlen)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = (offs_n < seqlen) & (offs_n >= first)
        page = tl.load(table_ptr + b * stride_table_b + offs_n // block_size, mask=col_ok, other=0).to(tl.int64)
        slot = offs_n % block_size
        kt = tl.load(k_ptr + (page * stride_kblock + slot * stride_krow + hk * stride_kh)[None, :] + offs_d[:, None],
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.where(col_ok[None, :], _dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), INTERPRETED) * sm_scale,
                     float("-inf"))
        # The online softmax of `_fwd_tile`, on whole visible columns (no masks: the cache's length is the mask).
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m_i - m_safe) * LOG2E)
        p = tl.exp2((s - m_safe[:, None]) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + (page * stride_vblock + slot * stride_vrow + hk * stride_vh)[:, None] + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], INTERPRETED)
        m_i = m_new
    _store_gqa_partials(o_part_ptr, m_part_ptr, l_part_ptr, acc, m_i, l_i, b, heads, row_ok, split, num_heads, group,
                        offs_d, BLOCK_M)


# ---- launchers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def triton(self) -> triton.Config:
        return triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}, num_warps=self.num_warps,
                             num_stages=self.num_stages)


# Tiles autotune may try, per pass and (feature class, element bytes, head-dim block); the first is the preferred
# one. Chosen by compiling candidates from large to small for sm_80 and sm_90 and keeping the first two with 0
# spill bytes on both (tests/test_resources.py re-checks every entry): a "plain" kernel (causal at most) affords
# bigger tiles than one that also loads a mask tile, padding and dropout draws ("all"), and fp32 (4 bytes, tf32x3
# dots; FMA dots above D = 64) needs the smallest. dkdv keeps K, V, dK and dV of its key tile resident, so its tiles
# are the smallest. ptxas caps some 8-warp fp32 kernels at 80 or 128 registers, so a smaller tile can spill where a
# larger one does not (or more warps help): the fp32 entries at D = 128/256 are the candidates that compiled clean.
# The 2-byte plain forward at D = 64/128 also offers 128-row tiles and a third stage (issue 26): once its interior
# tiles lost their visibility tests (`_fwd_tile`) they compiled with 0 spills on both arches (at most 237 registers
# on sm_80, 228 on sm_90; measured 2026-12-07), and autotune times them against the 64-row tiles on the GPU.
_FWD = {
    ("plain", 2, 16): [TileConfig(128, 64, 8, 2), TileConfig(128, 32, 8, 2)],
    ("plain", 2, 32): [TileConfig(128, 64, 8, 2), TileConfig(128, 32, 8, 2)],
    ("plain", 2, 64): [TileConfig(128, 64, 8, 2), TileConfig(128, 64, 8, 3), TileConfig(128, 32, 8, 2)],
    ("plain", 2, 128): [TileConfig(128, 64, 8, 2), TileConfig(128, 64, 8, 3), TileConfig(64, 64, 8, 2),
                        TileConfig(64, 32, 4, 2)],
    ("plain", 2, 256): [TileConfig(64, 32, 8, 2), TileConfig(32, 32, 4, 2)],
    ("plain", 4, 16): [TileConfig(128, 64, 8, 2), TileConfig(128, 32, 8, 2)],
    ("plain", 4, 32): [TileConfig(128, 32, 8, 2), TileConfig(64, 32, 4, 2)],
    ("plain", 4, 64): [TileConfig(32, 32, 4, 2), TileConfig(32, 32, 8, 1)],
    ("plain", 4, 128): [TileConfig(16, 32, 8, 1), TileConfig(16, 16, 4, 1)],
    ("plain", 4, 256): [TileConfig(16, 32, 8, 1), TileConfig(16, 16, 4, 1)],
    ("all", 2, 16): [TileConfig(128, 64, 8, 2), TileConfig(128, 32, 8, 2)],
    ("all", 2, 32): [TileConfig(128, 64, 8, 2), TileConfig(128, 32, 8, 2)],
    ("all", 2, 64): [TileConfig(128, 32, 8, 2), TileConfig(64, 32, 4, 2)],
    ("all", 2, 128): [TileConfig(64, 32, 8, 2), TileConfig(32, 64, 8, 2)],
    ("all", 2, 256): [TileConfig(32, 64, 8, 2), TileConfig(32, 32, 8, 1)],
    ("all", 4, 16): [TileConfig(128, 64, 8, 2), TileConfig(128, 32, 8, 2)],
    ("all", 4, 32): [TileConfig(128, 32, 8, 2), TileConfig(64, 32, 4, 2)],
    ("all", 4, 64): [TileConfig(32, 32, 4, 2), TileConfig(32, 32, 8, 1)],
    ("all", 4, 128): [TileConfig(16, 16, 4, 1)],
    ("all", 4, 256): [TileConfig(16, 32, 8, 1), TileConfig(16, 16, 4, 1)],
}
_DKDV = {
    ("plain", 2, 16): [TileConfig(32, 128, 8, 2), TileConfig(64, 64, 8, 2)],
    ("plain", 2, 32): [TileConfig(64, 64, 8, 2), TileConfig(32, 64, 8, 2)],
    ("plain", 2, 64): [TileConfig(32, 32, 8, 2)],
    ("plain", 2, 128): [TileConfig(32, 32, 8, 2), TileConfig(16, 64, 8, 1)],
    ("plain", 2, 256): [TileConfig(16, 32, 8, 1)],
    ("plain", 4, 16): [TileConfig(32, 32, 8, 2), TileConfig(32, 32, 4, 2)],
    ("plain", 4, 32): [TileConfig(16, 16, 4, 1)],
    ("plain", 4, 64): [TileConfig(16, 32, 8, 1), TileConfig(16, 32, 4, 1)],
    ("plain", 4, 128): [TileConfig(16, 16, 4, 1)],
    ("plain", 4, 256): [TileConfig(16, 16, 8, 1)],
    ("all", 2, 16): [TileConfig(32, 32, 8, 2), TileConfig(32, 32, 4, 2)],
    ("all", 2, 32): [TileConfig(32, 32, 8, 2), TileConfig(32, 32, 4, 2)],
    ("all", 2, 64): [TileConfig(32, 32, 8, 2), TileConfig(32, 32, 4, 2)],
    ("all", 2, 128): [TileConfig(16, 64, 8, 1), TileConfig(16, 32, 8, 1)],
    ("all", 2, 256): [TileConfig(16, 32, 8, 1)],
    ("all", 4, 16): [TileConfig(16, 32, 4, 1), TileConfig(16, 16, 4, 1)],
    ("all", 4, 32): [TileConfig(16, 16, 4, 1)],
    ("all", 4, 64): [TileConfig(16, 32, 8, 1), TileConfig(16, 16, 4, 1)],
    ("all", 4, 128): [TileConfig(32, 16, 8, 1)],
    ("all", 4, 256): [TileConfig(16, 32, 8, 1)],
}
_DQ = {
    ("plain", 2, 16): [TileConfig(128, 32, 8, 2), TileConfig(64, 64, 8, 2)],
    ("plain", 2, 32): [TileConfig(128, 32, 8, 2), TileConfig(64, 64, 8, 2)],
    ("plain", 2, 64): [TileConfig(128, 32, 8, 2), TileConfig(64, 64, 8, 2)],
    ("plain", 2, 128): [TileConfig(64, 64, 8, 2), TileConfig(64, 32, 8, 2)],
    ("plain", 2, 256): [TileConfig(32, 64, 8, 1), TileConfig(16, 64, 8, 1)],
    ("plain", 4, 16): [TileConfig(128, 32, 8, 2), TileConfig(64, 64, 8, 2)],
    ("plain", 4, 32): [TileConfig(64, 32, 8, 2), TileConfig(16, 32, 8, 1)],
    ("plain", 4, 64): [TileConfig(16, 32, 8, 1), TileConfig(16, 32, 4, 1)],
    ("plain", 4, 128): [TileConfig(16, 32, 8, 1), TileConfig(16, 16, 8, 1)],
    ("plain", 4, 256): [TileConfig(16, 32, 8, 1), TileConfig(16, 16, 4, 1)],
    ("all", 2, 16): [TileConfig(128, 32, 8, 2), TileConfig(64, 64, 8, 2)],
    ("all", 2, 32): [TileConfig(128, 32, 8, 2), TileConfig(64, 32, 8, 2)],
    ("all", 2, 64): [TileConfig(32, 64, 8, 2), TileConfig(32, 32, 8, 2)],
    ("all", 2, 128): [TileConfig(16, 32, 8, 1), TileConfig(16, 16, 4, 1)],
    ("all", 2, 256): [TileConfig(16, 32, 8, 1)],
    ("all", 4, 16): [TileConfig(128, 32, 8, 2), TileConfig(64, 32, 8, 2)],
    ("all", 4, 32): [TileConfig(16, 32, 8, 1), TileConfig(16, 32, 4, 1)],
    ("all", 4, 64): [TileConfig(16, 16, 4, 1)],
    ("all", 4, 128): [TileConfig(16, 32, 8, 1), TileConfig(16, 16, 4, 1)],
    ("all", 4, 256): [TileConfig(16, 32, 8, 1), TileConfig(16, 16, 8, 1)],
}
PASSES = {"fwd": _FWD, "dkdv": _DKDV, "dq": _DQ}
# The WIDE form (64-bit tile corners) runs one tile per pass and class: the smallest of the table above, except
# where the corner arithmetic made that one spill; these replacements compiled with 0 spills on sm_80 and sm_90.
_WIDE_TILES = {
    ("dkdv", ("plain", 4, 32)): TileConfig(16, 16, 8, 2),
    ("dkdv", ("plain", 4, 64)): TileConfig(16, 16, 8, 1),
    ("fwd", ("plain", 2, 256)): TileConfig(32, 32, 8, 1),
    ("dq", ("all", 2, 256)): TileConfig(16, 16, 8, 1),
    ("dkdv", ("plain", 4, 128)): TileConfig(16, 16, 8, 1),
}
# Packed sequences (VARLEN) keep a sequence's bounds and 64-bit first rows in registers: where a tile of the class
# spilled with them, these replace it (each compiled with 0 spills on sm_80 and sm_90); the WIDE form likewise.
_VARLEN_TILES = {
    ("fwd", ("all", 2, 128)): [TileConfig(64, 32, 8, 2)],
    ("dkdv", ("all", 4, 16)): [TileConfig(16, 32, 4, 1), TileConfig(16, 16, 8, 1)],
    ("dkdv", ("plain", 4, 32)): [TileConfig(16, 16, 8, 1)],
    ("dkdv", ("plain", 4, 64)): [TileConfig(16, 32, 8, 1)],
    ("dkdv", ("all", 4, 64)): [TileConfig(16, 32, 8, 1)],
    ("fwd", ("all", 2, 256)): [TileConfig(32, 64, 8, 2)],
    ("fwd", ("plain", 2, 256)): [TileConfig(64, 32, 8, 2)],
    ("dkdv", ("all", 4, 128)): [TileConfig(16, 64, 8, 1)],
    ("dkdv", ("plain", 4, 128)): [TileConfig(32, 16, 8, 1)],
    ("dq", ("plain", 4, 128)): [TileConfig(16, 16, 8, 1)],
    ("dq", ("all", 2, 16)): [TileConfig(128, 32, 8, 2)],
    ("dq", ("all", 2, 32)): [TileConfig(64, 32, 8, 2)],
}
_VARLEN_WIDE_TILES = {
    ("dkdv", ("plain", 4, 16)): TileConfig(16, 32, 4, 1),
    ("dkdv", ("all", 4, 32)): TileConfig(16, 16, 8, 1),
    ("dkdv", ("all", 4, 64)): TileConfig(16, 16, 8, 1),
    ("dkdv", ("all", 2, 64)): TileConfig(32, 32, 8, 2),
    ("dq", ("all", 2, 16)): TileConfig(64, 32, 8, 2),
    ("dq", ("all", 4, 128)): TileConfig(16, 32, 8, 1),
    ("dkdv", ("all", 4, 256)): TileConfig(16, 16, 8, 2),
    ("dkdv", ("plain", 4, 256)): TileConfig(16, 16, 16, 1),
    ("dq", ("plain", 2, 64)): TileConfig(128, 32, 8, 2),
}
# Under the interpreter every tile costs a numpy call per op: one small fixed tile, no tuning.
INTERPRETER_CONFIG = TileConfig(32, 32, 1, 1)
PREPROCESS_BLOCK_M = 64


def feature_class(mask_kind: int, has_kpm: bool, dropout: bool) -> str:
    """"all" when a mask tile, padding or dropout adds per-element registers, else "plain" (causal is cheap)."""
    return "all" if mask_kind != MASK_NONE or has_kpm or dropout else "plain"


def tile_configs(pass_name: str, block_d: int, elem_bytes: int, features: str, varlen: bool = False,
                 ) -> list[TileConfig]:
    """The tiles autotune may pick for a pass ("fwd" | "dkdv" | "dq") at this head-dim block, element size and
    feature class (``varlen``: the packed-sequence form)."""
    if is_interpreted():
        return [INTERPRETER_CONFIG]
    return _tiles(pass_name, (features, max(elem_bytes, 2), block_d), varlen)


def wide_tile(pass_name: str, block_d: int, elem_bytes: int, features: str, varlen: bool = False) -> TileConfig:
    """The one tile of the WIDE form of a pass (see `tile_configs`)."""
    if is_interpreted():
        return INTERPRETER_CONFIG
    return _wide_tile(pass_name, (features, max(elem_bytes, 2), block_d), varlen)


def _tiles(pass_name: str, key: tuple[str, int, int], varlen: bool) -> list[TileConfig]:
    return (_VARLEN_TILES.get((pass_name, key)) if varlen else None) or PASSES[pass_name][key]


def dmask_tile(block_d: int, elem_bytes: int, wide: bool) -> TileConfig:
    """The one tile of the mask-gradient pass: the dQ pass's smallest (WIDE: its WIDE tile) of the "all" class,
    whose registers hold the same operands plus a dQ accumulator this pass does not have."""
    if is_interpreted():
        return INTERPRETER_CONFIG
    key = ("all", max(elem_bytes, 2), block_d)
    return _wide_tile("dq", key) if wide else PASSES["dq"][key][-1]


def _wide_tile(pass_name: str, key: tuple[str, int, int], varlen: bool = False) -> TileConfig:
    if varlen and (pass_name, key) in _VARLEN_WIDE_TILES:
        return _VARLEN_WIDE_TILES[(pass_name, key)]
    return _WIDE_TILES.get((pass_name, key), PASSES[pass_name][key][-1])


# Fused-dQ dK/dV tiles that spilled when compiled for sm_80 or sm_90 (the dS·K product and its atomics take
# registers), by (class key, varlen, wide): the five-product form is autotuned over the class's other tiles, and a
# class left with none runs the two-pass form. fp32 runs two passes throughout: its fused tiles spilled at every head
# dim (16 to 7120 bytes), and fp32 is the accuracy path, not the fast one.
_FUSED_DQ_SPILLED = {
    (("plain", 2, 16), False, False): {TileConfig(32, 128, 8, 2)},
    (("plain", 2, 16), True, False): {TileConfig(32, 128, 8, 2)},
    (("plain", 2, 32), True, False): {TileConfig(64, 64, 8, 2)},
    (("all", 2, 32), False, False): {TileConfig(32, 32, 8, 2), TileConfig(32, 32, 4, 2)},
    (("all", 2, 32), False, True): {TileConfig(32, 32, 4, 2)},
    (("all", 2, 64), False, False): {TileConfig(32, 32, 4, 2)},
    (("all", 2, 64), False, True): {TileConfig(32, 32, 4, 2)},
    (("all", 2, 64), True, False): {TileConfig(32, 32, 4, 2)},
    (("all", 2, 256), False, False): {TileConfig(16, 32, 8, 1)},
    (("all", 2, 256), False, True): {TileConfig(16, 32, 8, 1)},
    (("all", 2, 256), True, False): {TileConfig(16, 32, 8, 1)},
    (("all", 2, 256), True, True): {TileConfig(16, 32, 8, 1)},
}


def fused_dq_tiles(block_d: int, elem_bytes: int, features: str, varlen: bool, wide: bool) -> tuple[TileConfig, ...]:
    """The GPU tiles of the five-product dK/dV pass (dQ added with atomics) for this class; empty where it runs two
    passes (fp32, and classes whose every fused tile spilled). The interpreter follows the same choice."""
    args = (block_d, elem_bytes, features, varlen, wide)
    found = _FUSED_DQ_TILES.get(args)
    if found is None:
        key = (features, elem_bytes, block_d)
        tiles = [] if elem_bytes >= 4 else [_wide_tile("dkdv", key, varlen)] if wide else _tiles("dkdv", key, varlen)
        spilled = _FUSED_DQ_SPILLED.get((key, varlen, wide), set())
        found = _FUSED_DQ_TILES[args] = tuple(t for t in tiles if t not in spilled)
    return found


_FUSED_DQ_TILES: dict[tuple, tuple[TileConfig, ...]] = {}  # fused_dq_tiles' answers (a pure function of its args)


def _autotuned(kernel, pass_name: str):
    """`kernel` autotuned over every tile of the pass, pruned per call to the head-dim block, element size and
    packing; the WIDE form (64-bit tile corners, for tensors past 2^31 elements) takes the pass's smallest tile, the
    one whose registers leave room for the wider addresses (`wide_tile`)."""
    table = {"": [INTERPRETER_CONFIG]} if is_interpreted() else PASSES[pass_name]

    def allowed(named_args, kwargs):
        features = feature_class(kwargs["MASK_KIND"], kwargs["HAS_KPM"], kwargs["DROPOUT"])
        shape_class = (pass_name, kwargs["BLOCK_D"], named_args["q_ptr"].element_size(), features, kwargs["VARLEN"])
        if kwargs.get("FUSED_DQ") and not is_interpreted():
            return list(fused_dq_tiles(*shape_class[1:], kwargs["WIDE"]))
        return [wide_tile(*shape_class)] if kwargs["WIDE"] else tile_configs(*shape_class)

    key = ["seqlen_q_class", "seqlen_k_class", "group", "D", "MASK_KIND", "HAS_KPM", "IS_CAUSAL", "DROPOUT", "WIDE",
           "VARLEN", *(["FUSED_DQ"] if pass_name == "dkdv" else [])]
    extra = [] if is_interpreted() else (
        [c for (p, _), c in (*_WIDE_TILES.items(), *_VARLEN_WIDE_TILES.items()) if p == pass_name]
        + [c for (p, _), tiles in _VARLEN_TILES.items() if p == pass_name for c in tiles])
    # Timing a dK/dV tile runs the kernel: its dQ atomics must start from zero again (Triton's tuner zeroes the
    # buffer before each timed run and after the last).
    return Autotuned(kernel, [c for tiles in table.values() for c in tiles] + extra, key, allowed,
                     reset_to_zero=["dq_acc_ptr"] if pass_name == "dkdv" else None)


_fwd = _autotuned(attn_fwd_kernel, "fwd")
_dkdv = _autotuned(attn_bwd_dkdv_kernel, "dkdv")
_dq = _autotuned(attn_bwd_dq_kernel, "dq")


COMBINE_BLOCK_R = 16


# Where the rule of `split_tile` spilled (fp32 D = 128: 8 bytes on sm_80), the class's other tile, 0 spills.
_SPLIT_TILES = {("plain", 4, 128): TileConfig(16, 32, 8, 1)}


def split_tile(block_d: int, elem_bytes: int, features: str, interpreted: bool | None = None) -> TileConfig:
    """The one tile of the split-KV forward: 16 query rows (a decoding step has 1) with the key tile, warps and
    stages of the forward's smallest tile of the class: fewer registers than that tile, which is spill-free."""
    if is_interpreted() if interpreted is None else interpreted:
        return INTERPRETER_CONFIG
    key = (features, max(elem_bytes, 2), block_d)
    if key in _SPLIT_TILES:
        return _SPLIT_TILES[key]
    smallest = _FWD[key][-1]
    return TileConfig(16, smallest.block_n, smallest.num_warps, smallest.num_stages)


def gqa_decode_tile(block_d: int, interpreted: bool | None = None) -> TileConfig:
    """The one tile of `attn_decode_gqa_kernel`: 16 rows (query heads), 4 warps, 1 stage, 32 keys (16 at D = 256). The
    split-KV forward's tiles (8 warps, 2 stages) spilled 11 of its variants (8-32 bytes; measured 2026-12-07)."""
    if is_interpreted() if interpreted is None else interpreted:
        return INTERPRETER_CONFIG
    return TileConfig(16, 16 if block_d > 128 else 32, 4, 1)


def gqa_decode_fits(dtype: torch.dtype, block_d: int) -> bool:
    """Where `gqa_decode_tile` compiles without spills: all but fp32 at D = 256 (8 bytes on sm_80 on 4 or 8 warps),
    which decodes through the split-KV forward instead."""
    return not (dtype == torch.float32 and block_d > 128)


# Gemma 2's soft cap is not in these kernels: `ops.attention.capable_backend` reads this and routes soft-capped calls
# to a backend that caps. Compiled into every pass, the tanh and its backward factor spilled 18 of the AOT variants
# (fp32 dK/dV and dQ tiles, 2-byte D = 128 dK/dV and D = 64 dQ tiles; measured 2026-12-07), which want their own tiles.
SOFTCAP = False
# Nor are sliding windows (`ops.attention` applies a window here as a mask, every tile read; packed sequences go to a
# backend that takes one). Built with tile skipping in every pass (the CUDA kernels' form), the left edge's band
# compare and loop bounds spilled 90 of the AOT variants; aligned tile-index loops brought that to 8 (fp32 dK/dV and
# dQ tiles, the fp32 D = 256 split tile, 2-byte packed D = 64 fused dK/dV; measured 2026-12-07), still not 0.
WINDOW = False
# Nor is ALiBi: `ops.attention` adds it to the mask as an fp32 bias (`masks.alibi_bias`), read per tile.
ALIBI = False


def _unsupported_features(softcap: float, window: tuple[int, int] | None, alibi: torch.Tensor | None) -> None:
    if alibi is not None:
        raise NotImplementedError("the Triton attention kernels do not take ALiBi slopes (ops.attention adds the bias "
                                  "to the mask)")
    if softcap:
        raise NotImplementedError("the Triton attention kernels do not take softcap")
    if window is not None and max(window) >= 0:
        raise NotImplementedError("the Triton attention kernels do not take a window (ops.attention masks it)")


def max_head_dim(dtype: torch.dtype, device: torch.device) -> int:
    """The widest head dim these kernels take in ``dtype`` (0 for a dtype they lack)."""
    return MAX_HEAD_DIM.get(dtype, 0)


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why these kernels cannot take the inputs (None when they can)."""
    why = unsupported_dtype(q, SUPPORTED_DTYPES)
    if why:
        return why
    # A value head dim other than q's runs at the wider of the two (the ops zero-pad the narrower operands).
    width = max(q.shape[-1], v.shape[-1])
    if width > MAX_HEAD_DIM[q.dtype]:
        return f"head dim {width} with {q.dtype} (supported: 1..{MAX_HEAD_DIM[q.dtype]})"
    return None


def head_dim_block(d: int, dtype: torch.dtype) -> int:
    if not 1 <= d <= MAX_HEAD_DIM[dtype]:
        raise ValueError(f"head dim {d} is not supported by the Triton attention for {dtype} "
                         f"(supported: 1..{MAX_HEAD_DIM[dtype]})")
    return max(MIN_BLOCK_D, next_power_of_2(d))


def _mask_args(mask: torch.Tensor | None, kpm: torch.Tensor | None, q: torch.Tensor):
    kind, m, ms = mask_args(mask, q)
    kp, kps = (q, (0, 0)) if kpm is None else (kpm.view(torch.uint8), kpm.stride())
    return kind, m, ms, kp, kps


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride()[:3]


def _packed_strides(t: torch.Tensor) -> tuple[int, int, int]:
    # [total, heads, D] as the kernels' (batch, head, row) strides: the row stride doubles as the batch stride, a
    # sequence's first row standing in for its batch index (`_sequence`).
    return t.stride(0), t.stride(1), t.stride(0)


# Launch plans of the forward, by everything its decisions read: shapes, strides, dtype, device, the mask's and the
# padding's layout and dtype, causal and dropout on/off. A repeated call (every layer of a model, every step) then
# skips ~10 µs of Python: the tile, split and 64-bit-offset decisions and the argument tuple. Runtime values (scale,
# offset, dropout probability, the tensors) are never part of a plan. Bounded: cleared when full.
_FWD_PLANS: dict[tuple, tuple] = {}
_FWD_PLANS_MAX = 1024
PLAN_CACHES.append(_FWD_PLANS)


def _forward_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: torch.Tensor, kind: int, ms: tuple,
                  kps: tuple, has_kpm: bool, is_causal: bool, dropout: bool) -> tuple:
    """(the kernel: "fwd", "split" or "gqa", split plan or None, tile, grid, the integer arguments after the pointers,
    the trailing integer arguments, the constexpr keywords) of a forward launch."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    block_d = head_dim_block(d, q.dtype)
    wide = spans_past_int32(q, k, v, m)
    features = feature_class(kind, has_kpm, dropout)
    if lq == 1 and h > hkv and not dropout and not wide and ms[1] == 0 and gqa_decode_fits(q.dtype, block_d):
        tile = gqa_decode_tile(block_d)
        # A GQA decoding step: the group's query heads share each K/V tile (`attn_decode_gqa_kernel`), split over
        # the keys while batch x KV heads x head chunks would not fill the GPU.
        chunks = triton.cdiv(h // hkv, tile.block_m)
        plan = split_plan(b * chunks, hkv, 1, lk, 1, tile.block_n, 1, q.device)
        ints = (q.stride(0), q.stride(1), *_strides3(k), *_strides3(v), ms[0], ms[3], *kps, h, h // hkv, lk)
        flags = {"D": d, "MASK_KIND": kind, "HAS_KPM": has_kpm, "IS_CAUSAL": is_causal, "BLOCK_D": block_d,
                 "INTERPRETED": is_interpreted()}
        return "gqa", plan, tile, (b * hkv * chunks, plan.splits), ints, (plan.split_len,), flags
    tile = split_tile(block_d, q.element_size(), features)
    plain_block_m = tile_configs("fwd", block_d, q.element_size(), features)[0].block_m
    plan = split_plan(b, h, lq, lk, tile.block_m, tile.block_n, plain_block_m, q.device)
    ints = (*_strides3(q), *_strides3(k), *_strides3(v), *ms, *kps, h, h // hkv, lq, lk)
    flags = {"D": d, "MASK_KIND": kind, "HAS_KPM": has_kpm, "IS_CAUSAL": is_causal, "DROPOUT": dropout,
             "BLOCK_D": block_d, "INTERPRETED": is_interpreted()}
    if plan.splits > 1 and not wide:
        grid = (triton.cdiv(lq, tile.block_m) * b * h, plan.splits)
        return "split", plan, tile, grid, ints, (plan.split_len,), flags
    grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]) * b * h,)
    return "fwd", None, tile, grid, ints, (length_class(lq), length_class(lk)), {**flags, "WIDE": wide, "VARLEN": False}


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      kpm: torch.Tensor | None, scale: float, is_causal: bool, causal_offset: int,
                      dropout_p: float, seed: torch.Tensor | None, softcap: float = 0.0,
                      window: tuple[int, int] | None = None, alibi: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q ``[B, H, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` (any strides, H % Hkv == 0); mask None or bool (True = keep)
    / float (added) viewed as ``[B, H, Lq, Lk]``; kpm None or bool ``[B, Lk]`` (True = padding); seed the int64
    ``[1]`` dropout seed on q's device (None without dropout); softcap 0 and no window (see `SOFTCAP`, `WINDOW`).
    Returns the contiguous
    output ``[B, H, Lq, D]`` and, per row, the max score and reciprocal softmax sum (fp32 ``[B, H, Lq]``) that the
    backward pass needs."""
    _unsupported_features(softcap, window, alibi)
    # The kernels read head-dim rows with unit stride (vector loads; a runtime last-dim stride costs a 64-bit
    # address per element and spills): a view with another last-dim stride is copied once, here.
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    b, h, lq, d = q.shape
    out = torch.empty((b, h, lq, d), dtype=q.dtype, device=q.device)
    row_max = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    inv_l = torch.empty_like(row_max)
    if out.numel() == 0:
        return out, row_max, inv_l
    kind, m, ms, kp, kps = _mask_args(mask, kpm, q)
    dropout = dropout_p > 0.0
    key = (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, q.device, kind, m.dtype, ms,
           kpm is not None, kps, bool(is_causal), dropout)
    found = _FWD_PLANS.get(key)
    if found is None:
        found = _forward_plan(q, k, v, m, kind, ms, kps, kpm is not None, bool(is_causal), dropout)
        if len(_FWD_PLANS) >= _FWD_PLANS_MAX:
            _FWD_PLANS.clear()
        _FWD_PLANS[key] = found
    kernel, plan, tile, grid, ints, tail, flags = found
    runtime = (scale, causal_offset, dropout_p, q if seed is None else seed)
    if plan is not None:
        rows = b * h * lq
        block_d = flags["BLOCK_D"]
        o_part = torch.empty((plan.splits, rows, block_d), dtype=torch.float32, device=q.device)
        m_part = torch.empty((plan.splits, rows), dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        split_kernel = attn_decode_gqa_kernel if kernel == "gqa" else attn_fwd_split_kernel
        split_kernel[grid](q, k, v, o_part, m_part, l_part, m, kp, *ints,
                           *(runtime[:2] if kernel == "gqa" else runtime), *tail, **flags, BLOCK_M=tile.block_m,
                           BLOCK_N=tile.block_n, num_warps=tile.num_warps, num_stages=tile.num_stages)
        attn_fwd_combine_kernel[(triton.cdiv(rows, COMBINE_BLOCK_R),)](
            o_part, m_part, l_part, out, row_max, inv_l, rows, plan.splits, dropout_p, D=d, DROPOUT=dropout,
            BLOCK_R=COMBINE_BLOCK_R, BLOCK_D=block_d, INTERPRETED=flags["INTERPRETED"])
        return out, row_max, inv_l
    _fwd[grid](q, k, v, out, row_max, inv_l, m, kp, q, q, *ints, *runtime, *tail, **flags)
    return out, row_max, inv_l


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                 seqlens: torch.Tensor, scale: float, window_left: int = -1,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoding step over a paged cache, read in place: q ``[B, H, 1, D]``, k_cache/v_cache ``[num_blocks,
    block_size, Hkv, D]`` (H % Hkv == 0; any strides but a unit last one), block_table int32 ``[B, max_blocks]``,
    seqlens int32 ``[B]`` (keys per sequence, the query at the last; 0 gives zeros), window_left the keys before the
    query's that it sees (−1: all). Returns out ``[B, H, 1, D]`` (contiguous), the fp32 row max and reciprocal sum
    ``[B, H, 1]``."""
    q, k_cache, v_cache = (unit_last_stride(t) for t in (q, k_cache, v_cache))
    b, h, _, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty((b, h, 1, d), dtype=q.dtype, device=q.device)
    row_max = torch.empty((b, h, 1), dtype=torch.float32, device=q.device)
    inv_l = torch.empty_like(row_max)
    capacity = block_table.shape[1] * block_size
    if out.numel() == 0:
        return out, row_max, inv_l
    block_d = head_dim_block(d, q.dtype)
    tile = split_tile(block_d, q.element_size(), "plain")
    group = h // hkv
    chunks = triton.cdiv(group, tile.block_m)
    window_left = capacity if window_left < 0 else min(window_left, capacity)
    span = min(capacity, window_left + 1 + tile.block_n)
    plan = split_plan(b * chunks, hkv, 1, span, 1, tile.block_n, 1, q.device)
    rows = b * h
    o_part = torch.empty((plan.splits, rows, block_d), dtype=torch.float32, device=q.device)
    m_part = torch.empty((plan.splits, rows), dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    interpreted = is_interpreted()
    attn_decode_paged_kernel[(b * hkv * chunks, plan.splits)](
        q, k_cache, v_cache, o_part, m_part, l_part, block_table, seqlens, q.stride(0), q.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0), h, group, block_size, scale, window_left,
        plan.split_len, D=d, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_D=block_d, INTERPRETED=interpreted,
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    attn_fwd_combine_kernel[(triton.cdiv(rows, COMBINE_BLOCK_R),)](
        o_part, m_part, l_part, out, row_max, inv_l, rows, plan.splits, 0.0, D=d, DROPOUT=False,
        BLOCK_R=COMBINE_BLOCK_R, BLOCK_D=block_d, INTERPRETED=interpreted)
    return out, row_max, inv_l


def varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                   max_q: int, max_k: int, scale: float, is_causal: bool, bottom_right: bool, dropout_p: float,
                   seed: torch.Tensor | None, softcap: float = 0.0, window: tuple[int, int] | None = None,
                   alibi: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed sequences: q ``[total_q, H, D]``, k/v ``[total_k, Hkv, D]`` (any strides), sequence b holding rows
    ``cu_q[b]:cu_q[b+1]`` of q and ``cu_k[b]:cu_k[b+1]`` of k/v (cu int32 ``[B + 1]`` on q's device, starting at 0
    and ending at the totals), max_q/max_k at least the longest lengths (they size the grid: no host sync);
    causal per sequence, aligned bottom-right (offset Lk - Lq) or top-left. Returns the contiguous
    output ``[total_q, H, D]`` and the fp32 row max and reciprocal sum ``[total_q, H]``."""
    _unsupported_features(softcap, window, alibi)
    q, k, v = (unit_last_stride(t) for t in (q, k, v))
    total_q, h, d = q.shape
    batch, hkv = cu_q.numel() - 1, k.shape[1]
    out = torch.empty((total_q, h, d), dtype=q.dtype, device=q.device)
    row_max = torch.empty((total_q, h), dtype=torch.float32, device=q.device)
    inv_l = torch.empty_like(row_max)
    if out.numel() == 0 or batch == 0:
        return out, row_max, inv_l
    kind, m, ms, kp, kps = _mask_args(None, None, q)
    block_d = head_dim_block(d, q.dtype)
    grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]) * batch * h,)
    _fwd[grid](
        q, k, v, out, row_max, inv_l, m, kp, cu_q, cu_k, *_packed_strides(q), *_packed_strides(k),
        *_packed_strides(v), *ms, *kps, h, h // hkv, max_q, max_k, scale, int(bottom_right), dropout_p,
        q if seed is None else seed, length_class(max_q), length_class(max_k), D=d, MASK_KIND=kind, HAS_KPM=False,
        IS_CAUSAL=bool(is_causal), DROPOUT=dropout_p > 0.0, WIDE=spans_past_int32(q, k, v), VARLEN=True,
        BLOCK_D=block_d, INTERPRETED=is_interpreted(),
    )
    return out, row_max, inv_l


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       row_max: torch.Tensor, inv_l: torch.Tensor, mask: torch.Tensor | None, kpm: torch.Tensor | None,
                       scale: float, is_causal: bool, causal_offset: int, dropout_p: float,
                       seed: torch.Tensor | None, mask_grad: bool = False, softcap: float = 0.0,
                       window: tuple[int, int] | None = None, alibi: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of `attention_forward` for grad_output ``dout`` (any strides, e.g. expanded); returns contiguous
    dq, dk, dv (dK/dV of a GQA group summed over its query heads) and, with ``mask_grad`` (a float mask), the
    mask's gradient dS as a contiguous fp32 ``[B, H, Lq, Lk]`` (None without)."""
    _unsupported_features(softcap, window, alibi)
    q, k, v, dout = (unit_last_stride(t) for t in (q, k, v, dout))
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    # The dK/dV and dQ passes write every gradient element; only when there is nothing to attend are they zeros.
    nothing = b * h * d == 0 or lq == 0 or lk == 0
    alloc = torch.zeros if nothing else torch.empty
    dk = alloc((b, hkv, lk, d), dtype=k.dtype, device=q.device)
    dv = alloc((b, hkv, lk, d), dtype=v.dtype, device=q.device)
    dmask = alloc((b, h, lq, lk), dtype=torch.float32, device=q.device) if mask_grad else None
    if nothing:
        return torch.zeros((b, h, lq, d), dtype=q.dtype, device=q.device), dk, dv, dmask
    kind, m, ms, kp, kps = _mask_args(mask, kpm, q)
    block_d = head_dim_block(d, q.dtype)
    wide = spans_past_int32(q, k, v, dout, m)
    delta, lse2 = torch.empty((2, b, h, lq), dtype=torch.float32, device=q.device).unbind(0)
    common = dict(D=d, MASK_KIND=kind, HAS_KPM=kpm is not None, IS_CAUSAL=bool(is_causal), DROPOUT=dropout_p > 0.0,
                  WIDE=wide, BLOCK_D=block_d, INTERPRETED=is_interpreted())
    sizes = (h, h // hkv, lq, lk, scale, causal_offset, dropout_p, q if seed is None else seed, length_class(lq),
             length_class(lk))
    strides = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout), *ms, *kps)
    dq = _backward_passes(dout, q, k, v, out, row_max, inv_l, dk, dv, delta, lse2, m, kp, q, q, strides, sizes, b,
                          common, varlen=False)
    if mask_grad:
        c = dmask_tile(block_d, q.element_size(), wide)
        features = {name: value for name, value in common.items() if name != "MASK_KIND"}  # always a float mask
        attn_bwd_dmask_kernel[(triton.cdiv(lq, c.block_m) * triton.cdiv(lk, c.block_n) * b * h,)](
            q, k, v, dout, dmask, row_max, inv_l, delta, m, kp, *strides, *sizes[:8], **features, BLOCK_M=c.block_m,
            BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages)
    return dq, dk, dv, dmask


def varlen_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    row_max: torch.Tensor, inv_l: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int,
                    max_k: int, scale: float, is_causal: bool, bottom_right: bool, dropout_p: float,
                    seed: torch.Tensor | None, softcap: float = 0.0, window: tuple[int, int] | None = None,
                   alibi: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `varlen_forward` for ``dout`` ``[total_q, H, D]`` (any strides): contiguous dq, dk, dv in the
    packed layouts (dK/dV of a GQA group summed over its query heads)."""
    _unsupported_features(softcap, window, alibi)
    q, k, v, dout = (unit_last_stride(t) for t in (q, k, v, dout))
    total_q, h, d = q.shape
    batch, hkv = cu_q.numel() - 1, k.shape[1]
    # Every row of q and k/v belongs to one sequence (cu runs 0..total), and the passes write each row of their
    # sequences; with nothing to attend the gradients are zeros.
    nothing = total_q * h * d == 0 or k.shape[0] == 0 or batch == 0
    alloc = torch.zeros if nothing else torch.empty
    dk, dv = (alloc(t.shape, dtype=t.dtype, device=t.device) for t in (k, v))
    if nothing:
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device), dk, dv
    kind, m, ms, kp, kps = _mask_args(None, None, q)
    common = dict(D=d, MASK_KIND=kind, HAS_KPM=False, IS_CAUSAL=bool(is_causal), DROPOUT=dropout_p > 0.0,
                  WIDE=spans_past_int32(q, k, v, dout), BLOCK_D=head_dim_block(d, q.dtype),
                  INTERPRETED=is_interpreted())
    sizes = (h, h // hkv, max_q, max_k, scale, int(bottom_right), dropout_p, q if seed is None else seed,
             length_class(max_q), length_class(max_k))
    strides = (*_packed_strides(q), *_packed_strides(k), *_packed_strides(v), *_packed_strides(dout), *ms, *kps)
    delta, lse2 = torch.empty((2, total_q, h), dtype=torch.float32, device=q.device).unbind(0)
    dq = _backward_passes(dout, q, k, v, out, row_max, inv_l, dk, dv, delta, lse2, m, kp, cu_q, cu_k, strides, sizes,
                          batch, common, varlen=True)
    return dq, dk, dv


def _backward_passes(dout, q, k, v, out, row_max, inv_l, dk, dv, delta, lse2, m, kp, cu_q, cu_k, strides, sizes,
                     batch, common, varlen: bool) -> torch.Tensor:
    """delta and lse2, then dK/dV per key tile, and dQ; returns dq (q's shape and dtype, contiguous). ``sizes`` starts
    (H, group, Lq, Lk) (the maxima when packed) and ``strides`` with dout's three at 9..11."""
    h, group, lq, lk = sizes[:4]
    attn_bwd_preprocess_kernel[(triton.cdiv(lq, PREPROCESS_BLOCK_M) * batch * h,)](
        out, dout, row_max, inv_l, delta, lse2, cu_q, *strides[9:12], h, lq, D=common["D"], WIDE=common["WIDE"], VARLEN=varlen,
        BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_D=common["BLOCK_D"])
    # Five matrix products where a fused tile fits (`fused_dq_tiles`): the dK/dV pass adds dS·K into an fp32 dQ with
    # atomics. Their order varies between runs, so under torch.use_deterministic_algorithms(True) dQ gets its own
    # pass per query tile instead (seven products: it recomputes QKᵀ and dO·Vᵀ), summing in a fixed order.
    fused = not torch.are_deterministic_algorithms_enabled() and bool(fused_dq_tiles(
        common["BLOCK_D"], q.element_size(), feature_class(common["MASK_KIND"], common["HAS_KPM"], common["DROPOUT"]),
        varlen, common["WIDE"]))
    # Unfused, the kernel's dQ pointer is an empty fp32 view that nothing reads or writes.
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if fused else delta[:0]
    _dkdv[lambda meta: (triton.cdiv(lk, meta["BLOCK_N"]) * batch * (h // group),)](
        q, k, v, dout, dk, dv, dq_acc, row_max, inv_l, lse2, delta, m, kp, cu_q, cu_k, *strides, *sizes, **common,
        VARLEN=varlen, FUSED_DQ=fused)
    if fused:
        return dq_acc.to(q.dtype)  # fused only for fp16/bf16 (`fused_dq_tiles`)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _dq[lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]) * batch * h,)](
        q, k, v, dout, dq, row_max, inv_l, lse2, delta, m, kp, cu_q, cu_k, *strides, *sizes, **common, VARLEN=varlen)
    return dq


_AOT_KERNELS = {"fwd": attn_fwd_kernel, "dkdv": attn_bwd_dkdv_kernel, "dq": attn_bwd_dq_kernel}
# Pointers and scalars that are neither q's dtype nor 32-bit ints (the rest of the AOT signature is derived from the
# kernels); the masks' unit key strides are specialised as Triton does for a stride of 1.
_AOT_TYPES = {"row_max_ptr": "*fp32", "inv_l_ptr": "*fp32", "lse2_ptr": "*fp32", "delta_ptr": "*fp32", "ds_ptr": "*fp32",
              "kpm_ptr": "*u8", "dq_acc_ptr": "*fp32", "sm_scale": "fp32", "dropout_p": "fp32", "seed_ptr": "*i64",
              "cu_q_ptr": "*i32", "cu_k_ptr": "*i32",
              "stride_mask_n": "constexpr", "stride_kpm_n": "constexpr"}
# The most expensive feature set (float mask, key padding, causal, dropout), the cheapest (causal only), and the
# packed-sequence forms (no mask or padding there), each compiled with the tiles of its class (`feature_class`).
AOT_FEATURES = {
    "all": {"MASK_KIND": MASK_ADD, "HAS_KPM": True, "IS_CAUSAL": True, "DROPOUT": True, "VARLEN": False},
    "plain": {"MASK_KIND": MASK_NONE, "HAS_KPM": False, "IS_CAUSAL": True, "DROPOUT": False, "VARLEN": False},
    "varlen": {"MASK_KIND": MASK_NONE, "HAS_KPM": False, "IS_CAUSAL": True, "DROPOUT": True, "VARLEN": True},
    "varlen plain": {"MASK_KIND": MASK_NONE, "HAS_KPM": False, "IS_CAUSAL": True, "DROPOUT": False, "VARLEN": True},
}


def _aot_class(features: str) -> str:
    f = AOT_FEATURES[features]
    return feature_class(f["MASK_KIND"], f["HAS_KPM"], f["DROPOUT"])


def _dense(features: str) -> dict:
    # The feature constants of the kernels that have no packed form (mask gradient, split-KV).
    return {k: v for k, v in AOT_FEATURES[features].items() if k != "VARLEN"}


def _aligned(sig: dict[str, str]) -> tuple[str, ...]:
    # Torch allocations and their strides are 16-byte / 16-element aligned in the usual call; bool padding masks
    # and cu_seqlens (often a slice) are not assumed to be.
    return tuple(n for n, t in sig.items() if (n.endswith("_ptr") or n.startswith("stride_")) and t != "constexpr"
                 and n not in ("kpm_ptr", "cu_q_ptr", "cu_k_ptr"))


def aot_variant(pass_name: str, dtype: torch.dtype, block_d: int, c: TileConfig, features: str,
                wide: bool = False, fused_dq: bool = True) -> AotVariant:
    """One pass compiled as Triton specialises it for the usual call: 32-bit sizes and strides, strides divisible
    by 16, unit stride along the mask's and padding mask's keys, D == BLOCK_D (``wide``: the WIDE form; dK/dV with
    the dQ product unless ``fused_dq`` is False, the deterministic form)."""
    fn = _AOT_KERNELS[pass_name]
    dt = TRITON_DTYPE_NAMES[dtype]
    sig = aot_signature(fn, {**_AOT_TYPES, "*_ptr": f"*{dt}"})
    consts = {**AOT_FEATURES[features], "WIDE": wide, "INTERPRETED": False, "stride_mask_n": 1, "stride_kpm_n": 1,
              "D": block_d, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_D": block_d}
    if pass_name == "dkdv":
        consts["FUSED_DQ"] = fused_dq
    return AotVariant(f"attn_{pass_name}", fn, sig, consts, c.num_warps,
                      f"{dt} D={block_d} M={c.block_m} N={c.block_n} w={c.num_warps} s={c.num_stages} {features}"
                      + (" wide" if wide else "") + (" two-pass" if pass_name == "dkdv" and not fused_dq else ""),
                      num_stages=c.num_stages, aligned=_aligned(sig))


def _dmask_variant(dtype: torch.dtype, block_d: int, wide: bool) -> AotVariant:
    dt = TRITON_DTYPE_NAMES[dtype]
    c = dmask_tile(block_d, dtype.itemsize, wide)
    sig = aot_signature(attn_bwd_dmask_kernel, {**_AOT_TYPES, "*_ptr": f"*{dt}"})
    features = {k: v for k, v in _dense("all").items() if k != "MASK_KIND"}
    consts = {**features, "WIDE": wide, "INTERPRETED": False, "stride_mask_n": 1, "stride_kpm_n": 1, "D": block_d,
              "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_D": block_d}
    return AotVariant("attn_dmask", attn_bwd_dmask_kernel, sig, consts, c.num_warps,
                      f"{dt} D={block_d} M={c.block_m} N={c.block_n} w={c.num_warps} s={c.num_stages} all"
                      + (" wide" if wide else ""), num_stages=c.num_stages, aligned=_aligned(sig))


def _split_variant(dtype: torch.dtype, block_d: int, features: str) -> AotVariant:
    dt = TRITON_DTYPE_NAMES[dtype]
    c = split_tile(block_d, dtype.itemsize, features, interpreted=False)
    sig = aot_signature(attn_fwd_split_kernel, {**_AOT_TYPES, "*_ptr": f"*{dt}", "o_part_ptr": "*fp32",
                                                "m_part_ptr": "*fp32", "l_part_ptr": "*fp32"})
    consts = {**_dense(features), "INTERPRETED": False, "stride_mask_n": 1, "stride_kpm_n": 1, "D": block_d,
              "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_D": block_d}
    return AotVariant("attn_fwd_split", attn_fwd_split_kernel, sig, consts, c.num_warps,
                      f"{dt} D={block_d} M={c.block_m} N={c.block_n} w={c.num_warps} s={c.num_stages} {features}",
                      num_stages=c.num_stages, aligned=_aligned(sig))


def _gqa_decode_variant(dtype: torch.dtype, block_d: int, features: str) -> AotVariant:
    # Its one tile, both feature classes; no dropout or packed form in this kernel.
    dt = TRITON_DTYPE_NAMES[dtype]
    c = gqa_decode_tile(block_d, interpreted=False)
    sig = aot_signature(attn_decode_gqa_kernel, {**_AOT_TYPES, "*_ptr": f"*{dt}", "o_part_ptr": "*fp32",
                                                 "m_part_ptr": "*fp32", "l_part_ptr": "*fp32"})
    consts = {**{k: v for k, v in _dense(features).items() if k != "DROPOUT"}, "INTERPRETED": False,
              "stride_mask_n": 1, "stride_kpm_n": 1, "D": block_d, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n,
              "BLOCK_D": block_d}
    return AotVariant("attn_decode_gqa", attn_decode_gqa_kernel, sig, consts, c.num_warps,
                      f"{dt} D={block_d} M={c.block_m} N={c.block_n} w={c.num_warps} s={c.num_stages} {features}",
                      num_stages=c.num_stages, aligned=_aligned(sig))


def _paged_decode_variant(dtype: torch.dtype, block_d: int) -> AotVariant:
    dt = TRITON_DTYPE_NAMES[dtype]
    c = split_tile(block_d, dtype.itemsize, "plain", interpreted=False)
    sig = aot_signature(attn_decode_paged_kernel, {**_AOT_TYPES, "*_ptr": f"*{dt}", "o_part_ptr": "*fp32",
                                                   "m_part_ptr": "*fp32", "l_part_ptr": "*fp32", "table_ptr": "*i32",
                                                   "seqlens_ptr": "*i32"})
    consts = {"INTERPRETED": False, "D": block_d, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_D": block_d}
    return AotVariant("attn_decode_paged", attn_decode_paged_kernel, sig, consts, c.num_warps,
                      f"{dt} D={block_d} M={c.block_m} N={c.block_n} w={c.num_warps} s={c.num_stages}",
                      num_stages=c.num_stages, aligned=_aligned(sig))


def _combine_variant(dtype: torch.dtype, block_d: int) -> AotVariant:
    dt = TRITON_DTYPE_NAMES[dtype]
    sig = aot_signature(attn_fwd_combine_kernel, {**_AOT_TYPES, "*_ptr": "*fp32", "out_ptr": f"*{dt}"})
    consts = {"D": block_d, "DROPOUT": True, "BLOCK_R": COMBINE_BLOCK_R, "BLOCK_D": block_d, "INTERPRETED": False}
    return AotVariant("attn_fwd_combine", attn_fwd_combine_kernel, sig, consts, 4,
                      f"{dt} D={block_d} R={COMBINE_BLOCK_R}", aligned=_aligned(sig))


def aot_variants() -> list[AotVariant]:
    """Every tile configuration autotune can pick, for each dtype, head-dim block and feature class (see
    `tile_configs`), forward and both backward passes, the WIDE form of each with its one tile, the mask-gradient
    pass (its one tile, plain and WIDE), the split-KV forward, its GQA-packed and paged-cache decoding forms and their
    combine, plus the preprocess (dense and packed)."""
    out = []
    for dtype in SUPPORTED_DTYPES:
        for block_d in (b for b in HEAD_DIM_BLOCKS if b <= next_power_of_2(MAX_HEAD_DIM[dtype])):
            for pass_name in PASSES:
                for features in AOT_FEATURES:
                    key = (_aot_class(features), max(dtype.itemsize, 2), block_d)
                    varlen = AOT_FEATURES[features]["VARLEN"]
                    two_pass = {"fused_dq": False} if pass_name == "dkdv" else {}
                    out += [aot_variant(pass_name, dtype, block_d, c, features, **two_pass)
                            for c in _tiles(pass_name, key, varlen)]
                    out.append(aot_variant(pass_name, dtype, block_d, _wide_tile(pass_name, key, varlen), features,
                                           wide=True, **two_pass))
                    if pass_name == "dkdv":  # the five-product form where its tiles fit
                        out += [aot_variant(pass_name, dtype, block_d, c, features, wide=wide)
                                for wide in (False, True)
                                for c in fused_dq_tiles(block_d, key[1], key[0], varlen, wide)]
            for wide in (False, True):
                out.append(_dmask_variant(dtype, block_d, wide))
            out += [_split_variant(dtype, block_d, features) for features in ("all", "plain")]
            if gqa_decode_fits(dtype, block_d):
                out += [_gqa_decode_variant(dtype, block_d, features) for features in ("all", "plain")]
            out.append(_paged_decode_variant(dtype, block_d))
            out.append(_combine_variant(dtype, block_d))
        dt = TRITON_DTYPE_NAMES[dtype]
        sig = aot_signature(attn_bwd_preprocess_kernel, {**_AOT_TYPES, "*_ptr": f"*{dt}"})
        for block_d in HEAD_DIM_BLOCKS:
            for wide in (False, True):
                for varlen in (False, True):
                    out.append(AotVariant(
                        "attn_bwd_preprocess", attn_bwd_preprocess_kernel, sig,
                        {"D": block_d, "WIDE": wide, "VARLEN": varlen, "BLOCK_M": PREPROCESS_BLOCK_M,
                         "BLOCK_D": block_d}, 4, f"{dt} D={block_d} M={PREPROCESS_BLOCK_M}" + (" wide" if wide else "")
                        + (" varlen" if varlen else ""), aligned=_aligned(sig)))
    return out
