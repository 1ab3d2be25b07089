// Masked softmax forward and backward: warp-per-row for short rows, block-per-row with a two-pass
// loop (statistics, then output) for long rows, so any row length fits without holding the row.
#include "launch.cuh"
#include "softmax.h"

namespace tk {
namespace {

// Score of column j of a row, -inf where a mask hides it. A bool-masked position never reads x, so
// NaN/Inf under the mask cannot leak into the row.
template <typename T, int MASK>
__device__ __forceinline__ float masked_score(const SoftmaxFwdArgs& a, int64_t x_row, int64_t m_row,
                                              int64_t query, int64_t j) {
  if (a.causal && j > query + a.causal_offset) return -INFINITY;
  if constexpr (MASK == kBoolMask) {
    if (!static_cast<const uint8_t*>(a.mask)[m_row + j * a.mask_stride[3]]) return -INFINITY;
  }
  float v = to_float(static_cast<const T*>(a.x)[x_row + j * a.x_stride[3]]) * a.scale;
  if constexpr (MASK == kSameDTypeMask) v += to_float(static_cast<const T*>(a.mask)[m_row + j * a.mask_stride[3]]);
  if constexpr (MASK == kFloat32Mask) v += static_cast<const float*>(a.mask)[m_row + j * a.mask_stride[3]];
  return v;
}

// Writes softmax of the row given its merged statistics; a row with no visible key gets zeros.
template <typename T, int MASK>
__device__ __forceinline__ void write_row(const SoftmaxFwdArgs& a, SoftmaxStat st, int64_t x_row, int64_t m_row,
                                          int64_t query, int64_t row, int64_t first, int64_t step) {
  T* y = static_cast<T*>(a.y) + row * a.cols;
  const float inv = st.m == -INFINITY ? 0.0f : 1.0f / st.s;
  for (int64_t j = first; j < a.cols; j += step) {
    const float v = masked_score<T, MASK>(a, x_row, m_row, query, j);
    y[j] = from_float<T>(v == -INFINITY ? 0.0f : expf(v - st.m) * inv);
  }
}

template <typename T, int MASK>
__global__ void __launch_bounds__(kWarpKernelThreads) softmax_fwd_warp(SoftmaxFwdArgs a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= a.rows) return;  // a whole warp leaves together; this kernel has no block barrier
  const int64_t x_row = row_offset(row, a.d1, a.d2, a.x_stride);
  const int64_t m_row = MASK == kNoMask ? 0 : row_offset(row, a.d1, a.d2, a.mask_stride);
  const int64_t query = row % a.d2;
  SoftmaxStat st{-INFINITY, 0.0f};
  for (int64_t j = lane; j < a.cols; j += 32) st = stat_add(st, masked_score<T, MASK>(a, x_row, m_row, query, j));
  st = warp_allreduce_stat(st);
  write_row<T, MASK>(a, st, x_row, m_row, query, row, lane, 32);
}

template <typename T, int MASK>
__global__ void __launch_bounds__(kBlockKernelThreadsLong) softmax_fwd_block(SoftmaxFwdArgs a) {
  __shared__ float warp_m[32];
  __shared__ float warp_s[32];
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  const int64_t x_row = row_offset(row, a.d1, a.d2, a.x_stride);
  const int64_t m_row = MASK == kNoMask ? 0 : row_offset(row, a.d1, a.d2, a.mask_stride);
  const int64_t query = row % a.d2;
  // Pass 1: per-thread running statistics over a strided slice of the row, merged across the block.
  SoftmaxStat st{-INFINITY, 0.0f};
  for (int64_t j = threadIdx.x; j < a.cols; j += blockDim.x) st = stat_add(st, masked_score<T, MASK>(a, x_row, m_row, query, j));
  st = warp_allreduce_stat(st);
  if (lane == 0) {
    warp_m[warp] = st.m;
    warp_s[warp] = st.s;
  }
  __syncthreads();  // all warp partials visible before any thread merges them
  st = SoftmaxStat{warp_m[0], warp_s[0]};
  for (int w = 1; w < n_warps; ++w) st = stat_merge(st, SoftmaxStat{warp_m[w], warp_s[w]});
  // Pass 2: recompute each score and normalise.
  write_row<T, MASK>(a, st, x_row, m_row, query, row, threadIdx.x, blockDim.x);
}

template <typename T>
__global__ void __launch_bounds__(kWarpKernelThreads) softmax_bwd_warp(SoftmaxBwdArgs a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= a.rows) return;
  const T* y = static_cast<const T*>(a.y) + row * a.cols;
  const T* dy = static_cast<const T*>(a.dy) + row_offset(row, a.d1, a.d2, a.dy_stride);
  T* dx = static_cast<T*>(a.dx) + row * a.cols;
  float dot = 0.0f;
  for (int64_t j = lane; j < a.cols; j += 32) dot += to_float(y[j]) * to_float(dy[j * a.dy_stride[3]]);
  dot = warp_allreduce(dot, SumOp{});
  for (int64_t j = lane; j < a.cols; j += 32)
    dx[j] = from_float<T>(a.scale * to_float(y[j]) * (to_float(dy[j * a.dy_stride[3]]) - dot));
}

