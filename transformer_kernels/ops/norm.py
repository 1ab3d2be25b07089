"""`layer_norm` and `rms_norm` with an optional fused residual add: custom ops (fake impl, autograd) on the kernel
backends; the torch backend is eager.py's composition."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends, eager
from .._layout import as_rows
from ._checks import autocast_dtype, cast_all, check_float_tensor, describe
from ._dispatch import call, custom_op, register_autograd

FAMILY = "norm"


@custom_op("transformer_kernels::norm")
def _norm(x: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor | None, eps: float, rms: bool,
          backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with backends.on_device(x):
        y, s, mean, rstd = backends.launchers(FAMILY, backend).norm_forward(x, residual, weight, bias, eps, rms)
    # Without a residual the sum is x itself; an op output may not alias an input, so return an empty one.
    return y, (s if residual is not None else x.new_empty(0)), mean, rstd


@_norm.register_fake
def _(x, residual, weight, bias, eps, rms, backend):
    rows = x.shape[0]
    return (x.new_empty(x.shape), x.new_empty(x.shape if residual is not None else (0,)),
            x.new_empty((0 if rms else rows,), dtype=torch.float32), x.new_empty((rows,), dtype=torch.float32))


@custom_op("transformer_kernels::norm_backward")
def _norm_backward(dy: Tensor, ds: Tensor | None, x: Tensor, residual: Tensor | None, weight: Tensor, mean: Tensor,
                   rstd: Tensor, has_bias: bool, rms: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    with backends.on_device(x):
        dx, dw, db = backends.launchers(FAMILY, backend).norm_backward(dy, x, residual, weight, mean, rstd, has_bias, rms)
    if ds is not None:
        dx = dx + ds  # the pre-norm sum also flows on down the residual stream
    return dx, dw, (db if db is not None else weight.new_empty(0))


@_norm_backward.register_fake
def _(dy, ds, x, residual, weight, mean, rstd, has_bias, rms, backend):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape if has_bias else (0,))


def _setup_context(ctx, inputs, output) -> None:
    x, residual, weight, bias, _eps, rms, backend = inputs
    _, _, mean, rstd = output
    # x and residual, not their rounded sum: backward re-adds them in fp32, exactly as the forward did.
    ctx.save_for_backward(x, residual, weight, mean, rstd)
    ctx.args = (residual is not None, bias is not None, rms, backend)


def _backward(ctx, dy: Tensor, ds: Tensor | None, _dmean: Tensor, _drstd: Tensor):
    x, residual, weight, mean, rstd = ctx.saved_tensors
    has_residual, has_bias, rms, backend = ctx.args
    dx, dw, db = call(_norm_backward, dy, ds if has_residual else None, x, residual, weight, mean, rstd, has_bias, rms,
                      backend)
    return dx, (dx if has_residual else None), dw, (db if has_bias else None), None, None, None


# The pre-norm sum's gradient is None when it was not used (`_backward` passes None on): no zeros to add.
register_autograd(_norm, _backward, _setup_context, differentiable=(0, 1), none_ok=(1,))


def _norm_call(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, residual: Tensor | None,
               return_residual: bool, rms: bool, backend: str | None) -> Tensor | tuple[Tensor, Tensor]:
    name_of_op = "rms_norm" if rms else "layer_norm"
    check_float_tensor("x", x, allow_fp64=True)
    # autocast runs norms in fp32, as torch's policy does for layer_norm
    x, weight, bias, residual = cast_all(autocast_dtype(x, fp32_op=True), x, weight, bias, residual)
    if x.dim() == 0:
        raise ValueError(f"x must have at least 1 dim; got {describe(x)}")
    n = x.shape[-1]
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_float_tensor(arg, t, allow_fp64=True)
            if t.shape != (n,):
                raise ValueError(f"{arg} must have shape [{n}] (x's last dim); got {describe(t)}")
            if t.device != x.device:
                raise ValueError(f"{arg} is on {t.device} but x is on {x.device}")
    if residual is not None:
        check_float_tensor("residual", residual, allow_fp64=True)
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual must match x ({describe(x)}); got {describe(residual)}")
    training = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad) or
                                            (bias is not None and bias.requires_grad) or
                                            (residual is not None and residual.requires_grad))
    name = backends.resolve_for(name_of_op, FAMILY, x.device, backend, x, training=training)
    if name == "torch":
        if rms:
            return eager.rms_norm(x, weight, eps, residual, return_residual)
        return eager.layer_norm(x, weight, bias, eps, residual, return_residual)
    dtype = x.dtype
    w = x.new_ones(n) if weight is None else weight if weight.dtype == dtype else weight.to(dtype)
    b = bias if bias is None or bias.dtype == dtype else bias.to(dtype)
    flat = x.dim() == 2  # already [rows, N]: no reshape in, no view out
    rows = x if flat else as_rows(x)
    res_rows = residual if residual is None or flat else as_rows(residual)
    y, s, _, _ = call(_norm, rows, res_rows, w, b, float(eps), rms, name)
    if not flat:
        y = y.view(x.shape)
    if not return_residual:
        return y
    return y, (x if residual is None else s if flat else s.view(x.shape))


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
               residual: Tensor | None = None, return_residual: bool = False, *,
               backend: str | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the last dim of ``x`` (``[..., N]``), after adding ``residual`` (same shape) when given, with
    fp32 statistics in one pass. ``weight``/``bias``: ``[N]``. With ``return_residual`` also returns the pre-norm
    sum ``x + residual`` (the residual stream of a pre-norm block). Returns tensors of x's shape and dtype."""
    return _norm_call(x, weight, bias, eps, residual, return_residual, False, backend)


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6, residual: Tensor | None = None,
             return_residual: bool = False, *, backend: str | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm over the last dim of ``x (+ residual)``: ``s / sqrt(mean(s²) + eps) · weight``; otherwise as
    `layer_norm`."""
    return _norm_call(x, weight, None, eps, residual, return_residual, True, backend)
