// Attention backward, deterministic (no atomics): delta = rowsum(dO * O); dK/dV per key tile iterating
// over the query tiles of every head of its GQA group in a fixed order; dQ per query tile in its own pass.
// fp16/bf16 on mma.sync with register accumulators, fp32 on FMA units over shared-memory tiles.
// Probabilities are recomputed from the saved row max and 1/sum, dropout from the same counter-based draw.
#include "attention_common.cuh"
#include "launch.cuh"

#include <type_traits>

namespace tk {
namespace {

constexpr int kDeltaThreads = 128;

// Rows of out / dout: B·H·Lq dense, total_q·H packed.
__host__ __device__ inline int64_t delta_rows(const AttentionArgs& a) {
  return a.cu_q ? a.total_q * a.H : a.B * a.H * a.Lq;
}

template <typename T>
__global__ void __launch_bounds__(kDeltaThreads) attention_delta_kernel(AttentionArgs a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= delta_rows(a)) return;  // whole warps leave together; no block barrier follows
  // Dense rows are (b·H + h)·Lq + i, packed ones t·H + h (t the row of q; batch stride 0).
  const int64_t i = a.cu_q ? row / a.H : row % a.Lq, bh = a.cu_q ? row % a.H : row / a.Lq;
  const T* o = static_cast<const T*>(a.out) + row * a.D;
  const T* d_o = static_cast<const T*>(a.dout) + (bh / a.H) * a.do_stride[0] + (bh % a.H) * a.do_stride[1] + i * a.do_stride[2];
  float acc = 0.0f;
  for (int64_t d = lane; d < a.D; d += 32) acc += to_float(o[d]) * to_float(d_o[d * a.do_stride[3]]);
  acc = warp_allreduce(acc, SumOp{});
  if (lane == 0) a.delta[row] = acc;
}

template <typename T, int DP>
struct BwdSmem {
  static constexpr int BM = BwdTile<T, DP>::BM, BN = BwdTile<T, DP>::BN;
  static constexpr int LDT = pitch(DP), LDP = pitch(BN), LDS = pitch(BN), LDO = pitch(DP);
  // q, dO, k, v tiles; two fp32 accumulators (dK and dV, or dQ and unused); S and dP; P and dS in T.
  static constexpr size_t q = 0, dout = q + sizeof(T) * BM * LDT, k = dout + sizeof(T) * BM * LDT,
                          v = k + sizeof(T) * BN * LDT, acc0 = v + sizeof(T) * BN * LDT,
                          acc1 = acc0 + sizeof(float) * BN * LDO, s = acc1 + sizeof(float) * BN * LDO,
                          dp = s + sizeof(float) * BM * LDS, p = dp + sizeof(float) * BM * LDS,
                          ds = p + sizeof(T) * BM * LDP, stats = ds + sizeof(T) * BM * LDP,
                          bytes = stats + 3 * sizeof(float) * BM;
  static_assert(BM <= BN, "the dQ pass reuses the key-tile accumulator space for its query tile");
  static_assert(bytes <= kMaxBlockSmem, "backward tile exceeds the shared memory of sm_86/sm_89");
};

template <typename T, int DP>
struct BwdTiles {
  using L = BwdSmem<T, DP>;
  T *q, *dout, *k, *v, *p, *ds;
  float *acc0, *acc1, *s, *dp, *m, *inv_l, *delta;
  __device__ explicit BwdTiles(unsigned char* smem)
      : q(reinterpret_cast<T*>(smem + L::q)), dout(reinterpret_cast<T*>(smem + L::dout)),
        k(reinterpret_cast<T*>(smem + L::k)), v(reinterpret_cast<T*>(smem + L::v)),
        p(reinterpret_cast<T*>(smem + L::p)), ds(reinterpret_cast<T*>(smem + L::ds)),
        acc0(reinterpret_cast<float*>(smem + L::acc0)), acc1(reinterpret_cast<float*>(smem + L::acc1)),
        s(reinterpret_cast<float*>(smem + L::s)), dp(reinterpret_cast<float*>(smem + L::dp)),
        m(reinterpret_cast<float*>(smem + L::stats)), inv_l(m + L::BM), delta(inv_l + L::BM) {}
};

// Loads the query-side tiles (q, dO) and row statistics of head h, rows [m0, m0 + BM).
template <typename T, int DP, bool PACKED>
__device__ __forceinline__ void load_query_side(const AttentionArgs& a, BwdTiles<T, DP>& t, int64_t b, int64_t h, int64_t m0) {
  using L = BwdSmem<T, DP>;
  load_tile<T, L::BM, DP, false>(t.q, L::LDT, static_cast<const T*>(a.q) + b * a.q_stride[0] + h * a.q_stride[1] + m0 * a.q_stride[2],
                                 a.q_stride, a.Lq - m0, a, b, 0);
  load_tile<T, L::BM, DP, false>(t.dout, L::LDT,
                                 static_cast<const T*>(a.dout) + b * a.do_stride[0] + h * a.do_stride[1] + m0 * a.do_stride[2],
                                 a.do_stride, a.Lq - m0, a, b, 0);
  const int64_t row0 = query_row<PACKED>(a, b * a.H + h, h, m0), step = row_step<PACKED>(a.H);
  for (int r = threadIdx.x; r < L::BM; r += blockDim.x) {
    const bool ok = m0 + r < a.Lq;
    t.m[r] = ok ? a.row_max[row0 + r * step] : 0.0f;
    t.inv_l[r] = ok ? a.inv_l[row0 + r * step] : 0.0f;
    t.delta[r] = ok ? a.delta[row0 + r * step] : 0.0f;
  }
}

// S = Q K^T and dP = dO V^T of the tiles in shared memory, then, elementwise, the dropped probabilities
// P (for dV) and dS = P * (dP - delta) (for dK and dQ). Masked scores are left as -inf in s. With `ds_out`
// (the dQ pass of a float mask that requires grad) dS is also stored in fp32: it is the mask's gradient.
template <typename T, int DP, bool PACKED>
__device__ __forceinline__ void probabilities_and_score_grads(const AttentionArgs& a, BwdTiles<T, DP>& t, int64_t b,
                                                              int64_t h, int64_t m0, int64_t n0,
                                                              float* ds_out = nullptr) {
  using L = BwdSmem<T, DP>;
  constexpr int BM = L::BM, BN = L::BN;
  block_gemm<BM, BN, DP, false, true>(t.q, L::LDT, t.k, L::LDT, t.s, L::LDS, false);
  block_gemm<BM, BN, DP, false, true>(t.dout, L::LDT, t.v, L::LDT, t.dp, L::LDS, false);
  __syncthreads();  // S and dP complete
  const DropoutDraw drop(a);
  const int64_t row0 = query_row<PACKED>(a, b * a.H + h, h, m0), step = row_step<PACKED>(a.H);
  for (int e = threadIdx.x; e < BM * BN; e += blockDim.x) {
    const int r = e / BN, c = e % BN;
    const float dot = softcap_product(a, t.s[r * L::LDS + c]);
    const float s = masked_score<T>(a, b, h, m0 + r, n0 + c, dot);
    t.s[r * L::LDS + c] = s;
    const float kept = drop.scale(drop.row_hash(row0 + r * step), n0 + c);
    const ProbGrad pg = prob_and_grad(s, t.m[r], t.inv_l[r], t.dp[r * L::LDS + c], t.delta[r], kept);
    t.p[r * L::LDP + c] = from_float<T>(pg.p);
    t.ds[r * L::LDP + c] = from_float<T>(pg.ds * softcap_slope(a, dot));
    if (ds_out != nullptr && m0 + r < a.Lq && n0 + c < a.Lk) ds_out[r * a.Lk + c] = pg.ds;
  }
}

// fp32 dK/dV: tiles and accumulators in shared memory, FMA products (block_gemm). (kAttnThreads, 1) as for the fp32
// forward: without the minimum ptxas may hold an FMA kernel to 32-48 registers and spill (it did for dQ, D = 128).
template <typename T, int DP, bool PACKED>
__global__ void __launch_bounds__(kAttnThreads, 1) attention_dkdv_fma_kernel(AttentionArgs args) {
  using L = BwdSmem<T, DP>;
  constexpr int BM = L::BM, BN = L::BN;
  TK_EXTERN_SHARED(unsigned char, smem);
  BwdTiles<T, DP> t(smem);
  const TileIndex tile = tile_index(args.Lk, BN);
  const int64_t bhk = tile.outer, n0 = tile.start;
  const int64_t b = bhk / args.Hkv, hk = bhk % args.Hkv, group = args.H / args.Hkv;
  with_sequence<T, PACKED>(args, b, n0, true, [&](const AttentionArgs& a) {

    load_tile<T, BN, DP, true>(t.k, L::LDT, static_cast<const T*>(a.k) + b * a.k_stride[0] + hk * a.k_stride[1] + n0 * a.k_stride[2],
                               a.k_stride, a.Lk - n0, a, b, n0);
    load_tile<T, BN, DP, true>(t.v, L::LDT, static_cast<const T*>(a.v) + b * a.v_stride[0] + hk * a.v_stride[1] + n0 * a.v_stride[2],
                               a.v_stride, a.Lk - n0, a, b, n0);
    for (int e = threadIdx.x; e < BN * L::LDO; e += blockDim.x) t.acc0[e] = 0.0f, t.acc1[e] = 0.0f;
    // Banded: query tiles outside the rows that see these keys are skipped.
    const QueryRange rows = query_range(a, n0, BN, BM);
    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = hk * group + g;
      for (int64_t m0 = rows.first; m0 < rows.end; m0 += BM) {
        __syncthreads();  // the previous products are done with the query-side tiles, P and dS
        load_query_side<T, DP, PACKED>(a, t, b, h, m0);
        __syncthreads();  // q, dO and the row statistics complete
        probabilities_and_score_grads<T, DP, PACKED>(a, t, b, h, m0, n0);
        __syncthreads();  // P and dS complete
        block_gemm<BN, DP, BM, true, false>(t.p, L::LDP, t.dout, L::LDT, t.acc1, L::LDO, true);  // dV += P^T dO
        block_gemm<BN, DP, BM, true, false>(t.ds, L::LDP, t.q, L::LDT, t.acc0, L::LDO, true);    // dK += dS^T Q
      }
    }
    __syncthreads();  // accumulators final
    const int64_t row0 = key_row<PACKED>(a, bhk, hk, n0), step = row_step<PACKED>(a.Hkv);
    T* dk = static_cast<T*>(a.dk) + row0 * a.D;
    T* dv = static_cast<T*>(a.dv) + row0 * a.D;
    for (int e = threadIdx.x; e < BN * DP; e += blockDim.x) {
      const int r = e / DP, d = e % DP;
      if (n0 + r >= a.Lk || d >= a.D) continue;
      dk[r * step * a.D + d] = from_float<T>(t.acc0[r * L::LDO + d] * a.scale);
      dv[r * step * a.D + d] = from_float<T>(t.acc1[r * L::LDO + d]);
    }
  });
}

