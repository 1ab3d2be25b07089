// Kernels that test the simulator itself (built into _C_host only): a barrier the caller may skip,
// divergent barriers, warp shuffles of every element type, atomics and dynamic shared memory.
#include "../launch.cuh"
#include "../block_gemm.cuh"
#include "../ptx.cuh"
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

// ---- PTX instructions (csrc/ptx.cuh) ----
// Each kernel below states the PTX ISA's layout itself, element by element, and checks the simulator's instruction
// against it through global memory, so a layout mistake in simt.h shows as a wrong element of a named lane.

// D [16 x 8] = A [16 x 16] * B [16 x 8] + C, one warp: every lane builds its fragments from the documented layout
// (g = lane / 4, t = lane % 4) and writes its four outputs where the layout puts them.
template <typename T>
__global__ void mma_16816_kernel(const T* a, const T* b, const float* c, float* d) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  auto bits = [](T v) { uint16_t u; memcpy(&u, &v, 2); return static_cast<uint32_t>(u); };
  uint32_t af[4], bf[2];
  float cf[4], df[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i & 1), col = 2 * t + 8 * (i >> 1);
    af[i] = bits(a[row * 16 + col]) | (bits(a[row * 16 + col + 1]) << 16);
  }
  for (int i = 0; i < 2; ++i) {
    const int k = 2 * t + 8 * i;
    bf[i] = bits(b[k * 8 + g]) | (bits(b[(k + 1) * 8 + g]) << 16);
  }
  for (int i = 0; i < 4; ++i) cf[i] = c[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
  tk::mma_16816<T>(df, af, bf, cf);
  for (int i = 0; i < 4; ++i) d[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = df[i];
}

// ldmatrix .x4 of a 16 x 16 tile of 16-bit elements in shared memory: matrix i is rows 8(i % 2).., columns
// 8(i / 2).. (the A-fragment order); lane l gives row l % 8 of matrix l / 8. out[lane][i][h] = the element half h
// of register i holds, as the lane received it.
template <bool TRANS>
__global__ void ldmatrix_kernel(const uint16_t* tile, uint16_t* out) {
  __shared__ __align__(16) uint16_t s[16 * 16];
  const int lane = threadIdx.x;
  for (int e = lane; e < 256; e += 32) s[e] = tile[e];
  __syncwarp();
  const int mat = lane >> 3;
  uint32_t r[4];
  tk::ldmatrix_x4<TRANS>(r, s + (8 * (mat & 1) + (lane & 7)) * 16 + 8 * (mat >> 1));
  for (int i = 0; i < 4; ++i) {
    out[lane * 8 + i * 2] = static_cast<uint16_t>(r[i]);
    out[lane * 8 + i * 2 + 1] = static_cast<uint16_t>(r[i] >> 16);
  }
}

// n 16-byte chunks global -> shared by cp.async, chunk i reading src_bytes[i] bytes, one group per chunk parity
// (even chunks committed first). WAIT: 0 waits for both groups before reading, 1 for the older group only (the even
// chunks), -1 reads before any wait (then waits, so no copy is left in flight).
__global__ void cp_async_kernel(const uint4* src, const int* src_bytes, uint4* out, int n, int wait) {
  TK_EXTERN_SHARED(uint4, s);
  for (int parity = 0; parity < 2; ++parity) {
    for (int i = threadIdx.x; i < n; i += blockDim.x)
      if ((i & 1) == parity) tk::cp_async_16(s + i, src + i, src_bytes[i]);
    tk::cp_async_commit();
  }
  if (wait == 0) tk::cp_async_wait<0>();
  if (wait == 1) tk::cp_async_wait<1>();
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = s[i];  // a thread reads only its own copies
  tk::cp_async_wait<0>();
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

void mma_16816(uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d, int dtype) {
  tk::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (sizeof(T) == 2)
      tk::launch(mma_16816_kernel<T>, dim3(1), dim3(32), 0, nullptr, reinterpret_cast<const T*>(a),
                 reinterpret_cast<const T*>(b), reinterpret_cast<const float*>(c), reinterpret_cast<float*>(d));
    else
      throw std::invalid_argument("mma.sync m16n8k16 takes fp16 or bf16");
  });
}
void ldmatrix(uintptr_t tile, uintptr_t out, bool trans) {
  auto run = [&](auto kernel) {
    tk::launch(kernel, dim3(1), dim3(32), 0, nullptr, reinterpret_cast<const uint16_t*>(tile),
               reinterpret_cast<uint16_t*>(out));
  };
  if (trans) run(ldmatrix_kernel<true>);
  else run(ldmatrix_kernel<false>);
}
void cp_async(uintptr_t src, uintptr_t src_bytes, uintptr_t out, int n, int threads, int wait) {
  tk::launch(cp_async_kernel, dim3(1), dim3(threads), n * sizeof(uint4), nullptr, reinterpret_cast<const uint4*>(src),
             reinterpret_cast<const int*>(src_bytes), reinterpret_cast<uint4*>(out), n, wait);
}

}  // namespace simt_selftest
