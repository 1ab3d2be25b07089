"""`make coverage`: which kernel lines the test suite executes.

Triton: coverage.py over kernels/*.py while the suite runs; the interpreter executes each @triton.jit body as
Python with the file's own line numbers, so the kernel bodies are measured like any function. CUDA C++: a copy of
`_C_host` built with gcov instrumentation (into build/coverage) is loaded instead of the
installed one (TK_HOST_EXTENSION), and gcovr reads csrc/ from its counters. Reports go to build/coverage; the last
line printed is ``kernel line coverage: triton X%, cuda Y%``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

from . import toolchain

ROOT = toolchain.REPO_ROOT
OUT = ROOT / "build" / "coverage"


def _percent(report: str) -> float:
    m = re.search(r"^TOTAL\s.*?(\d+(?:\.\d+)?)%\s*$", report, re.M)
    if not m:
        raise RuntimeError(f"no TOTAL line in the coverage report:\n{report[-2000:]}")
    return float(m.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (default: the whole suite)")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    so, objects = toolchain.instrumented_host_extension("coverage", "-O0 --coverage")
    for stale in objects.rglob("*.gcda"):  # counters of an earlier run
        stale.unlink()
    data = OUT / ".coverage"
    env = {**os.environ, "TK_HOST_EXTENSION": str(so)}
    tests = subprocess.run([sys.executable, "-m", "coverage", "run", f"--data-file={data}", f"--source={ROOT / 'kernels'}",
                            "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.pytest_args], cwd=ROOT, env=env)
    triton = subprocess.run([sys.executable, "-m", "coverage", "report", "-m", f"--data-file={data}"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    (OUT / "triton.txt").write_text(triton)
    gcovr = [sys.executable, "-m", "gcovr", "--root", str(ROOT), "--filter", str(ROOT / "csrc"), str(objects)]
    cuda = subprocess.run(gcovr, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    (OUT / "cuda.txt").write_text(cuda)
    print(triton, cuda, sep="\n")
    print(f"reports: {OUT / 'triton.txt'}, {OUT / 'cuda.txt'}")
    print(f"kernel line coverage: triton {_percent(triton):.1f}%, cuda {_percent(cuda):.1f}%")
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