// fp16/bf16 dK/dV in the register-resident form: each of the 4 warps owns 16 keys of the block's 64 and keeps
// their dK and dV accumulators in registers; per query tile it forms Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ as mma.sync
// accumulators (K and V rows as A-fragments by ldmatrix, Q and dO rows as B-fragments), Pᵀ and dSᵀ elementwise
// (the query's statistics from shared memory), then dV += Pᵀ·dO and dK += dSᵀ·Q with Pᵀ and dSᵀ repacked as
// A-fragments and dO, Q read transposed (ldmatrix .trans). Q, dO and the statistics of the query tiles (every head
// of the GQA group in turn) stream through two cp.async stages; K and V stay in shared memory. At D = 256 a lane
// cannot hold both 16 x 256 accumulators: the query loop runs once per 128-column half of dK/dV (DC), recomputing
// Sᵀ and dPᵀ.
// NARROW (`attention_backward_narrow`): 16-query tiles at D = 128, 48 KiB, two blocks on a 100 KiB SM (sm_86, sm_89).
template <typename T, int DP, bool NARROW = false>
struct MmaDkdvLayout {
  static constexpr int kWarps = kAttnThreads / 32;
  static constexpr int BN = 16 * kWarps, BM = DP <= 64 ? 64 : (NARROW ? 2048 : 4096) / DP, DC = DP > 128 ? 128 : DP;
  static constexpr size_t k = 0, v = k + sizeof(T) * BN * DP, q = v + sizeof(T) * BN * DP,
                          dout = q + 2 * sizeof(T) * BM * DP, stats = dout + 2 * sizeof(T) * BM * DP,
                          hash = stats + 2 * 3 * sizeof(float) * BM, bytes = hash + 2 * sizeof(uint32_t) * BM;
  static_assert(bytes <= kMaxBlockSmem, "dK/dV tile exceeds the shared memory of sm_86/sm_89");
};

