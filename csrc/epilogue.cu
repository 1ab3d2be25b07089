// Bias + activation + dropout + residual after a GEMM, their backward, and the head split/merge copies:
// grid-stride element-wise kernels with 64-bit indices (M·N may pass 2^31), fp32 math.
#include "epilogue.h"
#include "launch.cuh"

namespace tk {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

__device__ __forceinline__ float activate(float z, int act) {
  switch (act) {
    case kActRelu: return fmaxf(z, 0.0f);
    case kActGelu: return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
    case kActGeluTanh: return 0.5f * z * (1.0f + tanhf(0.79788456080286536f * (z + 0.044715f * z * z * z)));
    case kActSilu: return z / (1.0f + expf(-z));
    default: return z;
  }
}

__device__ __forceinline__ float activate_grad(float z, int act) {
  switch (act) {
    case kActRelu: return z > 0.0f ? 1.0f : 0.0f;
    case kActGelu: return 0.5f * (1.0f + erff(z * 0.70710678118654752f)) + z * 0.39894228040143268f * expf(-0.5f * z * z);
    case kActGeluTanh: {
      const float u = 0.79788456080286536f * (z + 0.044715f * z * z * z);
      const float t = tanhf(u);
      return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * 0.79788456080286536f * (1.0f + 3.0f * 0.044715f * z * z);
    }
    case kActSilu: {
      const float s = 1.0f / (1.0f + expf(-z));
      return s * (1.0f + z * (1.0f - s));
    }
    default: return 1.0f;
  }
}

__device__ __forceinline__ int64_t first_index() { return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t grid_step() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

template <typename T>
__global__ void __launch_bounds__(kThreads) epilogue_kernel(EpilogueArgs a) {
  const uint32_t threshold = dropout_threshold(a.dropout_p);
  const float keep_scale = a.dropout_p > 0.0f ? 1.0f / (1.0f - a.dropout_p) : 1.0f;
  const uint64_t seed = a.dropout_p > 0.0f ? *a.seed : 0;
  T* acc = static_cast<T*>(a.acc);
  T* acc2 = static_cast<T*>(a.acc2);
  for (int64_t e = first_index(); e < a.M * a.N; e += grid_step()) {
    const int64_t m = e / a.N, n = e % a.N;
    float z = to_float(acc[e]);
    if (a.bias) z += to_float(static_cast<const T*>(a.bias)[n]);
    float y = activate(z, a.act);
    // Backward reads the pre-activation in the stored precision, as the Triton kernels store it.
    if (a.act != kActNone) acc[e] = from_float<T>(z);
    if (acc2) {
      float z2 = to_float(acc2[e]);
      if (a.bias2) z2 += to_float(static_cast<const T*>(a.bias2)[n]);
      acc2[e] = from_float<T>(z2);
      y *= z2;
    }
    if (a.dropout_p > 0.0f) y = dropout_keep(dropout_row_hash(seed, m), n, threshold) ? y * keep_scale : 0.0f;
    if (a.residual) y += to_float(static_cast<const T*>(a.residual)[m * a.res_row_stride + n]);
    static_cast<T*>(a.y)[e] = from_float<T>(y);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) activation_backward_kernel(ActBackwardArgs a) {
  const uint32_t threshold = dropout_threshold(a.dropout_p);
  const float keep_scale = a.dropout_p > 0.0f ? 1.0f / (1.0f - a.dropout_p) : 1.0f;
  const uint64_t seed = a.dropout_p > 0.0f ? *a.seed : 0;
  for (int64_t e = first_index(); e < a.M * a.N; e += grid_step()) {
    const int64_t m = e / a.N, n = e % a.N;
    float dy = to_float(static_cast<const T*>(a.dy)[m * a.dy_row_stride + n * a.dy_col_stride]);
    if (a.dropout_p > 0.0f) dy = dropout_keep(dropout_row_hash(seed, m), n, threshold) ? dy * keep_scale : 0.0f;
    const float z = a.z ? to_float(static_cast<const T*>(a.z)[e]) : 0.0f;
    if (a.z2) {
      const float z2 = to_float(static_cast<const T*>(a.z2)[e]);
      static_cast<T*>(a.dz)[e] = from_float<T>(dy * z2 * activate_grad(z, a.act));
      static_cast<T*>(a.dz2)[e] = from_float<T>(dy * activate(z, a.act));
    } else {
      static_cast<T*>(a.dz)[e] = from_float<T>(a.act == kActNone ? dy : dy * activate_grad(z, a.act));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) head_split_kernel(HeadLayoutArgs a) {
  const int64_t total = a.B * a.heads * a.L * a.D;
  for (int64_t e = first_index(); e < total; e += grid_step()) {
    const int64_t d = e % a.D, l = (e / a.D) % a.L, h = (e / (a.D * a.L)) % a.heads, b = e / (a.D * a.L * a.heads);
    const int64_t col = a.col0 + h * a.D + d;
    float v = to_float(static_cast<const T*>(a.src)[(b * a.L + l) * a.row_stride + col]);
    if (a.bias) v += to_float(static_cast<const T*>(a.bias)[col]);
    static_cast<T*>(a.dst)[e] = from_float<T>(v);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) head_merge_kernel(HeadLayoutArgs a) {
  const int64_t total = a.B * a.heads * a.L * a.D;
  for (int64_t e = first_index(); e < total; e += grid_step()) {
    // e walks the destination row-major ([B·L, heads·D]) so writes are coalesced.
    const int64_t d = e % a.D, h = (e / a.D) % a.heads, l = (e / (a.D * a.heads)) % a.L, b = e / (a.D * a.heads * a.L);
    const T v = static_cast<const T*>(a.src)[b * a.strides[0] + h * a.strides[1] + l * a.strides[2] + d * a.strides[3]];
    static_cast<T*>(a.dst)[(b * a.L + l) * a.row_stride + a.col0 + h * a.D + d] = v;
  }
}

unsigned blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

}  // namespace

void epilogue_forward(const EpilogueArgs& a, tk_stream_t stream) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    launch(epilogue_kernel<decltype(tag)>, dim3(blocks_for(a.M * a.N)), dim3(kThreads), 0, stream, a);
  });
}

void activation_backward(const ActBackwardArgs& a, tk_stream_t stream) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    launch(activation_backward_kernel<decltype(tag)>, dim3(blocks_for(a.M * a.N)), dim3(kThreads), 0, stream, a);
  });
}

void head_split(const HeadLayoutArgs& a, tk_stream_t stream) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    launch(head_split_kernel<decltype(tag)>, dim3(blocks_for(a.B * a.heads * a.L * a.D)), dim3(kThreads), 0, stream, a);
  });
}

void head_merge(const HeadLayoutArgs& a, tk_stream_t stream) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    launch(head_merge_kernel<decltype(tag)>, dim3(blocks_for(a.B * a.heads * a.L * a.D)), dim3(kThreads), 0, stream, a);
  });
}

}  // namespace tk
