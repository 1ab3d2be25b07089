// The warp-level PTX instructions of the register-resident attention kernels: mma.sync m16n8k16 (fp16/bf16 in,
// fp32 accumulate), ldmatrix (x4, optionally transposed) and cp.async (16-byte copies global -> shared, committed
// and waited for in groups). Each wrapper is one instruction under nvcc; the host simulator (host/simt.h,
// namespace simt::ptx) implements the same instruction with the register layouts the PTX ISA documents, so the
// same kernel sources run on CPU fibers.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with g = lane / 4 and t = lane % 4; each 32-bit
// register holds two 16-bit elements, the lower column (A, C) or k (B) in the low half:
//   A (16 x 16, row-major)  a[0]: (g, 2t..2t+1)    a[1]: (g + 8, 2t..2t+1)
//                           a[2]: (g, 2t+8..2t+9)  a[3]: (g + 8, 2t+8..2t+9)
//   B (16 x 8, k x n)       b[0]: (k = 2t..2t+1, n = g)   b[1]: (k = 2t+8..2t+9, n = g)
//   C, D (16 x 8, fp32)     c[0], c[1]: (g, 2t), (g, 2t+1)   c[2], c[3]: (g + 8, 2t), (g + 8, 2t+1)
// ldmatrix .x4: lanes 8i..8i+7 give the row addresses (16 bytes each) of 8 x 8 matrix i; register i of lane l gets
// row l / 4, columns 2(l % 4)..2(l % 4)+1 of matrix i (.trans: rows 2(l % 4)..2(l % 4)+1 of column l / 4).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.cuh"

namespace tk {

// D = A * B + C on the tensor cores of one warp (every lane calls it, converged).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                          const float (&c)[4]) {
#ifdef __CUDACC__
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%11,%12,%13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
                   "f"(c[3]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%11,%12,%13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
                   "f"(c[3]));
  }
#else
  ::simt::ptx::mma_16816<T>(d, a, b, c);
#endif
}

// The asm below reads or writes memory the compiler cannot see through its operands (shared tiles by address,
// copies that land later): each carries a "memory" clobber, so no ordinary load or store of those tiles is moved
// across it (a shared-memory read hoisted above the cp.async wait would read a stale tile).

// Four 8 x 8 matrices of 16-bit elements from shared memory; `row` is this lane's row address (16-byte aligned).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#ifdef __CUDACC__
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (TRANS) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
  }
#else
  ::simt::ptx::ldmatrix_x4(r, row, TRANS);
#endif
}

// 16 bytes global -> shared, asynchronously: the first `src_bytes` (0..16) are read, the rest of the 16 are zeroed.
// Both addresses 16-byte aligned. Visible to this thread after the cp_async_wait that retires its group, to the
// block after a __syncthreads() that follows that wait.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
#ifdef __CUDACC__
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src), "r"(src_bytes) : "memory");
#else
  ::simt::ptx::cp_async_16(dst, src, src_bytes);
#endif
}

// Closes the group of this thread's cp.async copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef __CUDACC__
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
  ::simt::ptx::cp_async_commit();
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef __CUDACC__
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#else
  ::simt::ptx::cp_async_wait(N);
#endif
}

// 2^x by the special-function unit alone (ex2.approx.ftz: ~2 ulp, results below 2^-126 flush to 0, 2^-inf = 0):
// one MUFU.EX2 where expf / exp2f without fast math add range reduction and denormal fix-ups (~9 instructions).
__device__ __forceinline__ float exp2_approx(float x) {
#ifdef __CUDACC__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}

// Two fp32 values as one register of two 16-bit elements (the lower one in the low half), as A and B fragments
// hold them.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T l = from_float<T>(lo), h = from_float<T>(hi);
  uint16_t lb, hb;
  memcpy(&lb, &l, 2);
  memcpy(&hb, &h, 2);
  return static_cast<uint32_t>(lb) | (static_cast<uint32_t>(hb) << 16);
}

}  // namespace tk