// The query side of the dK/dV loop: tile `it` is rows m_lo + (it % per_head)·BM.. of head hk·group + it / per_head,
// its Q and dO tiles (swizzled) and, per row, the saved max, 1/sum, delta and dropout row hash. PLAIN: Q and dO
// by `copy_rows_by_16_bytes`, the max in log2 units, no hash.
template <typename T, int BM, int DP, bool PACKED, bool PLAIN>
struct QueryTiles : TwoStages<QueryTiles<T, BM, DP, PACKED, PLAIN>> {
  T* q_smem;
  T* do_smem;
  float* stat_smem;
  uint32_t* hash_smem;
  bool q_async, do_async;
  int64_t h0, m_lo;
  int per_head, n_tiles;

  __device__ T* q(int it) const { return q_smem + (it & 1) * BM * DP; }
  __device__ T* dout(int it) const { return do_smem + (it & 1) * BM * DP; }
  __device__ float* stats(int it) const { return stat_smem + (it & 1) * 3 * BM; }  // max, 1/sum, delta
  __device__ uint32_t* hashes(int it) const { return hash_smem + (it & 1) * BM; }
  __device__ int64_t head(int it) const { return h0 + it / per_head; }
  __device__ int64_t first_query(int it) const { return m_lo + static_cast<int64_t>(it % per_head) * BM; }
  __device__ void load(const AttentionArgs& a, int64_t b, int it) const {
    const int64_t h = head(it), m0 = first_query(it);
    if constexpr (PLAIN) {
      static_assert(BM <= kAttnThreads, "a thread per query row");
      copy_rows_by_16_bytes<T, BM, DP>(
          q(it), static_cast<const T*>(a.q) + b * a.q_stride[0] + h * a.q_stride[1] + m0 * a.q_stride[2],
          a.q_stride[2], dout(it),
          static_cast<const T*>(a.dout) + b * a.do_stride[0] + h * a.do_stride[1] + m0 * a.do_stride[2],
          a.do_stride[2], a.Lq - m0, a.D);
      const int r = static_cast<int>(threadIdx.x);
      if (r < BM) {
        const bool ok = m0 + r < a.Lq;
        const int64_t row = query_row<PACKED>(a, b * a.H + h, h, m0 + r);
        float* st = stats(it);
        st[r] = ok ? a.row_max[row] * kLog2e : 0.0f;
        st[BM + r] = ok ? a.inv_l[row] : 0.0f;  // 0: a query past Lq adds nothing
        st[2 * BM + r] = ok ? a.delta[row] : 0.0f;
      }
      return;
    }
    load_tile_swizzled<T, BM, DP, false>(q(it), static_cast<const T*>(a.q) + b * a.q_stride[0] +
                                         h * a.q_stride[1] + m0 * a.q_stride[2], a.q_stride, a.Lq - m0, a, b, 0, q_async);
    load_tile_swizzled<T, BM, DP, false>(dout(it), static_cast<const T*>(a.dout) + b * a.do_stride[0] +
                                         h * a.do_stride[1] + m0 * a.do_stride[2], a.do_stride, a.Lq - m0, a, b, 0,
                                         do_async);
    float* st = stats(it);
    uint32_t* hs = hashes(it);
    for (int r = threadIdx.x; r < BM; r += blockDim.x) {
      const bool ok = m0 + r < a.Lq;
      const int64_t row = query_row<PACKED>(a, b * a.H + h, h, m0 + r);
      st[r] = ok ? a.row_max[row] : 0.0f;
      st[BM + r] = ok ? a.inv_l[row] : 0.0f;
      st[2 * BM + r] = ok ? a.delta[row] : 0.0f;
      hs[r] = ok ? DropoutDraw(a).row_hash(row) : 0u;
    }
  }
};

