"""The accuracy rule every comparison with the reference uses (tests and `make check` alike), and the hooks the
tests use to look inside the kernels (a forced CUDA softmax kernel, the materialised dropout keep-mask).

flash-attention's rule: a low-precision kernel may be off the fp32 reference by at most `factor` times
the error of the reference itself run in that low precision, plus a small floor; gradients get factor 3.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

# Absolute floor per dtype, relative to the largest reference magnitude: covers summation-order
# differences that the low-precision reference happens not to show. For fp16/bf16 it is one correct rounding of
# the largest output (half an ulp: up to 2^-11 and 2^-8 of it): a tensor of a few elements whose low-precision
# reference happens to round exactly would otherwise leave no room for that one unavoidable rounding.
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
FORWARD_FACTOR = 2.0
GRADIENT_FACTOR = 3.0


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| in fp64; NaN or Inf where the reference is finite counts as infinite error."""
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference shape {tuple(ref.shape)}")
    if out.numel() == 0:
        return 0.0
    out, ref = out.detach(), ref.detach()
    diff = (out.double() - ref.double()).abs()
    diff = torch.where(torch.isfinite(out.double()) | ~torch.isfinite(ref.double()), diff, torch.inf)
    return float(torch.nan_to_num(diff, nan=torch.inf).max())


def error_bound(ref_fp32: torch.Tensor, ref_lowp: torch.Tensor, dtype: torch.dtype, factor: float = FORWARD_FACTOR) -> float:
    scale = max(1.0, float(ref_fp32.detach().abs().max())) if ref_fp32.numel() else 1.0
    return factor * max_error(ref_lowp, ref_fp32) + FLOOR[dtype] * scale


def check(out: torch.Tensor, ref_fp32: torch.Tensor, ref_lowp: torch.Tensor | None = None,
          factor: float = FORWARD_FACTOR) -> tuple[float, float]:
    """(error, bound) of `out` against the fp32 reference; `ref_lowp` defaults to the fp32 reference
    (fp32 inputs: the floor alone)."""
    ref_lowp = ref_fp32 if ref_lowp is None else ref_lowp
    return max_error(out, ref_fp32), error_bound(ref_fp32, ref_lowp, out.dtype, factor)


def assert_close(out: torch.Tensor, ref_fp32: torch.Tensor, ref_lowp: torch.Tensor | None = None,
                 factor: float = FORWARD_FACTOR, what: str = "output") -> None:
    err, bound = check(out, ref_fp32, ref_lowp, factor)
    if not err <= bound:
        raise AssertionError(f"{what}: max error {err:.3e} exceeds bound {bound:.3e} (dtype {out.dtype})")


def assert_rows(rows: list[tuple[str, float, float]], what: str = "") -> None:
    """Asserts every ``(name, error, bound)`` row that `compare` returns is within its bound."""
    for name, err, bound in rows:
        assert err <= bound, f"{what} {name}: max error {err:.3e} exceeds bound {bound:.3e}".lstrip()


def _to_fp32(t: object) -> object:
    return t.detach().float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _fresh(t: object, grad: bool) -> object:
    if not isinstance(t, torch.Tensor):
        return t
    return t.detach().clone().requires_grad_(grad)


def compare(run, ref, inputs: dict[str, object], grad_of: tuple[str, ...] = (), grad_seed: int = 0,
            ) -> list[tuple[str, float, float]]:
    """Runs ``run(*inputs.values())`` and ``ref(*inputs.values())`` (the reference once in fp32, once in the
    inputs' own precision), backpropagates one random grad_output through all three and returns
    ``[(name, error, bound), ...]`` for the output and the gradient of each input named in ``grad_of``.
    Non-tensor inputs pass through unchanged; bool tensors are never cast."""
    names = list(inputs)
    ours = [_fresh(inputs[n], n in grad_of) for n in names]
    ref32_in = [_fresh(_to_fp32(inputs[n]), n in grad_of) for n in names]
    reflp_in = [_fresh(inputs[n], n in grad_of) for n in names]
    out = run(*ours)
    ref32, reflp = ref(*ref32_in), ref(*reflp_in)
    rows = [("out", *check(out, ref32, reflp))]
    if not grad_of:
        return rows
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype).to(out.device)
    out.backward(g)
    ref32.backward(g.float())
    reflp.backward(g)
    for i, n in enumerate(names):
        if n in grad_of:
            rows.append((f"d{n}", *check(ours[i].grad, ref32_in[i].grad, reflp_in[i].grad, GRADIENT_FACTOR)))
    return rows


