// One tiny launch that says whether the kernels of this build can run here. Importing _C proves little: it links
// cudart statically, so a driver older than the toolkit, or a GPU whose architecture is not among the build's
// arches (no SASS and no PTX to JIT), only shows when a kernel is launched.
#include "launch.cuh"
#include "probe.h"

namespace tk {

__global__ void probe_kernel(int* out) { *out = 42; }

std::string probe_launch() {
#ifdef TK_HOST_SIM
  return "";  // the simulator runs every kernel
#else
  int* d = nullptr;
  cudaError_t err = cudaMalloc(&d, sizeof(int));
  if (err != cudaSuccess) return std::string("cudaMalloc failed: ") + cudaGetErrorString(err);
  int h = 0;
  try {
    launch(probe_kernel, dim3(1), dim3(1), 0, nullptr, d);
    err = cudaMemcpy(&h, d, sizeof(int), cudaMemcpyDeviceToHost);
  } catch (const std::exception& e) {
    cudaFree(d);
    return e.what();
  }
  cudaFree(d);
  if (err != cudaSuccess) return std::string("a test kernel failed: ") + cudaGetErrorString(err);
  return h == 42 ? "" : "a test kernel ran but did not write its result";
#endif
}

}  // namespace tk
