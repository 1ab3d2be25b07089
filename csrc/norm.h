// LayerNorm / RMSNorm over the last dim with an optional residual add: argument block and launchers.
#pragma once

#include <cstdint>

#include "types.h"

namespace tk {

constexpr int kNormThreads = 256;
// Row chunks of the backward pass: each block sums dWeight/dBias over its rows into its own fp32 partial row,
// then one kernel adds the partials in a fixed order (no atomics: bitwise reproducible).
constexpr int64_t kNormMaxChunks = 256;
// The packed kernels (norm.cu): at most this many threads a block, each holding up to this many 16-byte packs of
// a row in registers (forward: the row sums; backward: x, residual and dy of two rows plus the dW/dB partials,
// whose registers bound it lower).
constexpr int kNormPackThreads = 256;
constexpr int kNormPackMaxChunksForward = 8;
constexpr int kNormPackMaxChunksBackward = 2;

// x, residual, dy: [rows, cols] with unit column stride and the given row strides; weight, bias: [cols];
// y, sum, dx: contiguous [rows, cols]; mean (LayerNorm only), rstd: fp32 [rows]; dw_partial, db_partial: fp32
// [chunks, cols] scratch; dw, db: [cols].
struct NormArgs {
  const void* x;
  const void* residual;
  const void* weight;
  const void* bias;
  void* y;
  void* sum;
  float* mean;
  float* rstd;
  const void* dy;
  void* dx;
  float* dw_partial;
  float* db_partial;
  void* dw;
  void* db;
  int64_t rows, cols, x_row_stride, res_row_stride, dy_row_stride;
  float eps;
  int rms;
  int dtype;
};

// How a call runs: packs_per_thread 16-byte packs a thread in a block of `threads` (0: the general kernels,
// kNormThreads threads), and the backward's row chunks (the partial buffers hold this many rows).
struct NormPlan {
  int packs_per_thread;
  int threads;
  int64_t row_chunks;
};
NormPlan norm_plan(const NormArgs& args, bool backward);

void norm_forward(const NormArgs& args, tk_stream_t stream);
void norm_backward(const NormArgs& args, tk_stream_t stream);
// Row chunks the backward pass uses for this shape (norm_plan's row_chunks; the partial buffers hold this many rows).
int64_t norm_backward_chunks(int64_t rows, int64_t cols, int dtype);

}  // namespace tk
