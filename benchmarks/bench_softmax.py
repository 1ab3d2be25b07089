"""masked_softmax on each backend next to torch.softmax (GPU only). Memory-bound: compare GB/s."""

import pytest
import torch
from conftest import run_op

import transformer_kernels as tk

SHAPES = [(8, 16, 512, 512), (4, 16, 2048, 2048), (1, 16, 64, 32768)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def bench_masked_softmax(benchmark, shape, backend, backward):
    x = torch.randn(shape, device="cuda", dtype=torch.float16, requires_grad=backward)
    mask = torch.rand(shape[0], 1, 1, shape[-1], device="cuda") > 0.1
    with tk.use_backend(backend):
        run_op(benchmark, tk.ops.masked_softmax, x, mask, 0.125, backward=backward)
    # read x + write y (+ read y, dy and write dx for backward), fp16
    benchmark.extra_info["bytes"] = x.numel() * 2 * (5 if backward else 2)
