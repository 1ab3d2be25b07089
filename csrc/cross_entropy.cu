// Cross-entropy over rows of logits, a block per row, two passes (kernels/cross_entropy.py has the formulas):
// running softmax statistics, the logits' sum and the target's logit; then, with a scale, the gradient written over
// the logits. An ignored row gets loss 0 and gradient 0; a target outside [0, cols) that is not ignored, a NaN loss.
#include "cross_entropy.h"
#include "launch.cuh"

namespace tk {
namespace {

__device__ __forceinline__ float capped(float z, float softcap) { return softcap > 0.0f ? softcap * tanhf(z / softcap) : z; }

template <typename T>
__global__ void __launch_bounds__(kCrossEntropyThreads) cross_entropy_kernel(CrossEntropyArgs a) {
  __shared__ float warp_m[32];
  __shared__ float warp_s[32];
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  T* z_row = static_cast<T*>(a.logits) + row * a.row_stride;
  const int64_t target = a.target[row];
  SoftmaxStat st{-INFINITY, 0.0f};
  float z_sum = 0.0f, z_target = 0.0f;
  for (int64_t j = threadIdx.x; j < a.cols; j += blockDim.x) {
    const float z = capped(to_float(z_row[j]), a.softcap);
    st = stat_add(st, z);
    z_sum += z;
    if (j == target) z_target = z;
  }
  st = warp_allreduce_stat(st);
  if (lane == 0) {
    warp_m[warp] = st.m;
    warp_s[warp] = st.s;
  }
  __syncthreads();  // every warp's statistics visible before any thread merges them
  st = SoftmaxStat{warp_m[0], warp_s[0]};
  for (int w = 1; w < n_warps; ++w) st = stat_merge(st, SoftmaxStat{warp_m[w], warp_s[w]});
  z_sum = block_allreduce(z_sum, SumOp{}, scratch);
  z_target = block_allreduce(z_target, SumOp{}, scratch);
  const float lse = st.m + logf(st.s);
  const bool ignored = target == a.ignore_index, in_range = target >= 0 && target < a.cols;
  if (threadIdx.x == 0) {
    const float eps = a.label_smoothing;
    const float loss = lse - (1.0f - eps) * z_target - eps * (z_sum / static_cast<float>(a.cols)) + a.z_loss * lse * lse;
    a.loss[row] = ignored ? 0.0f : in_range ? loss : NAN;
    a.lse[row] = lse;
  }
  if (!a.scale) return;
  // A selection, not a product: a mean over no rows scales by 1/0 = inf, and an ignored row's gradient is 0.
  const float scale = ignored ? 0.0f : a.scale[row * a.scale_stride];
  const float uniform = a.label_smoothing / static_cast<float>(a.cols), hit = 1.0f - a.label_smoothing;
  const float p_weight = 1.0f + 2.0f * a.z_loss * lse;  // d(z_loss·lse²)/dz = 2·z_loss·lse·softmax(z)
  for (int64_t j = threadIdx.x; j < a.cols; j += blockDim.x) {
    const float z = capped(to_float(z_row[j]), a.softcap);
    float dz = p_weight * expf(z - lse) - uniform - (j == target ? hit : 0.0f);
    if (a.softcap > 0.0f) {
      const float t = z / a.softcap;
      dz *= 1.0f - t * t;
    }
    z_row[j] = from_float<T>(dz * scale);
  }
}

}  // namespace

void cross_entropy_rows(const CrossEntropyArgs& a, tk_stream_t stream) {
  if (a.rows > 0x7fffffffLL) throw std::invalid_argument("cross_entropy: more than 2^31-1 rows");
  if (a.rows == 0) return;
  dispatch_dtype(a.dtype, [&](auto tag) {
    launch(cross_entropy_kernel<decltype(tag)>, dim3(static_cast<unsigned>(a.rows)), dim3(kCrossEntropyThreads), 0,
           stream, a);
  });
}

}  // namespace tk
