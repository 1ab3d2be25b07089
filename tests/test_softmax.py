"""masked_softmax on every backend against the reference: forward, backward, masks, layouts, edge cases."""

import contextlib

import pytest
import torch

import transformer_kernels as tk
from transformer_kernels import reference
from transformer_kernels.tools import testing
from transformer_kernels.tools.testing import GRADIENT_FACTOR, assert_close

# (backend, CUDA softmax algo): the CUDA backend runs both kernels on every length.
IMPLS = [("triton", None), ("cuda", "auto"), ("cuda", "warp"), ("cuda", "block"), ("torch", None)]
IMPL_IDS = [b if a is None else f"{b}-{a}" for b, a in IMPLS]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# On a GPU run the tensors live on the GPU (the Triton kernels take no CPU tensors outside the interpreter).
pytestmark = pytest.mark.usefixtures("on_test_device")


@contextlib.contextmanager
def impl(backend, algo):
    with tk.use_backend(backend), (testing.force_softmax_algo(algo) if algo else contextlib.nullcontext()):
        yield


def run_and_compare(backend, algo, x, mask=None, scale=1.0, is_causal=False, grad=None):
    """Runs the op and the fp32 reference; checks output and dx with the accuracy rule."""
    xk = x.detach().clone().requires_grad_()
    with impl(backend, algo):
        y = tk.ops.masked_softmax(xk, mask, scale, is_causal)
    x32 = x.detach().float().requires_grad_()
    m32 = mask if mask is None or mask.dtype == torch.bool else mask.float()
    ref32 = reference.masked_softmax(x32, m32, scale, is_causal)
    ref_lp = reference.masked_softmax(x.detach(), mask, scale, is_causal)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, ref32, ref_lp)
    g = torch.randn_like(y) if grad is None else grad
    with impl(backend, algo):
        y.backward(g)
    ref32.backward(g.float())
    xl = x.detach().clone().requires_grad_()
    reference.masked_softmax(xl, mask, scale, is_causal).backward(g)
    assert_close(xk.grad, x32.grad, xl.grad, GRADIENT_FACTOR, what="dx")
    return y, xk.grad


@pytest.mark.parametrize("backend,algo", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 33, 1000, 5000])
def test_lengths_and_dtypes(backend, algo, dtype, n):
    torch.manual_seed(n)
    x = (torch.randn(2, 3, 2, n) * 3).to(dtype)
    mask = torch.rand(2, n) > 0.25
    run_and_compare(backend, algo, x, mask, scale=0.7, is_causal=True)


@pytest.mark.parametrize("backend,algo", IMPLS, ids=IMPL_IDS)
def test_very_long_rows(backend, algo):
    torch.manual_seed(1)
    x = torch.randn(1, 2, 70000) * 4
    mask = torch.randn(70000)
    run_and_compare(backend, algo, x, mask, scale=0.5)


@pytest.mark.parametrize("backend,algo", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("n", [100, 5000])
def test_bf16_output_is_rounded_to_nearest(backend, algo, n):
    # The interpreter truncates fp32 -> bf16 (up to 1 ulp off); a GPU rounds. Kernels must round everywhere.
    torch.manual_seed(3)
    x = torch.randn(4, n).bfloat16()
    with impl(backend, algo):
        y = tk.ops.masked_softmax(x, None, 1.3).float()
    ref = reference.masked_softmax(x.float(), None, 1.3)
    half_ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 8)
    assert ((y - ref).abs() <= half_ulp * 1.01 + 1e-9).all()


MASK_SHAPES = [(9,), (5, 9), (1, 1, 5, 9), (2, 1, 1, 9), (2, 3, 5, 9)]


