"""attention on every backend against the reference: mask kinds, shapes, layouts, GQA, dropout, and the edge cases
listed in docs/ARCHITECTURE.md."""

import math

import pytest
import torch

import transformer_kernels as tk
from transformer_kernels import backends, reference
from transformer_kernels.cuda import attention as cuda_attention
from transformer_kernels.kernels import attention as triton_attention
from transformer_kernels.ops.attention import draw_seed
from transformer_kernels.tools import testing
from transformer_kernels.tools.testing import assert_rows, compare

BACKENDS = ["triton", "cuda", "torch"]
KERNEL_BACKENDS = ["triton", "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_qkv(b, h, hkv, lq, lk, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, hkv, lk, d, generator=g)
    v = torch.randn(b, hkv, lk, d, generator=g)
    return [t.to(dtype).to(device) for t in (q, k, v)]


def check_against_reference(backend, q, k, v, grads=True, **kw):
    """Forward and dq/dk/dv of the op vs the fp32 reference, bounded by the low-precision reference."""

    def ours(q, k, v):
        with tk.use_backend(backend):
            return tk.ops.attention(q, k, v, **kw)

    def ref(q, k, v):
        return reference.scaled_dot_product_attention(q, k, v, low_precision=q.dtype != torch.float32, **kw)

    rows = compare(ours, ref, {"q": q, "k": k, "v": v}, grad_of=("q", "k", "v") if grads else ())
    assert_rows(rows, f"{q.dtype}, {backend}:")
    return rows


def masks_for(kind, b, h, lq, lk, seed=0, device="cpu"):
    """Keyword arguments for one mask combination, the masks on ``device``."""
    g = torch.Generator().manual_seed(seed)
    bool_mask = (torch.rand(b, 1, lq, lk, generator=g) > 0.3).to(device)
    float_mask = torch.randn(1, h, lq, lk, generator=g).to(device)
    kpm = (torch.rand(b, lk, generator=g) < 0.25).to(device)
    return {
        "none": {},
        "bool": {"attn_mask": bool_mask},
        "float": {"attn_mask": float_mask},
        "padding": {"key_padding_mask": kpm},
        "causal": {"is_causal": True},
        "causal_bottom_right": {"is_causal": True, "causal_alignment": "bottom_right"},
        "bool+padding+causal": {"attn_mask": bool_mask, "key_padding_mask": kpm, "is_causal": True},
        "float+padding+causal_br": {"attn_mask": float_mask, "key_padding_mask": kpm, "is_causal": True,
                                    "causal_alignment": "bottom_right"},
    }[kind]


MASK_KINDS = ["none", "bool", "float", "padding", "causal", "causal_bottom_right", "bool+padding+causal",
              "float+padding+causal_br"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_every_mask_kind_fp32(backend, kind, device):
    q, k, v = make_qkv(2, 2, 2, 37, 45, 24, device=device)
    check_against_reference(backend, q, k, v, **masks_for(kind, 2, 2, 37, 45, device=device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["none", "bool+padding+causal", "float+padding+causal_br"])
def test_low_precision(backend, dtype, kind, device):
    q, k, v = make_qkv(2, 4, 2, 33, 50, 64, dtype, device)
    check_against_reference(backend, q, k, v, enable_gqa=True, **masks_for(kind, 2, 4, 33, 50, device=device))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d,dv", [(40, 24), (16, 72), (192, 128)])
def test_value_head_dim_other_than_the_querys(backend, dtype, d, dv, device):
    # The kernels run at the wider head dim on zero-padded operands (zeros add nothing to a score, and padded value
    # columns are cut from the output): forward, dq/dk/dv and the mask's gradient against the reference.
    if max(d, dv) > max_head_dim(backend, dtype, device):
        pytest.skip(f"{dtype} stops at D = {max_head_dim(backend, dtype, device)} on {backend}")
    q, k, _ = make_qkv(2, 4, 2, 19, 23, d, dtype, device)
    v = torch.randn(2, 2, 23, dv, generator=torch.Generator().manual_seed(5)).to(dtype).to(device)
    assert not backends.launchers("attention", backend).unsupported(q, k, v)
    rows = check_against_reference(backend, q, k, v, enable_gqa=True, **masks_for("float+padding+causal_br", 2, 4, 19,
                                                                                  23, device=device))
    assert len(rows) == 4  # the output and three gradients


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("length", [1, 2, 3, 15, 17, 31, 97, 113, 127, 129, 257])
def test_odd_lengths(backend, length, device):
    q, k, v = make_qkv(1, 2, 1, length, length, 16, device=device, seed=length)
    check_against_reference(backend, q, k, v, enable_gqa=True, is_causal=True,
                            attn_mask=torch.rand(length, length, device=device) > 0.1)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("length", [1023, 1025])
def test_tile_edge_lengths_long(backend, length, device):
    q, k, v = make_qkv(1, 1, 1, length, length, 16, device=device, seed=length)
    check_against_reference(backend, q, k, v, is_causal=True)


def max_head_dim(backend, dtype, device):
    if backend == "cuda":
        return cuda_attention.max_head_dim(dtype, torch.device(device))
    return triton_attention.MAX_HEAD_DIM[dtype]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("d", [16, 32, 40, 48, 59, 64, 72, 80, 96, 111, 128, 160, 256])
def test_head_dims(backend, d, device):
    # Both kernel backends run every dtype up to 256: fp32 on Triton as tf32x3 dots to 64 and FMA dots above, on
    # CUDA as FMA loops over shared-memory tiles. Above its limit a forced backend raises a clear error.
    for dtype in (torch.float16, torch.float32):
        if d <= max_head_dim(backend, dtype, device):
            q, k, v = make_qkv(1, 2, 2, 19, 23, d, dtype, device, seed=d)
            check_against_reference(backend, q, k, v,
                                    key_padding_mask=torch.arange(23, device=device).expand(1, 23) > 20)
        else:
            q, k, v = make_qkv(1, 2, 2, 3, 3, d, dtype, device)
            with pytest.raises(NotImplementedError, match=f"head dim {d} with {dtype}"), tk.use_backend(backend):
                tk.ops.attention(q, k, v)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("lq,lk", [(1, 239), (239, 1), (3, 799), (799, 3), (16, 1024), (1024, 16)])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_cross_attention_pairs(backend, lq, lk, alignment, device):
    q, k, v = make_qkv(1, 1, 1, lq, lk, 16, device=device, seed=lq + lk)
    check_against_reference(backend, q, k, v, is_causal=True, causal_alignment=alignment)


def test_causal_matches_explicit_mask_and_bottom_right_single_query_sees_all(device):
    q, k, v = make_qkv(1, 2, 2, 9, 14, 16, device=device)
    for alignment in ("top_left", "bottom_right"):
        explicit = reference.causal_mask(9, 14, alignment, device)
        with tk.use_backend("triton"):
            a = tk.ops.attention(q, k, v, is_causal=True, causal_alignment=alignment)
            b = tk.ops.attention(q, k, v, attn_mask=explicit)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with tk.use_backend("triton"):
        one = tk.ops.attention(q[:, :, :1], k, v, is_causal=True, causal_alignment="bottom_right")
        full = tk.ops.attention(q[:, :, :1], k, v)
    torch.testing.assert_close(one, full, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_and_expanded_grad_output(backend, device):
    b, h, lq, lk, d = 2, 3, 21, 26, 16
    g = torch.Generator().manual_seed(5)
    # [B, L, 3·H·D] projections seen as [B, H, L, D] through chunk + view + transpose; k with a last-dim stride of 2.
    qkv = torch.randn(b, lq, 3 * h * d, generator=g).to(device)
    q = qkv.chunk(3, dim=-1)[0].view(b, lq, h, d).transpose(1, 2)
    k = torch.randn(b, h, lk, 2 * d, generator=g).to(device)[..., ::2]
    v = torch.randn(b, lk, h, d, generator=g).to(device).transpose(1, 2)
    assert not q.is_contiguous() and k.stride(-1) == 2
    kw = {"is_causal": True, "causal_alignment": "bottom_right"}
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    with tk.use_backend(backend):
        out = tk.ops.attention(qs, ks, vs, **kw)
        out.sum().backward()  # grad_output: a stride-0 expanded tensor of ones
        ref = tk.ops.attention(qc, kc, vc, **kw)
        ref.backward(torch.ones_like(ref))
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    for a, c in ((qs, qc), (ks, kc), (vs, vc)):
        torch.testing.assert_close(a.grad, c.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_give_zero_output_and_gradients(backend, dtype, device):
    b, h, lq, lk, d = 2, 2, 8, 6, 16
    q, k, v = (t.requires_grad_() for t in make_qkv(b, h, h, lq, lk, d, dtype, device))
    kpm = torch.zeros(b, lk, dtype=torch.bool, device=device)
    kpm[1] = True  # batch 1: every key is padding
    mask = torch.ones(lq, lk, dtype=torch.bool, device=device)
    mask[3] = False  # query 3 sees nothing
    with tk.use_backend(backend):
        # causal top-left with Lq > Lk: fine here since every query i >= 0 sees key 0; padding empties batch 1.
        out = tk.ops.attention(q, k, v, attn_mask=mask, key_padding_mask=kpm, is_causal=True)
        out.backward(torch.randn_like(out))
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    assert (out[1] == 0).all() and (out[:, :, 3] == 0).all()
    assert (q.grad[1] == 0).all() and (q.grad[:, :, 3] == 0).all()
    assert (k.grad[1] == 0).all() and (v.grad[1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_top_left_with_more_queries_than_keys_has_empty_rows(backend, device):
    # top-left causal with Lq > Lk: every query sees key 0, so no row is empty; with a padded key 0, the first
    # query sees nothing and must be exactly zero.
    q, k, v = make_qkv(1, 1, 1, 7, 3, 16, device=device)
    kpm = torch.tensor([[True, False, False]], device=device)
    check_against_reference(backend, q, k, v, is_causal=True, key_padding_mask=kpm)
    with tk.use_backend(backend):
        out = tk.ops.attention(q, k, v, is_causal=True, key_padding_mask=kpm)
    assert (out[0, 0, 0] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nan_or_inf_in_masked_keys_and_values_does_not_leak(backend, poison, device):
    b, h, lq, lk, d = 2, 2, 11, 13, 16
    q, k, v = make_qkv(b, h, h, lq, lk, d, device=device)
    kpm = torch.zeros(b, lk, dtype=torch.bool, device=device)
    kpm[:, 10:] = True
    bool_mask = torch.ones(b, 1, 1, lk, dtype=torch.bool, device=device)
    bool_mask[:, :, :, 4] = False
    float_mask = torch.zeros(1, 1, lq, lk, device=device)
    float_mask[..., 6] = float("-inf")
    dirty_k, dirty_v = k.clone(), v.clone()
    for col in (4, 6, 10, 11, 12):
        dirty_k[:, :, col] = poison
        dirty_v[:, :, col] = poison
    for mask in (bool_mask, float_mask):
        kw = {"attn_mask": mask, "key_padding_mask": kpm, "is_causal": True, "causal_alignment": "bottom_right"}
        hidden = (4, 10, 11, 12) if mask is bool_mask else (6, 10, 11, 12)
        kk, vv = k.clone(), v.clone()
        for col in hidden:
            kk[:, :, col], vv[:, :, col] = dirty_k[:, :, col], dirty_v[:, :, col]
        qd, kd, vd = (t.clone().requires_grad_() for t in (q, kk, vv))
        qc, kc, vc = (t.clone().requires_grad_() for t in (q, k, v))
        with tk.use_backend(backend):
            dirty = tk.ops.attention(qd, kd, vd, **kw)
            clean = tk.ops.attention(qc, kc, vc, **kw)
            g = torch.randn_like(clean)
            dirty.backward(g)
            clean.backward(g)
        torch.testing.assert_close(dirty, clean, atol=1e-6, rtol=0)
        torch.testing.assert_close(qd.grad, qc.grad, atol=1e-6, rtol=0)
        for grad in (kd.grad, vd.grad):
            assert torch.isfinite(grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huggingface_style_float_masks_stay_finite(backend, dtype, device):
    # -inf and finfo(dtype).min masks combined with causal and padding; rows 0..1 see only masked keys.
    b, h, lq, lk, d = 2, 2, 9, 9, 16
    q, k, v = make_qkv(b, h, h, lq, lk, d, dtype, device)
    for fill in (float("-inf"), torch.finfo(dtype).min):
        mask = torch.zeros(b, 1, lq, lk, dtype=dtype, device=device)
        mask[:, :, :, :3] = fill
        kpm = torch.zeros(b, lk, dtype=torch.bool, device=device)
        kpm[0, -2:] = True
        check_against_reference(backend, q, k, v, attn_mask=mask, key_padding_mask=kpm, is_causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_very_negative_scores_keep_full_precision(backend, device):
    # An unmasked row whose scores all sit near -6e4: differences of O(1) must still give the right softmax.
    q, k, v = make_qkv(1, 1, 1, 5, 40, 16, device=device)
    bias = torch.full((5, 40), -6.0e4, device=device) + torch.randn(5, 40, device=device)
    check_against_reference(backend, q, k, v, attn_mask=bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_huge_scores_do_not_overflow(backend, dtype, device):
    # fp16 scores far above 65504 (and bf16 inputs near 1.3e5): fp32 accumulation and the scale before exp.
    q, k, v = make_qkv(1, 2, 2, 17, 17, 64, device=device)
    big = 1.3e5 if dtype == torch.bfloat16 else 300.0
    q = (q * big / q.abs().max()).to(dtype)
    k = (k * big / k.abs().max()).to(dtype)
    v = v.to(dtype)
    with tk.use_backend(backend):
        out = tk.ops.attention(q, k, v, scale=1.0 if dtype == torch.float16 else 1e-6)
    assert torch.isfinite(out).all()
    check_against_reference(backend, q, k, v, grads=False, scale=1.0 if dtype == torch.float16 else 1e-6)


MASK_SHAPES = [(13,), (7, 13), (1, 1, 7, 13), (2, 1, 1, 13), (2, 3, 7, 13)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_broadcast_shapes_equal_the_full_mask(backend, shape, kind, device):
    q, k, v = make_qkv(2, 3, 3, 7, 13, 16, device=device)
    g = torch.Generator().manual_seed(len(shape))
    mask = (torch.rand(shape, generator=g) > 0.3) if kind == "bool" else torch.randn(shape, generator=g)
    mask = mask.to(device)
    full = mask.expand(2, 3, 7, 13).contiguous()
    # a non-contiguous view holding the same values
    strided = torch.stack([full, full], dim=-1)[..., 0]
    assert not strided.is_contiguous()
    with tk.use_backend(backend):
        outs = [tk.ops.attention(q, k, v, attn_mask=m) for m in (mask, mask.expand(2, 3, 7, 13), full, strided)]
    # Bitwise equal when interpreted; compiled, each mask layout is its own variant whose instruction order (FMA
    # contraction) may differ by an ulp (seen on an H200: 2.4e-07 for bool masks).
    tol = dict(atol=0, rtol=0) if q.device.type == "cpu" else dict(atol=1e-6, rtol=1e-5)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], **tol)
    check_against_reference(backend, q, k, v, attn_mask=mask)


# (mask shape, extra kwargs): T5's position bias [1, H, Lq, Lk]; a per-batch bias with padding and bottom-right
# causal; a per-head ALiBi-like [H, 1, Lk] slope; a shared [Lq, Lk] with top-left causal over more keys than one
# tile, so the keys past the causal range (never visited by the dQ pass) must still get their zero gradient.
MASK_GRAD_CASES = [
    ((1, 4, 9, 13), {}),
    ((2, 1, 9, 13), {"is_causal": True, "causal_alignment": "bottom_right", "padding": True}),
    ((4, 1, 13), {"dropout_p": 0.0}),
    ((9, 70), {"is_causal": True}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(MASK_GRAD_CASES)))
def test_float_mask_gets_its_gradient(backend, dtype, case, device):
    shape, kw = MASK_GRAD_CASES[case]
    kw = dict(kw)
    lk = shape[-1]
    q, k, v = make_qkv(2, 4, 2, 9, lk, 16, dtype=dtype, device=device, seed=case)
    g = torch.Generator().manual_seed(case)
    mask = torch.randn(shape, generator=g)
    mask[..., 1] = float("-inf")  # a hidden key: exactly zero gradient there
    mask = mask.to(dtype).to(device)
    if kw.pop("padding", False):
        kw["key_padding_mask"] = (torch.arange(lk) >= lk - 3).expand(2, lk).to(device)

    def ours(q, k, v, mask):
        with tk.use_backend(backend):
            return tk.ops.attention(q, k, v, attn_mask=mask, enable_gqa=True, **kw)

    def ref(q, k, v, mask):
        return reference.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True,
                                                      low_precision=q.dtype != torch.float32, **kw)

    rows = compare(ours, ref, {"q": q, "k": k, "v": v, "mask": mask}, grad_of=("q", "k", "v", "mask"))
    assert [r[0] for r in rows] == ["out", "dq", "dk", "dv", "dmask"]
    assert_rows(rows, f"{dtype}, {backend}:")
    m = mask.clone().requires_grad_()
    with tk.use_backend(backend):
        tk.ops.attention(q, k, v, attn_mask=m, enable_gqa=True, **kw).sum().backward()
    assert m.grad.shape == m.shape and m.grad.dtype == m.dtype
    assert (m.grad[..., 1] == 0).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_mask_gradient_only_when_asked(backend, device, monkeypatch):
    """A mask that does not require grad costs nothing: the kernels are asked for no dS."""
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 5, 7, 16, device=device))
    launcher = backends.launchers("attention", backend)
    asked = []
    real = launcher.attention_backward

    def spy(*args, **kwargs):
        asked.append(args[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(launcher, "attention_backward", spy)
    mask = torch.randn(5, 7, device=device)
    for m in (mask, mask.clone().requires_grad_()):
        with tk.use_backend(backend):
            tk.ops.attention(q, k, v, attn_mask=m).sum().backward()
    assert asked == [False, True]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hkv", [1, 2])
def test_grouped_and_multi_query_attention(backend, hkv, device):
    q, k, v = make_qkv(2, 6, hkv, 19, 22, 32, device=device)
    rows = check_against_reference(backend, q, k, v, enable_gqa=True, is_causal=True,
                                   key_padding_mask=torch.rand(2, 22, device=device) < 0.2)
    assert [r[0] for r in rows] == ["out", "dq", "dk", "dv"]
    with pytest.raises(ValueError, match="enable_gqa"), tk.use_backend(backend):
        tk.ops.attention(q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_sizes(backend, device):
    with tk.use_backend(backend):
        q, k, v = (t.requires_grad_() for t in make_qkv(0, 2, 2, 5, 6, 16, device=device))
        out = tk.ops.attention(q, k, v)
        out.sum().backward()
        assert out.shape == (0, 2, 5, 16)
        # Lq = 0: empty output, dK = dV = 0
        q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 0, 6, 16, device=device))
        out = tk.ops.attention(q, k, v, is_causal=True)
        out.sum().backward()
        assert out.shape == (1, 2, 0, 16) and (k.grad == 0).all() and (v.grad == 0).all()
        # Lk = 0: no key to attend to, so zeros (and a zero dQ)
        q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 5, 0, 16, device=device))
        out = tk.ops.attention(q, k, v)
        out.sum().backward()
        assert out.shape == (1, 2, 5, 16) and (out == 0).all() and (q.grad == 0).all()


@pytest.mark.gpu
def test_batch_times_heads_beyond_grid_limit():
    # B·H = 65540 > 65535 (CUDA's grid y/z limit): the kernels fold B·H into grid x. Needs a GPU: the
    # interpreter would run 65540 programs one by one.
    q, k, v = make_qkv(2, 32770, 32770, 3, 5, 16, torch.float16, "cuda")
    for backend in KERNEL_BACKENDS:
        check_against_reference(backend, q, k, v, is_causal=True)


# Row 256 of a tensor with this row stride starts 2^31 elements in: past what an int32 offset holds.
HUGE_ROW_STRIDE = 2**23


def spread_rows(t: torch.Tensor) -> torch.Tensor:
    """The [..., L, C] tensor t, copied into rows HUGE_ROW_STRIDE elements apart in one allocation. Only the pages
    the rows touch are ever written, so the view costs kilobytes of memory while its offsets pass 2^31."""
    rows, cols = t.shape[-2], t.shape[-1]
    base = torch.empty((rows - 1) * HUGE_ROW_STRIDE + cols, dtype=t.dtype, device=t.device)
    view = base.as_strided(t.shape, (*[rows * HUGE_ROW_STRIDE] * (t.dim() - 2), HUGE_ROW_STRIDE, 1))
    with torch.no_grad():
        view.copy_(t)
    return view


class _SpreadRows(torch.autograd.Function):
    # spread_rows with the gradient passed straight back to the compact tensor.
    @staticmethod
    def forward(ctx, t):
        return spread_rows(t)

    @staticmethod
    def backward(ctx, grad):
        return grad


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_offsets_past_2_31_elements(backend, device):
    # Rows 256..263 of q, k, v and of the [Lq, Lk] mask lie past element 2^31 of their tensors (a transposed
    # [B, L, H, D] view or an Lq·Lk >= 2^31 mask does this in real use): every pass must use 64-bit offsets.
    n = 264
    q, k, v = make_qkv(1, 1, 1, n, n, 16, torch.float16, device)
    keep = torch.rand(n, n, generator=torch.Generator().manual_seed(1)).to(device) > 0.2
    mask = spread_rows(keep)
    assert mask.stride(0) == HUGE_ROW_STRIDE

    def ours(q, k, v):
        with tk.use_backend(backend):
            return tk.ops.attention(*(_SpreadRows.apply(t) for t in (q, k, v)), attn_mask=mask)

    def ref(q, k, v):
        return reference.scaled_dot_product_attention(q, k, v, attn_mask=keep, low_precision=q.dtype != torch.float32)

    assert_rows(compare(ours, ref, {"q": q, "k": k, "v": v}, grad_of=("q", "k", "v")))


def keep_mask_of_next_call(seed_state: int, shape, p, device):
    """The keep-mask the next attention call draws after torch.manual_seed(seed_state)."""
    torch.manual_seed(seed_state)
    return testing.dropout_keep_mask(draw_seed(device), shape, p, device)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype,h,hkv,lq,lk,d", [
    (torch.float32, 2, 2, 23, 29, 16),
    # fp16/bf16 run the mma.sync kernels on CUDA: GQA, and more query tiles per key block than the dK/dV pass's two
    # stages (64 rows at D = 32, 16 at D = 256), so every stage is refilled
    (torch.float16, 4, 2, 150, 97, 32),
    (torch.bfloat16, 2, 1, 40, 50, 256),
], ids=["fp32", "fp16-gqa", "bf16-d256"])
def test_dropout_matches_reference_with_the_kernels_mask(backend, dtype, h, hkv, lq, lk, d, device):
    b, p = 2, 0.3
    q, k, v = make_qkv(b, h, hkv, lq, lk, d, dtype, device)
    keep = keep_mask_of_next_call(7, (b, h, lq, lk), p, device)
    kw = {"is_causal": True, "causal_alignment": "bottom_right", "enable_gqa": h != hkv,
          "key_padding_mask": torch.rand(b, lk, generator=torch.Generator().manual_seed(1)).to(device) < 0.2}

    def ours(q, k, v):
        torch.manual_seed(7)
        with tk.use_backend(backend):
            return tk.ops.attention(q, k, v, dropout_p=p, **kw)

    def ref(q, k, v):
        return reference.scaled_dot_product_attention(q, k, v, dropout_p=p, dropout_mask=keep,
                                                      low_precision=q.dtype != torch.float32, **kw)

    # Forward and backward agree with the reference given the kernel's own keep-mask: the same mask both ways.
    assert_rows(compare(ours, ref, {"q": q, "k": k, "v": v}, grad_of=("q", "k", "v")), f"{dtype}, {backend}:")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_seeding_and_statistics(backend, device):
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16, device=device)

    def run(seed, p=0.25):
        torch.manual_seed(seed)
        with tk.use_backend(backend):
            return tk.ops.attention(q, k, v, dropout_p=p)

    a, b, c = run(1), run(1), run(2)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-3
    with tk.use_backend(backend):
        torch.testing.assert_close(run(1, p=0.0), tk.ops.attention(q, k, v), atol=0, rtol=0)
    if backend == "triton":
        for p in (0.1, 0.5):
            keep = keep_mask_of_next_call(3, (2, 4, 128, 128), p, device)
            assert abs(keep.float().mean().item() - (1 - p)) < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["default", "deterministic"])
def test_deterministic(backend, mode, device):
    # The forward gives the same bits on every run; the backward does under torch.use_deterministic_algorithms(True),
    # and by default stays within the accuracy rule (the Triton dQ is summed with atomics; DESIGN.md).
    q, k, v = make_qkv(1, 4, 2, 40, 40, 32, device=device)
    results = []
    torch.use_deterministic_algorithms(mode == "deterministic")
    try:
        for _ in range(2):
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            with tk.use_backend(backend):
                out = tk.ops.attention(qq, kk, vv, is_causal=True, enable_gqa=True)
            out.backward(torch.ones_like(out))
            results.append([out, qq.grad, kk.grad, vv.grad])
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(results[0][0], results[1][0])
    for x, y in zip(results[0][1:], results[1][1:], strict=True):
        if mode == "deterministic":
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, atol=testing.FLOOR[torch.float32] * y.abs().max().item(), rtol=0)


def test_deterministic_mode_uses_a_fixed_tile_not_autotune(device, monkeypatch):
    # Autotune picks tiles by timing and the tile decides the summation order, so under
    # torch.use_deterministic_algorithms the Triton launchers must not autotune (same bits in every process).
    from transformer_kernels.kernels import linear as triton_linear

    def no_tuning(*args, **kwargs):
        raise AssertionError("autotune ran in deterministic mode")

    for tuned in (triton_attention._fwd, triton_attention._dkdv, triton_attention._dq, triton_linear._matmul):
        tuned.clear()  # configs chosen by earlier tests would skip the tuner in the last check
        monkeypatch.setattr(tuned.tuner, "run", no_tuning)
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 2, 2, 40, 40, 32, device=device))
    torch.use_deterministic_algorithms(True)
    try:
        with tk.use_backend("triton"):
            out = tk.ops.attention(q, k, v, is_causal=True)
            y = tk.ops.linear(torch.randn(5, 8, device=device), torch.randn(3, 8, device=device))
        out.sum().backward()
        check_against_reference("triton", *make_qkv(1, 2, 2, 40, 40, 32, device=device), is_causal=True)
    finally:
        torch.use_deterministic_algorithms(False)
    assert y.shape == (5, 3) and q.grad is not None
    with tk.use_backend("triton"), pytest.raises(AssertionError, match="autotune ran"):
        tk.ops.attention(q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_requires_grad_retain_graph_and_no_grad(backend, device):
    q, k, v = make_qkv(1, 2, 2, 9, 9, 16, device=device)
    k.requires_grad_()
    with tk.use_backend(backend):
        out = tk.ops.attention(q, k, v, is_causal=True)
        out.sum().backward(retain_graph=True)
        first = k.grad.clone()
        out.sum().backward()
        torch.testing.assert_close(k.grad, 2 * first)
        assert q.grad is None and v.grad is None
        with torch.no_grad():
            assert not tk.ops.attention(q, k, v).requires_grad


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend, device):
    q, k, v = make_qkv(1, 2, 1, 5, 7, 16, device=device)
    mask = torch.rand(5, 7, device=device) > 0.2
    kpm = torch.zeros(1, 7, dtype=torch.bool, device=device)
    scale = 1 / math.sqrt(16)
    sinks = torch.randn(2, device=device)
    for args in [
        (q, k, v, None, None, None, None, 0.0, False, scale, 0.0, -1, -1, 0, None, backend),
        (q, k, v, mask, kpm, None, None, 0.0, True, scale, 0.0, -1, -1, 2, None, backend),
        (q, k, v, mask.float(), None, None, None, 0.2, False, scale, 0.0, -1, -1, 0, torch.tensor([11], device=device),
         backend),
        (q, k, v, torch.randn(2, 1, 7, device=device), kpm, None, None, 0.0, True, scale, 0.0, -1, -1, 0, None, backend),
        (q, k, torch.randn(1, 1, 7, 24, device=device), None, kpm, None, None, 0.0, True, scale, 0.0, -1, -1, 0, None,
         backend),  # Dv != D
        (q, k, v, mask, kpm, sinks, None, 0.0, True, scale, 0.0, -1, -1, 0, None, backend),
        # on the kernels that take them: a sliding window (2 keys left, 1 right) around the bottom-right diagonal,
        # the soft cap, and ALiBi's slopes [B, H], each with a float mask's gradient through it
        *([(q, k, v, mask.float(), None, None, None, 0.0, False, scale, 0.0, 2, 1, 2, None, backend),
           (q, k, v, mask.float(), kpm, sinks, None, 0.0, True, scale, 0.5, -1, -1, 0, None, backend),
           (q, k, v, mask.float(), None, None, torch.rand(q.shape[:2], device=device), 0.0, True, scale, 0.0, -1, -1,
            2, None, backend)]
          if backend == "cuda" else []),
    ]:
        # The float masks and the sinks require grad: the op's dMask and dSinks paths are checked too.
        args = tuple(a.clone().requires_grad_() if i < 3 or (i in (3, 5) and a is not None and a.is_floating_point())
                     else a for i, a in enumerate(args))
        torch.library.opcheck(torch.ops.transformer_kernels.attention.default, args)


