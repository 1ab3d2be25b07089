// Bias + activation + dropout + residual after a GEMM, their backward, and the head split/merge copies.
//
// Each kernel is a row-tiled stream: a thread owns one pack of columns (16 bytes when every pointer, stride and
// extent allows it, else one element) for its whole life, so the column index math, the bias and the activation
// (a template parameter) are settled before the row loop, and the loop is loads, fp32 math and stores. The form
// before this divided a 64-bit flat index per element and moved 2 bytes per access: ~0.9 TB/s on an H200.
// kRows rows are loaded before any is stored: the loads are in flight together, and the in-place epilogue (acc
// holds the product and then the pre-activation) never reads a row it has written.
#include "epilogue.h"
#include "launch.cuh"

namespace tk {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = 2;
constexpr int64_t kMaxGridY = 65535;

template <int ACT>
__device__ __forceinline__ float activate(float z) {
  if constexpr (ACT == kActRelu) return fmaxf(z, 0.0f);
  if constexpr (ACT == kActGelu) return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
  if constexpr (ACT == kActGeluTanh) return 0.5f * z * (1.0f + tanhf(0.79788456080286536f * (z + 0.044715f * z * z * z)));
  if constexpr (ACT == kActSilu) return z / (1.0f + expf(-z));
  return z;
}

template <int ACT>
__device__ __forceinline__ float activate_grad(float z) {
  if constexpr (ACT == kActRelu) return z > 0.0f ? 1.0f : 0.0f;
  if constexpr (ACT == kActGelu)
    return 0.5f * (1.0f + erff(z * 0.70710678118654752f)) + z * 0.39894228040143268f * expf(-0.5f * z * z);
  if constexpr (ACT == kActGeluTanh) {
    const float u = 0.79788456080286536f * (z + 0.044715f * z * z * z);
    const float t = tanhf(u);
    return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * 0.79788456080286536f * (1.0f + 3.0f * 0.044715f * z * z);
  }
  if constexpr (ACT == kActSilu) {
    const float s = 1.0f / (1.0f + expf(-z));
    return s * (1.0f + z * (1.0f - s));
  }
  return 1.0f;
}

// The first column of this thread's pack (columns are blockIdx.x · blockDim.x + threadIdx.x packs of V).
template <int V>
__device__ __forceinline__ int64_t pack_column() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
}
__device__ __forceinline__ int64_t first_row() { return static_cast<int64_t>(blockIdx.y) * kRows; }
__device__ __forceinline__ int64_t row_step() { return static_cast<int64_t>(gridDim.y) * kRows; }

template <typename T, int V, int ACT>
__global__ void __launch_bounds__(kThreads) epilogue_kernel(EpilogueArgs a) {
  const int64_t n0 = pack_column<V>();
  if (n0 >= a.N) return;
  const uint32_t threshold = dropout_threshold(a.dropout_p);
  const float keep_scale = a.dropout_p > 0.0f ? 1.0f / (1.0f - a.dropout_p) : 1.0f;
  const uint64_t seed = a.dropout_p > 0.0f ? *a.seed : 0;
  float bias[V], bias2[V];
  load_floats<T, V>(a.bias, n0, bias);
  load_floats<T, V>(a.bias2, n0, bias2);
  for (int64_t m0 = first_row(); m0 < a.M; m0 += row_step()) {
    Pack<T, V> z[kRows], z2[kRows], r[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      if (m0 + i >= a.M) break;
      const int64_t e = (m0 + i) * a.N + n0;
      z[i] = load_pack<T, V>(a.acc, e);
      if (a.acc2) z2[i] = load_pack<T, V>(a.acc2, e);
      if (a.residual) r[i] = load_pack<T, V>(a.residual, (m0 + i) * a.res_row_stride + n0);
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t m = m0 + i, e = m * a.N + n0;
      if (m >= a.M) break;
      const uint32_t row_hash = a.dropout_p > 0.0f ? dropout_row_hash(seed, m) : 0u;
      Pack<T, V> y;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float zf = to_float(z[i].v[j]) + bias[j];
        float yf = activate<ACT>(zf);
        // Backward reads the pre-activation in the stored precision, as the Triton kernels store it.
        z[i].v[j] = from_float<T>(zf);
        if (a.acc2) {
          const float z2f = to_float(z2[i].v[j]) + bias2[j];
          z2[i].v[j] = from_float<T>(z2f);
          yf *= z2f;
        }
        if (a.dropout_p > 0.0f) yf = dropout_keep(row_hash, n0 + j, threshold) ? yf * keep_scale : 0.0f;
        if (a.residual) yf += to_float(r[i].v[j]);
        y.v[j] = from_float<T>(yf);
      }
      if (ACT != kActNone) store_pack<T, V>(a.acc, e, z[i]);
      if (a.acc2) store_pack<T, V>(a.acc2, e, z2[i]);
      store_pack<T, V>(a.y, e, y);
    }
  }
}

