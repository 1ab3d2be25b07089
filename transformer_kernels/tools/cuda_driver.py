"""Runs every CUDA C++ kernel of the "cuda" backend once, forward and backward, at small shapes on the GPU: the
program compute-sanitizer (memcheck, racecheck, synccheck) watches in `make gpu-check`.

    python -m transformer_kernels.tools.cuda_driver
"""

from __future__ import annotations

import torch

from .. import _ext, ops
from .testing import force_softmax_algo


def run(device: torch.device) -> list[str]:
    """Each op on the cuda backend with odd sizes, masks, GQA, dropout and a residual; returns what ran. On CPU
    tensors the same calls run the simulator build (how the tests check this driver)."""
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        return torch.randn(shape, device=device, dtype=dtype, generator=g).requires_grad_()

    ran = []
    for algo in ("warp", "block"):
        with force_softmax_algo(algo):
            x = randn(2, 3, 17, 37)
            mask = torch.rand(17, 37, device=device, generator=g) > 0.3
            ops.masked_softmax(x, mask, 0.5, True, backend="cuda").sum().backward()
        ran.append(f"masked_softmax ({algo} kernels)")
    for d, dtype in ((64, torch.float16), (128, torch.bfloat16), (40, torch.float32)):
        q, k, v = randn(2, 4, 33, d, dtype=dtype), randn(2, 2, 45, d, dtype=dtype), randn(2, 2, 45, d, dtype=dtype)
        pad = torch.zeros(2, 45, dtype=torch.bool, device=device)
        pad[1, -7:] = True
        bias = randn(33, 45, dtype=torch.float32)  # requires grad: the dQ kernel also writes the mask's gradient
        slopes = torch.rand(2, 4, device=device, generator=g)  # ALiBi per batch and head, generated per score
        out = ops.attention(q, k, v, bias, dropout_p=0.1, is_causal=True, enable_gqa=True, key_padding_mask=pad,
                            causal_alignment="bottom_right", alibi_slopes=slopes, backend="cuda")
        out.sum().backward()
        ran.append(f"attention forward/backward D={d} {dtype} (ALiBi, with the mask's gradient)")
    # No mask tensor, padding or dropout: the PLAIN forms (csrc/attention_common.cuh, plain_scores), whose interior
    # key tiles run with no per-score test; a window cuts tiles on both sides of the band.
    q, k, v = randn(1, 4, 70, 64), randn(1, 2, 150, 64), randn(1, 2, 150, 64)
    ops.attention(q, k, v, is_causal=True, enable_gqa=True, causal_alignment="bottom_right", window=(90, 0),
                  backend="cuda").sum().backward()
    ran.append("attention forward/backward PLAIN D=64 (causal, window)")
    # The narrow tiles at D = 128 (the forward's 32 keys, dK/dV's 16 queries, dQ's 16 keys), which a 100 KiB SM
    # (sm_86, sm_89) takes: both forms, as such a device's launchers would choose them.
    real_smem, _ext.smem_per_sm = _ext.smem_per_sm, lambda device: 100 * 1024
    try:
        q, k, v = randn(1, 2, 40, 128), randn(1, 1, 70, 128), randn(1, 1, 70, 128)
        ops.attention(q, k, v, is_causal=True, enable_gqa=True, causal_alignment="bottom_right",
                      backend="cuda").sum().backward()
        ops.attention(q, k, v, attn_mask=randn(40, 70) > 0, enable_gqa=True, backend="cuda").sum().backward()
    finally:
        _ext.smem_per_sm = real_smem
    ran.append("attention forward/backward D=128 narrow tiles (PLAIN and general)")
    q, k, v = randn(1, 4, 1, 64), randn(1, 2, 300, 64), randn(1, 2, 300, 64)
    ops.attention(q, k, v, enable_gqa=True, backend="cuda").sum().backward()
    ran.append("attention decoding step (split-KV forward and its combine kernel)")
    # Packed sequences (the PACKED instantiations): an empty sequence, a short one and one past a 32-row tile.
    cu = torch.tensor([0, 0, 5, 38], dtype=torch.int32, device=device)
    q, k, v = randn(38, 4, 64), randn(38, 2, 64), randn(38, 2, 64)
    ops.varlen_attention(q, k, v, cu, cu, 33, 33, dropout_p=0.1, is_causal=True, enable_gqa=True,
                         backend="cuda").sum().backward()
    ran.append("varlen attention forward/backward (packed sequences)")
    cu = torch.tensor([0, 3, 40, 110], dtype=torch.int32, device=device)
    q, k, v = randn(110, 2, 32, dtype=torch.bfloat16), randn(110, 2, 32, dtype=torch.bfloat16), \
        randn(110, 2, 32, dtype=torch.bfloat16)
    ops.varlen_attention(q, k, v, cu, cu, 70, 70, is_causal=True, backend="cuda").sum().backward()
    ran.append("varlen attention forward/backward PLAIN (packed sequences)")
    x, w, b = randn(37, 64), randn(96, 64), randn(96)
    # Rows of whole 16-byte packs take the packed element-wise kernels (csrc/epilogue.cu); a dense gradient keeps the
    # activation backward packed too (.sum()'s is a stride-0 view: one element an access), and 70 halves a row take
    # one element an access both ways.
    ops.linear(x, w, b, "gelu", residual=randn(37, 96), dropout_p=0.1, backend="cuda").backward(randn(37, 96))
    ops.gated_linear(x, w, randn(96, 64), b, randn(96), "silu", backend="cuda").sum().backward()
    ops.linear(x, randn(70, 64), None, "silu", backend="cuda").backward(randn(37, 70))
    ran.append("linear, gated_linear (epilogue, activation backward)")
    xs = randn(2, 19, 64)
    q, k, v = ops.qkv_projection(xs, randn(3 * 64, 64), randn(3 * 64), 4, backend="cuda")
    ops.out_projection(q, randn(64, 64), randn(64), residual=randn(2, 19, 64), backend="cuda").sum().backward()
    ran.append("qkv_projection, out_projection (head split/merge)")
    # 704 halves a row: the packed norm kernels (csrc/norm.cu); 700: the general ones
    y = randn(23, 704)
    ops.layer_norm(y, randn(704), randn(704), residual=randn(23, 704), backend="cuda").sum().backward()
    ops.rms_norm(randn(23, 700), randn(700), backend="cuda").sum().backward()
    ran.append("layer_norm, rms_norm forward/backward")
    q, k = randn(2, 5, 4, 80).transpose(1, 2), randn(2, 2, 5, 80)
    table = torch.rand(9, 32, device=device, generator=g)
    pos = torch.tensor([[0, 8, 3, 9, 4], [1, 1, 2, 3, 5]], device=device)  # 9: outside the table (NaN, no read)
    sum(t.nan_to_num().sum() for t in ops.rotary(q, k, table.cos(), table.sin(), pos, True, backend="cuda")).backward()
    ran.append("rotary forward/backward (partial, interleaved, position table)")
    x, w = randn(2, 7, 48), randn(300, 48)
    target = torch.randint(0, 300, (2, 7), device=device, generator=g)
    target[0, :2] = -100
    ops.linear_cross_entropy(x, w, target, randn(300), label_smoothing=0.1, softcap=4.0, z_loss=1e-3,
                             backend="cuda").backward()
    ops.linear_cross_entropy(x, w, target, reduction="none", backend="cuda").sum().backward()
    ran.append("linear_cross_entropy (cross-entropy rows, with and without the gradient)")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return ran


if __name__ == "__main__":
    for line in run(torch.device("cuda")):
        print("ran", line)
