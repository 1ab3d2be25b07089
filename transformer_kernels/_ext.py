"""Loading the C++ builds: `_C` (nvcc, real GPUs) or `_C_host` (the same sources on the CPU simulator), and the
codes of their enums, read from the bindings (csrc/types.h, softmax.h, epilogue.h are their one source)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

_modules: dict[str, ModuleType | str] = {}


def _import(name: str) -> ModuleType:
    # TK_HOST_EXTENSION: a _C_host built elsewhere (`make coverage` loads its gcov-instrumented copy this way).
    path = os.environ.get("TK_HOST_EXTENSION") if name == "_C_host" else None
    if not path:
        return importlib.import_module(f"transformer_kernels.{name}")
    spec = importlib.util.spec_from_file_location(f"transformer_kernels.{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"TK_HOST_EXTENSION={path} is not a loadable extension")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(name: str) -> ModuleType:
    """``_C`` or ``_C_host``; raises RuntimeError saying why it is missing."""
    if name not in _modules:
        try:
            _modules[name] = _import(name)
        except ImportError as e:
            hint = ("built only when nvcc is found at install time (reinstall with a CUDA toolkit)" if name == "_C"
                    else "built only when a CUDA toolkit's headers and a C++ compiler are found at install time "
                         "(the simulator is a verification tool: the Triton and torch backends need neither)")
            _modules[name] = f"transformer_kernels.{name} is not available ({e}); it is {hint}"
    mod = _modules[name]
    if isinstance(mod, str):
        raise RuntimeError(mod)
    return mod


def available(name: str) -> tuple[bool, str]:
    try:
        load(name)
        return True, ""
    except RuntimeError as e:
        return False, str(e)


_launch_problems: dict[int, str] = {}


def launch_problem(index: int | None = None) -> str:
    """"" when a test kernel of `_C` runs on CUDA device ``index`` (default: the current one), else why not (a driver
    older than the toolkit `_C` was built with, an architecture the build lacks, no device). Probed once per device
    and process: a node may mix GPUs, and a build that launches on one may lack the other's architecture."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if index is None:
        index = torch.cuda.current_device()
    if index not in _launch_problems:
        try:
            with torch.cuda.device(index):  # the probe launches on the current device
                _launch_problems[index] = load("_C").probe()
        except RuntimeError as e:
            _launch_problems[index] = str(e)
    return _launch_problems[index]


def module_for(device: torch.device) -> ModuleType:
    """The build that runs on tensors of this device: `_C` for CUDA, the simulator for CPU."""
    return load("_C" if device.type == "cuda" else "_C_host")


_smem_per_sm: dict[torch.device, int] = {}


def smem_per_sm(device: torch.device) -> int:
    """Shared memory per SM of a CUDA device in bytes, as the launchers pick tiles by it (csrc/attention_*.cu: the
    narrow tiles of 100 KiB SMs), read once per device (the attention backward asks on every call); 0 for the
    simulator's devices (the tiles of an unknown device)."""
    if device.type != "cuda":
        return 0
    if device not in _smem_per_sm:
        _smem_per_sm[device] = torch.cuda.get_device_properties(device).shared_memory_per_multiprocessor
    return _smem_per_sm[device]


def dtype_code(mod: ModuleType, dtype: torch.dtype) -> int:
    """csrc/types.h's DType code of a torch dtype."""
    return mod.dtype_codes[str(dtype).removeprefix("torch.")]


def mask_kind(mod: ModuleType, mask: torch.Tensor | None, dtype: torch.dtype) -> int:
    """csrc/softmax.h's MaskKind of a mask read next to data of ``dtype`` (ops/ admits only these kinds)."""
    if mask is None:
        return mod.mask_kinds["none"]
    if mask.dtype == torch.bool:
        return mod.mask_kinds["bool"]
    return mod.mask_kinds["same_dtype" if mask.dtype == dtype else "float32"]
