"""Build: `_C_host` (host C++ compiler + csrc/host/simt.h) always, `_C` (nvcc) when a CUDA toolkit is found.

Both are compiled through ninja for parallel compiles. Never imports torch.
Environment: TK_CUDA_ARCHS (default "80;86;89;90"), TK_SKIP_CUDA_BUILD=1, CUDA_HOME, MAX_JOBS, TK_HOST_CXXFLAGS
(appended to the _C_host compile and, unless TK_HOST_LDFLAGS says otherwise, link: `make coverage` and the sanitizer
tests build instrumented copies in build/).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _load_toolchain():
    """transformer_kernels/tools/toolchain.py, loaded as a file: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("_tk_toolchain", ROOT / "transformer_kernels" / "tools" / "toolchain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


toolchain = _load_toolchain()


def ninja_escape(path: Path | str) -> str:
    return str(path).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


class NinjaBuildExt(build_ext):
    """Writes one build.ninja per extension and runs it; sources ending in .cu go to nvcc for _C and
    to the host compiler (as C++) for _C_host."""

    def build_extensions(self) -> None:
        import pybind11  # build requirement, available in the build environment

        self.cuda_home = toolchain.cuda_home()
        self.py_includes = [sysconfig.get_paths()["include"], pybind11.get_include()]
        nvcc = toolchain.nvcc()
        # Each skip is one line and never fails the install: the Triton and torch backends need neither module.
        kept = []
        for ext in self.extensions:
            if ext.name.endswith("._C"):
                if os.environ.get("TK_SKIP_CUDA_BUILD") == "1":
                    print("transformer-kernels: TK_SKIP_CUDA_BUILD=1, not building the CUDA extension _C", flush=True)
                    continue
                if nvcc is None:
                    print("transformer-kernels: no CUDA toolkit (nvcc) found, not building the CUDA extension _C "
                          "(the cuda backend on GPUs); set CUDA_HOME to build it", flush=True)
                    continue
                ext.cuda_include = self.cuda_home / "include"
            else:
                ext.cuda_include = toolchain.host_cuda_include()
                compiler = shutil.which(os.environ.get("CXX", "c++").split()[0])
                if ext.cuda_include is None or compiler is None:
                    why = ("no C++ compiler found" if compiler is None else
                           "no CUDA toolkit headers (cuda_fp16.h, nv/target) found")
                    print(f"transformer-kernels: {why}, not building _C_host (the CUDA kernels simulated on the CPU, "
                          "a verification tool); the Triton and torch backends still work", flush=True)
                    continue
            kept.append(ext)
        self.extensions = kept
        super().build_extensions()

    def build_extension(self, ext: Extension) -> None:
        is_cuda = ext.name.endswith("._C")
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name.split(".")[-1]
        build_dir.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        cuda_inc = ext.cuda_include
        module = ext.name.split(".")[-1]
        includes = " ".join(f"-I{p}" for p in [CSRC, cuda_inc, *self.py_includes])
        cxx = os.environ.get("CXX", "c++")
        opt = "-O2" if not is_cuda else "-O3"
        cxxflags = f"-std=c++17 {opt} -fPIC -fvisibility=hidden -DTK_MODULE_NAME={module} {includes}"
        lines = [f"cxxflags = {cxxflags}", f"cxx = {cxx}"]
        if is_cuda:
            archs = toolchain.cuda_archs()
            gencode = " ".join(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs)
            # PTX of the newest arch too, so newer GPUs can JIT it.
            gencode += f" -gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"
            lines += [
                f"nvcc = {self.cuda_home / 'bin' / 'nvcc'}",
                f"nvccflags = {' '.join(toolchain.NVCC_FLAGS)} -Xcompiler -fPIC -Xcompiler -fvisibility=hidden "
                f"-DTK_MODULE_NAME={module} {includes} {gencode} -Xptxas -warn-spills",
                "rule cu\n  command = $nvcc $nvccflags -MD -MF $out.d -c $in -o $out\n  depfile = $out.d\n  deps = gcc",
            ]
            ldflags = f"-shared -L{self.cuda_home / 'lib64'} -lcudart_static -ldl -lrt -lpthread"
        else:
            lines[0] += " -DTK_HOST_SIM"
            # The host build compiles .cu files as C++; simt.h supplies the CUDA built-ins.
            lines.append("rule cu\n  command = $cxx -x c++ $cxxflags -MD -MF $out.d -c $in -o $out\n"
                         "  depfile = $out.d\n  deps = gcc")
            ldflags = "-shared"
            extra = os.environ.get("TK_HOST_CXXFLAGS", "")  # e.g. gcov or sanitizer instrumentation
            lines[0] += f" {extra}"
            ldflags += " " + os.environ.get("TK_HOST_LDFLAGS", extra)
        lines.append("rule cc\n  command = $cxx $cxxflags -MD -MF $out.d -c $in -o $out\n  depfile = $out.d\n  deps = gcc")
        lines.append(f"rule link\n  command = $cxx $in -o $out {ldflags}")
        objs = []
        for src in ext.sources:
            src_path = (ROOT / src).resolve()
            obj = build_dir / (src.replace("/", "_") + ".o")
            rule = "cu" if src.endswith(".cu") else "cc"
            lines.append(f"build {ninja_escape(obj)}: {rule} {ninja_escape(src_path)}")
            objs.append(ninja_escape(obj))
        lines.append(f"build {ninja_escape(out)}: link {' '.join(objs)}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        cmd = [find_ninja(), "-C", str(build_dir), "-j", jobs]
        print(f"transformer-kernels: building {ext.name} with ninja", flush=True)
        subprocess.run(cmd, check=True)
        if is_cuda:
            # In the checkout's package folder (an editable install builds in a temporary folder, then copies the
            # module there), naming the module by its hash: a record never vouches for another build.
            record = {"archs": archs, "digest": toolchain.cuda_build_digest(archs),
                      "module_sha256": hashlib.sha256(out.read_bytes()).hexdigest()}
            (ROOT / "transformer_kernels" / toolchain.CUDA_BUILD_RECORD).write_text(json.dumps(record) + "\n")


def find_ninja() -> str:
    exe = shutil.which("ninja")
    if exe:
        return exe
    import ninja  # build requirement: the PyPI package ships the binary

    return str(Path(ninja.BIN_DIR) / "ninja")


KERNEL_SOURCES = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu"))
HOST_ONLY_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (CSRC / "host").glob("*.cu"))

setup(
    ext_modules=[
        Extension("transformer_kernels._C_host", ["csrc/bindings.cpp", *KERNEL_SOURCES, *HOST_ONLY_SOURCES]),
        Extension("transformer_kernels._C", ["csrc/bindings.cpp", *KERNEL_SOURCES]),
    ],
    cmdclass={"build_ext": NinjaBuildExt},
)
