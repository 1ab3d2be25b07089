// Block-wide tile products on shared memory: tensor cores (nvcuda::wmma, m16n16k16) for half and bf16,
// an fp32 FMA loop for float (wmma has no fp32 multiplicands, and tf32 would lose fp32's accuracy).
// The host simulator implements the same wmma calls (host/simt.h), so one source runs on both.
#pragma once

#include <type_traits>

#include "common.cuh"

#ifdef __CUDACC__
#include <mma.h>
#endif

namespace tk {

// Shared-memory row pitches: +8 elements (16 bytes) keep rows off the same banks and every 16-row tile on
// the 32-byte alignment wmma loads need; fp32 accumulators take +4 (wmma wants a multiple of 4 floats).
template <typename T> constexpr int pitch(int cols) { return cols + (sizeof(T) == 4 ? 4 : 8); }

// C[M x N] = (accumulate ? C : 0) + A[M x K] * B[K x N], C fp32 row-major with pitch ldc.
// A_T: A is stored transposed (element (m, k) at A[k * lda + m]); B_T likewise ((k, n) at B[n * ldb + k]).
// Every thread of the block calls it; the caller puts the barriers around it.
template <typename T, int M, int N, int K, bool A_T, bool B_T>
__device__ __forceinline__ void block_gemm(const T* A, int lda, const T* B, int ldb, float* C, int ldc, bool accumulate) {
  static_assert(std::is_same<T, float>::value || (M % 16 == 0 && N % 16 == 0 && K % 16 == 0),
                "wmma tiles are multiples of 16");
  if constexpr (std::is_same<T, float>::value) {
    for (int e = threadIdx.x; e < M * N; e += blockDim.x) {
      const int m = e / N, n = e % N;
      float acc = accumulate ? C[m * ldc + n] : 0.0f;
#pragma unroll 8
      for (int k = 0; k < K; ++k) acc = fmaf(A_T ? A[k * lda + m] : A[m * lda + k], B_T ? B[n * ldb + k] : B[k * ldb + n], acc);
      C[m * ldc + n] = acc;
    }
  } else {
    namespace wmma = nvcuda::wmma;
    using LA = std::conditional_t<A_T, wmma::col_major, wmma::row_major>;
    using LB = std::conditional_t<B_T, wmma::col_major, wmma::row_major>;
    const int warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    for (int t = warp; t < (M / 16) * (N / 16); t += n_warps) {
      const int tm = (t / (N / 16)) * 16, tn = (t % (N / 16)) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      if (accumulate) {
        wmma::load_matrix_sync(acc, C + tm * ldc + tn, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(acc, 0.0f);
      }
      for (int k = 0; k < K; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> b;
        wmma::load_matrix_sync(a, A_T ? A + k * lda + tm : A + tm * lda + k, lda);
        wmma::load_matrix_sync(b, B_T ? B + tn * ldb + k : B + k * ldb + tn, ldb);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(C + tm * ldc + tn, acc, ldc, wmma::mem_row_major);
    }
  }
}

}  // namespace tk
