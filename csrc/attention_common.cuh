// Device pieces the attention forward and backward kernels share: tile shapes, tile loads, which keys a
// query sees, and the masked score.
#pragma once

#include <cmath>

#include "attention.h"
#include "block_gemm.cuh"
#include "ptx.cuh"
#include "softmax.h"

namespace tk {

// Tile shapes of the fp32 kernels (fp16/bf16 keep their accumulators in registers: MmaFwdLayout, MmaDqLayout,
// MmaDkdvLayout). Shared memory holds every operand and the fp32 accumulators (the online softmax rescales whole
// rows, block-wide), so tiles shrink with the head dim to stay under the 99 KiB an sm_86/sm_89 block may use; the
// layouts' static_asserts check it. The backward holds six D-wide tiles (q, dO, k, v and the two key-side
// accumulators): 16 rows at D = 128, and at D = 256 16 keys with 8-query tiles.
template <typename T, int DP>
struct FwdTile {
  static_assert(sizeof(T) == 4, "fp16/bf16 run the mma.sync forward");
  static constexpr int BM = DP > 128 ? 16 : 32, BN = BM;
};
template <typename T, int DP>
struct BwdTile {
  static_assert(sizeof(T) == 4, "fp16/bf16 run the mma.sync backward");
  static constexpr int BN = DP > 64 ? 16 : 32;
  static constexpr int BM = DP > 128 ? 8 : BN;
};
constexpr size_t kMaxBlockSmem = 99 * 1024;
// Whether two blocks of `bytes` of dynamic shared memory fit an SM of `smem_per_sm` (the driver keeps 1 KiB of it per
// resident block): the narrow tiles' rule (`attention_forward_narrow`, `attention_backward_narrow`).
inline bool two_blocks_fit(size_t bytes, int64_t smem_per_sm) {
  return 2 * (static_cast<int64_t>(bytes) + 1024) <= smem_per_sm;
}
// The mma kernels exponentiate in log2 units (`exp2_approx`: one MUFU.EX2).
constexpr float kLog2e = 1.4426950408889634f;

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

// ---- register-resident (mma.sync) tiles ----

// Offset of element (row, col) in a [rows][DP] tile of 16-bit elements kept without padding: each row's 16-byte
// chunks are permuted by XOR with the row, so the 8 row addresses of an ldmatrix (one chunk column, 8 rows) fall
// in 8 different 16-byte bank groups of the 128 bytes the banks span. Rows narrower than 128 bytes (DP < 64) XOR
// with the row's position among the rows sharing 128 bytes.
template <int DP>
__host__ __device__ __forceinline__ constexpr int swizzled(int row, int col) {
  constexpr int chunks = DP / 8;
  constexpr int span = chunks >= 8 ? 8 : chunks;
  constexpr int shift = chunks >= 8 ? 0 : (chunks == 4 ? 1 : 2);
  static_assert(chunks >= 2 && (chunks & (chunks - 1)) == 0, "head-dim tiles are 16..256 wide");
  return row * DP + ((((col >> 3) ^ (row >> shift)) & (span - 1)) | ((col >> 3) & ~(span - 1))) * 8 + (col & 7);
}

// swizzled<DP>(row + 16·i, col + 16·k) == (swizzled<DP>(row, col) ^ 16·k) + 16·i·DP for col < 16: the XOR only
// permutes a row's 16-byte chunks (offset bits below log2(DP), which 16·i·DP leaves clear, and chunk + 2k =
// chunk ^ 2k there), and 16-row steps keep each row's pattern. So a fragment loop swizzles a lane's offset once and
// each fragment adds an XOR with a constant and an immediate (the whole swizzle per ldmatrix cost ~2.5 integer
// instructions each in the forward's key loop). `swizzle_steps_hold` checks the identity at compile time.
template <int DP>
__host__ __device__ __forceinline__ constexpr int swizzled_step(int lane_offset, int i, int k) {
  return (lane_offset ^ (16 * k)) + 16 * i * DP;
}
template <int DP>
constexpr bool swizzle_steps_hold() {
  for (int row = 0; row < 64; ++row)
    for (int col = 0; col < 16; col += 8)
      for (int i = 0; i < 4; ++i)
        for (int k = 0; 16 * k < DP; ++k)
          if (swizzled<DP>(row + 16 * i, col + 16 * k) != swizzled_step<DP>(swizzled<DP>(row, col), i, k)) return false;
  return true;
}
static_assert(swizzle_steps_hold<16>() && swizzle_steps_hold<32>() && swizzle_steps_hold<64>() &&
                  swizzle_steps_hold<128>() && swizzle_steps_hold<256>(),
              "swizzled_step");

// Whether a [B, heads, L, D] tensor can be copied in 16-byte pieces (cp.async): 16-byte aligned base, unit
// stride along D and every other stride a multiple of 8 elements (a row always starts 16-byte aligned).
template <typename T>
__host__ __device__ __forceinline__ bool copies_by_16_bytes(const void* base, const int64_t* stride) {
  constexpr int64_t per16 = 16 / sizeof(T);
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && stride[3] == 1 && stride[2] % per16 == 0 &&
         stride[1] % per16 == 0 && stride[0] % per16 == 0;
}

// ROWS x DP tile (base at its first row) into swizzled shared memory, zeros where `load_tile` has them (rows past
// valid_rows, invisible keys, head-dim padding). `async`: cp.async per 16-byte chunk, zero-filled past the valid
// bytes, landing at the caller's wait; otherwise element by element, visible at the caller's next barrier.
template <typename T, int ROWS, int DP, bool KEYS>
__device__ __forceinline__ void load_tile_swizzled(T* dst, const T* base, const int64_t* stride, int64_t valid_rows,
                                                   const AttentionArgs& a, int64_t b, int64_t n0, bool async) {
  constexpr int kChunks = DP / 8;
  for (int e = threadIdx.x; e < ROWS * kChunks; e += blockDim.x) {
    const int r = e / kChunks, c0 = (e % kChunks) * 8;
    bool ok = r < valid_rows && c0 < a.D;
    if (KEYS && ok) ok = key_visible(a, b, n0 + r);
    T* d = dst + swizzled<DP>(r, c0);
    if (async) {
      const int64_t left = a.D - c0;
      cp_async_16(d, ok ? base + r * stride[2] + c0 : base, ok ? (left >= 8 ? 16 : static_cast<int>(left) * 2) : 0);
    } else {
      for (int i = 0; i < 8; ++i)
        d[i] = ok && c0 + i < a.D ? base[r * stride[2] + (c0 + i) * stride[3]] : from_float<T>(0.0f);
    }
  }
}

// Two ROWS x DP tiles of the same rows (K and V, or Q and dO; bases at their first row, row strides s0 and s1) into
// swizzled shared memory by cp.async, for tensors `copies_by_16_bytes` accepts: each thread copies the 16-byte
// chunks at one column c0 of rows r0 + i·kRowStep of both, an unrolled loop with one row test per row (rows past
// valid_rows and head-dim padding read as zeros). The PLAIN passes' tile loads: `load_tile_swizzled`'s
// runtime-bounded loop and per-element fallback made their key loops ~2x the instructions of the products.
template <typename T, int ROWS, int DP>
__device__ __forceinline__ void copy_rows_by_16_bytes(T* dst0, const T* base0, int64_t s0, T* dst1, const T* base1,
                                                      int64_t s1, int64_t valid_rows, int64_t d) {
  constexpr int kChunks = DP / 8, kRowStep = kAttnThreads / kChunks, kPerThread = ROWS * kChunks / kAttnThreads;
  static_assert(kAttnThreads % kChunks == 0 && (ROWS * kChunks) % kAttnThreads == 0, "chunks divide among threads");
  const int r0 = static_cast<int>(threadIdx.x) / kChunks, c0 = (static_cast<int>(threadIdx.x) % kChunks) * 8;
  const int64_t left = d - c0;
  const int col_bytes = left >= 8 ? 16 : (left > 0 ? static_cast<int>(left) * 2 : 0);
  const T* src0 = base0 + r0 * s0 + c0;
  const T* src1 = base1 + r0 * s1 + c0;
  const int64_t valid = valid_rows - r0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int r = i * kRowStep;
    const int bytes = r < valid ? col_bytes : 0;
    cp_async_16(dst0 + swizzled<DP>(r0 + r, c0), bytes ? src0 + r * s0 : base0, bytes);
    cp_async_16(dst1 + swizzled<DP>(r0 + r, c0), bytes ? src1 + r * s1 : base1, bytes);
  }
}

