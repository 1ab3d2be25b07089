"""`python -m transformer_kernels bench`: GPU timings, or without a GPU the static report.

GPU: every op at BERT-base / GPT-2 / BART-base sizes, forward and forward+backward, timed by
``triton.testing.do_bench`` (median with p20/p80), with TFLOP/s (the FlashAttention FLOP count for attention),
GB/s (the bytes the fused kernel must move) and peak memory, next to eager PyTorch and
F.scaled_dot_product_attention; rows are appended to a CSV keyed by GPU and package version, and TFLOP/s and
memory are plotted against sequence length.

No GPU: the resource table of every shipped kernel on sm_80/sm_90 (resources.py), and the analytic memory
traffic of each fused op against the unfused PyTorch sequence it replaces, as a table and a PNG.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import __version__, ops, reference

# name: (batch, heads, head dim, embed, ffn hidden); the sizes the tables and plots use
MODELS = {
    "bert-base": (8, 12, 64, 768, 3072),
    "gpt2": (8, 12, 64, 768, 3072),
    "bart-base": (8, 12, 64, 768, 3072),
}
# name: family ("encoder" | "decoder" | "encoder-decoder"): which layer and whether attention is causal
FAMILIES = {"bert-base": "encoder", "gpt2": "decoder", "bart-base": "encoder-decoder"}
SEQ_LENS = (128, 512, 1024, 2048)
RESULTS_DIR = Path(os.environ.get("TK_BENCH_DIR", "bench_results"))


# ---- analytic memory traffic -----------------------------------------------------------------


@dataclass
class Traffic:
    op: str
    fused_bytes: int
    unfused_bytes: int
    unfused_steps: str

    @property
    def saving(self) -> float:
        return self.unfused_bytes / self.fused_bytes


def memory_traffic(model: str = "bert-base", seq_len: int = 512, elem: int = 2) -> list[Traffic]:
    """Bytes each fused forward op reads and writes at a model's size, against the unfused PyTorch ops (each
    reads its inputs from and writes its output to HBM; weights counted once per GEMM)."""
    b, h, _, e, f = MODELS[model]
    m = b * seq_len  # tokens
    s = b * h * seq_len * seq_len  # attention scores
    t = m * e  # one [tokens, embed] activation
    w = e * e
    return [
        Traffic("attention", elem * 4 * t,
                elem * (3 * t + s) + elem * 2 * s + elem * 2 * s + elem * (s + t + t),
                "QKᵀ → scores; mask add; softmax; P·V"),
        Traffic("masked_softmax", elem * 2 * s + b * seq_len,
                elem * 2 * s + elem * 3 * s + elem * 2 * s, "scale; mask add; softmax"),
        Traffic("linear+bias+gelu+residual", elem * (t + w + e + 2 * t),
                elem * (t + w + t) + elem * 2 * t * 2 + elem * 3 * t, "matmul; bias add; gelu; residual add"),
        Traffic("qkv_projection", elem * (t + 3 * w + 3 * t),
                elem * (t + 3 * w + 3 * t) + elem * 2 * 3 * t, "matmul + bias; split + transpose copies"),
        Traffic("out_projection+residual", elem * (t + w + 2 * t),
                elem * 2 * t + elem * (t + w + t) + elem * 3 * t, "merge-heads copy; matmul + bias; residual add"),
        Traffic("feed_forward", elem * (t + 2 * e * f + m * f * 2 + 2 * t),
                elem * (t + e * f + m * f) + elem * 2 * m * f * 2 + elem * (m * f + e * f + t) + elem * 3 * t,
                "matmul; bias; gelu; matmul + bias; residual add"),
        Traffic("layer_norm+residual", elem * 4 * t, elem * 3 * t + elem * 2 * t, "residual add; layer norm"),
    ]


def format_traffic(rows: list[Traffic]) -> str:
    head = f"{'fused op':28} {'fused MB':>9} {'unfused MB':>11} {'saving':>7}  unfused sequence"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.op:28} {r.fused_bytes / 1e6:9.1f} {r.unfused_bytes / 1e6:11.1f} {r.saving:6.2f}x  {r.unfused_steps}")
    return "\n".join(lines)


def plot_traffic(rows: list[Traffic], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r.unfused_bytes / 1e6 for r in rows], 0.4, label="unfused PyTorch")
    ax.barh([y - 0.2 for y in ys], [r.fused_bytes / 1e6 for r in rows], 0.4, label="fused kernel")
    ax.set_yticks(list(ys), [r.op for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel("HBM traffic per forward call (MB, log scale), bert-base, L=512, fp16")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- GPU timings -----------------------------------------------------------------------------


@dataclass
class Case:
    op: str
    impl: str
    model: str
    seq_len: int
    backward: bool
    flops: float
    bytes: float
    make: Callable[[torch.device], Callable[[], torch.Tensor]] = field(repr=False)


@dataclass
class Timing:
    op: str
    impl: str
    model: str
    seq_len: int
    pass_: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    tflops: float
    gbps: float
    peak_mib: float | None


def attention_flops(b: int, h: int, lq: int, lk: int, d: int, causal: bool, backward: bool) -> float:
    """FlashAttention's count: 2 matmuls of 2·Lq·Lk·D forward (half when causal); backward is 2.5× forward."""
    fwd = 4 * b * h * lq * lk * d * (0.5 if causal else 1.0)
    return fwd * (3.5 if backward else 1.0)


