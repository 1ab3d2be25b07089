"""Tiled GEMM with fused prologues and epilogues, in Triton: the projections and the feed-forward.

C = A @ B with A ``[M, K]`` and B ``[K, N]`` read through strides (``W.T`` is a view, never copied), fp32
accumulation on tensor cores (fp32 operands as tf32x3), tiles visited in grouped order (GROUP_M row tiles share
each column of B while it is in L2). Epilogue, in order: + bias, activation (the pre-activation can be stored for
backward), dropout, + residual, and the store, either row-major or split into heads: row m = b·L + l, column
n = h·D + d goes to ``out[b, h, l, d]`` (the QKV projection writes ``[B, H, L, D]`` directly). The A operand can
instead be gathered from ``[B, H, L, D]`` (head merge in the prologue, for the output projection). A gated mode
multiplies with a second B (``act(A@Bg + bg) · (A@Bu + bu)``, swiglu/geglu) sharing each A tile.

Backward (the launchers at the end of this file): the pre-activation Z is saved in forward (M·N elements of the
input dtype, only when there is an activation). `dact_kernel` forms dZ = dY·keep/(1−p)·act'(Z) (the gated unit's
two parts from one read of dY) once per element; then dX = dZ @ W and dW = dZᵀ @ X run through the same GEMM, the
dW GEMM summing its A rows into dBias. Forming dZ in each GEMM's prologue instead saves writing and reading it once
but evaluates act' and the dropout hash once per output-column tile (12× per element for a BERT intermediate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._layout import col_sum, unit_last_stride
from .common import cast_out, dropout_keep, mma
from .config import (
    TRITON_DTYPE_NAMES,
    AotVariant,
    Autotuned,
    aot_signature,
    is_interpreted,
    length_class,
    unsupported_dtype,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 1:
        return tl.maximum(z, 0.0)
    if ACT == 2:
        return 0.5 * z * (1.0 + tl.math.erf(z * _SQRT_HALF))
    if ACT == 3:
        # tanh(u) = 2·sigmoid(2u) − 1 (Triton has no portable tanh that the interpreter also runs)
        u = _SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)
        return 0.5 * z * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))
    if ACT == 4:
        return z * tl.sigmoid(z)
    return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    # d act / dz at the saved pre-activation.
    if ACT == 1:
        return tl.where(z > 0.0, 1.0, 0.0)
    if ACT == 2:
        return 0.5 * (1.0 + tl.math.erf(z * _SQRT_HALF)) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    if ACT == 3:
        u = _SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)
    if ACT == 4:
        sg = tl.sigmoid(z)
        return sg * (1.0 + z * (1.0 - sg))
    return tl.full(z.shape, 1.0, tl.float32)


@triton.jit
def _heads_offsets(rows, cols, seqlen, stride_b, stride_h, stride_l, HEAD_DIM: tl.constexpr):
    # Element (m, n) of a [B·L, H·D] matrix that lives in a [B, H, L, D] tensor: m = b·L + l, n = h·D + d.
    return (((rows // seqlen).to(tl.int64) * stride_b + (rows % seqlen).to(tl.int64) * stride_l)[:, None]
            + ((cols // HEAD_DIM).to(tl.int64) * stride_h + cols % HEAD_DIM)[None, :])


@triton.jit
def _a_tile(a_ptr, offs_m, offs_k, m, k, stride_am, stride_ak, seqlen, stride_a_b, stride_a_h, stride_a_l,
            MERGE_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr):
    ok = (offs_m[:, None] < m) & (offs_k[None, :] < k)
    if MERGE_HEADS:
        # A[m, k] = attn[b, h, l, d]: the head merge happens in the load.
        ptrs = a_ptr + _heads_offsets(offs_m, offs_k, seqlen, stride_a_b, stride_a_h, stride_a_l, HEAD_DIM)
    else:
        ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k.to(tl.int64)[None, :] * stride_ak
    return tl.load(ptrs, mask=ok, other=0.0)


@triton.jit
def matmul_kernel(
    a_ptr, b_ptr, b2_ptr, c_ptr, z_ptr, z2_ptr, bias_ptr, bias2_ptr, res_ptr, dbias_ptr,
    m, n, k, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_rm, stride_rn,
    seqlen, stride_a_b, stride_a_h, stride_a_l, stride_c_b, stride_c_h, stride_c_l,
    dropout_p, seed_ptr, m_class, n_class, k_class, c2_ptr, c3_ptr, heads_q, heads_kv, stride_kv_b,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, DROPOUT: tl.constexpr, STORE_Z: tl.constexpr,
    GATED: tl.constexpr, MERGE_HEADS: tl.constexpr, SPLIT_HEADS: tl.constexpr, SPLIT_QKV: tl.constexpr,
    HEAD_DIM: tl.constexpr, HAS_DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    pid = tl.program_id(0)
    # The dropout seed is read on the device, where torch's generator drew it (graph replays draw new ones).
    seed = tl.load(seed_ptr) if DROPOUT else 0
    n_m = tl.cdiv(m, BLOCK_M)
    n_n = tl.cdiv(n, BLOCK_N)
    # Grouped order: GROUP_M consecutive programs walk down one column of tiles, so B's tiles are reused from L2.
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % rows_in_group
    pid_n = (pid % (GROUP_M * n_n)) // rows_in_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    dbias = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, k, BLOCK_K):
        ks = k0 + offs_k
        a = _a_tile(a_ptr, offs_m, ks, m, k, stride_am, stride_ak, seqlen, stride_a_b, stride_a_h, stride_a_l,
                    MERGE_HEADS, HEAD_DIM)
        if HAS_DBIAS:
            dbias += tl.sum(a.to(tl.float32), axis=1)  # the dW GEMM's A is dZᵀ: its row sums are dBias
        b_ok = (ks[:, None] < k) & (offs_n[None, :] < n)
        b_off = ks.to(tl.int64)[:, None] * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn
        acc = mma(a, tl.load(b_ptr + b_off, mask=b_ok, other=0.0), acc, INTERPRETED)
        if GATED:
            acc2 = mma(a, tl.load(b2_ptr + b_off, mask=b_ok, other=0.0), acc2, INTERPRETED)
    if HAS_DBIAS:  # noqa: SIM102 (a constexpr test around a runtime one: "and" would not fold at compile time)
        if pid_n == 0:
            tl.store(dbias_ptr + offs_m, dbias, mask=offs_m < m)
    out_ok = (offs_m[:, None] < m) & (offs_n[None, :] < n)
    z_off = offs_m.to(tl.int64)[:, None] * n + offs_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < n, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc2 += tl.load(bias2_ptr + offs_n, mask=offs_n < n, other=0.0).to(tl.float32)[None, :]
    if STORE_Z:
        tl.store(z_ptr + z_off, cast_out(acc, z_ptr.dtype.element_ty, INTERPRETED), mask=out_ok)
        if GATED:
            tl.store(z2_ptr + z_off, cast_out(acc2, z2_ptr.dtype.element_ty, INTERPRETED), mask=out_ok)
    y = _act(acc, ACT)
    if GATED:
        y = y * acc2
    if DROPOUT:
        keep = dropout_keep(seed, offs_m.to(tl.int64), offs_n, dropout_p)
        y = tl.where(keep, y * (1.0 / (1.0 - dropout_p)), 0.0)
    if HAS_RES:
        y += tl.load(res_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n.to(tl.int64)[None, :] * stride_rn,
                     mask=out_ok, other=0.0).to(tl.float32)
    y = cast_out(y, c_ptr.dtype.element_ty, INTERPRETED)
    if SPLIT_QKV:
        # Columns [q heads | k heads | v heads] of the QKV projection, each head into its own [B, heads, L, D]
        # tensor (q, k, v contiguous: one head and row stride for the three, k and v share a batch stride).
        head = offs_n // HEAD_DIM
        k_cols = offs_n - heads_q * HEAD_DIM
        v_cols = k_cols - heads_kv * HEAD_DIM
        in_q = (head < heads_q)[None, :]
        in_v = (head >= heads_q + heads_kv)[None, :]
        tl.store(c_ptr + _heads_offsets(offs_m, offs_n, seqlen, stride_c_b, stride_c_h, stride_c_l, HEAD_DIM), y,
                 mask=out_ok & in_q)
        tl.store(c2_ptr + _heads_offsets(offs_m, k_cols, seqlen, stride_kv_b, stride_c_h, stride_c_l, HEAD_DIM), y,
                 mask=out_ok & ~in_q & ~in_v)
        tl.store(c3_ptr + _heads_offsets(offs_m, v_cols, seqlen, stride_kv_b, stride_c_h, stride_c_l, HEAD_DIM), y,
                 mask=out_ok & in_v)
    elif SPLIT_HEADS:
        tl.store(c_ptr + _heads_offsets(offs_m, offs_n, seqlen, stride_c_b, stride_c_h, stride_c_l, HEAD_DIM), y,
                 mask=out_ok)
    else:
        tl.store(c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn, y,
                 mask=out_ok)


@triton.jit
def dact_kernel(dy_ptr, z_ptr, z2_ptr, dz_ptr, dz2_ptr, m, n, stride_dym, stride_dyn, dropout_p, seed_ptr,
                ACT: tl.constexpr, DROPOUT: tl.constexpr, GATED: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRETED: tl.constexpr):
    # dZ = dY · dropout-keep/(1−p) · act'(Z); gated: y = act(Zg)·Zu, so dZg = g·Zu·act'(Zg) and dZu = g·act(Zg).
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (offs_m[:, None] < m) & (offs_n[None, :] < n)
    g = tl.load(dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym + offs_n.to(tl.int64)[None, :] * stride_dyn,
                mask=ok, other=0.0).to(tl.float32)
    if DROPOUT:
        keep = dropout_keep(tl.load(seed_ptr), offs_m.to(tl.int64), offs_n, dropout_p)
        g = tl.where(keep, g * (1.0 / (1.0 - dropout_p)), 0.0)
    off = offs_m.to(tl.int64)[:, None] * n + offs_n[None, :]
    if ACT != 0:  # dropout alone has no pre-activation to read (a gated unit always has an activation)
        z = tl.load(z_ptr + off, mask=ok, other=0.0).to(tl.float32)
        if GATED:
            up = tl.load(z2_ptr + off, mask=ok, other=0.0).to(tl.float32)
            tl.store(dz2_ptr + off, cast_out(g * _act(z, ACT), dz2_ptr.dtype.element_ty, INTERPRETED), mask=ok)
            g = g * up
        g = g * _act_grad(z, ACT)
    tl.store(dz_ptr + off, cast_out(g, dz_ptr.dtype.element_ty, INTERPRETED), mask=ok)


# ---- launchers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def triton(self) -> triton.Config:
        return triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k},
                             num_warps=self.num_warps, num_stages=self.num_stages)


# Tiles autotune tries per (feature class, element bytes). "all" = gated with every epilogue feature (two
# accumulators, residual, dropout draws), the most registers. 16-bit and fp32 (tf32x3) lists are separate;
# tests/test_resources.py checks each entry compiles for sm_80 and sm_90 with 0 spills and tensor cores.
GEMM_CONFIGS: dict[tuple[str, int], list[GemmConfig]] = {
    ("plain", 2): [GemmConfig(128, 128, 32, 8, 3), GemmConfig(128, 64, 32, 4, 4), GemmConfig(64, 64, 32, 4, 4)],
    ("all", 2): [GemmConfig(128, 64, 32, 8, 3), GemmConfig(64, 64, 32, 4, 4)],
    ("plain", 4): [GemmConfig(64, 64, 32, 4, 3), GemmConfig(32, 64, 32, 4, 3)],
    ("all", 4): [GemmConfig(32, 32, 32, 4, 2)],  # (64, 64, 32, 8, 2) spilled 328 bytes on sm_80
}
INTERPRETER_CONFIG = GemmConfig(32, 32, 32, 1, 1)
GROUP_M = 8
DACT_BLOCK = (32, 64)


def feature_class(gated: bool, has_res: bool, dropout: bool, dbias: bool = False) -> str:
    # The dW GEMM's dBias row sums count as a feature: fp32 (64, 64) tiles spilled with them on sm_80.
    return "all" if gated or has_res or dropout or dbias else "plain"


def gemm_configs(elem_bytes: int, features: str) -> list[GemmConfig]:
    if is_interpreted():
        return [INTERPRETER_CONFIG]
    return GEMM_CONFIGS[(features, max(elem_bytes, 2))]


def _allowed(named_args, kwargs) -> list[GemmConfig]:
    features = feature_class(kwargs["GATED"], kwargs["HAS_RES"], kwargs["DROPOUT"], kwargs["HAS_DBIAS"])
    return gemm_configs(named_args["a_ptr"].element_size(), features)


_matmul = Autotuned(
    matmul_kernel, [INTERPRETER_CONFIG] if is_interpreted() else [c for cs in GEMM_CONFIGS.values() for c in cs],
    # Sizes by bucket (length_class): a new token count must not re-benchmark every step of a decoding loop.
    ["m_class", "n_class", "k_class", "ACT", "HAS_RES", "DROPOUT", "GATED", "MERGE_HEADS", "SPLIT_HEADS", "SPLIT_QKV",
     "HAS_DBIAS"],
    _allowed)


@dataclass
class HeadLayout:
    """``[B, H, L, D]`` tensor seen as a ``[B·L, H·D]`` matrix: its length L, head dim D and strides. As an output
    with ``k`` and ``v`` (contiguous ``[B, Hkv, L, D]``, ``tensor`` a contiguous q): the QKV projection's
    ``[B·L, (H + 2·Hkv)·D]`` product split into the three."""

    tensor: torch.Tensor
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @property
    def args(self) -> tuple[int, int, int, int]:
        t = self.tensor
        return t.shape[2], t.stride(0), t.stride(1), t.stride(2)


def matmul(a: torch.Tensor | HeadLayout, b: torch.Tensor, *, b2: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, bias2: torch.Tensor | None = None, residual: torch.Tensor | None = None,
           activation: str | None = None, dropout_p: float = 0.0, seed: torch.Tensor | None = None, store_z: bool = False,
           out: torch.Tensor | HeadLayout | None = None, out_dtype: torch.dtype | None = None,
           dbias: torch.Tensor | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``epilogue(a @ b)`` with a ``[M, K]`` (or heads ``[B, H, L, D]`` merged) and b ``[K, N]`` (any strides;
    b2 ``[K, N]`` for the gated up projection). Returns (C, Z, Z2): C ``[M, N]`` (or written into ``out``), and
    the pre-activations when ``store_z``. Heads layouts need the last-dim stride 1. ``dbias`` (fp32 ``[M]``)
    receives the row sums of the A operand (dBias when A is dZᵀ)."""
    merge = isinstance(a, HeadLayout)
    if merge:
        t = a.tensor
        m, k, head_dim = t.shape[0] * t.shape[2], t.shape[1] * t.shape[3], t.shape[3]
        a_ptr, a_strides, a_heads = t, (0, 0), a.args
    else:
        m, k = a.shape
        a_ptr, a_strides, a_heads, head_dim = a, a.stride(), (1, 0, 0, 0), 1
    if b.shape[0] != k:
        raise ValueError(f"inner dims differ: A is [{m}, {k}], B is {tuple(b.shape)}")
    n = b.shape[1]
    dtype = out_dtype or a_ptr.dtype
    split = isinstance(out, HeadLayout)
    if out is None:
        out = torch.empty((m, n), dtype=dtype, device=b.device)
    c_ptr = out.tensor if split else out
    if split:
        head_dim = c_ptr.shape[3]
        c_strides, c_heads = (0, 0), out.args[1:]
        l_len = out.args[0]
    else:
        c_strides, c_heads = out.stride(), (0, 0, 0)
        l_len = a_heads[0]
    if merge and split:
        raise ValueError("a GEMM cannot both merge and split heads")
    qkv = split and out.k is not None
    qkv_args = (out.k, out.v, c_ptr.shape[1], out.k.shape[1], out.k.stride(0)) if qkv else (c_ptr, c_ptr, 0, 0, 0)
    z = torch.empty((m, n), dtype=dtype, device=b.device) if store_z else None
    z2 = torch.empty((m, n), dtype=dtype, device=b.device) if store_z and b2 is not None else None
    if m == 0 or n == 0:
        return (out.tensor if split else out), z, z2
    if k == 0:
        # Nothing to multiply: the epilogue still runs on zeros through a K = 1 product of zero operands.
        a_ptr = torch.zeros((m, 1), dtype=a_ptr.dtype, device=b.device)
        b = torch.zeros((1, n), dtype=b.dtype, device=b.device)
        b2 = None if b2 is None else torch.zeros((1, n), dtype=b.dtype, device=b.device)
        k, merge, a_strides, a_heads = 1, False, (1, 1), (l_len, 0, 0, 0)
    res = residual
    _matmul[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
        a_ptr, b, b if b2 is None else b2, c_ptr, c_ptr if z is None else z, c_ptr if z2 is None else z2,
        b if bias is None else bias, b if bias2 is None else bias2, b if res is None else res,
        b if dbias is None else dbias,
        m, n, k, *a_strides, *b.stride(), *c_strides, *((0, 0) if res is None else res.stride()),
        l_len if (merge or split) else 1, *a_heads[1:], *c_heads, dropout_p, b if seed is None else seed,
        length_class(m), length_class(n), length_class(k), *qkv_args,
        ACT=ACTIVATIONS[activation], HAS_BIAS=bias is not None, HAS_RES=res is not None,
        DROPOUT=dropout_p > 0.0, STORE_Z=store_z, GATED=b2 is not None, MERGE_HEADS=merge,
        SPLIT_HEADS=split, SPLIT_QKV=qkv, HEAD_DIM=head_dim, HAS_DBIAS=dbias is not None,
        GROUP_M=GROUP_M, INTERPRETED=is_interpreted(),
    )
    return c_ptr, z, z2


