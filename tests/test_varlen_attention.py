"""varlen_attention (packed variable-length sequences) on every backend against the reference run sequence by
sequence: causal alignments, GQA, empty sequences on either side, dropout with the kernels' own draw, the custom op's
registration, and the argument checks."""

import itertools
import math

import pytest
import torch

import transformer_kernels as tk
from transformer_kernels import reference
from transformer_kernels.ops.attention import draw_seed
from transformer_kernels.tools import testing
from transformer_kernels.tools.testing import assert_rows, compare

BACKENDS = ["triton", "cuda", "torch"]
KERNEL_BACKENDS = ["triton", "cuda"]
# Lengths with a query side and a key side of 0, a single query, and sequences longer than one 32-row tile.
LENS_Q = [5, 0, 17, 1, 40]
LENS_K = [7, 4, 0, 19, 33]


def cu_seqlens(lens: list[int], device) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)


def packed(lens_q, lens_k, h, hkv, d, dtype=torch.float32, device="cpu", seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), h, d, generator=g)
    k = torch.randn(sum(lens_k), hkv, d, generator=g)
    v = torch.randn(sum(lens_k), hkv, dv or d, generator=g)
    return [t.to(dtype).to(device) for t in (q, k, v)]


def reference_varlen(q, k, v, lens_q, lens_k, keep=None, **kw):
    return reference.varlen_attention(q, k, v, cu_seqlens(lens_q, "cpu"), cu_seqlens(lens_k, "cpu"), dropout_mask=keep,
                                      low_precision=q.dtype != torch.float32, **kw)


def check_varlen(backend, lens_q, lens_k, h, hkv, d, dtype, device, dv=None, **kw):
    q, k, v = packed(lens_q, lens_k, h, hkv, d, dtype, device, dv=dv)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)

    def ours(q, k, v):
        return tk.ops.varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), enable_gqa=h != hkv,
                                       backend=backend, **kw)

    def ref(q, k, v):
        return reference_varlen(q, k, v, lens_q, lens_k, **kw)

    assert_rows(compare(ours, ref, {"q": q, "k": k, "v": v}, grad_of=("q", "k", "v")), f"{dtype}, {backend}:")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"])
def test_varlen_matches_each_sequence_alone(backend, causal, device):
    kw = {} if causal is None else {"is_causal": True, "causal_alignment": causal}
    check_varlen(backend, LENS_Q, LENS_K, 4, 2, 24, torch.float32, device, **kw)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
def test_varlen_low_precision(backend, dtype, d, device):
    check_varlen(backend, [9, 33, 2], [9, 33, 30], 2, 1, d, dtype, device, is_causal=True,
                 causal_alignment="bottom_right")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("d,dv", [(40, 16), (16, 56)])