# Our two kernel backends, timed side by side with PyTorch's own kernels.
KERNEL_IMPLS = ("triton", "cuda")


def _step(fn: Callable[[], torch.Tensor], backward: bool) -> Callable[[], None]:
    if not backward:
        return lambda: fn()
    out = fn()
    grad = torch.randn_like(out)
    return lambda: fn().backward(grad)


def _attention_maker(impl: str, shape: tuple[int, ...], causal: bool, dtype: torch.dtype, backward: bool):
    def make(device: torch.device) -> Callable[[], torch.Tensor]:
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
        if impl in KERNEL_IMPLS:
            return lambda: ops.attention(q, k, v, is_causal=causal, backend=impl)
        if impl == "sdpa":
            return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return lambda: reference.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return make


def _ffn_maker(impl: str, tokens: int, e: int, f: int, dtype: torch.dtype, backward: bool):
    def make(device: torch.device) -> Callable[[], torch.Tensor]:
        x, w1, b1, w2, b2 = (torch.randn(s, device=device, dtype=dtype, requires_grad=backward) * 0.02
                             for s in ((tokens, e), (f, e), (f,), (e, f), (e,)))
        if impl in KERNEL_IMPLS:
            return lambda: ops.feed_forward(x, w1, b1, w2, b2, "gelu", backend=impl)
        return lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    return make


def _norm_maker(impl: str, tokens: int, e: int, dtype: torch.dtype, backward: bool):
    def make(device: torch.device) -> Callable[[], torch.Tensor]:
        x = torch.randn(tokens, e, device=device, dtype=dtype, requires_grad=backward)
        w, b = torch.ones(e, device=device, dtype=dtype), torch.zeros(e, device=device, dtype=dtype)
        if impl in KERNEL_IMPLS:
            return lambda: ops.layer_norm(x, w, b, backend=impl)
        return lambda: F.layer_norm(x, (e,), w, b)
    return make


def _layer_maker(model: str, impl: str, tokens_shape: tuple[int, int], e: int, h: int, f: int, dtype: torch.dtype,
                 backward: bool):
    """The model family's layer: BERT post-norm encoder layer, GPT pre-norm causal layer, BART decoder layer with
    cross-attention over a memory of the same length; torch.nn with the same weights as the fused one."""
    from .. import nn as tk_nn

    def make(device: torch.device) -> Callable[[], torch.Tensor]:
        lib = tk_nn if impl in KERNEL_IMPLS else torch.nn
        kw = {"backend": impl} if impl in KERNEL_IMPLS else {}
        family = FAMILIES[model]
        first = family == "decoder"
        cls = lib.TransformerDecoderLayer if family == "encoder-decoder" else lib.TransformerEncoderLayer
        layer = cls(e, h, f, 0.0, "gelu", batch_first=True, norm_first=first, device=device, dtype=dtype, **kw)
        x = torch.randn(*tokens_shape, e, device=device, dtype=dtype, requires_grad=backward)
        if family == "encoder-decoder":
            mem = torch.randn(*tokens_shape, e, device=device, dtype=dtype)
            return lambda: layer(x, mem, tgt_is_causal=True, tgt_mask=_causal(tokens_shape[1], device))
        if family == "decoder":
            return lambda: layer(x, src_mask=_causal(tokens_shape[1], device), is_causal=True)
        return lambda: layer(x)
    return make


