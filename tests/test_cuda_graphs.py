"""CUDA-graph capture: what a captured call may not do, checked on the CPU (no value read on the host, so nothing is
allocated or launched by a shape that depends on values), and capture + replay on a GPU (gpu-marked)."""

import contextlib

import pytest
import torch

import transformer_kernels as tk

KERNEL_BACKENDS = ["triton", "cuda"]
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")


@contextlib.contextmanager
def no_host_reads():
    """Every way Python code reads a tensor's values on the host raises inside the block (under capture each would
    be a sync, and a value read there would be frozen into the graph)."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} read a value on the host")
        return read

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def _decoding_inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 1, 32, generator=g)
    k, v = (torch.randn(2, 2, 40, 32, generator=g) for _ in range(2))
    pad = torch.zeros(2, 40, dtype=torch.bool)
    pad[1, 30:] = True
    return q, k, v, pad


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_repeated_call_reads_no_value_on_the_host(backend, device):
    q, k, v, pad = (t.to(device) for t in _decoding_inputs())
    packed = torch.randn(9, 2, 16, device=device)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    k_cache, v_cache = (torch.randn(6, 16, 2, 32, device=device) for _ in range(2))
    k_new, v_new = k[:, :, :1].transpose(1, 2), v[:, :, :1].transpose(1, 2)
    lens = torch.tensor([3, 40], dtype=torch.int32, device=device)
    table = torch.tensor([[5, 0, 1], [2, 3, 4]], dtype=torch.int32, device=device)

    def calls():
        out = tk.ops.attention(q, k, v, is_causal=True, enable_gqa=True, key_padding_mask=pad, dropout_p=0.1,
                               causal_alignment="bottom_right", backend=backend)
        packed_out = tk.ops.varlen_attention(packed, packed, packed, cu, cu, 5, 5, is_causal=True, backend=backend)
        # a decoding step against a paged cache: the new keys appended in place, the lengths read on the device
        cached = tk.ops.attention_with_kvcache(q.transpose(1, 2), k_cache, v_cache, k_new, v_new, lens, table,
                                               window=(20, -1), backend=backend)
        return out, packed_out, cached

    expected = calls()  # the first varlen call checks the CPU tensor's cu_seqlens on the host, once
    with no_host_reads():
        got = calls()
    with pytest.raises(AssertionError, match="read a value"), no_host_reads():  # the guard itself works
        bool(cu[0] == 0)
    assert all(a.shape == b.shape for a, b in zip(got, expected, strict=True))
    assert all(torch.isfinite(t).all() for t in got)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_attention_and_varlen_capture_and_replay(backend):
    device = torch.device("cuda")
    q, k, v, pad = (t.to(device) for t in _decoding_inputs())
    q, k, v = (t.half() for t in (q, k, v))
    packed = torch.randn(9, 2, 64, device=device, dtype=torch.float16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)

    def calls():
        out = tk.ops.attention(q, k, v, enable_gqa=True, key_padding_mask=pad, causal_alignment="bottom_right",
                               is_causal=True, backend=backend)
        return out, tk.ops.varlen_attention(packed, packed, packed, cu, cu, 5, 5, is_causal=True, backend=backend)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up off the capture: compiles, autotunes, checks cu_seqlens
            calls()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = calls()
    for step in range(3):
        q.copy_(torch.randn_like(q))
        packed.copy_(torch.randn_like(packed))
        graph.replay()
        torch.cuda.synchronize()
        eager = calls()
        torch.testing.assert_close(captured[0], eager[0], atol=0, rtol=0, msg=f"replay {step}")
        torch.testing.assert_close(captured[1], eager[1], atol=0, rtol=0, msg=f"replay {step}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_llama_static_cache_generation_under_reduce_overhead_compile(backend):
    pytest.importorskip("transformers")
    from transformer_kernels.tools import hf_testing as hft

    device = torch.device("cuda")
    eager, ours = hft.converted_pair("llama", backend, device)
    prompt = torch.randint(3, hft.VOCAB, (1, 6), generator=torch.Generator().manual_seed(0)).to(device)
    settings = {"max_new_tokens": 8, "do_sample": False, "cache_implementation": "static", "pad_token_id": 0}
    expected = eager.generate(prompt, **settings)
    ours.forward = torch.compile(ours.forward, mode="reduce-overhead", fullgraph=False)
    got = ours.generate(prompt, **settings)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
