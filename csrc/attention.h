// Fused attention (flash-style; fp16/bf16 forward and backward on mma.sync with register accumulators, fp32 on FMA
// units over shared-memory tiles): the
// argument block the bindings fill, the instantiated head dims, and the launchers.
#pragma once

#include <cstddef>
#include <cstdint>

#include "types.h"

namespace tk {

// Head dims are padded up to one of these; a wider head raises (Python reads the list through the
// bindings: attention_head_dims), for every dtype.
constexpr int kAttnHeadDims[] = {16, 32, 64, 128, 256};
constexpr int kAttnMaxHeadDim = 256;
constexpr int kAttnThreads = 128;

// q [B, H, Lq, D], k/v [B, Hkv, Lk, D] through 4 strides each; mask viewed as [B, H, Lq, Lk] through its
// strides (0 on broadcast dims) with a MaskKind (softmax.h); kpm [B, Lk] bool (True = padding). out, dout,
// dq contiguous [B, H, Lq, D]; dk, dv contiguous [B, Hkv, Lk, D]; row_max, inv_l, delta fp32 [B, H, Lq].
struct AttentionArgs {
  const void* q;
  const void* k;
  const void* v;
  const void* mask;
  const uint8_t* kpm;
  void* out;
  float* row_max;
  float* inv_l;
  const void* dout;
  float* delta;
  void* dq;
  void* dk;
  void* dv;
  // dS, the gradient of a float mask, fp32 contiguous [B, H, Lq, Lk]; null unless the mask requires grad.
  float* dmask;
  // Split-KV forward (splits > 1): grid y splits the keys into chunks of split_len (a multiple of the tile's BN);
  // each block writes its partial unnormalised output o_part [splits, B*H*Lq, D], max and sum m_part/l_part
  // [splits, B*H*Lq] (fp32), merged by a second kernel. splits = 1: the plain forward.
  int64_t splits, split_len;
  float* o_part;
  float* m_part;
  float* l_part;
  int64_t q_stride[4], k_stride[4], v_stride[4], do_stride[4], mask_stride[4], kpm_stride[2];
  int64_t B, H, Hkv, Lq, Lk, D;
  float scale;
  // The key band (causal masking and sliding windows, `cuda/attention.py: _key_band`): with causal set, query i sees keys
  // i + causal_offset - window_left <= j <= i + causal_offset + window_right only (plain causal: right 0, left
  // wider than any sequence); key tiles outside every row's band are never visited.
  int causal;
  int64_t causal_offset;
  int64_t window_left = 0, window_right = 0;
  float dropout_p;
  // The dropout seed in device memory (torch's generator draws it there; null without dropout): read by the
  // kernels, never by the host, so a captured CUDA graph draws a new one on every replay.
  const uint64_t* seed;
  int dtype;
  int mask_kind;
  // Packed sequences (cu_q non-null; no mask or padding mask): q/dout rows [total_q, H, D], k/v [total_k, Hkv, D],
  // out/dq/dk/dv contiguous in those layouts, row_max/inv_l/delta [total_q, H]. Sequence b holds rows
  // cu_q[b]..cu_q[b+1] of q and cu_k[b]..cu_k[b+1] of k/v (int32 [B + 1]); Lq/Lk are the longest lengths (they
  // size the grid), causal_offset is 1 for bottom-right alignment (Lk - Lq of each sequence) or 0, and the
  // batch strides (stride[0]) are 0. `sequence_view` rebases a block's arguments on its sequence, setting
  // q0/k0 (its first rows; 0 for dense arguments).
  const int32_t* cu_q;
  const int32_t* cu_k;
  int64_t total_q, total_k;
  int64_t q0, k0;
  // Gemma 2's logit soft cap: each scaled score s becomes softcap·tanh(s / softcap) before any mask is added;
  // 0 = none.
  float softcap = 0.0f;
  // ALiBi (BLOOM, MPT): −slope·|i + causal_offset − j| added to each scaled score, the slope of (b, h) at
  // alibi[b·alibi_stride[0] + h·alibi_stride[1]] (fp32; null = none). Generated per score: no bias tensor is read.
  const float* alibi = nullptr;
  int64_t alibi_stride[2] = {0, 0};
  // Shared memory per SM of the device (bytes; 0 = unknown): the tiles are chosen by it (`attention_forward_narrow`,
  // `attention_backward_narrow`).
  int64_t smem_per_sm = 0;
};

// Fills out, row_max (max score of the row, 0 when none is visible) and inv_l (1 / softmax sum, 0 when
// none is visible).
void attention_forward(const AttentionArgs& args, tk_stream_t stream);
// Whether the fp16/bf16 forward takes its narrow key tile on a device with this much shared memory per SM: at
// D = 128 the 64-key tiles (80 KiB) fit one block on a 100 KiB SM (sm_86, sm_89), the 32-key ones (48 KiB) two.
bool attention_forward_narrow(int dtype, int64_t d, int64_t smem_per_sm);
// The forward's query and key tile (BM, BN) for a dtype code, head dim and device (shared memory per SM; 0 =
// unknown): the split-KV plan needs them.
void attention_forward_tile(int dtype, int64_t d, int64_t smem_per_sm, int* bm, int* bn);
// Whether `attention_forward` runs the PLAIN form of the fp16/bf16 forward for these arguments (csrc/attention_fwd.cu:
// no mask tensor, padding mask, soft cap, ALiBi or dropout, a positive scale, K and V copied by 16 bytes).
bool attention_forward_plain(const AttentionArgs& args);
// Fills delta, dq, dk, dv (and dmask when not null) from dout, out, row_max, inv_l.
void attention_backward(const AttentionArgs& args, tk_stream_t stream);
// Dynamic shared memory each kernel launches with, for a dtype code and head dim (the resource report adds it to
// the static shared memory a cubin declares): the forward's, and the dK/dV (dq false) or dQ kernel's.
size_t attention_forward_smem(int dtype, int64_t d, bool narrow = false);
size_t attention_backward_smem(int dtype, int64_t d, bool dq, bool narrow = false);
// Whether the fp16/bf16 backward takes its narrow tiles (dK/dV 16 queries, dQ 16 keys at D = 128) on a device with
// this much shared memory per SM: the 64/65 KiB tiles fit one block on a 100 KiB SM, the 48 KiB ones two.
bool attention_backward_narrow(int dtype, int64_t d, int64_t smem_per_sm);

}  // namespace tk