def _causal(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


def cases(models: tuple[str, ...] = tuple(MODELS), seq_lens: tuple[int, ...] = SEQ_LENS,
          dtype: torch.dtype = torch.float16) -> list[Case]:
    """Attention (kernel, SDPA, eager), feed-forward (kernel, eager), LayerNorm (kernel, torch) and the family's
    whole layer (fused vs torch.nn) per model and length, forward and forward+backward. GB/s counts the bytes the
    fused kernel must move (for a layer: its input and output only)."""
    out = []
    for model in models:
        b, h, d, e, f = MODELS[model]
        causal = FAMILIES[model] != "encoder"  # encoders attend both ways, decoders causally
        for length in seq_lens:
            tokens = b * length
            for backward in (False, True):
                twice = 2 if backward else 1
                flops = attention_flops(b, h, length, length, d, causal, backward)
                io = 2 * 4 * b * h * length * d * twice
                for impl in (*KERNEL_IMPLS, "sdpa", "eager"):
                    make = _attention_maker(impl, (b, h, length, d), causal, dtype, backward)
                    out.append(Case("attention", impl, model, length, backward, flops, io, make))
                flops = 4 * tokens * e * f * (3 if backward else 1)
                io = 2 * (2 * tokens * e + 2 * e * f + tokens * f) * twice
                for impl in (*KERNEL_IMPLS, "eager"):
                    out.append(Case("feed_forward", impl, model, length, backward, flops, io,
                                    _ffn_maker(impl, tokens, e, f, dtype, backward)))
                io = 2 * 2 * tokens * e * twice
                for impl in (*KERNEL_IMPLS, "torch"):
                    out.append(Case("layer_norm", impl, model, length, backward, 0.0, io,
                                    _norm_maker(impl, tokens, e, dtype, backward)))
                # the family's whole layer: projections + attention (+ cross-attention for BART) + FFN
                attn_blocks = 2 if FAMILIES[model] == "encoder-decoder" else 1
                flops = (2 * tokens * (4 * e * e * attn_blocks + 2 * e * f)
                         + attn_blocks * attention_flops(b, h, length, length, d, causal, False)) * (3 if backward else 1)
                for impl in (*KERNEL_IMPLS, "torch"):
                    out.append(Case("layer", impl, model, length, backward, flops, 2 * 2 * tokens * e * twice,
                                    _layer_maker(model, impl, (b, length), e, h, f, dtype, backward)))
    return out


# gpu-check's quick benchmark: attention at these head dims and lengths (16 heads, B·L = 16k tokens).
QUICK_HEAD_DIMS = (64, 128)
QUICK_SEQ_LENS = (1024, 4096, 16384)
QUICK_TOKENS, QUICK_HEADS, QUICK_EMBED, QUICK_FFN = 16384, 16, 1024, 4096


def _sdpa_maker(backend_name: str, shape: tuple[int, ...], causal: bool, dtype: torch.dtype, backward: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def make(device: torch.device) -> Callable[[], torch.Tensor]:
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))

        def run() -> torch.Tensor:
            with sdpa_kernel(getattr(SDPBackend, backend_name)):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run
    return make


def _flex_maker(shape: tuple[int, ...], causal: bool, dtype: torch.dtype, backward: bool):
    def make(device: torch.device) -> Callable[[], torch.Tensor]:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
        block = None
        if causal:
            block = create_block_mask(lambda b, h, i, j: j <= i, None, None, shape[2], shape[2], device=device)
        flex = torch.compile(flex_attention)
        return lambda: flex(q, k, v, block_mask=block)
    return make


# Decoding: one query per sequence against a KV cache of DECODE_KEYS keys, B·H = DECODE_BATCH·DECODE_HEADS (fewer
# programs than SMs without split-KV); tokens/s = DECODE_BATCH / time.
DECODE_KEYS = (1024, 4096, 16384, 32768)
DECODE_BATCH, DECODE_HEADS, DECODE_KV_HEADS, DECODE_HEAD_DIM = 1, 32, 8, 128


GRAPHED = "+graph"  # an impl suffix: the call captured once in a CUDA graph and timed as graph replays


def _graphed(call: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], None]:
    """``call`` captured in a CUDA graph (after a warm-up on a side stream, as capture requires): its replay costs
    one launch of host work, so replay time against the eager call's time separates host from GPU time."""
    if device.type != "cuda":
        raise RuntimeError("CUDA graphs need a GPU")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def _decode_maker(impl: str, lk: int, dtype: torch.dtype):
    def make(device: torch.device) -> Callable[[], torch.Tensor]:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(DECODE_BATCH, DECODE_HEADS, 1, DECODE_HEAD_DIM, device=device, dtype=dtype, generator=g)
        k, v = (torch.randn(DECODE_BATCH, DECODE_KV_HEADS, lk, DECODE_HEAD_DIM, device=device, dtype=dtype, generator=g)
                for _ in range(2))
        backend = impl.removesuffix(GRAPHED)
        if backend in KERNEL_IMPLS:
            def call() -> torch.Tensor:
                return ops.attention(q, k, v, enable_gqa=True, backend=backend)
            return _graphed(call, device) if impl.endswith(GRAPHED) else call
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, impl.removeprefix("sdpa-").upper() + "_ATTENTION")

        def run() -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return run
    return make


def decode_cases(dtype: torch.dtype = torch.float16, keys: tuple[int, ...] | None = None) -> list[Case]:
    """One decoding step (Lq = 1, GQA 32/8 heads, D = 128 by default) at each KV-cache length (default DECODE_KEYS), ours
    (split-KV) against SDPA's flash and memory-efficient backends; GB/s counts the K/V cache read once. Ours also as
    CUDA-graph replays ("triton+graph"): the eager call's time over the replay's is its host overhead."""
    out = []
    for lk in keys or DECODE_KEYS:
        flops = attention_flops(DECODE_BATCH, DECODE_HEADS, 1, lk, DECODE_HEAD_DIM, False, False)
        io = 2 * 2 * DECODE_BATCH * DECODE_KV_HEADS * lk * DECODE_HEAD_DIM
        for impl in (*KERNEL_IMPLS, *(i + GRAPHED for i in KERNEL_IMPLS), "sdpa-flash", "sdpa-efficient"):
            out.append(Case("attention_decode", impl, f"B{DECODE_BATCH} H{DECODE_HEADS}/{DECODE_KV_HEADS} D{DECODE_HEAD_DIM}", lk,
                            False, flops, io, _decode_maker(impl, lk, dtype)))
    return out


