"""`linear_cross_entropy`: the language-model head's projection and its cross-entropy loss without the logits.

The kernel backends walk the tokens in chunks: a chunk's logits ``[C, V]`` come from one GEMM (cuBLAS through torch),
the cross-entropy kernel overwrites them with the loss's gradient, and two more GEMMs turn that into the chunk's dx
rows and its share of dW — so the peak extra memory is one chunk of logits (about the size of x) plus an fp32 dW
accumulator, never ``[tokens, V]``. With a "mean" or "sum" reduction the gradients are formed in the forward pass (the
grad_output of a scalar loss only scales them: three GEMMs in all, as the unfused pair does); with "none" the
backward recomputes the logits with each row's grad_output as its scale. The torch backend is eager.py's unfused
composition.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import backends, eager
from .._layout import as_rows
from ._checks import autocast_dtype, cast_all, check_float_tensor, describe
from ._dispatch import call, custom_op, register_autograd

OP = "linear_cross_entropy"
FAMILY = "cross_entropy"
REDUCTIONS = ("mean", "sum", "none")


# Logits a chunk holds at least (2 MiB in bf16): below this a chunk's memory is nothing and each further chunk only
# costs its ~6 host-side ops (a 32-token, 100-class loss ran 4 chunks at 11x the unfused pair's host time).
MIN_CHUNK_LOGITS = 1 << 20


def chunk_rows(rows: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk: a power of two with about as many logits as x has elements (rows · hidden), as
    Liger-Kernel sizes its chunks — large enough for full-size GEMMs, small next to ``[rows, vocab]`` — and at least
    MIN_CHUNK_LOGITS logits."""
    chunks = math.ceil(vocab / max(hidden, 1))
    per_chunk = max(math.ceil(rows / chunks), math.ceil(MIN_CHUNK_LOGITS / vocab))
    return max(1, 1 << (per_chunk - 1).bit_length())


def _empty(t: Tensor) -> Tensor:
    return t.new_empty(0)