// PLAIN (`plain_scores`, with Q and dO copied by 16 bytes): raw products, position tests only on query tiles the
// band crosses (a key past Lk needs none: its row is never written), P = 2^(s·c − max·log2 e)·(1/sum).
template <typename T, int DP, bool PACKED, bool PLAIN, bool NARROW>
__global__ void __launch_bounds__(kAttnThreads, 1) attention_dkdv_mma_kernel(AttentionArgs args) {
  using L = MmaDkdvLayout<T, DP, NARROW>;
  constexpr int BM = L::BM, BN = L::BN, NT = BM / 8, DC = L::DC;
  TK_EXTERN_SHARED(unsigned char, smem);
  T* ks = reinterpret_cast<T*>(smem + L::k);
  T* vs = reinterpret_cast<T*>(smem + L::v);
  const TileIndex tile = tile_index(args.Lk, BN);
  const int64_t bhk = tile.outer, n0 = tile.start;
  const int64_t b = bhk / args.Hkv, hk = bhk % args.Hkv, group = args.H / args.Hkv;
  with_sequence<T, PACKED>(args, b, n0, true, [&](const AttentionArgs& a) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const DropoutDraw drop(a);
    const int64_t keys[2] = {n0 + 16 * warp + g, n0 + 16 * warp + g + 8};  // this lane's two keys
    load_tile_swizzled<T, BN, DP, true>(ks, static_cast<const T*>(a.k) + b * a.k_stride[0] + hk * a.k_stride[1] +
                                        n0 * a.k_stride[2], a.k_stride, a.Lk - n0, a, b, n0,
                                        copies_by_16_bytes<T>(a.k, a.k_stride));
    load_tile_swizzled<T, BN, DP, true>(vs, static_cast<const T*>(a.v) + b * a.v_stride[0] + hk * a.v_stride[1] +
                                        n0 * a.v_stride[2], a.v_stride, a.Lk - n0, a, b, n0,
                                        copies_by_16_bytes<T>(a.v, a.v_stride));
    // Banded: query tiles outside the rows that see these keys are skipped.
    const QueryRange rows = query_range(a, n0, BN, BM);
    const int64_t m_lo = rows.first;
    const int per_head = m_lo < rows.end ? static_cast<int>((rows.end - m_lo + BM - 1) / BM) : 0;
    const float to_log2 = a.scale * kLog2e;
    const QueryTiles<T, BM, DP, PACKED, PLAIN> qt{{}, reinterpret_cast<T*>(smem + L::q), reinterpret_cast<T*>(smem + L::dout),
                                           reinterpret_cast<float*>(smem + L::stats),
                                           reinterpret_cast<uint32_t*>(smem + L::hash),
                                           copies_by_16_bytes<T>(a.q, a.q_stride),
                                           copies_by_16_bytes<T>(a.dout, a.do_stride), hk * group, m_lo, per_head,
                                           per_head * static_cast<int>(group)};
#pragma unroll 1
    for (int c0 = 0; c0 < DP; c0 += DC) {
      float dk[DC / 8][4] = {}, dv[DC / 8][4] = {};
      qt.start(a, b);
      for (int it = 0; it < qt.n_tiles; ++it) {
        qt.advance(a, b, it);
        __syncthreads();  // tile it (and, first, K and V) landed from every thread's copies
        const int64_t h = qt.head(it), m0 = qt.first_query(it);
        const T* qtile = qt.q(it);
        const T* dotile = qt.dout(it);
        const float* st = qt.stats(it);
        const uint32_t* hs = qt.hashes(it);
        float s[NT][4] = {}, dp[NT][4] = {};
        warp_mma_rows_abt<T, DP, NT>(s, ks, 16 * warp, qtile, lane);
        warp_mma_rows_abt<T, DP, NT>(dp, vs, 16 * warp, dotile, lane);
        if constexpr (PLAIN) {
          if (!band_holds(a, m0, BM, n0 + 16 * warp, 16)) hide_outside_band_by_key(a, s, n0 + 16 * warp, m0, lane);
          // Element (key r, query c): Pᵀ into s, dSᵀ = P·(dP − delta) into dp.
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int c = 8 * j + 2 * t + (e & 1);
              const ProbGrad pg = plain_prob_and_grad(s[j][e], to_log2, st[c], st[BM + c], dp[j][e], st[2 * BM + c]);
              dp[j][e] = pg.ds;
              s[j][e] = pg.p;
            }
        } else {
          softcap_products(a, s);
          // Element (key r, query c): Pᵀ (dropped) into s, dSᵀ = P·(dP·kept - delta) into dp.
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int c = 8 * j + 2 * t + (e & 1);
              const float sc = masked_score<T>(a, b, h, m0 + c, keys[e >> 1], s[j][e]);
              const ProbGrad pg = prob_and_grad<true>(sc, st[c], st[BM + c], dp[j][e], st[2 * BM + c],
                                                      drop.scale(hs[c], keys[e >> 1]));
              dp[j][e] = pg.ds * softcap_slope(a, s[j][e]);
              s[j][e] = pg.p;
            }
        }
        warp_mma_pb<T, DP, NT, DC>(dv, s, dotile, lane, c0);   // dV += Pᵀ·dO
        warp_mma_pb<T, DP, NT, DC>(dk, dp, qtile, lane, c0);  // dK += dSᵀ·Q
        __syncthreads();  // every warp is done with this stage before the next iteration refills it
      }
      cp_async_wait<0>();  // no query tile at all: K's and V's copies retire here
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (keys[r] >= a.Lk) continue;
        const int64_t row = key_row<PACKED>(a, bhk, hk, keys[r]) * a.D + c0;
        store_acc_row(static_cast<T*>(a.dk) + row, dk, r, lane, a.D - c0, a.scale);
        store_acc_row(static_cast<T*>(a.dv) + row, dv, r, lane, a.D - c0, 1.0f);
      }
    }
  });
}