@pytest.mark.parametrize("backend,algo", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float32", "same"])
def test_mask_broadcast_shapes(backend, algo, shape, kind):
    torch.manual_seed(2)
    dtype = torch.float16 if kind == "float32" else torch.float32  # fp32 mask on fp16 scores
    x = torch.randn(2, 3, 5, 9).to(dtype)
    mask = torch.rand(shape) > 0.3 if kind == "bool" else torch.randn(shape)
    if kind == "same":
        mask = mask.to(dtype)
    y, _ = run_and_compare(backend, algo, x, mask, scale=1.3)
    # the same answer as the contiguous full mask
    with impl(backend, algo):
        full = tk.ops.masked_softmax(x, mask.expand(2, 3, 5, 9).contiguous(), 1.3)
    assert torch.equal(y, full)


@pytest.mark.parametrize("backend,algo", IMPLS, ids=IMPL_IDS)
def test_non_contiguous_inputs_and_expanded_grad(backend, algo):
    torch.manual_seed(3)
    base = torch.randn(2, 40, 3, 4)  # [B, L, H, D]-like; the view below has last-dim stride != 1
    x = base.permute(0, 2, 3, 1)[..., :37]
    assert not x.is_contiguous() and x.stride(-1) != 1
    mask = (torch.rand(37, 2) > 0.3).t()[0]  # a strided 1-D view
    grad = torch.randn(1, 1, 1, 37).expand(x.shape)  # what .sum()-style reductions give
    run_and_compare(backend, algo, x, mask, scale=0.9, grad=grad)


@pytest.mark.parametrize("backend,algo", IMPLS, ids=IMPL_IDS)
def test_fully_masked_rows_are_zero_with_zero_grad(backend, algo):
    torch.manual_seed(4)
    x = torch.randn(2, 4, 6)
    mask = torch.rand(2, 4, 6) > 0.4
    mask[0, 1] = False
    mask[1] = False
    y, dx = run_and_compare(backend, algo, x, mask)
    assert torch.equal(y[1], torch.zeros_like(y[1])) and torch.equal(y[0, 1], torch.zeros(6))
    assert torch.equal(dx[1], torch.zeros_like(dx[1]))
    # -inf float masks and causal rows past the end behave the same
    bias = torch.zeros(2, 4, 6).masked_fill(~mask, float("-inf"))
    y2, dx2 = run_and_compare(backend, algo, x, bias)
    assert torch.isfinite(y2).all() and torch.isfinite(dx2).all()


@pytest.mark.parametrize("backend,algo", IMPLS, ids=IMPL_IDS)
def test_nan_under_bool_mask_does_not_leak_and_big_scores_stay_finite(backend, algo):
    x = torch.randn(3, 8, dtype=torch.float16)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[:, -2:] = False
    x[:, -2:] = float("nan")
    x[:, -3] = 60000.0  # fp16 scores near the top of the range; scaled by 2 they overflow fp16
    x[2, 0] = float("inf")
    with impl(backend, algo):
        y = tk.ops.masked_softmax(x, mask, scale=2.0)
    assert torch.isfinite(y[:2]).all()
    assert torch.equal(y[:2, -2:], torch.zeros(2, 2, dtype=torch.float16))
    torch.testing.assert_close(y[:2, -3].float(), torch.ones(2))
    # below -5e4 everywhere but unmasked: an exact softmax, no sentinel clash
    low = torch.full((1, 5), -6e4) + torch.arange(5.0)
    run_and_compare(backend, algo, low)


@pytest.mark.parametrize("backend,algo", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0, 4)], ids=str)
def test_zero_sizes(backend, algo, shape):
    x = torch.randn(shape, requires_grad=True)
    with impl(backend, algo):
        y = tk.ops.masked_softmax(x, None, 1.0)
        y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape


@pytest.mark.parametrize("backend,algo", IMPLS, ids=IMPL_IDS)
def test_deterministic(backend, algo):
    torch.manual_seed(5)
    x = torch.randn(4, 300)
    with impl(backend, algo):
        assert torch.equal(tk.ops.masked_softmax(x, None, 0.3), tk.ops.masked_softmax(x, None, 0.3))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_opcheck(backend):
    torch.manual_seed(6)
    x = torch.randn(2, 3, 17, requires_grad=True)
    mask = torch.rand(3, 17) > 0.3
    torch.library.opcheck(torch.ops.transformer_kernels.masked_softmax.default, (x, mask, 0.5, True, backend))
    torch.library.opcheck(torch.ops.transformer_kernels.masked_softmax.default, (x, None, 1.0, False, backend))


def test_gradcheck_fp64_torch_backend():
    torch.manual_seed(7)
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(4, 5) > 0.4
    mask[1] = False
    with tk.use_backend("torch"):
        assert torch.autograd.gradcheck(lambda t: tk.ops.masked_softmax(t, mask, 0.8, is_causal=True), (x,))


def test_auto_consults_dtype_support_on_cuda_tensors():
    # float64 is beyond both kernel backends: auto resolves to the torch backend instead of a kernel that raises
    # (resolved without running anything, so it holds without a GPU).
    x = torch.empty(2, 3, dtype=torch.float64)
    assert tk.backends.resolve_for("masked_softmax", "softmax", torch.device("cuda"), "auto", x) == "torch"


def test_auto_uses_the_torch_backend_on_cpu():
    # auto on CPU tensors runs the eager composition (PyTorch's own ops), which agrees with the oracle.
    x = torch.randn(3, 5, device="cpu")
    assert tk.backends.resolve("masked_softmax", x.device, "auto") == "torch"
    with tk.use_backend("auto"):
        torch.testing.assert_close(tk.ops.masked_softmax(x), reference.masked_softmax(x), atol=1e-7, rtol=0)


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_bad_inputs_raise_before_launch(backend):
    with tk.use_backend(backend):
        with pytest.raises(TypeError, match="dtype"):
            tk.ops.masked_softmax(torch.ones(2, 3, dtype=torch.int32))
        with pytest.raises(ValueError, match=r"does not broadcast.*\(2, 3\)"):
            tk.ops.masked_softmax(torch.randn(2, 3), torch.ones(4, dtype=torch.bool))
        with pytest.raises(TypeError, match=r"bool.*floating"):
            tk.ops.masked_softmax(torch.randn(2, 3), torch.ones(3, dtype=torch.int64))
        with pytest.raises(ValueError, match="is_causal"):
            tk.ops.masked_softmax(torch.randn(3), is_causal=True)
    if backend != "torch":
        # A dtype the kernels lack on a forced kernel backend: NotImplementedError naming both, as for every op.
        with tk.use_backend(backend), pytest.raises(NotImplementedError, match=rf"{backend}.*float64"):
            tk.ops.masked_softmax(torch.randn(2, 3, dtype=torch.float64))


def test_backend_selection():
    assert tk.get_backend() == "auto"
    with tk.use_backend("cuda"):
        assert tk.get_backend() == "cuda"
        with tk.use_backend("torch"):
            assert tk.get_backend() == "torch"
        assert tk.get_backend() == "cuda"
    tk.set_backend("triton")
    try:
        assert tk.get_backend() == "triton"
    finally:
        tk.set_backend("auto")
    with pytest.raises(ValueError, match="backend must be one of"):
        tk.set_backend("cudnn")