# Whole models compose dozens of ops; in fp32 their outputs and gradients agree with the same model on torch.nn
# layers to this fraction of the largest reference magnitude.
MODEL_RTOL = 1e-4


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, in place (torch.nn zero-initialises biases, which would hide bias bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.randn(p.shape, generator=g, device="cpu") * (0.2 if p.dim() > 1 else 0.1)).to(p.device))
    return module


@contextlib.contextmanager
def force_softmax_algo(name: str) -> Iterator[None]:
    """Makes the CUDA softmax run one kernel ('warp' or 'block') for every row length, so each kernel sees
    every length."""
    from ..cuda import softmax as cuda_softmax

    if name not in ("auto", "warp", "block"):
        raise ValueError(f"softmax algo must be 'auto', 'warp' or 'block', got {name!r}")
    old, cuda_softmax.algo = cuda_softmax.algo, name
    try:
        yield
    finally:
        cuda_softmax.algo = old


def dropout_keep_mask(seed: torch.Tensor, shape: tuple[int, int, int, int], dropout_p: float,
                      device: torch.device) -> torch.Tensor:
    """The bool keep-mask ``[B, H, Lq, Lk]`` that the kernels of both backends draw for this seed (int64 ``[1]``
    on ``device``, as `ops.attention.draw_seed` gives it) and p (True = kept), materialised by
    kernels/attention.py:dropout_mask_kernel."""
    import triton

    from ..kernels.attention import dropout_mask_kernel

    b, h, lq, lk = shape
    keep = torch.zeros(shape, dtype=torch.int8, device=device)
    if keep.numel():
        grid = (triton.cdiv(lq, 32) * triton.cdiv(lk, 32) * b * h,)
        dropout_mask_kernel[grid](keep, lq, lk, dropout_p, seed, BLOCK_M=32, BLOCK_N=32)
    return keep.bool()


@dataclass
class InterpretedWork:
    """What the Triton interpreter ran inside `count_interpreted_work`: matrix-product FLOPs (2·M·N·K per tl.dot),
    the number of elements atomically added and of erf evaluations (GELU and its derivative: one each per
    element), over whole tiles (masked-off lanes count too)."""

    matmul_flops: int = 0
    atomic_elements: int = 0
    erf_elements: int = 0
    launches: list[str] = field(default_factory=list)  # the kernels launched, by name, in order


@contextlib.contextmanager
def count_interpreted_work() -> Iterator[InterpretedWork]:
    """Counts the tensor-core work, atomics and launches of every Triton kernel the interpreter runs in the block: exact,
    unlike a timing, and a kernel that issues more products cannot hide them."""
    from triton.runtime import interpreter

    work = InterpretedWork()
    builder = interpreter.InterpreterBuilder
    dot, rmw, erf = builder.create_dot, builder.create_atomic_rmw, builder.create_erf

    def create_dot(self, a, b, *args, **kwargs):
        (m, k), n = a.data.shape[-2:], b.data.shape[-1]
        work.matmul_flops += 2 * m * n * k
        return dot(self, a, b, *args, **kwargs)

    def create_atomic_rmw(self, op, ptr, val, mask, *args, **kwargs):
        work.atomic_elements += int(mask.data.sum())
        return rmw(self, op, ptr, val, mask, *args, **kwargs)

    def create_erf(self, arg):
        work.erf_elements += arg.data.size
        return erf(self, arg)

    run = interpreter.InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        work.launches.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    builder.create_dot, builder.create_atomic_rmw, builder.create_erf = create_dot, create_atomic_rmw, create_erf
    interpreter.InterpretedFunction.run = counted_run
    try:
        yield work
    finally:
        builder.create_dot, builder.create_atomic_rmw, builder.create_erf = dot, rmw, erf
        interpreter.InterpretedFunction.run = run


def peak_allocated_bytes(fn) -> int:
    """The most bytes of torch CPU memory that ``fn()`` held at once beyond what was live when it started: the
    running sum of the profiler's allocation events (sizes, frees negative) in time order. Exact for the tensors the
    call allocates, whoever allocates them (ops inside custom ops too); the Triton interpreter's and the simulator's
    own buffers are not torch tensors and do not count (a GPU kernel allocates nothing either)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, todo = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        node = todo.pop()
        todo.extend(node.children)
        if node.typed[0] == _EventType.Allocation:
            events.append((node.start_time_ns, node.typed[1].alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak
