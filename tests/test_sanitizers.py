"""The CUDA simulator as a sanitizer, with trusted tools rather than hand-written checks:

- memcheck: `_C_host` built with AddressSanitizer checks every global load and store of every kernel against the
  allocation it falls in; simt.h adds which simulated block and thread made a bad access.
- racecheck: `_C_host` built with ThreadSanitizer runs each simulated thread as a TSan fiber whose switches do
  not synchronise; only __syncthreads(), warp collectives, atomics and the launch do (simt.h). Two threads of a
  block touching the same shared (or global) byte between barriers, one writing, is a reported race naming both
  simulated threads.

- initcheck: no available tool tracks whether memory was written (MemorySanitizer would need Python and torch
  instrumented), so csrc/host/initcheck.cu supplies the entry points of GCC's ThreadSanitizer instrumentation
  itself: a shadow byte per shared-memory byte, set by stores, checked by loads, cleared when a block starts.

A planted out-of-bounds read, a planted race between two warps and a planted read of unwritten shared memory must
be caught, and every shipped CUDA C++ kernel must run clean under all three.
"""

import os
import re
import subprocess
import sys
import textwrap

import pytest

from transformer_kernels.tools import toolchain

LIBASAN = toolchain.host_runtime_library("libasan.so")
LIBTSAN = toolchain.host_runtime_library("libtsan.so")
# The driver compute-sanitizer runs on a GPU in `make gpu-check`: each op of the cuda backend once, forward and
# backward, with odd sizes, masks, GQA, dropout and residuals.
EVERY_KERNEL = """
    import torch
    from transformer_kernels.tools import cuda_driver
    print("\\n".join(cuda_driver.run(torch.device("cpu"))))
"""


def _sanitized_build(name: str, runtime, tool: str, cxxflags: str):
    if runtime is None:
        pytest.skip(f"the host compiler has no {tool} runtime")
    return toolchain.instrumented_host_extension(name, cxxflags)[0]


# -g1: line tables only, all a report's `file:line in function` needs; full debug info (-g) made the ASan build
# 120 CPU seconds instead of 71 on 2 cores.
@pytest.fixture(scope="module")
def asan_extension():
    return _sanitized_build("asan", LIBASAN, "AddressSanitizer", "-O1 -g1 -fsanitize=address -fno-omit-frame-pointer")


@pytest.fixture(scope="module")
def tsan_extension():
    return _sanitized_build("tsan", LIBTSAN, "ThreadSanitizer", "-O1 -g1 -fsanitize=thread")


@pytest.fixture(scope="module")
def initcheck_extension():
    # TSan's instrumentation without its runtime: initcheck.cu defines the __tsan_* entry points.
    so, _ = toolchain.instrumented_host_extension("initcheck", "-O1 -fsanitize=thread -DSIMT_INITCHECK", "")
    return so


def run_sanitized(runtime, extension, code: str) -> subprocess.CompletedProcess:
    # The sanitizer's runtime must be the first library loaded into the interpreter; leak checking would report
    # Python's own; one OpenMP thread keeps torch's thread pool out of the race report.
    env = {**os.environ, "LD_PRELOAD": str(runtime or ""), "ASAN_OPTIONS": "detect_leaks=0",
           "TSAN_OPTIONS": "halt_on_error=1 exitcode=66", "OMP_NUM_THREADS": "1",
           "TK_HOST_EXTENSION": str(extension), "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=600)


def test_planted_out_of_bounds_read_is_caught(asan_extension):
    # reverse_static reads in[blockIdx.x * blockDim.x + threadIdx.x]: 256 threads over 255 floats read one past.
    proc = run_sanitized(LIBASAN, asan_extension, """
        import torch
        from transformer_kernels import _ext
        x, y = torch.randn(255), torch.empty(256)
        _ext.load("_C_host").selftest.reverse_static(x.data_ptr(), y.data_ptr(), 1, 256, True)
    """)
    assert proc.returncode != 0
    assert "heap-buffer-overflow" in proc.stderr, proc.stderr[-3000:]
    assert "READ of size 4" in proc.stderr and "0 bytes to the right of 1020-byte region" in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"selftest\.cu:\d+ in simt_selftest::reverse_static_kernel", proc.stderr), proc.stderr[-3000:]
    assert "simt: the access above was made by block (0,0,0) thread (255,0,0)" in proc.stderr, proc.stderr[-3000:]


def test_planted_race_between_two_warps_is_caught(tsan_extension):
    # Without its barrier, reverse_static's thread t reads the shared slot thread 63 - t writes: with 64 threads,
    # a thread of warp 0 and one of warp 1. With the barrier the same launch is clean.
    proc = run_sanitized(LIBTSAN, tsan_extension, """
        import torch
        from transformer_kernels import _ext
        C = _ext.load("_C_host")
        x, y = torch.randn(64), torch.empty(64)
        C.selftest.reverse_static(x.data_ptr(), y.data_ptr(), 1, 64, True)
        print("clean with the barrier", flush=True)
        C.selftest.reverse_static(x.data_ptr(), y.data_ptr(), 1, 64, False)
    """)
    assert "clean with the barrier" in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode == 66, proc.stderr[-3000:]
    assert "WARNING: ThreadSanitizer: data race" in proc.stderr
    assert "reverse_static_kernel(float const*, float*, int)::buf" in proc.stderr, proc.stderr[-3000:]
    threads = [int(t) for t in re.findall(r"Thread T\d+ 'block \(0,0,0\) thread \((\d+),0,0\)'", proc.stderr)]
    assert len(threads) == 2 and threads[0] + threads[1] == 63 and threads[0] // 32 != threads[1] // 32, proc.stderr


def test_planted_read_of_unwritten_shared_memory_is_caught(initcheck_extension):
    # read_unwritten_shared: the first half of the block writes its slots, then every thread reads its own.
    proc = run_sanitized(None, initcheck_extension, """
        import torch
        from transformer_kernels import _ext
        y = torch.empty(64)
        _ext.load("_C_host").selftest.read_unwritten_shared(y.data_ptr(), 64)
    """)
    assert proc.returncode != 0
    m = re.search(r"initcheck: thread \((\d+),0,0\) of block \(0,0,0\) reads byte (\d+) of dynamic shared memory, "
                  r"which no thread of the block has written", proc.stderr)
    assert m, proc.stderr[-3000:]
    assert int(m.group(1)) >= 32 and int(m.group(2)) == 4 * int(m.group(1))


@pytest.mark.parametrize(("build", "runtime", "report"), [
    ("asan_extension", LIBASAN, "ERROR: AddressSanitizer"),
    ("tsan_extension", LIBTSAN, "ThreadSanitizer"),
    ("initcheck_extension", None, "initcheck:"),
], ids=["memcheck", "racecheck", "initcheck"])
def test_every_shipped_cuda_kernel_runs_clean(build, runtime, report, request):
    # tools/cuda_driver.py runs each op of the cuda backend once (odd sizes, masks, GQA, dropout, residuals,
    # forward and backward): the same driver compute-sanitizer runs on a GPU in `make gpu-check`.
    proc = run_sanitized(runtime, request.getfixturevalue(build), EVERY_KERNEL)
    assert report not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(op in proc.stdout for op in ("attention forward/backward", "PLAIN D=64", "varlen", "varlen attention "
                                            "forward/backward PLAIN", "layer_norm", "rotary", "linear_cross_entropy"))
