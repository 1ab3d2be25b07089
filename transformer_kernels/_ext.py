"""Glue to the C++ builds: loading `_C` (nvcc, real GPUs) or `_C_host` (simulator), and turning tensors
into the raw pointers, strides, dtype codes and stream handles the bindings take."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from types import ModuleType

import torch

# Must match csrc/types.h (DType) and csrc/softmax.h (MaskKind, SoftmaxAlgo).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MASK_NONE, MASK_BOOL, MASK_SAME_DTYPE, MASK_FLOAT32 = 0, 1, 2, 3
SOFTMAX_ALGOS = {"auto": 0, "warp": 1, "block": 2}

_modules: dict[str, ModuleType | str] = {}


def load(name: str) -> ModuleType:
    """``_C`` or ``_C_host``; raises RuntimeError saying why it is missing."""
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"transformer_kernels.{name}")
        except ImportError as e:
            hint = ("built only when nvcc is found at install time (reinstall with a CUDA toolkit)" if name == "_C"
                    else "reinstall the package: pip install -e .")
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


def module_for(device: torch.device) -> ModuleType:
    """The build that runs on tensors of this device: `_C` for CUDA, the simulator for CPU."""
    return load("_C" if device.type == "cuda" else "_C_host")


def stream_handle(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


_softmax_algo = "auto"


@contextlib.contextmanager
def force_softmax_algo(name: str) -> Iterator[None]:
    """Makes the CUDA softmax use one kernel ('warp' or 'block') for every row length (tests)."""
    global _softmax_algo
    if name not in SOFTMAX_ALGOS:
        raise ValueError(f"softmax algo must be one of {tuple(SOFTMAX_ALGOS)}, got {name!r}")
    old, _softmax_algo = _softmax_algo, name
    try:
        yield
    finally:
        _softmax_algo = old


def _mask_kind(mask: torch.Tensor | None, dtype: torch.dtype) -> int:
    if mask is None:
        return MASK_NONE
    if mask.dtype == torch.bool:
        return MASK_BOOL
    if mask.dtype == dtype:
        return MASK_SAME_DTYPE
    if mask.dtype == torch.float32:
        return MASK_FLOAT32
    raise TypeError(f"mask dtype {mask.dtype} must be bool, float32 or x's dtype {dtype}")


def softmax_forward(x: torch.Tensor, mask: torch.Tensor | None, scale: float, is_causal: bool,
                    causal_offset: int = 0) -> torch.Tensor:
    """CUDA C++ masked softmax; same contract as kernels/softmax.py:softmax_forward."""
    if x.dim() != 4 or (mask is not None and mask.shape != x.shape):
        raise ValueError(f"x and mask must be 4-D views of one shape, got {tuple(x.shape)} and "
                         f"{None if mask is None else tuple(mask.shape)}")
    if x.dtype not in DTYPE_CODES:
        raise TypeError(f"x dtype {x.dtype} is not supported by the CUDA softmax (supported: {tuple(DTYPE_CODES)})")
    kind = _mask_kind(mask, x.dtype)
    mod = module_for(x.device)
    d0, d1, d2, n = x.shape
    y = torch.empty((d0, d1, d2, n), dtype=x.dtype, device=x.device)
    mod.softmax_forward(
        x.data_ptr(), 0 if mask is None else mask.data_ptr(), y.data_ptr(), d0 * d1 * d2, n, d1, d2,
        list(x.stride()), [0] * 4 if mask is None else list(mask.stride()), float(scale), bool(is_causal),
        int(causal_offset), DTYPE_CODES[x.dtype], kind, SOFTMAX_ALGOS[_softmax_algo], stream_handle(x),
    )
    return y


def softmax_backward(grad: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """CUDA C++ softmax backward; grad any strides, y contiguous; returns contiguous dx."""
    if grad.dim() != 4 or y.shape != grad.shape or not y.is_contiguous():
        raise ValueError(f"grad {tuple(grad.shape)} and contiguous y {tuple(y.shape)} must be 4-D of one shape")
    if grad.dtype != y.dtype:
        raise TypeError(f"grad dtype {grad.dtype} must equal y dtype {y.dtype}")
    mod = module_for(y.device)
    d0, d1, d2, n = y.shape
    dx = torch.empty_like(y)
    mod.softmax_backward(
        y.data_ptr(), grad.data_ptr(), dx.data_ptr(), d0 * d1 * d2, n, d1, d2, list(grad.stride()), float(scale),
        DTYPE_CODES[y.dtype], SOFTMAX_ALGOS[_softmax_algo], stream_handle(y),
    )
    return dx


def attention_max_head_dim(dtype: torch.dtype, device: torch.device) -> int:
    """The widest head dim the CUDA attention kernels are instantiated for (csrc/attention.h), 0 for other dtypes."""
    if dtype not in DTYPE_CODES:
        return 0
    limits = module_for(device).attention_max_head_dim
    return limits["float" if dtype == torch.float32 else "half"]


def _attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    kpm: torch.Tensor | None, scale: float, is_causal: bool, causal_offset: int, dropout_p: float,
                    seed: int) -> dict:
    b, h, lq, d = q.shape
    return {
        "q": q.data_ptr(), "k": k.data_ptr(), "v": v.data_ptr(), "q_stride": list(q.stride()),
        "k_stride": list(k.stride()), "v_stride": list(v.stride()),
        "mask": 0 if mask is None else mask.data_ptr(),
        "mask_stride": [0] * 4 if mask is None else list(mask.stride()),
        "mask_kind": _mask_kind(mask, q.dtype),
        "kpm": 0 if kpm is None else kpm.data_ptr(), "kpm_stride": [0, 0] if kpm is None else list(kpm.stride()),
        "B": b, "H": h, "Hkv": k.shape[1], "Lq": lq, "Lk": k.shape[2], "D": d, "scale": float(scale),
        "causal": bool(is_causal), "causal_offset": int(causal_offset), "dropout_p": float(dropout_p),
        "seed": int(seed) & (2**64 - 1), "dtype": DTYPE_CODES[q.dtype],
        "out": 0, "row_max": 0, "inv_l": 0, "dout": 0, "do_stride": [0] * 4, "delta": 0, "dq": 0, "dk": 0, "dv": 0,
    }


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      kpm: torch.Tensor | None, scale: float, is_causal: bool, causal_offset: int, dropout_p: float,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CUDA C++ attention; same contract as kernels/attention.py:attention_forward (q, k, v any strides; mask a
    ``[B, H, Lq, Lk]`` view, bool or float; kpm bool ``[B, Lk]``). Returns out, row_max, inv_l."""
    b, h, lq, d = q.shape
    out = torch.empty((b, h, lq, d), dtype=q.dtype, device=q.device)
    row_max = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    inv_l = torch.empty_like(row_max)
    args = _attention_args(q, k, v, mask, kpm, scale, is_causal, causal_offset, dropout_p, seed)
    args |= {"out": out.data_ptr(), "row_max": row_max.data_ptr(), "inv_l": inv_l.data_ptr()}
    module_for(q.device).attention_forward(args, stream_handle(q))
    return out, row_max, inv_l


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       row_max: torch.Tensor, inv_l: torch.Tensor, mask: torch.Tensor | None, kpm: torch.Tensor | None,
                       scale: float, is_causal: bool, causal_offset: int, dropout_p: float, seed: int,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `attention_forward` for ``dout`` (any strides, e.g. expanded); contiguous dq, dk, dv."""
    b, h, lq, d = q.shape
    # The kernels write every gradient element, except when there is nothing to attend (no queries, keys or head
    # dim: csrc/attention_bwd.cu returns early), where the gradients are zeros.
    alloc = torch.zeros if b * h * d == 0 or lq == 0 or k.shape[2] == 0 else torch.empty
    dq, dk, dv = (alloc(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    delta = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    out = out.contiguous()
    args = _attention_args(q, k, v, mask, kpm, scale, is_causal, causal_offset, dropout_p, seed)
    args |= {"out": out.data_ptr(), "row_max": row_max.data_ptr(), "inv_l": inv_l.data_ptr(),
             "dout": dout.data_ptr(), "do_stride": list(dout.stride()), "delta": delta.data_ptr(),
             "dq": dq.data_ptr(), "dk": dk.data_ptr(), "dv": dv.data_ptr()}
    module_for(q.device).attention_backward(args, stream_handle(q))
    return dq, dk, dv


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def norm_forward(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                 eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CUDA C++ norm; same contract as kernels/norm.py:norm_forward (x, residual ``[rows, N]``; returns y, the
    pre-norm sum (x itself without a residual), fp32 mean (empty for RMS) and rstd)."""
    x, residual = _unit_col_stride(x), None if residual is None else _unit_col_stride(residual)
    rows, n = x.shape
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    s = x if residual is None else torch.empty_like(y)
    mean = torch.empty(0 if rms else rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    args = _norm_args(x, residual, weight, bias, eps, rms)
    args |= {"y": y.data_ptr(), "sum": 0 if residual is None else s.data_ptr(), "mean": _ptr(mean),
             "rstd": rstd.data_ptr()}
    module_for(x.device).norm_forward(args, stream_handle(x))
    return y, s, mean, rstd


def norm_backward(dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                  mean: torch.Tensor, rstd: torch.Tensor, has_bias: bool, rms: bool,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """CUDA C++ norm backward; same contract as kernels/norm.py:norm_backward."""
    x, residual, dy = _unit_col_stride(x), None if residual is None else _unit_col_stride(residual), _unit_col_stride(dy)
    rows, n = x.shape
    mod = module_for(x.device)
    chunks = max(mod.norm_backward_chunks(rows), 1)
    dx = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    dw = torch.empty_like(weight)
    db = torch.empty_like(weight) if has_bias else None
    dw_part = torch.empty((chunks, n), dtype=torch.float32, device=x.device)
    db_part = torch.empty_like(dw_part) if has_bias else None
    args = _norm_args(x, residual, weight, None, 0.0, rms)
    args |= {"dy": dy.data_ptr(), "dy_row_stride": dy.stride(0), "mean": _ptr(mean), "rstd": rstd.data_ptr(),
             "dx": dx.data_ptr(), "dw": dw.data_ptr(), "db": _ptr(db), "dw_partial": dw_part.data_ptr(),
             "db_partial": _ptr(db_part)}
    mod.norm_backward(args, stream_handle(x))
    return dx, dw, db


def _unit_col_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _norm_args(x, residual, weight, bias, eps, rms) -> dict:
    rows, n = x.shape
    return {"x": x.data_ptr(), "residual": _ptr(residual), "weight": weight.data_ptr(), "bias": _ptr(bias),
            "rows": rows, "cols": n, "x_row_stride": x.stride(0),
            "res_row_stride": 0 if residual is None else residual.stride(0), "eps": float(eps), "rms": int(rms),
            "dtype": DTYPE_CODES[x.dtype], "y": 0, "sum": 0, "mean": 0, "rstd": 0, "dy": 0, "dy_row_stride": 0,
            "dx": 0, "dw": 0, "db": 0, "dw_partial": 0, "db_partial": 0}


def _activation_code(module: ModuleType, activation: str | None) -> int:
    return module.activation_codes[activation or ""]


def epilogue_forward(acc: torch.Tensor, acc2: torch.Tensor | None, bias: torch.Tensor | None,
                     bias2: torch.Tensor | None, residual: torch.Tensor | None, activation: str | None,
                     dropout_p: float, seed: int) -> torch.Tensor:
    """After the GEMM(s): acc (acc2) contiguous ``[M, N]`` become the pre-activations in place; returns
    ``dropout(act(acc + bias) [* (acc2 + bias2)]) + residual``, contiguous ``[M, N]``."""
    m, n = acc.shape
    residual = None if residual is None else _unit_col_stride(residual)
    y = torch.empty_like(acc)
    mod = module_for(acc.device)
    mod.epilogue_forward({
        "acc": acc.data_ptr(), "acc2": _ptr(acc2), "bias": _ptr(bias), "bias2": _ptr(bias2), "residual": _ptr(residual),
        "y": y.data_ptr(), "M": m, "N": n, "res_row_stride": 0 if residual is None else residual.stride(0),
        "act": _activation_code(mod, activation), "dropout_p": float(dropout_p), "seed": int(seed) & (2**64 - 1),
        "dtype": DTYPE_CODES[acc.dtype]}, stream_handle(acc))
    return y


def activation_backward(dy: torch.Tensor, z: torch.Tensor | None, z2: torch.Tensor | None, activation: str | None,
                        dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dZ (and dZ_up for the gated form) from dY ``[M, N]`` (any strides) and the saved pre-activations."""
    m, n = dy.shape
    dz = torch.empty((m, n), dtype=dy.dtype, device=dy.device)
    dz2 = torch.empty_like(dz) if z2 is not None else None
    mod = module_for(dy.device)
    mod.activation_backward({
        "dy": dy.data_ptr(), "z": _ptr(z), "z2": _ptr(z2), "dz": dz.data_ptr(), "dz2": _ptr(dz2), "M": m, "N": n,
        "dy_row_stride": dy.stride(0), "dy_col_stride": dy.stride(1), "act": _activation_code(mod, activation),
        "dropout_p": float(dropout_p), "seed": int(seed) & (2**64 - 1), "dtype": DTYPE_CODES[dy.dtype]},
        stream_handle(dy))
    return dz, dz2


def head_split(src: torch.Tensor, bias: torch.Tensor | None, col0: int, out: torch.Tensor) -> torch.Tensor:
    """out ``[B, heads, L, D]`` (contiguous) = src ``[B·L, C]`` columns ``col0 .. col0 + heads·D`` (+ bias)."""
    b, heads, length, d = out.shape
    module_for(src.device).head_split({
        "src": src.data_ptr(), "bias": _ptr(bias), "dst": out.data_ptr(), "B": b, "heads": heads, "L": length, "D": d,
        "col0": col0, "row_stride": src.stride(0), "strides": [0] * 4, "dtype": DTYPE_CODES[src.dtype]},
        stream_handle(src))
    return out


def head_merge(src: torch.Tensor, out: torch.Tensor, col0: int = 0) -> torch.Tensor:
    """out ``[B·L, C]`` columns ``col0 .. col0 + heads·D`` = src ``[B, heads, L, D]`` (any strides)."""
    b, heads, length, d = src.shape
    module_for(src.device).head_merge({
        "src": src.data_ptr(), "bias": 0, "dst": out.data_ptr(), "B": b, "heads": heads, "L": length, "D": d,
        "col0": col0, "row_stride": out.stride(0), "strides": list(src.stride()), "dtype": DTYPE_CODES[src.dtype]},
        stream_handle(src))
    return out
