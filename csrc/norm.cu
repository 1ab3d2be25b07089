// LayerNorm / RMSNorm forward and backward, a block per row. The residual is added in fp32; the statistics take
// two passes (mean, then the centred variance: no cancellation).
//
// Aligned rows of whole 16-byte packs, up to kNormPackThreads threads holding kNormPackMaxChunksForward packs each
// (16384 fp16/bf16 or 8192 fp32 columns; the backward kNormPackMaxChunksBackward: 4096 / 2048), take the packed
// kernels: each thread holds its packs of the row in registers, so the row is read from memory once (the general
// kernel reads it three times in the forward and twice in the backward) with 16-byte accesses, and the backward
// keeps its dW/dB partials in registers across its rows (the general kernel adds them into global memory per row)
// and loads the next row before reducing this one. Other rows take the general kernels (any length).
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


template <typename T, int C>
struct RowPacks {
  Pack<T, kVec16<T>> x[C], r[C], dy[C];
};

// Thread t holds packs t, t + blockDim, ..., t + (C - 1)·blockDim of a row; `live(k)`: pack k lies in the row.
template <typename T, int C>
__device__ __forceinline__ void load_row(const NormArgs& a, int64_t row, bool with_dy, RowPacks<T, C>& p) {
  constexpr int V = kVec16<T>;
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const int64_t col = (threadIdx.x + static_cast<int64_t>(k) * blockDim.x) * V;
    if (col >= a.cols) break;
    p.x[k] = load_pack<T, V>(a.x, row * a.x_row_stride + col);
    if (a.residual) p.r[k] = load_pack<T, V>(a.residual, row * a.res_row_stride + col);
    if (with_dy) p.dy[k] = load_pack<T, V>(a.dy, row * a.dy_row_stride + col);
  }
}

// x (+ residual) of pack k in fp32; zeros past the row's end.
template <typename T, int C>
__device__ __forceinline__ void pack_sums(const RowPacks<T, C>& p, const NormArgs& a, int k, float (&s)[kVec16<T>]) {
  constexpr int V = kVec16<T>;
  if ((threadIdx.x + static_cast<int64_t>(k) * blockDim.x) * V >= a.cols) {
#pragma unroll
    for (int j = 0; j < V; ++j) s[j] = 0.0f;
    return;
  }
#pragma unroll
  for (int j = 0; j < V; ++j) s[j] = to_float(p.x[k].v[j]);
  if (a.residual) {
#pragma unroll
    for (int j = 0; j < V; ++j) s[j] += to_float(p.r[k].v[j]);
  }
}

template <typename T, int C>
__global__ void __launch_bounds__(kNormPackThreads) norm_fwd_packed_kernel(NormArgs a) {
  constexpr int V = kVec16<T>;
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const float inv_n = 1.0f / static_cast<float>(a.cols);
  RowPacks<T, C> p;
  load_row<T, C>(a, row, false, p);
  float s[C][V];
  float acc = 0.0f;
#pragma unroll
  for (int k = 0; k < C; ++k) {
    pack_sums<T, C>(p, a, k, s[k]);
#pragma unroll
    for (int j = 0; j < V; ++j) acc += s[k][j];
  }
  const float mean = a.rms ? 0.0f : block_allreduce(acc, SumOp{}, scratch) * inv_n;
  acc = 0.0f;
#pragma unroll
  for (int k = 0; k < C; ++k) {
    if ((threadIdx.x + static_cast<int64_t>(k) * blockDim.x) * V >= a.cols) break;
#pragma unroll
    for (int j = 0; j < V; ++j) acc += (s[k][j] - mean) * (s[k][j] - mean);
  }
  const float rstd = rsqrtf(block_allreduce(acc, SumOp{}, scratch) * inv_n + a.eps);
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const int64_t col = (threadIdx.x + static_cast<int64_t>(k) * blockDim.x) * V;
    if (col >= a.cols) break;
    float w[V], b[V];
    const Pack<T, V> wp = load_pack<T, V>(a.weight, col);
    Pack<T, V> y, sum;
#pragma unroll
    for (int j = 0; j < V; ++j) w[j] = to_float(wp.v[j]);
    if (a.bias) {
      const Pack<T, V> bp = load_pack<T, V>(a.bias, col);
#pragma unroll
      for (int j = 0; j < V; ++j) b[j] = to_float(bp.v[j]);
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) b[j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      y.v[j] = from_float<T>((s[k][j] - mean) * rstd * w[j] + b[j]);
      sum.v[j] = from_float<T>(s[k][j]);
    }
    store_pack<T, V>(a.y, row * a.cols + col, y);
    if (a.sum) store_pack<T, V>(a.sum, row * a.cols + col, sum);
  }
  if (threadIdx.x == 0) {
    if (!a.rms) a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
}

