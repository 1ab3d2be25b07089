// simt.h: runs unmodified CUDA kernel sources on the CPU, for verification without a GPU.
//
// Compiled by the host C++ compiler (never by nvcc), force-included before every .cu file of the
// _C_host build. Each block's threads run as cooperative fibers (`FiberContext`) on one OS thread:
//  - a fiber runs until it reaches a barrier (__syncthreads, a warp collective) or returns;
//  - between barriers the runnable fibers resume in a seeded random order, so code that reads
//    another thread's shared-memory write without a barrier in between sees stale or poisoned data;
//  - static __shared__ variables live in one ELF section ("simt_shared") and dynamic shared memory in
//    one buffer per launch, both filled with 0xFF (a NaN pattern) at the start of every block;
//  - barrier divergence (threads exited, or waiting at different barriers) and warp collectives
//    whose lanes cannot all arrive raise std::runtime_error instead of hanging.
// Blocks run one after another, in a seeded random order. Because fibers never run concurrently,
// atomics are plain read-modify-writes.
#pragma once

#ifdef __CUDACC__
#error "simt.h is the host simulator; nvcc builds use the real CUDA runtime"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <sys/mman.h>
#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
// SIMT_RACECHECK: built with ThreadSanitizer and its runtime. SIMT_INITCHECK (also -fsanitize=thread, for its
// instrumentation of every load and store) links initcheck.cu's runtime instead of TSan's.
#if defined(__SANITIZE_THREAD__) && !defined(SIMT_INITCHECK)
#define SIMT_RACECHECK 1
#include <sanitizer/tsan_interface.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// CUDA's host_defines.h gives these GNU attributes meant for nvcc; on the CPU they are plain C++.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __shared__
#undef __constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __constant__ static
// One copy per process, which is one copy per block because blocks run one at a time. The section
// lets the runtime find (and poison) every static shared variable between blocks.
#define __shared__ static __attribute__((section("simt_shared"), aligned(16)))

namespace simt {

// The simulator's own bookkeeping (scheduler state, fiber states, the thread and block indices) is shared by every
// simulated thread by construction: ThreadSanitizer does not instrument it, only the kernels' memory accesses.
#if defined(__SANITIZE_THREAD__)
#define SIMT_RUNTIME __attribute__((no_sanitize_thread))
#else
#define SIMT_RUNTIME
#endif

// A fiber's saved state. On x86-64 the switch is csrc/host/fiber_switch.cu (no system call); elsewhere ucontext,
// whose swapcontext also saves and restores the signal mask (two system calls per switch).
#if defined(__x86_64__)
extern "C" void simt_fiber_switch(void** save_sp, void* load_sp);
extern "C" void simt_fiber_start();
struct FiberContext {
  void* sp = nullptr;
  // The first switch to this context calls entry() on [stack, stack + bytes); entry must never return.
  SIMT_RUNTIME void start(unsigned char* stack, size_t bytes, void (*entry)()) {
    auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t{15});
    uint64_t* frame = top - 8;  // what simt_fiber_switch pops: control words, r15..r12, rbx, rbp, return address
    uint32_t mxcsr;
    uint16_t fpu_cw;
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(fpu_cw));  // the fiber inherits the FP modes
    frame[0] = mxcsr | static_cast<uint64_t>(fpu_cw) << 32;
    frame[1] = frame[2] = frame[3] = 0;            // r15, r14, r13
    frame[4] = reinterpret_cast<uint64_t>(entry);  // r12: what simt_fiber_start calls
    frame[5] = frame[6] = 0;                       // rbx; rbp = 0 ends frame-pointer unwinding here
    frame[7] = reinterpret_cast<uint64_t>(&simt_fiber_start);
    sp = frame;
  }
};
SIMT_RUNTIME inline void switch_fiber(FiberContext& from, FiberContext& to) { simt_fiber_switch(&from.sp, to.sp); }
#else
struct FiberContext {
  ucontext_t uc;
  SIMT_RUNTIME void start(unsigned char* stack, size_t bytes, void (*entry)()) {
    getcontext(&uc);
    uc.uc_stack.ss_sp = stack;
    uc.uc_stack.ss_size = bytes;
    uc.uc_link = nullptr;
    makecontext(&uc, entry, 0);
  }
};
SIMT_RUNTIME inline void switch_fiber(FiberContext& from, FiberContext& to) { swapcontext(&from.uc, &to.uc); }
#endif

