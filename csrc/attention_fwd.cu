// Attention forward: one block per (batch, head, query tile); K/V tiles stream through shared memory and the
// online softmax keeps a running row max and sum. fp16/bf16: FlashAttention-2's register-resident form
// (attention_fwd_mma_kernel); fp32: products on FMA units over shared-memory tiles (attention_fwd_fma_kernel).
#include "attention_common.cuh"
#include "launch.cuh"

#include <type_traits>

namespace tk {
namespace {

// fp16/bf16 tiles: each of the 4 warps owns 16 query rows; K and V tiles are double-buffered. Q stays in
// registers up to D = 128 (read from shared memory once; its space then holds the per-warp seen-key words), at
// D = 256 in shared memory, where the output accumulator already takes 128 registers a lane. NARROW: 32-key tiles
// at D = 128 for 100 KiB SMs (`attention_forward_narrow`; FlashAttention-2 also takes 32-key tiles on sm_8x).
template <typename T, int DP, bool NARROW = false>
struct MmaFwdLayout {
  static constexpr int kWarps = kAttnThreads / 32;
  static constexpr int BM = 16 * kWarps, BN = DP > 128 || NARROW ? 32 : 64;
  static constexpr bool kQInRegs = DP <= 128;
  static constexpr size_t q = 0, k = q + sizeof(T) * BM * DP, v = k + 2 * sizeof(T) * BN * DP,
                          end = v + 2 * sizeof(T) * BN * DP;
  static constexpr size_t seen = kQInRegs ? q : end;  // kWarps x seen_words words
  static constexpr size_t bytes = kQInRegs ? end : end + sizeof(uint32_t) * kWarps * seen_words<BN / 8>();
  static_assert(bytes <= kMaxBlockSmem, "forward tile exceeds the shared memory of sm_86/sm_89");
};

// A row max in natural units (the backward, the lse and the split-KV merge read it so) from the key loop's: raw
// products in the PLAIN instantiation.
template <bool PLAIN>
__device__ __forceinline__ float natural_max(const AttentionArgs& a, float m) {
  return PLAIN ? m * a.scale : m;
}

// S = Q·Kᵀ, P = softmax, O += P·V per warp on mma.sync m16n8k16 (ptx.cuh has the fragment layouts): a lane holds
// rows g and g + 8 (g = lane / 4) of its warp's 16, columns 2t, 2t + 1 (t = lane % 4) of every 8-wide tile, so a
// row's max and sum reduce over the 4 lanes of a quad, and S's accumulators are, repacked to 16 bits, P's
// A-fragments. K(j+1) and V(j+1) are copied (cp.async) while tile j is computed.
//
// PLAIN (`plain_scores`: no mask tensor, key padding, soft cap or dropout, a positive scale; causal and windows
// allowed) is the instantiation whose per-score cost is FlashAttention-2's: scores stay raw products, a warp tests
// positions only on a tile that crosses the keys' end or its rows' band (`tile_in_band`; interior tiles take no
// test), and a probability is 2^(s·c − m·c) with c = scale·log2(e) — one FFMA and one MUFU.EX2. The general
// instantiation scores through `masked_score` in natural units (a float mask's −6e4 stays exact until the row max
// is subtracted) and takes 2^((s − m)·log2(e)).
template <typename T, int DP, bool PACKED, bool PLAIN, bool NARROW>
__global__ void __launch_bounds__(kAttnThreads, 1) attention_fwd_mma_kernel(AttentionArgs args) {
  using L = MmaFwdLayout<T, DP, NARROW>;
  constexpr int BM = L::BM, BN = L::BN, NT = BN / 8, DT = DP / 8;
  TK_EXTERN_SHARED(unsigned char, smem);
  T* qs = reinterpret_cast<T*>(smem + L::q);
  T* ks = reinterpret_cast<T*>(smem + L::k);
  T* vs = reinterpret_cast<T*>(smem + L::v);
  uint32_t* seen = reinterpret_cast<uint32_t*>(smem + L::seen);

  const TileIndex tile = tile_index(args.Lq, BM);
  const int64_t bh = tile.outer, m0 = tile.start;
  const int64_t b = bh / args.H, h = bh % args.H, hk = h / (args.H / args.Hkv);
  with_sequence<T, PACKED>(args, b, m0, false, [&](const AttentionArgs& a) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const T* q_base = static_cast<const T*>(a.q) + b * a.q_stride[0] + h * a.q_stride[1] + m0 * a.q_stride[2];
    const DropoutDraw drop(a);
    const int64_t rows[2] = {m0 + 16 * warp + g, m0 + 16 * warp + g + 8};
    uint32_t row_hash[2] = {0u, 0u};
    if constexpr (!PLAIN)
      row_hash[0] = drop.row_hash(query_row<PACKED>(a, bh, h, rows[0])),
      row_hash[1] = drop.row_hash(query_row<PACKED>(a, bh, h, rows[1]));
    // Scores to log2 units: raw products (PLAIN) or natural-unit scores.
    const float to_log2 = PLAIN ? a.scale * kLog2e : kLog2e;
    const int64_t hi = key_end(a, m0, BM);
    // Split-KV: this block's chunk of its tile's keys (blockIdx.y; split_len is a multiple of BN, the launcher sizes
    // the splits to the widest band).
    const int64_t n_lo = key_begin(a, m0, BN) + (a.splits > 1 ? blockIdx.y * a.split_len : 0);
    const int64_t n_hi = a.splits > 1 && n_lo + a.split_len < hi ? n_lo + a.split_len : hi;
    auto kv = kv_tiles<T, BN, DP, PLAIN>(a, ks, vs, b, hk, n_lo, n_hi);
    if constexpr (PLAIN && DP <= 128)
      kv.interior_first(interior_tiles(a, m0, a.Lq - m0 < BM ? a.Lq - m0 : BM, n_lo, kv.n_tiles, BN));
    load_tile_swizzled<T, BM, DP, false>(qs, q_base, a.q_stride, a.Lq - m0, a, b, 0,
                                         copies_by_16_bytes<T>(a.q, a.q_stride));
    cp_async_commit();  // Q's copies: their own group, waited for before tile 0's
    kv.start(a, b);

    uint32_t qf[L::kQInRegs ? DP / 16 : 1][4];
    if constexpr (L::kQInRegs) {
      cp_async_wait<1>();
      __syncthreads();  // Q landed from every thread's copies
#pragma unroll
      for (int kk = 0; kk < DP / 16; ++kk) ldmatrix_a<T, DP>(qf[kk], qs, 16 * warp, 16 * kk, lane);
      __syncthreads();  // every warp holds Q: its space becomes the seen-key words
    }
    float o[DT][4] = {};
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};  // l: this lane's share of the row sum

    // One key tile; EDGE: the tile may hold scores that position hides (PLAIN tests them; the general form tests
    // every score).
    const auto step = [&](int it, auto edge) {
      [[maybe_unused]] constexpr bool EDGE = decltype(edge)::value;
      const int64_t n0 = kv.first_key(it);
      kv.advance(a, b, it);
      __syncthreads();  // tile it (and, at D = 256, Q) landed from every thread's copies
      const T* kt = kv.k(it);
      T* vt = kv.v(it);

      // S = Q·Kᵀ (Q's fragments from registers or, at D = 256, shared memory).
      float s[NT][4] = {};
      warp_mma_abt<T, DP, NT>(s, [&](int kk, uint32_t (&af)[4]) {
        if constexpr (L::kQInRegs) {
#pragma unroll
          for (int i = 0; i < 4; ++i) af[i] = qf[kk][i];
        } else {
          ldmatrix_a<T, DP>(af, qs, 16 * warp, 16 * kk, lane);
        }
      }, kt, lane);
      if constexpr (PLAIN) {
        // Keys past the end read as zeros and carry no mask: hiding their scores is all a value needs.
        if (EDGE && (DP > 128 || !tile_in_band(a, m0 + 16 * warp, 16, n0, BN)))
          hide_outside_band(a, s, m0 + 16 * warp, n0, lane);
      } else {
        softcap_products(a, s);
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            s[j][e] = masked_score<T>(a, b, h, rows[e >> 1], n0 + 8 * j + 2 * t + (e & 1), s[j][e]);
        // Keys no query of the block sees: zero value rows (hidden scores already give p = 0).
        if (a.mask_kind != kNoMask) zero_unseen_key_rows<T, DP, NT, L::kWarps>(s, seen, vt, lane, warp);
      }

      // Online softmax on the quad's rows: new max, rescale what was accumulated, probabilities.
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < NT; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[r], mx);
        // A row with nothing visible yet subtracts 0, so 2^-inf = 0 instead of NaN.
        const float m_safe = m_new == -INFINITY ? 0.0f : m_new;
        const float alpha = exp2_approx((m_run[r] - m_safe) * to_log2);
        m_run[r] = m_new;
        l_run[r] *= alpha;
#pragma unroll
        for (int d = 0; d < DT; ++d) o[d][2 * r] *= alpha, o[d][2 * r + 1] *= alpha;
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 2 * r; e < 2 * r + 2; ++e) {
            float p;
            if constexpr (PLAIN) {
              p = exp2_approx(fmaf(s[j][e], to_log2, -m_safe * to_log2));
            } else {
              p = exp2_approx((s[j][e] - m_safe) * kLog2e);
            }
            l_run[r] += p;
            // The sum keeps the undropped probabilities: dropout applies after normalisation.
            if (!PLAIN && !drop.keeps(row_hash[r], n0 + 8 * j + 2 * t + (e & 1))) p = 0.0f;
            s[j][e] = p;
          }
      }

