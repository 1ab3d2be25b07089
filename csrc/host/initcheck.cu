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

// One shadow byte per shared-memory byte: 1 once written in this block. Plain pointers only: the functions below
// must not call instrumented code (std::vector's members are), which would call them again.
std::vector<unsigned char> static_shadow, dynamic_shadow;
const unsigned char *static_begin = nullptr, *static_end = nullptr, *dynamic_begin = nullptr, *dynamic_end = nullptr;
unsigned char *static_written = nullptr, *dynamic_written = nullptr;
// The runtime of the launch being checked: null until the first block starts, so the instrumented code that runs
// while the extension loads (static constructors, the runtime's own) never reaches the shadow.
Runtime* active = nullptr;

SIMT_RUNTIME unsigned char* shadow_of(const void* p, size_t* offset, const char** name) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c >= static_begin && c < static_end) {
    *offset = static_cast<size_t>(c - static_begin), *name = "static";
    return static_written;
  }
  if (c >= dynamic_begin && c < dynamic_end) {
    *offset = static_cast<size_t>(c - dynamic_begin), *name = "dynamic";
    return dynamic_written;
  }
  return nullptr;
}

SIMT_RUNTIME void on_write(const void* p, size_t n) {
  if (!active || !active->cur) return;
  size_t off = 0;
  const char* name = nullptr;
  if (unsigned char* w = shadow_of(p, &off, &name)) __builtin_memset(w + off, 1, n);
}

SIMT_RUNTIME void on_read(const void* p, size_t n) {
  if (!active || !active->cur) return;
  size_t off = 0;
  const char* name = nullptr;
  const unsigned char* w = shadow_of(p, &off, &name);
  if (!w) return;
  for (size_t i = off; i < off + n; ++i)
    if (!w[i])
      fail("initcheck: " + where(*active->cur) + " of " + block_name() + " reads byte " + std::to_string(i) + " of " +
           name + " shared memory, which no thread of the block has written");
}

}  // namespace

SIMT_RUNTIME void initcheck_block_start() {
  active = &rt();
  static_begin = __start_simt_shared, static_end = __start_simt_shared ? __stop_simt_shared : nullptr;
  dynamic_begin = active->dyn_smem.data(), dynamic_end = dynamic_begin + active->dyn_smem.size();
  static_shadow.assign(static_cast<size_t>(static_end - static_begin), 0);
  dynamic_shadow.assign(active->dyn_smem.size(), 0);
  static_written = static_shadow.data(), dynamic_written = dynamic_shadow.data();
}

}  // namespace simt

// The entry points GCC's -fsanitize=thread instrumentation calls (the ones this code needs; `nm -u` lists them).
extern "C" {
SIMT_RUNTIME void __tsan_init() {}
SIMT_RUNTIME void __tsan_func_entry(void*) {}
SIMT_RUNTIME void __tsan_func_exit() {}
SIMT_RUNTIME void __tsan_vptr_update(void**, void*) {}
SIMT_RUNTIME void __tsan_read1(void* p) { simt::on_read(p, 1); }
SIMT_RUNTIME void __tsan_read2(void* p) { simt::on_read(p, 2); }
SIMT_RUNTIME void __tsan_read4(void* p) { simt::on_read(p, 4); }
SIMT_RUNTIME void __tsan_read8(void* p) { simt::on_read(p, 8); }
SIMT_RUNTIME void __tsan_read16(void* p) { simt::on_read(p, 16); }
SIMT_RUNTIME void __tsan_read_range(void* p, unsigned long n) { simt::on_read(p, n); }
SIMT_RUNTIME void __tsan_write1(void* p) { simt::on_write(p, 1); }
SIMT_RUNTIME void __tsan_write2(void* p) { simt::on_write(p, 2); }
SIMT_RUNTIME void __tsan_write4(void* p) { simt::on_write(p, 4); }
SIMT_RUNTIME void __tsan_write8(void* p) { simt::on_write(p, 8); }
SIMT_RUNTIME void __tsan_write16(void* p) { simt::on_write(p, 16); }
SIMT_RUNTIME void __tsan_write_range(void* p, unsigned long n) { simt::on_write(p, n); }
SIMT_RUNTIME int __tsan_atomic32_fetch_add(volatile int* a, int v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
SIMT_RUNTIME char __tsan_atomic8_load(const volatile char* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); }
}

#endif  // SIMT_INITCHECK