# A decoding step over a paged cache (vLLM's / flash-attn's layout, 16-token blocks shuffled across the pool):
# ours reading it in place against SDPA on the same keys gathered contiguous beforehand (its best case).
PAGED_BATCH, PAGED_BLOCK, PAGED_KEYS = 8, 16, (4096, 16384)


def _paged_maker(impl: str, lk: int, dtype: torch.dtype):
    def make(device: torch.device) -> Callable[[], torch.Tensor]:
        g = torch.Generator(device=device).manual_seed(0)
        blocks = lk // PAGED_BLOCK
        shape = (PAGED_BATCH * blocks, PAGED_BLOCK, DECODE_KV_HEADS, DECODE_HEAD_DIM)
        k_cache, v_cache = (torch.randn(shape, device=device, dtype=dtype, generator=g) for _ in range(2))
        table = torch.randperm(PAGED_BATCH * blocks, device=device, generator=g).view(PAGED_BATCH, blocks).int()
        q = torch.randn(PAGED_BATCH, 1, DECODE_HEADS, DECODE_HEAD_DIM, device=device, dtype=dtype, generator=g)
        lens = torch.full((PAGED_BATCH,), lk, dtype=torch.int32, device=device)
        if impl in KERNEL_IMPLS:
            return lambda: ops.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, block_table=table,
                                                      backend=impl)
        keys, values = (c[table.long()].flatten(1, 2).transpose(1, 2) for c in (k_cache, v_cache))
        return lambda: F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, enable_gqa=True)
    return make


def paged_cases(dtype: torch.dtype = torch.float16) -> list[Case]:
    """One decoding step of PAGED_BATCH sequences over a paged cache at each length: ours in place (triton; cuda
    gathers) against SDPA on pre-gathered keys; GB/s counts the K/V cache read once."""
    out = []
    for lk in PAGED_KEYS:
        flops = attention_flops(PAGED_BATCH, DECODE_HEADS, 1, lk, DECODE_HEAD_DIM, False, False)
        io = 2 * 2 * PAGED_BATCH * DECODE_KV_HEADS * lk * DECODE_HEAD_DIM
        for impl in (*KERNEL_IMPLS, "sdpa"):
            out.append(Case("attention_paged", impl, f"B{PAGED_BATCH} H{DECODE_HEADS}/{DECODE_KV_HEADS} "
                            f"D{DECODE_HEAD_DIM} block {PAGED_BLOCK}", lk, False, flops, io, _paged_maker(impl, lk, dtype)))
    return out


# Packed vs padded (BERT-style batches): VARLEN_BATCH sequences, lengths spread evenly up to the padded length so
# half of the padded batch is padding; the varlen kernels compute only the real tokens.
VARLEN_BATCH, VARLEN_HEADS, VARLEN_HEAD_DIM = 16, 12, 64
VARLEN_PADDED_LENS = (512, 2048)


def varlen_lengths(padded: int) -> list[int]:
    """Sequence lengths averaging half of ``padded`` (50% padding)."""
    return [max(1, round(padded * (i + 0.5) / VARLEN_BATCH)) for i in range(VARLEN_BATCH)]


def _varlen_maker(impl: str, padded: int, dtype: torch.dtype, backward: bool, packed: bool):
    def make(device: torch.device) -> Callable[[], torch.Tensor]:
        lens = varlen_lengths(padded)
        shape = (VARLEN_BATCH, padded, VARLEN_HEADS, VARLEN_HEAD_DIM)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
        real = torch.arange(padded, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
        if packed:
            cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)
            q, k, v = (t[real].requires_grad_(backward) for t in (q, k, v))
            return lambda: ops.varlen_attention(q, k, v, cu, cu, max(lens), max(lens), backend=impl)
        q, k, v = (t.transpose(1, 2).requires_grad_(backward) for t in (q, k, v))
        if impl in KERNEL_IMPLS:
            return lambda: ops.attention(q, k, v, key_padding_mask=~real, backend=impl)
        mask = real[:, None, None, :]
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return make


def varlen_cases(dtype: torch.dtype = torch.float16, padded_lens: tuple[int, ...] | None = None) -> list[Case]:
    """Attention over a batch with 50% padding, forward and forward+backward: our varlen kernels on the packed
    tokens ("attention_varlen") against the padded batch with a key padding mask on our kernels and on SDPA
    ("attention_padded"). FLOPs count the real tokens only, so TFLOP/s compares useful work."""
    out = []
    for padded in padded_lens or VARLEN_PADDED_LENS:
        flops = sum(attention_flops(1, VARLEN_HEADS, n, n, VARLEN_HEAD_DIM, False, False) for n in varlen_lengths(padded))
        io = 4 * 2 * sum(varlen_lengths(padded)) * VARLEN_HEADS * VARLEN_HEAD_DIM
        shape = f"B{VARLEN_BATCH} H{VARLEN_HEADS} D{VARLEN_HEAD_DIM} 50%pad"
        for backward in (False, True):
            scale = 3.5 if backward else 1.0
            for impl in KERNEL_IMPLS:
                out.append(Case("attention_varlen", impl, shape, padded, backward, flops * scale, io,
                                _varlen_maker(impl, padded, dtype, backward, True)))
            for impl in (*KERNEL_IMPLS, "sdpa"):
                out.append(Case("attention_padded", impl, shape, padded, backward, flops * scale, io,
                                _varlen_maker(impl, padded, dtype, backward, False)))
    return out


