"""transformer_kernels.flash_attn_interface against the reference: flash-attn's layouts and semantics (bottom-right
causal, sliding windows, GQA, packed sequences) and the KV-cache call (in-place append, paged cache, rotary)."""

import pytest
import torch

from transformer_kernels import flash_attn_interface as fa
from transformer_kernels import reference
from transformer_kernels.tools.testing import assert_rows, compare

BACKENDS = ["triton", "cuda", "torch"]
KERNEL_BACKENDS = ["triton", "cuda"]


def window_keep(lq: int, lens: list[int], lk: int, causal: bool, left: int, right: int) -> torch.Tensor:
    """flash-attn's rule written out element by element: query i of a row whose keys number n sees key j iff j < n,
    and with d = i + n - lq: j <= d if causal, d - left <= j <= d + right for a window (-1: unbounded)."""
    keep = torch.zeros(len(lens), 1, lq, lk, dtype=torch.bool)
    for b, n in enumerate(lens):
        for i in range(lq):
            for j in range(lk):
                d = i + n - lq
                ok = j < n and (not causal or j <= d)
                ok = ok and (left < 0 or j >= d - left) and (right < 0 or j <= d + right)
                keep[b, 0, i, j] = ok
    return keep


def ref_blhd(q, k, v, mask=None, causal=False, **kw):
    """The reference on [B, L, H, D] tensors, bottom-right causal."""
    out = reference.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                                                 is_causal=causal, causal_alignment="bottom_right",
                                                 enable_gqa=q.shape[2] != k.shape[2],
                                                 low_precision=q.dtype != torch.float32, **kw)
    return out.transpose(1, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lq,lk,causal,window", [(7, 19, True, (-1, -1)), (19, 7, True, (-1, -1)),
                                                 (13, 13, False, (3, 2)), (9, 21, True, (4, -1))])
def test_flash_attn_func(backend, lq, lk, causal, window, device):
    g = torch.Generator().manual_seed(lq * lk)
    q = torch.randn(2, lq, 4, 32, generator=g).to(device)
    k, v = (torch.randn(2, lk, 2, 32, generator=g).to(device) for _ in range(2))
    mask = None if window == (-1, -1) else window_keep(lq, [lk, lk], lk, causal, *window).to(device)

    def ours(q, k, v):
        return fa.flash_attn_func(q, k, v, causal=causal, window_size=window, softmax_scale=0.3, backend=backend)

    def ref(q, k, v):
        return ref_blhd(q, k, v, mask, causal and mask is None, scale=0.3)

    assert_rows(compare(ours, ref, {"q": q, "k": k, "v": v}, grad_of=("q", "k", "v")), f"{backend} {lq}x{lk}")


@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_flash_attn_func_softcap_with_a_window(backend, device):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 9, 4, 32, generator=g).to(device)
    k, v = (torch.randn(2, 21, 2, 32, generator=g).to(device) for _ in range(2))
    mask = window_keep(9, [21, 21], 21, True, 4, -1).to(device)

    def ours(q, k, v):
        return fa.flash_attn_func(q, k, v, causal=True, window_size=(4, -1), softcap=0.5, backend=backend)

    def ref(q, k, v):
        return ref_blhd(q, k, v, mask, softcap=0.5)

    assert_rows(compare(ours, ref, {"q": q, "k": k, "v": v}, grad_of=("q", "k", "v")), backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_packed_forms_equal_the_unpacked(backend, device):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 9, 3, 2, 16, generator=g).to(device)
    q, k, v = qkv.unbind(2)
    want = fa.flash_attn_func(q, k, v, causal=True, backend=backend)
    assert torch.equal(fa.flash_attn_qkvpacked_func(qkv, causal=True, backend=backend), want)
    assert torch.equal(fa.flash_attn_kvpacked_func(q, qkv[:, :, 1:], causal=True, backend=backend), want)
    assert want.is_contiguous() and want.shape == (2, 9, 2, 16)
    lens = [0, 5, 13]
    cu = torch.tensor([0, 0, 5, 18], dtype=torch.int32, device=device)
    packed = torch.randn(18, 3, 2, 16, generator=g).to(device)
    out = fa.flash_attn_varlen_qkvpacked_func(packed, cu, 13, causal=True, backend=backend)
    for (start, n) in zip([0, 0, 5], lens, strict=True):
        if n:
            part = packed[start:start + n].unsqueeze(0)
            expected = ref_blhd(*part.unbind(2), causal=True)[0]
            assert_rows([("seq", (out[start:start + n] - expected).abs().max().item(), 1e-5)])


