"""The CUDA backend's projections: a cuBLAS GEMM (torch.matmul, fp32 accumulation) and one fused element-wise
kernel from csrc/epilogue.cu for everything after it (bias, activation, dropout, residual, gated product, head
layout). Same signatures and saved tensors as the Triton paths of ops/linear.py, which call these for
backend="cuda"."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext


def col_sum(t: Tensor, dtype: torch.dtype) -> Tensor:
    """dBias of either backend when no GEMM carries it: a column sum in fp32, in a fixed order."""
    return t.float().sum(0).to(dtype)


def _weight_grads(dz: Tensor, x: Tensor, weight: Tensor, has_bias: bool) -> tuple[Tensor, Tensor]:
    dw = (dz.t() @ x).to(weight.dtype)
    return dw, (col_sum(dz, weight.dtype) if has_bias else weight.new_empty(0))


def linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, activation: str,
                   dropout_p: float, seed: int) -> tuple[Tensor, Tensor]:
    """y = dropout(act(x Wᵀ + b)) + residual and the saved pre-activation Z (empty without an activation)."""
    acc = x @ weight.t()
    y = _ext.epilogue_forward(acc, None, bias, None, residual, activation, dropout_p, seed)
    return y, (acc if activation else x.new_empty(0))


def linear_backward(dy: Tensor, x: Tensor, weight: Tensor, z: Tensor, has_bias: bool, activation: str,
                    dropout_p: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    dz = dy
    if activation or dropout_p > 0.0:
        dz, _ = _ext.activation_backward(dy, z if activation else None, None, activation,
                                         dropout_p, seed)
    dw, db = _weight_grads(dz, x, weight, has_bias)
    return dz @ weight, dw, db


def gated_forward(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None, b_up: Tensor | None,
                  activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """y = act(x W_gateᵀ + b_gate) · (x W_upᵀ + b_up) and both saved pre-activations."""
    zg, zu = x @ w_gate.t(), x @ w_up.t()
    y = _ext.epilogue_forward(zg, zu, b_gate, b_up, None, activation, 0.0, 0)
    return y, zg, zu


def gated_backward(dy: Tensor, x: Tensor, w_gate: Tensor, w_up: Tensor, zg: Tensor, zu: Tensor, has_bias: bool,
                   activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dzg, dzu = _ext.activation_backward(dy, zg, zu, activation, 0.0, 0)
    dwg, dbg = _weight_grads(dzg, x, w_gate, has_bias)
    dwu, dbu = _weight_grads(dzu, x, w_up, has_bias)
    return dzg @ w_gate + dzu @ w_up, dwg, dwu, dbg, dbu


def qkv_forward(x: Tensor, w_qkv: Tensor, b_qkv: Tensor | None, batch: int, num_heads: int,
                num_kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """One GEMM for q, k and v; the split kernel adds the bias and writes each into ``[B, heads, L, D]``."""
    acc = x @ w_qkv.t()
    length = x.shape[0] // batch if batch else 0
    d = w_qkv.shape[0] // (num_heads + 2 * num_kv_heads)
    outs, col = [], 0
    for heads in (num_heads, num_kv_heads, num_kv_heads):
        outs.append(_ext.head_split(acc, b_qkv, col, x.new_empty((batch, heads, length, d))))
        col += heads * d
    return outs[0], outs[1], outs[2]


def qkv_backward(dq: Tensor, dk: Tensor, dv: Tensor, x: Tensor, w_qkv: Tensor, has_bias: bool,
                 ) -> tuple[Tensor, Tensor, Tensor]:
    # The three head-split gradients merged into one [B·L, (H + 2·Hkv)·D] matrix for one dX and one dW GEMM.
    dy = x.new_empty((x.shape[0], w_qkv.shape[0]))
    col = 0
    for t in (dq, dk, dv):
        _ext.head_merge(t, dy, col)
        col += t.shape[1] * t.shape[3]
    dw, db = _weight_grads(dy, x, w_qkv, has_bias)
    return dy @ w_qkv, dw, db


def _merged(attn: Tensor) -> Tensor:
    b, h, length, d = attn.shape
    return _ext.head_merge(attn, attn.new_empty((b * length, h * d)))


def out_forward(attn: Tensor, w_o: Tensor, b_o: Tensor | None, residual: Tensor | None) -> Tensor:
    """Head merge (one copy kernel), GEMM, then bias + residual."""
    acc = _merged(attn) @ w_o.t()
    return _ext.epilogue_forward(acc, None, b_o, None, residual, None, 0.0, 0)


def out_backward(dy: Tensor, attn: Tensor, w_o: Tensor, has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    d_attn = _ext.head_split(dy @ w_o, None, 0, attn.new_empty(attn.shape))
    dw, db = _weight_grads(dy, _merged(attn), w_o, has_bias)
    return d_attn, dw, db
