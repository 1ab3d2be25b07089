"""CUDA C++ launchers of the projections and the feed-forward: a cuBLAS GEMM (torch.matmul, fp32 accumulation)
and one fused element-wise kernel from csrc/epilogue.cu for everything after it (bias, activation, dropout,
residual, gated product, head layout). Same functions, signatures and saved tensors as kernels/linear.py."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext
from .._layout import col_sum, unit_last_stride
from ._args import ptr, stream, unsupported_dtype

unsupported = unsupported_dtype


# ---- the element-wise kernels --------------------------------------------------------------------


def _epilogue(acc: Tensor, acc2: Tensor | None, bias: Tensor | None, bias2: Tensor | None, residual: Tensor | None,
              activation: str, dropout_p: float, seed: Tensor | None) -> Tensor:
    """After the GEMM(s): acc (acc2) contiguous ``[M, N]`` become the pre-activations in place; returns
    ``dropout(act(acc + bias) [* (acc2 + bias2)]) + residual``, contiguous ``[M, N]``."""
    m, n = acc.shape
    residual = None if residual is None else unit_last_stride(residual)
    y = torch.empty_like(acc)
    mod = _ext.module_for(acc.device)
    mod.epilogue_forward({
        "acc": acc.data_ptr(), "acc2": ptr(acc2), "bias": ptr(bias), "bias2": ptr(bias2), "residual": ptr(residual),
        "y": y.data_ptr(), "M": m, "N": n, "res_row_stride": 0 if residual is None else residual.stride(0),
        "act": mod.activation_codes[activation], "dropout_p": float(dropout_p), "seed": ptr(seed),
        "dtype": _ext.dtype_code(mod, acc.dtype)}, stream(acc))
    return y


def _activation_backward(dy: Tensor, z: Tensor | None, z2: Tensor | None, activation: str, dropout_p: float,
                         seed: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """dZ (and dZ_up for the gated form) from dY ``[M, N]`` (any strides) and the saved pre-activations."""
    m, n = dy.shape
    dz = torch.empty((m, n), dtype=dy.dtype, device=dy.device)
    dz2 = torch.empty_like(dz) if z2 is not None else None
    mod = _ext.module_for(dy.device)
    mod.activation_backward({
        "dy": dy.data_ptr(), "z": ptr(z), "z2": ptr(z2), "dz": dz.data_ptr(), "dz2": ptr(dz2), "M": m, "N": n,
        "dy_row_stride": dy.stride(0), "dy_col_stride": dy.stride(1), "act": mod.activation_codes[activation],
        "dropout_p": float(dropout_p), "seed": ptr(seed), "dtype": _ext.dtype_code(mod, dy.dtype)}, stream(dy))
    return dz, dz2


def _head_layout(kernel: str, src: Tensor, bias: Tensor | None, dst: Tensor, heads_t: Tensor, col0: int,
                 row_stride: int, strides: list[int]) -> None:
    b, heads, length, d = heads_t.shape
    mod = _ext.module_for(src.device)
    getattr(mod, kernel)({
        "src": src.data_ptr(), "bias": ptr(bias), "dst": dst.data_ptr(), "B": b, "heads": heads, "L": length, "D": d,
        "col0": col0, "row_stride": row_stride, "strides": strides, "dtype": _ext.dtype_code(mod, src.dtype)},
        stream(src))


def _head_split(src: Tensor, bias: Tensor | None, col0: int, out: Tensor) -> Tensor:
    """out ``[B, heads, L, D]`` (contiguous) = src ``[B·L, C]`` columns ``col0 .. col0 + heads·D`` (+ bias)."""
    _head_layout("head_split", src, bias, out, out, col0, src.stride(0), [0] * 4)
    return out


def _head_merge(src: Tensor, out: Tensor, col0: int = 0) -> Tensor:
    """out ``[B·L, C]`` columns ``col0 .. col0 + heads·D`` = src ``[B, heads, L, D]`` (any strides)."""
    _head_layout("head_merge", src, None, out, src, col0, out.stride(0), list(src.stride()))
    return out


def _weight_grads(dz: Tensor, x: Tensor, weight: Tensor, has_bias: bool) -> tuple[Tensor, Tensor]:
    dw = (dz.t() @ x).to(weight.dtype)
    return dw, (col_sum(dz, weight.dtype) if has_bias else weight.new_empty(0))


# ---- the launchers ---------------------------------------------------------------------------------


def linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, activation: str,
                   dropout_p: float, seed: Tensor | None) -> tuple[Tensor, Tensor]:
    """x ``[M, K]``, weight ``[N, K]``: y = dropout(act(x Wᵀ + b)) + residual and the saved pre-activation Z
    (empty without an activation; ``activation`` "" for none)."""
    acc = x @ weight.t()
    y = _epilogue(acc, None, bias, None, residual, activation, dropout_p, seed)
    return y, (acc if activation else x.new_empty(0))


def linear_backward(dy: Tensor, x: Tensor, weight: Tensor, z: Tensor, has_bias: bool, activation: str,
                    dropout_p: float, seed: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias or an empty tensor)."""
    dz = dy
    if activation or dropout_p > 0.0:
        dz, _ = _activation_backward(dy, z if activation else None, None, activation, dropout_p, seed)
    dw, db = _weight_grads(dz, x, weight, has_bias)
    return dz @ weight, dw, db