@custom_op("transformer_kernels::linear_cross_entropy")
def _linear_cross_entropy(x: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, row_scale: Tensor | None,
                          ignore_index: int, label_smoothing: float, softcap: float | None, z_loss: float,
                          reduction: str, need_dx: bool, need_dw: bool, need_db: bool, fp32_dweight: bool,
                          backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x ``[N, H]``, weight ``[V, H]``, bias ``[V]``, target int64 ``[N]``. Returns (loss, dx, dweight, dbias): the
    loss reduced as asked, in x's dtype; each gradient asked for (else empty) scaled by ``row_scale`` (fp32 ``[N]``)
    when given, else by the reduction's 1/count or 1."""
    n = x.shape[0]
    launch = backends.launchers(FAMILY, backend).cross_entropy_rows
    loss_rows = torch.empty(n, dtype=torch.float32, device=x.device)
    lse = torch.empty_like(loss_rows)
    count = (target != ignore_index).sum() if reduction == "mean" else None
    grads = need_dx or need_dw or need_db
    scale = None
    if grads:
        # A device tensor, never a host float: the count is not read back (no synchronisation). 1/0 = inf when every
        # target is ignored; the kernel selects 0 for ignored rows instead of multiplying.
        scale = row_scale if row_scale is not None else \
            (1.0 / count.float()).reshape(1) if count is not None else loss_rows.new_ones(1)
    low_precision = x.dtype != torch.float32
    dx = torch.empty_like(x) if need_dx else _empty(x)
    # dW sums every chunk's product. fp32_dweight: in an fp32 buffer (each product rounded once, the sum not: as
    # accurate as the unfused pair's one GEMM), 4 bytes per weight more than the gradient itself; else in place in
    # the weight's dtype (cuBLAS adds each product with beta = 1: one rounding of the running sum per chunk, what
    # Liger-Kernel does by default).
    acc_fp32 = low_precision and fp32_dweight
    dw_acc = torch.zeros(weight.shape, dtype=torch.float32 if acc_fp32 else weight.dtype, device=x.device) \
        if need_dw else None
    db_acc = torch.zeros(weight.shape[0], dtype=torch.float32, device=x.device) if need_db else None
    vocab, hidden = weight.shape
    chunk = chunk_rows(n, vocab, hidden)
    slab = max(1, math.ceil(min(chunk, n) * vocab / max(hidden, 1)))  # dW rows whose product has a chunk's size
    w_t = weight.t()
    whole = chunk >= n  # one chunk: the tensors themselves, no slicing (four ops less on the host)
    with backends.on_device(x):
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            xc, tc, loss_c, lse_c = (x, target, loss_rows, lse) if whole else (x[rows], target[rows], loss_rows[rows],
                                                                                lse[rows])
            logits = torch.mm(xc, w_t) if bias is None else torch.addmm(bias, xc, w_t)
            scale_c = scale if scale is None or scale.numel() == 1 or whole else scale[rows]
            launch(logits, tc, scale_c, loss_c, lse_c, ignore_index, label_smoothing, softcap, z_loss)
            if not grads:
                continue
            if need_dx:
                torch.mm(logits, weight, out=dx if whole else dx[rows])
            if dw_acc is not None:
                if acc_fp32:
                    # In slabs of vocabulary rows: the low-precision product and its fp32 conversion inside add_ are
                    # then slab-sized (about the chunk of logits) instead of weight-sized (6 bytes per weight).
                    for v0 in range(0, vocab, slab):
                        dw_acc[v0:v0 + slab].add_(torch.mm(logits[:, v0:v0 + slab].t(), xc))
                else:
                    dw_acc.addmm_(logits.t(), xc)
            if db_acc is not None:
                db_acc.add_(logits.sum(0, dtype=torch.float32))
    if reduction == "none":
        loss = loss_rows.to(x.dtype)
    else:
        total = loss_rows.sum()
        loss = (total / count if count is not None else total).to(x.dtype)
    dw = _empty(x) if dw_acc is None else dw_acc.to(weight.dtype)
    db = _empty(x) if db_acc is None else db_acc.to(weight.dtype)
    return loss, dx, dw, db


@_linear_cross_entropy.register_fake
def _(x, weight, bias, target, row_scale, ignore_index, label_smoothing, softcap, z_loss, reduction, need_dx, need_dw,
      need_db, fp32_dweight, backend):
    loss = x.new_empty((x.shape[0],) if reduction == "none" else ())
    return (loss, x.new_empty(x.shape if need_dx else (0,)), x.new_empty(weight.shape if need_dw else (0,)),
            x.new_empty(weight.shape[:1] if need_db else (0,)))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, target, _, ignore_index, label_smoothing, softcap, z_loss, reduction, need_dx, need_dw, need_db, \
        fp32_dweight, backend = inputs
    _, dx, dw, db = output
    ctx.reduction = reduction
    if reduction == "none":
        # Nothing was formed in the forward pass: the backward recomputes with each row's grad_output.
        ctx.save_for_backward(x, weight, bias, target)
        ctx.args = (ignore_index, label_smoothing, softcap, z_loss, fp32_dweight, backend)
    else:
        ctx.save_for_backward(dx, dw, db)
        ctx.needs = (need_dx, need_dw, need_db)


def _keep_graph() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True); True where torch cannot say (a private
    binding) or when torch is tracing."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep is None or torch.compiler.is_compiling() or bool(keep())


def _scaled(saved: tuple[Tensor, ...], grad: Tensor) -> tuple[Tensor, ...]:
    """The gradients formed in the forward pass (for grad_output 1) times the scalar loss's grad_output.

    In place when this backward frees the graph: the saved tensors are released as it returns, and autograd takes the
    returned dW as the weight's .grad without a copy — one weight-sized buffer where a scaled copy needs two (2 bytes
    per weight element in bf16). Out of place when the graph is kept (retain_graph): autograd may hand a returned
    tensor on as .grad as it is even then, so a later backward scaling the saved one in place would change .grad."""
    if _keep_graph() or any(type(t) is not Tensor for t in saved):
        return tuple(t * grad.to(t.dtype) for t in saved)
    return tuple(t.mul_(grad.to(t.dtype)) for t in saved)


def _backward(ctx, grad: Tensor, *_):
    if ctx.reduction == "none":
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        x, weight, bias, target = ctx.saved_tensors
        ignore_index, label_smoothing, softcap, z_loss, fp32_dweight, backend = ctx.args
        _, dx, dw, db = call(_linear_cross_entropy, x, weight, bias, target, grad.float().contiguous(), ignore_index,
                             label_smoothing, softcap, z_loss, "none", need_dx, need_dw, need_db, fp32_dweight, backend)
    else:
        need_dx, need_dw, need_db = ctx.needs
        dx, dw, db = _scaled(ctx.saved_tensors, grad)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None, *([None] * 12))