// Tiles of a loop streamed through two shared-memory stages by cp.async: tile `it` sits in stage it % 2. `start`
// issues tile 0 and commits it with the copies the caller issued before; `advance(it)` issues tile it + 1 into the
// other stage (which the caller's end-of-iteration barrier has released) and waits for this thread's copies of tile
// it; the caller's next barrier makes every thread's copies (and plain stores) visible. Tiles::load(a, b, it)
// issues one tile.
template <typename Tiles>
struct TwoStages {
  __device__ void start(const AttentionArgs& a, int64_t b) const {
    const Tiles& t = static_cast<const Tiles&>(*this);
    if (t.n_tiles > 0) t.load(a, b, 0);
    cp_async_commit();
  }
  __device__ void advance(const AttentionArgs& a, int64_t b, int it) const {
    const Tiles& t = static_cast<const Tiles&>(*this);
    if (it + 1 < t.n_tiles) {
      t.load(a, b, it + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
  }
};

// Key tiles [first, end) of a key loop.
struct TileRange {
  int first, end;
};

// The K and V tiles of a key loop: keys n_lo + it·BN.. of one batch and KV head. BY_POSITION (the PLAIN passes'
// tiles: no padding mask, both tensors copied by 16 bytes) by `copy_rows_by_16_bytes`; otherwise
// `load_tile_swizzled` per tile.
template <typename T, int BN, int DP, bool BY_POSITION = false>
struct KvTiles : TwoStages<KvTiles<T, BN, DP, BY_POSITION>> {
  T* k_smem;
  T* v_smem;
  const T* k_base;
  const T* v_base;
  bool k_async, v_async;
  int64_t n_lo;
  int n_tiles;
  // Visit order (`interior_first`): visits [0, n_interior) are tiles it_lo.., then the tiles before it_lo, then
  // those after; 0 / 0 = key order.
  int it_lo = 0, n_interior = 0;

  __device__ T* k(int it) const { return k_smem + (it & 1) * BN * DP; }
  __device__ T* v(int it) const { return v_smem + (it & 1) * BN * DP; }
  __device__ int64_t first_key(int it) const {
    const int tile = it < n_interior ? it_lo + it : (it < n_interior + it_lo ? it - n_interior : it);
    return n_lo + static_cast<int64_t>(tile) * BN;
  }
  // Visits the tiles [range.first, range.end) first.
  __device__ void interior_first(TileRange range) { it_lo = range.first, n_interior = range.end - range.first; }
  __device__ void load(const AttentionArgs& a, int64_t b, int it) const {
    const int64_t n0 = first_key(it);
    if constexpr (BY_POSITION) {
      copy_rows_by_16_bytes<T, BN, DP>(k(it), k_base + n0 * a.k_stride[2], a.k_stride[2], v(it),
                                       v_base + n0 * a.v_stride[2], a.v_stride[2], a.Lk - n0, a.D);
    } else {
      load_tile_swizzled<T, BN, DP, true>(k(it), k_base + n0 * a.k_stride[2], a.k_stride, a.Lk - n0, a, b, n0, k_async);
      load_tile_swizzled<T, BN, DP, true>(v(it), v_base + n0 * a.v_stride[2], a.v_stride, a.Lk - n0, a, b, n0, v_async);
    }
  }
};

// The key loop's tiles of (batch b, KV head hk) over keys [n_lo, n_hi), in k_smem / v_smem (2 stages each).
template <typename T, int BN, int DP, bool BY_POSITION = false>
__device__ __forceinline__ KvTiles<T, BN, DP, BY_POSITION> kv_tiles(const AttentionArgs& a, T* k_smem, T* v_smem,
                                                                    int64_t b, int64_t hk, int64_t n_lo, int64_t n_hi) {
  return KvTiles<T, BN, DP, BY_POSITION>{{}, k_smem, v_smem,
                                         static_cast<const T*>(a.k) + b * a.k_stride[0] + hk * a.k_stride[1],
                                         static_cast<const T*>(a.v) + b * a.v_stride[0] + hk * a.v_stride[1],
                                         copies_by_16_bytes<T>(a.k, a.k_stride), copies_by_16_bytes<T>(a.v, a.v_stride),
                                         n_lo, n_hi > n_lo ? static_cast<int>((n_hi - n_lo + BN - 1) / BN) : 0};
}

// ---- warp products on mma.sync: a warp owns 16 rows; a lane holds rows g, g + 8 (g = lane / 4) and columns
// 2t, 2t + 1 (t = lane % 4) of every 8-wide accumulator tile (ptx.cuh has the fragment layouts) ----

// A-fragment (16 x 16 at column k0) of rows row0.. of a swizzled row-major tile: lanes 0-15 address rows 0-15 at
// k0, lanes 16-31 the same rows at k0 + 8 (the matrices: rows 0-7, rows 8-15, then the same 8 columns on).
template <typename T, int DP>
__device__ __forceinline__ void ldmatrix_a(uint32_t (&f)[4], const T* tile, int row0, int k0, int lane) {
  // row0 and k0 are multiples of 16 at every call
  ldmatrix_x4<false>(f, tile + swizzled_step<DP>(swizzled<DP>(lane & 15, 8 * (lane >> 4)), row0 / 16, k0 / 16));
}

// acc [16 x 8·NT] += A · Bᵀ over DP: B a swizzled [8·NT][DP] tile (key-major K, V), whose non-transposed rows are
// B-fragments, two 8-row tiles per ldmatrix; `a_frag(kk, f)` gives A's fragment for columns 16kk...
template <typename T, int DP, int NT, typename AFrag>
__device__ __forceinline__ void warp_mma_abt(float (&acc)[NT][4], AFrag&& a_frag, const T* b_tile, int lane) {
  static_assert(NT % 2 == 0, "key tiles are multiples of 16");
  const int b_lane = swizzled<DP>((lane & 7) + 8 * (lane >> 4), 8 * ((lane >> 3) & 1));
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    uint32_t af[4];
    a_frag(kk, af);
#pragma unroll
    for (int j = 0; j < NT / 2; ++j) {
      uint32_t bf[4];
      ldmatrix_x4<false>(bf, b_tile + swizzled_step<DP>(b_lane, j, kk));
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      mma_16816<T>(acc[2 * j], af, b0, acc[2 * j]);
      mma_16816<T>(acc[2 * j + 1], af, b1, acc[2 * j + 1]);
    }
  }
}

// The swizzled-tile product of the backward passes: acc += A[row0 : row0 + 16]·Bᵀ, A's fragments read by ldmatrix
// from a swizzled [rows][DP] tile.
template <typename T, int DP, int NT>
__device__ __forceinline__ void warp_mma_rows_abt(float (&acc)[NT][4], const T* a_tile, int row0, const T* b_tile,
                                                  int lane) {
  warp_mma_abt<T, DP, NT>(acc, [&](int kk, uint32_t (&af)[4]) { ldmatrix_a<T, DP>(af, a_tile, row0, 16 * kk, lane); },
                          b_tile, lane);
}

// acc [16 x DC] += P · B[:, col0 : col0 + DC]: P [16 x 8·NT] in accumulator layout, whose tiles 2kk and 2kk + 1
// repacked to 16 bits are A's fragment for rows 16kk.. of B; B a swizzled [8·NT][DP] tile, transposed by
// ldmatrix .trans into B-fragments, two 8-wide column tiles per load.
template <typename T, int DP, int NT, int DC = DP>
__device__ __forceinline__ void warp_mma_pb(float (&acc)[DC / 8][4], const float (&p)[NT][4], const T* b_tile, int lane,
                                            int col0 = 0) {
  // col0 is a multiple of 16 at every call
  const int b_lane = swizzled<DP>((lane & 7) + 8 * ((lane >> 3) & 1), 8 * (lane >> 4));
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    const uint32_t pf[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                            pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]), pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int jd = 0; jd < DC / 16; ++jd) {
      uint32_t bf[4];
      ldmatrix_x4<true>(bf, b_tile + swizzled_step<DP>(b_lane, kk, col0 / 16 + jd));
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      mma_16816<T>(acc[2 * jd], pf, b0, acc[2 * jd]);
      mma_16816<T>(acc[2 * jd + 1], pf, b1, acc[2 * jd + 1]);
    }
  }
}

// Writes this lane's share of accumulator row r (0: row g, 1: row g + 8 of the warp's 16) times `scale` to `out`,
// that row's first element, for the columns below d.
template <typename Out, int DT>
__device__ __forceinline__ void store_acc_row(Out* out, const float (&acc)[DT][4], int r, int lane, int64_t d,
                                              float scale) {
  const int t = lane & 3;
#pragma unroll
  for (int j = 0; j < DT; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int col = 8 * j + 2 * t + e;
      if (col < d) out[col] = from_float<Out>(acc[j][2 * r + e] * scale);
    }
}

// Seen-key words a block needs for a tile of 8·NT keys: one bit per key per warp.
template <int NT>
__host__ __device__ constexpr int seen_words() { return (8 * NT + 31) / 32; }

// Zeroes row c of `rows_tile` (swizzled [8·NT][DP]) for every key c that no row of the block sees (s = -inf in
// every warp's scores), so NaN/Inf there cannot reach a product through 0·NaN: a ballot per column pair gives the
// warp's view, the block's is the OR over the warps' words in `seen` (kWarps x seen_words). Block-wide (barriers).
template <typename T, int DP, int NT, int kWarps>
__device__ __forceinline__ void zero_unseen_key_rows(const float (&s)[NT][4], uint32_t* seen, T* rows_tile, int lane,
                                                     int warp) {
  constexpr int W = seen_words<NT>();
  uint32_t words[W] = {};
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const unsigned lanes = __ballot_sync(0xffffffffu, s[j][e] != -INFINITY || s[j][e + 2] != -INFINITY);
#pragma unroll
      for (int tt = 0; tt < 4; ++tt)
        if (lanes & (0x11111111u << tt)) {
          const int col = 8 * j + 2 * tt + e;
          words[col >> 5] |= 1u << (col & 31);
        }
    }
  if (lane == 0)
