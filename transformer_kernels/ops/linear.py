"""Projections and the feed-forward: `linear`, `gated_linear`, `qkv_projection`, `out_projection`, `feed_forward`.

Kernel backends run as torch.library custom ops (fake impl, autograd) whose bodies call the family's launchers
(kernels/linear.py, cuda/linear.py); the torch backend is eager.py's composition, differentiated by autograd.
"""

from __future__ import annotations

from torch import Tensor

from .. import backends, eager
from .._layout import as_rows
from ._checks import ACTIVATIONS, autocast_dtype, cast_all, check_float_tensor, check_seed, describe
from ._dispatch import call, custom_op, register_autograd
from .attention import draw_seed

FAMILY = "linear"


# ---- linear ----------------------------------------------------------------------------------


@custom_op("transformer_kernels::linear")
def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, activation: str,
            dropout_p: float, seed: Tensor | None, backend: str) -> tuple[Tensor, Tensor]:
    check_seed(seed, x.device)
    with backends.on_device(x):
        return backends.launchers(FAMILY, backend).linear_forward(x, weight, bias, residual, activation, dropout_p, seed)


@_linear.register_fake
def _(x, weight, bias, residual, activation, dropout_p, seed, backend):
    m, n = x.shape[0], weight.shape[0]
    return x.new_empty((m, n)), x.new_empty((m, n) if activation else (0,))


