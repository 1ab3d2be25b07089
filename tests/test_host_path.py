"""The host path of an op call: a budget of Python calls per call (so per-call Python work cannot creep back; no
wall-clock time is asserted), the eager path against the custom-op dispatcher bit for bit, and the checks that a
cached answer must never skip. The host benchmark itself (`bench --host`) runs in tests/test_bench.py's style below."""

import sys

import pytest
import torch

import transformer_kernels as tk
from transformer_kernels import backends
from transformer_kernels.ops import _dispatch
from transformer_kernels.tools import bench_host

# Python function calls (sys.setprofile "call" events) in one repeated call of each bench_host case on the CPU with the
# launches stubbed, the case's own lambdas included: (triton, cuda). Set from the path this guard was written for
# (torch 2.13, triton 3.9) plus 15% for other versions' own Python; raise one only with a reason.
CALL_BUDGET = {
    "attention forward": (57, 46),
    "attention causal+bool mask forward": (63, 52),
    "attention dropout forward": (58, 48),
    "varlen_attention forward": (73, 57),
    "masked_softmax forward": (33, 30),
    "linear + gelu forward": (48, 42),
    "gated_linear forward": (48, 42),
    "qkv_projection forward": (53, 52),
    "out_projection forward": (51, 52),
    "feed_forward forward": (94, 82),
    "layer_norm forward": (34, 36),
    "rms_norm forward": (33, 35),
    "attention forward + backward": (196, 155),
    "attention causal+bool mask forward + backward": (202, 160),
    "attention dropout forward + backward": (197, 156),
    "varlen_attention forward + backward": (216, 170),
    "masked_softmax forward + backward": (107, 102),
    "linear + gelu forward + backward": (170, 122),
    "gated_linear forward + backward": (204, 121),
    "qkv_projection forward + backward": (165, 151),
    "out_projection forward + backward": (155, 135),
    "feed_forward forward + backward": (299, 213),
    "layer_norm forward + backward": (121, 124),
    "rms_norm forward + backward": (120, 122),
    "attention decoding step": (57, 46),
    "rotary forward": (38, 39),
    "rotary forward + backward": (120, 122),
    "linear_cross_entropy forward": (37, 39),
    "linear_cross_entropy forward + backward": (104, 106),
}
CASES = {c.name: c for c in bench_host.cases()}
# The budgets count the CPU path (Triton interpreted, CUDA C++ on _C_host) with its launches stubbed.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="counts the CPU path with stubbed launches")