      // O += P·V (S's accumulators, now probabilities, are P's A-fragments).
      warp_mma_pb<T, DP, NT>(o, s, vt, lane);
      __syncthreads();  // every warp is done with this stage before the next iteration refills it
    };
    // The PLAIN form visits the interior tiles first (no position test: FlashAttention-2's loop), then the tiles at
    // the band's edges and the keys' end. At D = 256 one loop tests every tile's positions, without the per-warp
    // interior test: two loop bodies, or that test, made ptxas spill 20-24 bytes at 255 registers (the output
    // accumulators alone hold 128).
    int it = 0;
    if constexpr (PLAIN && DP <= 128)
      for (; it < kv.n_interior; ++it) step(it, std::false_type{});
    for (; it < kv.n_tiles; ++it) step(it, std::true_type{});
    cp_async_wait<0>();  // no tile at all: Q's copies retire here

    float l_full[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l_full[r] = l_run[r] + __shfl_xor_sync(0xffffffffu, l_run[r], 1);
      l_full[r] += __shfl_xor_sync(0xffffffffu, l_full[r], 2);
    }
    if (a.splits > 1) {
      // The partial of this chunk, unnormalised, for attention_combine_kernel.
      const int64_t row0 = static_cast<int64_t>(blockIdx.y) * a.B * a.H * a.Lq + bh * a.Lq;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (rows[r] >= a.Lq) continue;
        store_acc_row(a.o_part + (row0 + rows[r]) * a.D, o, r, lane, a.D, 1.0f);
        if (t == 0) a.m_part[row0 + rows[r]] = natural_max<PLAIN>(a, m_run[r]), a.l_part[row0 + rows[r]] = l_full[r];
      }
      return;
    }
    // Read here rather than kept from the draw above: a value live across the key loop cost the D = 64 packed
    // instantiation its last registers (ptxas spilled 16 bytes at its 128-register choice).
    const float keep_scale = PLAIN ? 1.0f : DropoutDraw(a).keep_scale;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (rows[r] >= a.Lq) continue;
      const int64_t row = query_row<PACKED>(a, bh, h, rows[r]);
      // A row with no visible key has l = 0: output 0 and, through inv_l = 0, zero gradients.
      const float inv = l_full[r] == 0.0f ? 0.0f : 1.0f / l_full[r];
      store_acc_row(static_cast<T*>(a.out) + row * a.D, o, r, lane, a.D, inv * keep_scale);
      if (t == 0) {
        a.row_max[row] = m_run[r] == -INFINITY ? 0.0f : natural_max<PLAIN>(a, m_run[r]);
        a.inv_l[row] = inv;
      }
    }
  });
}