# A sliding window (Mistral's 4k) over a long causal sequence: ours with the window against the CUDA kernels and SDPA
# given the same window as a dense bool mask (every tile read there).
WINDOW_SHAPE = (1, 16, 16384, 128)  # B, H, L, D
WINDOW_LEFT = 4095
MASK_FORM = "+mask"  # our kernels given the window as a mask: a diagnostic, not a baseline


def _window_maker(impl: str, dtype: torch.dtype, backward: bool):
    def make(device: torch.device) -> Callable[[], torch.Tensor]:
        q, k, v = (torch.randn(WINDOW_SHAPE, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
        if impl in KERNEL_IMPLS:
            return lambda: ops.attention(q, k, v, is_causal=True, window=(WINDOW_LEFT, -1), backend=impl)
        length = WINDOW_SHAPE[2]
        mask = reference.window_mask(length, length, (WINDOW_LEFT, 0), device=device)
        if impl.endswith(MASK_FORM):
            return lambda: ops.attention(q, k, v, attn_mask=mask, backend=impl.removesuffix(MASK_FORM))
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return make


def window_cases(dtype: torch.dtype = torch.float16) -> list[Case]:
    """Causal attention with a WINDOW_LEFT + 1 key window over WINDOW_SHAPE, forward and forward+backward: ours with
    ``window`` ("cuda": tiles outside skipped; "triton": folded into a mask), the CUDA kernels given the window as a
    dense mask ("cuda+mask"), SDPA with that mask. FLOPs count the visible scores only, so TFLOP/s compares useful
    work."""
    b, h, length, d = WINDOW_SHAPE
    visible = sum(min(i + 1, WINDOW_LEFT + 1) for i in range(length))
    flops = 4 * b * h * visible * d
    io = 4 * 2 * b * h * length * d
    return [Case("attention_window", impl, f"B{b} H{h} D{d} window {WINDOW_LEFT + 1}", length, backward,
                 flops * (3.5 if backward else 1.0), io, _window_maker(impl, dtype, backward))
            for backward in (False, True) for impl in (*KERNEL_IMPLS, "cuda" + MASK_FORM, "sdpa")]


def decode_tokens_per_second(rows: list[Timing]) -> list[tuple[str, int, float]]:
    """(impl, KV length, tokens/s) of the decoding rows."""
    return [(r.impl, r.seq_len, DECODE_BATCH / (r.median_ms / 1e3)) for r in rows if r.op == "attention_decode"]


def _liger_norm(rms: bool):
    """Liger-Kernel's norm function when it is importable (a peer to compare with), else None."""
    try:
        if rms:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            return lambda x, w, b: LigerRMSNormFunction.apply(x, w, 1e-6)
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        return lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, 1e-5)
    except ImportError:
        return None


def _quick_norm_maker(impl: str, rms: bool, tokens: int, e: int, dtype: torch.dtype, backward: bool):
    def make(device: torch.device) -> Callable[[], torch.Tensor]:
        x = torch.randn(tokens, e, device=device, dtype=dtype, requires_grad=backward)
        w = torch.ones(e, device=device, dtype=dtype, requires_grad=backward)
        b = torch.zeros(e, device=device, dtype=dtype, requires_grad=backward)
        if impl in KERNEL_IMPLS:
            return (lambda: ops.rms_norm(x, w, backend=impl)) if rms else (lambda: ops.layer_norm(x, w, b, backend=impl))
        if impl == "liger":
            fn = _liger_norm(rms)
            return lambda: fn(x, w, b)
        return (lambda: F.rms_norm(x, (e,), w)) if rms else (lambda: F.layer_norm(x, (e,), w, b))
    return make


def _quick_linear_maker(impl: str, tokens: int, e: int, dtype: torch.dtype, backward: bool):
    def make(device: torch.device) -> Callable[[], torch.Tensor]:
        x, w, b, r = (torch.randn(s, device=device, dtype=dtype, requires_grad=backward) * 0.02
                      for s in ((tokens, e), (e, e), (e,), (tokens, e)))
        if impl in KERNEL_IMPLS:
            return lambda: ops.linear(x, w, b, "gelu", residual=r, backend=impl)
        return lambda: F.gelu(F.linear(x, w, b)) + r
    return make


def quick_cases(dtype: torch.dtype = torch.float16) -> list[Case]:
    """The benchmark of `make gpu-check`: attention forward and forward+backward at D=64/128, L=1k/4k/16k, causal
    and not, ours against each SDPA backend (and FlexAttention at 4k); GEMM + bias + gelu + residual; the FFN;
    LayerNorm and RMSNorm against torch and Liger-Kernel (when importable)."""
    out = []
    t, h, e, f = QUICK_TOKENS, QUICK_HEADS, QUICK_EMBED, QUICK_FFN
    for backward in (False, True):
        twice = 2 if backward else 1
        for d in QUICK_HEAD_DIMS:
            for length in QUICK_SEQ_LENS:
                for causal in (False, True):
                    shape = (t // length, h, length, d)
                    label = f"D{d}{' causal' if causal else ''}"
                    flops = attention_flops(shape[0], h, length, length, d, causal, backward)
                    io = 2 * 4 * shape[0] * h * length * d * twice
                    for impl in KERNEL_IMPLS:
                        out.append(Case("attention", impl, label, length, backward, flops, io,
                                        _attention_maker(impl, shape, causal, dtype, backward)))
                    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
                        out.append(Case("attention", f"sdpa-{name.split('_')[0].lower()}", label, length, backward,
                                        flops, io, _sdpa_maker(name, shape, causal, dtype, backward)))
                    if length == 4096:
                        out.append(Case("attention", "flex", label, length, backward, flops, io,
                                        _flex_maker(shape, causal, dtype, backward)))
        flops = 2 * t * e * e * (3 if backward else 1)
        io = 2 * (3 * t * e + e * e) * twice
        for impl in (*KERNEL_IMPLS, "torch"):
            out.append(Case("linear+gelu+res", impl, f"{e}x{e}", t, backward, flops, io,
                            _quick_linear_maker(impl, t, e, dtype, backward)))
        flops = 4 * t * e * f * (3 if backward else 1)
        io = 2 * (2 * t * e + 2 * e * f + t * f) * twice
        for impl in (*KERNEL_IMPLS, "torch"):
            out.append(Case("feed_forward", impl, f"{e}-{f}", t, backward, flops, io,
                            _ffn_maker("eager" if impl == "torch" else impl, t, e, f, dtype, backward)))
        for rms in (False, True):
            peers = ("torch", "liger") if _liger_norm(rms) else ("torch",)
            for impl in (*KERNEL_IMPLS, *peers):
                out.append(Case("rms_norm" if rms else "layer_norm", impl, f"{t}x{4 * e}", t, backward, 0.0,
                                2 * 2 * t * 4 * e * twice, _quick_norm_maker(impl, rms, t, 4 * e, dtype, backward)))
    return out


# A Llama-3-8B-like language-model head: 8192 tokens of width 4096 against a 32k (Llama 2) and a 128k (Llama 3)
# vocabulary; its loss step's peak memory is the issue (the unfused pair's fp32 logits alone are 4 GiB at 128k).
LM_HEAD_TOKENS, LM_HEAD_HIDDEN, LM_HEAD_VOCABS = 8192, 4096, (32768, 131072)
# (tokens, hidden) of `bench --memory` without a GPU: the CPU runs the GEMMs for real, so a smaller head.
LM_HEAD_CPU_SHAPE = (2048, 256)


def _liger_linear_cross_entropy():
    """Liger-Kernel's fused linear cross-entropy function when it is importable, else None."""
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except ImportError:
        return None
    return lambda x, w, t: LigerFusedLinearCrossEntropyFunction.apply(x, w, t)[0]


def _lm_head_maker(impl: str, vocab: int, dtype: torch.dtype):
    def make(device: torch.device) -> Callable[[], torch.Tensor]:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(LM_HEAD_TOKENS, LM_HEAD_HIDDEN, device=device, dtype=dtype, generator=g).requires_grad_()
        w = (torch.randn(vocab, LM_HEAD_HIDDEN, device=device, dtype=dtype, generator=g) * 0.02).requires_grad_()
        target = torch.randint(0, vocab, (LM_HEAD_TOKENS,), device=device, generator=g)
        if impl in KERNEL_IMPLS:
            return lambda: ops.linear_cross_entropy(x, w, target, backend=impl)
        if impl == "torch-lce":
            return lambda: F.linear_cross_entropy(x, w, target)
        if impl == "liger":
            fn = _liger_linear_cross_entropy()
            return lambda: fn(x, w, target)
        return lambda: F.cross_entropy(F.linear(x, w).float(), target)  # the unfused pair, as transformers computes it
    return make


def lm_head_cases(dtype: torch.dtype = torch.bfloat16) -> list[Case]:
    """The LM head's loss step (forward + backward; tokens/s = seq_len / time) for each vocabulary: ours against the
    unfused pair, torch's F.linear_cross_entropy (when torch has it) and Liger-Kernel's (when importable); the
    Timing's peak_mib is the memory figure."""
    peers = ["torch", *(["torch-lce"] if hasattr(F, "linear_cross_entropy") else []),
             *(["liger"] if _liger_linear_cross_entropy() else [])]
    out = []
    for vocab in LM_HEAD_VOCABS:
        flops = 3 * 2 * LM_HEAD_TOKENS * LM_HEAD_HIDDEN * vocab
        io = 2 * (LM_HEAD_TOKENS * LM_HEAD_HIDDEN + vocab * LM_HEAD_HIDDEN) * 2
        for impl in (*KERNEL_IMPLS, *peers):
            out.append(Case("linear_cross_entropy", impl, f"{LM_HEAD_HIDDEN}x{vocab // 1024}k", LM_HEAD_TOKENS, True,
                            flops, io, _lm_head_maker(impl, vocab, dtype)))
    return out


def lm_head_memory(device: torch.device, tokens: int, hidden: int, vocab: int, dtype: torch.dtype,
                   ) -> list[tuple[str, float]]:
    """(implementation, peak MiB) of one LM-head loss step (forward + backward, the gradients of x and the weight)
    beyond its inputs: ours (fp32 and weight-dtype dW sums) and the unfused pair as transformers computes it. On a
    GPU max_memory_allocated; on the CPU the profiler's allocation events, with our kernel launches stubbed (a kernel
    allocates nothing; the GEMMs and every allocation around them run for real)."""
    from . import testing

    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device, dtype=dtype, generator=g) * 0.02).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    ours = "triton" if device.type == "cuda" else "cuda"
    steps = {f"{ours} (fp32 dW sum)": lambda: ops.linear_cross_entropy(x, w, target, backend=ours),
             f"{ours} (dW summed in {str(dtype).removeprefix('torch.')})":
                 lambda: ops.linear_cross_entropy(x, w, target, fp32_dweight=False, backend=ours),
             "unfused pair": lambda: F.cross_entropy(F.linear(x, w).float(), target)}
    out = []
    for name, loss in steps.items():
        def step(loss=loss):
            loss().backward()
            x.grad = w.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            from .bench_host import stubbed_launches

            with stubbed_launches():
                peak = testing.peak_allocated_bytes(step)
        out.append((name, peak / 2**20))
    return out