// Race checking (tests/test_sanitizers.py builds _C_host with ThreadSanitizer): each simulated thread is a TSan
// fiber, switches never synchronise, and only what orders threads on a GPU does: __syncthreads() (every thread
// releases before waiting and acquires after), warp collectives (per warp), atomics (per address), and the launch
// (the host's writes before a block, the block's before the host reads or the next block reuses shared memory).
// Two threads touching the same byte between those points, one writing, is then a reported data race. Without
// ThreadSanitizer these are no-ops.
namespace race {
#if defined(SIMT_RACECHECK)
inline void* current() { return __tsan_get_current_fiber(); }
inline void* create() { return __tsan_create_fiber(0); }
inline void name(void* fiber, const std::string& name) { __tsan_set_fiber_name(fiber, name.c_str()); }
inline void switch_to(void* fiber) { __tsan_switch_to_fiber(fiber, __tsan_switch_to_fiber_no_sync); }
inline void release(const void* sync) { __tsan_release(const_cast<void*>(sync)); }
inline void acquire(const void* sync) { __tsan_acquire(const_cast<void*>(sync)); }
#else
inline void* current() { return nullptr; }
inline void* create() { return nullptr; }
inline void name(void*, const std::string&) {}
inline void switch_to(void*) {}
inline void release(const void*) {}
inline void acquire(const void*) {}
#endif
}  // namespace race

enum class State { Runnable, AtBarrier, AtWarpSync, Done };

struct Fiber {
  uint3 tid;
  unsigned linear = 0;
  FiberContext ctx;
  State state = State::Done;
  const char* bar_file = nullptr;  // where a fiber waits, for barrier-divergence messages
  int bar_line = 0;
  unsigned warp_mask = 0;          // lanes a warp collective waits for
  void* race_fiber = nullptr;      // its ThreadSanitizer fiber (race checking only)
  // cp.async copies not yet retired: a GPU may complete a copy any time between its issue and the wait that
  // retires its group. The simulator picks one of the two ends at random per copy: at issue (a copy overwriting a
  // buffer other warps still read shows) or at the wait (a read before the wait sees the old bytes); these wait.
  struct AsyncCopy {
    unsigned char* dst;
    unsigned char bytes[16];
    unsigned group;
  };
  std::vector<AsyncCopy> async_copies;
  unsigned async_groups = 0;       // groups committed so far
};

struct Runtime {
  dim3 grid{1, 1, 1};
  dim3 block{1, 1, 1};
  uint3 block_idx{0, 0, 0};
  std::vector<Fiber> fibers;
  unsigned n_threads = 0;
  Fiber* cur = nullptr;
  FiberContext sched;
  std::string error;               // set by a fiber; the scheduler rethrows it on the main stack
  const std::function<void()>* body = nullptr;
  // per-warp exchange slots for shuffles/ballots: [warp][lane] of 16 bytes
  std::vector<unsigned char> exchange;
  std::vector<unsigned char> dyn_smem;
  // fiber stacks, one mapping reused by every launch (lazily committed by the kernel)
  unsigned char* stacks = nullptr;
  size_t stack_bytes = 0;
  size_t stacks_len = 0;
  std::mt19937_64 rng{0x5eed};
  // The scheduling policy of the running block (see run_block) and, when sticky, its favoured warp.
  bool sticky = false;
  unsigned last_warp = ~0u;
  // Race checking: the scheduler's own fiber and the addresses the synchronisation points release and acquire.
  void* race_scheduler = nullptr;
  // One TSan fiber per thread slot, kept for the process: creating and destroying one per simulated thread and
  // block cost ~55,000 mmap/munmap pairs and their page faults in the racecheck driver (over half its time). Reuse
  // hides no race: the launch orders every block after the one before it (block_start, block_end), so thread i of
  // one block was never concurrent with thread i of another here.
  std::vector<void*> race_fibers;
  char block_start = 0, block_end = 0, barrier = 0;
  std::vector<char> warp_collective;
  std::vector<float> mma_scratch;   // per warp: the A and B tiles of an mma.sync (512 floats)
  uint64_t coin = 0;                // a fiber's random choices (cp.async landing), reseeded per block from rng
};

