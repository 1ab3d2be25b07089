"""Small facts every Triton launcher needs: whether Triton runs interpreted, size rounding, mask arguments, and
the description of an ahead-of-time compile variant."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

# The kernels' MASK_KIND constexpr: no mask, bool (True = keep), additive float.
MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2


def mask_args(mask: torch.Tensor | None, placeholder: torch.Tensor) -> tuple[int, torch.Tensor, tuple[int, ...]]:
    """(MASK_KIND, the tensor the kernel reads, its 4 strides): a bool mask is read as uint8 bytes, a float one as
    it is; without a mask the kernel gets `placeholder` (never read) and zero strides."""
    if mask is None:
        return MASK_NONE, placeholder, (0, 0, 0, 0)
    if mask.dtype == torch.bool:
        return MASK_BOOL, mask.view(torch.uint8), mask.stride()
    return MASK_ADD, mask, mask.stride()


def is_interpreted() -> bool:
    """True when Triton was imported with TRITON_INTERPRET=1 (kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class AotVariant:
    """One compiled form a launcher can pick: the @triton.jit kernel, its argument types (Triton
    signature strings), its constexprs and warps. Kernel files list theirs in `aot_variants()`; the
    resource check compiles each for every target architecture without a GPU."""

    kernel_name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    label: str
    num_stages: int = 3
    # Pointer arguments the runtime sees 16-byte aligned (torch allocations), as Triton specialises them.
    aligned: tuple[str, ...] = field(default_factory=tuple)


TRITON_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def require_runnable(t: torch.Tensor) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors only when interpreted."""
    if t.device.type == "cpu" and not is_interpreted():
        raise RuntimeError("Triton kernels on CPU tensors need the interpreter: set TRITON_INTERPRET=1 before importing triton")


def power_of_two_configs(pick, min_cols: int, max_cols: int) -> list:
    """What ``pick(n)`` returns for every power-of-two row length from min_cols to max_cols: a row launcher's
    complete set of configurations when it rounds lengths up to powers of two (for the resource check)."""
    configs, n = [], min_cols
    while n <= max_cols:
        configs.append(pick(n))
        n *= 2
    return configs
