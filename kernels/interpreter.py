"""Triton's interpreter (TRITON_INTERPRET=1) without its per-call re-patching of `triton.language`.

The interpreter swaps `triton.language`'s builtins for NumPy versions when a kernel launches (`_patch_lang`, undone
when the launch ends) and again at every call of a @triton.jit helper from inside it, in every program: each of those
calls walks the members of `tl`, `tl.tensor` and `tl.math` with `inspect.getmembers` (~1 ms) to patch builtins the
launch has already patched. Our kernels call helpers in every program (the attention passes several per key tile),
so a Hugging Face training step under the interpreter spent 45% of its time there (BART, 1 layer, 2 steps:
7.5 s → 4.1 s without it, cProfile). Only interpreted runs (CPU tests, `make check`) change; a GPU launch never
reaches this code.

What is skipped is exactly a repeat: a helper's patch is skipped when the launch that is running has already patched
every `triton.language` module the helper's globals hold (the same modules, the same NumPy builtins). A helper that
holds one the launch has not patched (`tl.core`, which `tl.cdiv` and the other `triton.language.standard` functions
see) is patched as before, and like before that patch outlives the launch.
"""

from __future__ import annotations

import inspect
from typing import Any

import triton.language as tl

_LANGUAGE_MODULES = (tl, tl.core)


# By (function, number of its module's globals): the interpreter adds its own globals (`tl` among them) to a module's
# when it first rewrites one of its functions, so a module's answer can grow once.
_LANGUAGES_OF: dict[tuple[Any, int], frozenset[int]] = {}


def _languages(fn: Any) -> frozenset[int]:
    """The ids of the `triton.language` modules ``fn``'s globals hold: what `_patch_lang` patches for it."""
    key = (fn, len(fn.__globals__))
    langs = _LANGUAGES_OF.get(key)
    if langs is None:
        langs = _LANGUAGES_OF[key] = frozenset(id(v) for v in fn.__globals__.values()
                                               if inspect.ismodule(v) and v in _LANGUAGE_MODULES)
    return langs


class _NothingToRestore:
    def restore(self) -> None:
        pass


_NOTHING_TO_RESTORE = _NothingToRestore()


def skip_repeated_patching() -> bool:
    """Makes the interpreter patch `triton.language` once per module per launch; True if it now does (False: this
    triton's interpreter lacks the two functions, left as it is). Idempotent."""
    from triton.runtime import interpreter

    patch, executor = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "GridExecutor", None)
    if patch is None or executor is None:
        return False
    if getattr(patch, "_tk_once_per_launch", False):
        return True
    launch = executor.__call__
    patched: list[set[int]] = []  # per running launch (innermost last): the modules patched since it began

    def patch_once(fn):
        langs = _languages(fn)
        if patched and langs <= patched[-1]:
            return _NOTHING_TO_RESTORE
        scope = patch(fn)
        if patched:
            patched[-1] |= langs
        return scope

    def run_launch(self, *args, **kwargs):
        patched.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()

    patch_once._tk_once_per_launch = True
    interpreter._patch_lang = patch_once
    executor.__call__ = run_launch
    return True
