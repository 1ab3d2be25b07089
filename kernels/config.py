"""Small facts every Triton launcher needs: whether Triton runs interpreted, size rounding, mask arguments, the
row-launch heuristic, the autotune-with-pruning helper, and the description of an ahead-of-time compile variant."""

from __future__ import annotations

import functools
import inspect
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


# The launchers' per-signature plans (dicts), registered where they are made: a plan holds decisions read from this
# module's settings (SPLIT_PROGRAMS_PER_SM, ...), so whoever changes one (tests) clears them all.
PLAN_CACHES: list[dict] = []


def clear_plans() -> None:
    for plans in PLAN_CACHES:
        plans.clear()


@functools.cache
def is_interpreted() -> bool:
    """True when Triton was imported with TRITON_INTERPRET=1 (kernels then run on CPU tensors). Triton reads the
    variable once, at its import, so this answers once too (every launch asks, up to three times)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unsupported_dtype(x: torch.Tensor, supported: tuple[torch.dtype, ...]) -> str | None:
    """Why a launcher cannot take ``x``'s dtype, or None."""
    return None if x.dtype in supported else f"dtype {x.dtype} (supported: {supported})"


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def length_class(n: int) -> int:
    """The autotune bucket of a size: its next power of two (capped), so a new sequence length or token count
    reuses the tile tuned for its bucket instead of benchmarking again."""
    return min(next_power_of_2(max(n, 1)), 1 << 16)


def spans_past_int32(*tensors: torch.Tensor | None) -> bool:
    """Whether some element of a tensor lies 2^31 or more elements past its first: 32-bit offsets would wrap, so
    the kernels that keep 32-bit offsets for their registers' sake need their WIDE form."""
    for t in tensors:
        # Plain loops: the generator form cost ~5 µs a call for four tensors, on every attention launch.
        # A contiguous tensor spans numel - 1 elements: only views need their strides summed.
        if t is not None and t.numel() > 1 and not (t.numel() <= 2**31 and t.is_contiguous()):
            span = 0
            for n, st in zip(t.shape, t.stride()):  # noqa: B905 (one tensor's shape and strides)
                span += (n - 1) * abs(st)
            if span >= 2**31:
                return True
    return False


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


def aot_signature(fn: Any, types: dict[str, str]) -> dict[str, str]:
    """The Triton signature of ``fn``'s parameters, derived from the kernel itself: constexpr parameters (and any
    named in ``types`` as "constexpr", a specialised stride) are "constexpr"; a parameter named in ``types`` takes
    that type; other ``*_ptr`` parameters take ``types["*_ptr"]``, other ``stride_*`` ones ``types["stride_*"]``
    (default "i32") and the remaining runtime ints ``types["int"]`` (default "i32")."""
    sig = {}
    for name, param in inspect.signature(getattr(fn, "fn", fn)).parameters.items():
        if "constexpr" in str(param.annotation):
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name.endswith("_ptr"):
            sig[name] = types["*_ptr"]
        elif name.startswith("stride_"):
            sig[name] = types.get("stride_*", "i32")
        else:
            sig[name] = types.get("int", "i32")
    return sig


TRITON_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# Row kernels (softmax, norms): a whole row in one tile up to ROW_SINGLE_TILE_MAX_COLS, ROW_LOOP_BLOCK tiles above.
ROW_SINGLE_TILE_MAX_COLS = 4096
ROW_LOOP_BLOCK = 2048
ROW_MIN_BLOCK = 16
_ROW_LOOP_WARPS = 8