// The mask gradient of query rows [m0, m0 + bm) at keys [0, n_begin) and [n_end, Lk), which no key tile of the dQ
// pass visits (outside the band): zeros, written so the caller needs no zero fill. `head` is row 0 of this head's
// [Lq, Lk].
__device__ __forceinline__ void zero_mask_grad_outside(const AttentionArgs& a, float* head, int64_t m0, int bm,
                                                       int64_t n_begin, int64_t n_end) {
  if (head == nullptr) return;
  if (n_end > a.Lk) n_end = a.Lk;
  if (n_begin > n_end) n_begin = n_end;  // a tile whose band holds no key: [0, Lk) once
  const int64_t n_rows = a.Lq - m0 < bm ? a.Lq - m0 : bm, width = a.Lk - n_end + n_begin;
  for (int64_t e = threadIdx.x; e < n_rows * width; e += blockDim.x) {
    const int64_t c = e % width;
    head[(m0 + e / width) * a.Lk + (c < n_begin ? c : n_end + c - n_begin)] = 0.0f;
  }
}

// fp16/bf16 dQ in the forward's register-resident form (attention_fwd.cu): 4 warps of 16 query rows, S = Q·Kᵀ and
// dP = dO·Vᵀ as mma.sync accumulators, dS = P·(dP - delta) elementwise in registers, dQ += dS·K with the
// accumulator in registers; K/V tiles double-buffered through cp.async, Q and dO read by ldmatrix from shared
// memory every tile. Key tiles shrink with the head dim to keep shared memory at 64 KiB (D = 128) and 96 KiB (256);
// NARROW: 16-key tiles at D = 128, 48 KiB, two blocks on a 100 KiB SM.
template <typename T, int DP, bool NARROW = false>
struct MmaDqLayout {
  static constexpr int kWarps = kAttnThreads / 32;
  static constexpr int BM = 16 * kWarps, BN = DP <= 64 ? 64 : (NARROW ? 2048 : 4096) / DP;
  static constexpr size_t q = 0, dout = q + sizeof(T) * BM * DP, k = dout + sizeof(T) * BM * DP,
                          v = k + 2 * sizeof(T) * BN * DP, seen = v + 2 * sizeof(T) * BN * DP,
                          bytes = seen + sizeof(uint32_t) * kWarps * seen_words<BN / 8>();
  static_assert(bytes <= kMaxBlockSmem, "dQ tile exceeds the shared memory of sm_86/sm_89");
};

