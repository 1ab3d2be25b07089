// Device pieces the attention forward and backward kernels share: tile shapes, tile loads, which keys a
// query sees, and the masked score.
#pragma once

#include "attention.h"
#include "mma.cuh"
#include "softmax.h"

namespace tk {

// Tile shapes per (element type, padded head dim). Shared memory holds every operand and the fp32
// accumulators (wmma hides which lane owns which row, and the online softmax rescales whole rows), so tiles are
// sized to stay under the 99 KiB an sm_86/sm_89 block may use; `*_smem_bytes` below are checked against it.
template <typename T, int DP>
struct FwdTile {
  static constexpr int BM = sizeof(T) == 4 ? 32 : 64;
  static constexpr int BN = (sizeof(T) == 4 || DP > 64) ? 32 : 64;
};
template <typename T, int DP>
struct BwdTile {
  static constexpr int BM = 32;
  static constexpr int BN = 32;
};
constexpr size_t kMaxBlockSmem = 99 * 1024;

// Padding keys (key_padding_mask True) and keys past Lk are never seen by any query.
__device__ __forceinline__ bool key_visible(const AttentionArgs& a, int64_t b, int64_t j) {
  return j < a.Lk && !(a.kpm && a.kpm[b * a.kpm_stride[0] + j * a.kpm_stride[1]]);
}

// rows x DP tile of a [B, H, L, D] tensor (base at the tile's first row) into shared memory with pitch ld;
// rows past `valid_rows`, invisible keys (KEYS: row r is key n0 + r) and the head-dim padding read as 0, so
// NaN/Inf in padded keys never reaches a product.
template <typename T, int ROWS, int DP, bool KEYS>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* base, const int64_t* stride, int64_t valid_rows,
                                          const AttentionArgs& a, int64_t b, int64_t n0) {
  for (int e = threadIdx.x; e < ROWS * DP; e += blockDim.x) {
    const int r = e / DP, d = e % DP;
    bool ok = r < valid_rows && d < a.D;
    if (KEYS && ok) ok = key_visible(a, b, n0 + r);
    dst[r * ld + d] = ok ? base[r * stride[2] + d * stride[3]] : from_float<T>(0.0f);
  }
}

// The score of query i and key j in natural units (scale * q.k + float mask), -inf where hidden: a key the
// padding mask drops, causal order, a bool mask False or a float mask -inf. Natural units until the row max is
// subtracted keep rows whose scores are all near -6e4 exact.
template <typename T>
__device__ __forceinline__ float masked_score(const AttentionArgs& a, int64_t b, int64_t h, int64_t i, int64_t j,
                                              float dot) {
  if (i >= a.Lq || !key_visible(a, b, j)) return -INFINITY;
  if (a.causal && j > i + a.causal_offset) return -INFINITY;
  float s = dot * a.scale;
  if (a.mask_kind != kNoMask) {
    const int64_t off = b * a.mask_stride[0] + h * a.mask_stride[1] + i * a.mask_stride[2] + j * a.mask_stride[3];
    if (a.mask_kind == kBoolMask) {
      if (!static_cast<const uint8_t*>(a.mask)[off]) return -INFINITY;
    } else {
      const float bias = a.mask_kind == kSameDTypeMask ? to_float(static_cast<const T*>(a.mask)[off])
                                                       : static_cast<const float*>(a.mask)[off];
      if (bias == -INFINITY) return -INFINITY;
      s += bias;
    }
  }
  return s;
}

// Zeroes row c of `rows` (pitch ld) for every key column c of the score tile that no query of the tile sees,
// so a NaN/Inf value or key hidden by the mask cannot turn a zero probability into NaN in a product.
template <typename T, int BM, int BN, int DP>
__device__ __forceinline__ void zero_unseen_keys(const float* scores, int lds, T* rows, int ld) {
  for (int c = threadIdx.x; c < BN; c += blockDim.x) {
    bool seen = false;
    for (int r = 0; r < BM && !seen; ++r) seen = scores[r * lds + c] != -INFINITY;
    if (!seen)
      for (int d = 0; d < DP; ++d) rows[c * ld + d] = from_float<T>(0.0f);
  }
}

// This block's tile: `outer` = b·heads + head, `start` = its first row. B·heads and the tiles of a length fold into
// grid x, so any B·H fits.
struct TileIndex {
  int64_t outer, start;
};
__device__ __forceinline__ TileIndex tile_index(int64_t length, int tile) {
  const int64_t n = (length + tile - 1) / tile;
  return TileIndex{blockIdx.x / n, (blockIdx.x % n) * tile};
}

// Last key (exclusive) a query tile [m0, m0 + BM) visits: causal rows stop at their diagonal.
__device__ __forceinline__ int64_t key_end(const AttentionArgs& a, int64_t m0, int64_t bm) {
  if (!a.causal) return a.Lk;
  const int64_t last = (m0 + bm < a.Lq ? m0 + bm : a.Lq) + a.causal_offset;
  return last < 0 ? 0 : (last > a.Lk ? a.Lk : last);
}

// Calls f(std::integral_constant<int, DP>) with the smallest instantiated head dim >= D.
template <typename T, typename F>
inline void dispatch_head_dim(int64_t d, F&& f) {
  const int64_t max_d = sizeof(T) == 4 ? kAttnMaxHeadDimFloat : kAttnMaxHeadDimHalf;
  if (d < 1 || d > max_d)
    throw std::invalid_argument("attention: head dim " + std::to_string(d) + " is not instantiated for this dtype (1.." +
                                std::to_string(max_d) + ")");
  if (d <= 16) return f(std::integral_constant<int, 16>{});
  if (d <= 32) return f(std::integral_constant<int, 32>{});
  if (d <= 64) return f(std::integral_constant<int, 64>{});
  if constexpr (sizeof(T) != 4) return f(std::integral_constant<int, 128>{});
}

}  // namespace tk
