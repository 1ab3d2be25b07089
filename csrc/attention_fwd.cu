// Attention forward: one block per (batch, head, query tile); K/V tiles stream through shared memory, the
// online softmax keeps a running row max and sum, products run on tensor cores (mma.cuh), fp32 accumulators.
#include "attention_common.cuh"
#include "launch.cuh"

namespace tk {
namespace {

template <typename T, int DP>
struct FwdSmem {
  using Tile = FwdTile<T, DP>;
  static constexpr int BM = Tile::BM, BN = Tile::BN;
  static constexpr int LDT = pitch<T>(DP), LDP = pitch<T>(BN), LDS = pitch<float>(BN), LDO = pitch<float>(DP);
  static constexpr size_t q = 0, k = q + sizeof(T) * BM * LDT, v = k + sizeof(T) * BN * LDT,
                          p = v + sizeof(T) * BN * LDT, s = p + sizeof(T) * BM * LDP, o = s + sizeof(float) * BM * LDS,
                          m = o + sizeof(float) * BM * LDO, l = m + sizeof(float) * BM, bytes = l + sizeof(float) * BM;
  static_assert(bytes <= kMaxBlockSmem, "forward tile exceeds the shared memory of sm_86/sm_89");
};

template <typename T, int DP, bool PACKED>
__global__ void __launch_bounds__(kAttnThreads) attention_fwd_kernel(AttentionArgs args) {
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
    const bool dropout = a.dropout_p > 0.0f;
    const uint32_t threshold = dropout_threshold(a.dropout_p);
    const uint64_t seed = dropout ? *a.seed : 0;
    const int64_t hi = key_end(a, m0, BM);
    // Split-KV: this block's chunk of the keys (blockIdx.y; split_len is a multiple of BN).
    const int64_t n_lo = a.splits > 1 ? blockIdx.y * a.split_len : 0;
    const int64_t n_hi = a.splits > 1 && n_lo + a.split_len < hi ? n_lo + a.split_len : hi;

    for (int64_t n0 = n_lo; n0 < n_hi; n0 += BN) {
      __syncthreads();  // the previous tile's products are done with ks, vs and ps (first pass: qs, os filled)
      load_tile<T, BN, DP, true>(ks, L::LDT, k_base + n0 * a.k_stride[2], a.k_stride, a.Lk - n0, a, b, n0);
      load_tile<T, BN, DP, true>(vs, L::LDT, v_base + n0 * a.v_stride[2], a.v_stride, a.Lk - n0, a, b, n0);
      __syncthreads();  // K and V tiles complete
      block_gemm<T, BM, BN, DP, false, true>(qs, L::LDT, ks, L::LDT, ss, L::LDS, false);
      __syncthreads();  // raw scores complete
      for (int e = threadIdx.x; e < BM * BN; e += blockDim.x) {
        const int r = e / BN, c = e % BN;
        ss[r * L::LDS + c] = masked_score<T>(a, b, h, m0 + r, n0 + c, ss[r * L::LDS + c]);
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
        const uint32_t row_hash = dropout ? dropout_row_hash(seed, query_row<PACKED>(a, bh, h, m0 + r)) : 0u;
        float sum = 0.0f;
        for (int c = lane; c < BN; c += 32) {
          float p = expf(ss[r * L::LDS + c] - m_safe);
          sum += p;
          // The sum keeps the undropped probabilities: dropout applies after normalisation.
          if (dropout && !dropout_keep(row_hash, n0 + c, threshold)) p = 0.0f;
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
      block_gemm<T, BM, DP, BN, false, false>(ps, L::LDP, vs, L::LDT, os, L::LDO, true);
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
    const float keep_scale = dropout ? 1.0f / (1.0f - a.dropout_p) : 1.0f;
    const int64_t row0 = query_row<PACKED>(a, bh, h, m0), step = row_step<PACKED>(a.H);
    T* out = static_cast<T*>(a.out) + row0 * a.D;
    for (int e = threadIdx.x; e < BM * DP; e += blockDim.x) {
      const int r = e / DP, d = e % DP;
      if (m0 + r >= a.Lq || d >= a.D) continue;
      // A row with no visible key has l = 0: output 0 and, through inv_l = 0, zero gradients.
      const float inv = l_s[r] == 0.0f ? 0.0f : 1.0f / l_s[r];
      out[r * step * a.D + d] = from_float<T>(os[r * L::LDO + d] * inv * keep_scale);
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
  static_assert(kAttnMaxHeadDimFloat <= kAttnMaxHeadDimHalf, "the widest head dim bounds kPerLane");
  constexpr int kPerLane = (kAttnMaxHeadDimHalf + 31) / 32;
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

void attention_forward_tile(int dtype, int64_t d, int* bm, int* bn) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim<T>(d, [&](auto dp) {
      *bm = FwdTile<T, decltype(dp)::value>::BM;
      *bn = FwdTile<T, decltype(dp)::value>::BN;
    });
  });
}

void attention_forward(const AttentionArgs& a, tk_stream_t stream) {
  if (a.B * a.H * a.Lq == 0 || a.D == 0) return;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim<T>(a.D, [&](auto dp) {
      using L = FwdSmem<T, decltype(dp)::value>;
      const int64_t blocks = a.B * a.H * ((a.Lq + L::BM - 1) / L::BM);
      if (blocks > 0x7fffffffLL) throw std::invalid_argument("attention: more than 2^31-1 query tiles");
      const unsigned splits = a.splits > 1 ? static_cast<unsigned>(a.splits) : 1u;
      constexpr int D = decltype(dp)::value;
      launch(a.cu_q ? attention_fwd_kernel<T, D, true> : attention_fwd_kernel<T, D, false>,
             dim3(static_cast<unsigned>(blocks), splits), dim3(kAttnThreads), L::bytes, stream, a);
    });
    if (a.splits > 1) {
      const int64_t rows = a.B * a.H * a.Lq, per_block = kCombineThreads / 32;
      launch(attention_combine_kernel<T>, dim3(static_cast<unsigned>((rows + per_block - 1) / per_block)),
             dim3(kCombineThreads), 0, stream, a);
    }
  });
}

}  // namespace tk
