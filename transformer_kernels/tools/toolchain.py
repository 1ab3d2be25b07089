"""Where the CUDA toolkit and Triton's bundled NVIDIA tools are. Imports neither torch nor triton, so
setup.py loads this file directly to find the toolkit it builds with."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

DEFAULT_CUDA_ARCHS = "80;86;89;90"
REPO_ROOT = Path(__file__).resolve().parents[2]


def cuda_home() -> Path | None:
    """The CUDA toolkit root (holds include/cuda_fp16.h): CUDA_HOME/CUDA_PATH, the nvcc on PATH
    (following wrapper scripts' real location), or /usr/local/cuda. TK_NO_CUDA_TOOLKIT=1 answers None, as on a
    machine without one: every caller (the build, info, the resource report) then takes that machine's path."""
    if os.environ.get("TK_NO_CUDA_TOOLKIT") == "1":
        return None
    candidates = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc_on_path = shutil.which("nvcc")
    if nvcc_on_path:
        candidates += [Path(nvcc_on_path).parent.parent, Path(nvcc_on_path).resolve().parent.parent]
    candidates.append(Path("/usr/local/cuda"))
    for path in candidates:
        if (path / "include" / "cuda_fp16.h").exists():
            return path
    return None


def host_cuda_include() -> Path | None:
    """The headers the simulator build (`_C_host`) needs, or None (it is then skipped): cuda_fp16.h and cuda_bf16.h
    give the half/bfloat16 host types and include CCCL's nv/target, so only a toolkit has them whole (torch's wheels
    bring none; triton's partial copy lacks nv/target)."""
    home = cuda_home()
    include = home / "include" if home else None
    needed = ("cuda_fp16.h", "cuda_bf16.h", "vector_types.h", "nv/target")
    return include if include and all((include / h).exists() for h in needed) else None


def nvcc() -> Path | None:
    home = cuda_home()
    exe = home / "bin" / "nvcc" if home else None
    return exe if exe and exe.exists() else None


def compute_sanitizer() -> Path | None:
    """The toolkit's compute-sanitizer (bin/, or its own folder in older toolkits), else the one on PATH."""
    home = cuda_home()
    for exe in ([home / "bin" / "compute-sanitizer", home / "compute-sanitizer" / "compute-sanitizer"] if home else []):
        if exe.exists():
            return exe
    found = shutil.which("compute-sanitizer")
    return Path(found) if found else None


def cuda_archs() -> list[str]:
    """The arches the CUDA build targets: TK_CUDA_ARCHS, default 80;86;89;90."""
    return [a.strip() for a in os.environ.get("TK_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).split(";") if a.strip()]


def triton_tool(name: str) -> Path | None:
    """A binary Triton ships for NVIDIA (cuobjdump, ptxas, nvdisasm), else the toolkit's."""
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        exe = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
        if exe.exists():
            return exe
    home = cuda_home()
    exe = home / "bin" / name if home else None
    return exe if exe and exe.exists() else None


def csrc_dir() -> Path:
    """The CUDA C++ sources (an editable install or a source checkout)."""
    return REPO_ROOT / "csrc"

# Flags every nvcc compile of csrc/ uses: the extension build and the resource report alike.
NVCC_FLAGS = ("-std=c++17", "-O3")
# Written into the checkout's package folder by setup.py: what the `_C` it built was compiled from
# (`cuda_build_digest`) and the module's hash, so the resource report can read the kernels from that module instead
# of compiling them all again (minutes of nvcc on two cores).
CUDA_BUILD_RECORD = "_C.build.json"


def cuda_build_digest(archs: list[str]) -> str:
    """A digest of everything the device code of `_C` depends on: every file under csrc/ but the simulator's
    (csrc/host/, which only `_C_host` compiles), the nvcc flags, the arches and the nvcc it was built with."""
    import hashlib

    h = hashlib.sha256(" ".join([*NVCC_FLAGS, *archs, str(nvcc())]).encode())
    csrc = csrc_dir()
    for path in sorted(p for p in csrc.rglob("*") if p.is_file() and p.relative_to(csrc).parts[0] != "host"):
        h.update(str(path.relative_to(csrc)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def instrumented_host_extension(name: str, cxxflags: str, ldflags: str | None = None) -> tuple[Path, Path]:
    """A copy of `_C_host` built with extra compiler flags (gcov, a sanitizer) and link flags (default: the same)
    into build/<name>, for loading through TK_HOST_EXTENSION; returns (the extension, the object directory). Ninja
    rebuilds only what changed."""
    import subprocess
    import sys

    lib, tmp = REPO_ROOT / "build" / name / "lib", REPO_ROOT / "build" / name / "tmp"
    env = {**os.environ, "TK_HOST_CXXFLAGS": cxxflags, "TK_HOST_LDFLAGS": cxxflags if ldflags is None else ldflags,
           "TK_SKIP_CUDA_BUILD": "1"}
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(lib), "--build-temp", str(tmp)],
                   cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    return next(lib.rglob("_C_host*.so")), tmp


def host_runtime_library(name: str) -> Path | None:
    """The host compiler's runtime library ``name`` (e.g. libasan.so), None when it has none."""
    import subprocess

    try:
        out = subprocess.run([os.environ.get("CXX", "c++"), f"-print-file-name={name}"], capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return Path(out) if os.path.isabs(out) and Path(out).exists() else None
