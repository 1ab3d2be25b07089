"""Installing where users are: no CUDA toolkit (torch's wheels bring the CUDA runtime, not nvcc or the headers). The
build skips what it cannot build with one line each and never fails; the package then says which backends run."""

import os
import subprocess
import sys
from pathlib import Path

from transformer_kernels.tools import toolchain

ROOT = Path(__file__).resolve().parents[1]


def test_the_knob_hides_the_toolkit_as_a_machine_without_one():
    env = {**os.environ, "TK_NO_CUDA_TOOLKIT": "1"}
    code = ("from transformer_kernels.tools import toolchain as t; "
            "print(t.cuda_home(), t.nvcc(), t.host_cuda_include(), t.compute_sanitizer() is None)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    # compute_sanitizer may still come from PATH; the toolkit lookups all say "none".
    assert out.split()[:3] == ["None", "None", "None"], out


def test_a_build_without_a_toolkit_skips_both_extensions_and_succeeds(tmp_path):
    env = {**os.environ, "TK_NO_CUDA_TOOLKIT": "1"}
    env.pop("TK_SKIP_CUDA_BUILD", None)
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                             "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("transformer-kernels:")]
    assert any("not building _C_host" in line and "CUDA toolkit headers" in line for line in lines), lines
    assert any("no CUDA toolkit (nvcc) found, not building the CUDA extension _C" in line for line in lines), lines
    assert len(lines) == 2, lines
    assert not list((tmp_path / "lib").rglob("*.so")) if (tmp_path / "lib").exists() else True


def test_without_the_builds_info_says_why_and_auto_runs(tmp_path):
    # Neither C++ module importable (as after the build above): _C_host pointed at a file that is not there.
    env = {**os.environ, "TK_HOST_EXTENSION": str(tmp_path / "absent.so")}
    info = subprocess.run([sys.executable, "-m", "transformer_kernels", "info"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert info.returncode == 0, info.stderr
    cuda_row = next(line for line in info.stdout.splitlines() if line.startswith("backend cuda"))
    assert "unavailable" in cuda_row and "_C_host" in cuda_row, info.stdout
    code = ("import torch, transformer_kernels as tk; q = torch.randn(1, 2, 8, 16); "
            "ref = torch.nn.functional.scaled_dot_product_attention(q, q, q); "
            "torch.testing.assert_close(tk.ops.attention(q, q, q), ref); "
            "torch.testing.assert_close(tk.ops.attention(q, q, q, backend='triton'), ref); print('ok')")
    run = subprocess.run([sys.executable, "-c", code], env={**env, "TRITON_INTERPRET": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.split() == ["ok"], run.stderr
    assert toolchain.REPO_ROOT == ROOT
