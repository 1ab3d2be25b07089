// Launchers of the PTX instruction self-tests (ptx_selftest.cu), for the bindings of both modules. Pointers are
// device addresses (host addresses in _C_host); every launch goes to the default stream.
#pragma once

#include <cstdint>

namespace tk {
void ptx_selftest_mma_16816(uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d, int dtype);
void ptx_selftest_ldmatrix(uintptr_t tile, uintptr_t out, bool trans);
void ptx_selftest_cp_async(uintptr_t src, uintptr_t src_bytes, uintptr_t out, int n, int threads, int wait);
}  // namespace tk