def gated_forward(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None, b_up: Tensor | None,
                  activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """y = act(x W_gateᵀ + b_gate) · (x W_upᵀ + b_up) and both saved pre-activations."""
    zg, zu = x @ w_gate.t(), x @ w_up.t()
    y = _epilogue(zg, zu, b_gate, b_up, None, activation, 0.0, None)
    return y, zg, zu


def gated_backward(dy: Tensor, x: Tensor, w_gate: Tensor, w_up: Tensor, zg: Tensor, zu: Tensor, has_bias: bool,
                   activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw_gate, dw_up, db_gate, db_up); the bias grads are empty without biases."""
    dzg, dzu = _activation_backward(dy, zg, zu, activation, 0.0, None)
    dwg, dbg = _weight_grads(dzg, x, w_gate, has_bias)
    dwu, dbu = _weight_grads(dzu, x, w_up, has_bias)
    return dzg @ w_gate + dzu @ w_up, dwg, dwu, dbg, dbu


def qkv_forward(x: Tensor, w_qkv: Tensor, b_qkv: Tensor | None, batch: int, num_heads: int,
                num_kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """x ``[B·L, E]``: one GEMM for q, k and v; the split kernel adds the bias and writes each into
    ``[B, heads, L, D]``."""
    acc = x @ w_qkv.t()
    length = x.shape[0] // batch if batch else 0
    d = w_qkv.shape[0] // (num_heads + 2 * num_kv_heads)
    outs, col = [], 0
    for heads in (num_heads, num_kv_heads, num_kv_heads):
        outs.append(_head_split(acc, b_qkv, col, x.new_empty((batch, heads, length, d))))
        col += heads * d
    return outs[0], outs[1], outs[2]


def qkv_backward(dq: Tensor, dk: Tensor, dv: Tensor, x: Tensor, w_qkv: Tensor, has_bias: bool,
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw_qkv, db_qkv or an empty tensor)."""
    # The three head-split gradients merged into one [B·L, (H + 2·Hkv)·D] matrix for one dX and one dW GEMM.
    dy = x.new_empty((x.shape[0], w_qkv.shape[0]))
    col = 0
    for t in (dq, dk, dv):
        _head_merge(t, dy, col)
        col += t.shape[1] * t.shape[3]
    dw, db = _weight_grads(dy, x, w_qkv, has_bias)
    return dy @ w_qkv, dw, db


def _merged(attn: Tensor) -> Tensor:
    b, h, length, d = attn.shape
    return _head_merge(attn, attn.new_empty((b * length, h * d)))


def out_forward(attn: Tensor, w_o: Tensor, b_o: Tensor | None, residual: Tensor | None) -> Tensor:
    """attn ``[B, H, L, D]`` → ``[B·L, E]``: head merge (one copy kernel), GEMM, then bias + residual."""
    acc = _merged(attn) @ w_o.t()
    return _epilogue(acc, None, b_o, None, residual, "", 0.0, None)


def out_backward(dy: Tensor, attn: Tensor, w_o: Tensor, has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(d_attn ``[B, H, L, D]``, dw_o, db_o or an empty tensor)."""
    d_attn = _head_split(dy @ w_o, None, 0, attn.new_empty(attn.shape))
    dw, db = _weight_grads(dy, _merged(attn), w_o, has_bias)
    return d_attn, dw, db
