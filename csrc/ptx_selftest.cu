// Layout self-tests of the PTX instructions the attention kernels use (ptx.cuh): each kernel states the PTX ISA's
// layout itself, element by element, and checks the instruction against it through global memory. Built into both
// modules: against the simulator's instructions (_C_host, always) and the hardware's (_C, on a GPU), so a layout
// the simulator and the GPU disagree on shows as a wrong element of a named lane.
#include "ptx_selftest.h"

#include <stdexcept>

#include "launch.cuh"
#include "ptx.cuh"

namespace tk {
namespace {

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
  mma_16816<T>(df, af, bf, cf);
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
  ldmatrix_x4<TRANS>(r, s + (8 * (mat & 1) + (lane & 7)) * 16 + 8 * (mat >> 1));
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
      if ((i & 1) == parity) cp_async_16(s + i, src + i, src_bytes[i]);
    cp_async_commit();
  }
  if (wait == 0) cp_async_wait<0>();
  if (wait == 1) cp_async_wait<1>();
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = s[i];  // a thread reads only its own copies
  cp_async_wait<0>();
}

}  // namespace

void ptx_selftest_mma_16816(uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d, int dtype) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (sizeof(T) == 2)
      launch(mma_16816_kernel<T>, dim3(1), dim3(32), 0, nullptr, reinterpret_cast<const T*>(a),
             reinterpret_cast<const T*>(b), reinterpret_cast<const float*>(c), reinterpret_cast<float*>(d));
    else
      throw std::invalid_argument("mma.sync m16n8k16 takes fp16 or bf16");
  });
}

void ptx_selftest_ldmatrix(uintptr_t tile, uintptr_t out, bool trans) {
  auto run = [&](auto kernel) {
    launch(kernel, dim3(1), dim3(32), 0, nullptr, reinterpret_cast<const uint16_t*>(tile),
           reinterpret_cast<uint16_t*>(out));
  };
  if (trans) run(ldmatrix_kernel<true>);
  else run(ldmatrix_kernel<false>);
}

void ptx_selftest_cp_async(uintptr_t src, uintptr_t src_bytes, uintptr_t out, int n, int threads, int wait) {
  launch(cp_async_kernel, dim3(1), dim3(threads), n * sizeof(uint4), nullptr, reinterpret_cast<const uint4*>(src),
         reinterpret_cast<const int*>(src_bytes), reinterpret_cast<uint4*>(out), n, wait);
}

}  // namespace tk