#pragma unroll
    for (int w = 0; w < W; ++w) seen[warp * W + w] = words[w];
  __syncthreads();  // every warp's words written
  for (int c = threadIdx.x; c < 8 * NT; c += blockDim.x) {
    uint32_t any = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) any |= seen[w * W + (c >> 5)];
    if (!(any >> (c & 31) & 1u))
      for (int d = 0; d < DP; ++d) rows_tile[c * DP + d] = from_float<T>(0.0f);  // the whole row, any swizzle
  }
  __syncthreads();  // rows zeroed before any warp reads them; the words are read
}

// The forward's dropout draw as every attention kernel reads it: off at p = 0; element (row, col) is kept by the
// counter-based hash of the row's hash and col, and kept elements scale by 1 / (1 - p).
struct DropoutDraw {
  bool on;
  uint32_t threshold;
  uint64_t seed;
  float keep_scale;
  __device__ explicit DropoutDraw(const AttentionArgs& a)
      : on(a.dropout_p > 0.0f), threshold(dropout_threshold(a.dropout_p)), seed(on ? *a.seed : 0),
        keep_scale(on ? 1.0f / (1.0f - a.dropout_p) : 1.0f) {}
  __device__ uint32_t row_hash(int64_t row) const { return on ? dropout_row_hash(seed, row) : 0u; }
  __device__ bool keeps(uint32_t row_hash, int64_t col) const { return !on || dropout_keep(row_hash, col, threshold); }
  // keep_scale where kept, 0 where dropped
  __device__ float scale(uint32_t row_hash, int64_t col) const { return keeps(row_hash, col) ? keep_scale : 0.0f; }
};

