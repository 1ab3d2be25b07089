// initcheck for the simulator: a read of shared memory that no thread of the block has written is an error.
// No available sanitizer tracks whether memory was written (MemorySanitizer would need Python and torch
// instrumented too), so this borrows GCC's ThreadSanitizer instrumentation, which calls __tsan_readN/__tsan_writeN
// before every load and store of the instrumented code, and supplies those entry points itself instead of linking
// TSan's runtime: a shadow byte per shared-memory byte says whether it has been written since the block started.
// Built only with -fsanitize=thread -DSIMT_INITCHECK (tests/test_sanitizers.py), without -fsanitize at link time.
#if defined(SIMT_INITCHECK)

#include <cstdint>
#include <string>
#include <vector>

#include "simt.h"

namespace simt {
namespace {

// One shadow byte per shared-memory byte: 1 once written in this block. The functions below touch only plain
// pointers: calling instrumented code (std::vector's members are) would call them again.
struct Region {
  const unsigned char* begin = nullptr;
  const unsigned char* end = nullptr;
  unsigned char* written = nullptr;
  const char* name;
};
std::vector<unsigned char> shadows[2];
Region regions[2] = {{nullptr, nullptr, nullptr, "static"}, {nullptr, nullptr, nullptr, "dynamic"}};
// The runtime of the launch being checked: null until the first block starts, so the instrumented code that runs
// while the extension loads (static constructors, the runtime's own) never reaches the shadow.
Runtime* active = nullptr;

SIMT_RUNTIME const Region* region_of(const void* p) {
  if (!active || !active->cur) return nullptr;
  const auto* c = static_cast<const unsigned char*>(p);
  for (const Region& r : regions)
    if (c >= r.begin && c < r.end) return &r;
  return nullptr;
}

SIMT_RUNTIME void on_write(const void* p, size_t n) {
  if (const Region* r = region_of(p)) __builtin_memset(r->written + (static_cast<const unsigned char*>(p) - r->begin), 1, n);
}

SIMT_RUNTIME void on_read(const void* p, size_t n) {
  const Region* r = region_of(p);
  if (!r) return;
  const size_t off = static_cast<size_t>(static_cast<const unsigned char*>(p) - r->begin);
  for (size_t i = off; i < off + n; ++i)
    if (!r->written[i])
      fail("initcheck: " + where(*active->cur) + " of " + block_name() + " reads byte " + std::to_string(i) + " of " +
           r->name + " shared memory, which no thread of the block has written");
}

}  // namespace

SIMT_RUNTIME void initcheck_block_start() {
  active = &rt();
  const unsigned char* bounds[2][2] = {{__start_simt_shared, __start_simt_shared ? __stop_simt_shared : nullptr},
                                       {active->dyn_smem.data(), active->dyn_smem.data() + active->dyn_smem.size()}};
  for (int i = 0; i < 2; ++i) {
    shadows[i].assign(static_cast<size_t>(bounds[i][1] - bounds[i][0]), 0);
    regions[i].begin = bounds[i][0], regions[i].end = bounds[i][1], regions[i].written = shadows[i].data();
  }
}

}  // namespace simt

// The entry points GCC's -fsanitize=thread instrumentation calls (the ones this code needs; `nm -u` lists them).
extern "C" {
SIMT_RUNTIME void __tsan_init() {}
SIMT_RUNTIME void __tsan_func_entry(void*) {}
SIMT_RUNTIME void __tsan_func_exit() {}
SIMT_RUNTIME void __tsan_vptr_update(void**, void*) {}
#define SIMT_ACCESS(N)                                                         \
  SIMT_RUNTIME void __tsan_read##N(void* p) { simt::on_read(p, N); } \
  SIMT_RUNTIME void __tsan_write##N(void* p) { simt::on_write(p, N); }
SIMT_ACCESS(1)
SIMT_ACCESS(2)
SIMT_ACCESS(4)
SIMT_ACCESS(8)
SIMT_ACCESS(16)
SIMT_RUNTIME void __tsan_read_range(void* p, unsigned long n) { simt::on_read(p, n); }
SIMT_RUNTIME void __tsan_write_range(void* p, unsigned long n) { simt::on_write(p, n); }
SIMT_RUNTIME int __tsan_atomic32_fetch_add(volatile int* a, int v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
SIMT_RUNTIME char __tsan_atomic8_load(const volatile char* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); }
}

#endif  // SIMT_INITCHECK