def test_gradcheck_fp64_torch_backend():
    q, k, v = (t.double().requires_grad_() for t in make_qkv(1, 2, 1, 4, 5, 3))
    mask = torch.randn(4, 5, dtype=torch.float64)
    kpm = torch.tensor([[False, False, True, False, False]])

    def fn(q, k, v):
        with tk.use_backend("torch"):
            return tk.ops.attention(q, k, v, mask, is_causal=True, enable_gqa=True, key_padding_mask=kpm,
                                    causal_alignment="bottom_right")

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_bad_inputs_raise_before_launch(device):
    q, k, v = make_qkv(1, 2, 2, 5, 6, 16, device=device)
    cases = [
        ((q.half(), k, v), {}, TypeError, "share one dtype"),
        ((q.long(), k, v), {}, TypeError, "q must have dtype"),
        ((q[0], k, v), {}, ValueError, "4-D"),
        ((q, k[:, :, :, :8], v), {}, ValueError, "expected q"),
        ((q, k[:1].expand(2, 2, 6, 16), v), {}, ValueError, "expected q"),
        ((torch.randn(1, 3, 5, 16, device=device), k, v), {"enable_gqa": True}, ValueError, "multiple"),
        ((q, k, v), {"attn_mask": torch.ones(4, 6, dtype=torch.bool)}, ValueError, "broadcast"),
        ((q, k, v), {"attn_mask": torch.ones(5, 6, dtype=torch.int32)}, TypeError, "bool"),
        ((q, k, v), {"key_padding_mask": torch.zeros(1, 5, dtype=torch.bool)}, ValueError, "key_padding_mask"),
        ((q, k, v), {"key_padding_mask": torch.zeros(1, 6)}, TypeError, "key_padding_mask"),
        ((q, k, v), {"dropout_p": 1.0}, ValueError, "dropout_p"),
        ((q, k, v), {"causal_alignment": "middle"}, ValueError, "causal_alignment"),
        ((q, k.to("meta"), v), {}, ValueError, "device"),
    ]
    for args, kw, exc, match in cases:
        with pytest.raises(exc, match=match), tk.use_backend("triton"):
            tk.ops.attention(*args, **kw)


