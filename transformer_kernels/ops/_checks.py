"""Argument checks shared by the ops: they raise ValueError/TypeError naming the argument, its shape and
dtype, and what was expected, before anything launches."""

from __future__ import annotations

import torch

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_float_tensor(name: str, t: object, allow_fp64: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    allowed = (*KERNEL_DTYPES, torch.float64) if allow_fp64 else KERNEL_DTYPES
    if t.dtype not in allowed:
        raise TypeError(f"{name} must have dtype in {allowed}; got {describe(t)}")
    return t


def check_seed(seed: torch.Tensor | None, device: torch.device) -> None:
    """The dropout seed the kernels read on the device: int64 ``[1]`` on the inputs' device (a GPU kernel handed a
    host pointer faults, and the fault kills the process's CUDA context)."""
    if seed is not None and (seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != device):
        raise ValueError(f"seed must be an int64 tensor of 1 element on {device} (draw_seed); got {describe(seed)}")


def check_qkv(q: object, k: object, v: object, ndim: int, layout: str) -> None:
    """q, k, v: floating (fp64 allowed: the torch backend), ``ndim``-D (``layout`` names the dims), one dtype, one
    device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t, allow_fp64=True)
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D {layout}; got {describe(t)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")


def check_attention_options(h: int, hkv: int, enable_gqa: bool, dropout_p: float, causal_alignment: str) -> None:
    """Head counts (grouped-query only when asked for), the dropout probability and the causal alignment."""
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"query heads {h} must be a multiple of key/value heads {hkv}")
    if h != hkv and not enable_gqa:
        raise ValueError(f"q has {h} heads but k/v have {hkv}: pass enable_gqa=True for grouped-query attention")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")
    if causal_alignment not in CAUSAL_ALIGNMENTS:
        raise ValueError(f"causal_alignment must be one of {CAUSAL_ALIGNMENTS}; got {causal_alignment!r}")


def check_softcap(softcap: object) -> None:
    """``softcap``: None or 0 (off), else a positive float."""
    if softcap is None or (not isinstance(softcap, bool) and softcap == 0.0):
        return
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0.0:
        raise ValueError(f"softcap must be a positive float (or None / 0 for none); got {softcap!r}")


def check_alibi_slopes(slopes: object, b: int, h: int, device: torch.device) -> None:
    """``alibi_slopes``: None, or a floating ``[H]`` or ``[B, H]`` tensor on ``device`` that does not require grad
    (constants, as flash-attn's; a learned bias goes in as a float ``attn_mask``, which gets its gradient)."""
    if slopes is None:
        return
    check_float_tensor("alibi_slopes", slopes, allow_fp64=True)
    if tuple(slopes.shape) not in ((h,), (b, h)):
        raise ValueError(f"alibi_slopes must have shape [H] = ({h},) or [B, H] = ({b}, {h}); got {describe(slopes)}")
    if slopes.device != device:
        raise ValueError(f"alibi_slopes is on {slopes.device} but q is on {device}")
    if slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError("alibi_slopes get no gradient: detach them, or pass a learned bias as a float attn_mask")


def check_window(window: object, name: str = "window") -> tuple[int, int]:
    """``window``: None (none) or ``(left, right)`` ints, each >= 0 or −1 (unbounded on that side); returned as two
    ints, ``(-1, -1)`` for none."""
    if window is None:
        return -1, -1
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) or w < -1 for w in window)):
        raise ValueError(f"{name} must be (left, right) with ints >= 0 or -1 (unbounded); got {window!r}")
    return int(window[0]), int(window[1])


def check_mask(name: str, mask: object, shape: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
    """A bool or floating mask on ``device`` that broadcasts to ``shape`` (the input's)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"{name} must be bool (True = keep) or floating (added); got {describe(mask)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the input is on {device}")
    # Broadcasts to exactly `shape`: no more dims, and each of its trailing dims 1 or the input's.
    if mask.dim() > len(shape) or any(m != 1 and m != n for m, n in zip(reversed(mask.shape), reversed(shape), strict=False)):
        raise ValueError(f"{name} with {describe(mask)} does not broadcast to the input shape {tuple(shape)}")
    return mask


def autocast_dtype(t: torch.Tensor, fp32_op: bool = False) -> torch.dtype | None:
    """The dtype an op should run in under torch.autocast for ``t``'s device, as torch's own policy does: matmul
    ops in the autocast dtype, reductions (softmax, norms) in fp32; None when autocast is off."""
    device_type = t.device.type
    if not torch.is_autocast_enabled(device_type) or not t.is_floating_point():
        return None
    return torch.float32 if fp32_op else torch.get_autocast_dtype(device_type)


def cast_all(dtype: torch.dtype | None, *tensors: torch.Tensor | None) -> tuple:
    """Floating tensors cast to ``dtype`` (no-op for None dtype or None tensors; bool masks untouched)."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