template <typename T, int C>
__global__ void __launch_bounds__(kNormPackThreads) norm_bwd_packed_kernel(NormArgs a, int64_t rows_per_chunk) {
  constexpr int V = kVec16<T>;
  __shared__ float scratch[32];
  const int64_t chunk = blockIdx.x;
  const float inv_n = 1.0f / static_cast<float>(a.cols);
  const int64_t begin = chunk * rows_per_chunk;
  const int64_t end = begin + rows_per_chunk < a.rows ? begin + rows_per_chunk : a.rows;
  Pack<T, V> w[C];
  float dw[C][V], db[C][V];
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const int64_t col = (threadIdx.x + static_cast<int64_t>(k) * blockDim.x) * V;
    if (col < a.cols) w[k] = load_pack<T, V>(a.weight, col);
#pragma unroll
    for (int j = 0; j < V; ++j) dw[k][j] = db[k][j] = 0.0f;
  }
  RowPacks<T, C> next;
  if (begin < end) load_row<T, C>(a, begin, true, next);
  for (int64_t row = begin; row < end; ++row) {
    const RowPacks<T, C> p = next;
    // The next row's loads are issued before this row's two block reductions, so their latency overlaps them.
    if (row + 1 < end) load_row<T, C>(a, row + 1, true, next);
    const float mean = a.rms ? 0.0f : a.mean[row], rstd = a.rstd[row];
    float g_xhat = 0.0f, g_sum = 0.0f;
#pragma unroll
    for (int k = 0; k < C; ++k) {
      if ((threadIdx.x + static_cast<int64_t>(k) * blockDim.x) * V >= a.cols) break;
      float s[V];
      pack_sums<T, C>(p, a, k, s);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float g = to_float(p.dy[k].v[j]) * to_float(w[k].v[j]);
        g_xhat += g * (s[j] - mean) * rstd;
        g_sum += g;
      }
    }
    const float c1 = block_allreduce(g_xhat, SumOp{}, scratch) * inv_n;
    const float c2 = a.rms ? 0.0f : block_allreduce(g_sum, SumOp{}, scratch) * inv_n;
#pragma unroll
    for (int k = 0; k < C; ++k) {
      const int64_t col = (threadIdx.x + static_cast<int64_t>(k) * blockDim.x) * V;
      if (col >= a.cols) break;
      Pack<T, V> dx;
      float s[V];
      pack_sums<T, C>(p, a, k, s);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float d = to_float(p.dy[k].v[j]);
        const float xhat = (s[j] - mean) * rstd;
        dx.v[j] = from_float<T>(rstd * (d * to_float(w[k].v[j]) - c2 - xhat * c1));
        dw[k][j] += d * xhat;
        db[k][j] += d;
      }
      store_pack<T, V>(a.dx, row * a.cols + col, dx);
    }
  }
#pragma unroll
  for (int k = 0; k < C; ++k) {
    const int64_t col = (threadIdx.x + static_cast<int64_t>(k) * blockDim.x) * V;
    if (col >= a.cols) break;
    // fp32 partials in 16-byte packs (two per pack of a 2-byte type).
#pragma unroll
    for (int q = 0; q < V; q += 4) {
      Pack<float, 4> dwp, dbp;
#pragma unroll
      for (int j = 0; j < 4; ++j) dwp.v[j] = dw[k][q + j], dbp.v[j] = db[k][q + j];
      store_pack<float, 4>(a.dw_partial, chunk * a.cols + col + q, dwp);
      if (a.db_partial) store_pack<float, 4>(a.db_partial, chunk * a.cols + col + q, dbp);
    }
  }
}