def test_unsupported_inputs_on_a_forced_backend_and_auto_fallback(device):
    q, k, v = make_qkv(1, 1, 1, 3, 3, 300, device=device)
    for backend in KERNEL_BACKENDS:
        with pytest.raises(NotImplementedError, match=rf"{backend}.*head dim 300"), tk.use_backend(backend):
            tk.ops.attention(q, k, v)
    # the limit is named with the dtype (every dtype stops at 256 on both kernel backends)
    with pytest.raises(NotImplementedError, match=r"cuda.*head dim 300 with torch.float16 \(supported: 1\.\.256\)"), \
            tk.use_backend("cuda"):
        tk.ops.attention(*(t.half() for t in (q, k, v)))
    with tk.use_backend("torch"):
        check_against_reference("torch", q, k, v)
    # auto on a CUDA tensor skips a backend that cannot take the inputs (resolved without running anything)
    cuda = torch.device("cuda")
    assert backends.resolve_for("attention", "attention", cuda, "auto", q, k, v) == "torch"
    small = make_qkv(1, 1, 1, 3, 3, 64, device=device)
    assert backends.resolve_for("attention", "attention", cuda, "auto", *small) == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_large_shapes_on_gpu(dtype, causal):
    q, k, v = make_qkv(2, 8, 8, 2048, 2048, 128, dtype, "cuda")
    for backend in KERNEL_BACKENDS:
        check_against_reference(backend, q, k, v, is_causal=causal)


