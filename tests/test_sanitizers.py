"""The CUDA simulator as a memory checker: `_C_host` built with AddressSanitizer (a trusted tool, rather than a
hand-written check) checks every global load and store of every kernel against the allocation it falls in, and
simt.h adds which simulated block and thread made a bad access. A planted out-of-bounds read must be caught, and
every shipped CUDA C++ kernel must run clean.

Not covered here yet: shared-memory races and reads of unwritten shared memory (racecheck, initcheck).
"""

import os
import re
import subprocess
import sys
import textwrap

import pytest

from transformer_kernels.tools import toolchain

LIBASAN = toolchain.host_runtime_library("libasan.so")
pytestmark = pytest.mark.skipif(LIBASAN is None, reason="the host compiler has no AddressSanitizer runtime")


@pytest.fixture(scope="module")
def asan_extension():
    so, _ = toolchain.instrumented_host_extension("asan", "-O1 -g -fsanitize=address -fno-omit-frame-pointer")
    return so


def run_under_asan(extension, code: str) -> subprocess.CompletedProcess:
    # ASan must be the first library loaded into the interpreter; leak checking would report Python's own.
    env = {**os.environ, "LD_PRELOAD": str(LIBASAN), "ASAN_OPTIONS": "detect_leaks=0", "OMP_NUM_THREADS": "1",
           "TK_HOST_EXTENSION": str(extension), "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=600)


def test_planted_out_of_bounds_read_is_caught(asan_extension):
    # reverse_static reads in[blockIdx.x * blockDim.x + threadIdx.x]: 256 threads over 255 floats read one past.
    proc = run_under_asan(asan_extension, """
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


def test_every_shipped_cuda_kernel_runs_clean(asan_extension):
    # tools/cuda_driver.py runs each op of the cuda backend once (odd sizes, masks, GQA, dropout, residuals,
    # forward and backward): the same driver compute-sanitizer runs on a GPU in `make gpu-check`.
    proc = run_under_asan(asan_extension, """
        import torch
        from transformer_kernels.tools import cuda_driver
        print("\\n".join(cuda_driver.run(torch.device("cpu"))))
    """)
    assert "ERROR: AddressSanitizer" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "attention forward/backward" in proc.stdout and "layer_norm" in proc.stdout