// tanh(x) = sign(x)·(1 − e^(−2|x|)) / (1 + e^(−2|x|)): one exponential and a division, finite for every x. tanhf's
// polynomial and branches cost the registers the D = 64 mma forward does not have on sm_86 (it spilled 16 bytes).
__device__ __forceinline__ float softcap_tanh(float x) {
  const float e = __expf(-2.0f * fabsf(x));
  return copysignf(__fdividef(1.0f - e, 1.0f + e), x);
}

// Gemma 2's soft cap applied to a tile's raw products in place, before `masked_score` scales and masks them:
// dot becomes c·tanh(scale·dot / c) / scale. A pass of its own under one uniform branch, reading c and scale from
// the kernel parameters per score: inside masked_score's per-score logic, or with the two ratios held in registers
// across the pass, the D = 64 packed mma forward spilled 16 bytes on sm_86.
__device__ __forceinline__ float softcap_product(const AttentionArgs& a, float dot) {
  return a.softcap > 0.0f ? a.softcap / a.scale * softcap_tanh(dot * (a.scale / a.softcap)) : dot;
}
template <int N, int M>
__device__ __forceinline__ void softcap_products(const AttentionArgs& a, float (&dot)[N][M]) {
  if (a.softcap <= 0.0f) return;
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int e = 0; e < M; ++e) dot[j][e] = a.softcap * softcap_tanh(dot[j][e] * a.scale / a.softcap) / a.scale;
}

