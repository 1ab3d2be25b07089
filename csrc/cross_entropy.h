// Cross-entropy over rows of logits (kernels/cross_entropy.py's contract): argument block and launcher.
#pragma once

#include <cstdint>

#include "types.h"

namespace tk {

constexpr int kCrossEntropyThreads = 256;

// logits: [rows, cols] with unit column stride and row stride `row_stride`; target: int64 [rows]; loss, lse: fp32
// [rows]. With `scale` (fp32, [rows] or one value when scale_stride is 0) the logits are overwritten with the
// loss's gradient times the row's scale. softcap > 0 caps the logits to softcap·tanh(z / softcap) first; z_loss
// adds z_loss·lse² to each row's loss.
struct CrossEntropyArgs {
  void* logits;
  const int64_t* target;
  const float* scale;
  float* loss;
  float* lse;
  int64_t rows, cols, row_stride, scale_stride, ignore_index;
  float label_smoothing, softcap, z_loss;
  int dtype;
};

void cross_entropy_rows(const CrossEntropyArgs& args, tk_stream_t stream);

}  // namespace tk