def test_varlen_value_head_dim_other_than_the_querys(backend, d, dv, device):
    check_varlen(backend, LENS_Q, LENS_K, 4, 2, d, torch.float32, device, dv=dv, is_causal=True,
                 causal_alignment="bottom_right")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_varlen_dropout_matches_reference_with_the_kernels_draw(backend, device):
    lens_q, lens_k, h, p = [6, 0, 21], [11, 3, 21], 2, 0.3
    q, k, v = packed(lens_q, lens_k, h, h, 16, device=device)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    torch.manual_seed(5)
    keep = testing.dropout_keep_mask(draw_seed(device), (1, 1, q.shape[0] * h, max(lens_k)), p, device)[0, 0]

    def ours(q, k, v):
        torch.manual_seed(5)
        return tk.ops.varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), dropout_p=p, is_causal=True,
                                       backend=backend)

    def ref(q, k, v):
        return reference_varlen(q, k, v, lens_q, lens_k, keep=keep, dropout_p=p, is_causal=True)

    assert_rows(compare(ours, ref, {"q": q, "k": k, "v": v}, grad_of=("q", "k", "v")), f"{backend}:")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_varlen_equals_the_padded_batch(backend, device):
    # The same sequences right-padded into [B, H, L, D] with a key padding mask give the same rows (the padded query
    # rows of the dense call are dropped).
    lens, h, d = [13, 4, 20], 2, 32
    q, k, v = packed(lens, lens, h, h, d, device=device)
    cu = cu_seqlens(lens, device)
    out = tk.ops.varlen_attention(q, k, v, cu, cu, max(lens), max(lens), is_causal=True, backend=backend)
    dense = torch.zeros(3, max(lens), 3, h, d, device=device)
    for b, (s, e) in enumerate(itertools.pairwise(cu.tolist())):
        for i, t in enumerate((q, k, v)):
            dense[b, :e - s, i] = t[s:e]
    kpm = torch.arange(max(lens), device=device)[None, :] >= torch.tensor(lens, device=device)[:, None]
    dq, dk, dv = (dense[:, :, i].transpose(1, 2) for i in range(3))
    ref = tk.ops.attention(dq, dk, dv, is_causal=True, key_padding_mask=kpm, backend=backend).transpose(1, 2)
    torch.testing.assert_close(out, torch.cat([ref[b, :n] for b, n in enumerate(lens)]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_varlen_opcheck(backend, device):
    lens_q, lens_k = [3, 0, 5], [4, 2, 6]
    q, k, v = (t.requires_grad_() for t in packed(lens_q, lens_k, 2, 1, 16, device=device))
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    scale = 1 / math.sqrt(16)
    for args in [
        (q, k, v, cu_q, cu_k, 5, 6, None, None, 0.0, False, scale, 0.0, -1, -1, False, None, backend),
        (q, k, v, cu_q, cu_k, 5, 6, None, None, 0.2, True, scale, 0.0, -1, -1, True, torch.tensor([3], device=device),
         backend),
        (q, k, v, cu_q, cu_k, 5, 6, torch.randn(2, device=device, requires_grad=True), None, 0.0, True, scale,
         0.5 if backend == "cuda" else 0.0, -1, -1, True, None, backend),
        # a sliding window, and ALiBi's slopes [B, H] of the three sequences
        *([(q, k, v, cu_q, cu_k, 5, 6, None, None, 0.0, False, scale, 0.0, 1, 2, True, None, backend),
           (q, k, v, cu_q, cu_k, 5, 6, None, torch.rand(3, 2, device=device), 0.0, True, scale, 0.0, -1, -1, True, None,
            backend)] if backend == "cuda" else []),
    ]:
        torch.library.opcheck(torch.ops.transformer_kernels.varlen_attention.default, args)


def test_varlen_rejects_bad_arguments():
    q, k, v = packed([3, 4], [3, 4], 2, 2, 8)
    good = cu_seqlens([3, 4], "cpu")
    cases = [
        (ValueError, "must be 0", dict(cu_seqlens_q=torch.tensor([1, 3, 7], dtype=torch.int32))),
        (ValueError, "must equal the rows", dict(cu_seqlens_k=torch.tensor([0, 3, 6], dtype=torch.int32))),
        (ValueError, "non-decreasing", dict(cu_seqlens_q=torch.tensor([0, 5, 3, 7], dtype=torch.int32),
                                            cu_seqlens_k=torch.tensor([0, 3, 3, 7], dtype=torch.int32))),
        (ValueError, "B \\+ 1 entries", dict(cu_seqlens_k=torch.tensor([0, 7], dtype=torch.int32))),
        (ValueError, "B \\+ 1 entries", dict(cu_seqlens_q=good[:0], cu_seqlens_k=good[:0])),
        (TypeError, "int32", dict(cu_seqlens_q=good.float())),
        (ValueError, "longer than its max_seqlen", dict(max_seqlen_q=3)),
        (TypeError, "Python int", dict(max_seqlen_k=torch.tensor(4))),
        (ValueError, "3-D", dict(q=q[None])),
        (ValueError, "enable_gqa", dict(k=k[:, :1], v=v[:, :1])),
    ]
    for error, message, change in cases:
        kw = dict(q=q, k=k, v=v, cu_seqlens_q=good, cu_seqlens_k=good, max_seqlen_q=4, max_seqlen_k=4) | change
        with pytest.raises(error, match=message):
            tk.ops.varlen_attention(**kw, backend="torch")
    # int64 cu_seqlens are accepted.
    out = tk.ops.varlen_attention(q, k, v, good.long(), good.long(), 4, 4, backend="torch")
    assert out.shape == q.shape
