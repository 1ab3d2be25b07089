"""attention, forward and forward+backward, against F.scaled_dot_product_attention and the eager reference
(GPU only). Reports TFLOP/s with the FlashAttention FLOP count and the peak memory of one step."""

import pytest
import torch
import torch.nn.functional as F
from conftest import run_op

import transformer_kernels as tk
from transformer_kernels import reference
from transformer_kernels.tools.bench import attention_flops

B, H = 4, 16
LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]
EAGER_MAX_LENGTH = 4096  # the eager reference materialises [B, H, L, L] fp32 scores


IMPLS = {
    "triton": lambda q, k, v, causal: tk.ops.attention(q, k, v, is_causal=causal, backend="triton"),
    "cuda": lambda q, k, v, causal: tk.ops.attention(q, k, v, is_causal=causal, backend="cuda"),
    "sdpa": lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
    "eager": lambda q, k, v, causal: reference.scaled_dot_product_attention(q, k, v, is_causal=causal),
}


@pytest.mark.gpu
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def bench_attention(benchmark, impl, d, length, causal, backward):
    if impl == "eager" and length > EAGER_MAX_LENGTH:
        pytest.skip("eager reference would need O(L^2) memory")
    q, k, v = (torch.randn(B, H, length, d, device="cuda", dtype=torch.float16, requires_grad=backward)
               for _ in range(3))
    torch.cuda.reset_peak_memory_stats()
    run_op(benchmark, IMPLS[impl], q, k, v, causal, backward=backward)
    median = benchmark.stats.stats.median
    benchmark.extra_info["TFLOP/s"] = attention_flops(B, H, length, length, d, causal, backward) / median / 1e12
    benchmark.extra_info["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