// The score of query i and key j in natural units (scale * q.k + ALiBi's bias + float mask), -inf where hidden: a key the
// padding mask drops, causal order, a bool mask False or a float mask -inf. Natural units until the row max is
// subtracted keep rows whose scores are all near -6e4 exact.
template <typename T>
__device__ __forceinline__ float masked_score(const AttentionArgs& a, int64_t b, int64_t h, int64_t i, int64_t j,
                                              float dot) {
  if (i >= a.Lq || !key_visible(a, b, j)) return -INFINITY;
  if (a.causal) {
    const int64_t rel = j - i - a.causal_offset;  // the key band (AttentionArgs::window_left/right)
    if (rel > a.window_right || rel < -a.window_left) return -INFINITY;
  }
  float s = dot * a.scale;
  if (a.alibi != nullptr)
    s -= a.alibi[b * a.alibi_stride[0] + h * a.alibi_stride[1]] * fabsf(static_cast<float>(i + a.causal_offset - j));
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

// The soft cap's slope from a capped product (`softcap_products`): d(c·tanh(s/c))/ds = 1 − tanh², where
// tanh = scale·capped / c; 1 without a cap. dS reaches dQ and dK through it; a float mask's gradient (the mask is
// added after the cap) is dS before it.
__device__ __forceinline__ float softcap_slope(const AttentionArgs& a, float capped) {
  if (a.softcap <= 0.0f) return 1.0f;
  const float t = capped * (a.scale / a.softcap);
  return 1.0f - t * t;
}

// A recomputed probability and its score gradient (the backward passes): P = exp(s - max) · (1 / sum), dropped by
// `kept` (1 / (1 - p) or 0, the forward's draw), and dS = P·(dP·kept - delta) with the undropped P. A hidden score
// gives exact zeros (never 0·NaN from a masked NaN value).
struct ProbGrad {
  float p, ds;
};
// FAST_EXP (the fp16/bf16 mma passes): 2^((s − max)·log2 e) by one MUFU.EX2; fp32 keeps expf's accuracy.
template <bool FAST_EXP = false>
__device__ __forceinline__ ProbGrad prob_and_grad(float s, float row_max, float inv_l, float dp, float delta,
                                                  float kept) {
  if (s == -INFINITY) return ProbGrad{0.0f, 0.0f};
  const float p = (FAST_EXP ? exp2_approx((s - row_max) * kLog2e) : expf(s - row_max)) * inv_l;
  return ProbGrad{p * kept, p * (dp * kept - delta)};
}

// The PLAIN backward passes' form of `prob_and_grad`: P = 2^(dot·c − m2)·(1/sum) from a raw product (c =
// scale·log2 e, m2 the row max in log2 units; a hidden product is −inf, so P = dS = 0) and dS = P·(dP − delta).
__device__ __forceinline__ ProbGrad plain_prob_and_grad(float dot, float to_log2, float m2, float inv_l, float dp,
                                                        float delta) {
  const float p = exp2_approx(fmaf(dot, to_log2, -m2)) * inv_l;
  return ProbGrad{p, p * (dp - delta)};
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

// The packed arguments (cu_q set) of sequence b as a block sees them: the sequence's lengths and causal offset, and
// q, dout, k, v moved to its first rows, so the dense indexing (batch stride 0) reads inside it. Output rows go
// through `query_row` / `key_row`. The kernels are instantiated per form (PACKED, `with_sequence`): a dense block
// keeps reading its arguments from the parameter space, where a runtime choice would hold a copy of them in
// registers (and spilled).
template <typename T>
__device__ __forceinline__ AttentionArgs sequence_view(const AttentionArgs& a, int64_t b) {
  AttentionArgs s = a;
  s.q0 = a.cu_q[b], s.k0 = a.cu_k[b];
  s.Lq = a.cu_q[b + 1] - s.q0, s.Lk = a.cu_k[b + 1] - s.k0;
  s.causal_offset = a.causal_offset ? s.Lk - s.Lq : 0;
  s.q = static_cast<const T*>(a.q) + s.q0 * a.q_stride[2];
  s.k = static_cast<const T*>(a.k) + s.k0 * a.k_stride[2];
  s.v = static_cast<const T*>(a.v) + s.k0 * a.v_stride[2];
  if (a.dout != nullptr) s.dout = static_cast<const T*>(a.dout) + s.q0 * a.do_stride[2];
  return s;
}

// Runs the block body `block(a)` on the block's arguments: dense, the kernel parameter itself (every helper takes
// it by reference and reads the parameter space); packed, its sequence's view, unless the sequence ends before the
// block's first row (`start`, a query row or with `keys` a key row): the grid covers the longest sequence.
template <typename T, bool PACKED, typename F>
__device__ __forceinline__ void with_sequence(const AttentionArgs& args, int64_t b, int64_t start, bool keys,
                                              F&& block) {
  if constexpr (PACKED) {
    const AttentionArgs view = sequence_view<T>(args, b);
    if (start < (keys ? view.Lk : view.Lq)) block(view);
  } else {
    block(args);
  }
}

// Row of (bh = b·H + h, query i) in out, dq, row_max, inv_l, delta and the dropout draw: dense [B, H, Lq] order,
// packed [total_q, H] order (`sequence_view`'s arguments).
template <bool PACKED>
__device__ __forceinline__ int64_t query_row(const AttentionArgs& s, int64_t bh, int64_t h, int64_t i) {
  if constexpr (PACKED) return (s.q0 + i) * s.H + h;
  else return bh * s.Lq + i;
}
// Rows between consecutive queries (keys: with Hkv) of one head: 1 dense, H packed.
template <bool PACKED>
__device__ __forceinline__ int64_t row_step(int64_t heads) {
  if constexpr (PACKED) return heads;
  else return 1;
}
// Row of (bhk = b·Hkv + hk, key j) in dk and dv.
template <bool PACKED>
__device__ __forceinline__ int64_t key_row(const AttentionArgs& s, int64_t bhk, int64_t hk, int64_t j) {
  if constexpr (PACKED) return (s.k0 + j) * s.Hkv + hk;
  else return bhk * s.Lk + j;
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

// Last key (exclusive) a query tile [m0, m0 + BM) visits: banded rows stop at their diagonal (+ window_right).
__device__ __forceinline__ int64_t key_end(const AttentionArgs& a, int64_t m0, int64_t bm) {
  if (!a.causal) return a.Lk;
  const int64_t last = (m0 + bm < a.Lq ? m0 + bm : a.Lq) + a.causal_offset + a.window_right;
  return last < 0 ? 0 : (last > a.Lk ? a.Lk : last);
}

// First key a query tile starting at m0 visits, rounded down to a key tile (bn): a sliding window's left edge for
// its first row; 0 without a band.
__device__ __forceinline__ int64_t key_begin(const AttentionArgs& a, int64_t m0, int64_t bn) {
  if (!a.causal) return 0;
  const int64_t first = m0 + a.causal_offset - a.window_left;
  return first <= 0 ? 0 : first / bn * bn;
}

// The query rows [first, end) that see some key of the key tile [n0, n0 + bn) (the dK/dV passes), the first rounded
// down to a query tile (bm): j - window_right <= i + causal_offset <= j + window_left.
struct QueryRange {
  int64_t first, end;
};
__device__ __forceinline__ QueryRange query_range(const AttentionArgs& a, int64_t n0, int64_t bn, int64_t bm) {
  if (!a.causal) return QueryRange{0, a.Lq};
  const int64_t first = n0 - a.causal_offset - a.window_right;
  const int64_t last_key = (n0 + bn < a.Lk ? n0 + bn : a.Lk) - 1;
  const int64_t end = last_key - a.causal_offset + a.window_left + 1;
  return QueryRange{first <= 0 ? 0 : first / bm * bm, end < 0 ? 0 : (end > a.Lq ? a.Lq : end)};
}

// An int64 offset between positions as a 32-bit tile offset, clamped past any tile (±2^20: an unbounded side).
__device__ __forceinline__ int tile_offset(int64_t x) {
  constexpr int64_t kFar = 1 << 20;
  return static_cast<int>(x < -kFar ? -kFar : (x > kFar ? kFar : x));
}

// Hides (−inf) this lane's scores of an mma score tile (a warp's 16 query rows from row0, 8·NT keys from n0) that
// position hides — a key past Lk, or, banded, outside its row's band — in 32-bit tile coordinates: key column c of
// row r is seen iff c < end and lo <= c − r <= hi. Bounds are moved to this lane's (row g, column 2t) so each score
// compares constants.
template <int NT>
__device__ __forceinline__ void hide_outside_band(const AttentionArgs& a, float (&s)[NT][4], int64_t row0,
                                                  int64_t n0, int lane) {
  const int g = lane >> 2, t2 = 2 * (lane & 3);
  const int end = tile_offset(a.Lk - n0) - t2;
  int lo = tile_offset(INT64_MIN / 2), hi = tile_offset(INT64_MAX / 2);
  if (a.causal) {  // j − i − causal_offset = (c − r) + (n0 − row0 − causal_offset)
    const int64_t base = n0 - row0 - a.causal_offset;
    lo = tile_offset(-a.window_left - base) - (t2 - g), hi = tile_offset(a.window_right - base) - (t2 - g);
  }
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int c = 8 * j + (e & 1), d = c - 8 * (e >> 1);
      if (c >= end || d < lo || d > hi) s[j][e] = -INFINITY;
    }
}

// The dK/dV form of `hide_outside_band`: a warp's 16 key rows from key0, 8·NT query columns from m0. Only the band
// hides here: a key past Lk (its K row reads as zeros) has no dK/dV row written and a query past Lq has 1/sum = 0.
template <int NT>
__device__ __forceinline__ void hide_outside_band_by_key(const AttentionArgs& a, float (&s)[NT][4], int64_t key0,
                                                         int64_t m0, int lane) {
  const int g = lane >> 2, t2 = 2 * (lane & 3);
  // j − i − causal_offset = (r − c) + (key0 − m0 − causal_offset) for key row r, query column c
  const int64_t base = key0 - m0 - a.causal_offset;
  const int lo = tile_offset(-a.window_left - base) - (g - t2), hi = tile_offset(a.window_right - base) - (g - t2);
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int d = 8 * (e >> 1) - (8 * j + (e & 1));
      if (d < lo || d > hi) s[j][e] = -INFINITY;
    }
}

// Whether every (query, key) pair of [m0, m0 + bm) x [n0, n0 + bn) lies inside the key band (always without one):
// the band's nearest and farthest pairs are the tiles' corners.
__device__ __forceinline__ bool band_holds(const AttentionArgs& a, int64_t m0, int bm, int64_t n0, int bn) {
  if (!a.causal) return true;
  return n0 - (m0 + bm - 1) - a.causal_offset >= -a.window_left && n0 + bn - 1 - m0 - a.causal_offset <= a.window_right;
}

// Whether every query of [m0, m0 + bm) sees every key of [n0, n0 + bn) by position (no key past Lk, every pair
// inside the band): such an interior tile needs no per-score test.
__device__ __forceinline__ bool tile_in_band(const AttentionArgs& a, int64_t m0, int bm, int64_t n0, int bn) {
  return n0 + bn <= a.Lk && band_holds(a, m0, bm, n0, bn);
}

// The tiles of a key loop over [n_lo, n_lo + n·bn) in which every query of [m0, m0 + rows) sees every key by
// position (`tile_in_band` holds): wholly inside Lk and, banded, n0 >= m0 + rows − 1 + offset − left and
// n0 + bn − 1 <= m0 + offset + right. The band's tiles form one run (empty: first = end).
__device__ __forceinline__ TileRange interior_tiles(const AttentionArgs& a, int64_t m0, int64_t rows, int64_t n_lo,
                                                    int n, int bn) {
  const auto floor_div = [](int64_t x, int64_t y) { return x >= 0 ? x / y : -((-x + y - 1) / y); };
  int64_t first = 0, end = floor_div(a.Lk - n_lo, bn);
  if (a.causal) {
    const int64_t lo = -floor_div(-(m0 + rows - 1 + a.causal_offset - a.window_left - n_lo), bn);  // ceiling
    const int64_t hi = floor_div(m0 + a.causal_offset + a.window_right - bn + 1 - n_lo, bn) + 1;
    first = lo > first ? lo : first;
    end = hi < end ? hi : end;
  }
  first = first < 0 ? 0 : (first > n ? n : first);
  end = end < first ? first : (end > n ? n : end);
  return TileRange{static_cast<int>(first), static_cast<int>(end)};
}

// Whether the fp16/bf16 passes run their PLAIN form (attention_fwd.cu, attention_bwd.cu): nothing hides a score but
// position (keys' end, causal band, window), nothing changes one but the scale, whose sign lets a row max be taken
// over raw products, and K and V are copied by 16 bytes (`KvTiles` BY_POSITION).
template <typename T>
inline bool plain_scores(const AttentionArgs& a) {
  return sizeof(T) == 2 && a.mask_kind == kNoMask && a.kpm == nullptr && a.softcap == 0.0f && a.dropout_p == 0.0f &&
         a.alibi == nullptr &&
         a.scale > 0.0f && std::isfinite(a.scale) && copies_by_16_bytes<T>(a.k, a.k_stride) &&
         copies_by_16_bytes<T>(a.v, a.v_stride);
}

// Calls f(std::integral_constant<int, DP>) with the smallest instantiated head dim >= D.
template <typename F>
inline void dispatch_head_dim(int64_t d, F&& f) {
  if (d < 1 || d > kAttnMaxHeadDim)
    throw std::invalid_argument("attention: head dim " + std::to_string(d) + " is not instantiated (1.." +
                                std::to_string(kAttnMaxHeadDim) + ")");
  if (d <= 16) return f(std::integral_constant<int, 16>{});
  if (d <= 32) return f(std::integral_constant<int, 32>{});
  if (d <= 64) return f(std::integral_constant<int, 64>{});
  if (d <= 128) return f(std::integral_constant<int, 128>{});
  return f(std::integral_constant<int, 256>{});
}

}  // namespace tk
