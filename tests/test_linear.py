"""linear / gated_linear / qkv_projection / out_projection / feed_forward against the reference."""

from typing import ClassVar

import pytest
import torch

import transformer_kernels as tk
from transformer_kernels import reference
from transformer_kernels.ops.attention import draw_seed
from transformer_kernels.tools import testing
from transformer_kernels.tools.testing import assert_rows, compare

BACKENDS = ["triton", "cuda", "torch"]
KERNEL_BACKENDS = ["triton", "cuda"]
LOW = [torch.float16, torch.bfloat16]


def rand(*shape, dtype=torch.float32, device="cpu", scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


def check_linear(backend, m, n, k, dtype, device, activation="gelu", residual=True, bias=True):
    inputs = {"x": rand(m, k, dtype=dtype, device=device), "w": rand(n, k, dtype=dtype, device=device, scale=k**-0.5),
              "b": rand(n, dtype=dtype, device=device) if bias else None,
              "r": rand(m, n, dtype=dtype, device=device, seed=1) if residual else None}

    def ours(x, w, b, r):
        with tk.use_backend(backend):
            return tk.ops.linear(x, w, b, activation, r)

    grads = tuple(name for name, t in inputs.items() if t is not None)
    assert_rows(compare(ours, lambda x, w, b, r: reference.linear(x, w, b, activation, r), inputs, grads),
                f"linear {backend} {dtype} {m}x{n}x{k}")


SIZES = [(1, 37, 100), (37, 1, 341), (100, 341, 1), (341, 100, 37), (1000, 37, 100), (37, 100, 4231), (4231, 37, 16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,n,k", SIZES, ids=str)
def test_linear_sizes_not_multiples_of_16(backend, m, n, k, device):
    check_linear(backend, m, n, k, torch.float32, device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh", "silu"])
def test_linear_activations_low_precision(backend, dtype, activation, device):
    check_linear(backend, 45, 70, 100, dtype, device, activation)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
@pytest.mark.parametrize("k", [30, 0])  # K = 0: no dW GEMM to carry dBias, summed from dZ on its own
def test_linear_dropout_matches_reference_with_the_kernels_mask(backend, dtype, k, device):
    m, n, p = 50, 40, 0.3
    x, w, b, r = rand(m, k, dtype=dtype, device=device), rand(n, k, dtype=dtype, device=device, scale=0.2), \
        rand(n, dtype=dtype, device=device), rand(m, n, dtype=dtype, device=device, seed=2)
    torch.manual_seed(5)
    # linear draws over the [M, N] grid as attention does over [B·H·Lq, Lk]: the same helper materialises it.
    keep = testing.dropout_keep_mask(draw_seed(device), (1, 1, m, n), p, device)[0, 0]

    def ours(x, w, b, r):
        torch.manual_seed(5)
        with tk.use_backend(backend):
            return tk.ops.linear(x, w, b, "silu", r, dropout_p=p)

    rows = compare(ours, lambda x, w, b, r: reference.linear(x, w, b, "silu", r, p, keep),
                   {"x": x, "w": w, "b": b, "r": r}, ("x", "w", "b", "r"))
    assert_rows(rows, "dropout")
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_gated_linear(backend, dtype, kind, device):
    act = reference.GATED_ACTIVATIONS[kind]
    m, n, k = 37, 50, 64
    inputs = {"x": rand(m, k, dtype=dtype, device=device), "wg": rand(n, k, dtype=dtype, device=device, scale=0.15),
              "wu": rand(n, k, dtype=dtype, device=device, scale=0.15, seed=3), "bg": rand(n, dtype=dtype, device=device),
              "bu": rand(n, dtype=dtype, device=device, seed=4)}

    def ours(x, wg, wu, bg, bu):
        with tk.use_backend(backend):
            return tk.ops.gated_linear(x, wg, wu, bg, bu, act)

    assert_rows(compare(ours, lambda x, wg, wu, bg, bu: reference.gated_linear(x, wg, wu, bg, bu, act), inputs,
                        tuple(inputs)), f"{kind} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_qkv_projection_writes_heads_layout(backend, dtype, hkv, device):
    b, length, e, h, d = 2, 13, 48, 4, 12
    inputs = {"x": rand(b, length, e, dtype=dtype, device=device),
              "w": rand((h + 2 * hkv) * d, e, dtype=dtype, device=device, scale=0.15),
              "bias": rand((h + 2 * hkv) * d, dtype=dtype, device=device)}

    def flat(fn):
        def run(x, w, bias):
            q, k, v = fn(x, w, bias)
            assert q.shape == (b, h, length, d) and k.shape == v.shape == (b, hkv, length, d)
            return torch.cat([q.flatten(), 2 * k.flatten(), 3 * v.flatten()])
        return run

    def ours(x, w, bias):
        with tk.use_backend(backend):
            return tk.ops.qkv_projection(x, w, bias, h, hkv)

    rows = compare(flat(ours), flat(lambda x, w, bias: reference.qkv_projection(x, w, bias, h, hkv)), inputs, tuple(inputs))
    assert_rows(rows, f"qkv {dtype} hkv={hkv}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_out_projection_reads_heads_layout(backend, dtype, device):
    b, h, length, d, e = 2, 3, 11, 16, 40
    # attention output as a kernel would leave it, and as a transposed view of [B, L, H, D]
    for attn in (rand(b, h, length, d, dtype=dtype, device=device),
                 rand(b, length, h, d, dtype=dtype, device=device).transpose(1, 2)):
        inputs = {"a": attn, "w": rand(e, h * d, dtype=dtype, device=device, scale=0.15),
                  "bias": rand(e, dtype=dtype, device=device), "r": rand(b, length, e, dtype=dtype, device=device)}

        def ours(a, w, bias, r):
            with tk.use_backend(backend):
                return tk.ops.out_projection(a, w, bias, r)

        assert_rows(compare(ours, reference.out_projection, inputs, tuple(inputs)), f"out_proj {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_feed_forward(backend, dtype, device):
    e, f = 40, 96
    inputs = {"x": rand(3, 9, e, dtype=dtype, device=device), "w1": rand(f, e, dtype=dtype, device=device, scale=0.15),
              "b1": rand(f, dtype=dtype, device=device), "w2": rand(e, f, dtype=dtype, device=device, scale=0.1),
              "b2": rand(e, dtype=dtype, device=device), "r": rand(3, 9, e, dtype=dtype, device=device, seed=7)}

    def ours(x, w1, b1, w2, b2, r):
        with tk.use_backend(backend):
            return tk.ops.feed_forward(x, w1, b1, w2, b2, "gelu", residual=r)

    def ref(x, w1, b1, w2, b2, r):
        # two linears, so the low-precision reference rounds the hidden activation as the fused pair does
        return reference.linear(reference.linear(x, w1, b1, "gelu"), w2, b2, residual=r)

    assert_rows(compare(ours, ref, inputs, tuple(inputs)), f"ffn {dtype}")
    # in fp64 the composition is the oracle's feed_forward itself
    d = {n: t.double() for n, t in inputs.items()}
    torch.testing.assert_close(ref(*d.values()), reference.feed_forward(d["x"], d["w1"], d["b1"], d["w2"], d["b2"], "gelu",
                                                                        d["r"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_expanded_grad_and_zero_sizes(backend, device):
    base = rand(30, 2 * 24, device=device)
    x = base[:, ::2].detach().requires_grad_()  # last-dim stride 2
    w = rand(17, 24, device=device, scale=0.2).requires_grad_()
    with tk.use_backend(backend):
        y = tk.ops.linear(x, w, None, "relu")
        y.sum().backward()  # expanded grad_output
    xc, wc = x.detach().contiguous().requires_grad_(), w.detach().clone().requires_grad_()
    reference.linear(xc, wc, None, "relu").sum().backward()
    torch.testing.assert_close(y, reference.linear(xc, wc, None, "relu"), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.grad, xc.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(w.grad, wc.grad, atol=1e-5, rtol=0)
    with tk.use_backend(backend):
        for m, n, k in [(0, 5, 7), (4, 0, 7), (4, 5, 0)]:
            xs = rand(m, k, device=device).requires_grad_()
            ws = rand(n, k, device=device).requires_grad_()
            bs = rand(n, device=device).requires_grad_()
            out = tk.ops.linear(xs, ws, bs, "gelu")
            out.sum().backward()
            ref = reference.linear(xs.detach(), ws.detach(), bs.detach(), "gelu")
            torch.testing.assert_close(out, ref)
            assert xs.grad.shape == xs.shape and ws.grad.shape == ws.shape


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend, device):
    x, w, b, r = rand(9, 20, device=device), rand(12, 20, device=device), rand(12, device=device), rand(9, 12, device=device)
    ops = torch.ops.transformer_kernels
    cases = [
        (ops.linear.default, (x, w, b, r, "gelu", 0.0, None, backend)),
        (ops.linear.default, (x, w, None, None, "", 0.2, torch.tensor([3], device=device), backend)),
        (ops.gated_linear.default, (x, w, w * 0.5, b, b, "silu", backend)),
        (ops.qkv_projection.default, (rand(2 * 5, 16, device=device), rand(3 * 2 * 4, 16, device=device), None, 2, 2, 2,
                                      backend)),
        (ops.out_projection.default, (rand(2, 3, 5, 4, device=device), rand(7, 12, device=device), None,
                                      rand(10, 7, device=device), backend)),
    ]
    for op, args in cases:
        args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)
        torch.library.opcheck(op, args)


def test_bad_inputs(device):
    x, w = rand(4, 8, device=device), rand(6, 8, device=device)
    with tk.use_backend("triton"):
        with pytest.raises(ValueError, match="in-features"):
            tk.ops.linear(x, rand(6, 7, device=device))
        with pytest.raises(TypeError, match="dtype"):
            tk.ops.linear(x, w.half())
        with pytest.raises(ValueError, match="bias"):
            tk.ops.linear(x, w, rand(5, device=device))
        with pytest.raises(ValueError, match="activation"):
            tk.ops.linear(x, w, None, "tanh")
        with pytest.raises(ValueError, match="num_heads"):
            tk.ops.qkv_projection(rand(1, 3, 8, device=device), rand(24, 8, device=device), None, 3, 2)
        with pytest.raises(ValueError, match="w_o"):
            tk.ops.out_projection(rand(1, 2, 3, 4, device=device), rand(5, 7, device=device))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dropout_seeding_and_disabling(backend, device):
    x, w = rand(64, 32, device=device), rand(48, 32, device=device, scale=0.2)

    def run(seed, p=0.25):
        torch.manual_seed(seed)
        with tk.use_backend(backend):
            return tk.ops.linear(x, w, None, "relu", dropout_p=p)

    torch.testing.assert_close(run(1), run(1), atol=0, rtol=0)
    assert not torch.equal(run(1), run(2))
    with tk.use_backend(backend):
        torch.testing.assert_close(run(1, p=0.0), tk.ops.linear(x, w, None, "relu"), atol=0, rtol=0)


def test_gradcheck_fp64_torch_backend():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(6, dtype=torch.float64, requires_grad=True)
    wqkv = torch.randn(3 * 2 * 2, 5, dtype=torch.float64, requires_grad=True)

    def fn(x, w1, w2, b1, wqkv):
        with tk.use_backend("torch"):
            h = tk.ops.feed_forward(x, w1, b1, w2, None, "gelu", residual=x)
            q, k, v = tk.ops.qkv_projection(h, wqkv, None, 2)
            return tk.ops.out_projection(q * k + v, torch.ones(5, 4, dtype=torch.float64))

    assert torch.autograd.gradcheck(fn, (x, w1, w2, b1, wqkv))


def test_only_some_inputs_require_grad_and_no_grad(device):
    x, w, b = rand(6, 8, device=device), rand(5, 8, device=device).requires_grad_(), rand(5, device=device)
    with tk.use_backend("triton"):
        tk.ops.linear(x, w, b, "silu").sum().backward()
        assert w.grad is not None and x.grad is None
        with torch.no_grad():
            assert not tk.ops.linear(x, w, b).requires_grad


def test_fp64_on_the_triton_backend_is_a_clear_error(device):
    x, w = (torch.randn(n, 4, dtype=torch.float64, device=device) for n in (3, 2))
    with pytest.raises(NotImplementedError, match=r"triton.*float64"), tk.use_backend("triton"):
        tk.ops.linear(x, w)


@pytest.mark.gpu
def test_more_than_2_31_elements():
    # [1, 540_000, 4096] fp16 input: 2.2e9 elements, so every offset must be 64-bit.
    x = torch.randn(540_000, 4096, device="cuda", dtype=torch.float16)
    w = torch.randn(64, 4096, device="cuda", dtype=torch.float16) * 0.02
    ref = (x[-1000:].float() @ w.float().t())
    for backend in KERNEL_BACKENDS:
        y = tk.ops.linear(x, w, backend=backend)
        torch.testing.assert_close(y[-1000:].float(), ref, atol=2e-2, rtol=1e-2)


@pytest.mark.gpu
def test_lm_head_weight_gradient_past_2_31():
    # dW = dYᵀ·X of an LM head: the GEMM reads dY transposed (stride N = vocab) along its K dim (tokens), so
    # token × vocab passes 2³¹ (65 536 × 50 257 = 3.3e9): the K offsets must be 64-bit.
    tokens, vocab, hidden = 65_536, 50_257, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.float16, generator=g)
    w = (torch.randn(vocab, hidden, device="cuda", dtype=torch.float16, generator=g) * 0.02).requires_grad_()
    dy = torch.zeros(tokens, vocab, device="cuda", dtype=torch.float16)
    dy[-7:, -5:] = 1.0  # only the last rows and columns: a wrapped offset reads or sums the wrong ones
    for backend in KERNEL_BACKENDS:
        w.grad = None
        tk.ops.linear(x, w, backend=backend).backward(dy)
        expected = x[-7:].float().sum(0)
        torch.testing.assert_close(w.grad[-5:].float(), expected.expand(5, hidden), atol=2e-2, rtol=1e-2)
        assert w.grad[:-5].abs().max().item() == 0


def test_gemm_autotune_is_keyed_on_size_buckets():
    # Keyed on exact sizes, every new token count (each step of a decoding loop without a cache) re-benchmarked.
    from transformer_kernels.kernels import linear as triton_linear
    from transformer_kernels.kernels.config import length_class

    keys = triton_linear._matmul.tuner.keys
    assert {"m_class", "n_class", "k_class"} <= set(keys) and not {"m", "n", "k"} & set(keys)
    assert length_class(33) == length_class(64) and length_class(65) != length_class(64)


def test_triton_qkv_projection_is_one_gemm(device, monkeypatch):
    # One launch reads x once and its epilogue writes q, k and v (GQA: fewer k/v heads), not three GEMMs over x.
    from transformer_kernels.kernels import linear as triton_linear

    calls = []
    real = triton_linear.matmul
    monkeypatch.setattr(triton_linear, "matmul", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 32, generator=g).to(device)
    w = (torch.randn((4 + 2 * 2) * 8, 32, generator=g) * 0.2).to(device)
    b = torch.randn((4 + 2 * 2) * 8, generator=g).to(device)
    with tk.use_backend("triton"):
        q, k, v = tk.ops.qkv_projection(x, w, b, 4, 2)
    assert len(calls) == 1
    for ours, ref in zip((q, k, v), reference.qkv_projection(x, w, b, 4, 2), strict=True):
        assert ours.is_contiguous()
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_triton_linear_backward_evaluates_the_activation_derivative_once_per_element(dropout_p):
    # dZ = dY·keep/(1−p)·gelu'(Z) is formed in one pass (one erf per element, counted by the interpreter over its
    # 32 x 64 tiles), then the dX and dW GEMMs read it: forming it in each GEMM's prologue would evaluate gelu' once
    # per output-column tile of each GEMM. Sizes are multiples of every tile, so the counts are exact.
    from transformer_kernels.kernels import linear as triton_linear

    m, n, k = 64, 128, 96
    assert m % triton_linear.DACT_BLOCK[0] == 0 and n % triton_linear.DACT_BLOCK[1] == 0
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=g).mul_(0.2).requires_grad_() for s in ((m, k), (n, k), (n,)))
    with testing.count_interpreted_work() as forward:
        y = tk.ops.linear(x, w, b, "gelu", dropout_p=dropout_p, backend="triton")
    with testing.count_interpreted_work() as backward:
        y.backward(torch.randn(m, n, generator=g))
    assert forward.erf_elements == m * n and backward.erf_elements == m * n
    # exactly those passes: the forward one GEMM with its epilogue, the backward the dZ pass and the two GEMMs
    assert forward.launches == ["matmul_kernel"]
    assert sorted(backward.launches) == ["dact_kernel", "matmul_kernel", "matmul_kernel"], backward.launches
    # the backward's products: dX = dZ·W and dW = dZᵀ·X, 2·M·N·K FLOPs each, as the forward's one
    assert backward.matmul_flops == 2 * forward.matmul_flops == 2 * (2 * m * n * k)
    if dropout_p == 0.0:
        ref = reference.linear(x.detach(), w.detach(), b.detach(), "gelu")
        torch.testing.assert_close(y.detach(), ref, atol=1e-5, rtol=1e-5)


class _PackWidths:
    """Stands in for the CUDA module: records the elements per global access (csrc/epilogue.cu: `pack_width`) each
    element-wise launch takes, then launches it."""

    PROBES: ClassVar = {"epilogue_forward": lambda m, d: m.epilogue_pack_width(d),
              "activation_backward": lambda m, d: m.activation_backward_pack_width(d),
              "head_split": lambda m, d: m.head_layout_pack_width(d, False),
              "head_merge": lambda m, d: m.head_layout_pack_width(d, True)}

    def __init__(self, module):
        self.module, self.widths = module, set()

    def __getattr__(self, name):
        launcher = getattr(self.module, name)
        if name not in self.PROBES:
            return launcher

        def launch(d, stream):
            self.widths.add((name, self.PROBES[name](self.module, d)))
            return launcher(d, stream)
        return launch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_elementwise_kernels_take_16_byte_packs_where_rows_allow(dtype, device, monkeypatch):
    # Widths a multiple of 16 bytes take the packed kernels (8 fp16/bf16 or 4 fp32 elements an access), others one
    # element an access; both against the reference, forward and every gradient, with an odd row count (the kernels'
    # two-row step has a tail) and dropout (its draw per column inside a pack).
    from transformer_kernels import _ext
    from transformer_kernels.cuda import linear as cuda_linear
    recorder = _PackWidths(_ext.module_for(torch.device(device)))
    monkeypatch.setattr(cuda_linear._ext, "module_for", lambda _: recorder)
    pack = 16 // dtype.itemsize
    torch.manual_seed(3)
    for n in (64, 70 if dtype.itemsize == 2 else 66):
        check_linear("cuda", 33, n, 24, dtype, device, "gelu_tanh")
        inputs = {"x": rand(2, 5, 32, dtype=dtype, device=device),
                  "w": rand(3 * n, 32, dtype=dtype, device=device, scale=0.15),
                  "wo": rand(n, n, dtype=dtype, device=device, scale=0.15, seed=1)}

        h = 4 if n % 16 == 0 else 1  # head dim 16 (packs never straddle heads) or the whole odd width

        def heads(x, w, wo, h=h):
            with tk.use_backend("cuda"):
                q, k, v = tk.ops.qkv_projection(x, w, None, h, h)
                return tk.ops.out_projection(q + k * v, wo, None)

        def ref(x, w, wo, h=h):
            q, k, v = reference.qkv_projection(x, w, None, h, h)
            return reference.out_projection(q + k * v, wo, None)

        assert_rows(compare(heads, ref, inputs, tuple(inputs)), f"qkv/out {dtype} n={n}")
    seen = {(name, width) for name, width in recorder.widths}
    for name in _PackWidths.PROBES:
        assert {(name, pack), (name, 1)} <= seen, (name, sorted(seen))
