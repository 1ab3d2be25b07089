"""Host-side cost of each op wrapper per call (argument checks, backend resolution, custom-op dispatch), measured
on the CPU with tiny tensors: the same call through `transformer_kernels.ops` on the torch backend and straight
into the reference math. The difference is what the wrapper adds to every call on any device."""

import pytest
import torch

import transformer_kernels as tk
from transformer_kernels import reference

q = k = v = torch.randn(1, 1, 4, 8)
x, w, b = torch.randn(4, 8), torch.randn(8, 8), torch.randn(8)

CALLS = {
    "attention": (lambda: tk.ops.attention(q, k, v, is_causal=True, backend="torch"),
                  lambda: reference.scaled_dot_product_attention(q, k, v, is_causal=True)),
    "linear": (lambda: tk.ops.linear(x, w, b, "gelu", backend="torch"), lambda: reference.linear(x, w, b, "gelu")),
    "layer_norm": (lambda: tk.ops.layer_norm(x, w[0], b, backend="torch"), lambda: reference.layer_norm(x, w[0], b)),
    "masked_softmax": (lambda: tk.ops.masked_softmax(x, None, 0.5, backend="torch"),
                       lambda: reference.masked_softmax(x, None, 0.5)),
}


@pytest.mark.parametrize("path", ["wrapper", "reference"])
@pytest.mark.parametrize("op", list(CALLS))
def bench_host_overhead(benchmark, op, path):
    fn = CALLS[op][0 if path == "wrapper" else 1]
    benchmark(fn)
