"""Projections and the feed-forward: `linear`, `gated_linear`, `qkv_projection`, `out_projection`, `feed_forward`.

Kernel backends run as torch.library custom ops (fake impl, autograd); the torch backend is the reference
composition, differentiated by autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends, reference
from . import linear_cuda
from ._checks import KERNEL_DTYPES, as_rows, autocast_dtype, cast_all, check_float_tensor, describe
from .attention import draw_seed, seed_value, torch_keep_mask
from .linear_cuda import col_sum


def _gemm():
    from ..kernels import linear as triton_linear

    return triton_linear


def _weight_and_bias_grads(dy: Tensor, x: Tensor, weight: Tensor, has_bias: bool, dz=None) -> tuple[Tensor, Tensor]:
    """dW = dZᵀ·X, with dBias summed from the same GEMM's A rows (an empty tensor without a bias). dZ is dY, or
    formed from it in the GEMM prologue when ``dz`` (a transposed DzPrologue) is given."""
    if x.shape[1] == 0:  # no dW GEMM to carry the sum (callers with a prologue handle this case themselves)
        return weight.new_zeros(weight.shape), (col_sum(dy, weight.dtype) if has_bias else weight.new_empty(0))
    db = torch.zeros(weight.shape[0] if has_bias else 0, dtype=torch.float32, device=dy.device)
    dw, _, _ = _gemm().matmul(dy.t(), x, out_dtype=weight.dtype, dz=dz, dbias=db if has_bias else None)
    return dw, db.to(weight.dtype)


# ---- linear ----------------------------------------------------------------------------------


@torch.library.custom_op("transformer_kernels::linear", mutates_args=())
def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, activation: str,
            dropout_p: float, seed: Tensor | None, backend: str) -> tuple[Tensor, Tensor]:
    if backend == "cuda":
        return linear_cuda.linear_forward(x, weight, bias, residual, activation, dropout_p, seed_value(seed))
    g = _gemm()
    act = activation or None
    y, z, _ = g.matmul(x, weight.t(), bias=bias, residual=residual, activation=act, dropout_p=dropout_p,
                       seed=seed_value(seed), store_z=act is not None)
    return y, (z if z is not None else x.new_empty(0))


@_linear.register_fake
def _(x, weight, bias, residual, activation, dropout_p, seed, backend):
    m, n = x.shape[0], weight.shape[0]
    return x.new_empty((m, n)), x.new_empty((m, n) if activation else (0,))


@torch.library.custom_op("transformer_kernels::linear_backward", mutates_args=())
def _linear_backward(dy: Tensor, x: Tensor, weight: Tensor, z: Tensor, has_bias: bool, activation: str,
                     dropout_p: float, seed: Tensor | None, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "cuda":
        return linear_cuda.linear_backward(dy, x, weight, z, has_bias, activation, dropout_p, seed_value(seed))
    g = _gemm()
    if x.shape[1] == 0:
        # No in-features: no dW GEMM to carry dBias, so dZ is formed on its own.
        dz = dy
        if activation or dropout_p > 0.0:
            dz, _ = g.activation_backward(dy, z if activation else dy.contiguous(), None, activation or None,
                                          dropout_p, seed_value(seed))
        return x.new_zeros(x.shape), weight.new_zeros(weight.shape), (
            col_sum(dz, weight.dtype) if has_bias else weight.new_empty(0))
    # dZ = dY·dropout·act'(Z) is formed tile by tile in each GEMM's prologue (never written to memory); the dW
    # GEMM, whose A is dZᵀ, also sums dBias.
    pro = None
    if activation or dropout_p > 0.0:
        pro = lambda transposed: g.DzPrologue(1, activation or None, z if activation else dy, None, transposed,
                                              dropout_p, seed_value(seed))
    dx, _, _ = g.matmul(dy, weight, dz=pro and pro(False))
    dw, db = _weight_and_bias_grads(dy, x, weight, has_bias, pro and pro(True))
    return dx, dw, db


@_linear_backward.register_fake
def _(dy, x, weight, z, has_bias, activation, dropout_p, seed, backend):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],) if has_bias else (0,))


def _linear_setup(ctx, inputs, output) -> None:
    x, weight, bias, residual, activation, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, weight, output[1], seed)
    ctx.args = (bias is not None, residual is not None, activation, dropout_p, backend)


def _linear_bwd(ctx, dy: Tensor, _dz: Tensor):
    x, weight, z, seed = ctx.saved_tensors
    has_bias, has_res, activation, dropout_p, backend = ctx.args
    dx, dw, db = _linear_backward(dy, x, weight, z, has_bias, activation, dropout_p, seed, backend)
    return dx, dw, (db if has_bias else None), (dy if has_res else None), None, None, None, None


_linear.register_autograd(_linear_bwd, setup_context=_linear_setup)


# ---- gated linear ----------------------------------------------------------------------------


@torch.library.custom_op("transformer_kernels::gated_linear", mutates_args=())
def _gated(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None, b_up: Tensor | None, activation: str,
           backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "cuda":
        return linear_cuda.gated_forward(x, w_gate, w_up, b_gate, b_up, activation)
    y, zg, zu = _gemm().matmul(x, w_gate.t(), b2=w_up.t(), bias=b_gate, bias2=b_up, activation=activation,
                               store_z=True)
    return y, zg, zu


@_gated.register_fake
def _(x, w_gate, w_up, b_gate, b_up, activation, backend):
    shape = (x.shape[0], w_gate.shape[0])
    return x.new_empty(shape), x.new_empty(shape), x.new_empty(shape)


@torch.library.custom_op("transformer_kernels::gated_linear_backward", mutates_args=())
def _gated_backward(dy: Tensor, x: Tensor, w_gate: Tensor, w_up: Tensor, zg: Tensor, zu: Tensor, has_bias: bool,
                    activation: str, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if backend == "cuda":
        return linear_cuda.gated_backward(dy, x, w_gate, w_up, zg, zu, has_bias, activation)
    g = _gemm()
    if x.shape[1] == 0:
        dzg, dzu = g.activation_backward(dy, zg, zu, activation, 0.0, 0)
        empty = w_gate.new_empty(0)
        return (x.new_zeros(x.shape), w_gate.new_zeros(w_gate.shape), w_up.new_zeros(w_up.shape),
                col_sum(dzg, w_gate.dtype) if has_bias else empty, col_sum(dzu, w_up.dtype) if has_bias else empty.clone())
    # dZg = dY·Zu·act'(Zg) and dZu = dY·act(Zg) are formed in the GEMM prologues from the saved pre-activations.
    gate = lambda t: g.DzPrologue(2, activation, zg, zu, t)
    up = lambda t: g.DzPrologue(3, activation, zg, None, t)
    dx_gate, _, _ = g.matmul(dy, w_gate, dz=gate(False))
    dx, _, _ = g.matmul(dy, w_up, residual=dx_gate, dz=up(False))  # dX = dZg·Wg + dZu·Wu, summed in the epilogue
    dwg, dbg = _weight_and_bias_grads(dy, x, w_gate, has_bias, gate(True))
    dwu, dbu = _weight_and_bias_grads(dy, x, w_up, has_bias, up(True))
    return dx, dwg, dwu, dbg, dbu


@_gated_backward.register_fake
def _(dy, x, w_gate, w_up, zg, zu, has_bias, activation, backend):
    n = w_gate.shape[0]
    return (x.new_empty(x.shape), w_gate.new_empty(w_gate.shape), w_up.new_empty(w_up.shape),
            w_gate.new_empty((n,) if has_bias else (0,)), w_up.new_empty((n,) if has_bias else (0,)))


def _gated_setup(ctx, inputs, output) -> None:
    x, w_gate, w_up, b_gate, b_up, activation, backend = inputs
    ctx.save_for_backward(x, w_gate, w_up, output[1], output[2])
    ctx.args = (b_gate is not None, b_up is not None, activation, backend)


def _gated_bwd(ctx, dy: Tensor, _dzg: Tensor, _dzu: Tensor):
    x, w_gate, w_up, zg, zu = ctx.saved_tensors
    has_bg, has_bu, activation, backend = ctx.args
    dx, dwg, dwu, dbg, dbu = _gated_backward(dy, x, w_gate, w_up, zg, zu, has_bg or has_bu, activation, backend)
    return dx, dwg, dwu, (dbg if has_bg else None), (dbu if has_bu else None), None, None


_gated.register_autograd(_gated_bwd, setup_context=_gated_setup)


# ---- projections with head layouts -----------------------------------------------------------


@torch.library.custom_op("transformer_kernels::qkv_projection", mutates_args=())
def _qkv(x: Tensor, w_qkv: Tensor, b_qkv: Tensor | None, batch: int, num_heads: int, num_kv_heads: int,
         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "cuda":
        return linear_cuda.qkv_forward(x, w_qkv, b_qkv, batch, num_heads, num_kv_heads)
    g = _gemm()
    length = x.shape[0] // batch if batch else 0
    d = w_qkv.shape[0] // (num_heads + 2 * num_kv_heads)
    outs = []
    start = 0
    for heads in (num_heads, num_kv_heads, num_kv_heads):
        out = x.new_empty((batch, heads, length, d))
        rows = slice(start, start + heads * d)
        # The epilogue writes [B·L, heads·D] straight into [B, heads, L, D]: no transpose copy afterwards.
        g.matmul(x, w_qkv[rows].t(), bias=None if b_qkv is None else b_qkv[rows], out=g.HeadLayout(out))
        outs.append(out)
        start += heads * d
    return outs[0], outs[1], outs[2]


@_qkv.register_fake
def _(x, w_qkv, b_qkv, batch, num_heads, num_kv_heads, backend):
    length = x.shape[0] // batch if batch else 0
    d = w_qkv.shape[0] // (num_heads + 2 * num_kv_heads)
    return (x.new_empty((batch, num_heads, length, d)), x.new_empty((batch, num_kv_heads, length, d)),
            x.new_empty((batch, num_kv_heads, length, d)))


def _merge(t: Tensor) -> Tensor:
    b, h, length, d = t.shape
    return t.transpose(1, 2).reshape(b * length, h * d)


@torch.library.custom_op("transformer_kernels::qkv_projection_backward", mutates_args=())
def _qkv_backward(dq: Tensor, dk: Tensor, dv: Tensor, x: Tensor, w_qkv: Tensor, has_bias: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "cuda":
        return linear_cuda.qkv_backward(dq, dk, dv, x, w_qkv, has_bias)
    g = _gemm()
    # One [B·L, (H + 2·Hkv)·D] gradient (a copy: backward only) feeds one dX GEMM and one dW GEMM.
    dy = torch.cat([_merge(dq), _merge(dk), _merge(dv)], dim=1)
    dx, _, _ = g.matmul(dy, w_qkv)
    dw, db = _weight_and_bias_grads(dy, x, w_qkv, has_bias)
    return dx, dw, db


@_qkv_backward.register_fake
def _(dq, dk, dv, x, w_qkv, has_bias, backend):
    return x.new_empty(x.shape), w_qkv.new_empty(w_qkv.shape), w_qkv.new_empty((w_qkv.shape[0],) if has_bias else (0,))


def _qkv_setup(ctx, inputs, output) -> None:
    x, w_qkv, b_qkv, *_, backend = inputs
    ctx.save_for_backward(x, w_qkv)
    ctx.args = (b_qkv is not None, backend)


def _qkv_bwd(ctx, dq: Tensor, dk: Tensor, dv: Tensor):
    x, w_qkv = ctx.saved_tensors
    has_bias, backend = ctx.args
    dx, dw, db = _qkv_backward(dq.contiguous(), dk.contiguous(), dv.contiguous(), x, w_qkv, has_bias, backend)
    return dx, dw, (db if has_bias else None), None, None, None, None


_qkv.register_autograd(_qkv_bwd, setup_context=_qkv_setup)


@torch.library.custom_op("transformer_kernels::out_projection", mutates_args=())
def _out_proj(attn: Tensor, w_o: Tensor, b_o: Tensor | None, residual: Tensor | None, backend: str) -> Tensor:
    if backend == "cuda":
        return linear_cuda.out_forward(attn, w_o, b_o, residual)
    g = _gemm()
    attn = attn if attn.stride(-1) == 1 else attn.contiguous()
    # The prologue gathers A[b·L + l, h·D + d] = attn[b, h, l, d]: the head merge costs no copy.
    y, _, _ = g.matmul(g.HeadLayout(attn), w_o.t(), bias=b_o, residual=residual)
    return y


@_out_proj.register_fake
def _(attn, w_o, b_o, residual, backend):
    return attn.new_empty((attn.shape[0] * attn.shape[2], w_o.shape[0]))


@torch.library.custom_op("transformer_kernels::out_projection_backward", mutates_args=())
def _out_proj_backward(dy: Tensor, attn: Tensor, w_o: Tensor, has_bias: bool, backend: str,
                       ) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "cuda":
        return linear_cuda.out_backward(dy, attn, w_o, has_bias)
    g = _gemm()
    d_attn = attn.new_empty(attn.shape)
    g.matmul(dy, w_o, out=g.HeadLayout(d_attn))  # dAttn written straight back into [B, H, L, D]
    dw, db = _weight_and_bias_grads(dy, _merge(attn), w_o, has_bias)
    return d_attn, dw, db


@_out_proj_backward.register_fake
def _(dy, attn, w_o, has_bias, backend):
    return attn.new_empty(attn.shape), w_o.new_empty(w_o.shape), w_o.new_empty((w_o.shape[0],) if has_bias else (0,))


def _out_setup(ctx, inputs, output) -> None:
    attn, w_o, b_o, residual, backend = inputs
    ctx.save_for_backward(attn, w_o)
    ctx.args = (b_o is not None, residual is not None, backend)


def _out_bwd(ctx, dy: Tensor):
    attn, w_o = ctx.saved_tensors
    has_bias, has_res, backend = ctx.args
    d_attn, dw, db = _out_proj_backward(dy, attn, w_o, has_bias, backend)
    return d_attn, dw, (db if has_bias else None), (dy if has_res else None), None


_out_proj.register_autograd(_out_bwd, setup_context=_out_setup)


# ---- public functions ------------------------------------------------------------------------


def _check_weight(name: str, w: Tensor | None, shape: tuple[int, ...], x: Tensor) -> None:
    if w is None:
        return
    check_float_tensor(name, w, allow_fp64=True)
    if tuple(w.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}; got {describe(w)}")
    if w.dtype != x.dtype:
        raise TypeError(f"{name} dtype {w.dtype} must equal the input dtype {x.dtype}")
    if w.device != x.device:
        raise ValueError(f"{name} is on {w.device} but the input is on {x.device}")


def _kernel_why_not(x: Tensor):
    def why_not(backend: str) -> str | None:
        return None if x.dtype in KERNEL_DTYPES else f"dtype {x.dtype} (supported: {KERNEL_DTYPES})"
    return why_not


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
           residual: Tensor | None = None, dropout_p: float = 0.0, *, backend: str | None = None) -> Tensor:
    """``act(x @ weight.T + bias)``, then dropout, then ``+ residual``, in one kernel.

    x ``[..., K]``, weight ``[N, K]``, bias ``[N]``, residual ``[..., N]``; activation None, "relu", "gelu",
    "gelu_tanh" or "silu". Dropout draws its seed from torch's generator; backward regenerates the same mask.
    Returns ``[..., N]`` in x's dtype.
    """
    check_float_tensor("x", x, allow_fp64=True)
    ac = autocast_dtype(x)
    if ac is not None and residual is not None and residual.dtype != ac:
        # Under autocast torch adds a wider residual after the matmul and the sum promotes: keep that dtype.
        return linear(x, weight, bias, activation, None, dropout_p, backend=backend) + residual
    x, weight, bias = cast_all(ac, x, weight, bias)
    if x.dim() == 0:
        raise ValueError(f"x must have at least 1 dim; got {describe(x)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K]; got {describe(weight)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dim {x.shape[-1]} must equal weight's in-features {k}; "
                         f"x {describe(x)}, weight {describe(weight)}")
    _check_weight("weight", weight, (n, k), x)
    _check_weight("bias", bias, (n,), x)
    _check_weight("residual", residual, (*x.shape[:-1], n), x)
    if activation not in reference.ACTIVATIONS and activation is not None:
        raise ValueError(f"activation must be None or one of {reference.ACTIVATIONS}; got {activation!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")
    name = backends.resolve("linear", x.device, backend, _kernel_why_not(x))
    seed = draw_seed() if dropout_p > 0.0 else None
    if name == "torch":
        keep = None if seed is None else torch_keep_mask(seed, (*x.shape[:-1], n), dropout_p, x.device)
        return reference.linear(x, weight, bias, activation, residual, dropout_p, keep)
    y, _ = torch.ops.transformer_kernels.linear(
        as_rows(x), weight, bias, None if residual is None else as_rows(residual), activation or "", float(dropout_p),
        seed, name)
    return y.view(*x.shape[:-1], n)


def gated_linear(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None = None, b_up: Tensor | None = None,
                 activation: str = "silu", *, backend: str | None = None) -> Tensor:
    """``act(x W_gateᵀ + b_gate) · (x W_upᵀ + b_up)`` in one kernel (swiglu with "silu", geglu with "gelu").
    x ``[..., K]``, w_gate/w_up ``[N, K]`` → ``[..., N]``."""
    check_float_tensor("x", x, allow_fp64=True)
    x, w_gate, w_up, b_gate, b_up = cast_all(autocast_dtype(x), x, w_gate, w_up, b_gate, b_up)
    if w_gate.dim() != 2:
        raise ValueError(f"w_gate must be 2-D [N, K]; got {describe(w_gate)}")
    n, k = w_gate.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dim {x.shape[-1]} must equal w_gate's in-features {k}")
    for arg, t, shape in (("w_gate", w_gate, (n, k)), ("w_up", w_up, (n, k)), ("b_gate", b_gate, (n,)), ("b_up", b_up, (n,))):
        _check_weight(arg, t, shape, x)
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {reference.ACTIVATIONS}; got {activation!r}")
    name = backends.resolve("gated_linear", x.device, backend, _kernel_why_not(x))
    if name == "torch":
        return reference.gated_linear(x, w_gate, w_up, b_gate, b_up, activation)
    y, _, _ = torch.ops.transformer_kernels.gated_linear(as_rows(x), w_gate, w_up, b_gate, b_up, activation, name)
    return y.view(*x.shape[:-1], n)


def qkv_projection(x: Tensor, w_qkv: Tensor, b_qkv: Tensor | None, num_heads: int, num_kv_heads: int | None = None,
                   *, backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """x ``[B, L, E]``, w_qkv ``[(H + 2·Hkv)·D, E]`` (rows: q heads, k heads, v heads) → q ``[B, H, L, D]``,
    k and v ``[B, Hkv, L, D]``, written in that layout by the GEMM epilogue."""
    check_float_tensor("x", x, allow_fp64=True)
    x, w_qkv, b_qkv = cast_all(autocast_dtype(x), x, w_qkv, b_qkv)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, L, E]; got {describe(x)}")
    hkv = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads <= 0 or hkv <= 0 or num_heads % hkv:
        raise ValueError(f"num_heads {num_heads} must be a positive multiple of num_kv_heads {hkv}")
    rows, e = w_qkv.shape if w_qkv.dim() == 2 else (0, -1)
    if e != x.shape[-1] or rows % (num_heads + 2 * hkv) or rows == 0:
        raise ValueError(f"w_qkv must be [(H + 2·Hkv)·D, E] = [({num_heads} + 2·{hkv})·D, {x.shape[-1]}]; got {describe(w_qkv)}")
    _check_weight("w_qkv", w_qkv, (rows, e), x)
    _check_weight("b_qkv", b_qkv, (rows,), x)
    name = backends.resolve("qkv_projection", x.device, backend, _kernel_why_not(x))
    if name == "torch":
        return reference.qkv_projection(x, w_qkv, b_qkv, num_heads, hkv)
    return torch.ops.transformer_kernels.qkv_projection(as_rows(x), w_qkv, b_qkv, x.shape[0], num_heads, hkv, name)


def out_projection(attn: Tensor, w_o: Tensor, b_o: Tensor | None = None, residual: Tensor | None = None, *,
                   backend: str | None = None) -> Tensor:
    """attn ``[B, H, L, D]`` (head merge in the GEMM prologue) ``@ w_oᵀ + b_o (+ residual)`` → ``[B, L, E]``."""
    check_float_tensor("attn", attn, allow_fp64=True)
    ac = autocast_dtype(attn)
    if ac is not None and residual is not None and residual.dtype != ac:
        return out_projection(attn, w_o, b_o, None, backend=backend) + residual  # keeps torch's promotion
    attn, w_o, b_o = cast_all(ac, attn, w_o, b_o)
    if attn.dim() != 4:
        raise ValueError(f"attn must be [B, H, L, D]; got {describe(attn)}")
    b, h, length, d = attn.shape
    if w_o.dim() != 2 or w_o.shape[1] != h * d:
        raise ValueError(f"w_o must be [E, H·D] = [E, {h * d}]; got {describe(w_o)}")
    e = w_o.shape[0]
    _check_weight("w_o", w_o, (e, h * d), attn)
    _check_weight("b_o", b_o, (e,), attn)
    _check_weight("residual", residual, (b, length, e), attn)
    name = backends.resolve("out_projection", attn.device, backend, _kernel_why_not(attn))
    if name == "torch":
        return reference.out_projection(attn, w_o, b_o, residual)
    y = torch.ops.transformer_kernels.out_projection(attn, w_o, b_o, None if residual is None else as_rows(residual), name)
    return y.view(b, length, e)


def feed_forward(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, activation: str = "gelu",
                 dropout_p: float = 0.0, residual: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """``linear2(dropout(act(linear1(x)))) (+ residual)``: two fused GEMMs (bias + activation + dropout in the
    first epilogue, bias + residual in the second). x ``[..., E]``, w1 ``[F, E]``, w2 ``[E, F]``."""
    h = linear(x, w1, b1, activation, dropout_p=dropout_p, backend=backend)
    return linear(h, w2, b2, residual=residual, backend=backend)