SIMT_RUNTIME inline Runtime& rt() {
  static thread_local Runtime r;
  return r;
}

SIMT_RUNTIME inline void set_seed(uint64_t seed) { rt().rng.seed(seed); }

// A random bit for a fiber (an LCG step, uninstrumented: fibers never run at once, ThreadSanitizer would not know).
SIMT_RUNTIME inline bool coin_flip() {
  auto& r = rt();
  r.coin = r.coin * 6364136223846793005ULL + 1442695040888963407ULL;
  return r.coin >> 63;
}

SIMT_RUNTIME inline size_t fiber_stack_bytes() {
  static size_t bytes = [] {
    const char* env = std::getenv("SIMT_STACK_KB");
    size_t kb = env ? std::strtoull(env, nullptr, 10) : 256;
    return std::max<size_t>(kb, 64) * 1024;
  }();
  return bytes;
}

SIMT_RUNTIME [[noreturn]] inline void fail(const std::string& msg) { throw std::runtime_error("simt: " + msg); }

SIMT_RUNTIME inline std::string where(const Fiber& f) {
  return "thread (" + std::to_string(f.tid.x) + "," + std::to_string(f.tid.y) + "," +
         std::to_string(f.tid.z) + ")";
}

SIMT_RUNTIME inline std::string block_name() {
  auto& r = rt();
  return "block (" + std::to_string(r.block_idx.x) + "," + std::to_string(r.block_idx.y) + "," +
         std::to_string(r.block_idx.z) + ")";
}

#if defined(__SANITIZE_ADDRESS__)
// Built with AddressSanitizer (tests/test_sanitizers.py): every global load and store is checked against the
// allocation it falls in. ASan's report names the kernel (its stack) and the offset from the allocation; this
// adds which simulated block and thread made the access.
SIMT_RUNTIME inline void report_simulated_thread() {
  auto& r = rt();
  if (r.cur) std::fprintf(stderr, "simt: the access above was made by %s %s\n", block_name().c_str(), where(*r.cur).c_str());
}
inline const bool asan_callback_registered = (__sanitizer_set_death_callback(&report_simulated_thread), true);
#endif

// Gives control back to the scheduler; returns when the scheduler resumes this fiber.
SIMT_RUNTIME inline void yield_to_scheduler() {
  auto& r = rt();
  Fiber* self = r.cur;
  race::switch_to(r.race_scheduler);
  switch_fiber(self->ctx, r.sched);
}

SIMT_RUNTIME inline void fiber_entry() {
  auto& r = rt();
  race::acquire(&r.block_start);
  try {
    (*r.body)();
  } catch (const std::exception& e) {
    if (r.error.empty()) r.error = e.what();
  }
  if (!r.cur->async_copies.empty() && r.error.empty())
    r.error = where(*r.cur) + " exits with cp.async copies it never waited for";
  r.cur->state = State::Done;
  race::release(&r.block_end);
  race::switch_to(r.race_scheduler);
  switch_fiber(r.cur->ctx, r.sched);  // never resumed: the next block starts its fibers afresh
}

SIMT_RUNTIME inline void syncthreads(const char* file, int line) {
  auto& r = rt();
  r.cur->state = State::AtBarrier;
  r.cur->bar_file = file;
  r.cur->bar_line = line;
  race::release(&r.barrier);
  yield_to_scheduler();
  race::acquire(&r.barrier);
}

SIMT_RUNTIME inline unsigned lane_id() { return rt().cur->linear & 31u; }
SIMT_RUNTIME inline unsigned warp_id() { return rt().cur->linear >> 5; }

