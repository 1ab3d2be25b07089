// Plain host types shared by the kernel files and the bindings (no device code, so the bindings
// compile with the host compiler in both builds).
#pragma once

#ifdef TK_HOST_SIM
using tk_stream_t = void*;  // the simulator has no streams
#else
#include <cuda_runtime_api.h>
using tk_stream_t = cudaStream_t;
#endif

namespace tk {

// Element type codes shared with the Python side (read by Python from the bindings: dtype_codes).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace tk