template <typename T, int V, int ACT>
__global__ void __launch_bounds__(kThreads) activation_backward_kernel(ActBackwardArgs a) {
  const int64_t n0 = pack_column<V>();
  if (n0 >= a.N) return;
  const uint32_t threshold = dropout_threshold(a.dropout_p);
  const float keep_scale = a.dropout_p > 0.0f ? 1.0f / (1.0f - a.dropout_p) : 1.0f;
  const uint64_t seed = a.dropout_p > 0.0f ? *a.seed : 0;
  for (int64_t m0 = first_row(); m0 < a.M; m0 += row_step()) {
    Pack<T, V> dy[kRows], z[kRows], z2[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t m = m0 + i, e = m * a.N + n0;
      if (m >= a.M) break;
      // A pack of V > 1 implies dy_col_stride == 1 (the launcher's choice); V = 1 takes any strides.
      dy[i] = load_pack<T, V>(a.dy, m * a.dy_row_stride + n0 * a.dy_col_stride);
      if (a.z) z[i] = load_pack<T, V>(a.z, e);
      if (a.z2) z2[i] = load_pack<T, V>(a.z2, e);
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t m = m0 + i, e = m * a.N + n0;
      if (m >= a.M) break;
      const uint32_t row_hash = a.dropout_p > 0.0f ? dropout_row_hash(seed, m) : 0u;
      Pack<T, V> dz, dz2;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float d = to_float(dy[i].v[j]);
        if (a.dropout_p > 0.0f) d = dropout_keep(row_hash, n0 + j, threshold) ? d * keep_scale : 0.0f;
        const float zf = a.z ? to_float(z[i].v[j]) : 0.0f;
        if (a.z2) {
          dz.v[j] = from_float<T>(d * to_float(z2[i].v[j]) * activate_grad<ACT>(zf));
          dz2.v[j] = from_float<T>(d * activate<ACT>(zf));
        } else {
          dz.v[j] = from_float<T>(ACT == kActNone ? d : d * activate_grad<ACT>(zf));
        }
      }
      store_pack<T, V>(a.dz, e, dz);
      if (a.z2) store_pack<T, V>(a.dz2, e, dz2);
    }
  }
}

// Head split and merge: a thread owns one pack of a token's heads·D columns, so its head h and offset d are fixed;
// the loop walks tokens r = b·L + l. A pack never straddles two heads (the launcher's V divides D).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) head_split_kernel(HeadLayoutArgs a) {
  const int64_t c0 = pack_column<V>();
  if (c0 >= a.heads * a.D) return;
  const int64_t h = c0 / a.D, d = c0 - h * a.D, tokens = a.B * a.L;
  float bias[V];
  load_floats<T, V>(a.bias, a.col0 + c0, bias);
  for (int64_t r0 = first_row(); r0 < tokens; r0 += row_step()) {
    Pack<T, V> v[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i)
      if (r0 + i < tokens) v[i] = load_pack<T, V>(a.src, (r0 + i) * a.row_stride + a.col0 + c0);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t r = r0 + i;
      if (r >= tokens) break;
      const int64_t b = r / a.L, l = r - b * a.L;
#pragma unroll
      for (int j = 0; j < V; ++j) v[i].v[j] = from_float<T>(to_float(v[i].v[j]) + bias[j]);
      store_pack<T, V>(a.dst, ((b * a.heads + h) * a.L + l) * a.D + d, v[i]);
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) head_merge_kernel(HeadLayoutArgs a) {
  const int64_t c0 = pack_column<V>();
  if (c0 >= a.heads * a.D) return;
  const int64_t h = c0 / a.D, d = c0 - h * a.D, tokens = a.B * a.L;
  const int64_t head_offset = h * a.strides[1] + d * a.strides[3];
  for (int64_t r0 = first_row(); r0 < tokens; r0 += row_step()) {
    Pack<T, V> v[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t r = r0 + i;
      if (r >= tokens) break;
      const int64_t b = r / a.L, l = r - b * a.L;
      v[i] = load_pack<T, V>(a.src, b * a.strides[0] + l * a.strides[2] + head_offset);
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i)
      if (r0 + i < tokens) store_pack<T, V>(a.dst, (r0 + i) * a.row_stride + a.col0 + c0, v[i]);
  }
}