@custom_op("transformer_kernels::linear_backward")
def _linear_backward(dy: Tensor, x: Tensor, weight: Tensor, z: Tensor, has_bias: bool, activation: str,
                     dropout_p: float, seed: Tensor | None, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    check_seed(seed, x.device)
    with backends.on_device(x):
        return backends.launchers(FAMILY, backend).linear_backward(dy, x, weight, z, has_bias, activation, dropout_p, seed)


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
    dx, dw, db = call(_linear_backward, dy, x, weight, z, has_bias, activation, dropout_p, seed, backend)
    return dx, dw, (db if has_bias else None), (dy if has_res else None), None, None, None, None


register_autograd(_linear, _linear_bwd, _linear_setup)


# ---- gated linear ----------------------------------------------------------------------------


@custom_op("transformer_kernels::gated_linear")
def _gated(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None, b_up: Tensor | None, activation: str,
           backend: str) -> tuple[Tensor, Tensor, Tensor]:
    with backends.on_device(x):
        return backends.launchers(FAMILY, backend).gated_forward(x, w_gate, w_up, b_gate, b_up, activation)


@_gated.register_fake
def _(x, w_gate, w_up, b_gate, b_up, activation, backend):
    shape = (x.shape[0], w_gate.shape[0])
    return x.new_empty(shape), x.new_empty(shape), x.new_empty(shape)


@custom_op("transformer_kernels::gated_linear_backward")
def _gated_backward(dy: Tensor, x: Tensor, w_gate: Tensor, w_up: Tensor, zg: Tensor, zu: Tensor, has_bias: bool,
                    activation: str, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with backends.on_device(x):
        return backends.launchers(FAMILY, backend).gated_backward(dy, x, w_gate, w_up, zg, zu, has_bias, activation)


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
    dx, dwg, dwu, dbg, dbu = call(_gated_backward, dy, x, w_gate, w_up, zg, zu, has_bg or has_bu, activation, backend)
    return dx, dwg, dwu, (dbg if has_bg else None), (dbu if has_bu else None), None, None


register_autograd(_gated, _gated_bwd, _gated_setup)


# ---- projections with head layouts -----------------------------------------------------------


@custom_op("transformer_kernels::qkv_projection")
def _qkv(x: Tensor, w_qkv: Tensor, b_qkv: Tensor | None, batch: int, num_heads: int, num_kv_heads: int,
         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    with backends.on_device(x):
        return backends.launchers(FAMILY, backend).qkv_forward(x, w_qkv, b_qkv, batch, num_heads, num_kv_heads)


@_qkv.register_fake
def _(x, w_qkv, b_qkv, batch, num_heads, num_kv_heads, backend):
    length = x.shape[0] // batch if batch else 0
    d = w_qkv.shape[0] // (num_heads + 2 * num_kv_heads)
    return (x.new_empty((batch, num_heads, length, d)), x.new_empty((batch, num_kv_heads, length, d)),
            x.new_empty((batch, num_kv_heads, length, d)))


@custom_op("transformer_kernels::qkv_projection_backward")
def _qkv_backward(dq: Tensor, dk: Tensor, dv: Tensor, x: Tensor, w_qkv: Tensor, has_bias: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor]:
    with backends.on_device(x):
        return backends.launchers(FAMILY, backend).qkv_backward(dq, dk, dv, x, w_qkv, has_bias)


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
    dx, dw, db = call(_qkv_backward, dq.contiguous(), dk.contiguous(), dv.contiguous(), x, w_qkv, has_bias, backend)
    return dx, dw, (db if has_bias else None), None, None, None, None


register_autograd(_qkv, _qkv_bwd, _qkv_setup, differentiable=(0, 1, 2))


@custom_op("transformer_kernels::out_projection")
def _out_proj(attn: Tensor, w_o: Tensor, b_o: Tensor | None, residual: Tensor | None, backend: str) -> Tensor:
    with backends.on_device(attn):
        return backends.launchers(FAMILY, backend).out_forward(attn, w_o, b_o, residual)


@_out_proj.register_fake
def _(attn, w_o, b_o, residual, backend):
    return attn.new_empty((attn.shape[0] * attn.shape[2], w_o.shape[0]))


@custom_op("transformer_kernels::out_projection_backward")
def _out_proj_backward(dy: Tensor, attn: Tensor, w_o: Tensor, has_bias: bool, backend: str,
                       ) -> tuple[Tensor, Tensor, Tensor]:
    with backends.on_device(attn):
        return backends.launchers(FAMILY, backend).out_backward(dy, attn, w_o, has_bias)


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
    d_attn, dw, db = call(_out_proj_backward, dy, attn, w_o, has_bias, backend)
    return d_attn, dw, (db if has_bias else None), (dy if has_res else None), None


register_autograd(_out_proj, _out_bwd, _out_setup)


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


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
           residual: Tensor | None = None, dropout_p: float = 0.0, *, backend: str | None = None) -> Tensor:
    """``act(x @ weight.T + bias)``, then dropout, then ``+ residual``, in one kernel.

    x ``[..., K]``, weight ``[N, K]``, bias ``[N]``, residual ``[..., N]``; activation None, "relu", "gelu",
    "gelu_tanh" or "silu". Dropout draws its seed on x's device from torch's generator (no host sync, CUDA-graph
    safe, as in `attention`); backward regenerates the same mask.
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
    if activation not in ACTIVATIONS and activation is not None:
        raise ValueError(f"activation must be None or one of {ACTIVATIONS}; got {activation!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")
    name = backends.resolve_for("linear", FAMILY, x.device, backend, x)
    if name == "torch":
        return eager.linear(x, weight, bias, activation, residual, dropout_p)
    seed = draw_seed(x.device) if dropout_p > 0.0 else None
    y, _ = call(_linear, as_rows(x), weight, bias, None if residual is None else as_rows(residual), activation or "",
                float(dropout_p), seed, name)
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
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")
    name = backends.resolve_for("gated_linear", FAMILY, x.device, backend, x)
    if name == "torch":
        return eager.gated_linear(x, w_gate, w_up, b_gate, b_up, activation)
    y, _, _ = call(_gated, as_rows(x), w_gate, w_up, b_gate, b_up, activation, name)
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
    name = backends.resolve_for("qkv_projection", FAMILY, x.device, backend, x)
    if name == "torch":
        return eager.qkv_projection(x, w_qkv, b_qkv, num_heads, hkv)
    return call(_qkv, as_rows(x), w_qkv, b_qkv, x.shape[0], num_heads, hkv, name)


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
    name = backends.resolve_for("out_projection", FAMILY, attn.device, backend, attn)
    if name == "torch":
        return eager.out_projection(attn, w_o, b_o, residual)
    y = call(_out_proj, attn, w_o, b_o, None if residual is None else as_rows(residual), name)
    return y.view(b, length, e)


def feed_forward(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None, activation: str = "gelu",
                 dropout_p: float = 0.0, residual: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """``linear2(dropout(act(linear1(x)))) (+ residual)``: two fused GEMMs (bias + activation + dropout in the
    first epilogue, bias + residual in the second). x ``[..., E]``, w1 ``[F, E]``, w2 ``[E, F]``."""
    h = linear(x, w1, b1, activation, dropout_p=dropout_p, backend=backend)
    return linear(h, w2, b2, residual=residual, backend=backend)
