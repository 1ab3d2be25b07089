// Masked softmax over the last dim: the argument blocks the bindings fill and the launchers read.
#pragma once

#include <cstdint>

#include "types.h"

namespace tk {

// Mask element kinds (read by Python from the bindings: mask_kinds).
enum MaskKind : int { kNoMask = 0, kBoolMask = 1, kSameDTypeMask = 2, kFloat32Mask = 3 };
// Which kernel runs a row: chosen by length, or forced by tests so both paths see every length.
enum SoftmaxAlgo : int { kAlgoAuto = 0, kAlgoWarp = 1, kAlgoBlock = 2 };

// Rows longer than this run block-per-row; shorter ones warp-per-row.
constexpr int64_t kWarpRowMaxCols = 1024;
constexpr int kWarpKernelThreads = 128;
constexpr int kBlockKernelThreads = 256;
constexpr int kBlockKernelThreadsLong = 1024;
constexpr int64_t kLongRowCols = 16384;

// x viewed as [d0, d1, d2, cols] (rows = d0*d1*d2) through x_stride; the mask is read through its
// broadcast strides (0 on broadcast dims); y is contiguous [rows, cols].
struct SoftmaxFwdArgs {
  const void* x;
  const void* mask;
  void* y;
  int64_t rows, cols, d1, d2;
  int64_t x_stride[4];
  int64_t mask_stride[4];
  float scale;
  int causal;             // key j is visible to query i (= index in d2) iff j <= i + causal_offset
  int64_t causal_offset;
  int dtype;
  int mask_kind;
};

// dx = scale * y * (dy - sum(dy * y)); y and dx contiguous [rows, cols], dy through dy_stride.
struct SoftmaxBwdArgs {
  const void* y;
  const void* dy;
  void* dx;
  int64_t rows, cols, d1, d2;
  int64_t dy_stride[4];
  float scale;
  int dtype;
};

void softmax_forward(const SoftmaxFwdArgs& args, int algo, tk_stream_t stream);
void softmax_backward(const SoftmaxBwdArgs& args, int algo, tk_stream_t stream);

}  // namespace tk