template <typename T>
__global__ void __launch_bounds__(kBlockKernelThreadsLong) softmax_bwd_block(SoftmaxBwdArgs a) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* y = static_cast<const T*>(a.y) + row * a.cols;
  const T* dy = static_cast<const T*>(a.dy) + row_offset(row, a.d1, a.d2, a.dy_stride);
  T* dx = static_cast<T*>(a.dx) + row * a.cols;
  float dot = 0.0f;
  for (int64_t j = threadIdx.x; j < a.cols; j += blockDim.x) dot += to_float(y[j]) * to_float(dy[j * a.dy_stride[3]]);
  dot = block_allreduce(dot, SumOp{}, scratch);
  for (int64_t j = threadIdx.x; j < a.cols; j += blockDim.x)
    dx[j] = from_float<T>(a.scale * to_float(y[j]) * (to_float(dy[j * a.dy_stride[3]]) - dot));
}

bool use_warp_kernel(int algo, int64_t cols) {
  if (algo == kAlgoWarp) return true;
  if (algo == kAlgoBlock) return false;
  if (algo != kAlgoAuto) throw std::invalid_argument("softmax: unknown algo " + std::to_string(algo));
  return cols <= kWarpRowMaxCols;
}

void check_rows(int64_t rows, int64_t cols) {
  if (rows < 0 || cols < 0) throw std::invalid_argument("softmax: negative size");
  if (rows > 0x7fffffffLL) throw std::invalid_argument("softmax: more than 2^31-1 rows");
}

}  // namespace

void softmax_forward(const SoftmaxFwdArgs& a, int algo, tk_stream_t stream) {
  check_rows(a.rows, a.cols);
  if (a.mask_kind < kNoMask || a.mask_kind > kFloat32Mask) throw std::invalid_argument("softmax: unknown mask kind");
  if (a.rows == 0 || a.cols == 0) return;
  const bool warp = use_warp_kernel(algo, a.cols);
  const int threads = warp ? kWarpKernelThreads : (a.cols > kLongRowCols ? kBlockKernelThreadsLong : kBlockKernelThreads);
  const int64_t blocks = warp ? (a.rows + threads / 32 - 1) / (threads / 32) : a.rows;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto pick = [&](auto mask_tag) {
      constexpr int M = decltype(mask_tag)::value;
      launch(warp ? softmax_fwd_warp<T, M> : softmax_fwd_block<T, M>, dim3(static_cast<unsigned>(blocks)),
             dim3(threads), 0, stream, a);
    };
    switch (a.mask_kind) {
      case kNoMask: pick(std::integral_constant<int, kNoMask>{}); break;
      case kBoolMask: pick(std::integral_constant<int, kBoolMask>{}); break;
      case kSameDTypeMask: pick(std::integral_constant<int, kSameDTypeMask>{}); break;
      default: pick(std::integral_constant<int, kFloat32Mask>{}); break;
    }
  });
}

void softmax_backward(const SoftmaxBwdArgs& a, int algo, tk_stream_t stream) {
  check_rows(a.rows, a.cols);
  if (a.rows == 0 || a.cols == 0) return;
  const bool warp = use_warp_kernel(algo, a.cols);
  const int threads = warp ? kWarpKernelThreads : (a.cols > kLongRowCols ? kBlockKernelThreadsLong : kBlockKernelThreads);
  const int64_t blocks = warp ? (a.rows + threads / 32 - 1) / (threads / 32) : a.rows;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch(warp ? softmax_bwd_warp<T> : softmax_bwd_block<T>, dim3(static_cast<unsigned>(blocks)), dim3(threads), 0,
           stream, a);
  });
}

}  // namespace tk
