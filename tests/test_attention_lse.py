"""`return_lse=True` and `merge_attention`: the rows' log-sum-exp against the reference's on every backend, −inf for
a row that sees nothing, and attention over two disjoint key sets merged exactly into attention over both."""

import pytest
import torch
from test_attention import make_qkv, masks_for
from test_varlen_attention import LENS_K, LENS_Q, cu_seqlens, packed

import transformer_kernels as tk
from transformer_kernels import reference

BACKENDS = ["triton", "cuda", "torch"]


def reference_lse(q, k, scale, attn_mask=None, key_padding_mask=None, is_causal=False, causal_alignment="top_left",
                  window=None):
    """log Σ exp(s) over the visible keys, in fp64 from the reference's scores."""
    b, h, lq, _ = q.shape
    kk = k.double().repeat_interleave(h // k.shape[1], dim=1)
    s = q.double() @ kk.transpose(-2, -1) * scale
    visible = torch.ones(b, h, lq, k.shape[2], dtype=torch.bool)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    elif attn_mask is not None:
        s = s + attn_mask.double()
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[:, None, None, :]
    if is_causal:
        offset = k.shape[2] - lq if causal_alignment == "bottom_right" else 0
        visible = visible & (torch.arange(k.shape[2])[None, :] <= torch.arange(lq)[:, None] + offset)
    if window is not None:
        visible = visible & reference.window_mask(lq, k.shape[2], window, causal_alignment)
    return torch.logsumexp(s.masked_fill(~visible, float("-inf")), -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["none", "float+padding+causal_br", "bool+padding+causal"])
def test_lse_matches_the_reference(backend, kind):
    b, h, hkv, lq, lk, d = 2, 4, 2, 19, 37, 16
    q, k, v = make_qkv(b, h, hkv, lq, lk, d)
    kw = masks_for(kind, b, h, lq, lk)
    out, lse = tk.ops.attention(q, k, v, enable_gqa=True, return_lse=True, backend=backend, **kw)
    expected = reference_lse(q, k, d**-0.5, **kw)
    assert lse.dtype == torch.float32 and lse.shape == (b, h, lq) and not lse.requires_grad
    assert torch.equal(torch.isneginf(lse), torch.isneginf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(lse[finite].double(), expected[finite], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, tk.ops.attention(q, k, v, enable_gqa=True, backend=backend, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_row_that_sees_nothing_has_lse_minus_infinity(backend):
    q, k, v = make_qkv(1, 2, 2, 6, 5, 16)
    mask = torch.ones(1, 1, 6, 5, dtype=torch.bool)
    mask[..., 2, :] = False
    out, lse = tk.ops.attention(q, k, v, mask, return_lse=True, backend=backend)
    assert torch.isneginf(lse[..., 2]).all() and torch.isfinite(lse[..., [0, 1, 3, 4, 5]]).all()
    assert (out[..., 2, :] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merging_two_key_sets_gives_attention_over_both(backend, dtype):
    # Keys split at 40 of 50: bottom-right causal, query i sees keys j <= i + 38, so queries 0 and 1 see nothing in
    # the second set; a padding mask makes the batch rows differ.
    b, h, lq, lk, split, d = 2, 3, 12, 50, 40, 32
    q, k, v = make_qkv(b, h, h, lq, lk, d, dtype=dtype)
    kpm = torch.zeros(b, lk, dtype=torch.bool)
    kpm[1, 5:9] = True
    kw = {"is_causal": True, "causal_alignment": "bottom_right"}
    whole = tk.ops.attention(q, k, v, key_padding_mask=kpm, backend=backend, **kw)
    keep = (torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + lk - lq) & ~kpm[:, None, None, :]  # as `whole`
    part1 = tk.ops.attention(q, k[:, :, :split], v[:, :, :split], keep[..., :split], return_lse=True, backend=backend)
    part2 = tk.ops.attention(q, k[:, :, split:], v[:, :, split:], keep[..., split:], return_lse=True, backend=backend)
    merged, lse = tk.ops.merge_attention(*part1, *part2)
    _, whole_lse = tk.ops.attention(q, k, v, key_padding_mask=kpm, return_lse=True, backend=backend, **kw)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(merged.float(), whole.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, whole_lse, atol=1e-4, rtol=1e-4)
    # rows that saw nothing in part 2 took part 1's output unchanged
    assert torch.isneginf(part2[1][..., :2]).all() and torch.isfinite(part2[1][..., 2:]).all()


def test_merge_of_two_empty_rows_gives_zeros_and_minus_infinity():
    out = torch.randn(2, 3, 4)
    lse = torch.full((2, 3), float("-inf"))
    merged, merged_lse = tk.ops.merge_attention(out, lse, out, lse)
    assert (merged == 0).all() and torch.isneginf(merged_lse).all()
    with pytest.raises(ValueError, match="merge_attention"):
        tk.ops.merge_attention(out, lse, out[:1], lse[:1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_lse_matches_each_sequence_alone(backend):
    h, hkv, d = 4, 2, 16
    q, k, v = packed(LENS_Q, LENS_K, h, hkv, d)
    _, lse = tk.ops.varlen_attention(q, k, v, cu_seqlens(LENS_Q, "cpu"), cu_seqlens(LENS_K, "cpu"), max(LENS_Q),
                                     max(LENS_K), is_causal=True, causal_alignment="bottom_right", enable_gqa=True,
                                     return_lse=True, backend=backend)
    assert lse.shape == (sum(LENS_Q), h) and lse.dtype == torch.float32
    q0 = k0 = 0
    for lq, lk in zip(LENS_Q, LENS_K, strict=True):
        qs, ks = q[q0:q0 + lq].transpose(0, 1)[None], k[k0:k0 + lk].transpose(0, 1)[None]
        expected = reference_lse(qs, ks, d**-0.5, is_causal=True, causal_alignment="bottom_right")[0].T
        got = lse[q0:q0 + lq]
        assert torch.equal(torch.isneginf(got), torch.isneginf(expected)), (lq, lk)
        finite = torch.isfinite(expected)
        torch.testing.assert_close(got[finite].double(), expected[finite], atol=1e-5, rtol=1e-5)
        q0, k0 = q0 + lq, k0 + lk