// Lanes of this fiber's warp that exist (a last partial warp has fewer than 32).
SIMT_RUNTIME inline unsigned existing_lanes(unsigned warp) {
  unsigned n = rt().n_threads - warp * 32u;
  return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
}

SIMT_RUNTIME inline void warp_sync(unsigned mask) {
  auto& r = rt();
  unsigned lane = lane_id();
  if (!(mask & (1u << lane))) fail(where(*r.cur) + " calls a warp collective with a mask that excludes itself");
  if (mask & ~existing_lanes(warp_id()))
    fail(where(*r.cur) + " warp collective mask names lanes that do not exist in this block");
  r.cur->state = State::AtWarpSync;
  r.cur->warp_mask = mask;
  race::release(&r.warp_collective[warp_id()]);
  yield_to_scheduler();
  race::acquire(&r.warp_collective[warp_id()]);
}

SIMT_RUNTIME inline unsigned char* exchange_slot(unsigned warp, unsigned lane) {
  return rt().exchange.data() + (static_cast<size_t>(warp) * 32 + lane) * 16;
}

// Writes this lane's value, waits for the lanes of `mask`, reads lane `src`, waits again so that
// no lane overwrites its slot before every lane has read.
template <typename T>
SIMT_RUNTIME inline T exchange(unsigned mask, T value, unsigned src) {
  static_assert(sizeof(T) <= 16, "shuffle payload too large");
  unsigned warp = warp_id();
  std::memcpy(exchange_slot(warp, lane_id()), &value, sizeof(T));
  warp_sync(mask);
  if (!(mask & (1u << src))) fail(where(*rt().cur) + " shuffles from lane " + std::to_string(src) + " outside the mask");
  T out;
  std::memcpy(&out, exchange_slot(warp, src), sizeof(T));
  warp_sync(mask);
  return out;
}

SIMT_RUNTIME inline void poison_static_shared();
#if defined(SIMT_INITCHECK)
void initcheck_block_start();  // csrc/host/initcheck.cu: every shared byte unwritten again
#endif

// Whether warp w can be released from a warp collective: every waiting lane waits with the same mask, and the
// mask names exactly the waiting lanes.
SIMT_RUNTIME inline bool warp_ready(unsigned w) {
  auto& r = rt();
  unsigned waiting = 0, mask = 0;
  for (unsigned l = 0; l < 32 && w * 32 + l < r.n_threads; ++l) {
    const Fiber& f = r.fibers[w * 32 + l];
    if (f.state != State::AtWarpSync) continue;
    if (waiting && f.warp_mask != mask) return false;
    waiting |= 1u << l;
    mask = f.warp_mask;
  }
  return waiting && waiting == mask;
}

SIMT_RUNTIME inline void release_warp(unsigned w) {
  auto& r = rt();
  for (unsigned l = 0; l < 32 && w * 32 + l < r.n_threads; ++l)
    if (r.fibers[w * 32 + l].state == State::AtWarpSync) r.fibers[w * 32 + l].state = State::Runnable;
}

// Runs the runnable fibers (of warp `only`, or of every warp) once each, in a random order, until each blocks.
// Returns whether any ran.
SIMT_RUNTIME inline bool run_runnable(std::vector<unsigned>& order, unsigned only) {
  auto& r = rt();
  order.clear();
  for (unsigned i = 0; i < r.n_threads; ++i)
    if (r.fibers[i].state == State::Runnable && (only == ~0u || i / 32 == only)) order.push_back(i);
  std::shuffle(order.begin(), order.end(), r.rng);
  for (unsigned i : order) {
    r.cur = &r.fibers[i];
    // Touch no runtime state after the TSan switch: a reused fiber has not yet acquired the launch's writes to it.
    race::switch_to(r.cur->race_fiber);
    switch_fiber(r.sched, r.cur->ctx);
    r.cur = nullptr;
    if (!r.error.empty()) fail(r.error + " [" + block_name() + "]");
  }
  return !order.empty();
}

