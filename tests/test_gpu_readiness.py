"""What only real hardware would expose, checked where it can be: outputs not zero-filled twice, dynamic shared
memory aligned for cp.async/ldmatrix, no recompile for arguments that change on every call, the bench's peak-memory column."""

import re
import sys
from pathlib import Path

import pytest
import torch

import transformer_kernels as tk
from transformer_kernels.kernels import attention as triton_attention
from transformer_kernels.tools import bench

CSRC = Path(__file__).resolve().parents[1] / "csrc"
KERNEL_BACKENDS = ["triton", "cuda"]


def _every_op_forward_and_backward(backend: str, device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    with tk.use_backend(backend):
        q, k, v = rand(2, 2, 19, 16), rand(2, 1, 23, 16), rand(2, 1, 23, 16)
        pad = torch.zeros(2, 23, dtype=torch.bool, device=device)
        pad[1, 20:] = True
        tk.ops.attention(q, k, v, key_padding_mask=pad, is_causal=True, enable_gqa=True).sum().backward()
        tk.ops.linear(rand(7, 12), rand(10, 12), rand(10), "gelu", rand(7, 10)).sum().backward()
        tk.ops.layer_norm(rand(5, 40), rand(40), rand(40), residual=rand(5, 40)).sum().backward()
        tk.ops.masked_softmax(rand(2, 3, 9), torch.rand(2, 3, 9, generator=g).to(device) > 0.3).sum().backward()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_outputs_are_not_zero_filled(backend, device, monkeypatch):
    # Every output element is written by a kernel: a zero fill first is a wasted pass over memory.
    fills = []
    zeros = torch.zeros

    def counting_zeros(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith(("transformer_kernels.kernels", "transformer_kernels.cuda")):
            fills.append(caller)
        return zeros(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", counting_zeros)
    _every_op_forward_and_backward(backend, device)
    assert fills == []


def test_dynamic_shared_memory_is_declared_128_byte_aligned():
    # cp.async and ldmatrix need 16-byte aligned rows and the swizzle assumes tiles on 128-byte boundaries; only the
    # declared alignment of `extern __shared__` is guaranteed.
    sources = [p for p in CSRC.rglob("*") if p.suffix in (".cu", ".cuh", ".h")]
    for path in sources:
        for line in path.read_text().splitlines():
            if "extern __shared__" in line:
                assert re.search(r"__align__\((\d+)\)", line) and int(re.search(r"__align__\((\d+)\)", line)[1]) >= 128, \
                    f"{path.name}: {line.strip()}"
                assert "#define TK_EXTERN_SHARED" in line, f"{path.name}: declare dynamic shared memory through TK_EXTERN_SHARED"
    kernels = [p for p in sources if "TK_EXTERN_SHARED(" in p.read_text() and p.name != "common.cuh"]
    assert {p.name for p in kernels} >= {"attention_fwd.cu", "attention_bwd.cu"}


def _compiled_variants(fn) -> int:
    return sum(len(cache[0]) for cache in fn.device_caches.values())


@pytest.mark.gpu
def test_causal_offset_does_not_compile_a_new_variant():
    # The bottom-right causal offset (Lk - Lq) changes with every decoding step; 16 and 17 differ in Triton's
    # divisibility-by-16 specialisation, which would compile the kernel again were the offset specialised.
    q = torch.randn(1, 2, 5, 64, device="cuda", dtype=torch.float16)

    def call(lk):
        k = torch.randn(1, 2, lk, 64, device="cuda", dtype=torch.float16)
        tk.ops.attention(q, k, k, is_causal=True, causal_alignment="bottom_right", backend="triton")

    call(21)
    before = _compiled_variants(triton_attention.attn_fwd_kernel)
    call(22)
    torch.cuda.synchronize()
    assert _compiled_variants(triton_attention.attn_fwd_kernel) == before


@pytest.mark.gpu
def test_bench_peak_memory_excludes_the_timers_buffers():
    # do_bench allocates a 256 MB buffer to flush L2 between runs: the op's peak must not include it.
    case = next(c for c in bench.quick_cases() if c.op == "attention" and c.impl == "triton")

    def flushing_timer(fn, quantiles):
        flush = torch.empty(512 * 2**20, dtype=torch.int8, device="cuda")
        flush.zero_()
        fn()
        torch.cuda.synchronize()
        return 1.0, 1.0, 1.0

    (row,) = bench.run_cases([case], torch.device("cuda"), timer=flushing_timer)
    assert row.peak_mib is not None and row.peak_mib < 512