def activation_backward(dy: torch.Tensor, z: torch.Tensor | None, z2: torch.Tensor | None, activation: str | None,
                        dropout_p: float, seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dZ (and dZ_up for the gated form), contiguous, from dY ``[M, N]`` (any strides) and the saved
    pre-activations (None without an activation)."""
    m, n = dy.shape
    dz = torch.empty((m, n), dtype=dy.dtype, device=dy.device)
    dz2 = torch.empty_like(dz) if z2 is not None else None
    z = dz if z is None else z  # never read without an activation
    if m and n:
        grid = (triton.cdiv(m, DACT_BLOCK[0]), triton.cdiv(n, DACT_BLOCK[1]))
        dact_kernel[grid](dy, z, z if z2 is None else z2, dz, dz if dz2 is None else dz2, m, n, *dy.stride(), dropout_p,
                          dy if seed is None else seed, ACT=ACTIVATIONS[activation], DROPOUT=dropout_p > 0.0,
                          GATED=z2 is not None, BLOCK_M=DACT_BLOCK[0], BLOCK_N=DACT_BLOCK[1],
                          INTERPRETED=is_interpreted(), num_warps=4)
    return dz, dz2


# ---- the op launchers (same functions and signatures as transformer_kernels/cuda/linear.py) -----------


def unsupported(x: torch.Tensor) -> str | None:
    """Why these kernels cannot take ``x`` (None when they can)."""
    return unsupported_dtype(x, SUPPORTED_DTYPES)


def _weight_and_bias_grads(dz: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                           has_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """dW = dZᵀ·X, with dBias summed from the same GEMM's A rows (an empty tensor without a bias)."""
    if x.shape[1] == 0:  # no dW GEMM to carry the sum
        return weight.new_zeros(weight.shape), (col_sum(dz, weight.dtype) if has_bias else weight.new_empty(0))
    # The GEMM's pid_n == 0 programs write every dBias row (a K = 0 product still runs its epilogue on zeros).
    db = torch.empty(weight.shape[0] if has_bias else 0, dtype=torch.float32, device=dz.device)
    dw, _, _ = matmul(dz.t(), x, out_dtype=weight.dtype, dbias=db if has_bias else None)
    return dw, db.to(weight.dtype)


def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                   activation: str, dropout_p: float, seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[M, K]``, weight ``[N, K]``: y = dropout(act(x Wᵀ + b)) + residual and the saved pre-activation Z
    (empty without an activation; ``activation`` "" for none)."""
    act = activation or None
    y, z, _ = matmul(x, weight.t(), bias=bias, residual=residual, activation=act, dropout_p=dropout_p, seed=seed,
                     store_z=act is not None)
    return y, (z if z is not None else x.new_empty(0))


def linear_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, has_bias: bool,
                    activation: str, dropout_p: float,
                    seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias or an empty tensor)."""
    act = activation or None
    # dZ = dY·dropout·act'(Z) in one pass, then the two GEMMs (the dW one also sums dBias).
    dz = dy
    if act or dropout_p > 0.0:
        dz, _ = activation_backward(dy, z if act else None, None, act, dropout_p, seed)
    dw, db = _weight_and_bias_grads(dz, x, weight, has_bias)
    dx = x.new_zeros(x.shape) if x.shape[1] == 0 else matmul(dz, weight)[0]
    return dx, dw, db


def gated_forward(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, b_gate: torch.Tensor | None,
                  b_up: torch.Tensor | None, activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = act(x W_gateᵀ + b_gate) · (x W_upᵀ + b_up) and both saved pre-activations, in one GEMM sharing A."""
    y, zg, zu = matmul(x, w_gate.t(), b2=w_up.t(), bias=b_gate, bias2=b_up, activation=activation, store_z=True)
    return y, zg, zu


def gated_backward(dy: torch.Tensor, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, zg: torch.Tensor,
                   zu: torch.Tensor, has_bias: bool, activation: str,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw_gate, dw_up, db_gate, db_up); the bias grads are empty without biases."""
    # dZg = dY·Zu·act'(Zg) and dZu = dY·act(Zg) in one pass over dY, then dX = dZg·Wg + dZu·Wu (summed in the second
    # GEMM's epilogue) and the two dW GEMMs.
    dzg, dzu = activation_backward(dy, zg, zu, activation, 0.0, None)
    dwg, dbg = _weight_and_bias_grads(dzg, x, w_gate, has_bias)
    dwu, dbu = _weight_and_bias_grads(dzu, x, w_up, has_bias)
    if x.shape[1] == 0:
        return x.new_zeros(x.shape), dwg, dwu, dbg, dbu
    dx_gate, _, _ = matmul(dzg, w_gate)
    dx, _, _ = matmul(dzu, w_up, residual=dx_gate)
    return dx, dwg, dwu, dbg, dbu


def qkv_forward(x: torch.Tensor, w_qkv: torch.Tensor, b_qkv: torch.Tensor | None, batch: int, num_heads: int,
                num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x ``[B·L, E]`` → q ``[B, H, L, D]``, k and v ``[B, Hkv, L, D]``, written in that layout by the epilogue."""
    length = x.shape[0] // batch if batch else 0
    d = w_qkv.shape[0] // (num_heads + 2 * num_kv_heads)
    q, k, v = (x.new_empty((batch, heads, length, d)) for heads in (num_heads, num_kv_heads, num_kv_heads))
    # One GEMM reads x once; its epilogue writes each head of [B·L, (H + 2·Hkv)·D] straight into q, k or v.
    matmul(x, w_qkv.t(), bias=b_qkv, out=HeadLayout(q, k, v))
    return q, k, v


def _merged(t: torch.Tensor) -> torch.Tensor:
    b, h, length, d = t.shape
    return t.transpose(1, 2).reshape(b * length, h * d)


def qkv_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, x: torch.Tensor, w_qkv: torch.Tensor,
                 has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw_qkv, db_qkv or an empty tensor)."""
    # One [B·L, (H + 2·Hkv)·D] gradient (a copy: backward only) feeds one dX GEMM and one dW GEMM.
    dy = torch.cat([_merged(dq), _merged(dk), _merged(dv)], dim=1)
    dx, _, _ = matmul(dy, w_qkv)
    dw, db = _weight_and_bias_grads(dy, x, w_qkv, has_bias)
    return dx, dw, db


def out_forward(attn: torch.Tensor, w_o: torch.Tensor, b_o: torch.Tensor | None,
                residual: torch.Tensor | None) -> torch.Tensor:
    """attn ``[B, H, L, D]`` → ``[B·L, E]``; the prologue gathers A[b·L + l, h·D + d] = attn[b, h, l, d], so the
    head merge costs no copy."""
    y, _, _ = matmul(HeadLayout(unit_last_stride(attn)), w_o.t(), bias=b_o, residual=residual)
    return y


def out_backward(dy: torch.Tensor, attn: torch.Tensor, w_o: torch.Tensor,
                 has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_attn ``[B, H, L, D]``, dw_o, db_o or an empty tensor)."""
    d_attn = attn.new_empty(attn.shape)
    matmul(dy, w_o, out=HeadLayout(d_attn))  # dAttn written straight back into [B, H, L, D]
    dw, db = _weight_and_bias_grads(dy, _merged(attn), w_o, has_bias)
    return d_attn, dw, db


# Runtime scalars and pointers that are neither the input dtype nor 32-bit ints (the rest of the AOT signature is
# derived from the kernels), and the arguments a usual call passes 16-aligned (torch allocations, their leading
# strides and sizes that are multiples of 16).
_AOT_TYPES = {"dbias_ptr": "*fp32", "dropout_p": "fp32", "seed_ptr": "*i64"}
_MATMUL_ALIGNED = ("a_ptr", "b_ptr", "b2_ptr", "c_ptr", "z_ptr", "z2_ptr", "bias_ptr", "bias2_ptr", "res_ptr",
                   "dbias_ptr", "stride_am", "stride_bn", "stride_cm", "stride_rm", "stride_a_b", "stride_a_h",
                   "stride_a_l", "stride_c_b", "stride_c_h", "stride_c_l", "k", "n", "c2_ptr", "c3_ptr", "stride_kv_b")


def aot_variants() -> list[AotVariant]:
    """Every GEMM tile for each dtype: "plain" (bias only) and "all" (gated, gelu, residual, dropout, stored
    pre-activations) compiled row-major; plus the head-merging and head-splitting forms with the plain tiles,
    and the activation-backward kernel."""
    out = []
    for dtype in SUPPORTED_DTYPES:
        dt = TRITON_DTYPE_NAMES[dtype]
        sig = aot_signature(matmul_kernel, {**_AOT_TYPES, "*_ptr": f"*{dt}"})
        no_dz = {"HAS_DBIAS": False, "SPLIT_QKV": False}
        forms = {
            "plain": {"ACT": 0, "HAS_BIAS": True, "HAS_RES": False, "DROPOUT": False, "STORE_Z": False, "GATED": False,
                      "MERGE_HEADS": False, "SPLIT_HEADS": False, "HEAD_DIM": 1},
            "all": {"ACT": ACTIVATIONS["gelu"], "HAS_BIAS": True, "HAS_RES": True, "DROPOUT": True, "STORE_Z": True,
                    "GATED": True, "MERGE_HEADS": False, "SPLIT_HEADS": False, "HEAD_DIM": 1},
            "merge_heads": {"ACT": 0, "HAS_BIAS": True, "HAS_RES": True, "DROPOUT": False, "STORE_Z": False,
                            "GATED": False, "MERGE_HEADS": True, "SPLIT_HEADS": False, "HEAD_DIM": 64},
            "split_heads": {"ACT": 0, "HAS_BIAS": True, "HAS_RES": False, "DROPOUT": False, "STORE_Z": False,
                            "GATED": False, "MERGE_HEADS": False, "SPLIT_HEADS": True, "HEAD_DIM": 64},
            "split_qkv": {"ACT": 0, "HAS_BIAS": True, "HAS_RES": False, "DROPOUT": False, "STORE_Z": False,
                          "GATED": False, "MERGE_HEADS": False, "SPLIT_HEADS": True, "HEAD_DIM": 64},
        }
        forms = {name: {**no_dz, **consts} for name, consts in forms.items()}
        forms["split_qkv"]["SPLIT_QKV"] = True
        # the dW GEMM (dZᵀ·X, summing dBias from its A rows); dX = dZ·W is the plain form
        forms["dW"] = {**forms["plain"], "HAS_BIAS": False, "HAS_DBIAS": True}
        for form, consts in forms.items():
            features = feature_class(consts["GATED"], consts["HAS_RES"], consts["DROPOUT"], consts["HAS_DBIAS"])
            for c in GEMM_CONFIGS[(features, max(dtype.itemsize, 2))]:
                out.append(AotVariant(
                    "matmul", matmul_kernel, sig,
                    {**consts, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k, "GROUP_M": GROUP_M,
                     "INTERPRETED": False}, c.num_warps,
                    f"{dt} {form} M={c.block_m} N={c.block_n} K={c.block_k} w={c.num_warps} s={c.num_stages}",
                    num_stages=c.num_stages, aligned=_MATMUL_ALIGNED,
                ))
        sig = aot_signature(dact_kernel, {**_AOT_TYPES, "*_ptr": f"*{dt}"})
        for act in ("gelu", "gelu_tanh"):
            out.append(AotVariant(
                "dact", dact_kernel, sig, {"ACT": ACTIVATIONS[act], "DROPOUT": True, "GATED": True,
                                           "BLOCK_M": DACT_BLOCK[0], "BLOCK_N": DACT_BLOCK[1], "INTERPRETED": False},
                4, f"{dt} {act} gated dropout",
                aligned=("dy_ptr", "z_ptr", "z2_ptr", "dz_ptr", "dz2_ptr", "stride_dym", "n")))
    return out
