"""Attention features of today's models. Sinks (gpt-oss): a learnable logit per head in every row's softmax
denominator — output and the gradients of q, k, v and the sinks against the reference on every backend, dense, packed
and on the split-KV decoding path; rows that see nothing; the lse with the sink; bad sinks refused. Soft-capping
(Gemma 2): against the reference on the cuda and torch backends, dense (the plain and the split-KV forward, every
backward pass), packed, with −inf masked scores and a float mask's gradient; the triton backend refuses it by name and
`auto` sends it to one that caps."""

import pytest
import torch
from test_attention import make_qkv, masks_for
from test_attention_lse import reference_lse
from test_varlen_attention import LENS_K, LENS_Q, cu_seqlens, packed, reference_varlen

import transformer_kernels as tk
from transformer_kernels import reference
from transformer_kernels.tools.testing import assert_rows, compare

BACKENDS = ["triton", "cuda", "torch"]
SOFTCAP_BACKENDS = ["cuda", "torch"]


def _sinks(h, dtype=torch.float32, seed=1):
    # Logits of the scores' own size, so the sink takes a real share of some rows and little of others.
    return (torch.randn(h, generator=torch.Generator().manual_seed(seed)) * 2).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["none", "bool+padding+causal", "float+padding+causal_br"])
def test_sinks_match_the_reference(backend, dtype, kind):
    b, h, hkv, lq, lk, d = 2, 4, 2, 19, 37, 16
    q, k, v = make_qkv(b, h, hkv, lq, lk, d, dtype)
    kw = masks_for(kind, b, h, lq, lk)

    def ours(q, k, v, sinks):
        return tk.ops.attention(q, k, v, enable_gqa=True, sinks=sinks, backend=backend, **kw)

    def ref(q, k, v, sinks):
        return reference.scaled_dot_product_attention(q, k, v, enable_gqa=True, sinks=sinks,
                                                      low_precision=q.dtype != torch.float32, **kw)

    inputs = {"q": q, "k": k, "v": v, "sinks": _sinks(h, dtype)}
    assert_rows(compare(ours, ref, inputs, grad_of=("q", "k", "v", "sinks")), f"{dtype}, {backend}, {kind}:")


@pytest.mark.parametrize("backend,softcap", [*((b, None) for b in BACKENDS), *((b, 0.7) for b in SOFTCAP_BACKENDS)])
def test_sinks_packed_sequences(backend, softcap):
    h, hkv, d = 4, 2, 16
    q, k, v = packed(LENS_Q, LENS_K, h, hkv, d)
    cu_q, cu_k = cu_seqlens(LENS_Q, "cpu"), cu_seqlens(LENS_K, "cpu")

    def ours(q, k, v, sinks):
        return tk.ops.varlen_attention(q, k, v, cu_q, cu_k, max(LENS_Q), max(LENS_K), is_causal=True,
                                       causal_alignment="bottom_right", enable_gqa=True, sinks=sinks, softcap=softcap,
                                       backend=backend)

    def ref(q, k, v, sinks):
        return reference_varlen(q, k, v, LENS_Q, LENS_K, is_causal=True, causal_alignment="bottom_right", sinks=sinks,
                                softcap=softcap)

    rows = compare(ours, ref, {"q": q, "k": k, "v": v, "sinks": _sinks(h)}, grad_of=("q", "k", "v", "sinks"))
    assert_rows(rows, f"{backend}, softcap {softcap}:")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_sinks_on_the_split_kv_decoding_path(backend):
    # One query over 512 keys on 2 heads: the plain grid has 2 programs, so the kernels split the keys (the
    # partials are combined before the sinks apply).
    q, k, v = make_qkv(1, 2, 1, 1, 512, 32)
    sinks = _sinks(2)
    out, lse = tk.ops.attention(q, k, v, enable_gqa=True, sinks=sinks, return_lse=True, backend=backend)
    expected = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True,
                                                      sinks=sinks.double())
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), torch.logaddexp(reference_lse(q, k, 32**-0.5), sinks.double()[:, None]),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_that_see_nothing_stay_zero_with_sinks(backend):
    # Row 2 sees no key: zeros out, zero gradients (the sink takes all its weight and carries no value), lse −inf;
    # every other row's lse is logaddexp(its keys' lse, the sink).
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 6, 5, 16))
    sinks = _sinks(2).requires_grad_()
    mask = torch.ones(1, 1, 6, 5, dtype=torch.bool)
    mask[..., 2, :] = False
    out, lse = tk.ops.attention(q, k, v, mask, sinks=sinks, return_lse=True, backend=backend)
    assert (out[..., 2, :] == 0).all() and torch.isneginf(lse[..., 2]).all()
    keys_lse = reference_lse(q.detach(), k.detach(), 16**-0.5, attn_mask=mask)
    rows = [0, 1, 3, 4, 5]
    torch.testing.assert_close(lse[..., rows].double(),
                               torch.logaddexp(keys_lse[..., rows], sinks.detach().double()[:, None]),
                               atol=1e-5, rtol=1e-5)
    grad = torch.zeros_like(out)
    grad[..., 2, :] = 1.0
    dq, dsinks = torch.autograd.grad(out, (q, sinks), grad, retain_graph=True)
    assert (dq == 0).all() and (dsinks == 0).all()
    # With every row's gradient, the sink's comes from the rows that see keys, as the reference's.
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    expected = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), mask, sinks=sinks.double())
    torch.testing.assert_close(torch.autograd.grad(out, sinks, grad)[0].double(),
                               torch.autograd.grad(expected, sinks, grad.double())[0].double(), atol=1e-5, rtol=1e-5)


