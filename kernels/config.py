"""Small facts every Triton launcher needs: whether Triton runs interpreted, and size rounding."""

from __future__ import annotations

import os


def is_interpreted() -> bool:
    """True when Triton was imported with TRITON_INTERPRET=1 (kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