// (kAttnThreads, 1): without the minimum, ptxas aimed at three blocks per SM (168 registers) and spilled 8 bytes.
// PLAIN (`plain_scores`): the forward's PLAIN form — raw products, interior key tiles first with no position test
// (up to D = 128), K/V copies by position, P = 2^(s·c − max·log2 e)·(1/sum) with c = scale·log2 e.
template <typename T, int DP, bool PACKED, bool PLAIN, bool NARROW>
__global__ void __launch_bounds__(kAttnThreads, 1) attention_dq_mma_kernel(AttentionArgs args) {
  using L = MmaDqLayout<T, DP, NARROW>;
  constexpr int BM = L::BM, BN = L::BN, NT = BN / 8, DT = DP / 8;
  TK_EXTERN_SHARED(unsigned char, smem);
  T* qs = reinterpret_cast<T*>(smem + L::q);
  T* dos = reinterpret_cast<T*>(smem + L::dout);
  T* ks = reinterpret_cast<T*>(smem + L::k);
  T* vs = reinterpret_cast<T*>(smem + L::v);
  uint32_t* seen = reinterpret_cast<uint32_t*>(smem + L::seen);
  const TileIndex tile = tile_index(args.Lq, BM);
  const int64_t bh = tile.outer, m0 = tile.start;
  const int64_t b = bh / args.H, h = bh % args.H, hk = h / (args.H / args.Hkv);
  with_sequence<T, PACKED>(args, b, m0, false, [&](const AttentionArgs& a) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const DropoutDraw drop(a);
    // This lane's two rows and their saved statistics.
    const int64_t rows[2] = {m0 + 16 * warp + g, m0 + 16 * warp + g + 8};
    float row_max[2], inv_l[2], delta[2];
    uint32_t row_hash[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool ok = rows[r] < a.Lq;
      const int64_t qr = query_row<PACKED>(a, bh, h, rows[r]);
      row_max[r] = ok ? a.row_max[qr] * (PLAIN ? kLog2e : 1.0f) : 0.0f;  // PLAIN: log2 units
      inv_l[r] = ok ? a.inv_l[qr] : 0.0f;
      delta[r] = ok ? a.delta[qr] : 0.0f;
      row_hash[r] = PLAIN ? 0u : drop.row_hash(qr);
    }
    const float to_log2 = a.scale * kLog2e;
    const int64_t lo = key_begin(a, m0, BN), hi = key_end(a, m0, BM);
    auto kv = kv_tiles<T, BN, DP, PLAIN>(a, ks, vs, b, hk, lo, hi);
    if constexpr (PLAIN && DP <= 128)
      kv.interior_first(interior_tiles(a, m0, a.Lq - m0 < BM ? a.Lq - m0 : BM, lo, kv.n_tiles, BN));
    float* dmask_head = a.dmask == nullptr ? nullptr : a.dmask + bh * a.Lq * a.Lk;
    load_tile_swizzled<T, BM, DP, false>(qs, static_cast<const T*>(a.q) + b * a.q_stride[0] + h * a.q_stride[1] +
                                         m0 * a.q_stride[2], a.q_stride, a.Lq - m0, a, b, 0,
                                         copies_by_16_bytes<T>(a.q, a.q_stride));
    load_tile_swizzled<T, BM, DP, false>(dos, static_cast<const T*>(a.dout) + b * a.do_stride[0] + h * a.do_stride[1] +
                                         m0 * a.do_stride[2], a.do_stride, a.Lq - m0, a, b, 0,
                                         copies_by_16_bytes<T>(a.dout, a.do_stride));
    kv.start(a, b);

    float dq[DT][4] = {};
    // One key tile; EDGE: it may hold scores that position hides (as in the forward).
    const auto step = [&](int it, auto edge) {
      [[maybe_unused]] constexpr bool EDGE = decltype(edge)::value;
      const int64_t n0 = kv.first_key(it);
      kv.advance(a, b, it);
      __syncthreads();  // tile it (and, first, Q and dO) landed from every thread's copies
      T* kt = kv.k(it);
      const T* vt = kv.v(it);
      float s[NT][4] = {}, dp[NT][4] = {};
      warp_mma_rows_abt<T, DP, NT>(s, qs, 16 * warp, kt, lane);
      warp_mma_rows_abt<T, DP, NT>(dp, dos, 16 * warp, vt, lane);
      if constexpr (PLAIN) {
        // Keys past the end read as zeros (dP = 0 there): hiding their scores makes their dS exactly 0.
        if (EDGE && !tile_in_band(a, m0 + 16 * warp, 16, n0, BN)) hide_outside_band(a, s, m0 + 16 * warp, n0, lane);
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = e >> 1;
            dp[j][e] = plain_prob_and_grad(s[j][e], to_log2, row_max[r], inv_l[r], dp[j][e], delta[r]).ds;
          }
      } else {
        softcap_products(a, s);
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = e >> 1;
            const int64_t col = n0 + 8 * j + 2 * t + (e & 1);
            const float dot = s[j][e];
            s[j][e] = masked_score<T>(a, b, h, rows[r], col, dot);
            const float ds = prob_and_grad<true>(s[j][e], row_max[r], inv_l[r], dp[j][e], delta[r],
                                                 drop.scale(row_hash[r], col)).ds;
            if (dmask_head != nullptr && rows[r] < a.Lq && col < a.Lk) dmask_head[rows[r] * a.Lk + col] = ds;
            dp[j][e] = ds * softcap_slope(a, dot);
          }
        // Keys no query of the block sees: zero K rows (their dS is 0, their K may be NaN).
        if (a.mask_kind != kNoMask) zero_unseen_key_rows<T, DP, NT, L::kWarps>(s, seen, kt, lane, warp);
      }
      warp_mma_pb<T, DP, NT>(dq, dp, kt, lane);  // dQ += dS·K
      __syncthreads();  // every warp is done with this stage before the next iteration refills it
    };
    int it = 0;
    if constexpr (PLAIN && DP <= 128)
      for (; it < kv.n_interior; ++it) step(it, std::false_type{});
    for (; it < kv.n_tiles; ++it) step(it, std::true_type{});
    cp_async_wait<0>();  // no tile at all: Q's and dO's copies retire here
    zero_mask_grad_outside(a, dmask_head, m0, BM, lo, lo + static_cast<int64_t>(kv.n_tiles) * BN);
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (rows[r] < a.Lq) store_acc_row(static_cast<T*>(a.dq) + query_row<PACKED>(a, bh, h, rows[r]) * a.D, dq, r, lane,
                                        a.D, a.scale);
  });
}