// fp32 tiles: every operand and the accumulators in shared memory, products by block_gemm's FMA loop.
template <typename T, int DP>
struct FwdSmem {
  using Tile = FwdTile<T, DP>;
  static constexpr int BM = Tile::BM, BN = Tile::BN;
  static constexpr int LDT = pitch(DP), LDP = pitch(BN), LDS = pitch(BN), LDO = pitch(DP);
  static constexpr size_t q = 0, k = q + sizeof(T) * BM * LDT, v = k + sizeof(T) * BN * LDT,
                          p = v + sizeof(T) * BN * LDT, s = p + sizeof(T) * BM * LDP, o = s + sizeof(float) * BM * LDS,
                          m = o + sizeof(float) * BM * LDO, l = m + sizeof(float) * BM, bytes = l + sizeof(float) * BM;
  static_assert(bytes <= kMaxBlockSmem, "forward tile exceeds the shared memory of sm_86/sm_89");
};

// (kAttnThreads, 1): without the minimum, ptxas held the dense D = 256 instantiation for sm_90 to 32 registers and
// spilled 32 bytes.
template <typename T, int DP, bool PACKED>
__global__ void __launch_bounds__(kAttnThreads, 1) attention_fwd_fma_kernel(AttentionArgs args) {
  using L = FwdSmem<T, DP>;
  constexpr int BM = L::BM, BN = L::BN;
  TK_EXTERN_SHARED(unsigned char, smem);
  T* qs = reinterpret_cast<T*>(smem + L::q);
  T* ks = reinterpret_cast<T*>(smem + L::k);
  T* vs = reinterpret_cast<T*>(smem + L::v);
  T* ps = reinterpret_cast<T*>(smem + L::p);
  float* ss = reinterpret_cast<float*>(smem + L::s);
  float* os = reinterpret_cast<float*>(smem + L::o);
  float* m_s = reinterpret_cast<float*>(smem + L::m);
  float* l_s = reinterpret_cast<float*>(smem + L::l);

  const TileIndex tile = tile_index(args.Lq, BM);
  const int64_t bh = tile.outer, m0 = tile.start;
  const int64_t b = bh / args.H, h = bh % args.H, hk = h / (args.H / args.Hkv);
  with_sequence<T, PACKED>(args, b, m0, false, [&](const AttentionArgs& a) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;

    load_tile<T, BM, DP, false>(qs, L::LDT, static_cast<const T*>(a.q) + b * a.q_stride[0] + h * a.q_stride[1] + m0 * a.q_stride[2],
                                a.q_stride, a.Lq - m0, a, b, 0);
    for (int e = threadIdx.x; e < BM * L::LDO; e += blockDim.x) os[e] = 0.0f;
    for (int r = threadIdx.x; r < BM; r += blockDim.x) m_s[r] = -INFINITY, l_s[r] = 0.0f;
    const T* k_base = static_cast<const T*>(a.k) + b * a.k_stride[0] + hk * a.k_stride[1];
    const T* v_base = static_cast<const T*>(a.v) + b * a.v_stride[0] + hk * a.v_stride[1];
    const DropoutDraw drop(a);
    const int64_t hi = key_end(a, m0, BM);
    // Split-KV: this block's chunk of its tile's keys (as the mma forward).
    const int64_t n_lo = key_begin(a, m0, BN) + (a.splits > 1 ? blockIdx.y * a.split_len : 0);
    const int64_t n_hi = a.splits > 1 && n_lo + a.split_len < hi ? n_lo + a.split_len : hi;

    for (int64_t n0 = n_lo; n0 < n_hi; n0 += BN) {
      __syncthreads();  // the previous tile's products are done with ks, vs and ps (first pass: qs, os filled)
      load_tile<T, BN, DP, true>(ks, L::LDT, k_base + n0 * a.k_stride[2], a.k_stride, a.Lk - n0, a, b, n0);
      load_tile<T, BN, DP, true>(vs, L::LDT, v_base + n0 * a.v_stride[2], a.v_stride, a.Lk - n0, a, b, n0);
      __syncthreads();  // K and V tiles complete
      block_gemm<BM, BN, DP, false, true>(qs, L::LDT, ks, L::LDT, ss, L::LDS, false);
      __syncthreads();  // raw scores complete
      for (int e = threadIdx.x; e < BM * BN; e += blockDim.x) {
        const int r = e / BN, c = e % BN;
        ss[r * L::LDS + c] = masked_score<T>(a, b, h, m0 + r, n0 + c, softcap_product(a, ss[r * L::LDS + c]));
      }
      __syncthreads();  // masked scores complete
      if (a.mask_kind != kNoMask) zero_unseen_keys<T, BM, BN, DP>(ss, L::LDS, vs, L::LDT);
      // Online softmax, a warp per row: new max, rescale factor for what was summed before, probabilities.
      for (int r = warp; r < BM; r += n_warps) {
        const float m_old = m_s[r];
        float mx = -INFINITY;
        for (int c = lane; c < BN; c += 32) mx = fmaxf(mx, ss[r * L::LDS + c]);
        const float m_new = fmaxf(m_old, warp_allreduce(mx, MaxOp{}));
        // A row with nothing visible yet subtracts 0, so exp(-inf) = 0 instead of NaN.
        const float m_safe = m_new == -INFINITY ? 0.0f : m_new;
        const float alpha = expf(m_old - m_safe);
        const uint32_t row_hash = drop.row_hash(query_row<PACKED>(a, bh, h, m0 + r));
        float sum = 0.0f;
        for (int c = lane; c < BN; c += 32) {
          float p = expf(ss[r * L::LDS + c] - m_safe);
          sum += p;
          // The sum keeps the undropped probabilities: dropout applies after normalisation.
          if (!drop.keeps(row_hash, n0 + c)) p = 0.0f;
          ps[r * L::LDP + c] = from_float<T>(p);
        }
        sum = warp_allreduce(sum, SumOp{});
        for (int d = lane; d < DP; d += 32) os[r * L::LDO + d] *= alpha;
        // Every lane read m_s[r] above; the shuffles do not order shared memory, a warp barrier does
        // (compute-sanitizer racecheck reported the read/write pair on an H200).
        __syncwarp();
        if (lane == 0) m_s[r] = m_new, l_s[r] = l_s[r] * alpha + sum;
      }
      __syncthreads();  // probabilities, rescaled accumulators and zeroed values complete
      block_gemm<BM, DP, BN, false, false>(ps, L::LDP, vs, L::LDT, os, L::LDO, true);
    }
    __syncthreads();  // accumulators final

    if (a.splits > 1) {
      // The partial of this chunk, unnormalised, for attention_combine_kernel.
      const int64_t row0 = static_cast<int64_t>(blockIdx.y) * a.B * a.H * a.Lq + bh * a.Lq + m0;
      for (int e = threadIdx.x; e < BM * DP; e += blockDim.x) {
        const int r = e / DP, d = e % DP;
        if (m0 + r < a.Lq && d < a.D) a.o_part[(row0 + r) * a.D + d] = os[r * L::LDO + d];
      }
      for (int r = threadIdx.x; r < BM; r += blockDim.x) {
        if (m0 + r < a.Lq) a.m_part[row0 + r] = m_s[r], a.l_part[row0 + r] = l_s[r];
      }
      return;
    }
    const int64_t row0 = query_row<PACKED>(a, bh, h, m0), step = row_step<PACKED>(a.H);
    T* out = static_cast<T*>(a.out) + row0 * a.D;
    for (int e = threadIdx.x; e < BM * DP; e += blockDim.x) {
      const int r = e / DP, d = e % DP;
      if (m0 + r >= a.Lq || d >= a.D) continue;
      // A row with no visible key has l = 0: output 0 and, through inv_l = 0, zero gradients.
      const float inv = l_s[r] == 0.0f ? 0.0f : 1.0f / l_s[r];
      out[r * step * a.D + d] = from_float<T>(os[r * L::LDO + d] * inv * drop.keep_scale);
    }
    for (int r = threadIdx.x; r < BM; r += blockDim.x) {
      if (m0 + r >= a.Lq) continue;
      a.row_max[row0 + r * step] = m_s[r] == -INFINITY ? 0.0f : m_s[r];
      a.inv_l[row0 + r * step] = l_s[r] == 0.0f ? 0.0f : 1.0f / l_s[r];
    }
  });
}

