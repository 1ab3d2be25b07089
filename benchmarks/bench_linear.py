"""GEMM, feed-forward and LayerNorm against PyTorch (GPU only): TFLOP/s for the GEMMs, GB/s for the norm."""

import pytest
import torch
from conftest import run_op

import transformer_kernels as tk
from transformer_kernels import reference

# (name, tokens, embed, hidden): BERT-base (batch 8 × 512) and GPT-2 medium (batch 8 × 1024)
MODELS = [("bert-base", 8 * 512, 768, 3072), ("gpt2-medium", 8 * 1024, 1024, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["triton", "cuda", "torch.matmul"])
@pytest.mark.parametrize("size", [1024, 4096, 8192])
def bench_gemm(benchmark, impl, size):
    a = torch.randn(size, size, device="cuda", dtype=torch.float16)
    w = torch.randn(size, size, device="cuda", dtype=torch.float16)
    fn = (lambda: a @ w.t()) if impl == "torch.matmul" else (lambda: tk.ops.linear(a, w, backend=impl))
    run_op(benchmark, fn)
    benchmark.extra_info["TFLOP/s"] = 2 * size**3 / benchmark.stats.stats.median / 1e12


@pytest.mark.gpu
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m[0])
@pytest.mark.parametrize("impl", ["triton", "cuda", "eager"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def bench_feed_forward(benchmark, model, impl, backward):
    _, tokens, e, f = model
    dev, dt = "cuda", torch.float16
    x = torch.randn(tokens, e, device=dev, dtype=dt, requires_grad=backward)
    w1, w2 = (torch.randn(*s, device=dev, dtype=dt, requires_grad=backward) * 0.02 for s in ((f, e), (e, f)))
    b1, b2 = torch.zeros(f, device=dev, dtype=dt), torch.zeros(e, device=dev, dtype=dt)
    if impl != "eager":
        fn = lambda: tk.ops.feed_forward(x, w1, b1, w2, b2, "gelu", residual=x, backend=impl)
    else:
        fn = lambda: torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1)), w2, b2) + x
    run_op(benchmark, fn, backward=backward)
    flops = 4 * tokens * e * f * (3 if backward else 1)
    benchmark.extra_info["TFLOP/s"] = flops / benchmark.stats.stats.median / 1e12


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [768, 1024, 4096])
@pytest.mark.parametrize("impl", ["triton", "cuda", "torch", "eager-reference"])
def bench_layer_norm(benchmark, hidden, impl):
    x = torch.randn(8 * 1024, hidden, device="cuda", dtype=torch.float16)
    w, b = torch.ones(hidden, device="cuda", dtype=torch.float16), torch.zeros(hidden, device="cuda", dtype=torch.float16)
    fns = {"triton": lambda: tk.ops.layer_norm(x, w, b, backend="triton"),
           "cuda": lambda: tk.ops.layer_norm(x, w, b, backend="cuda"),
           "torch": lambda: torch.nn.functional.layer_norm(x, (hidden,), w, b),
           "eager-reference": lambda: reference.layer_norm(x, w, b)}
    run_op(benchmark, fns[impl])
    benchmark.extra_info["GB/s"] = 2 * x.numel() * 2 / benchmark.stats.stats.median / 1e9