// Calls f(integral_constant<C>) for C in 1, 2, 4 ... kMax (the packed kernels' packs per thread).
template <int kMax, typename F>
void dispatch_packs(int c, F&& f) {
  if (c == 1) return f(std::integral_constant<int, 1>{});
  if (c == 2) return f(std::integral_constant<int, 2>{});
  if constexpr (kMax >= 4) {
    if (c == 4) return f(std::integral_constant<int, 4>{});
  }
  if constexpr (kMax >= 8) {
    if (c == 8) return f(std::integral_constant<int, 8>{});
  }
  throw std::logic_error("norm: no packed kernel for " + std::to_string(c) + " packs a thread");
}

}  // namespace

NormPlan norm_plan(const NormArgs& a, bool backward) {
  NormPlan plan{0, kNormThreads, a.rows < kNormMaxChunks ? a.rows : kNormMaxChunks};
  const int vec = vec16_of(a.dtype);
  if (a.cols == 0 || a.cols % vec != 0) return plan;
  const int64_t packs = a.cols / vec;
  const int max_packs = backward ? kNormPackMaxChunksBackward : kNormPackMaxChunksForward;
  int c = 1;
  while (c <= max_packs && (packs + c - 1) / c > kNormPackThreads) c *= 2;
  if (c > max_packs) return plan;
  const int threads = static_cast<int>(((packs + c - 1) / c + 31) / 32 * 32);
  // Narrow rows make small blocks: proportionally more row chunks keep as many threads in flight as the general
  // form's. The count depends on the shape alone: Python sizes the partial buffers before the outputs exist.
  const int64_t chunks = kNormMaxChunks * kNormThreads / threads;
  plan.row_chunks = a.rows < chunks ? a.rows : chunks;
  if (packs_fit({a.x, a.residual, a.weight, a.bias, a.y, a.sum, a.dy, a.dx, a.dw_partial, a.db_partial},
                {a.x_row_stride, a.res_row_stride, a.dy_row_stride}, 16, vec)) {
    plan.packs_per_thread = c;
    plan.threads = threads;
  }
  return plan;
}

int64_t norm_backward_chunks(int64_t rows, int64_t cols, int dtype) {
  NormArgs a{};
  a.rows = rows, a.cols = cols, a.dtype = dtype;
  return norm_plan(a, true).row_chunks;
}

void norm_forward(const NormArgs& a, tk_stream_t stream) {
  if (a.rows > 0x7fffffffLL) throw std::invalid_argument("norm: more than 2^31-1 rows");
  if (a.rows == 0 || a.cols == 0) return;
  const NormPlan plan = norm_plan(a, false);
  const dim3 grid(static_cast<unsigned>(a.rows));
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (plan.packs_per_thread == 0) {
      launch(norm_fwd_kernel<T>, grid, dim3(kNormThreads), 0, stream, a);
      return;
    }
    dispatch_packs<kNormPackMaxChunksForward>(plan.packs_per_thread, [&](auto c) {
      launch(norm_fwd_packed_kernel<T, c.value>, grid, dim3(plan.threads), 0, stream, a);
    });
  });
}

void norm_backward(const NormArgs& a, tk_stream_t stream) {
  if (a.cols == 0) return;
  const NormPlan plan = norm_plan(a, true);
  const int64_t chunks = plan.row_chunks;
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (chunks > 0) {
      const dim3 grid(static_cast<unsigned>(chunks));
      const int64_t rows_per_chunk = (a.rows + chunks - 1) / chunks;
      if (plan.packs_per_thread == 0) {
        launch(norm_bwd_kernel<T>, grid, dim3(kNormThreads), 0, stream, a, rows_per_chunk);
      } else {
        dispatch_packs<kNormPackMaxChunksBackward>(plan.packs_per_thread, [&](auto c) {
          launch(norm_bwd_packed_kernel<T, c.value>, grid, dim3(plan.threads), 0, stream, a, rows_per_chunk);
        });
      }
    }
    launch(norm_param_grad_kernel<T>, dim3(static_cast<unsigned>((a.cols + 255) / 256)), dim3(256), 0, stream, a, chunks);
  });
}

}  // namespace tk
