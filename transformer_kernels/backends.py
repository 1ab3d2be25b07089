"""Which implementation runs an op: "auto", "triton", "cuda" or "torch".

`auto` on CUDA tensors takes the first available backend of the op's entry in `GPU_PREFERENCE` (in
`TRAINING_PREFERENCE` when the call will be differentiated and that table has the op); on CPU
tensors it takes "torch" (eager.py: PyTorch's own ops, differentiated by autograd). A forced backend that cannot run
raises a clear error instead of falling back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

from . import _ext

BACKENDS = ("auto", "triton", "cuda", "torch")

# Order in which `auto` tries backends on CUDA tensors, per op: the measured winner first. Measured on an NVIDIA H200
# (torch 2.11, triton 3.6; `make gpu-check`, benchmarks/results/h200/results.csv, README's table):
# - attention, varlen: Triton 263-385 TFLOP/s forward at D128 (above SDPA's flash backend, below cuDNN's), the CUDA
#   C++ kernels 6-10 (SIMT, no tensor cores yet); "torch" is the unfused eager composition.
# - linear family: cuBLAS through torch beats both fused GEMMs (linear+gelu+residual 0.106 ms against Triton's
#   0.138 at 16384x1024x1024 fp16; the FFN 0.50 ms against 0.78), so `auto` takes torch's ops; the fused kernels
#   stay a forced choice. qkv/out projections were not timed on their own and follow linear.
# - norms: Triton's forward is the fastest (layer_norm 3.7 TB/s, as Liger's), its backward is not (forward and
#   backward 1.18 ms against torch's 0.43): see TRAINING_PREFERENCE.
# - masked_softmax was not timed on the GPU yet: Triton first, as before.
GPU_PREFERENCE: dict[str, tuple[str, ...]] = {
    "masked_softmax": ("triton", "cuda", "torch"),
    "attention": ("triton", "cuda", "torch"),
    "varlen_attention": ("triton", "cuda", "torch"),
    "layer_norm": ("triton", "cuda", "torch"),
    "rms_norm": ("triton", "cuda", "torch"),
    "linear": ("torch", "triton", "cuda"),
    "gated_linear": ("torch", "triton", "cuda"),
    "qkv_projection": ("torch", "triton", "cuda"),
    "out_projection": ("torch", "triton", "cuda"),
    # Not timed on a GPU yet: the kernels first, as for every op whose eager form is several unfused ops (rotary) or
    # builds [tokens, vocab] logits (the loss).
    "rotary": ("triton", "cuda", "torch"),
    "linear_cross_entropy": ("triton", "cuda", "torch"),
}
# The order when the call will be differentiated (an input requires grad under grad mode), where it differs.
TRAINING_PREFERENCE: dict[str, tuple[str, ...]] = {
    "layer_norm": ("torch", "triton", "cuda"),
    "rms_norm": ("torch", "triton", "cuda"),
}

_default = "auto"
# The stack of `use_backend` scopes. A plain list rather than a ContextVar: torch.compile can read a list but
# cannot trace ContextVar.set, and modules must compile with fullgraph=True. Scopes are per process, not per
# thread.
_scoped: list[str] = []


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Sets the process-wide default backend."""
    global _default
    _default = _check_name(name)


def get_backend() -> str:
    """The backend in force: the innermost `use_backend`, else the `set_backend` default."""
    return _scoped[-1] if _scoped else _default


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Runs the block with `name` as the backend."""
    _scoped.append(_check_name(name))
    try:
        yield
    finally:
        _scoped.pop()


def triton_status(device: torch.device) -> tuple[bool, str]:
    """Whether Triton kernels can run on tensors of `device`."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    from .kernels.config import is_interpreted

    if device.type == "cuda" or is_interpreted():
        return True, ""
    return False, "Triton on CPU tensors needs the interpreter: set TRITON_INTERPRET=1 before importing triton"


def cuda_status(device: torch.device) -> tuple[bool, str]:
    """Whether the CUDA C++ kernels can run on `device` (`_C` on GPUs, `_C_host` on the CPU). On GPUs `_C` must
    also launch a test kernel: importing it succeeds even when the driver is too old for it."""
    if device.type != "cuda":
        return _ext.available("_C_host")
    ok, why = _ext.available("_C")
    problem = _ext.launch_problem(device.index) if ok else ""
    if problem:
        return False, f"transformer_kernels._C cannot launch kernels on {device}: {problem}"
    return ok, why


def status(name: str, device: torch.device) -> tuple[bool, str]:
    """(available, why not) for a backend on tensors of `device`."""
    return _status(name, device.type, device.index)


