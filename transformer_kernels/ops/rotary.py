"""`rotary`: rotary position embedding of q and k in one kernel launch, out of place (differentiable) or in place
(inference); the torch backend is eager.py's composition."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends, eager
from .._layout import unit_last_stride
from ._checks import check_float_tensor, describe
from ._dispatch import call, custom_op, register_autograd

OP = FAMILY = "rotary"


def _launch(q: Tensor, k: Tensor, q_out: Tensor, k_out: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None,
            interleaved: bool, backward: bool, backend: str) -> None:
    with backends.on_device(q):
        backends.launchers(FAMILY, backend).rotary(q, k, q_out, k_out, cos, sin, position_ids, interleaved, backward)


def _rotated(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None, interleaved: bool,
             backward: bool, backend: str) -> tuple[Tensor, Tensor]:
    # empty_like keeps a dense input's strides: a [B, L, H, D] buffer seen as [B, H, L, D] stays so.
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    _launch(q, k, q_out, k_out, cos, sin, position_ids, interleaved, backward, backend)
    return q_out, k_out


@custom_op("transformer_kernels::rotary")
def _rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None, interleaved: bool,
            backend: str) -> tuple[Tensor, Tensor]:
    return _rotated(q, k, cos, sin, position_ids, interleaved, False, backend)


@_rotary.register_fake
def _(q, k, cos, sin, position_ids, interleaved, backend):
    return torch.empty_like(q), torch.empty_like(k)


@custom_op("transformer_kernels::rotary_backward")
def _rotary_backward(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None,
                     interleaved: bool, backend: str) -> tuple[Tensor, Tensor]:
    return _rotated(dq, dk, cos, sin, position_ids, interleaved, True, backend)


@_rotary_backward.register_fake
def _(dq, dk, cos, sin, position_ids, interleaved, backend):
    return torch.empty_like(dq), torch.empty_like(dk)


@custom_op("transformer_kernels::rotary_", mutates_args=("q", "k"))
def _rotary_inplace(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None, interleaved: bool,
                    backend: str) -> None:
    _launch(q, k, q, k, cos, sin, position_ids, interleaved, False, backend)


def _setup_context(ctx, inputs, output) -> None:
    _, _, cos, sin, position_ids, interleaved, backend = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.args = (interleaved, backend)


def _backward(ctx, dq: Tensor, dk: Tensor):
    cos, sin, position_ids = ctx.saved_tensors
    interleaved, backend = ctx.args
    # An unused output's gradient arrives as zeros (only q's or only k's result used): rotating zeros is cheap.
    dq, dk = call(_rotary_backward, unit_last_stride(dq), unit_last_stride(dk), cos, sin, position_ids, interleaved,
                  backend)
    # cos and sin are constants of the model (buffers computed from inv_freq): no gradient, as in transformers.
    return dq, dk, None, None, None, None, None


register_autograd(_rotary, _backward, _setup_context, differentiable=(0, 1))


def _check(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None) -> None:
    for name, t in (("q", q), ("k", k)):
        check_float_tensor(name, t, allow_fp64=True)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, heads, L, D]; got {describe(t)}")
    b, _, seq, d = q.shape
    if k.shape[0] != b or k.shape[2:] != q.shape[2:] or k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"k must match q in batch, length, head dim, dtype and device; got q {describe(q)}, "
                         f"k {describe(k)}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_float_tensor(name, t, allow_fp64=True)
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape; got {describe(cos)} and {describe(sin)}")
    r = cos.shape[-1] if cos.dim() else 0
    if r == 0 or r % 2 or r > d:
        raise ValueError(f"cos/sin's last dim (the rotated dims) must be even and in [2, head dim {d}]; got "
                         f"{describe(cos)}")
    if position_ids is None:
        if not ((cos.dim() == 2 and cos.shape[0] == seq) or (cos.dim() == 3 and cos.shape[0] in (1, b)
                and cos.shape[1] == seq)):
            raise ValueError(f"cos/sin must be [L, R] or [B or 1, L, R] with L = {seq}, B = {b}; got {describe(cos)}")
        return
    if position_ids.dtype not in (torch.int32, torch.int64) or position_ids.device != q.device:
        raise TypeError(f"position_ids must be int32/int64 on {q.device}; got {describe(position_ids)}")
    if not ((position_ids.dim() == 1 and position_ids.shape[0] == seq) or (position_ids.dim() == 2 and
            position_ids.shape[0] in (1, b) and position_ids.shape[1] == seq)):
        raise ValueError(f"position_ids must be [L] or [B or 1, L] with L = {seq}, B = {b}; got {describe(position_ids)}")
    if cos.dim() != 2:
        raise ValueError(f"with position_ids, cos/sin must be a [positions, R] table; got {describe(cos)}")


def _per_token(t: Tensor, b: int, seq: int, dims: int) -> Tensor:
    """``t`` seen as ``[B, L(, R)]``: a missing or size-1 batch dim broadcast with stride 0 (nothing copied)."""
    if t.dim() == dims - 1:
        t = t.unsqueeze(0)
    return t.expand(b, seq, *t.shape[2:])


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None = None,
           interleaved: bool = False, inplace: bool = False, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Rotary position embedding of q ``[B, H, L, D]`` and k ``[B, Hk, L, D]`` (any strides; a ``[B, L, H, D]``
    tensor seen through ``.transpose(1, 2)`` is read in place), as transformers' ``apply_rotary_pos_emb``:
    ``x·cos + rotate(x)·sin`` over the first R dims, the other D − R passed through (partial rotary, as GPT-NeoX and
    Phi). ``rotate`` pairs dim i with i + R/2 (GPT-NeoX, Llama; ``interleaved=False``) or 2i with 2i + 1 (GPT-J).

    cos, sin ``[L, R]`` or ``[B or 1, L, R]`` (per token, as transformers' rotary embedding returns them), or with
    ``position_ids`` (``[L]`` or ``[B or 1, L]``, int) a ``[P, R]`` table read at those positions; a position outside
    ``[0, P)`` gives NaN (a kernel backend checks nothing on the host). Math in fp32. cos and sin get no gradient.
    ``inplace``: q and k are overwritten and returned (not differentiable). Returns (q_rotated, k_rotated)."""
    _check(q, k, cos, sin, position_ids)
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if inplace and training:
        raise ValueError("inplace=True rotary cannot be differentiated (q or k requires grad): use inplace=False")
    name = backends.resolve_for(OP, FAMILY, q.device, backend, q, training=training)
    b, seq = q.shape[0], q.shape[2]
    if position_ids is None:
        cos, sin = _per_token(cos, b, seq, 3), _per_token(sin, b, seq, 3)
    else:
        position_ids = _per_token(position_ids, b, seq, 2)
    if name == "torch":
        q_rot, k_rot = eager.rotary(q, k, cos, sin, position_ids, interleaved)
        return (q.copy_(q_rot), k.copy_(k_rot)) if inplace else (q_rot, k_rot)
    if cos.dtype == torch.float64:  # the kernels read fp32/fp16/bf16 tables
        cos, sin = cos.float(), sin.float()
    cos, sin = unit_last_stride(cos), unit_last_stride(sin)
    if cos.stride() != sin.stride() or cos.dtype != sin.dtype:
        cos, sin = cos.contiguous(), sin.to(cos.dtype).contiguous()
    if inplace and q.stride(-1) == 1 and k.stride(-1) == 1:
        call(_rotary_inplace, q, k, cos, sin, position_ids, bool(interleaved), name)
        return q, k
    q_rot, k_rot = call(_rotary, unit_last_stride(q), unit_last_stride(k), cos, sin, position_ids, bool(interleaved),
                        name)
    return (q.copy_(q_rot), k.copy_(k_rot)) if inplace else (q_rot, k_rot)