// fp32 dQ: tiles and accumulators in shared memory, FMA products (block_gemm); launch bounds as for dK/dV.
template <typename T, int DP, bool PACKED>
__global__ void __launch_bounds__(kAttnThreads, 1) attention_dq_fma_kernel(AttentionArgs args) {
  using L = BwdSmem<T, DP>;
  constexpr int BM = L::BM, BN = L::BN;
  TK_EXTERN_SHARED(unsigned char, smem);
  BwdTiles<T, DP> t(smem);
  const TileIndex tile = tile_index(args.Lq, BM);
  const int64_t bh = tile.outer, m0 = tile.start;
  const int64_t b = bh / args.H, h = bh % args.H, hk = h / (args.H / args.Hkv);
  with_sequence<T, PACKED>(args, b, m0, false, [&](const AttentionArgs& a) {
    load_query_side<T, DP, PACKED>(a, t, b, h, m0);
    for (int e = threadIdx.x; e < BM * L::LDO; e += blockDim.x) t.acc0[e] = 0.0f;
    const T* k_base = static_cast<const T*>(a.k) + b * a.k_stride[0] + hk * a.k_stride[1];
    const T* v_base = static_cast<const T*>(a.v) + b * a.v_stride[0] + hk * a.v_stride[1];
    const int64_t lo = key_begin(a, m0, BN), hi = key_end(a, m0, BM);
    float* dmask_rows = a.dmask == nullptr ? nullptr : a.dmask + (bh * a.Lq + m0) * a.Lk;
    for (int64_t n0 = lo; n0 < hi; n0 += BN) {
      __syncthreads();  // the previous dQ product is done with k and dS (first pass: query side loaded)
      load_tile<T, BN, DP, true>(t.k, L::LDT, k_base + n0 * a.k_stride[2], a.k_stride, a.Lk - n0, a, b, n0);
      load_tile<T, BN, DP, true>(t.v, L::LDT, v_base + n0 * a.v_stride[2], a.v_stride, a.Lk - n0, a, b, n0);
      __syncthreads();  // K and V tiles complete
      probabilities_and_score_grads<T, DP, PACKED>(a, t, b, h, m0, n0, dmask_rows == nullptr ? nullptr : dmask_rows + n0);
      __syncthreads();  // dS and the masked scores complete
      if (a.mask_kind != kNoMask) {
        zero_unseen_keys<T, BM, BN, DP>(t.s, L::LDS, t.k, L::LDT);
        __syncthreads();  // K rows of unseen keys zeroed
      }
      block_gemm<BM, DP, BN, false, false>(t.ds, L::LDP, t.k, L::LDT, t.acc0, L::LDO, true);  // dQ += dS K
    }
    zero_mask_grad_outside(a, a.dmask == nullptr ? nullptr : a.dmask + bh * a.Lq * a.Lk, m0, BM, lo,
                           (hi + BN - 1) / BN * BN);
    __syncthreads();  // accumulator final
    const int64_t step = row_step<PACKED>(a.H);
    T* dq = static_cast<T*>(a.dq) + query_row<PACKED>(a, bh, h, m0) * a.D;
    for (int e = threadIdx.x; e < BM * DP; e += blockDim.x) {
      const int r = e / DP, d = e % DP;
      if (m0 + r >= a.Lq || d >= a.D) continue;
      dq[r * step * a.D + d] = from_float<T>(t.acc0[r * L::LDO + d] * a.scale);
    }
  });
}

// The dK/dV mma kernel for a call. At D = 256 there is no PLAIN form: its 2 x 128-column accumulators take 128
// registers and the PLAIN instantiation spilled 24 bytes at 255 on sm_90.
template <typename T, int D, bool N>
auto dkdv_mma_kernel(bool packed, bool plain) {
  if constexpr (D <= 128) {
    if (plain)
      return packed ? attention_dkdv_mma_kernel<T, D, true, true, N> : attention_dkdv_mma_kernel<T, D, false, true, N>;
  }
  return packed ? attention_dkdv_mma_kernel<T, D, true, false, N> : attention_dkdv_mma_kernel<T, D, false, false, N>;
}

}  // namespace