// Runs fibers of the current block until all are done; raises on divergence or deadlock.
// Warps are released from warp collectives one at a time, never all at once: that would advance warps with the
// same sequence of collectives in lockstep and hide a missing __syncthreads() between them. Per block, at random:
//  - uniform: every runnable fiber runs, then one random warp whose collective is complete is released;
//  - sticky: one favoured warp runs and is released again and again until it reaches a __syncthreads() or exits,
//    before any other warp moves (the largest skew between warps a GPU may show).
SIMT_RUNTIME inline void run_block() {
  auto& r = rt();
  std::vector<unsigned> order, ready;
  order.reserve(r.n_threads);
  const unsigned n_warps = (r.n_threads + 31) / 32;
  for (;;) {
    if (r.sticky) {
      const unsigned w = r.last_warp;
      if (w != ~0u && run_runnable(order, w)) continue;
      if (w != ~0u && warp_ready(w)) {
        release_warp(w);
        continue;
      }
      ready.clear();
      for (unsigned v = 0; v < n_warps; ++v) {
        bool runnable = false;
        for (unsigned l = 0; l < 32 && v * 32 + l < r.n_threads; ++l) runnable |= r.fibers[v * 32 + l].state == State::Runnable;
        if (runnable || warp_ready(v)) ready.push_back(v);
      }
      if (!ready.empty()) {
        r.last_warp = ready[std::uniform_int_distribution<size_t>(0, ready.size() - 1)(r.rng)];
        continue;
      }
      r.last_warp = ~0u;
    } else {
      if (run_runnable(order, ~0u)) continue;
      ready.clear();
      for (unsigned v = 0; v < n_warps; ++v)
        if (warp_ready(v)) ready.push_back(v);
      if (!ready.empty()) {
        release_warp(ready[std::uniform_int_distribution<size_t>(0, ready.size() - 1)(r.rng)]);
        continue;
      }
    }
    unsigned done = 0, at_bar = 0;
    const Fiber* first_bar = nullptr;
    for (auto& f : r.fibers) {
      if (f.state == State::Done) ++done;
      if (f.state == State::AtBarrier) {
        ++at_bar;
        if (!first_bar) first_bar = &f;
      }
    }
    if (done == r.n_threads) return;
    if (at_bar + done == r.n_threads && at_bar > 0) {
      if (done > 0)
        fail("barrier divergence in " + block_name() + ": " + std::to_string(at_bar) +
             " threads wait at __syncthreads() (" + first_bar->bar_file + ":" +
             std::to_string(first_bar->bar_line) + ") while " + std::to_string(done) + " threads have exited");
      for (auto& f : r.fibers)
        if (f.state == State::AtBarrier && (f.bar_line != first_bar->bar_line || std::strcmp(f.bar_file, first_bar->bar_file) != 0))
          fail("barrier divergence in " + block_name() + ": " + where(*first_bar) + " waits at " +
               first_bar->bar_file + ":" + std::to_string(first_bar->bar_line) + " but " + where(f) +
               " waits at " + f.bar_file + ":" + std::to_string(f.bar_line));
      for (auto& f : r.fibers)
        if (f.state == State::AtBarrier) f.state = State::Runnable;
      continue;
    }
    // Nothing can move: a warp collective waits for lanes that exited or sit at a block barrier.
    for (auto& f : r.fibers)
      if (f.state == State::AtWarpSync)
        fail("warp collective divergence in " + block_name() + ": " + where(f) + " waits for lanes (mask 0x" +
             [&] { char b[16]; std::snprintf(b, sizeof b, "%08x", f.warp_mask); return std::string(b); }() +
             ") that exited or wait elsewhere");
    fail("deadlock in " + block_name());
  }
}

SIMT_RUNTIME inline void ensure_stacks(unsigned n_threads) {
  auto& r = rt();
  size_t need = static_cast<size_t>(n_threads) * fiber_stack_bytes();
  if (r.stacks_len >= need) return;
  if (r.stacks) munmap(r.stacks, r.stacks_len);
  void* p = mmap(nullptr, need, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) fail("cannot map fiber stacks");
  r.stacks = static_cast<unsigned char*>(p);
  r.stacks_len = need;
  r.stack_bytes = fiber_stack_bytes();
}

