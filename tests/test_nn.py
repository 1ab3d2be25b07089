"""transformer_kernels.nn drop-ins against torch.nn with the same state_dict, convert(), and the three model
families against the same models built on torch.nn layers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import transformer_kernels as tk
from transformer_kernels import models
from transformer_kernels import nn as tk_nn
from transformer_kernels.tools.testing import randomize_

BACKENDS = ["triton", "cuda", "torch"]
# On a GPU run the modules and inputs live on the GPU (the Triton kernels take no CPU tensors outside the interpreter).
pytestmark = pytest.mark.usefixtures("on_test_device")

E, H, B, L, S = 32, 4, 2, 7, 9
TOL = {"atol": 2e-5, "rtol": 1e-4}


def seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_(module, seed)


def pair(torch_module: nn.Module, ours: nn.Module) -> tuple[nn.Module, nn.Module]:
    seeded(torch_module)
    ours.load_state_dict(torch_module.state_dict(), strict=True)
    return torch_module.eval(), ours.eval()


def inputs(*shape, seed=1, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, device="cpu").to(torch.get_default_device()).requires_grad_(grad)


def compare_fwd_bwd(run_ref, run_ours, tensors, params_ref=(), params_ours=(), zero=None):
    """Outputs and gradients (inputs and parameters) of two runs on clones of the same tensors."""
    a = [t.detach().clone().requires_grad_() for t in tensors]
    b = [t.detach().clone().requires_grad_() for t in tensors]
    out_ref, out_ours = run_ref(*a), run_ours(*b)
    if zero is not None:  # torch.nn gives NaN on fully padded rows, the kernels give zeros: compare the rest
        out_ref, out_ours = out_ref.masked_fill(zero, 0.0), out_ours.masked_fill(zero, 0.0)
    torch.testing.assert_close(out_ours, out_ref, **TOL)
    g = torch.randn_like(out_ref)
    out_ref.backward(g)
    out_ours.backward(g)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(y.grad, x.grad, **TOL)
    for p, q in zip(params_ref, params_ours, strict=True):
        torch.testing.assert_close(q.grad, p.grad, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("masks", ["none", "bool", "float", "padding"])
def test_multihead_attention_self(backend, batch_first, masks):
    ref, ours = pair(nn.MultiheadAttention(E, H, batch_first=batch_first),
                     tk_nn.MultiheadAttention(E, H, batch_first=batch_first, backend=backend))
    x = inputs(B, L, E) if batch_first else inputs(L, B, E)
    kw = {}
    if masks == "bool":
        kw["attn_mask"] = torch.ones(L, L, dtype=torch.bool).triu(1)
    if masks == "float":
        kw["attn_mask"] = torch.randn(B * H, L, L)
    if masks == "padding":
        kw["key_padding_mask"] = torch.tensor([[False] * (L - 2) + [True] * 2, [False] * L])
    compare_fwd_bwd(lambda x: ref(x, x, x, need_weights=False, **kw)[0],
                    lambda x: ours(x, x, x, need_weights=False, **kw)[0], [x],
                    list(ref.parameters()), list(ours.parameters()))
    # need_weights=True: the reference path, same output and weights as torch.nn
    o1, w1 = ref(x, x, x, **kw)
    o2, w2 = ours(x, x, x, **kw)
    torch.testing.assert_close(o2, o1, **TOL)
    torch.testing.assert_close(w2, w1, **TOL)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_padding_heavy_batches_unpad_the_keys_and_keep_every_row(backend, monkeypatch, device):
    """Half the key slots padding (a tail, a head and holes): the layer gathers the real keys and runs varlen
    attention; outputs (padded query rows too) and gradients match torch.nn. A little padding stays dense."""
    ref, ours = pair(nn.MultiheadAttention(E, H, batch_first=True), tk_nn.MultiheadAttention(E, H, batch_first=True,
                                                                                               backend=backend))
    ref, ours = ref.to(device), ours.to(device)
    calls = []
    varlen = tk.ops.varlen_attention
    monkeypatch.setattr(tk_nn.attention.ops, "varlen_attention", lambda *a, **kw: calls.append(1) or varlen(*a, **kw))
    x = inputs(3, 8, E, grad=False).to(device)
    heavy = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0, 1], [0, 1, 0, 1, 0, 1, 0, 1]], dtype=torch.bool,
                         device=device)
    light = torch.zeros(3, 8, dtype=torch.bool, device=device)
    light[0, -1] = True
    for kpm, unpadded in ((heavy, True), (light, False)):
        calls.clear()
        compare_fwd_bwd(lambda x, kpm=kpm: ref(x, x, x, key_padding_mask=kpm, need_weights=False)[0],
                        lambda x, kpm=kpm: ours(x, x, x, key_padding_mask=kpm, need_weights=False)[0], [x],
                        list(ref.parameters()), list(ours.parameters()))
        assert bool(calls) == unpadded


@pytest.mark.parametrize("backend", BACKENDS)
def test_multihead_attention_cross_with_kdim_vdim(backend):
    ref, ours = pair(nn.MultiheadAttention(E, H, kdim=12, vdim=20, batch_first=True),
                     tk_nn.MultiheadAttention(E, H, kdim=12, vdim=20, batch_first=True, backend=backend))
    assert set(ours.state_dict()) == set(ref.state_dict())
    q, k, v = inputs(B, L, E), inputs(B, S, 12, seed=2), inputs(B, S, 20, seed=3)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, -3:] = True
    compare_fwd_bwd(lambda q, k, v: ref(q, k, v, key_padding_mask=kpm, need_weights=False)[0],
                    lambda q, k, v: ours(q, k, v, key_padding_mask=kpm, need_weights=False)[0], [q, k, v],
                    list(ref.parameters()), list(ours.parameters()))


def test_multihead_attention_rejects_bias_kv():
    with pytest.raises(ValueError, match="add_bias_kv"):
        tk_nn.MultiheadAttention(E, H, add_bias_kv=True)


LAYER_CASES = [(nf, bf, act) for nf in (False, True) for bf in (True, False) for act in ("relu", "gelu", F.silu)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_first,batch_first,activation", LAYER_CASES,
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_encoder_layer_matches_torch(backend, norm_first, batch_first, activation):
    kw = dict(dim_feedforward=48, dropout=0.0, activation=activation, batch_first=batch_first, norm_first=norm_first)
    ref, ours = pair(nn.TransformerEncoderLayer(E, H, **kw), tk_nn.TransformerEncoderLayer(E, H, backend=backend, **kw))
    x = inputs(B, L, E) if batch_first else inputs(L, B, E)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, -2:] = True  # a padded tail: padded query rows are compared after zeroing
    zero = kpm.unsqueeze(-1) if batch_first else kpm.t().unsqueeze(-1)
    compare_fwd_bwd(lambda x: ref(x, src_key_padding_mask=kpm), lambda x: ours(x, src_key_padding_mask=kpm), [x],
                    list(ref.parameters()), list(ours.parameters()), zero=zero)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_hint_takes_the_causal_path_without_reading_the_mask(backend):
    # torch.nn's is_causal says "src_mask is the causal mask": the layer must equal torch.nn given the true causal
    # mask, and must not read the mask at all (a wrong mask under the hint changes nothing).
    kw = dict(dim_feedforward=48, dropout=0.0, batch_first=True)
    ref, ours = pair(nn.TransformerEncoderLayer(E, H, **kw), tk_nn.TransformerEncoderLayer(E, H, backend=backend, **kw))
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    compare_fwd_bwd(lambda x: ref(x, src_mask=causal, is_causal=True), lambda x: ours(x, src_mask=causal, is_causal=True),
                    [inputs(B, L, E)], list(ref.parameters()), list(ours.parameters()))
    x = inputs(B, L, E, grad=False)
    wrong = torch.full((L, L), float("nan"))
    torch.testing.assert_close(ours(x, src_mask=wrong, is_causal=True), ours(x, src_mask=causal, is_causal=True),
                               atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_torch(backend, norm_first):
    kw = dict(dim_feedforward=48, dropout=0.0, activation="gelu", batch_first=True, norm_first=norm_first)
    ref, ours = pair(nn.TransformerDecoderLayer(E, H, **kw), tk_nn.TransformerDecoderLayer(E, H, backend=backend, **kw))
    tgt, mem = inputs(B, L, E), inputs(B, S, E, seed=4)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    mkpm = torch.zeros(B, S, dtype=torch.bool)
    mkpm[0, -4:] = True
    compare_fwd_bwd(lambda t, m: ref(t, m, tgt_mask=causal, memory_key_padding_mask=mkpm, tgt_is_causal=True),
                    lambda t, m: ours(t, m, tgt_mask=causal, memory_key_padding_mask=mkpm, tgt_is_causal=True),
                    [tgt, mem], list(ref.parameters()), list(ours.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_transformer_matches_torch_and_keeps_state_dict_keys(backend):
    kw = dict(d_model=E, nhead=H, num_encoder_layers=2, num_decoder_layers=1, dim_feedforward=40, dropout=0.0)
    ref, ours = pair(nn.Transformer(**kw), tk_nn.Transformer(backend=backend, **kw))
    assert list(ours.state_dict()) == list(ref.state_dict())
    src, tgt = inputs(S, B, E), inputs(L, B, E, seed=5)
    mask = nn.Transformer.generate_square_subsequent_mask(L)
    compare_fwd_bwd(lambda s, t: ref(s, t, tgt_mask=mask), lambda s, t: ours(s, t, tgt_mask=mask), [src, tgt],
                    list(ref.parameters()), list(ours.parameters()))


def test_convert_replaces_layers_in_place_and_keeps_outputs():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, 48, 0.0, batch_first=True), 2,
                                                 enable_nested_tensor=False)
            self.attn = nn.MultiheadAttention(E, H, batch_first=True)
            self.head = nn.Linear(E, 5)

        def forward(self, x):
            h = self.encoder(x)
            return self.head(self.attn(h, h, h, need_weights=False)[0])

    model = seeded(Model()).eval()
    x = inputs(B, L, E, grad=False)
    before = model(x)
    same = tk.convert(model, backend="triton")
    assert same is model
    assert isinstance(model.attn, tk_nn.MultiheadAttention)
    assert all(isinstance(layer, tk_nn.TransformerEncoderLayer) for layer in model.encoder.layers)
    assert not model.training
    torch.testing.assert_close(model(x), before, **TOL)


# ---- models --------------------------------------------------------------------------------------

CFG = models.ModelConfig(vocab_size=53, d_model=E, nhead=H, num_layers=2, dim_feedforward=48, max_len=24)


def model_pair(cls, backend):
    ref = seeded(cls(CFG, layers="torch")).eval()
    ours = cls(CFG, layers="tk", backend=backend).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def ids(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, shape, generator=g, device="cpu").to(torch.get_default_device())


def assert_model_grads_match(ref, ours):
    for (name, p), q in zip(ref.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, **TOL, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_model_with_padding(backend):
    ref, ours = model_pair(models.EncoderModel, backend)
    tokens = ids(B, 10)
    attention_mask = torch.ones(B, 10, dtype=torch.long)
    attention_mask[1, -3:] = 0
    a, b = ref(tokens, attention_mask), ours(tokens, attention_mask)
    keep = attention_mask.bool().unsqueeze(-1)
    torch.testing.assert_close(b * keep, a * keep, **TOL)
    (a * keep).square().mean().backward()
    (b * keep).square().mean().backward()
    assert_model_grads_match(ref, ours)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_model_and_kv_cache(backend):
    ref, ours = model_pair(models.DecoderModel, backend)
    tokens = ids(B, 8)
    a, b = ref(tokens), ours(tokens)
    torch.testing.assert_close(b, a, **TOL)
    F.cross_entropy(a[:, :-1].reshape(-1, CFG.vocab_size), tokens[:, 1:].reshape(-1)).backward()
    F.cross_entropy(b[:, :-1].reshape(-1, CFG.vocab_size), tokens[:, 1:].reshape(-1)).backward()
    assert_model_grads_match(ref, ours)
    # incremental decoding with the cache gives the logits of full recomputation
    with torch.no_grad():
        cache = [{} for _ in ours.layers]
        steps = [ours(tokens[:, :5], cache=cache)] + [ours(tokens[:, i:i + 1], cache=cache) for i in range(5, 8)]
        torch.testing.assert_close(torch.cat(steps, dim=1), ours(tokens), **TOL)
    prompt = tokens[:, :3]
    torch.testing.assert_close(ours.generate(prompt, 6), ours.generate(prompt, 6, use_cache=False), atol=0, rtol=0)
    torch.testing.assert_close(ours.generate(prompt, 6, use_cache=False), ref.generate(prompt, 6, use_cache=False),
                               atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_encoder_decoder_model_and_caches(backend):
    ref, ours = model_pair(models.EncoderDecoderModel, backend)
    src, tgt = ids(B, 10), ids(B, 6, seed=1)
    src_mask = torch.ones(B, 10, dtype=torch.long)
    src_mask[0, -4:] = 0
    a, b = ref(src, tgt, src_mask), ours(src, tgt, src_mask)
    torch.testing.assert_close(b, a, **TOL)
    a.square().mean().backward()
    b.square().mean().backward()
    assert_model_grads_match(ref, ours)
    with torch.no_grad():
        memory = ours.encode(src, src_mask)
        cache = [{} for _ in ours.decoder_layers]
        steps = [ours.decode(tgt[:, i:i + 1], memory, src_mask, cache=cache) for i in range(6)]
        torch.testing.assert_close(torch.cat(steps, dim=1), ours.decode(tgt, memory, src_mask), **TOL)
    out = ours.generate(src, 5, attention_mask=src_mask)
    torch.testing.assert_close(out, ours.generate(src, 5, attention_mask=src_mask, use_cache=False), atol=0, rtol=0)
    torch.testing.assert_close(out, ref.generate(src, 5, attention_mask=src_mask, use_cache=False), atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_steps_match_torch(backend):
    torch.manual_seed(0)
    ref, ours = model_pair(models.DecoderModel, backend)
    ref.train()
    ours.train()
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    tokens = ids(B, 8, seed=3)
    losses = []
    for model, opt in ((ref, opt_ref), (ours, opt_ours)):
        run = []
        for _ in range(3):
            opt.zero_grad()
            logits = model(tokens)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, CFG.vocab_size), tokens[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0][-1] < losses[0][0]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [models.EncoderModel, models.DecoderModel, models.EncoderDecoderModel],
                         ids=lambda c: c.__name__)
def test_torch_compile_fullgraph_has_no_graph_break(backend, cls):
    torch._dynamo.reset()
    model = seeded(cls(models.ModelConfig(vocab_size=31, d_model=16, nhead=2, num_layers=1, dim_feedforward=24,
                                          max_len=16), backend=backend)).eval()
    args = (ids(2, 6) % 31,) if cls is not models.EncoderDecoderModel else (ids(2, 6) % 31, ids(2, 4, seed=1) % 31)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), model(*args), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_gives_torch_dtypes(backend, dtype):
    ref, ours = pair(nn.TransformerEncoderLayer(E, H, 48, 0.0, batch_first=True, norm_first=True),
                     tk_nn.TransformerEncoderLayer(E, H, 48, 0.0, batch_first=True, norm_first=True, backend=backend))
    mha_ref, mha = pair(nn.MultiheadAttention(E, H, batch_first=True), tk_nn.MultiheadAttention(E, H, batch_first=True,
                                                                                               backend=backend))
    x = inputs(B, L, E, grad=False)
    with torch.autocast(x.device.type, dtype=dtype):
        a, b = ref(x), ours(x)
        ma, mb = mha_ref(x, x, x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0]
    assert b.dtype == a.dtype and mb.dtype == ma.dtype == dtype
    tol = 5e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(b.float(), a.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(mb.float(), ma.float(), atol=tol, rtol=tol)