// The layouts (BM, BN, bytes) of the dK/dV and dQ passes: mma.sync for fp16/bf16, the shared-memory tiles for fp32.
template <typename T, int DP>
using DkdvLayout = std::conditional_t<sizeof(T) == 2, MmaDkdvLayout<T, DP>, BwdSmem<T, DP>>;
template <typename T, int DP>
using DqLayout = std::conditional_t<sizeof(T) == 2, MmaDqLayout<T, DP>, BwdSmem<T, DP>>;

bool attention_backward_narrow(int dtype, int64_t d, int64_t smem_per_sm) {
  if (dtype == kFloat32 || d > 128 || d <= 64 || smem_per_sm <= 0) return false;
  const auto fit = [&](size_t bytes) { return two_blocks_fit(bytes, smem_per_sm); };
  const bool wide = fit(MmaDkdvLayout<__half, 128>::bytes) && fit(MmaDqLayout<__half, 128>::bytes);
  return !wide && fit(MmaDkdvLayout<__half, 128, true>::bytes) && fit(MmaDqLayout<__half, 128, true>::bytes);
}

size_t attention_backward_smem(int dtype, int64_t d, bool dq, bool narrow) {
  size_t bytes = 0;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_head_dim(d, [&](auto dp) {
      constexpr int D = decltype(dp)::value;
      if constexpr (sizeof(T) == 2 && D == 128) {
        if (narrow) {
          bytes = dq ? MmaDqLayout<T, D, true>::bytes : MmaDkdvLayout<T, D, true>::bytes;
          return;
        }
      }
      bytes = dq ? DqLayout<T, D>::bytes : DkdvLayout<T, D>::bytes;
    });
  });
  return bytes;
}

void attention_backward(const AttentionArgs& a, tk_stream_t stream) {
  if (a.B * a.H * a.D == 0 || a.Lq == 0 || a.Lk == 0) return;  // the caller's zero-filled gradients stand
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t rows = delta_rows(a);
    const int64_t warps = kDeltaThreads / 32;
    launch(attention_delta_kernel<T>, dim3(static_cast<unsigned>((rows + warps - 1) / warps)), dim3(kDeltaThreads), 0,
           stream, a);
    dispatch_head_dim(a.D, [&](auto dp) {
      constexpr int D = decltype(dp)::value;
      using K = DkdvLayout<T, D>;
      using Q = DqLayout<T, D>;
      const int64_t key_blocks = a.B * a.Hkv * ((a.Lk + K::BN - 1) / K::BN);
      const int64_t query_blocks = a.B * a.H * ((a.Lq + Q::BM - 1) / Q::BM);
      if (key_blocks > 0x7fffffffLL || query_blocks > 0x7fffffffLL)
        throw std::invalid_argument("attention: more than 2^31-1 tiles");
      const dim3 key_grid(static_cast<unsigned>(key_blocks)), query_grid(static_cast<unsigned>(query_blocks));
      if constexpr (sizeof(T) == 2) {
        // dK/dV streams Q and dO tiles: its PLAIN form copies those by 16 bytes too.
        const bool plain = plain_scores<T>(a);
        const bool plain_keys = plain && copies_by_16_bytes<T>(a.q, a.q_stride) &&
                                copies_by_16_bytes<T>(a.dout, a.do_stride);
        const auto run = [&](auto narrow) {
          constexpr bool N = decltype(narrow)::value;
          using KN = MmaDkdvLayout<T, D, N>;
          using QN = MmaDqLayout<T, D, N>;
          static_assert(KN::BN == K::BN && QN::BM == Q::BM, "narrow tiles shrink the streamed side only: same grids");
          launch(dkdv_mma_kernel<T, D, N>(a.cu_q != nullptr, plain_keys), key_grid, dim3(kAttnThreads), KN::bytes,
                 stream, a);
          const auto dq_kernel = a.cu_q ? (plain ? attention_dq_mma_kernel<T, D, true, true, N>
                                                 : attention_dq_mma_kernel<T, D, true, false, N>)
                                        : (plain ? attention_dq_mma_kernel<T, D, false, true, N>
                                                 : attention_dq_mma_kernel<T, D, false, false, N>);
          launch(dq_kernel, query_grid, dim3(kAttnThreads), QN::bytes, stream, a);
        };
        // The narrow tiles are instantiated at D = 128 only (as the forward's).
        if constexpr (D == 128) {
          if (attention_backward_narrow(a.dtype, a.D, a.smem_per_sm)) run(std::true_type{});
          else run(std::false_type{});
        } else {
          run(std::false_type{});
        }
      } else {
        launch(a.cu_q ? attention_dkdv_fma_kernel<T, D, true> : attention_dkdv_fma_kernel<T, D, false>, key_grid,
               dim3(kAttnThreads), K::bytes, stream, a);
        launch(a.cu_q ? attention_dq_fma_kernel<T, D, true> : attention_dq_fma_kernel<T, D, false>, query_grid,
               dim3(kAttnThreads), Q::bytes, stream, a);
      }
    });
  });
}

}  // namespace tk
