"""The Triton attention backward: five matrix products by default for fp16/bf16 (dQ added by the dK/dV pass with fp32
atomics), the seven-product two-pass form under torch.use_deterministic_algorithms(True), for fp32 and where no fused
tile compiles without spills; both against the reference and each other. The work is counted exactly by the Triton
interpreter (2·M·N·K per tl.dot)."""

import pytest
import torch
from test_attention import check_against_reference, make_qkv, masks_for
from test_varlen_attention import LENS_K, LENS_Q, cu_seqlens, packed

import transformer_kernels as tk
from transformer_kernels.kernels import attention as triton_attention
from transformer_kernels.tools.testing import count_interpreted_work


@pytest.fixture
def deterministic(request):
    torch.use_deterministic_algorithms(request.param)
    yield request.param
    torch.use_deterministic_algorithms(False)


def _work(fn):
    with count_interpreted_work() as work:
        fn()
    return work


@pytest.mark.parametrize("causal", [False, True])
def test_backward_issues_five_products_and_two_pass_seven(causal):
    # Lq = Lk = 64 and D = 32 fill the interpreter's 32 x 32 tiles: every product is whole, so the counts are exact
    # multiples of the forward's two (QKᵀ, PV) over the same visited tiles.
    b, h, length, d = 1, 2, 64, 32
    assert triton_attention.INTERPRETER_CONFIG.block_m == triton_attention.INTERPRETER_CONFIG.block_n == 32
    q, k, v = (t.requires_grad_() for t in make_qkv(b, h, h, length, length, d, dtype=torch.float16))
    grad = torch.randn(b, h, length, d, dtype=torch.float16)

    def forward():
        return tk.ops.attention(q, k, v, is_causal=causal, backend="triton")

    fwd = _work(forward).matmul_flops
    visited_pairs = 3 if causal else 4  # of the 2 x 2 (query tile, key tile) pairs; causal skips the one above
    assert fwd == 2 * 2 * 32 * 32 * d * visited_pairs * b * h
    out = forward()
    fused = _work(lambda: out.backward(grad, retain_graph=True))
    assert fused.matmul_flops == fwd * 5 // 2
    # dQ: one fp32 atomic add per (visited tile pair, query row, head-dim column)
    assert fused.atomic_elements == visited_pairs * 32 * d * b * h
    torch.use_deterministic_algorithms(True)
    try:
        two_pass = _work(lambda: out.backward(grad))
    finally:
        torch.use_deterministic_algorithms(False)
    assert two_pass.matmul_flops == fwd * 7 // 2 and two_pass.atomic_elements == 0


@pytest.mark.parametrize("deterministic", [False, True], indirect=True, ids=["fused", "two-pass"])
@pytest.mark.parametrize("kind", ["none", "bool+padding+causal", "float+padding+causal_br"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_both_backward_forms_match_the_reference(deterministic, kind, dtype):
    q, k, v = make_qkv(2, 4, 2, 37, 45, 24, dtype=dtype)
    check_against_reference("triton", q, k, v, enable_gqa=True, **masks_for(kind, 2, 4, 37, 45))


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "packed"])
def test_both_backward_forms_agree_with_dropout(varlen):
    # The same seed draws the same keep-mask: the two forms then differ only in dQ's summation order.
    if varlen:
        q, k, v = packed(LENS_Q, LENS_K, 4, 2, 16, dtype=torch.float16)
        cu_q, cu_k = cu_seqlens(LENS_Q, "cpu"), cu_seqlens(LENS_K, "cpu")

        def call(q, k, v):
            return tk.ops.varlen_attention(q, k, v, cu_q, cu_k, max(LENS_Q), max(LENS_K), dropout_p=0.3,
                                           is_causal=True, enable_gqa=True, backend="triton")
    else:
        q, k, v = make_qkv(2, 4, 2, 33, 40, 16, dtype=torch.float16)

        def call(q, k, v):
            return tk.ops.attention(q, k, v, dropout_p=0.3, is_causal=True, enable_gqa=True, backend="triton",
                                    **masks_for("bool", 2, 4, 33, 40))

    grads = []
    for det in (False, True):
        torch.use_deterministic_algorithms(det)
        try:
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            torch.manual_seed(7)
            out = call(qq, kk, vv)
            out.backward(torch.ones_like(out))
        finally:
            torch.use_deterministic_algorithms(False)
        grads.append((out, qq.grad, kk.grad, vv.grad))
    # fp16 outputs: one rounding of a sum whose order differs (fp32 accumulation on both sides)
    for fused, two_pass in zip(*grads, strict=True):
        torch.testing.assert_close(fused, two_pass, atol=2e-3, rtol=2e-3)
    assert grads[0][1].abs().sum() > 0


def test_which_classes_fuse_dq():
    # fp32 runs two passes; fp16/bf16 autotune over the class's tiles that compiled without spills, and a class whose
    # every fused tile spilled runs two passes (every tile listed here is in the AOT variants the resource test
    # compiles, so a new spill fails there).
    tiles = triton_attention.fused_dq_tiles
    assert tiles(64, 4, "plain", False, False) == ()
    assert tiles(64, 2, "plain", False, False) == (triton_attention.TileConfig(32, 32, 8, 2),)
    assert tiles(32, 2, "all", False, False) == ()
    assert tiles(128, 2, "all", False, False) == tuple(triton_attention.PASSES["dkdv"][("all", 2, 128)])
