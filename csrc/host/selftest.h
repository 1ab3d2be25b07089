// The simulator's seed and the launchers of its own test kernels (selftest.cu), for the _C_host bindings.
#pragma once

#include <cstdint>

namespace simt_selftest {
void seed(uint64_t seed);
void reverse_static(uintptr_t in, uintptr_t out, int blocks, int threads, bool with_barrier);
void reverse_dynamic(uintptr_t in, uintptr_t out, int blocks, int threads);
void read_unwritten_shared(uintptr_t out, int threads);
void exit_before_barrier(uintptr_t out, int threads);
void different_barriers(uintptr_t out, int threads);
void shuffles(uintptr_t out, int threads, int dtype);
void int_shuffles(uintptr_t out, int threads);
void gemm(uintptr_t a, uintptr_t b, uintptr_t c, bool a_t, bool b_t);
void atomics(uintptr_t fsum, uintptr_t isum, uintptr_t in, int n, int threads);
}  // namespace simt_selftest
