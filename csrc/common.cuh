// Device helpers shared by every CUDA kernel file: element conversion, warp and block reductions,
// dynamic shared memory, and the one launch helper (the only place a kernel launch is written).
// The same text compiles under nvcc (real GPUs) and under the host compiler with host/simt.h.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
// 128-byte aligned: cp.async and ldmatrix need 16-byte aligned rows and the swizzled tiles start on a 128-byte
// bank boundary; only the declared alignment is guaranteed (not wherever dynamic shared memory happens to start).
#define TK_EXTERN_SHARED(type, name) extern __shared__ __align__(128) unsigned char name##_raw[]; \
  type* name = reinterpret_cast<type*>(name##_raw)
#else
#include "host/simt.h"
// simt keeps dynamic shared memory in a per-launch buffer instead of an extern symbol.
#define TK_EXTERN_SHARED(type, name) type* name = static_cast<type*>(::simt::dynamic_shared())
#endif

#include "types.h"

namespace tk {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float<uint8_t>(uint8_t v) { return static_cast<float>(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

template <typename Op>
__device__ __forceinline__ float warp_allreduce(float v, Op op) {
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// All threads of the block get the reduction of `v`. blockDim.x must be a multiple of 32.
// `scratch` holds at least 32 floats; the trailing barrier lets the caller reuse it at once.
template <typename Op>
__device__ __forceinline__ float block_allreduce(float v, Op op, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  v = warp_allreduce(v, op);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();  // every warp's partial is in shared memory
  float total = scratch[0];
  for (int w = 1; w < n_warps; ++w) total = op(total, scratch[w]);
  __syncthreads();  // everyone has read scratch before the caller overwrites it
  return total;
}

// Running softmax statistics: m = max of the scores seen, s = sum of exp(score - m).
struct SoftmaxStat {
  float m, s;
};

__device__ __forceinline__ SoftmaxStat stat_add(SoftmaxStat a, float x) {
  // Masked scores are -inf and leave the statistics unchanged (no exp(-inf - -inf) = NaN).
  if (x == -INFINITY) return a;
  float m = fmaxf(a.m, x);
  return SoftmaxStat{m, a.s * expf(a.m - m) + expf(x - m)};
}

__device__ __forceinline__ SoftmaxStat stat_merge(SoftmaxStat a, SoftmaxStat b) {
  float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return SoftmaxStat{-INFINITY, 0.0f};
  return SoftmaxStat{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ __forceinline__ SoftmaxStat warp_allreduce_stat(SoftmaxStat st) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    SoftmaxStat o{__shfl_xor_sync(0xffffffffu, st.m, offset), __shfl_xor_sync(0xffffffffu, st.s, offset)};
    st = stat_merge(st, o);
  }
  return st;
}

}  // namespace tk

namespace tk {

// Calls f(T{}) with T the element type of a DType code.
template <typename F>
inline void dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat16: f(__half{}); break;
    case kBFloat16: f(__nv_bfloat16{}); break;
    default: throw std::invalid_argument("unsupported dtype code " + std::to_string(dtype));
  }
}

// V consecutive elements of T moved by one global access: with V = Vec16<T> that is 16 bytes, one LDG.128 /
// STG.128, the widest access (a 2-byte access per element keeps ~1/8 of the bytes in flight per instruction, which
// is what held the element-wise kernels to ~0.9 TB/s on an H200). The address must be aligned to the pack's size.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};
template <typename T> constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// Loads go through a plain integer vector of the pack's size; stores assemble 32-bit words of element bits.
template <int Bytes> struct BitsOf;
template <> struct BitsOf<16> { using type = uint4; };
template <> struct BitsOf<8> { using type = uint2; };
template <> struct BitsOf<4> { using type = uint32_t; };
template <> struct BitsOf<2> { using type = uint16_t; };

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const void* base, int64_t offset) {
  using Bits = typename BitsOf<sizeof(Pack<T, V>)>::type;
  const Bits bits = *reinterpret_cast<const Bits*>(static_cast<const T*>(base) + offset);
  Pack<T, V> p;
  memcpy(&p, &bits, sizeof(p));
  return p;
}

template <typename T>
__device__ __forceinline__ uint32_t element_bits(T v) {
  if constexpr (sizeof(T) == 4) {
    uint32_t b;
    memcpy(&b, &v, 4);
    return b;
  } else {
    uint16_t b;
    memcpy(&b, &v, 2);
    return b;
  }
}

// One 16-byte global store of four words. Written as the instruction: NVVM turned the same store through a uint4
// into four 4-byte ones wherever it lost the pointer's alignment (every store of the head merge, the later packs of
// a norm row). The "memory" clobber keeps the in-place epilogue's earlier load of the same address before it.
__device__ __forceinline__ void store_16_bytes(void* dst, const uint32_t (&w)[4]) {
#ifdef __CUDACC__
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
               : "memory");
#else
  memcpy(dst, w, 16);
#endif
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(void* base, int64_t offset, const Pack<T, V>& p) {
  T* dst = static_cast<T*>(base) + offset;
  if constexpr (sizeof(Pack<T, V>) < 4) {
    *dst = p.v[0];
  } else {
    constexpr int kWords = sizeof(Pack<T, V>) / 4, kPerWord = 4 / sizeof(T);
    uint32_t w[kWords];
#pragma unroll
    for (int i = 0; i < kWords; ++i) {
      w[i] = 0;
#pragma unroll
      for (int j = 0; j < kPerWord; ++j) w[i] |= element_bits(p.v[i * kPerWord + j]) << (32 / kPerWord * j);
    }
    if constexpr (kWords == 4) store_16_bytes(dst, w);
    else if constexpr (kWords == 2) *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
    else *reinterpret_cast<uint32_t*>(dst) = w[0];
  }
}

// A pack as fp32 values; zeros for a null pointer (an absent bias).
template <typename T, int V>
__device__ __forceinline__ void load_floats(const void* p, int64_t offset, float (&out)[V]) {
  if (!p) {
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = 0.0f;
    return;
  }
  const Pack<T, V> v = load_pack<T, V>(p, offset);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = to_float(v.v[j]);
}

// Host side of the same contract: every pointer aligned to `bytes` (null pointers are) and every element
// stride/extent a multiple of `elements`, so each pack of a row starts aligned.
inline bool packs_fit(std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> extents, int bytes,
                      int64_t elements) {
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) != 0) return false;
  for (int64_t e : extents)
    if (e % elements != 0) return false;
  return true;
}