def test_a_very_negative_sink_changes_nothing():
    q, k, v = make_qkv(1, 2, 2, 7, 9, 16)
    sinks = torch.full((2,), -1e4)
    for backend in ["triton", "cuda"]:
        torch.testing.assert_close(tk.ops.attention(q, k, v, sinks=sinks, backend=backend),
                                   tk.ops.attention(q, k, v, backend=backend), atol=0, rtol=0)


def test_bad_sinks_raise():
    q, k, v = make_qkv(1, 2, 2, 5, 6, 16)
    cases = [
        ({"sinks": torch.zeros(3)}, ValueError, r"sinks must have shape \[H\] = \(2,\)"),
        ({"sinks": torch.zeros(1, 2)}, ValueError, "sinks must have shape"),
        ({"sinks": torch.zeros(2, dtype=torch.long)}, TypeError, "sinks must be a float tensor"),
        ({"sinks": torch.zeros(2, device="meta")}, ValueError, "sinks is on meta"),
    ]
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            tk.ops.attention(q, k, v, backend="triton", **kw)
        with pytest.raises(exc, match=match):
            tk.ops.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                    cu_seqlens([5], "cpu"), cu_seqlens([6], "cpu"), 5, 6, backend="triton", **kw)


@pytest.mark.parametrize("backend", SOFTCAP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["none", "float+padding+causal_br"])
def test_softcap_matches_the_reference(backend, dtype, kind):
    b, h, hkv, lq, lk, d = 2, 4, 2, 19, 37, 16
    q, k, v = make_qkv(b, h, hkv, lq, lk, d, dtype)
    kw = masks_for(kind, b, h, lq, lk)

    def ours(q, k, v):
        return tk.ops.attention(q, k, v, enable_gqa=True, softcap=0.5, backend=backend, **kw)

    def ref(q, k, v):
        return reference.scaled_dot_product_attention(q, k, v, enable_gqa=True, softcap=0.5,
                                                      low_precision=q.dtype != torch.float32, **kw)

    assert_rows(compare(ours, ref, {"q": q, "k": k, "v": v}, grad_of=("q", "k", "v")), f"{dtype}, {kind}:")
    # The cap bends these scores (|s| reaches ~2 against a cap of 0.5): without it the output differs.
    assert (tk.ops.attention(q, k, v, enable_gqa=True, backend=backend, **kw) - ours(q, k, v)).abs().max() > 0.05


def test_softcap_on_the_split_kv_decoding_path():
    # One query over 512 keys: the CUDA forward splits the keys (the partials are capped before they are combined).
    q, k, v = make_qkv(1, 2, 1, 1, 512, 32)
    expected = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True, softcap=0.3)
    out = tk.ops.attention(q, k, v, enable_gqa=True, softcap=0.3, backend="cuda")
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", SOFTCAP_BACKENDS)
def test_softcap_leaves_minus_infinity_masked_scores_hidden(backend):
    # The cap applies to the scaled scores before the mask: −inf entries of a float mask still hide their keys, a row
    # of them gives zeros, and nothing turns NaN. A float mask that requires grad gets dS before the cap's factor.
    q, k, v = make_qkv(1, 2, 2, 6, 9, 16)
    mask = torch.randn(1, 1, 6, 9)
    mask[..., ::2] = float("-inf")
    mask[..., 4, :] = float("-inf")

    def ours(q, k, v, mask):
        return tk.ops.attention(q, k, v, mask, softcap=0.5, backend=backend)

    def ref(q, k, v, mask):
        return reference.scaled_dot_product_attention(q, k, v, mask, softcap=0.5)

    assert_rows(compare(ours, ref, {"q": q, "k": k, "v": v, "mask": mask}, grad_of=("q", "k", "v", "mask")))
    out = ours(q, k, v, mask)
    assert torch.isfinite(out).all() and (out[..., 4, :] == 0).all()


def test_softcap_on_triton_named_raises_and_auto_runs_it():
    q, k, v = make_qkv(1, 2, 2, 5, 6, 16)
    expected = tk.ops.attention(q, k, v, softcap=1.0, backend="torch")
    with tk.use_backend("auto"):  # CPU tensors: auto runs the torch backend
        torch.testing.assert_close(tk.ops.attention(q, k, v, softcap=1.0), expected, atol=0, rtol=0)
    with pytest.raises(NotImplementedError, match="backend 'triton' cannot run attention with softcap"):
        tk.ops.attention(q, k, v, softcap=1.0, backend="triton")
    with pytest.raises(NotImplementedError, match="backend 'triton' cannot run varlen_attention with softcap"):
        tk.ops.varlen_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                cu_seqlens([5], "cpu"), cu_seqlens([6], "cpu"), 5, 6, softcap=1.0, backend="triton")
    for backend in ["triton", "cuda"]:
        # 0 and None mean no cap (flash-attn's 0.0 default), on any backend
        torch.testing.assert_close(tk.ops.attention(q, k, v, softcap=0.0, backend=backend),
                                   tk.ops.attention(q, k, v, backend=backend), atol=0, rtol=0)
    for bad in (-1.0, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="softcap must be a positive float"):
            tk.ops.attention(q, k, v, softcap=bad, backend="torch")
