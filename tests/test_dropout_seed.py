"""Dropout's seed stays on the device: no launch reads it on the host (no device sync per call) and a captured CUDA
graph draws a new mask on every replay instead of freezing the one seen at capture."""

import pytest
import torch

import transformer_kernels as tk
from transformer_kernels.ops.attention import draw_seed

KERNEL_BACKENDS = ["triton", "cuda"]


def _attention_and_linear(backend: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g).to(device).requires_grad_() for _ in range(3))
    x = torch.randn(20, 24, generator=g).to(device).requires_grad_()
    w = (0.2 * torch.randn(16, 24, generator=g)).to(device).requires_grad_()
    with tk.use_backend(backend):
        a = tk.ops.attention(q, k, v, dropout_p=0.3, is_causal=True)
        y = tk.ops.linear(x, w, None, "gelu", dropout_p=0.3)
    (a.sum() + y.sum()).backward()
    return a, y


def _no_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor was read on the host during a dropout call")

    for name in ("item", "tolist", "__int__", "__index__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dropout_seed_is_never_read_on_the_host(backend, device, monkeypatch):
    # Reading the seed with .item() is a device sync per call on a GPU and freezes it under graph capture.
    _attention_and_linear(backend, device)  # compiles / warms up outside the patch
    torch.manual_seed(3)
    _no_host_reads(monkeypatch)
    a, y = _attention_and_linear(backend, device)
    monkeypatch.undo()
    torch.manual_seed(3)
    a2, y2 = _attention_and_linear(backend, device)
    # The seed comes from torch's generator: the same manual_seed gives the same masks.
    torch.testing.assert_close(a, a2, atol=0, rtol=0)
    torch.testing.assert_close(y, y2, atol=0, rtol=0)


def test_seed_is_drawn_on_the_inputs_device_from_torchs_generator(device):
    torch.manual_seed(11)
    s1 = draw_seed(device)
    torch.manual_seed(11)
    s2 = draw_seed(device)
    assert s1.device.type == device.type and s1.dtype == torch.int64 and s1.shape == (1,)
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, draw_seed(device))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "torch"])
def test_dropout_calls_do_not_sync(backend):
    _attention_and_linear(backend, torch.device("cuda"))
    torch.cuda.set_sync_debug_mode("error")
    try:
        _attention_and_linear(backend, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "torch"])
def test_cuda_graph_replays_draw_new_dropout_masks(backend):
    q, k, v = (torch.randn(1, 2, 64, 32, device="cuda", dtype=torch.float16) for _ in range(3))
    x = torch.randn(64, 32, device="cuda", dtype=torch.float16)
    w = torch.randn(48, 32, device="cuda", dtype=torch.float16) * 0.2

    def step():
        with tk.use_backend(backend):
            return tk.ops.attention(q, k, v, dropout_p=0.5), tk.ops.linear(x, w, None, "relu", dropout_p=0.5)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: compile and autotune outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_a, out_y = step()
    graph.replay()
    first = out_a.clone(), out_y.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(first[0], out_a), "attention dropout mask frozen across graph replays"
    assert not torch.equal(first[1], out_y), "linear dropout mask frozen across graph replays"
    # Each replay is still a dropout of the same product: the kept entries of the linear output agree.
    both = (first[1] != 0) & (out_y != 0)
    torch.testing.assert_close(first[1][both], out_y[both], atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_a_seed_off_the_inputs_device_or_of_another_dtype_is_refused(backend, device):
    # A GPU kernel handed a host seed faults and takes the process's CUDA context with it (seen on an H200: one
    # opcheck call with a CPU seed failed every later test of its pytest worker).
    q = torch.randn(1, 1, 4, 8, device=device)
    ops = torch.ops.transformer_kernels
    seeds = [torch.tensor([3], dtype=torch.int32, device=device), torch.tensor([1, 2], device=device)]
    if device.type == "cuda":
        seeds.append(torch.tensor([3]))
    for seed in seeds:
        with pytest.raises(ValueError, match=f"seed must be an int64 tensor of 1 element on {device}"):
            ops.attention(q, q, q, None, None, None, None, 0.2, False, 1.0, 0.0, -1, -1, 0, seed, backend)
        with pytest.raises(ValueError, match="seed must be"):
            ops.linear(q[0, 0], q[0, 0], None, None, "", 0.2, seed, backend)