constexpr int kCombineThreads = 128;

// Merges the split partials of each row (a warp per row, splits in order: deterministic): each rescaled to the
// row's overall max, normalised once; writes the same output, row max and reciprocal sum as the plain forward,
// so the backward pass cannot tell the two apart.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads) attention_combine_kernel(AttentionArgs a) {
  const int64_t rows = a.B * a.H * a.Lq;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kCombineThreads / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  float m = -INFINITY;
  for (int64_t s = 0; s < a.splits; ++s) m = fmaxf(m, a.m_part[s * rows + row]);
  const float m_safe = m == -INFINITY ? 0.0f : m;
  // Splits outer, each split's weight computed once; a lane holds D / 32 <= kPerLane output elements.
  constexpr int kPerLane = (kAttnMaxHeadDim + 31) / 32;
  float acc[kPerLane] = {};
  float l = 0.0f;
  for (int64_t s = 0; s < a.splits; ++s) {
    const float w = expf(a.m_part[s * rows + row] - m_safe);
    l += a.l_part[s * rows + row] * w;
    const float* o = a.o_part + (s * rows + row) * a.D;
    for (int i = 0; i < kPerLane; ++i)
      if (lane + 32 * i < a.D) acc[i] += o[lane + 32 * i] * w;
  }
  const float inv = l == 0.0f ? 0.0f : 1.0f / l;
  const float keep_scale = a.dropout_p > 0.0f ? 1.0f / (1.0f - a.dropout_p) : 1.0f;
  T* out = static_cast<T*>(a.out) + row * a.D;
  for (int i = 0; i < kPerLane; ++i)
    if (lane + 32 * i < a.D) out[lane + 32 * i] = from_float<T>(acc[i] * inv * keep_scale);
  if (lane == 0) a.row_max[row] = m_safe, a.inv_l[row] = inv;
}

}  // namespace

