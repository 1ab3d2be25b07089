"""The oracle itself: reference.py equals torch.nn and F.scaled_dot_product_attention."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformer_kernels import reference as ref

torch.backends.mha.set_fastpath_enabled(False)  # compare with the documented math, not the fast path


def rand(*shape, dtype=torch.float64, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    return torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("lq,lk", [(1, 1), (5, 5), (7, 3), (3, 9)])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_torch(lq, lk, causal):
    torch.manual_seed(0)
    q, k, v = rand(2, 3, lq, 8), rand(2, 3, lk, 8), rand(2, 3, lk, 8)
    # SDPA gives NaN for causal rows with no key (lq > lk); ours gives 0: compare the others
    return_rows = torch.arange(lq) < lk if causal and lq > lk else torch.ones(lq, dtype=torch.bool)
    out = ref.scaled_dot_product_attention(q, k, v, is_causal=causal)
    exp = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out[:, :, return_rows], exp[:, :, return_rows])


@pytest.mark.parametrize("shape", [(9,), (5, 9), (1, 1, 5, 9), (2, 1, 1, 9), (2, 3, 5, 9)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_masks_match_torch(shape, kind):
    torch.manual_seed(1)
    q, k, v = rand(2, 3, 5, 8), rand(2, 3, 9, 8), rand(2, 3, 9, 8)
    if kind == "bool":
        mask = torch.rand(shape) > 0.3
        mask[..., 0] = True  # keep one key per row: SDPA's output for empty rows differs by version
    else:
        mask = rand(*shape)
    torch.testing.assert_close(
        ref.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        # SDPA itself rejects a 1-D mask; ours broadcasts it like any other shape
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(5, 9) if mask.dim() == 1 else mask),
    )


def test_sdpa_gqa_and_scale_match_torch():
    torch.manual_seed(2)
    q, k, v = rand(2, 6, 5, 8), rand(2, 2, 7, 8), rand(2, 2, 7, 8)
    torch.testing.assert_close(
        ref.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True),
        F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True),
    )


def test_causal_alignments():
    assert torch.equal(ref.causal_mask(2, 4, "top_left"), torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]]).bool())
    assert torch.equal(ref.causal_mask(2, 4, "bottom_right"), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool())
    assert ref.causal_mask(1, 5, "bottom_right").all()
    with pytest.raises(ValueError, match="causal_alignment"):
        ref.causal_mask(2, 2, "middle")


def test_fully_masked_rows_give_zero_output_and_gradients():
    torch.manual_seed(3)
    q, k, v = (rand(1, 2, 4, 8).requires_grad_() for _ in range(3))
    kpm = torch.tensor([[True, True, True, True]])
    out = ref.scaled_dot_product_attention(q, k, v, key_padding_mask=kpm)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_padding_and_float_masks_with_min_values_are_finite():
    torch.manual_seed(4)
    q, k, v = rand(2, 2, 5, 8, dtype=torch.float32), rand(2, 2, 5, 8, dtype=torch.float32), rand(2, 2, 5, 8, dtype=torch.float32)
    hf = torch.zeros(2, 1, 5, 5).masked_fill(torch.rand(2, 1, 5, 5) > 0.5, torch.finfo(torch.float32).min)
    hf[..., 0] = float("-inf")
    kpm = torch.tensor([[False] * 5, [False, False, True, True, True]])
    out = ref.scaled_dot_product_attention(q, k, v, attn_mask=hf, key_padding_mask=kpm, is_causal=True)
    assert torch.isfinite(out).all()


def test_dropout_keep_mask_is_applied():
    torch.manual_seed(5)
    q, k, v = rand(1, 1, 3, 4), rand(1, 1, 3, 4), rand(1, 1, 3, 4)
    keep = torch.rand(1, 1, 3, 3) > 0.5
    out = ref.scaled_dot_product_attention(q, k, v, dropout_p=0.5, dropout_mask=keep)
    _, w = ref.scaled_dot_product_attention(q, k, v, return_weights=True)
    torch.testing.assert_close(out, (w * keep / 0.5) @ v)


@pytest.mark.parametrize("lk", [1, 7, 1000])
def test_masked_softmax_matches_torch(lk):
    torch.manual_seed(6)
    x = rand(3, 4, lk)
    mask = torch.rand(4, lk) > 0.2
    mask[:, 0] = True
    torch.testing.assert_close(ref.masked_softmax(x, mask, 0.5), torch.softmax((0.5 * x).masked_fill(~mask, float("-inf")), -1))
    bias = rand(lk)
    torch.testing.assert_close(ref.masked_softmax(x, bias, 2.0), torch.softmax(2 * x + bias, -1))


def test_masked_softmax_gradcheck():
    torch.manual_seed(7)
    x = rand(2, 5, 6).requires_grad_()
    mask = torch.rand(5, 6) > 0.4
    mask[0] = False  # one fully masked row
    assert torch.autograd.gradcheck(lambda t: ref.masked_softmax(t, mask, 0.7, is_causal=True), (x,))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kdim", [None, 6])
def test_multi_head_attention_matches_nn(batch_first, kdim):
    torch.manual_seed(8)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim, dtype=torch.float64).eval()
    b, lq, lk = 2, 5, 7
    ek = kdim or 16
    q = rand(b, lq, 16) if batch_first else rand(lq, b, 16)
    kv = rand(b, lk, ek) if batch_first else rand(lk, b, ek)
    kpm = torch.zeros(b, lk, dtype=torch.bool)
    kpm[1, -3:] = True
    am = torch.rand(lq, lk) > 0.8
    am[:, 0] = False
    exp, exp_w = mha(q, kv, kv, key_padding_mask=kpm, attn_mask=am, need_weights=True)
    out, w = ref.multi_head_attention(
        q, kv, kv, mha.state_dict(), 4, key_padding_mask=kpm, attn_mask=am, need_weights=True, batch_first=batch_first
    )
    torch.testing.assert_close(out, exp)
    torch.testing.assert_close(w, exp_w)


def test_multi_head_attention_float_masks_and_per_head_weights():
    torch.manual_seed(9)
    mha = nn.MultiheadAttention(8, 2, dtype=torch.float64).eval()
    x = rand(4, 3, 8)
    am = rand(3 * 2, 4, 4)
    kpm = rand(3, 4)
    exp, exp_w = mha(x, x, x, attn_mask=am, key_padding_mask=kpm, average_attn_weights=False)
    out, w = ref.multi_head_attention(x, x, x, mha.state_dict(), 2, attn_mask=am, key_padding_mask=kpm,
                                      need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, exp)
    torch.testing.assert_close(w, exp_w)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_encoder_layer_matches_nn(norm_first, act, batch_first):
    torch.manual_seed(10)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, activation=act, norm_first=norm_first,
                                       batch_first=batch_first, dtype=torch.float64).eval()
    x = rand(2, 6, 16) if batch_first else rand(6, 2, 16)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[0, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    exp = layer(x, src_mask=causal, src_key_padding_mask=kpm)
    out = ref.encoder_layer(x, layer.state_dict(), 4, activation_name=act, norm_first=norm_first,
                            src_mask=causal, src_key_padding_mask=kpm, batch_first=batch_first)
    torch.testing.assert_close(out, exp)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_decoder_layer_matches_nn(norm_first, batch_first):
    torch.manual_seed(11)
    layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, activation="gelu", norm_first=norm_first,
                                       batch_first=batch_first, dtype=torch.float64).eval()
    tgt = rand(2, 5, 16) if batch_first else rand(5, 2, 16)
    mem = rand(2, 7, 16) if batch_first else rand(7, 2, 16)
    mkpm = torch.zeros(2, 7, dtype=torch.bool)
    mkpm[1, -3:] = True
    tmask = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    exp = layer(tgt, mem, tgt_mask=tmask, memory_key_padding_mask=mkpm)
    out = ref.decoder_layer(tgt, mem, layer.state_dict(), 4, activation_name="gelu", norm_first=norm_first,
                            tgt_mask=tmask, memory_key_padding_mask=mkpm, batch_first=batch_first)
    torch.testing.assert_close(out, exp)
    out_causal = ref.decoder_layer(tgt, mem, layer.state_dict(), 4, activation_name="gelu", norm_first=norm_first,
                                   tgt_is_causal=True, memory_key_padding_mask=mkpm, batch_first=batch_first)
    torch.testing.assert_close(out_causal, exp)


def test_norms_ffn_and_projections():
    torch.manual_seed(12)
    x, r = rand(2, 3, 16), rand(2, 3, 16)
    w, b = rand(16), rand(16)
    y, s = ref.layer_norm(x, w, b, 1e-5, residual=r, return_residual=True)
    torch.testing.assert_close(y, F.layer_norm(x + r, (16,), w, b, 1e-5))
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(ref.rms_norm(x, w, 1e-6), F.rms_norm(x, (16,), w, 1e-6))
    w1, b1, w2, b2 = rand(32, 16), rand(32), rand(16, 32), rand(16)
    for act, fn in [("relu", F.relu), ("gelu", F.gelu), ("silu", F.silu),
                    ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh"))]:
        torch.testing.assert_close(ref.feed_forward(x, w1, b1, w2, b2, act), F.linear(fn(F.linear(x, w1, b1)), w2, b2))
    wg, wu = rand(32, 16), rand(32, 16)
    torch.testing.assert_close(ref.gated_linear(x, wg, wu), F.silu(x @ wg.t()) * (x @ wu.t()))
    torch.testing.assert_close(ref.gated_feed_forward(x, wg, wu, w2, "geglu"), (F.gelu(x @ wg.t()) * (x @ wu.t())) @ w2.t())
    # GQA projection: 4 query heads, 2 kv heads of dim 4
    w_qkv, b_qkv = rand((4 + 2 * 2) * 4, 16), rand((4 + 2 * 2) * 4)
    q, k, v = ref.qkv_projection(x, w_qkv, b_qkv, 4, 2)
    assert q.shape == (2, 4, 3, 4) and k.shape == v.shape == (2, 2, 3, 4)
    torch.testing.assert_close(ref.merge_heads(k), F.linear(x, w_qkv[16:24], b_qkv[16:24]))
    wo = rand(16, 16)
    torch.testing.assert_close(ref.out_projection(q, wo, residual=r), ref.merge_heads(q) @ wo.t() + r)