def transformers_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    """transformers' eager ``apply_rotary_pos_emb`` (cos/sin already broadcastable to q and k): the peer the rotary
    benchmarks time ours against."""
    def rotate_half(t: torch.Tensor) -> torch.Tensor:
        half = t.shape[-1] // 2
        return torch.cat((-t[..., half:], t[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# (batch, length, query heads, key heads, head dim) of the rotary benchmark: Llama-3-8B's attention, 8 × 1024 tokens.
ROTARY_SHAPE = (8, 1024, 32, 8, 128)


def _rotary_maker(impl: str, dtype: torch.dtype, backward: bool):
    def make(device: torch.device) -> Callable[[], torch.Tensor]:
        b, length, h, hkv, d = ROTARY_SHAPE
        q = torch.randn(b, length, h, d, device=device, dtype=dtype, requires_grad=backward)
        k = torch.randn(b, hkv, length, d, device=device, dtype=dtype, requires_grad=backward)
        angles = torch.rand(b, length, d, device=device)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        qt = q.transpose(1, 2)  # transformers' layout: the projection seen as [B, H, L, D]
        if impl in KERNEL_IMPLS:
            return lambda: sum(t.sum() for t in ops.rotary(qt, k, cos, sin, backend=impl)) if backward else \
                ops.rotary(qt, k, cos, sin, backend=impl)[0]
        c, s_ = cos.unsqueeze(1), sin.unsqueeze(1)
        if impl == "liger":
            from liger_kernel.ops.rope import LigerRopeFunction

            def run():
                return LigerRopeFunction.apply(qt, k, cos, sin)
        else:  # transformers' apply_rotary_pos_emb, eager

            def run():
                return transformers_rotary(qt, k, c, s_)
        return (lambda: sum(t.sum() for t in run())) if backward else (lambda: run()[0])
    return make


def rotary_cases(dtype: torch.dtype = torch.bfloat16) -> list[Case]:
    """Rotary embedding of ROTARY_SHAPE: ours against transformers' eager formula and Liger-Kernel's (when
    importable); GB/s of q and k read and written."""
    try:
        import liger_kernel.ops.rope  # noqa: F401

        peers = ("torch", "liger")
    except ImportError:
        peers = ("torch",)
    b, length, h, hkv, d = ROTARY_SHAPE
    io = 2 * 2 * b * length * (h + hkv) * d  # q and k, read once and written once, 2 bytes each
    return [Case("rotary", impl, f"{h}+{hkv} heads D{d}", b * length, backward, 0.0, io * (2 if backward else 1),
                 _rotary_maker(impl, dtype, backward)) for backward in (False, True) for impl in (*KERNEL_IMPLS, *peers)]


def compare_to_baselines(rows: list[Timing]) -> list[tuple[str, str, str, float, float, str]]:
    """Per benchmark case (op, shape, pass): our faster backend's TFLOP/s (or GB/s), the best PyTorch-side
    baseline's, and the speed ratio (> 1: ours is faster). Returns (case, ours, best baseline, our figure,
    ratio, unit) rows."""
    groups: dict[tuple[str, str, int, str], list[Timing]] = {}
    for r in rows:
        groups.setdefault((r.op, r.model, r.seq_len, r.pass_), []).append(r)
    out = []
    for (op, model, length, pass_), rs in groups.items():
        # diagnostics: SDPA is not graphed here, and our mask form is ours
        rs = [r for r in rs if not r.impl.endswith((GRAPHED, MASK_FORM))]
        ours = [r for r in rs if r.impl in KERNEL_IMPLS]
        theirs = [r for r in rs if r.impl not in KERNEL_IMPLS]
        if not ours or not theirs:
            continue
        best, base = min(ours, key=lambda r: r.median_ms), min(theirs, key=lambda r: r.median_ms)
        unit, figure = ("TFLOP/s", best.tflops) if best.tflops else ("GB/s", best.gbps)
        out.append((f"{op} {model} L={length} {pass_}", best.impl, base.impl, figure, base.median_ms / best.median_ms,
                    unit))
    return out


def run_cases(todo: list[Case], device: torch.device, timer: Callable | None = None,
              progress: Callable[[int, int, Case], None] | None = None) -> list[Timing]:
    """Times each case with ``timer(fn, quantiles=[0.5, 0.2, 0.8]) -> (median, p20, p80)`` in ms (default:
    triton.testing.do_bench). Peak memory is measured on one separate call: do_bench allocates a buffer to flush
    the L2 cache between runs, which is not the op's. A case that fails to run (out of memory for the eager
    reference, an SDPA backend that refuses the shape) is skipped."""
    if timer is None:
        from triton.testing import do_bench as timer
    rows = []
    for i, c in enumerate(todo):
        if progress:
            progress(i, len(todo), c)
        try:
            step = _step(c.make(device), c.backward)
            peak = None
            if device.type == "cuda":
                step()
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                step()
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device) / 2**20
            median, p20, p80 = timer(step, quantiles=[0.5, 0.2, 0.8])
        except (torch.OutOfMemoryError, RuntimeError):
            continue
        sec = median / 1e3
        rows.append(Timing(c.op, c.impl, c.model, c.seq_len, "fwd+bwd" if c.backward else "fwd", median, p20, p80,
                           c.flops / sec / 1e12 if c.flops else 0.0, c.bytes / sec / 1e9, peak))
    return rows


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def append_csv(rows: list[Timing], device: torch.device, path: Path) -> Path:
    """Appends rows keyed by GPU name, package version, torch and triton versions."""
    import triton

    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.writer(fh)
        keys = ["gpu", "transformer_kernels", "torch", "triton"]
        fields = list(asdict(rows[0]).keys()) if rows else []
        if new:
            writer.writerow(keys + fields)
        for r in rows:
            writer.writerow([device_name(device), __version__, torch.__version__, triton.__version__, *asdict(r).values()])
    return path


def plot_timings(rows: list[Timing], path: Path, model: str = "gpt2") -> Path:
    """TFLOP/s and peak memory of attention against sequence length, one line per implementation and pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[tuple[str, str], list[Timing]] = {}
    for r in rows:
        if r.op == "attention" and r.model == model:
            series.setdefault((r.impl, r.pass_), []).append(r)
    for (impl, pass_), pts in sorted(series.items()):
        pts.sort(key=lambda r: r.seq_len)
        xs = [r.seq_len for r in pts]
        ax1.plot(xs, [r.tflops for r in pts], marker="o", label=f"{impl} {pass_}")
        ax2.plot(xs, [r.peak_mib or math.nan for r in pts], marker="o", label=f"{impl} {pass_}")
    for ax, label in ((ax1, "TFLOP/s"), (ax2, "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    ax1.set_title(f"attention, {model} sizes")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_timings(rows: list[Timing]) -> str:
    head = (f"{'op':13} {'impl':7} {'model':10} {'L':>5} {'pass':8} {'median ms':>10} {'p20':>8} {'p80':>8} "
            f"{'TFLOP/s':>8} {'GB/s':>8} {'peak MiB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = "-" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        lines.append(f"{r.op:13} {r.impl:7} {r.model:10} {r.seq_len:5d} {r.pass_:8} {r.median_ms:10.3f} {r.p20_ms:8.3f} "
                     f"{r.p80_ms:8.3f} {r.tflops:8.1f} {r.gbps:8.1f} {peak:>9}")
    return "\n".join(lines)


def gpu_report(device: torch.device, out_dir: Path = RESULTS_DIR, timer: Callable | None = None,
               models: tuple[str, ...] = tuple(MODELS), seq_lens: tuple[int, ...] = SEQ_LENS,
               dtype: torch.dtype = torch.float16,
               progress: Callable[[int, int, Case], None] | None = None) -> tuple[str, Path, Path]:
    """Times every case, appends the CSV and draws the plot; returns (table, csv path, png path)."""
    rows = run_cases(cases(models, seq_lens, dtype) + decode_cases(dtype) + varlen_cases(dtype), device, timer,
                     progress)
    csv_path = append_csv(rows, device, out_dir / "results.csv")
    png = plot_timings(rows, out_dir / "attention_tflops_memory.png", model=models[-1])
    return format_timings(rows), csv_path, png


def static_report(out_dir: Path = RESULTS_DIR) -> tuple[str, int, Path]:
    """Resource table of every shipped kernel and the memory-traffic table + PNG; returns (text, spills, png)."""
    from . import resources, toolchain

    rows = resources.triton_report()
    if toolchain.nvcc() is not None:
        rows += resources.cuda_report()
    spills = sum(1 for r in rows if r.stack_bytes)
    traffic = memory_traffic()
    png = plot_traffic(traffic, out_dir / "memory_traffic.png")
    text = (resources.format_table(rows) + f"\n\n{len(rows)} kernel variants, {spills} with spills\n\n"
            + "Memory traffic per forward call, bert-base (B=8, L=512, fp16):\n" + format_traffic(traffic))
    return text, spills, png