// The forward's layout (BM, BN, bytes) for an element type and padded head dim: mma.sync for fp16/bf16, FMA for fp32.
template <typename T, int DP>
using ForwardLayout = std::conditional_t<sizeof(T) == 2, MmaFwdLayout<T, DP>, FwdSmem<T, DP>>;

bool attention_forward_narrow(int dtype, int64_t d, int64_t smem_per_sm) {
  if (dtype == kFloat32 || d > 128 || d <= 64 || smem_per_sm <= 0) return false;
  return !two_blocks_fit(MmaFwdLayout<__half, 128>::bytes, smem_per_sm) &&
         two_blocks_fit(MmaFwdLayout<__half, 128, true>::bytes, smem_per_sm);
}

void attention_forward_tile(int dtype, int64_t d, int64_t smem_per_sm, int* bm, int* bn) {
  const bool narrow = attention_forward_narrow(dtype, d, smem_per_sm);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(d, [&](auto dp) {
      *bm = ForwardLayout<T, decltype(dp)::value>::BM;
      *bn = narrow ? MmaFwdLayout<T, 128, true>::BN : ForwardLayout<T, decltype(dp)::value>::BN;
    });
  });
}

bool attention_forward_plain(const AttentionArgs& a) {
  bool plain = false;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    plain = plain_scores<T>(a);
  });
  return plain;
}

