// Rotary position embedding of q and k (kernels/rotary.py's contract): argument block and launcher.
#pragma once

#include <cstdint>

#include "types.h"

namespace tk {

constexpr int kRotaryThreads = 128;

// q, k: [B, Hq|Hk, L, D] with unit last stride and the given (b, h, l) strides; q_out, k_out likewise (the same
// pointers for in place). cos, sin: rows of R = 2 * half values (unit stride; element type cos_dtype): row
// b * cos_b + l * cos_l per token, or pos[b * pos_b + l * pos_l] * cos_l with a position table (pos: int64).
// step/pair: 1/half pairs i with i + half (GPT-NeoX), 2/1 pairs 2i with 2i + 1 (GPT-J). n_pass dims after the
// rotated ones are copied (0 in place). backward: the transposed rotation.
struct RotaryArgs {
  const void* q;
  const void* k;
  void* q_out;
  void* k_out;
  const void* cos;
  const void* sin;
  const int64_t* pos;
  int64_t B, L, Hq, Hk, half, n_pass, n_positions, step, pair;
  int64_t q_stride[3], k_stride[3], qo_stride[3], ko_stride[3];
  int64_t cos_b, cos_l, pos_b, pos_l;
  int backward;
  int dtype, cos_dtype;
};

void rotary(const RotaryArgs& args, tk_stream_t stream);

}  // namespace tk
