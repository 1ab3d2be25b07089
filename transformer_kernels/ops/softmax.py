"""`masked_softmax`: the kernel backends as a torch.library custom op (fake impl, autograd); the torch backend is
eager.py's composition, differentiated by autograd."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends, eager
from ._checks import check_float_tensor, check_mask
from ._dispatch import call, custom_op, register_autograd

OP = "masked_softmax"
FAMILY = "softmax"


def _as_rows(t: Tensor, shape: torch.Size) -> Tensor:
    """A 4-D ``[d0, d1, d2, N]`` view of ``t`` (broadcast to ``shape``; stride 0 on broadcast dims, never
    expanded in memory) where d2 is the query dim (-2) the causal mask indexes."""
    t = t.expand(shape)
    if t.dim() == 1:
        return t.view(1, 1, 1, -1)
    while t.dim() < 4:
        t = t.unsqueeze(0)
    # More than two leading dims fold into d0: a view when the strides allow, a copy otherwise.
    return t.reshape(-1, *t.shape[-3:]) if t.dim() > 4 else t


def _kernel_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # Float masks of another precision are cast before broadcasting, so only the mask's own
    # (un-broadcast) elements are copied.
    if mask is None or mask.dtype in (torch.bool, dtype, torch.float32):
        return mask
    return mask.to(dtype)


@custom_op("transformer_kernels::masked_softmax")
def _masked_softmax(x: Tensor, mask: Tensor | None, scale: float, is_causal: bool, backend: str) -> Tensor:
    m = _kernel_mask(mask, x.dtype)
    x4 = _as_rows(x, x.shape)
    m4 = None if m is None else _as_rows(m, x.shape)
    with backends.on_device(x):
        return backends.launchers(FAMILY, backend).softmax_forward(x4, m4, scale, is_causal).view(x.shape)


@_masked_softmax.register_fake
def _(x: Tensor, mask: Tensor | None, scale: float, is_causal: bool, backend: str) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@custom_op("transformer_kernels::masked_softmax_backward")
def _masked_softmax_backward(grad: Tensor, y: Tensor, scale: float, backend: str) -> Tensor:
    g4 = _as_rows(grad, y.shape)
    y4 = _as_rows(y, y.shape)
    with backends.on_device(y):
        return backends.launchers(FAMILY, backend).softmax_backward(g4, y4, scale).view(y.shape)


@_masked_softmax_backward.register_fake
def _(grad: Tensor, y: Tensor, scale: float, backend: str) -> Tensor:
    return torch.empty(y.shape, dtype=y.dtype, device=y.device)


def _setup_context(ctx, inputs, output) -> None:
    _, _, scale, _, backend = inputs
    ctx.save_for_backward(output)
    ctx.scale = scale
    ctx.backend = backend


def _backward(ctx, grad: Tensor):
    (y,) = ctx.saved_tensors
    # The mask gets no gradient (it is a constant of the layer, as in torch.nn).
    return call(_masked_softmax_backward, grad, y, ctx.scale, ctx.backend), None, None, None, None


register_autograd(_masked_softmax, _backward, _setup_context)


def masked_softmax(
    x: Tensor,
    mask: Tensor | None = None,
    scale: float = 1.0,
    is_causal: bool = False,
    *,
    backend: str | None = None,
) -> Tensor:
    """Softmax over the last dim of ``scale * x`` with an optional mask.

    x: ``[..., N]`` fp32/fp16/bf16 (fp64 on the torch backend), any strides. mask: broadcastable to x,
    bool (True = keep) or float (added to the scaled scores), read through broadcast strides.
    is_causal: for ``x`` of shape ``[..., Lq, N]``, row i sees columns ``j <= i``. Rows with nothing
    visible give zeros (and zero gradients). backend: overrides the current backend for this call.
    Returns a contiguous tensor of x's shape and dtype.
    """
    check_float_tensor("x", x, allow_fp64=True)
    check_mask("mask", mask, x.shape, x.device)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dim")
    if is_causal and x.dim() < 2:
        raise ValueError(f"is_causal needs x with at least 2 dims [..., Lq, N], got shape {tuple(x.shape)}")
    name = backends.resolve_for(OP, FAMILY, x.device, backend, x)
    if name == "torch":
        return eager.masked_softmax(x, mask, float(scale), bool(is_causal))
    return call(_masked_softmax, x, mask, float(scale), bool(is_causal), name)