size_t attention_forward_smem(int dtype, int64_t d, bool narrow) {
  size_t bytes = 0;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(d, [&](auto dp) {
      constexpr int D = decltype(dp)::value;
      if constexpr (sizeof(T) == 2 && D == 128) bytes = narrow ? MmaFwdLayout<T, D, true>::bytes : ForwardLayout<T, D>::bytes;
      else bytes = ForwardLayout<T, D>::bytes;
    });
  });
  return bytes;
}

void attention_forward(const AttentionArgs& a, tk_stream_t stream) {
  if (a.B * a.H * a.Lq == 0 || a.D == 0) return;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(a.D, [&](auto dp) {
      constexpr int D = decltype(dp)::value;
      using L = ForwardLayout<T, D>;
      const int64_t blocks = a.B * a.H * ((a.Lq + L::BM - 1) / L::BM);
      if (blocks > 0x7fffffffLL) throw std::invalid_argument("attention: more than 2^31-1 query tiles");
      const dim3 grid(static_cast<unsigned>(blocks), a.splits > 1 ? static_cast<unsigned>(a.splits) : 1u);
      if constexpr (sizeof(T) == 2) {
        const bool plain = plain_scores<T>(a);
        const auto run = [&](auto narrow) {
          constexpr bool N = decltype(narrow)::value;
          const auto kernel = a.cu_q ? (plain ? attention_fwd_mma_kernel<T, D, true, true, N>
                                              : attention_fwd_mma_kernel<T, D, true, false, N>)
                                     : (plain ? attention_fwd_mma_kernel<T, D, false, true, N>
                                              : attention_fwd_mma_kernel<T, D, false, false, N>);
          launch(kernel, grid, dim3(kAttnThreads), MmaFwdLayout<T, D, N>::bytes, stream, a);
        };
        // The narrow tile is instantiated at D = 128 only (the one head dim whose wide tile fills a 100 KiB SM).
        if constexpr (D == 128) {
          if (attention_forward_narrow(a.dtype, a.D, a.smem_per_sm)) run(std::true_type{});
          else run(std::false_type{});
        } else {
          run(std::false_type{});
        }
      } else {
        launch(a.cu_q ? attention_fwd_fma_kernel<T, D, true> : attention_fwd_fma_kernel<T, D, false>, grid,
               dim3(kAttnThreads), L::bytes, stream, a);
      }
    });
    if (a.splits > 1) {
      const int64_t rows = a.B * a.H * a.Lq, per_block = kCombineThreads / 32;
      launch(attention_combine_kernel<T>, dim3(static_cast<unsigned>((rows + per_block - 1) / per_block)),
             dim3(kCombineThreads), 0, stream, a);
    }
  });
}

}  // namespace tk
