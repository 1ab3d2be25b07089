"""layer_norm / rms_norm (with the fused residual add) on every backend against the reference."""

import pytest
import torch

import transformer_kernels as tk
from transformer_kernels import reference
from transformer_kernels.kernels import norm as triton_norm
from transformer_kernels.tools.testing import assert_rows, compare

BACKENDS = ["triton", "cuda", "torch"]
KERNEL_BACKENDS = ["triton", "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run(kind, backend, x, w, b, r, eps=1e-5):
    """y + 0.5·s so that the gradient through both outputs (normalised and pre-norm sum) is checked."""
    with tk.use_backend(backend):
        if kind == "rms":
            y, s = tk.ops.rms_norm(x, w, eps, r, return_residual=True)
        else:
            y, s = tk.ops.layer_norm(x, w, b, eps, r, return_residual=True)
    return y + 0.5 * s


def ref(kind, x, w, b, r, eps=1e-5):
    if kind == "rms":
        y, s = reference.rms_norm(x, w, eps, r, return_residual=True)
    else:
        y, s = reference.layer_norm(x, w, b, eps, r, return_residual=True)
    return y + 0.5 * s


def check(kind, backend, x, w, b, r):
    inputs = {"x": x, "w": w, "b": b, "r": r}
    grads = tuple(n for n, t in inputs.items() if t is not None and not (kind == "rms" and n == "b"))
    rows = compare(lambda x, w, b, r: run(kind, backend, x, w, b, r), lambda x, w, b, r: ref(kind, x, w, b, r),
                   inputs, grad_of=grads)
    assert_rows(rows, f"{kind} ({x.dtype}, {backend})")


# LayerNorm of a single element is degenerate (variance 0, rstd = 1/sqrt(eps) amplifies the reference's own
# rounding): it starts at 2.
SIZES = {"ln": [2, 37, 1000, 4231, 8192], "rms": [1, 37, 1000, 4231, 8192]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,n", [(k, n) for k in SIZES for n in SIZES[k]])
def test_sizes_dtypes_residual(backend, dtype, kind, n, device):
    g = torch.Generator().manual_seed(n)
    x, r = ((torch.randn(3, 5, n, generator=g) * 2 + 1).to(dtype).to(device) for _ in range(2))
    w, b = (torch.randn(n, generator=g).to(dtype).to(device) for _ in range(2))
    check(kind, backend, x, w, b if kind == "ln" else None, r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["ln", "rms"])
def test_without_residual_and_without_affine(backend, kind, device):
    x = torch.randn(7, 48, device=device)
    check(kind, backend, x, torch.randn(48, device=device), torch.randn(48, device=device) if kind == "ln" else None, None)
    with tk.use_backend(backend):
        y = tk.ops.layer_norm(x) if kind == "ln" else tk.ops.rms_norm(x)
    ref_y = reference.layer_norm(x, None, None) if kind == "ln" else reference.rms_norm(x, None)
    torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_expanded_grad_and_zero_rows(backend, device):
    base = torch.randn(6, 2 * 33, device=device)
    x = base[:, ::2].detach().requires_grad_()  # last-dim stride 2
    w = torch.randn(33, device=device, requires_grad=True)
    with tk.use_backend(backend):
        y = tk.ops.layer_norm(x, w, None)
        y.sum().backward()  # expanded grad_output
    xc = x.detach().contiguous().requires_grad_()
    wc = w.detach().clone().requires_grad_()
    reference.layer_norm(xc, wc, None).sum().backward()
    torch.testing.assert_close(y, reference.layer_norm(xc, wc, None), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.grad, xc.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(w.grad, wc.grad, atol=1e-5, rtol=0)
    with tk.use_backend(backend):
        empty = torch.randn(0, 33, device=device, requires_grad=True)
        out = tk.ops.rms_norm(empty, w)
        out.sum().backward()
    assert out.shape == (0, 33) and empty.grad.shape == (0, 33)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_nn(backend, device):
    ln = torch.nn.LayerNorm(40, eps=1e-6).to(device)
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    x = torch.randn(4, 9, 40, device=device)
    with tk.use_backend(backend):
        torch.testing.assert_close(tk.ops.layer_norm(x, ln.weight, ln.bias, 1e-6), ln(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(tk.ops.rms_norm(x, ln.weight, 1e-6),
                                   torch.nn.functional.rms_norm(x, (40,), ln.weight, 1e-6), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_deterministic(backend, device):
    x = torch.randn(100, 300, device=device)
    w = torch.randn(300, device=device)
    grads = []
    for _ in range(2):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        with tk.use_backend(backend):
            tk.ops.layer_norm(xx, ww, None).backward(torch.ones(100, 300, device=device))
        grads.append((xx.grad, ww.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend, device):
    x = torch.randn(5, 24, device=device)
    r = torch.randn(5, 24, device=device)
    w, b = torch.randn(24, device=device), torch.randn(24, device=device)
    for args in [(x, r, w, b, 1e-5, False, backend), (x, None, w, None, 1e-6, True, backend)]:
        args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(torch.ops.transformer_kernels.norm.default, args)


def test_gradcheck_fp64_torch_backend():
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def fn(x, r, w):
        with tk.use_backend("torch"):
            return tk.ops.layer_norm(x, w, None, 1e-5, r, return_residual=True)

    assert torch.autograd.gradcheck(fn, (x, r, w))


def test_bad_inputs_and_unsupported_sizes(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="weight"), tk.use_backend("triton"):
        tk.ops.layer_norm(x, torch.ones(7, device=device))
    with pytest.raises(ValueError, match="residual"), tk.use_backend("triton"):
        tk.ops.rms_norm(x, None, residual=torch.ones(4, 9, device=device))
    with pytest.raises(TypeError, match="x must have dtype"), tk.use_backend("triton"):
        tk.ops.layer_norm(x.long())
    big = torch.randn(1, triton_norm.MAX_BACKWARD_COLS + 1, device=device)
    with pytest.raises(NotImplementedError, match="hidden size"), tk.use_backend("triton"):
        tk.ops.layer_norm(big)
    # The CUDA kernels loop over any row length, forward and backward.
    big.requires_grad_()
    with tk.use_backend("cuda"):
        y = tk.ops.layer_norm(big)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(big, big.shape[-1:]), atol=1e-5, rtol=0)
    assert big.grad.abs().max() < 1e-3  # d(sum of a layer norm)/dx = 0


def test_cuda_norm_plans_hold_rows_in_registers_at_model_widths():
    # csrc/norm.cu: which kernel a shape takes — (16-byte packs a thread, threads a block, backward row chunks); 0
    # packs = the general kernel. The hidden sizes of BERT/GPT-2 (768, 1024), Llama-7B (4096) and Llama-70B (8192)
    # in fp16/bf16 read the row once with 16-byte accesses forward; backward up to 4096. Unaligned rows and widths
    # that are not whole packs take the general kernels.
    from transformer_kernels import _ext
    c = _ext.load("_C_host")

    def plan(cols, dtype="bfloat16", backward=False, x_row_stride=None, rows=16384):
        args = {"x": 0, "residual": 0, "weight": 0, "bias": 0, "rows": rows, "cols": cols,
                "x_row_stride": cols if x_row_stride is None else x_row_stride, "res_row_stride": cols, "eps": 1e-5,
                "rms": 0, "dtype": c.dtype_codes[dtype], "y": 0, "sum": 0, "mean": 0, "rstd": 0, "dy": 0,
                "dy_row_stride": cols, "dx": 0, "dw": 0, "db": 0, "dw_partial": 0, "db_partial": 0}
        return tuple(c.norm_plan(args, backward))

    assert plan(768) == (1, 96, 682) and plan(768, backward=True) == (1, 96, 682)
    assert plan(1024)[:2] == (1, 128) and plan(4096)[:2] == (2, 256) and plan(4096, backward=True)[:2] == (2, 256)
    assert plan(8192)[:2] == (4, 256) and plan(8192, backward=True)[0] == 0
    assert plan(4096, "float32")[:2] == (4, 256) and plan(4096, "float32", backward=True)[0] == 0
    assert plan(1000)[:2] == (1, 128)  # 125 packs
    assert plan(4100) == plan(37) == (0, 256, 256)
    # the chunk count (the partial buffers' rows) is the shape's alone: the same whether or not the rows align
    assert plan(768, backward=True, x_row_stride=772) == (0, 256, 682)
    assert c.norm_backward_chunks(16384, 768, c.dtype_codes["bfloat16"]) == 682
    assert plan(768, backward=True, rows=100)[2] == 100


@pytest.mark.parametrize("kind", ["ln", "rms"])
@pytest.mark.parametrize("dtype,n", [(torch.bfloat16, 4096), (torch.float32, 1024)], ids=str)
def test_cuda_packed_backward_over_row_chunks(kind, dtype, n, device):
    # 300 rows over 256 row chunks: two rows a chunk (the next row loaded while this one reduces), chunks past the
    # last row (their dW/dB partials stay zero); bf16 4096 holds two packs a thread, fp32 1024 one.
    g = torch.Generator().manual_seed(1)
    x, r = ((torch.randn(300, n, generator=g) * 2 + 1).to(dtype).to(device) for _ in range(2))
    w, b = (torch.randn(n, generator=g).to(dtype).to(device) for _ in range(2))
    check(kind, "cuda", x, w, b if kind == "ln" else None, r)
