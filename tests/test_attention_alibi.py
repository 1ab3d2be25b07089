"""ALiBi (BLOOM, MPT; flash-attn's ``alibi_slopes``): −slope·|i + offset − j| added to every scaled score. Output and
gradients against the reference on every backend — slopes per head and per batch and head, with masks, padding, GQA,
either alignment and low precision, the split-KV decoding path, a float mask's gradient through the sum,
flash-attn's function — and bad slopes refused by name. The CUDA kernels generate the bias per score (the general
form: `plain_scores` excludes ALiBi); the Triton kernels read it as a float mask."""

import pytest
import torch
from test_attention import check_against_reference, make_qkv, masks_for
from test_varlen_attention import cu_seqlens, packed

import transformer_kernels as tk
from transformer_kernels import flash_attn_interface as fa
from transformer_kernels import reference
from transformer_kernels.tools.testing import assert_rows, compare

BACKENDS = ["triton", "cuda", "torch"]


def _slopes(*shape):
    # BLOOM's geometric slopes 2^(-8k/H) reach ~0.004: these span that range, so near and far keys both count.
    return torch.rand(shape, generator=torch.Generator().manual_seed(3)) * 0.5 + 0.01


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_batch", [False, True], ids=["[H]", "[B,H]"])
@pytest.mark.parametrize("kind", ["none", "bool+padding+causal", "float+padding+causal_br"])
def test_alibi_matches_the_reference(backend, per_batch, kind):
    b, h, hkv, lq, lk, d = 2, 4, 2, 19, 37, 16
    q, k, v = make_qkv(b, h, hkv, lq, lk, d)
    slopes = _slopes(b, h) if per_batch else _slopes(h)
    kw = masks_for(kind, b, h, lq, lk)
    check_against_reference(backend, q, k, v, enable_gqa=True, alibi_slopes=slopes, **kw)
    # The bias moves the output: a kernel that dropped it would fail the comparison above.
    with tk.use_backend(backend):
        plain = tk.ops.attention(q, k, v, enable_gqa=True, **kw)
        biased = tk.ops.attention(q, k, v, enable_gqa=True, alibi_slopes=slopes, **kw)
    assert (plain - biased).abs().max() > 0.05


