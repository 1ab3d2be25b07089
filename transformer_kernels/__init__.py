"""transformer-kernels: fused Triton and CUDA C++ kernels for transformer layers.

Backends: ``set_backend("auto" | "triton" | "cuda" | "torch")`` or ``with use_backend(name):``.
Ops live in ``transformer_kernels.ops``; the plain-PyTorch oracle in ``transformer_kernels.reference``.
"""

__version__ = "0.1.0"

from . import nn, ops, reference
from .backends import BACKENDS, get_backend, set_backend, use_backend
from .convert import convert

__all__ = ["BACKENDS", "convert", "get_backend", "nn", "ops", "reference", "set_backend", "use_backend"]
