"""linear_cross_entropy on every backend against the reference: reductions, ignored targets, label smoothing,
softcap, ragged chunks, large logits, and the peak memory of the fused op against the unfused pair."""

import pytest
import torch
import torch.nn.functional as F

import transformer_kernels as tk
from transformer_kernels import reference
from transformer_kernels.ops import cross_entropy
from transformer_kernels.ops.cross_entropy import chunk_rows
from transformer_kernels.tools.testing import assert_rows, compare, peak_allocated_bytes

BACKENDS = ["triton", "cuda", "torch"]
KERNEL_BACKENDS = ["triton", "cuda"]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # The sizes here fit one chunk of MIN_CHUNK_LOGITS: chunked as a large vocabulary would be (about x's size of
    # logits per chunk), so that ragged chunks, the dW slabs and the cross-chunk sums are what these tests check.
    monkeypatch.setattr(cross_entropy, "MIN_CHUNK_LOGITS", 1)


def check(backend, x, w, b, target, what, fp32_dweight=True, **kw):
    inputs = {"x": x, "w": w, "b": b}

    def ours(x, w, b):
        with tk.use_backend(backend):
            return tk.ops.linear_cross_entropy(x, w, target, b, **kw, fp32_dweight=fp32_dweight)

    def ref(x, w, b):
        return reference.linear_cross_entropy(x, w, target, b, **kw)

    assert_rows(compare(ours, ref, inputs, grad_of=tuple(n for n, t in inputs.items() if t is not None)), what)


def data(rows, hidden, vocab, dtype, device, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=g) * scale).to(dtype).to(device)
    w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).to(dtype).to(device)
    b = torch.randn(vocab, generator=g).to(dtype).to(device)
    target = torch.randint(0, vocab, (rows,), generator=g).to(device)
    target[::5] = -100  # ignored rows scattered through the chunks
    return x, w, b, target


# 37 rows of 100 classes over 16 features: chunks of 8 rows, the last one ragged.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reductions(backend, reduction, dtype, device):
    assert 37 % chunk_rows(37, 100, 16) != 0
    x, w, b, target = data(37, 16, 100, dtype, device)
    check(backend, x, w, b, target, f"{backend} {reduction} {dtype}", reduction=reduction, z_loss=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_smoothing_softcap_no_bias(backend, device):
    x, w, _, target = data(3 * 11, 24, 1500, torch.float16, device, seed=1, scale=4.0)
    # [3, 11, 24] tokens with a [3, 11] target, a vocabulary past one 1024-column tile, no bias.
    check(backend, x.view(3, 11, 24), w, None, target.view(3, 11), f"{backend} smoothing+softcap+z-loss",
          label_smoothing=0.1, softcap=3.0, z_loss=1e-2)
    check(backend, x.view(3, 11, 24), w, None, target.view(3, 11), f"{backend} smoothing", label_smoothing=0.25,
          reduction="sum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_target_ignored_one_row_and_huge_logits(backend, device):
    x, w, b, _ = data(6, 8, 50, torch.float32, device)
    ignored = torch.full((6,), -1, device=device)
    for reduction in ("mean", "sum"):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = tk.ops.linear_cross_entropy(xg, wg, ignored, ignore_index=-1, reduction=reduction, backend=backend)
        expected = F.cross_entropy(x @ w.t(), ignored, ignore_index=-1, reduction=reduction)
        assert loss.isnan().item() == expected.isnan().item() == (reduction == "mean")
        loss.backward()
        assert torch.equal(xg.grad, torch.zeros_like(x)) and torch.equal(wg.grad, torch.zeros_like(w))
    check(backend, x[:1], w, b, torch.tensor([7], device=device), f"{backend} one row")
    # Logits near 1e4 (exp overflows past 88), bf16 as models hold them: the running max keeps them finite. (In fp32
    # such logits carry 5e-4 of rounding each, which the reference shares: the comparison would measure the GEMMs.)
    check(backend, (x * 300).bfloat16(), w.bfloat16(), b.bfloat16(), torch.arange(6, device=device),
          f"{backend} huge logits", reduction="none")


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch < 2.13 has no F.linear_cross_entropy")
def test_matches_torch_linear_cross_entropy(device):
    x, w, b, target = data(37, 16, 100, torch.float32, device)
    ours = tk.ops.linear_cross_entropy(x, w, target, b, label_smoothing=0.1, backend="triton")
    theirs = F.linear_cross_entropy(x, w, target, linear_bias=b, label_smoothing=0.1)
    assert_rows([("loss", (ours - theirs).abs().item(), 1e-5)])


def test_peak_memory_is_a_chunk_not_the_logits(device):
    # 128 tokens, 8192 classes: the unfused pair's logits and their gradient are 4 MiB each; the fused op holds one
    # chunk of logits (chunk_rows = 1 row here: 32 KiB), the fp32 dW accumulator and dW (256 KiB each).
    x, w, _, target = data(128, 8, 8192, torch.float32, device)
    x.requires_grad_(), w.requires_grad_()

    def fused():
        tk.ops.linear_cross_entropy(x, w, target, backend="triton").backward()

    def pair():
        F.cross_entropy(F.linear(x, w), target).backward()

    fused(), pair()  # warm, as above
    ours, theirs = peak_allocated_bytes(fused), peak_allocated_bytes(pair)
    assert theirs >= 2 * 128 * 8192 * 4
    assert ours <= 0.1 * theirs, (ours, theirs)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dweight_summed_in_the_weights_dtype(backend, device):
    # fp32_dweight=False: dW summed in bf16 over the 5 chunks (one rounding per chunk), within the accuracy rule at
    # this size, and without the fp32 buffer (4 bytes per weight element in place of the 2 of a bf16 one).
    x, w, b, target = data(37, 16, 100, torch.bfloat16, device, seed=2)
    check(backend, x, w, b, target, f"{backend} bf16 dW", fp32_dweight=False)
    x.requires_grad_(), w.requires_grad_()

    def step(fp32_dweight):
        return lambda: tk.ops.linear_cross_entropy(x, w, target, fp32_dweight=fp32_dweight, backend=backend).backward()

    step(True)(), step(False)()  # first calls fill the host caches (plans, autotune choices): measured warm
    assert peak_allocated_bytes(step(True)) - peak_allocated_bytes(step(False)) >= 100 * 16 * 2


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_retain_graph_and_grad_outputs(backend, device):
    # The gradients formed in the forward pass are scaled by each backward's grad_output, never in place: a second
    # and third backward through the same graph (retain_graph) add the right amounts.
    x, w, _, target = data(10, 8, 30, torch.float32, device)
    x.requires_grad_(), w.requires_grad_()
    loss = tk.ops.linear_cross_entropy(x, w, target, backend=backend)
    loss.backward(torch.tensor(2.0, device=device), retain_graph=True)
    first = x.grad.clone(), w.grad.clone()
    loss.backward(torch.tensor(5.0, device=device), retain_graph=True)
    loss.backward(torch.tensor(-1.0, device=device))
    torch.testing.assert_close(x.grad, first[0] * 3, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w.grad, first[1] * 3, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_with_fp32_weights(backend, device):
    # Mixed-precision training: bf16 activations, fp32 weights. The GEMMs run in bf16 and the loss comes back in fp32,
    # as torch's linear then cross_entropy give it under autocast; the gradients in the parameters' dtypes.
    x, w, _, target = data(12, 16, 50, torch.float32, device)
    xb, w = x.bfloat16().requires_grad_(), w.requires_grad_()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = tk.ops.linear_cross_entropy(xb, w, target, backend=backend)
        expected = F.cross_entropy(F.linear(x.bfloat16(), w.detach()), target)
    loss.backward()
    assert loss.dtype == expected.dtype == torch.float32
    assert xb.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert_rows([("loss", (loss - expected).abs().item(), 2e-2)])


def test_bad_inputs(device):
    x, w, b, target = data(4, 8, 10, torch.float32, device)
    with pytest.raises(ValueError, match="weight must be"):
        tk.ops.linear_cross_entropy(x, w[:, :4], target)
    with pytest.raises(ValueError, match="target must be"):
        tk.ops.linear_cross_entropy(x, w, target.float())
    with pytest.raises(ValueError, match="target must be"):
        tk.ops.linear_cross_entropy(x, w, target[:3])
    with pytest.raises(ValueError, match="reduction"):
        tk.ops.linear_cross_entropy(x, w, target, reduction="avg")
    with pytest.raises(ValueError, match="softcap"):
        tk.ops.linear_cross_entropy(x, w, target, softcap=0.0)
    with pytest.raises(ValueError, match="bias"):
        tk.ops.linear_cross_entropy(x, w, target, b[:3])
    with pytest.raises(ValueError, match="z_loss"):
        tk.ops.linear_cross_entropy(x, w, target, z_loss=-1.0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend, device):
    x, w, b, target = data(9, 8, 30, torch.float32, device)
    op = torch.ops.transformer_kernels.linear_cross_entropy.default
    for reduction, needs in (("mean", (True, True, True)), ("none", (False, False, False))):
        torch.library.opcheck(op, (x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(),
                                   target, None, -100, 0.1, 2.0, 1e-3, reduction, *needs, True, backend))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_torch_compile_fullgraph_with_rotary(backend, device):
    # A Llama-like tail in one compiled graph: rotary on q and k, then the fused loss over the rotated features;
    # forward and backward through the custom ops (fake impls, autograd), no graph break.
    torch._dynamo.reset()
    x, w, _, target = data(2 * 6, 16, 40, torch.float32, device)
    angles = torch.rand(6, 8, generator=torch.Generator().manual_seed(5)).repeat(1, 2).to(device)
    cos, sin = angles.cos(), angles.sin()

    def step(x, w):
        q, k = tk.ops.rotary(x.view(2, 1, 6, 16), x.view(2, 1, 6, 16) * 0.5, cos, sin, backend=backend)
        return tk.ops.linear_cross_entropy((q + k).view(12, 16), w, target, label_smoothing=0.1, backend=backend)

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(xg, wg)
        loss.backward()
        grads.append((loss.detach(), xg.grad, wg.grad))
    for eager, compiled in zip(*grads, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
