"""kernels/interpreter.py: Triton's interpreter patches `triton.language` once per launch and module, not at every
helper call in every program, and still undoes the launch's patch when the launch ends."""

import pytest
import torch

from transformer_kernels.kernels import config

pytestmark = pytest.mark.skipif(not config.is_interpreted(), reason="Triton runs compiled here, not interpreted")

import triton  # noqa: E402 (after the skip: TRITON_INTERPRET is set by conftest before triton is imported)
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from transformer_kernels.kernels import common  # noqa: E402, F401 (importing the kernels' helpers installs it)
from transformer_kernels.kernels.interpreter import _languages, skip_repeated_patching  # noqa: E402


@triton.jit
def _blocks(n, BLOCK: tl.constexpr):
    return tl.cdiv(n, BLOCK)  # triton.language.standard: its globals hold tl.core, which the launch does not patch


@triton.jit
def _scaled(x, s):
    return x * s


@triton.jit
def _scale_by_block_count(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < n
    x = tl.load(x_ptr + cols, mask=keep)
    tl.store(y_ptr + cols, _scaled(x, _blocks(n, BLOCK).to(tl.float32)), mask=keep)


def test_language_is_patched_once_per_launch_and_module_and_restored_after(monkeypatch):
    assert skip_repeated_patching() and skip_repeated_patching()  # installed by the kernels' import; idempotent
    patched = []
    core_patch = interpreter._patch_lang_core  # one call per triton.language module a patch covers
    monkeypatch.setattr(interpreter, "_patch_lang_core", lambda lang, scope: (patched.append(lang), core_patch(lang, scope)))
    x, y = torch.randn(30), torch.empty(30)
    # The launch patches tl, tl.cdiv's first call the modules its globals hold (tl.core, and tl again once the
    # interpreter has added its own globals to the module's): once each per launch. Unpatched, each of the 4 programs
    # would repeat _scaled's, _blocks' and tl.cdiv's too (13 to 17 patches).
    for _ in range(2):  # each launch patches what it uses again
        patched.clear()
        _scale_by_block_count[(4,)](x, y, 30, BLOCK=8)
        torch.testing.assert_close(y, x * 4, rtol=0, atol=0)
        helpers = [id(m) for m in patched[1:]]
        assert patched[0] is tl and id(tl.core) in helpers, patched
        assert len(set(helpers)) == len(helpers) and set(helpers) <= _languages(tl.cdiv.fn), patched
        assert tl.core.is_builtin(tl.load) and tl.core.is_builtin(tl.tensor.__add__)  # the launch's patch is undone
