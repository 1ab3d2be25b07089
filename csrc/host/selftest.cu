// Kernels that test the simulator itself (built into _C_host only): a barrier the caller may skip,
// divergent barriers, warp shuffles of every element type, atomics and dynamic shared memory.
#include "../launch.cuh"
#include "../block_gemm.cuh"
#include "selftest.h"

namespace simt_selftest {

// out[t] = in[n - 1 - t] through static shared memory; without the barrier a thread may read a
// slot before its owner wrote it.
__global__ void reverse_static_kernel(const float* in, float* out, int with_barrier) {
  __shared__ float buf[256];
  const int t = threadIdx.x, n = blockDim.x;
  buf[t] = in[blockIdx.x * n + t];
  if (with_barrier) __syncthreads();
  out[blockIdx.x * n + t] = buf[n - 1 - t];
}

__global__ void reverse_dynamic_kernel(const float* in, float* out) {
  TK_EXTERN_SHARED(float, buf);
  const int t = threadIdx.x, n = blockDim.x;
  buf[t] = in[blockIdx.x * n + t];
  __syncthreads();
  out[blockIdx.x * n + t] = buf[n - 1 - t];
}

// Each thread of the first half writes its slot of dynamic shared memory; after the barrier every thread reads
// its own slot, so the second half reads slots no thread wrote: initcheck's planted fault.
__global__ void read_unwritten_shared_kernel(float* out) {
  TK_EXTERN_SHARED(float, buf);
  if (threadIdx.x < blockDim.x / 2) buf[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x];
}

// Half the block returns early, the other half waits at a barrier: divergence.
__global__ void exit_before_barrier_kernel(float* out) {
  if (threadIdx.x < blockDim.x / 2) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Two halves wait at two different barriers: divergence.
__global__ void different_barriers_kernel(float* out) {
  if (threadIdx.x & 1) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Each lane holds lane+1; out gets: xor-reduced sum, value shuffled down by 1, lane 3's value.
template <typename T>
__global__ void shuffles_kernel(T* out) {
  const int lane = threadIdx.x & 31;
  T v = tk::from_float<T>(static_cast<float>(lane + 1));
  T sum = v;
  for (int o = 16; o > 0; o >>= 1) sum = tk::from_float<T>(tk::to_float(sum) + tk::to_float(__shfl_xor_sync(0xffffffffu, sum, o)));
  const T down = __shfl_down_sync(0xffffffffu, v, 1);
  const T bcast = __shfl_sync(0xffffffffu, v, 3);
  out[threadIdx.x * 3 + 0] = sum;
  out[threadIdx.x * 3 + 1] = down;
  out[threadIdx.x * 3 + 2] = bcast;
}

__global__ void int_shuffles_kernel(int* out) {
  const int lane = threadIdx.x & 31;
  int sum = lane;
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  out[threadIdx.x] = sum + __ballot_sync(0xffffffffu, lane < 4);
}

__global__ void atomics_kernel(float* fsum, int* isum, const float* in, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    atomicAdd(fsum, in[i]);
    atomicAdd(isum, 1);
  }
}

// C [32 x 48] fp32 = A [32 x 64] * B [64 x 48] through tk::block_gemm: A and B are given row-major in global
// memory and staged in shared memory as stored (A_T / B_T: transposed), C accumulates onto its input.
constexpr int kGemmM = 32, kGemmN = 48, kGemmK = 64;

template <bool A_T, bool B_T>
__global__ void gemm_kernel(const float* a, const float* b, float* c) {
  constexpr int LDA = tk::pitch(A_T ? kGemmM : kGemmK), LDB = tk::pitch(B_T ? kGemmK : kGemmN);
  constexpr int LDC = tk::pitch(kGemmN);
  __shared__ float as[(A_T ? kGemmK : kGemmM) * LDA];
  __shared__ float bs[(B_T ? kGemmN : kGemmK) * LDB];
  __shared__ float cs[kGemmM * LDC];
  for (int e = threadIdx.x; e < kGemmM * kGemmK; e += blockDim.x) {
    const int m = e / kGemmK, k = e % kGemmK;
    as[A_T ? k * LDA + m : m * LDA + k] = a[e];
  }
  for (int e = threadIdx.x; e < kGemmK * kGemmN; e += blockDim.x) {
    const int k = e / kGemmN, n = e % kGemmN;
    bs[B_T ? n * LDB + k : k * LDB + n] = b[e];
  }
  for (int e = threadIdx.x; e < kGemmM * kGemmN; e += blockDim.x) cs[(e / kGemmN) * LDC + e % kGemmN] = c[e];
  __syncthreads();
  tk::block_gemm<kGemmM, kGemmN, kGemmK, A_T, B_T>(as, LDA, bs, LDB, cs, LDC, true);
  __syncthreads();
  for (int e = threadIdx.x; e < kGemmM * kGemmN; e += blockDim.x) c[e] = cs[(e / kGemmN) * LDC + e % kGemmN];
}

// ---- launchers ----

void seed(uint64_t s) { simt::set_seed(s); }

void reverse_static(uintptr_t in, uintptr_t out, int blocks, int threads, bool with_barrier) {
  tk::launch(reverse_static_kernel, dim3(blocks), dim3(threads), 0, nullptr, reinterpret_cast<const float*>(in),
             reinterpret_cast<float*>(out), int(with_barrier));
}
void read_unwritten_shared(uintptr_t out, int threads) {
  tk::launch(read_unwritten_shared_kernel, dim3(1), dim3(threads), threads * sizeof(float), nullptr,
             reinterpret_cast<float*>(out));
}
void reverse_dynamic(uintptr_t in, uintptr_t out, int blocks, int threads) {
  tk::launch(reverse_dynamic_kernel, dim3(blocks), dim3(threads), threads * sizeof(float), nullptr,
             reinterpret_cast<const float*>(in), reinterpret_cast<float*>(out));
}
void exit_before_barrier(uintptr_t out, int threads) {
  tk::launch(exit_before_barrier_kernel, dim3(1), dim3(threads), 0, nullptr, reinterpret_cast<float*>(out));
}
void different_barriers(uintptr_t out, int threads) {
  tk::launch(different_barriers_kernel, dim3(1), dim3(threads), 0, nullptr, reinterpret_cast<float*>(out));
}
void shuffles(uintptr_t out, int threads, int dtype) {
  tk::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    tk::launch(shuffles_kernel<T>, dim3(1), dim3(threads), 0, nullptr, reinterpret_cast<T*>(out));
  });
}
void gemm(uintptr_t a, uintptr_t b, uintptr_t c, bool a_t, bool b_t) {
  auto run = [&](auto kernel) {
    tk::launch(kernel, dim3(1), dim3(128), 0, nullptr, reinterpret_cast<const float*>(a),
               reinterpret_cast<const float*>(b), reinterpret_cast<float*>(c));
  };
  if (a_t && b_t) run(gemm_kernel<true, true>);
  else if (a_t) run(gemm_kernel<true, false>);
  else if (b_t) run(gemm_kernel<false, true>);
  else run(gemm_kernel<false, false>);
}
void int_shuffles(uintptr_t out, int threads) {
  tk::launch(int_shuffles_kernel, dim3(1), dim3(threads), 0, nullptr, reinterpret_cast<int*>(out));
}
void atomics(uintptr_t fsum, uintptr_t isum, uintptr_t in, int n, int threads) {
  tk::launch(atomics_kernel, dim3((n + threads - 1) / threads), dim3(threads), 0, nullptr, reinterpret_cast<float*>(fsum),
             reinterpret_cast<int*>(isum), reinterpret_cast<const float*>(in), n);
}

}  // namespace simt_selftest
