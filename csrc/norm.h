// LayerNorm / RMSNorm over the last dim with an optional residual add: argument block and launchers.
#pragma once

#include <cstdint>

#include "types.h"

namespace tk {

constexpr int kNormThreads = 256;
// Row chunks of the backward pass: each block sums dWeight/dBias over its rows into its own fp32 partial row,
// then one kernel adds the partials in a fixed order (no atomics: bitwise reproducible).
constexpr int64_t kNormMaxChunks = 256;

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

void norm_forward(const NormArgs& args, tk_stream_t stream);
void norm_backward(const NormArgs& args, tk_stream_t stream);
// Row chunks the backward pass uses for `rows` rows (the partial buffers hold this many rows).
int64_t norm_backward_chunks(int64_t rows);

}  // namespace tk