// Runs `body` once per thread of every block of the grid. Blocks run one by one in a random order.
SIMT_RUNTIME inline void launch(dim3 grid, dim3 block, size_t dyn_smem_bytes, const std::function<void()>& body) {
  auto& r = rt();
  if (r.body) fail("nested kernel launch");
  unsigned long long n_threads = 1ull * block.x * block.y * block.z;
  if (n_threads == 0 || n_threads > 1024) fail("block of " + std::to_string(n_threads) + " threads (must be 1..1024)");
  if (grid.y > 65535 || grid.z > 65535) fail("grid.y/grid.z above 65535");
  unsigned long long n_blocks = 1ull * grid.x * grid.y * grid.z;
  if (n_blocks == 0) return;
  r.grid = grid;
  r.block = block;
  r.n_threads = static_cast<unsigned>(n_threads);
  r.fibers.assign(r.n_threads, Fiber{});
  r.exchange.assign(static_cast<size_t>((r.n_threads + 31) / 32) * 32 * 16, 0);
  r.warp_collective.assign((r.n_threads + 31) / 32, 0);
  r.mma_scratch.assign(static_cast<size_t>((r.n_threads + 31) / 32) * 512, 0.0f);
  r.race_scheduler = race::current();
  r.dyn_smem.assign(dyn_smem_bytes, 0);
  r.error.clear();
  r.body = &body;
  ensure_stacks(r.n_threads);
  std::vector<unsigned long long> blocks(n_blocks);
  for (unsigned long long i = 0; i < n_blocks; ++i) blocks[i] = i;
  std::shuffle(blocks.begin(), blocks.end(), r.rng);
  try {
    for (unsigned long long b : blocks) {
      r.block_idx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                          static_cast<unsigned>(b / (1ull * grid.x * grid.y))};
      r.sticky = r.rng() & 1;
      r.coin = r.rng();
      r.last_warp = ~0u;
      poison_static_shared();
      std::memset(r.dyn_smem.data(), 0xff, r.dyn_smem.size());
#if defined(SIMT_INITCHECK)
      initcheck_block_start();
#endif
      for (unsigned i = 0; i < r.n_threads; ++i) {
        Fiber& f = r.fibers[i];
        f.linear = i;
        f.tid = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
        f.state = State::Runnable;
        f.async_copies.clear();
        f.async_groups = 0;
        f.ctx.start(r.stacks + static_cast<size_t>(i) * r.stack_bytes, r.stack_bytes, fiber_entry);
#if defined(SIMT_RACECHECK)
        if (i == r.race_fibers.size()) r.race_fibers.push_back(race::create());
        f.race_fiber = r.race_fibers[i];
        race::name(f.race_fiber, block_name() + " " + where(f));  // reports name the simulated block and thread
#endif
      }
      race::release(&r.block_start);
      run_block();
      race::acquire(&r.block_end);
    }
  } catch (...) {
#if defined(__SANITIZE_ADDRESS__)
    // An error thrown in a fiber, and the fibers left suspended, leave their frames' redzones poisoned (ASan cannot
    // clean a stack it does not know): the next launch starts on clean stacks.
    __asan_unpoison_memory_region(r.stacks, r.stacks_len);
#endif
    r.body = nullptr;
    r.cur = nullptr;
    throw;
  }
  r.body = nullptr;
}

SIMT_RUNTIME inline void* dynamic_shared() { return rt().dyn_smem.data(); }

}  // namespace simt

// Section bounds provided by the linker; weak so that a program without static shared memory links.
extern "C" {
extern unsigned char __start_simt_shared[] __attribute__((weak, visibility("hidden")));
extern unsigned char __stop_simt_shared[] __attribute__((weak, visibility("hidden")));
}

SIMT_RUNTIME inline void simt::poison_static_shared() {
  if (__start_simt_shared && __stop_simt_shared > __start_simt_shared)
    std::memset(__start_simt_shared, 0xff, static_cast<size_t>(__stop_simt_shared - __start_simt_shared));
}