def test_the_cuda_kernels_generate_the_bias_and_the_triton_kernels_read_it(monkeypatch):
    # cuda: the slopes reach the kernels and no mask tensor does; triton: a [1, H, Lq, Lk] fp32 bias.
    from transformer_kernels.cuda import attention as cuda_attention
    from transformer_kernels.kernels import attention as triton_attention

    seen = {}
    for name, module in (("cuda", cuda_attention), ("triton", triton_attention)):
        forward = module.attention_forward
        monkeypatch.setattr(module, "attention_forward",
                            lambda *a, _name=name, _f=forward, **kw: seen.setdefault(_name, (a[3], kw)) and _f(*a, **kw))
    q, k, v = make_qkv(2, 4, 4, 6, 9, 16)
    for backend in ("cuda", "triton"):
        tk.ops.attention(q, k, v, alibi_slopes=_slopes(4), backend=backend)
    mask, kw = seen["cuda"]
    assert mask is None and kw["alibi"].shape == (2, 4) and kw["alibi"].stride() == (0, 1)
    mask, kw = seen["triton"]
    assert kw["alibi"] is None and mask.dtype == torch.float32 and mask.shape == (2, 4, 6, 9)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_alibi_low_precision_causal(backend, dtype):
    q, k, v = make_qkv(1, 4, 4, 70, 70, 64, dtype=dtype)
    check_against_reference(backend, q, k, v, is_causal=True, alibi_slopes=_slopes(4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_alibi_on_the_decoding_path(backend):
    # One query against 512 cached keys, bottom-right: the query sits at the last key, far keys get the most bias.
    q, k, v = make_qkv(1, 4, 2, 1, 512, 32)
    slopes = _slopes(4) * 0.05
    expected = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True,
                                                      causal_alignment="bottom_right", alibi_slopes=slopes)
    out = tk.ops.attention(q, k, v, enable_gqa=True, causal_alignment="bottom_right", alibi_slopes=slopes,
                           backend=backend)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_alibi_with_a_learned_float_mask_passes_its_gradient(backend):
    b, h, lq, lk = 1, 2, 9, 13
    q, k, v = make_qkv(b, h, h, lq, lk, 16)
    bias = torch.randn(1, h, lq, lk, generator=torch.Generator().manual_seed(5))
    slopes = _slopes(h)

    def ours(q, k, v, bias):
        return tk.ops.attention(q, k, v, bias, alibi_slopes=slopes, backend=backend)

    def ref(q, k, v, bias):
        return reference.scaled_dot_product_attention(q, k, v, bias, alibi_slopes=slopes)

    assert_rows(compare(ours, ref, {"q": q, "k": k, "v": v, "bias": bias}, grad_of=("q", "k", "v", "bias")), backend)


@pytest.mark.parametrize("backend", ["cuda", "torch"])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_alibi_packed_sequences(backend, alignment):
    # Each sequence's own diagonal and slopes (batch index = sequence), an empty sequence among them.
    lens_q, lens_k = [5, 0, 9, 3], [7, 4, 9, 40]
    q, k, v = (t.requires_grad_() for t in packed(lens_q, lens_k, 4, 2, 16))
    slopes = _slopes(4, 4)
    kw = {"is_causal": True, "causal_alignment": alignment, "enable_gqa": True}

    def ours(q, k, v):
        return tk.ops.varlen_attention(q, k, v, cu_seqlens(lens_q, "cpu"), cu_seqlens(lens_k, "cpu"), max(lens_q),
                                       max(lens_k), alibi_slopes=slopes, backend=backend, **kw)

    def ref(q, k, v):
        rows = []
        for b, ((q0, q1), (k0, k1)) in enumerate(zip(_bounds(lens_q), _bounds(lens_k), strict=True)):
            qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
            if q1 > q0:
                rows.append(reference.scaled_dot_product_attention(qs, ks, vs, alibi_slopes=slopes[b], **kw)[0]
                            .transpose(0, 1))
        return torch.cat(rows)

    assert_rows(compare(ours, ref, {"q": q, "k": k, "v": v}, grad_of=("q", "k", "v")), f"{backend}, {alignment}:")


def _bounds(lens):
    starts = [sum(lens[:i]) for i in range(len(lens))]
    return [(s, s + n) for s, n in zip(starts, lens, strict=True)]


def test_packed_alibi_on_triton_named_raises_and_auto_runs_it():
    lens = [3, 4]
    q, k, v = packed(lens, lens, 2, 2, 16)
    cu = cu_seqlens(lens, "cpu")
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        tk.ops.varlen_attention(q, k, v, cu, cu, 4, 4, alibi_slopes=_slopes(2), backend="triton")
    with tk.use_backend("auto"):
        out = tk.ops.varlen_attention(q, k, v, cu, cu, 4, 4, alibi_slopes=_slopes(2))
    expected = tk.ops.varlen_attention(q, k, v, cu, cu, 4, 4, alibi_slopes=_slopes(2), backend="torch")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_flash_attn_func_takes_alibi_slopes():
    b, lq, lk, h, d = 2, 5, 11, 4, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, generator=g) for n in (lq, lk, lk))
    slopes = _slopes(b, h)
    out = fa.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)
    expected = reference.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True,
                                                      causal_alignment="bottom_right", alibi_slopes=slopes)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_bad_slopes_are_refused():
    q, k, v = make_qkv(2, 4, 4, 3, 5, 8)
    for slopes, match in ((torch.ones(3), r"alibi_slopes must have shape \[H\]"),
                          (torch.ones(4, 2), r"alibi_slopes must have shape"),
                          (torch.ones(4, dtype=torch.int32), "alibi_slopes must have dtype"),
                          (torch.ones(4, requires_grad=True), "get no gradient")):
        with pytest.raises((ValueError, TypeError), match=match):
            tk.ops.attention(q, k, v, alibi_slopes=slopes)
