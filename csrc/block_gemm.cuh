// Block-wide fp32 tile products on shared memory for the fp32 attention kernels: FMA loops (tensor cores have no
// fp32 multiplicands, and tf32 would lose fp32's accuracy). fp16/bf16 run on mma.sync with register fragments
// (ptx.cuh) instead.
#pragma once

#include "common.cuh"

namespace tk {

// Shared-memory row pitch of an fp32 tile: +4 elements keep consecutive rows off the same banks.
constexpr int pitch(int cols) { return cols + 4; }

// C[M x N] = (accumulate ? C : 0) + A[M x K] * B[K x N], C row-major with pitch ldc.
// A_T: A is stored transposed (element (m, k) at A[k * lda + m]); B_T likewise ((k, n) at B[n * ldb + k]).
// Every thread of the block calls it; the caller puts the barriers around it.
template <int M, int N, int K, bool A_T, bool B_T>
__device__ __forceinline__ void block_gemm(const float* A, int lda, const float* B, int ldb, float* C, int ldc,
                                           bool accumulate) {
  for (int e = threadIdx.x; e < M * N; e += blockDim.x) {
    const int m = e / N, n = e % N;
    float acc = accumulate ? C[m * ldc + n] : 0.0f;
#pragma unroll 8
    for (int k = 0; k < K; ++k) acc = fmaf(A_T ? A[k * lda + m] : A[m * lda + k], B_T ? B[n * ldb + k] : B[k * ldb + n], acc);
    C[m * ldc + n] = acc;
  }
}

}  // namespace tk