def python_calls(fn) -> int:
    """Python function calls made by one ``fn()`` (``fn`` itself not counted)."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        calls += event == "call"

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls - 1


@cpu_only
def test_every_host_case_has_a_budget():
    assert set(CALL_BUDGET) == set(CASES)


@cpu_only
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", list(CALL_BUDGET))
def test_python_calls_per_op_call_stay_within_budget(name, backend):
    with bench_host.stubbed_launches():
        call = CASES[name].make(backend)
        call()
        call()  # the first calls fill the caches (backend resolution, autotune choices)
        n = python_calls(call)
    budget = CALL_BUDGET[name][("triton", "cuda").index(backend)]
    assert n <= budget, f"{name} on {backend}: {n} Python calls per call, budget {budget}"
    # Not vacuous: the count sees our path (a call that skipped it would make a handful of calls).
    assert n > python_calls(CASES[name].make("torch")) + 20


def _grads(out, *inputs):
    out = out[0] if isinstance(out, tuple) else out
    torch.manual_seed(1)
    out.backward(torch.randn_like(out))
    return [out.detach(), *(t.grad for t in inputs)]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_the_eager_path_equals_the_dispatcher_bit_for_bit(backend, monkeypatch, device, on_test_device):
    # Same impl, setup_context and backward either way: outputs and every gradient identical for each op family.
    def run():
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 2, 9, 16, requires_grad=True) for _ in range(3))
        x = torch.randn(6, 32, requires_grad=True)
        w, b = torch.randn(48, 32, requires_grad=True), torch.randn(48, requires_grad=True)
        r = torch.randn(6, 32, requires_grad=True)
        g = torch.randn(32, requires_grad=True)
        s = torch.randn(2, 2, 9, 9, requires_grad=True)
        x2, x3 = (x.detach().clone().requires_grad_() for _ in range(2))
        with tk.use_backend(backend):
            return [
                *_grads(tk.ops.attention(q, k, v, is_causal=True), q, k, v),
                *_grads(tk.ops.linear(x, w, b, "gelu"), x, w, b),
                *_grads(tk.ops.layer_norm(x2, g, None, residual=r, return_residual=True), x2, g, r),
                *_grads(tk.ops.qkv_projection(x3.view(2, 3, 32), w[:, :32].contiguous().detach().requires_grad_(),
                                              None, 2)[1], x3),
                *_grads(tk.ops.masked_softmax(s, None, 0.5, True), s),
            ]

    eager = run()
    monkeypatch.setattr(_dispatch, "_plain_eager", lambda args: None)  # None: the custom op runs
    dispatched = run()
    assert len(eager) == len(dispatched) == 16
    for a, b in zip(eager, dispatched, strict=True):
        assert torch.equal(a, b)


def test_the_eager_path_steps_aside_for_fake_tensors_and_modes(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(1, 2, 8, 16, device=device)
        out = tk.ops.attention(q, q, q, backend="triton")  # the fake impl: nothing launched on fake data
    assert out.shape == (1, 2, 8, 16)
    assert _dispatch._plain_eager((torch.ones(1), torch.nn.Parameter(torch.ones(1)), 3))


def test_cached_answers_never_skip_a_check(device, on_test_device):
    q = torch.randn(1, 2, 8, 16)
    tk.ops.attention(q, q, q, backend="triton")  # resolution and tuner choice cached for this signature
    with pytest.raises(ValueError, match="enable_gqa=True"):
        tk.ops.attention(q, q[:, :1], q[:, :1], backend="triton")
    with pytest.raises(ValueError, match="does not broadcast"):
        tk.ops.attention(q, q, q, torch.ones(3, 8, dtype=torch.bool), backend="triton")
    with pytest.raises(ValueError, match="dropout_p"):
        tk.ops.attention(q, q, q, dropout_p=1.5, backend="triton")
    wide = torch.randn(1, 2, 8, 300)
    with pytest.raises(NotImplementedError, match="head dim 300"):
        tk.ops.attention(wide, wide, wide, backend="triton")
    with pytest.raises(NotImplementedError, match="head dim 300"):  # asked again: errors are never cached
        tk.ops.attention(wide, wide, wide, backend="triton")
    x = torch.randn(4, 32)
    tk.ops.layer_norm(x, torch.ones(32), backend="cuda")  # resolved and launched once for this signature
    with pytest.raises(ValueError, match="weight must have shape"):
        tk.ops.layer_norm(x, torch.ones(31), backend="cuda")
    # cu_seqlens values are checked once per tensor and contents: changed in place, they are checked again (on the
    # host for CPU tensors; a GPU's check is a device assert, which kills the process's CUDA context).
    if device.type == "cpu":
        packed = torch.randn(8, 2, 16)
        cu = torch.tensor([0, 3, 8], dtype=torch.int32)
        tk.ops.varlen_attention(packed, packed, packed, cu, cu, 5, 5, backend="triton")
        cu[1] = 6
        with pytest.raises(ValueError, match="longer than its max_seqlen"):
            tk.ops.varlen_attention(packed, packed, packed, cu, cu, 5, 5, backend="triton")
    # A resolved answer follows the requested backend.
    assert backends.resolve_for("layer_norm", "norm", x.device, "torch", x) == "torch"
    assert backends.resolve_for("layer_norm", "norm", x.device, "cuda", x) == "cuda"


def test_host_benchmark_rows():
    rows = bench_host.run(calls=3, rounds=1, hf=False, names=("attention forward", "layer_norm forward + backward"))
    assert [(r.name, r.backend) for r in rows] == [
        ("attention forward", "triton"), ("attention forward", "cuda"),
        ("layer_norm forward + backward", "triton"), ("layer_norm forward + backward", "cuda")]
    assert all(r.us > 0 and r.torch_us > 0 for r in rows)
    assert "ratio" in bench_host.format_rows(rows)
