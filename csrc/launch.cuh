// The one kernel-launch helper: `<<<>>>` under nvcc, the fiber simulator under the host compiler.
// Kernel files call tk::launch and never write a launch themselves.
#pragma once

#include "common.cuh"

namespace tk {

#ifdef __CUDACC__
template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, tk_stream_t stream,
                   Args&&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;  // empty tensors: nothing to launch
  if (smem > 48 * 1024) {
    cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (attr != cudaSuccess) throw std::runtime_error(std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(attr));
  }
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("kernel launch failed: ") + cudaGetErrorString(err));
}
#else
template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, tk_stream_t,
                   Args&&... args) {
  ::simt::launch(grid, block, smem, [&] { kernel(args...); });
}
#endif

}  // namespace tk
