// Element-wise halves of the CUDA backend's projections, run after a cuBLAS GEMM (torch.matmul): bias +
// activation + dropout + residual (and the gated product) forward and backward, and the head split/merge
// between [B·L, heads·D] rows and [B, heads, L, D].
#pragma once

#include <cstdint>

#include "types.h"

namespace tk {

// Activation codes (Python reads them by name from the bindings: activation_codes).
enum Activation : int { kActNone = 0, kActRelu = 1, kActGelu = 2, kActGeluTanh = 3, kActSilu = 4 };

// acc [M, N] contiguous (the GEMM's product); acc2 the up projection of the gated form (else null). In place:
// acc (and acc2) become the pre-activations Z = acc + bias, which backward needs; y [M, N] contiguous is
// act(Z) (gated: act(Z) * Z2), dropped out (kept iff the draw of (row m, column n) passes, scaled by 1/(1-p)),
// plus residual (row stride res_row_stride, unit column stride) when given.
struct EpilogueArgs {
  void* acc;
  void* acc2;
  const void* bias;
  const void* bias2;
  const void* residual;
  void* y;
  int64_t M, N, res_row_stride;
  int act;
  float dropout_p;
  const uint64_t* seed;  // device memory, as AttentionArgs::seed
  int dtype;
};

// dy [M, N] through (dy_row_stride, dy_col_stride); z, z2 the saved pre-activations; dz, dz2 [M, N] contiguous:
// dz = dy * keep / (1 - p) * act'(z), or for the gated form dz = dy * z2 * act'(z), dz2 = dy * act(z).
struct ActBackwardArgs {
  const void* dy;
  const void* z;
  const void* z2;
  void* dz;
  void* dz2;
  int64_t M, N, dy_row_stride, dy_col_stride;
  int act;
  float dropout_p;
  const uint64_t* seed;  // device memory, as AttentionArgs::seed
  int dtype;
};

// Head split: dst[b, h, l, d] = src[b·L + l, col0 + h·D + d] (+ bias[col0 + h·D + d]); src rows have stride
// src_row_stride; dst is contiguous [B, heads, L, D]. Head merge is the inverse: src a [B, heads, L, D] view
// through 4 strides, dst rows of stride dst_row_stride starting at column col0.
struct HeadLayoutArgs {
  const void* src;
  const void* bias;
  void* dst;
  int64_t B, heads, L, D, col0, row_stride;
  int64_t strides[4];
  int dtype;
};

// Elements per global access each launcher will use for these arguments: 16 bytes' worth when every pointer is
// 16-byte aligned and every row stride and extent a multiple of the pack (and dy / the merge source have unit
// column stride), else 1.
int pack_width(const EpilogueArgs& args);
int pack_width(const ActBackwardArgs& args);
int pack_width(const HeadLayoutArgs& args, bool merge);

void epilogue_forward(const EpilogueArgs& args, tk_stream_t stream);
void activation_backward(const ActBackwardArgs& args, tk_stream_t stream);
void head_split(const HeadLayoutArgs& args, tk_stream_t stream);
void head_merge(const HeadLayoutArgs& args, tk_stream_t stream);

}  // namespace tk