def test_a_backend_without_the_op_is_a_clear_error(device, monkeypatch):
    # Edge case 21 (docs/ARCHITECTURE.md): forcing a backend that lacks the op names the backend and the op.
    monkeypatch.setitem(backends.GPU_PREFERENCE, "attention", ("triton", "torch"))
    q, k, v = make_qkv(1, 1, 1, 3, 3, 16, device=device)
    with pytest.raises(NotImplementedError, match="backend 'cuda' does not implement attention"), tk.use_backend("cuda"):
        tk.ops.attention(q, k, v)


# ---- split-KV forward (decoding) ---------------------------------------------------------------------------------


def _record_split_plans(monkeypatch) -> list:
    """Every split plan the two kernel launchers make, recorded."""
    from transformer_kernels.kernels import config

    plans = []

    def recording(*args):
        plans.append(config.split_plan(*args))
        return plans[-1]

    monkeypatch.setattr(triton_attention, "split_plan", recording)
    monkeypatch.setattr(cuda_attention, "split_plan", recording)
    return plans


def _cuda_tile(dtype, d):
    from transformer_kernels import _ext

    mod = _ext.module_for(torch.device("cpu"))
    return mod.attention_forward_tile(_ext.dtype_code(mod, dtype), d, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
def test_split_kv_plan_fills_an_h100(dtype, d):
    """B = 1, H = 16, Lq = 1, Lk = 8192 (one decoding step): at least two programs per SM of an H100 (132 SMs), on
    the tiles each backend launches on a GPU; a batch that fills the GPU is not split."""
    from transformer_kernels.kernels.config import split_plan

    if d > triton_attention.MAX_HEAD_DIM[dtype]:
        pytest.skip(f"{dtype} stops at D = {triton_attention.MAX_HEAD_DIM[dtype]} on Triton")
    block_d = triton_attention.head_dim_block(d, dtype)
    tiles = {}
    for features in ("plain", "all"):
        t = triton_attention.split_tile(block_d, dtype.itemsize, features, interpreted=False)
        plain = triton_attention.PASSES["fwd"][(features, max(dtype.itemsize, 2), block_d)][0].block_m
        tiles[f"triton {features}"] = (t.block_m, t.block_n, plain)
    if d <= cuda_attention.max_head_dim(dtype, torch.device("cpu")):
        bm, bn = _cuda_tile(dtype, d)
        tiles["cuda"] = (bm, bn, bm)
    for name, (bm, bn, plain) in tiles.items():
        plan = split_plan(1, 16, 1, 8192, bm, bn, plain, torch.device("cpu"))
        assert plan.programs >= 264, (name, plan)
        assert (plan.splits - 1) * plan.split_len < 8192 <= plan.splits * plan.split_len and plan.split_len % bn == 0
        assert split_plan(32, 16, 1024, 1024, bm, bn, plain, torch.device("cpu")).splits == 1, name


SPLIT_CASES = {
    "decode gqa": ((1, 4, 2, 1, 300), {"enable_gqa": True}),
    "chunk causal_br": ((2, 2, 2, 3, 300), {"is_causal": True, "causal_alignment": "bottom_right"}),
    "padding": ((1, 2, 2, 1, 257), {"padding": True}),
    "float mask": ((1, 2, 2, 5, 400), {"float_mask": True}),
}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_split_kv_forward_and_backward_match_reference(backend, dtype, case, device, monkeypatch):
    (b, h, hkv, lq, lk), kw = SPLIT_CASES[case]
    kw = dict(kw)
    plans = _record_split_plans(monkeypatch)
    q, k, v = make_qkv(b, h, hkv, lq, lk, 32, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(7)
    if kw.pop("padding", False):
        kw["key_padding_mask"] = (torch.rand(b, lk, generator=g) < 0.3).to(device)
    if kw.pop("float_mask", False):
        kw["attn_mask"] = torch.randn(lq, lk, generator=g).to(dtype).to(device)
    check_against_reference(backend, q, k, v, **kw)
    assert plans and all(p.splits > 1 for p in plans), plans


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_split_kv_dropout_and_results_equal_the_plain_forward(backend, device, monkeypatch):
    from transformer_kernels.kernels import config

    plans = _record_split_plans(monkeypatch)
    q, k, v = make_qkv(1, 2, 2, 2, 333, 16, device=device)
    outs = []
    for programs_per_sm in (config.SPLIT_PROGRAMS_PER_SM, 0):  # 0: the plain grid always "fills" the GPU
        monkeypatch.setattr(config, "SPLIT_PROGRAMS_PER_SM", programs_per_sm)
        config.clear_plans()  # a launch plan keeps the split decision made under the old setting
        torch.manual_seed(11)
        with tk.use_backend(backend):
            outs.append([tk.ops.attention(q, k, v, dropout_p=p) for p in (0.0, 0.4)])
    assert [p.splits > 1 for p in plans] == [True, True, False, False]
    for split, plain in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(split, plain, atol=2e-6, rtol=2e-6)


GQA_DECODE_MASKS = {"none": {}, "padding": {"padding": True}, "bool [B,1,1,Lk]": {"bool": (2, 1, 1)},
                    "float [1,1,1,Lk]": {"float": (1, 1, 1)}, "causal_br window": {"is_causal": True,
                                                                                  "causal_alignment": "bottom_right",
                                                                                  "window": (70, -1)}}


@pytest.mark.parametrize("kind", list(GQA_DECODE_MASKS))
@pytest.mark.parametrize("group", [4, 40], ids=lambda g: f"group{g}")
def test_gqa_decoding_reads_each_kv_tile_once_per_group(kind, group):
    """A decoding step (Lq = 1) with grouped heads runs `attn_decode_gqa_kernel`: the group's query heads are rows of
    one program, so the products (2·32·32·D per key tile and product in the interpreter) are counted once per KV head
    and head chunk, not once per query head; outputs and lse equal the reference."""
    from test_attention_lse import reference_lse

    from transformer_kernels.tools.testing import count_interpreted_work

    b, hkv, lk, d = 2, 2, 256, 32
    h = hkv * group
    q, k, v = make_qkv(b, h, hkv, 1, lk, d, dtype=torch.float16)
    g = torch.Generator().manual_seed(5)
    kw = dict(GQA_DECODE_MASKS[kind])
    if kw.pop("padding", False):
        kw["key_padding_mask"] = torch.rand(b, lk, generator=g) < 0.3
    if "bool" in kw:
        kw["attn_mask"] = torch.rand(*kw.pop("bool"), lk, generator=g) > 0.3
    if "float" in kw:
        kw["attn_mask"] = torch.randn(*kw.pop("float"), lk, generator=g).half()
    with count_interpreted_work() as work:
        out, lse = tk.ops.attention(q, k, v, enable_gqa=True, return_lse=True, backend="triton", **kw)
    tile = triton_attention.INTERPRETER_CONFIG
    visited = lk // tile.block_n  # a window reaches these kernels as a mask (`WINDOW`): every tile
    chunks = -(-group // tile.block_m)
    assert work.matmul_flops == 2 * 2 * tile.block_m * tile.block_n * d * visited * b * hkv * chunks
    expected = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True, **kw)
    torch.testing.assert_close(out.double(), expected, atol=1e-3, rtol=1e-3)
    expected_lse = reference_lse(q, k, d**-0.5, **kw)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-3, rtol=1e-3)


def test_gqa_decoding_with_a_per_head_mask_runs_per_head():
    # A mask that differs between the heads of a group cannot share the group's rows: the split-KV kernel per head.
    from transformer_kernels.tools.testing import count_interpreted_work

    q, k, v = make_qkv(1, 4, 1, 1, 128, 32)
    mask = torch.rand(1, 4, 1, 128, generator=torch.Generator().manual_seed(1)) > 0.5
    with count_interpreted_work() as work:
        out = tk.ops.attention(q, k, v, mask, enable_gqa=True, backend="triton")
    assert work.matmul_flops == 2 * 2 * 32 * 32 * 32 * 4 * 4  # 4 key tiles, 4 query heads
    torch.testing.assert_close(out, reference.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True),
                               atol=1e-5, rtol=1e-5)