register_autograd(_linear_cross_entropy, _backward, _setup_context)


def _check(x: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, label_smoothing: float, reduction: str,
           softcap: float | None, z_loss: float) -> None:
    """The checks after autocast's cast (x, weight and bias are floating tensors by then)."""
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must be [vocab >= 1, {x.shape[-1] if x.dim() else '?'}] for x [..., hidden]; got "
                         f"x {describe(x)}, weight {describe(weight)}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"weight must match x's dtype and device; got x {describe(x)}, weight {describe(weight)}")
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be [{weight.shape[0]}] in x's dtype and device; got {describe(bias)}")
    if not isinstance(target, Tensor) or target.dtype not in (torch.int64, torch.int32) or \
            target.shape != x.shape[:-1] or target.device != x.device:
        raise ValueError(f"target must be int64/int32 of shape {tuple(x.shape[:-1])} (x's without the last dim) on "
                         f"{x.device}; got {describe(target) if isinstance(target, Tensor) else type(target).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1]; got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0; got {softcap}")
    if not z_loss >= 0:
        raise ValueError(f"z_loss must be >= 0; got {z_loss}")


def linear_cross_entropy(x: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
                         ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                         softcap: float | None = None, z_loss: float = 0.0, *, fp32_dweight: bool = True,
                         backend: str | None = None) -> Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias), target, ignore_index=…, label_smoothing=…, reduction=…)`` without
    building the ``[tokens, vocab]`` logits on the kernel backends (see the module docstring).

    x ``[..., H]`` fp32/fp16/bf16 (fp64 on the torch backend); weight ``[V, H]`` and bias ``[V]`` in x's dtype;
    target ``[...]`` int64/int32 class indices (``ignore_index`` rows count for nothing: a "mean" over no rows is NaN,
    as in torch). ``softcap``: the logits are capped to ``softcap·tanh(z / softcap)`` first (Gemma 2). ``z_loss``: adds
    ``z_loss · logsumexp(logits)²`` to each counted row's loss (PaLM's z-loss, 1e-4 there). Softmax and the
    loss in fp32; returns the loss in x's dtype: a scalar, or ``[...]`` for ``reduction="none"``. Gradients for x,
    weight and bias; a target outside ``[0, V)`` that is not ignored gives NaN on the kernel backends.
    ``fp32_dweight``: the kernel backends sum the chunks' dW in fp32 (as accurate as one GEMM; 4 bytes per weight
    element more memory); False sums them in the weight's dtype (Liger-Kernel's default: less memory, one rounding
    per chunk). fp32 weights are summed in fp32 either way. Under autocast the GEMMs run in its dtype and the loss
    comes back in fp32, as torch's linear then cross_entropy give it."""
    check_float_tensor("x", x, allow_fp64=True)
    check_float_tensor("weight", weight, allow_fp64=True)
    if bias is not None:
        check_float_tensor("bias", bias, allow_fp64=True)
    autocast = autocast_dtype(x)
    # Cast before the dtype checks: under autocast fp32 weights meet bf16 activations (mixed-precision training).
    x, weight, bias = cast_all(autocast, x, weight, bias)
    _check(x, weight, target, bias, label_smoothing, reduction, softcap, z_loss)
    needs = (x.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    training = torch.is_grad_enabled() and any(needs)
    name = backends.resolve_for(OP, FAMILY, x.device, backend, x, training=training)
    rows, flat_target = as_rows(x), target.reshape(-1).long()
    if name == "torch":
        loss = eager.linear_cross_entropy(rows, weight, flat_target, bias, ignore_index, float(label_smoothing),
                                          reduction, softcap, float(z_loss))
    else:
        forms_grads = training and reduction != "none"
        loss = call(_linear_cross_entropy, rows, weight, bias, flat_target, None, int(ignore_index),
                    float(label_smoothing), None if softcap is None else float(softcap), float(z_loss), reduction,
                    *(forms_grads and need for need in needs), bool(fp32_dweight), name)[0]
    if autocast is not None:
        loss = loss.float()  # torch's autocast runs cross_entropy in fp32
    return loss.view(target.shape) if reduction == "none" else loss
