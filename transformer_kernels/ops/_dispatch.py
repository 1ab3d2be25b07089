"""How an op call reaches its kernels: the `torch.library` custom op where torch needs one, a direct call elsewhere.

Every kernel op is a `torch.library.custom_op` with a fake impl and autograd (torch.compile, export, opcheck and
FakeTensor tracing see only that). In plain eager mode the same impl, setup_context and backward run without the
dispatcher: a direct call when nothing needs a gradient, else one `torch.autograd.Function` — about 20 µs less per
forward call and as much again per backward (the custom op's Python dispatch: schema checks, the autograd wrapper,
redispatches). "Plain eager" means: not compiling, no TorchDispatchMode or functorch transform active, and every
tensor argument a plain `torch.Tensor` or `nn.Parameter` (not a FakeTensor, FunctionalTensor, DTensor or other
subclass).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

_Backward = Callable[..., tuple]
_SetupContext = Callable[[Any, tuple, Any], None]

# custom op -> (its impl, its eager autograd.Function or None)
_EAGER: dict[Any, tuple[Callable, type[torch.autograd.Function] | None]] = {}


def custom_op(name: str, mutates_args: Sequence[str] = ()) -> Callable[[Callable], Any]:
    """``torch.library.custom_op(name, mutates_args=...)`` that also keeps the undecorated impl for `call`."""

    def wrap(fn: Callable) -> Any:
        op = torch.library.custom_op(name, mutates_args=tuple(mutates_args))(fn)
        _EAGER[op] = (fn, None)
        return op

    return wrap


def register_autograd(op: Any, backward: _Backward, setup_context: _SetupContext,
                      differentiable: Sequence[int] = (0,), none_ok: Sequence[int] = ()) -> None:
    """``op.register_autograd(backward, setup_context=setup_context)``, and the same two functions as the eager
    autograd.Function. ``differentiable``: the outputs that carry gradients (the rest, row statistics and the like,
    are marked non-differentiable and reach ``backward`` as None); of those, ``none_ok`` may reach it as None when
    unused (``backward`` handles that), the others get zeros then."""
    op.register_autograd(backward, setup_context=setup_context)
    impl = _EAGER[op][0]
    keep = tuple(differentiable)
    # A lone differentiable output always has its gradient when backward runs: zeros can be missing only among several.
    zero_fill = tuple(i for i in keep if i not in none_ok) if len(keep) > 1 else ()

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = impl(*args)
            setup_context(ctx, args, out)
            outs = out if isinstance(out, tuple) else (out,)
            ctx.mark_non_differentiable(*(o for i, o in enumerate(outs) if i not in keep))
            # No zeros materialised for the statistics' gradients; a differentiable output left unused gets its zeros
            # below (the backward functions expect a tensor there, as the custom op's autograd gives them).
            ctx.set_materialize_grads(False)
            if zero_fill:
                ctx.output_meta = {i: (outs[i].shape, outs[i].dtype, outs[i].device) for i in zero_fill}
            return out

        @staticmethod
        @once_differentiable  # the kernels' gradients have no gradient: double backward raises, as the custom op does
        def backward(ctx, *grads):
            if zero_fill:
                grads = tuple(torch.zeros(ctx.output_meta[i][0], dtype=ctx.output_meta[i][1],
                                          device=ctx.output_meta[i][2]) if g is None and i in zero_fill else g
                              for i, g in enumerate(grads))
            return backward(ctx, *grads)

    Function.__name__ = Function.__qualname__ = f"{impl.__name__.lstrip('_')}_eager"
    _EAGER[op] = (impl, Function)


# Weights are nn.Parameters: a subclass that changes nothing in dispatch.
_PLAIN = (Tensor, torch.nn.Parameter)


def _plain_eager(args: tuple) -> bool | None:
    """None where the custom op must run; else whether an argument requires grad (one pass over them: this runs on
    every op call)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or \
            torch._C._are_functorch_transforms_active():
        return None
    requires_grad = False
    for a in args:
        if isinstance(a, Tensor):
            if type(a) not in _PLAIN:
                return None
            requires_grad = requires_grad or a.requires_grad
    return requires_grad


def call(op: Any, *args: Any) -> Any:
    """``op(*args)``, without the dispatcher in plain eager mode (see the module docstring)."""
    requires_grad = _plain_eager(args)
    if requires_grad is None:
        return op(*args)
    impl, function = _EAGER[op]
    if function is not None and requires_grad and torch.is_grad_enabled():
        return function.apply(*args)
    return impl(*args)