// Packs of V columns over `columns`, kRows rows a step: as many threads as packs (to kThreads), rows over grid.y.
void grid_for(int64_t rows, int64_t columns, int pack, dim3& grid, dim3& block) {
  const int64_t packs = (columns + pack - 1) / pack;
  const int64_t threads = packs >= kThreads ? kThreads : (packs + 31) / 32 * 32;
  const int64_t row_blocks = (rows + kRows - 1) / kRows;
  block = dim3(static_cast<unsigned>(threads > 0 ? threads : 32));
  grid = dim3(static_cast<unsigned>((packs + block.x - 1) / block.x),
              static_cast<unsigned>(row_blocks < kMaxGridY ? row_blocks : kMaxGridY));
}

// Calls f(T{}, integral_constant<V>) with V the 16-byte pack when `fits`, else 1.
template <typename F>
void dispatch_pack(int dtype, bool fits, F&& f) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if (fits) f(tag, std::integral_constant<int, kVec16<T>>{});
    else f(tag, std::integral_constant<int, 1>{});
  });
}

template <typename F>
void dispatch_activation(int act, F&& f) {
  switch (act) {
    case kActNone: f(std::integral_constant<int, kActNone>{}); break;
    case kActRelu: f(std::integral_constant<int, kActRelu>{}); break;
    case kActGelu: f(std::integral_constant<int, kActGelu>{}); break;
    case kActGeluTanh: f(std::integral_constant<int, kActGeluTanh>{}); break;
    case kActSilu: f(std::integral_constant<int, kActSilu>{}); break;
    default: throw std::invalid_argument("unknown activation code " + std::to_string(act));
  }
}

}  // namespace

int pack_width(const EpilogueArgs& a) {
  const int v = vec16_of(a.dtype);
  return packs_fit({a.acc, a.acc2, a.bias, a.bias2, a.residual, a.y}, {a.N, a.res_row_stride}, 16, v) ? v : 1;
}

int pack_width(const ActBackwardArgs& a) {
  const int v = vec16_of(a.dtype);
  return a.dy_col_stride == 1 && packs_fit({a.dy, a.z, a.z2, a.dz, a.dz2}, {a.N, a.dy_row_stride}, 16, v) ? v : 1;
}

int pack_width(const HeadLayoutArgs& a, bool merge) {
  const int v = vec16_of(a.dtype);
  if (merge && a.strides[3] != 1) return 1;
  const int64_t s0 = merge ? a.strides[0] : 0, s1 = merge ? a.strides[1] : 0, s2 = merge ? a.strides[2] : 0;
  return packs_fit({a.src, a.bias, a.dst}, {a.D, a.col0, a.row_stride, s0, s1, s2}, 16, v) ? v : 1;
}

void epilogue_forward(const EpilogueArgs& a, tk_stream_t stream) {
  dispatch_pack(a.dtype, pack_width(a) > 1, [&](auto tag, auto pack) {
    dispatch_activation(a.act, [&](auto act) {
      dim3 grid, block;
      grid_for(a.M, a.N, pack.value, grid, block);
      launch(epilogue_kernel<decltype(tag), pack.value, act.value>, grid, block, 0, stream, a);
    });
  });
}

void activation_backward(const ActBackwardArgs& a, tk_stream_t stream) {
  dispatch_pack(a.dtype, pack_width(a) > 1, [&](auto tag, auto pack) {
    dispatch_activation(a.act, [&](auto act) {
      dim3 grid, block;
      grid_for(a.M, a.N, pack.value, grid, block);
      launch(activation_backward_kernel<decltype(tag), pack.value, act.value>, grid, block, 0, stream, a);
    });
  });
}

void head_split(const HeadLayoutArgs& a, tk_stream_t stream) {
  dispatch_pack(a.dtype, pack_width(a, false) > 1, [&](auto tag, auto pack) {
    dim3 grid, block;
    grid_for(a.B * a.L, a.heads * a.D, pack.value, grid, block);
    launch(head_split_kernel<decltype(tag), pack.value>, grid, block, 0, stream, a);
  });
}

void head_merge(const HeadLayoutArgs& a, tk_stream_t stream) {
  dispatch_pack(a.dtype, pack_width(a, true) > 1, [&](auto tag, auto pack) {
    dim3 grid, block;
    grid_for(a.B * a.L, a.heads * a.D, pack.value, grid, block);
    launch(head_merge_kernel<decltype(tag), pack.value>, grid, block, 0, stream, a);
  });
}

}  // namespace tk