def row_tile(n_cols: int, values_per_thread: int) -> tuple[int, int]:
    """(BLOCK, num_warps) holding a whole row in one tile. Warps grow with the tile so that each thread holds at
    most ``values_per_thread`` elements of the row: past that ptxas spilled on sm_80."""
    block = max(ROW_MIN_BLOCK, next_power_of_2(n_cols))
    return block, min(16, max(1, block // (32 * values_per_thread)))


def row_config(n_cols: int, values_per_thread: int) -> tuple[int, int, bool]:
    """(BLOCK, num_warps, SINGLE_TILE) of a one-program-per-row kernel that loops over longer rows."""
    if n_cols <= ROW_SINGLE_TILE_MAX_COLS:
        return (*row_tile(n_cols, values_per_thread), True)
    return ROW_LOOP_BLOCK, _ROW_LOOP_WARPS, False


def config_key(c: Any) -> tuple:
    """A triton.Config's identity (its block sizes, warps and stages)."""
    return tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages


class Autotuned:
    """``kernel[grid](...)`` through Triton's autotuner over ``tiles``, each call pruned to the tiles
    ``allowed(named_args, kwargs)`` returns for its arguments (per feature class, element size, ...).

    Under ``torch.use_deterministic_algorithms(True)`` it launches the first allowed tile instead (the preferred one
    of the shape class): the tile decides the summation order, and a tile picked by timing could differ between
    processes, so results would be reproducible only within one."""

    def __init__(self, kernel: Any, tiles: list, key: list[str], allowed: Any,
                 reset_to_zero: list[str] | None = None) -> None:
        import triton

        configs = {config_key(t.triton()): t.triton() for t in tiles}

        def prune(configs, named_args, **kwargs):
            ok = {config_key(t.triton()) for t in allowed(named_args, kwargs)}
            return [c for c in configs if config_key(c) in ok]

        self.kernel, self.allowed = kernel, allowed
        self.tuner = triton.autotune(list(configs.values()), key=key, reset_to_zero=reset_to_zero,
                                     prune_configs_by={"early_config_prune": prune})(kernel)
        self._arg_names = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)
        # The tuner's own key, read by position: Autotuner.run rebuilds it per call from a dict of every argument (a
        # list-membership test each, ~8 µs for the attention kernels' 50); this finds the config it chose in ~1.
        self._key_positions = [(self._arg_names.index(k), k) for k in key]
        self._chosen: dict[tuple, dict[str, Any]] = {}
        # Where the tensor arguments sit, by argument count (the launchers pass a placeholder tensor for an absent
        # one, so the positions do not change between calls); their dtypes complete the key.
        self._tensor_positions: dict[int, list[int]] = {}

    def clear(self) -> None:
        """Forgets the configs chosen so far: the next call of each key runs the tuner again."""
        self._chosen.clear()
        self.tuner.cache.clear()

    def _launch(self, grid: Any, *args: Any, **kwargs: Any) -> Any:
        # Triton's key: the key arguments' values and every tensor argument's dtype.
        positions = self._tensor_positions.get(len(args))
        if positions is None:
            positions = self._tensor_positions[len(args)] = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        try:
            dtypes = [args[i].dtype for i in positions]
        except AttributeError:  # a tensor position holds something else this time: read them all
            dtypes = [a.dtype if isinstance(a, torch.Tensor) else None for a in args]
        key = (*[args[i] if i < len(args) else kwargs[name] for i, name in self._key_positions], *dtypes)
        chosen = self._chosen.get(key)
        if chosen is None:
            result = self.tuner[grid](*args, **kwargs)
            self._chosen[key] = self.tuner.best_config.all_kwargs()
            return result
        return self.kernel[grid](*args, **kwargs, **chosen)

    def __getitem__(self, grid: Any) -> Any:
        if not torch.are_deterministic_algorithms_enabled():
            return functools.partial(self._launch, grid)

        def launch(*args: Any, **kwargs: Any) -> Any:
            tile = self.allowed(dict(zip(self._arg_names, args, strict=False)), kwargs)[0].triton()
            return self.kernel[grid](*args, **kwargs, **tile.kwargs, num_warps=tile.num_warps,
                                     num_stages=tile.num_stages)

        return launch


def power_of_two_configs(pick, min_cols: int, max_cols: int) -> list:
    """What ``pick(n)`` returns for every power-of-two row length from min_cols to max_cols: a row launcher's
    complete set of configurations when it rounds lengths up to powers of two (for the resource check)."""
    configs, n = [], min_cols
    while n <= max_cols:
        configs.append(pick(n))
        n *= 2
    return configs


# ---- split-KV forward (attention, both kernel backends) ---------------------------------------------------------

# Used when the plain grid has fewer programs than SPLIT_PROGRAMS_PER_SM per SM (an H100's 132 SMs where there is
# no GPU to ask: the CPU paths plan as for one), and each split keeps at least SPLIT_MIN_TILES key tiles.
SPLIT_PROGRAMS_PER_SM = 2
SPLIT_MIN_TILES = 2
H100_SMS = 132


@dataclass(frozen=True)
class SplitPlan:
    splits: int  # programs per query tile along the keys (1: the plain forward)
    split_len: int  # keys per split, a multiple of block_n
    programs: int  # the launch's programs


def split_plan(b: int, h: int, lq: int, lk: int, block_m: int, block_n: int, plain_block_m: int,
               device: torch.device) -> SplitPlan:
    """How an attention forward with ``block_m`` x ``block_n`` tiles splits its keys: not while the plain grid
    (``plain_block_m`` query rows a program) fills the GPU; else into enough splits for SPLIT_PROGRAMS_PER_SM
    programs per SM, each of at least SPLIT_MIN_TILES key tiles."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else H100_SMS
    target = SPLIT_PROGRAMS_PER_SM * sms
    plain = -(-lq // plain_block_m) * b * h
    query_programs = -(-lq // block_m) * b * h
    max_splits = lk // (SPLIT_MIN_TILES * block_n)
    if plain >= target or max_splits < 2 or query_programs == 0:
        return SplitPlan(1, lk, plain)
    splits = min(-(-target // query_programs), max_splits)
    split_len = max(lk // splits // block_n, 1) * block_n  # rounded down: at least `splits` splits
    splits = -(-lk // split_len)
    return SplitPlan(splits, split_len, query_programs * splits)