def _status(name: str, device_type: str, index: int | None = None) -> tuple[bool, str]:
    device = torch.device(device_type, index)
    if name == "triton":
        return triton_status(device)
    if name == "cuda":
        return cuda_status(device)
    return True, ""


# Availability cannot change while a process runs, so torch.compile may take the answer as a constant instead of
# tracing the imports behind it. This is all torch._dynamo.assume_constant_result does; importing torch._dynamo
# here would import triton before TRITON_INTERPRET can be set.
_status._dynamo_marked_constant = True  # type: ignore[attr-defined]


def resolve(op: str, device: torch.device, requested: str | None = None,
            why_not: Callable[[str], str | None] | None = None, training: bool = False) -> str:
    """The concrete backend ("triton" | "cuda" | "torch") that runs `op` on tensors of `device`.

    ``why_not(name)`` says why a kernel backend cannot take these particular inputs (a head dim it lacks, a
    dtype), or None: `auto` then tries the next backend, a forced backend raises NotImplementedError.
    ``training``: the call will be differentiated, so `auto` follows TRAINING_PREFERENCE where it has the op."""
    name = _check_name(requested) if requested is not None else get_backend()
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        order = (TRAINING_PREFERENCE.get(op) if training else None) or GPU_PREFERENCE.get(op, ("torch",))
        for candidate in order:
            if candidate == "torch" or (status(candidate, device)[0] and not (why_not is not None and why_not(candidate))):
                return candidate
        return "torch"
    if name != "torch" and name not in GPU_PREFERENCE.get(op, ()):
        raise NotImplementedError(f"backend {name!r} does not implement {op}")
    ok, why = status(name, device)
    if not ok:
        raise RuntimeError(f"backend {name!r} cannot run {op} on {device.type} tensors: {why}")
    reason = why_not(name) if why_not is not None and name != "torch" else None
    if reason:
        raise NotImplementedError(f"backend {name!r} cannot run {op} for these inputs: {reason}")
    return name


_LAUNCHERS: dict[tuple[str, str], ModuleType] = {}


def launchers(family: str, backend: str) -> ModuleType:
    """The module holding a kernel backend's launchers of an op family (families.FAMILIES): kernels/<family>.py for
    "triton", transformer_kernels/cuda/<family>.py for "cuda". Both define the same functions with the same
    signatures, and ``unsupported(...)``, which says why they cannot take some inputs."""
    module = _LAUNCHERS.get((family, backend))
    if module is None:
        # Import statements rather than importlib: torch.compile traces these (modules compile with fullgraph=True),
        # and triton is imported only once a Triton launcher is first wanted. tests/test_backends.py checks that the
        # names here are the families of families.py.
        if backend == "cuda":
            from .cuda import attention, cross_entropy, linear, norm, rotary, softmax
        else:
            from .kernels import attention, cross_entropy, linear, norm, rotary, softmax
        module = {"attention": attention, "cross_entropy": cross_entropy, "linear": linear, "norm": norm,
                  "rotary": rotary, "softmax": softmax}[family]
        _LAUNCHERS[(family, backend)] = module
    return module


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Makes the launches for ``t`` go to its own GPU whatever the current CUDA device is: Triton and the bindings
    launch on the current device (and the bindings set their shared-memory limits there). Nothing to switch (no
    context manager's cost) when ``t`` is on the CPU or on the current device."""
    if not t.is_cuda or t.device.index == torch.cuda.current_device():
        return _NO_SWITCH
    return torch.cuda.device(t.device)


_NO_SWITCH = contextlib.nullcontext()

# resolve_for's answers: backend availability is fixed for the process and ``unsupported`` reads only the inputs'
# dtypes and shapes, so a call with the same op, device, requested backend, training flag, dtypes and shapes gets the
# same answer. Bounded: cleared when full (a new shape costs one resolve, as before).
_RESOLVED: dict[tuple, str] = {}
_RESOLVED_MAX = 4096


def clear_caches() -> None:
    """Forgets resolve_for's answers: for code that changes what availability answers (tests that patch it)."""
    _RESOLVED.clear()


def resolve_for(op: str, family: str, device: torch.device, requested: str | None, *inputs: torch.Tensor,
                training: bool = False) -> str:
    """`resolve` with the family's ``unsupported(*inputs)`` as the per-input check of each kernel backend."""
    key = (op, device, requested if requested is not None else get_backend(), training,
           *((t.dtype, t.shape) for t in inputs))
    name = _RESOLVED.get(key)
    if name is None:
        # Errors (a forced backend that cannot run) are raised here every time: only answers are kept.
        name = resolve(op, device, requested, lambda b: launchers(family, b).unsupported(*inputs), training)
        if len(_RESOLVED) >= _RESOLVED_MAX:
            _RESOLVED.clear()
        _RESOLVED[key] = name
    return name
