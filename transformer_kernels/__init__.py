"""transformer-kernels: fused Triton and CUDA C++ kernels for transformer layers.

Backends: ``set_backend("auto" | "triton" | "cuda" | "torch")`` or ``with use_backend(name):``.
Ops live in ``transformer_kernels.ops``, drop-in layers in ``.nn``, small models in ``.models``. The plain-PyTorch
oracle the tests compare with is ``transformer_kernels.reference`` (imported on demand: the runtime never uses it).
docs/ARCHITECTURE.md describes the layers and the path of a call.
"""

__version__ = "0.1.0"

from . import nn, ops
from .backends import BACKENDS, get_backend, set_backend, use_backend
from .convert import convert

__all__ = ["BACKENDS", "convert", "get_backend", "nn", "ops", "set_backend", "use_backend"]
