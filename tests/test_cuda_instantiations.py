"""Every instantiation of the CUDA C++ kernel templates runs at least once against the reference, forward and
backward: each element type with each mask kind in both softmax kernels, each element type with each padded head
dim in attention. `make coverage` found instantiations no other test reached (their lines showed uncovered)."""

import pytest
import torch

import transformer_kernels as tk
from transformer_kernels import reference
from transformer_kernels.cuda import attention as cuda_attention
from transformer_kernels.tools import testing
from transformer_kernels.tools.testing import assert_rows, compare

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MASKS = ["none", "bool", "same dtype", "fp32"]
# Head dims that pad to each instantiated block (16, 32, 64, 128, 256), up to each dtype's widest.
ATTENTION_CASES = [(dtype, d) for dtype in DTYPES for d in (8, 32, 40, 100, 128, 200)
                   if d <= cuda_attention.max_head_dim(dtype, torch.device("cpu"))]


@pytest.mark.parametrize("algo", ["warp", "block"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_softmax_instantiation(algo, mask_kind, dtype, device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 37, generator=g).to(dtype).to(device)
    m = torch.randn(5, 37, generator=g)
    mask = {"none": None, "bool": m > -0.5, "same dtype": m.to(dtype), "fp32": m}[mask_kind]
    mask = None if mask is None else mask.to(device)

    def ours(x):
        with testing.force_softmax_algo(algo):
            return tk.ops.masked_softmax(x, mask, 0.5, True, backend="cuda")

    def ref(x):
        mk = mask if mask is None or mask.dtype == torch.bool else mask.to(x.dtype)
        return reference.masked_softmax(x, mk, 0.5, True)

    assert_rows(compare(ours, ref, {"x": x}, grad_of=("x",)))


@pytest.mark.parametrize(("dtype", "head_dim"), ATTENTION_CASES, ids=str)
def test_every_attention_instantiation(dtype, head_dim, device):
    g = torch.Generator().manual_seed(head_dim)
    q = torch.randn(1, 2, 19, head_dim, generator=g).to(dtype).to(device)
    k, v = (torch.randn(1, 1, 23, head_dim, generator=g).to(dtype).to(device) for _ in range(2))
    bias = torch.randn(19, 23, generator=g).to(dtype).to(device)
    kw = {"attn_mask": bias, "is_causal": True, "causal_alignment": "bottom_right", "enable_gqa": True}

    def ours(q, k, v):
        return tk.ops.attention(q, k, v, **kw, backend="cuda")

    def ref(q, k, v):
        return reference.scaled_dot_product_attention(q, k, v, **{**kw, "attn_mask": bias.to(q.dtype)},
                                                      low_precision=q.dtype != torch.float32)

    assert_rows(compare(ours, ref, {"q": q, "k": k, "v": v}, grad_of=("q", "k", "v")))
