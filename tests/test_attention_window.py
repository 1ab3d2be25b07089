"""Sliding windows in the kernels (`window=(left, right)`, Mistral's / Gemma's / flash-attn's ``window_size``): output
and gradients against the reference on every backend — dense with masks, padding, GQA and either alignment, packed,
the split-KV decoding path and a float mask's gradient — windows narrower than a tile, rows that see nothing, bad
windows refused; and, counted exactly by the Triton interpreter, that the kernels visit only the key tiles some row's
window reaches (forward, the fused and the two-pass backward, the split-KV forward)."""

import pytest
import torch
from test_attention import check_against_reference, make_qkv, masks_for
from test_varlen_attention import LENS_K, LENS_Q, check_varlen

import transformer_kernels as tk
from transformer_kernels import reference
from transformer_kernels.kernels import attention as triton_attention
from transformer_kernels.tools.testing import count_interpreted_work

BACKENDS = ["triton", "cuda", "torch"]
# (left, right): narrower than a tile, one side unbounded, two keys, wider than the keys (the diagonal alone:
# `test_a_window_of_the_diagonal_alone`).
WINDOWS = [(5, 3), (-1, 4), (9, -1), (1, 0), (100, 100)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("kind", ["none", "causal", "bool+padding", "float+padding+causal_br"])
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


@pytest.mark.parametrize("backend", BACKENDS)
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
    assert torch.equal(tk.ops.attention(q, k, v, is_causal=True, window=(-1, 5), backend="triton"),
                       tk.ops.attention(q, k, v, is_causal=True, backend="triton"))
    for bad in [(-2, 0), (1,), "ab", (True, 0), (1.5, 2), (0, None)]:
        with pytest.raises(ValueError, match="window"):
            tk.ops.attention(q, k, v, window=bad)


def _pairs(lq: int, lk: int, window: tuple[int, int], causal: bool, alignment: str, tile: int) -> int:
    """(query tile, key tile) pairs holding a visible score, from the reference's masks: the tiles a kernel that
    skips everything outside the windows visits."""
    keep = reference.window_mask(lq, lk, window, alignment)
    if causal:
        keep = keep & reference.causal_mask(lq, lk, alignment)
    tiles = keep.reshape(lq // tile, tile, lk // tile, tile).any(dim=3).any(dim=1)
    return int(tiles.sum())


@pytest.mark.parametrize("window,causal,alignment", [((48, 0), True, "top_left"), ((40, 24), False, "top_left"),
                                                     ((0, 0), False, "bottom_right"), ((-1, 20), False, "top_left")],
                         ids=str)
def test_only_tiles_inside_the_window_are_visited(window, causal, alignment):
    # 32 x 32 interpreter tiles, D = 32: every product is whole, so the work is 2·2·32·32·D per visited pair in the
    # forward (QKᵀ, PV), 5/2 of that in the fused backward and 7/2 in the two-pass one — a kernel that loaded a
    # tile outside every row's window would count more.
    b, h, lq, lk, d, tile = 1, 2, 192, 256, 32, triton_attention.INTERPRETER_CONFIG.block_m
    assert triton_attention.INTERPRETER_CONFIG.block_n == tile == 32
    pairs = _pairs(lq, lk, window, causal, alignment, tile)
    assert pairs <= (lq // tile) * (lk // tile) * 3 // 4
    q, k, v = (t.requires_grad_() for t in make_qkv(b, h, h, lq, lk, d, dtype=torch.float16))
    kw = {"is_causal": causal, "causal_alignment": alignment, "window": window, "backend": "triton"}
    with count_interpreted_work() as forward:
        out = tk.ops.attention(q, k, v, **kw)
    assert forward.matmul_flops == 2 * 2 * tile * tile * d * pairs * b * h
    grad = torch.randn_like(out)
    with count_interpreted_work() as fused:
        out.backward(grad, retain_graph=True)
    assert fused.matmul_flops == forward.matmul_flops * 5 // 2
    torch.use_deterministic_algorithms(True)
    try:
        with count_interpreted_work() as two_pass:
            out.backward(grad)
    finally:
        torch.use_deterministic_algorithms(False)
    assert two_pass.matmul_flops == forward.matmul_flops * 7 // 2


def test_split_kv_decoding_visits_only_the_window():
    # The split-KV forward (1 query row of a 32-row interpreter tile) over 4096 keys: a 100-key window ending at the
    # last key touches keys 3995..4095, i.e. 4 key tiles (3968.., 4000.., 4032.., 4064..) per head.
    q, k, v = make_qkv(1, 2, 2, 1, 4096, 32, dtype=torch.float16)
    with count_interpreted_work() as work:
        tk.ops.attention(q, k, v, is_causal=True, causal_alignment="bottom_right", window=(100, -1), backend="triton")
    assert work.matmul_flops == 2 * 2 * 32 * 32 * 32 * 4 * 2
