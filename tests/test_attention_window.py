"""Sliding windows (`window=(left, right)`, Mistral's / Gemma's / flash-attn's ``window_size``): output and gradients
against the reference on every backend — dense with masks, padding, GQA and either alignment, packed, the split-KV
decoding path and a float mask's gradient — windows narrower than a tile, rows that see nothing, bad windows refused.
The CUDA kernels take the window as a key band (tiles outside it skipped); the Triton kernels get it folded into the
mask, and a packed window, which has no mask to fold into, is refused by a named triton backend and sent by `auto` to
one that takes it."""

import pytest
import torch
from test_attention import check_against_reference, make_qkv, masks_for
from test_varlen_attention import LENS_K, LENS_Q, check_varlen

import transformer_kernels as tk
from transformer_kernels import reference

BACKENDS = ["triton", "cuda", "torch"]
# (left, right): narrower than a tile, one side unbounded, two keys, wider than the keys (the diagonal alone:
# `test_a_window_of_the_diagonal_alone`).
WINDOWS = [(5, 3), (-1, 4), (9, -1), (1, 0), (100, 100)]


# Every window on the backends that take one (cuda in its kernels, torch); two on triton, which folds it into the mask.
# Plain causal is "float+padding+causal_br" without its masks, top-left: the masks and the other alignment cover it.
WINDOW_CASES = [(b, w) for b in ("cuda", "torch") for w in WINDOWS] + [("triton", (5, 3)), ("triton", (9, -1))]


@pytest.mark.parametrize("backend,window", WINDOW_CASES, ids=str)
@pytest.mark.parametrize("kind", ["none", "bool+padding", "float+padding+causal_br"])
def test_window_matches_the_reference(backend, window, kind):
    masks = {"bool+padding": {**masks_for("bool", 2, 4, 37, 45), **masks_for("padding", 2, 4, 37, 45)}}.get(kind) \
        or masks_for(kind, 2, 4, 37, 45)
    q, k, v = make_qkv(2, 4, 2, 37, 45, 24)
    check_against_reference(backend, q, k, v, enable_gqa=True, window=window, **masks)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_window_low_precision(backend, dtype):
    q, k, v = make_qkv(1, 2, 1, 70, 70, 64, dtype=dtype)
    check_against_reference(backend, q, k, v, enable_gqa=True, is_causal=True, window=(16, -1))


@pytest.mark.parametrize("backend", ["cuda", "torch"])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_window_packed_sequences(backend, alignment):
    check_varlen(backend, LENS_Q, LENS_K, 4, 2, 16, torch.float32, "cpu", window=(6, 2), causal_alignment=alignment)
    check_varlen(backend, LENS_Q, LENS_K, 2, 2, 16, torch.float32, "cpu", window=(3, -1), is_causal=True,
                 causal_alignment=alignment)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_window_float_mask_gradient(backend):
    # dS outside every row's window is written as zeros (the passes never visit those tiles).
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 40, 50, 16))
    bias = torch.randn(1, 2, 40, 50, generator=torch.Generator().manual_seed(2)).requires_grad_()
    kw = {"window": (7, 2), "causal_alignment": "bottom_right"}
    out = tk.ops.attention(q, k, v, bias, backend=backend, **kw)
    expected = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), bias.double(), **kw)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    ours = torch.autograd.grad(out, (q, k, v, bias), grad)
    theirs = torch.autograd.grad(expected, (q, k, v, bias), grad.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5)
    outside = ~reference.window_mask(40, 50, (7, 2), "bottom_right")
    assert (ours[3][..., outside] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_on_the_split_kv_decoding_path(backend):
    # One query over 2048 keys, 2 heads: the kernels split the keys; a 100-key window reaches 4 of the 64 key tiles.
    q, k, v = make_qkv(1, 2, 1, 1, 2048, 32)
    kw = {"enable_gqa": True, "is_causal": True, "causal_alignment": "bottom_right", "window": (100, -1)}
    out, lse = tk.ops.attention(q, k, v, return_lse=True, backend=backend, **kw)
    torch.testing.assert_close(out.double(), reference.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                                                   **kw), atol=2e-6, rtol=1e-5)
    scores = (q.double() @ k.double().transpose(-1, -2))[..., -101:] * 32**-0.5
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_window_of_the_diagonal_alone(backend):
    # Each row sees one key: out = v there, dv = dO, and dq = dk = 0 in exact arithmetic — in fp32 they are
    # dS = P·(dP − delta) with dP = dO·v and delta = dO·out the same dot product summed in two orders (the kernels'
    # and FlashAttention's backward), so they come out at the rounding of |dO·v| (~1e-6), not at 0.
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 37, 37, 24))
    out = tk.ops.attention(q, k, v, window=(0, 0), backend=backend)
    torch.testing.assert_close(out, v.detach(), atol=1e-6, rtol=1e-6)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    torch.testing.assert_close(dv, grad, atol=1e-6, rtol=1e-6)  # P = 1 within an ulp
    assert dq.abs().max() < 2e-5 and dk.abs().max() < 2e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_outside_every_window_give_zeros(backend):
    # Top-left, 40 queries over 8 keys, 2 keys back from the diagonal: rows 10.. see no key.
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 40, 8, 16))
    out, lse = tk.ops.attention(q, k, v, is_causal=True, window=(2, -1), return_lse=True, backend=backend)
    assert (out[..., 10:, :] == 0).all() and torch.isneginf(lse[..., 10:]).all()
    grad = torch.zeros_like(out)
    grad[..., 10:, :] = 1.0
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


def test_unbounded_window_is_no_window_and_bad_windows_raise():
    q, k, v = make_qkv(1, 2, 2, 9, 9, 16)
    assert torch.equal(tk.ops.attention(q, k, v, window=(-1, -1), backend="triton"),
                       tk.ops.attention(q, k, v, backend="triton"))
    torch.testing.assert_close(tk.ops.attention(q, k, v, is_causal=True, window=(-1, 5), backend="triton"),
                               tk.ops.attention(q, k, v, is_causal=True, backend="triton"), atol=1e-6, rtol=1e-6)
    for bad in [(-2, 0), (1,), "ab", (True, 0), (1.5, 2), (0, None)]:
        with pytest.raises(ValueError, match="window"):
            tk.ops.attention(q, k, v, window=bad)


def test_packed_windows_need_kernels_that_take_them():
    # Packed sequences have no mask to fold a window into: triton named refuses by name, `auto` runs a backend that
    # takes the window (the torch backend on CPU tensors), with the reference's result.
    cu = torch.tensor([0, 5, 14], dtype=torch.int32)
    q = torch.randn(14, 2, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(NotImplementedError, match="window"):
        tk.ops.varlen_attention(q, q, q, cu, cu, 9, 9, window=(2, 0), backend="triton")
    out = tk.ops.varlen_attention(q, q, q, cu, cu, 9, 9, window=(2, 0), backend="auto")
    expected = reference.varlen_attention(q, q, q, cu, cu, window=(2, 0))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
