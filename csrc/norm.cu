// LayerNorm / RMSNorm forward and backward, a block per row: the residual is added in fp32, the statistics
// take two passes over the row (mean, then the centred variance: no cancellation), so any row length works
// without holding the row on chip.
#include "launch.cuh"
#include "norm.h"

namespace tk {
namespace {

template <typename T>
__device__ __forceinline__ float row_sum_at(const NormArgs& a, int64_t row, int64_t j) {
  float s = to_float(static_cast<const T*>(a.x)[row * a.x_row_stride + j]);
  if (a.residual) s += to_float(static_cast<const T*>(a.residual)[row * a.res_row_stride + j]);
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kNormThreads) norm_fwd_kernel(NormArgs a) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const float inv_n = 1.0f / static_cast<float>(a.cols);
  float mean = 0.0f;
  if (!a.rms) {
    float acc = 0.0f;
    for (int64_t j = threadIdx.x; j < a.cols; j += blockDim.x) acc += row_sum_at<T>(a, row, j);
    mean = block_allreduce(acc, SumOp{}, scratch) * inv_n;
  }
  float acc = 0.0f;
  for (int64_t j = threadIdx.x; j < a.cols; j += blockDim.x) {
    const float c = row_sum_at<T>(a, row, j) - mean;
    acc += c * c;
  }
  const float rstd = rsqrtf(block_allreduce(acc, SumOp{}, scratch) * inv_n + a.eps);
  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  for (int64_t j = threadIdx.x; j < a.cols; j += blockDim.x) {
    const float s = row_sum_at<T>(a, row, j);
    float y = (s - mean) * rstd * to_float(w[j]);
    if (b) y += to_float(b[j]);
    static_cast<T*>(a.y)[row * a.cols + j] = from_float<T>(y);
    if (a.sum) static_cast<T*>(a.sum)[row * a.cols + j] = from_float<T>(s);
  }
  if (threadIdx.x == 0) {
    if (!a.rms) a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w (RMS: no mean(g) term); dW += dy * xhat and
// dB += dy into this block's partial row. Thread t owns columns t, t + blockDim, ... of the partial rows.
template <typename T>
__global__ void __launch_bounds__(kNormThreads) norm_bwd_kernel(NormArgs a, int64_t rows_per_chunk) {
  __shared__ float scratch[32];
  const int64_t chunk = blockIdx.x;
  float* dw_part = a.dw_partial + chunk * a.cols;
  float* db_part = a.db_partial ? a.db_partial + chunk * a.cols : nullptr;
  for (int64_t j = threadIdx.x; j < a.cols; j += blockDim.x) {
    dw_part[j] = 0.0f;
    if (db_part) db_part[j] = 0.0f;
  }
  const T* w = static_cast<const T*>(a.weight);
  const float inv_n = 1.0f / static_cast<float>(a.cols);
  const int64_t end = (chunk + 1) * rows_per_chunk < a.rows ? (chunk + 1) * rows_per_chunk : a.rows;
  for (int64_t row = chunk * rows_per_chunk; row < end; ++row) {
    const float mean = a.rms ? 0.0f : a.mean[row], rstd = a.rstd[row];
    const T* dy = static_cast<const T*>(a.dy) + row * a.dy_row_stride;
    float g_xhat = 0.0f, g_sum = 0.0f;
    for (int64_t j = threadIdx.x; j < a.cols; j += blockDim.x) {
      const float g = to_float(dy[j]) * to_float(w[j]);
      g_xhat += g * (row_sum_at<T>(a, row, j) - mean) * rstd;
      g_sum += g;
    }
    const float c1 = block_allreduce(g_xhat, SumOp{}, scratch) * inv_n;
    const float c2 = a.rms ? 0.0f : block_allreduce(g_sum, SumOp{}, scratch) * inv_n;
    for (int64_t j = threadIdx.x; j < a.cols; j += blockDim.x) {
      const float d = to_float(dy[j]);
      const float xhat = (row_sum_at<T>(a, row, j) - mean) * rstd;
      static_cast<T*>(a.dx)[row * a.cols + j] = from_float<T>(rstd * (d * to_float(w[j]) - c2 - xhat * c1));
      dw_part[j] += d * xhat;
      if (db_part) db_part[j] += d;
    }
  }
}

template <typename T>
__global__ void norm_param_grad_kernel(NormArgs a, int64_t chunks) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= a.cols) return;
  float dw = 0.0f, db = 0.0f;
  for (int64_t c = 0; c < chunks; ++c) {
    dw += a.dw_partial[c * a.cols + j];
    if (a.db_partial) db += a.db_partial[c * a.cols + j];
  }
  static_cast<T*>(a.dw)[j] = from_float<T>(dw);
  if (a.db) static_cast<T*>(a.db)[j] = from_float<T>(db);
}

}  // namespace

int64_t norm_backward_chunks(int64_t rows) { return rows < kNormMaxChunks ? rows : kNormMaxChunks; }

void norm_forward(const NormArgs& a, tk_stream_t stream) {
  if (a.rows > 0x7fffffffLL) throw std::invalid_argument("norm: more than 2^31-1 rows");
  if (a.rows == 0 || a.cols == 0) return;
  dispatch_dtype(a.dtype, [&](auto tag) {
    launch(norm_fwd_kernel<decltype(tag)>, dim3(static_cast<unsigned>(a.rows)), dim3(kNormThreads), 0, stream, a);
  });
}

void norm_backward(const NormArgs& a, tk_stream_t stream) {
  if (a.cols == 0) return;
  const int64_t chunks = norm_backward_chunks(a.rows);
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (chunks > 0)
      launch(norm_bwd_kernel<T>, dim3(static_cast<unsigned>(chunks)), dim3(kNormThreads), 0, stream, a,
             (a.rows + chunks - 1) / chunks);
    launch(norm_param_grad_kernel<T>, dim3(static_cast<unsigned>((a.cols + 255) / 256)), dim3(256), 0, stream, a, chunks);
  });
}

}  // namespace tk