// ---- CUDA built-ins -------------------------------------------------------------------------
namespace simt {
SIMT_RUNTIME inline uint3 thread_idx() { return rt().cur->tid; }
SIMT_RUNTIME inline uint3 block_idx() { return rt().block_idx; }
SIMT_RUNTIME inline dim3 block_dim() { return rt().block; }
SIMT_RUNTIME inline dim3 grid_dim() { return rt().grid; }
}  // namespace simt
#define threadIdx (::simt::thread_idx())
#define blockIdx (::simt::block_idx())
#define blockDim (::simt::block_dim())
#define gridDim (::simt::grid_dim())
constexpr int warpSize = 32;

#define __syncthreads() ::simt::syncthreads(__FILE__, __LINE__)
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::simt::warp_sync(mask); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  unsigned lane = ::simt::lane_id();
  unsigned src = (lane / width) * width + (static_cast<unsigned>(src_lane) % width);
  return ::simt::exchange(mask, var, src);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  unsigned lane = ::simt::lane_id();
  unsigned src = lane ^ static_cast<unsigned>(lane_mask);
  // A lane reading from a later width-segment gets its own value back (CUDA's rule).
  if (src / width > lane / width) src = lane;
  return ::simt::exchange(mask, var, src);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  unsigned lane = ::simt::lane_id();
  unsigned src = lane + delta;
  if (src / width != lane / width || src >= 32) src = lane;
  return ::simt::exchange(mask, var, src);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  unsigned lane = ::simt::lane_id();
  unsigned src = lane >= delta ? lane - delta : lane;
  if (src / width != lane / width) src = lane;
  return ::simt::exchange(mask, var, src);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  unsigned warp = ::simt::warp_id(), lane = ::simt::lane_id();
  int p = pred != 0;
  std::memcpy(::simt::exchange_slot(warp, lane), &p, sizeof p);
  ::simt::warp_sync(mask);
  unsigned out = 0;
  for (unsigned l = 0; l < 32; ++l) {
    int v;
    std::memcpy(&v, ::simt::exchange_slot(warp, l), sizeof v);
    if ((mask & (1u << l)) && v) out |= 1u << l;
  }
  ::simt::warp_sync(mask);
  return out;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }

template <typename T>
inline T atomicAdd(T* address, T val) {
  ::simt::race::acquire(address);  // atomics on one address are ordered, not racing
  T old = *address;
  *address = old + val;
  ::simt::race::release(address);
  return old;
}
template <typename T>
inline T atomicMax(T* address, T val) {
  ::simt::race::acquire(address);  // atomics on one address are ordered, not racing
  T old = *address;
  *address = std::max(old, val);
  ::simt::race::release(address);
  return old;
}
template <typename T>
inline T atomicCAS(T* address, T compare, T val) {
  ::simt::race::acquire(address);  // atomics on one address are ordered, not racing
  T old = *address;
  if (old == compare) *address = val;
  ::simt::race::release(address);
  return old;
}
template <typename T>
inline T atomicExch(T* address, T val) {
  ::simt::race::acquire(address);  // atomics on one address are ordered, not racing
  T old = *address;
  *address = val;
  ::simt::race::release(address);
  return old;
}

// Math intrinsics: the fast-math device variants map onto the exact libm functions.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __saturatef(float x) { return std::fmin(std::fmax(x, 0.0f), 1.0f); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned v; std::memcpy(&v, &f, 4); return v; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
using std::max;
using std::min;

