// Rotary position embedding, a block per token: the token's cos/sin are read once per rotated pair and every head
// of q, then of k, is rotated (math in fp32, one rounding per output). See kernels/rotary.py for the formulas.
#include "launch.cuh"
#include "rotary.h"

namespace tk {
namespace {

// cos/sin may be stored in another precision than q (transformers keeps them in fp32 or in the model's dtype).
__device__ __forceinline__ float load_table(const void* t, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat16: return to_float(static_cast<const __half*>(t)[i]);
    case kBFloat16: return to_float(static_cast<const __nv_bfloat16*>(t)[i]);
    default: return static_cast<const float*>(t)[i];
  }
}

template <typename T>
__device__ __forceinline__ void rotate_heads(const RotaryArgs& a, const T* x, T* y, int64_t heads, const int64_t* xs,
                                             const int64_t* ys, int64_t b, int64_t l, int64_t c_row, bool bad) {
  const int64_t pairs = heads * a.half;
  const T* x_tok = x + b * xs[0] + l * xs[2];
  T* y_tok = y + b * ys[0] + l * ys[2];
  for (int64_t i = threadIdx.x; i < pairs; i += blockDim.x) {
    const int64_t h = i / a.half, j = i % a.half;
    const int64_t first = j * a.step, second = first + a.pair;
    float c1, c2, s1, s2;
    if (bad) {
      c1 = c2 = s1 = s2 = NAN;  // a position outside the table: loud, as in the Triton kernel
    } else {
      c1 = load_table(a.cos, a.cos_dtype, c_row + first);
      c2 = load_table(a.cos, a.cos_dtype, c_row + second);
      s1 = load_table(a.sin, a.cos_dtype, c_row + first);
      s2 = load_table(a.sin, a.cos_dtype, c_row + second);
    }
    const float x1 = to_float(x_tok[h * xs[1] + first]), x2 = to_float(x_tok[h * xs[1] + second]);
    // forward: (x1·c1 − x2·s1, x2·c2 + x1·s2); backward, the transpose: (x1·c1 + x2·s2, x2·c2 − x1·s1)
    const float y1 = a.backward ? x1 * c1 + x2 * s2 : x1 * c1 - x2 * s1;
    const float y2 = a.backward ? x2 * c2 - x1 * s1 : x2 * c2 + x1 * s2;
    y_tok[h * ys[1] + first] = from_float<T>(y1);
    y_tok[h * ys[1] + second] = from_float<T>(y2);
  }
  const int64_t rot = 2 * a.half, tail = heads * a.n_pass;
  for (int64_t i = threadIdx.x; i < tail; i += blockDim.x) {
    const int64_t h = i / a.n_pass, p = rot + i % a.n_pass;
    y_tok[h * ys[1] + p] = x_tok[h * xs[1] + p];
  }
}

template <typename T>
__global__ void __launch_bounds__(kRotaryThreads) rotary_kernel(RotaryArgs a) {
  const int64_t token = blockIdx.x;
  const int64_t b = token / a.L, l = token % a.L;
  int64_t c_row = b * a.cos_b + l * a.cos_l;
  bool bad = false;
  if (a.pos) {
    const int64_t p = a.pos[b * a.pos_b + l * a.pos_l];
    bad = p < 0 || p >= a.n_positions;
    c_row = bad ? 0 : p * a.cos_l;
  }
  rotate_heads<T>(a, static_cast<const T*>(a.q), static_cast<T*>(a.q_out), a.Hq, a.q_stride, a.qo_stride, b, l,
                  c_row, bad);
  rotate_heads<T>(a, static_cast<const T*>(a.k), static_cast<T*>(a.k_out), a.Hk, a.k_stride, a.ko_stride, b, l,
                  c_row, bad);
}

}  // namespace

void rotary(const RotaryArgs& a, tk_stream_t stream) {
  if (a.B * a.L > 0x7fffffffLL) throw std::invalid_argument("rotary: more than 2^31-1 tokens");
  dispatch_dtype(a.dtype, [&](auto tag) {
    launch(rotary_kernel<decltype(tag)>, dim3(static_cast<unsigned>(a.B * a.L)), dim3(kRotaryThreads), 0, stream, a);
  });
}

}  // namespace tk