// Elements of a DType code in a 16-byte pack (kVec16 of its type).
inline int vec16_of(int dtype) {
  int v = 1;
  dispatch_dtype(dtype, [&](auto tag) { v = kVec16<decltype(tag)>; });
  return v;
}

// Splits a flat row index into the (i0, i1, i2) of a [d0, d1, d2, cols] view and returns the
// element offset of the row's first column through `stride` (64-bit: rows * cols may pass 2^31).
__device__ __forceinline__ int64_t row_offset(int64_t row, int64_t d1, int64_t d2, const int64_t* stride) {
  const int64_t i2 = row % d2, i1 = (row / d2) % d1, i0 = row / (d1 * d2);
  return i0 * stride[0] + i1 * stride[1] + i2 * stride[2];
}

}  // namespace tk

namespace tk {

// The dropout draw shared with the Triton kernels (kernels/common.py: dropout_keep), bit for bit: a
// lowbias32 hash of (row hash of the 64-bit seed, column); kept iff its top 24 bits >= p * 2^24.
__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

__device__ __forceinline__ uint32_t dropout_row_hash(uint64_t seed, int64_t row) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint64_t r = static_cast<uint64_t>(row);
  return mix32(mix32(static_cast<uint32_t>(r) ^ k0) ^ static_cast<uint32_t>(r >> 32) ^ k1);
}

__device__ __forceinline__ bool dropout_keep(uint32_t row_hash, int64_t col, uint32_t threshold) {
  return (mix32(row_hash ^ static_cast<uint32_t>(col)) >> 8) >= threshold;
}

// p * 2^24 as the kernels compare it (the same float product as the Triton kernels).
__host__ __device__ inline uint32_t dropout_threshold(float p) { return static_cast<uint32_t>(p * 16777216.0f); }

}  // namespace tk