// ---- PTX: mma.sync m16n8k16, ldmatrix, cp.async ------------------------------------------------------------------
// The instructions of csrc/ptx.cuh with the register layouts of the PTX ISA (the table there). mma and ldmatrix are
// warp collectives: the lanes publish their operands, wait for the whole warp, then each lane reads what the
// instruction gives it, so a diverged warp raises as on a GPU it would hang or be undefined.
namespace simt {
namespace ptx {

// This warp's operand scratch (512 floats).
SIMT_RUNTIME inline float* warp_mma_scratch() {
  return rt().mma_scratch.data() + static_cast<size_t>(warp_id()) * 512;
}

template <typename T>
inline float half_bits_to_float(uint32_t bits16) {
  T v;
  const uint16_t b = static_cast<uint16_t>(bits16);
  std::memcpy(&v, &b, 2);
  if constexpr (std::is_same<T, __half>::value) return __half2float(v);
  else return __bfloat162float(v);
}

// D = A (16 x 16) * B (16 x 8) + C: every lane scatters its A and B elements into the warp's scratch by the
// documented layout, then computes its four outputs in fp32 (products of 16-bit values are exact in fp32; the
// hardware's sum order differs, within fp32 rounding).
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  const int lane = static_cast<int>(lane_id()), g = lane >> 2, t = lane & 3;
  float* sa = warp_mma_scratch();  // A row-major 16 x 16
  float* sb = sa + 256;            // B k-major 16 x 8
  for (int i = 0; i < 4; ++i)
    for (int h = 0; h < 2; ++h) {
      const int row = g + 8 * (i & 1), col = 2 * t + h + 8 * (i >> 1);
      sa[row * 16 + col] = half_bits_to_float<T>(a[i] >> (16 * h));
    }
  for (int i = 0; i < 2; ++i)
    for (int h = 0; h < 2; ++h) sb[(2 * t + h + 8 * i) * 8 + g] = half_bits_to_float<T>(b[i] >> (16 * h));
  warp_sync(0xffffffffu);  // every lane's operands are published
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += sa[row * 16 + k] * sb[k * 8 + col];
    out[i] = acc;
  }
  warp_sync(0xffffffffu);  // every lane has read the scratch before the next instruction overwrites it
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the address of row l % 8 of matrix l / 8.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, bool trans) {
  const unsigned warp = warp_id(), lane = lane_id();
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) fail(where(*rt().cur) + " ldmatrix row address not 16-byte aligned");
  std::memcpy(exchange_slot(warp, lane), &row, sizeof row);
  warp_sync(0xffffffffu);  // every lane's row address is published
  const unsigned g = lane >> 2, t = lane & 3;
  for (unsigned i = 0; i < 4; ++i) {
    uint16_t e[2];
    for (unsigned h = 0; h < 2; ++h) {
      // plain: row g, column 2t + h of matrix i; transposed: row 2t + h, column g
      const unsigned src_row = trans ? 2 * t + h : g, col = trans ? g : 2 * t + h;
      const unsigned char* p;
      std::memcpy(&p, exchange_slot(warp, 8 * i + src_row), sizeof p);
      std::memcpy(&e[h], p + 2 * col, 2);
    }
    r[i] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
  warp_sync(0xffffffffu);  // every lane has read the addresses before a slot is reused
}

inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 || reinterpret_cast<uintptr_t>(src) % 16)
    fail(where(*rt().cur) + " cp.async with an address not 16-byte aligned");
  if (src_bytes < 0 || src_bytes > 16) fail(where(*rt().cur) + " cp.async src-size outside 0..16");
  Fiber& f = *rt().cur;
  Fiber::AsyncCopy c{static_cast<unsigned char*>(dst), {}, f.async_groups};
  if (src_bytes) std::memcpy(c.bytes, src, static_cast<size_t>(src_bytes));
  if (coin_flip()) {
    for (int i = 0; i < 16; ++i) c.dst[i] = c.bytes[i];  // lands at once
  } else {
    f.async_copies.push_back(c);
  }
}

inline void cp_async_commit() { ++rt().cur->async_groups; }

// Retires every copy of a committed group older than the newest n; copies not yet committed stay in flight. The
// writes are the fiber's own (instrumented under the sanitizers, like any store of the thread).
inline void cp_async_wait(int n) {
  Fiber& f = *rt().cur;
  const unsigned keep_from = f.async_groups > static_cast<unsigned>(n) ? f.async_groups - n : 0;
  size_t kept = 0;
  for (auto& c : f.async_copies) {
    if (c.group < keep_from) {
      for (int i = 0; i < 16; ++i) c.dst[i] = c.bytes[i];
    } else {
      f.async_copies[kept++] = c;
    }
  }
  f.async_copies.resize(kept);
}

}  // namespace ptx
}  // namespace simt