def kv_cache_case(device, paged: bool, rotary: bool, causal: bool, seed: int = 0):
    """A batch of 3 with cache lengths 0, 5 and 11 in 13-slot caches (the last one full after its 2 new tokens), GQA
    4/2 heads, head dim 32, rotary over 16 of the 32 dims; paged: blocks of 3 slots (dividing no length) in a shuffled
    table."""
    g = torch.Generator().manual_seed(seed)
    b, lq, new, h, hkv, d, cap = 3, 2, 2, 4, 2, 32, 13
    lens = [0, 5, 11]
    q = torch.randn(b, lq, h, d, generator=g)
    k_new, v_new = (torch.randn(b, new, hkv, d, generator=g) for _ in range(2))
    dense_k, dense_v = (torch.randn(b, cap, hkv, d, generator=g) for _ in range(2))
    cos = sin = None
    if rotary:
        angles = torch.rand(cap, 8, generator=g) * 3
        cos, sin = angles.cos(), angles.sin()
    table = None
    if paged:
        block, blocks = 3, 5  # 15 slots per sequence
        order = torch.randperm(b * blocks, generator=g)
        table = order.view(b, blocks).to(torch.int32)
        k_cache = torch.zeros(b * blocks, block, hkv, d)
        v_cache = torch.zeros_like(k_cache)
        for s in range(b):
            for pos in range(cap):
                k_cache[table[s, pos // block], pos % block] = dense_k[s, pos]
                v_cache[table[s, pos // block], pos % block] = dense_v[s, pos]
    else:
        k_cache, v_cache = dense_k.clone(), dense_v.clone()
    to = (lambda t: None if t is None else t.to(device))
    return dict(q=to(q), k_cache=to(k_cache), v_cache=to(v_cache), k=to(k_new), v=to(v_new), rotary_cos=to(cos),
                rotary_sin=to(sin), cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=device),
                block_table=to(table), causal=causal), (dense_k, dense_v, lens)


def rotate_half_pairs(x, cos, sin, positions, interleaved):
    """flash-attn's rotary on [B, L, H, D] with [positions, R/2] tables, written out."""
    r = cos.shape[-1] * 2
    c, s = cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)  # [B, L, 1, R/2]
    x1, x2 = (x[..., 0:r:2], x[..., 1:r:2]) if interleaved else (x[..., : r // 2], x[..., r // 2: r])
    y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
    y = torch.stack((y1, y2), -1).flatten(-2) if interleaved else torch.cat((y1, y2), -1)
    return torch.cat((y, x[..., r:]), -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("rotary,causal,interleaved", [(False, True, True), (True, True, True), (True, False, False)])
def test_flash_attn_with_kvcache(backend, paged, rotary, causal, interleaved, device):
    args, (dense_k, dense_v, lens) = kv_cache_case(device, paged, rotary, causal)
    args["rotary_interleaved"] = interleaved
    q, k_new, v_new = args["q"].cpu(), args["k"].cpu(), args["v"].cpu()
    if rotary:
        cos, sin = args["rotary_cos"].cpu(), args["rotary_sin"].cpu()
        pos = torch.tensor(lens)[:, None] + torch.arange(2)
        k_new = rotate_half_pairs(k_new, cos, sin, pos, interleaved)
        q = rotate_half_pairs(q, cos, sin, pos if causal else torch.tensor(lens)[:, None].expand(3, 2), interleaved)
    out, lse = fa.flash_attn_with_kvcache(**args, return_softmax_lse=True, backend=backend)
    for b, n in enumerate(lens):
        keys = torch.cat((dense_k[b, :n], k_new[b]))[None]
        values = torch.cat((dense_v[b, :n], v_new[b]))[None]
        expected = ref_blhd(q[b:b + 1], keys, values, causal=causal)
        assert_rows([(f"out {b}", (out[b:b + 1].cpu() - expected).abs().max().item(), 2e-5)], backend)
        # The cache holds the (rotated) new keys at positions n, n + 1 and is unchanged elsewhere.
        cache = args["k_cache"].cpu()
        if paged:
            table = args["block_table"].cpu()
            stored = torch.stack([cache[table[b, p // 3], p % 3] for p in range(13)])
        else:
            stored = cache[b]
        assert_rows([(f"cache {b}", (stored[n:n + 2] - k_new[b]).abs().max().item(), 1e-6)])
        assert torch.equal(torch.cat((stored[:n], stored[n + 2:])), torch.cat((dense_k[b, :n], dense_k[b, n + 2:])))
    assert lse.shape == (3, 4, 2) and lse.dtype == torch.float32


def test_flash_attn_with_kvcache_passes_alibi_slopes(device):
    # flash-attn's rule on a cache: the new queries sit at each sequence's end (`ops.attention_with_kvcache`, whose
    # tests check the bias against the reference); here: the slopes reach it, as the same call through the op shows.
    import transformer_kernels as tk
    g = torch.Generator().manual_seed(2)
    k_cache, v_cache = (torch.randn(2, 40, 2, 16, generator=g).to(device) for _ in range(2))
    q, k, v = (torch.randn(2, 3, n, 16, generator=g).to(device) for n in (4, 2, 2))
    lens, slopes = torch.tensor([5, 30], dtype=torch.int32, device=device), torch.tensor([0.5, 0.25, 0.125, 0.0625])
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(3)]
    ours = fa.flash_attn_with_kvcache(q, *caches[0], k, v, cache_seqlens=lens, alibi_slopes=slopes.to(device))
    op = tk.ops.attention_with_kvcache(q, *caches[1], k, v, lens, alibi_slopes=slopes.to(device))
    plain = fa.flash_attn_with_kvcache(q, *caches[2], k, v, cache_seqlens=lens)
    torch.testing.assert_close(ours, op)
    assert (ours - plain).abs().max() > 0.05


def test_refused_by_name_and_bad_windows(device):
    q = torch.randn(1, 4, 2, 16, device=device)
    for kw, name in (({"softcap": 30.0, "backend": "triton"}, "softcap"),
                     ({"return_attn_probs": True}, "return_attn_probs"), ({"deterministic": True}, "deterministic")):
        with pytest.raises(NotImplementedError, match=name):
            fa.flash_attn_func(q, q, q, **kw)
    with pytest.raises(ValueError, match="window_size"):
        fa.flash_attn_func(q, q, q, window_size=(-2, 0))
    with pytest.raises(NotImplementedError, match="cache_batch_idx"):
        fa.flash_attn_with_kvcache(q, q, q, cache_batch_idx=torch.zeros(1, dtype=torch.int32))
