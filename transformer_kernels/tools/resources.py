"""Ahead-of-time resource check: compiles every Triton kernel variant the launchers can pick, and
every CUDA C++ kernel instantiation, for real GPU architectures without a GPU, and reads registers,
stack (spill) bytes, shared memory and tensor-core instruction counts from the cubins.

Triton compiles run in a child process with TRITON_INTERPRET unset (an interpreted kernel cannot be
compiled), two at a time. Each result is keyed by a hash of the kernel's source (with every @triton.jit function
it calls), its signature, constexprs, warps, stages, arch and the Triton version, and looked up first in the
committed table kernels/aot_resources.json, then in the user's cache: only variants whose kernels or options
changed are compiled (a cold `make test` would otherwise spend ~15 minutes here). `make check-resources`
recompiles every variant and rewrites the committed table. The CUDA kernels are read from the built `_C` when
setup.py recorded that it was built from csrc/ as it is now, else compiled per file (see `cuda_report`).
`python -m transformer_kernels.tools.resources [--json] [--recompile] [--update-table]` prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from ..families import CUDA_SOURCES, FAMILIES
from . import toolchain

TRITON_ARCHS = (80, 90)
TRITON_KERNEL_MODULES = tuple(FAMILIES)  # kernels/<family>.py, each defining aot_variants()
CUDA_KERNEL_FILES = CUDA_SOURCES
# Opcodes that run on tensor cores: HMMA (sm_80+ mma.sync), HGMMA (sm_90 wgmma), IMMA (int8).
TENSOR_CORE_OPCODES = ("HMMA", "HGMMA", "IMMA", "IGMMA")
CACHE_DIR = Path(os.environ.get("TK_CACHE_DIR", Path.home() / ".cache" / "transformer_kernels"))
# Results of the shipped variants, committed: a variant is compiled only when its key is in neither this table nor
# the user's cache. Written by `make check-resources` (--recompile --update-table).
RESOURCE_TABLE = Path(__file__).resolve().parents[1] / "kernels" / "aot_resources.json"

# Shared memory a block may use, per arch (opt-in maximum, bytes).
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# Shared memory of an SM, per arch (what torch reports as shared_memory_per_multiprocessor; the driver keeps 1 KiB of
# it per resident block).
SMEM_PER_SM = {80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 228 * 1024}
MAX_REGISTERS = 65536  # per SM, all arches here
MAX_THREADS_PER_SM = {80: 2048, 86: 1536, 89: 1536, 90: 2048}


@dataclass(frozen=True)
class KeyLoop:
    """A kernel's key loop read from its SASS: the loop (a backward branch and the code from its target to it) with
    the most tensor-core instructions, the shorter of equals (a peeled loop's interior body, whose tiles need no
    position test); ``nested``: another loop inside it (then ``instructions`` counts that body once, not per trip).
    Triton rows take innermost loops only: the dK/dV pass's query loops sit inside its loop over the GQA group."""

    instructions: int
    tensor_core: int
    nested: bool

    @property
    def per_tensor_core(self) -> float:
        """SASS instructions issued per tensor-core instruction in one pass over the loop (straight-line code; both
        sides of a branch count, so it bounds the hot path from above)."""
        return self.instructions / self.tensor_core


@dataclass
class Resources:
    backend: str  # "triton" | "cuda"
    kernel: str
    variant: str
    arch: int
    threads: int  # per block (0 when the launcher decides at run time: CUDA kernels)
    registers: int
    stack_bytes: int  # local memory frame: where spills go
    shared_bytes: int
    tensor_core_instrs: int
    # CUDA rows: counts of the SASS opcodes of `SASS_OPCODES` (ldmatrix, cp.async, global access widths) in the kernel
    sass_ops: dict[str, int] | None = None
    # CUDA rows of `KEY_LOOP_KERNELS` and Triton rows with a tensor-core loop: the key loop's SASS (`key_loop`)
    key_loop: KeyLoop | None = None
    # Triton rows: the tensor-core instructions that are wgmma (HGMMA, sm_90); the rest are mma.sync (HMMA). CUDA rows
    # keep 0: csrc/ptx.cuh issues mma.sync only.
    wgmma_instrs: int = 0

    @property
    def occupancy(self) -> float | None:
        """Resident warps per SM over the maximum, limited by registers and shared memory."""
        if self.threads <= 0:
            return None
        regs_per_block = max(self.registers, 1) * self.threads
        blocks = MAX_REGISTERS // regs_per_block
        if self.shared_bytes:
            blocks = min(blocks, MAX_SHARED[self.arch] // self.shared_bytes)
        blocks = min(blocks, MAX_THREADS_PER_SM[self.arch] // self.threads, 32)
        return blocks * self.threads / MAX_THREADS_PER_SM[self.arch]


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """cuobjdump --dump-resource-usage → {function: {REG, STACK, SHARED, LOCAL}}."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            out[current] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            current = None
    return out


# ldmatrix and cp.async as SASS names them (LDSM.16.M88.4, LDGSTS.E.BYPASS.128 ...), and global loads/stores by
# width: 16 bytes an access (what the element-wise and norm kernels' packs compile to) and 2 bytes (one fp16/bf16
# element an access). A name with a modifier matches itself followed by anything (LDG.E.128 also LDG.E.128.SYS).
SASS_OPCODES = {"LDSM": ("LDSM",), "LDGSTS": ("LDGSTS",), "LDG.128": ("LDG.E.128",), "STG.128": ("STG.E.128",),
                "GLOBAL.16": ("LDG.E.U16", "LDG.E.S16", "STG.E.U16")}


def count_opcodes(sass: str, opcodes: dict[str, tuple[str, ...]] = SASS_OPCODES) -> dict[str, dict[str, int]]:
    """cuobjdump --dump-sass → {function: {name: number of instructions whose opcode is one of its opcodes}}."""
    counts: dict[str, dict[str, int]] = {}
    sections = re.split(r"^\s*Function : (\S+)", sass, flags=re.M)
    for name, body in zip(sections[1::2], sections[2::2], strict=True):
        # A section runs to the next function's header (the ELF headers between arches hold no instructions). An
        # opcode follows a space (after the address or a predicate) and its modifiers follow a dot: " HMMA." is
        # never part of another name (HFMA2.MMA is not a tensor-core instruction). str.count: a \b regex over the
        # ~900k lines of one arch of _C took 12 s.
        counts[name] = {key: sum(body.count(f" {op}" if "." in op else f" {op}.") for op in ops)
                        for key, ops in opcodes.items()}
    return counts


# The kernels whose key loop the report reads (issue budgets: SASS instructions per tensor-core instruction).
KEY_LOOP_KERNELS = ("attention_fwd_mma_kernel", "attention_dkdv_mma_kernel", "attention_dq_mma_kernel")
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def key_loop(body: str, innermost: bool = False) -> KeyLoop | None:
    """The key loop (`KeyLoop`) of one function's SASS (a `cuobjdump --dump-sass` section), among the loops with no
    loop inside if ``innermost``; None without a loop that holds a tensor-core instruction."""
    code = [(int(a, 16), op.split(".")[0], rest) for a, op, rest in _SASS_LINE.findall(body)]
    loops = []
    for addr, op, rest in code:
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) <= addr:
            loops.append((int(target.group(1), 16), addr))
    best = None
    for start, end in loops:
        ops = [op for a, op, _ in code if start <= a <= end]
        tc = sum(op in TENSOR_CORE_OPCODES for op in ops)
        nested = any(start <= s2 and e2 <= end and (s2, e2) != (start, end) for s2, e2 in loops)
        if nested and innermost:
            continue
        if tc and (best is None or (tc, -len(ops)) > (best.tensor_core, -best.instructions)):
            best = KeyLoop(len(ops), tc, nested)
    return best


def key_loops(sass: str, kernels: tuple[str, ...] = KEY_LOOP_KERNELS, innermost: bool = False) -> dict[str, KeyLoop]:
    """cuobjdump --dump-sass → {function: its key loop (`key_loop`)} for the functions named by ``kernels``."""
    sections = re.split(r"^\s*Function : (\S+)", sass, flags=re.M)
    out = {}
    for name, body in zip(sections[1::2], sections[2::2], strict=True):
        if any(k in name for k in kernels) and (loop := key_loop(body, innermost)) is not None:
            out[name] = loop
    return out


def count_tensor_core(sass: str) -> dict[str, int]:
    """cuobjdump --dump-sass → {function: number of tensor-core instructions}."""
    return {f: c["tc"] for f, c in count_opcodes(sass, {"tc": TENSOR_CORE_OPCODES}).items()}


def _cuobjdump(cubin: Path, opcodes: dict[str, tuple[str, ...]] = SASS_OPCODES,
               loop_kernels: tuple[str, ...] = KEY_LOOP_KERNELS, innermost: bool = False,
               ) -> tuple[dict[str, dict[str, int]], dict[str, int], dict[str, dict[str, int]], dict[str, KeyLoop]]:
    """Per function of a cubin: resource usage, tensor-core instructions, the ``opcodes`` counts, key loops (of the
    functions named by ``loop_kernels``; `key_loop`)."""
    tool = toolchain.triton_tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (ships with triton and with the CUDA toolkit)")
    usage = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([tool, "--dump-sass", cubin], capture_output=True, text=True, check=True).stdout
    return (parse_resource_usage(usage), count_tensor_core(sass), count_opcodes(sass, opcodes),
            key_loops(sass, loop_kernels, innermost))


# ---- Triton ----------------------------------------------------------------------------------


def _variant_key(v, arch: int) -> str:
    import triton

    h = hashlib.sha256()
    h.update(v.fn.cache_key.encode())
    h.update(json.dumps([v.signature, {k: str(x) for k, x in v.constexprs.items()}, v.num_warps, v.num_stages,
                         list(v.aligned), arch, triton.__version__], sort_keys=True).encode())
    return h.hexdigest()


def _compile_triton(job: tuple[str, int, int]) -> dict:
    module_name, index, arch = job
    import importlib

    return compile_variant(importlib.import_module(f"transformer_kernels.kernels.{module_name}").aot_variants()[index], arch)


def compile_variant(v, arch: int) -> dict:
    """Compiles one AotVariant for sm_<arch> (TRITON_INTERPRET must be unset) and reads its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(v.fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in v.aligned}
    src = ASTSource(fn=v.fn, signature=v.signature, constexprs=v.constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": v.num_warps, "num_stages": v.num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        name = compiled.metadata.name
        usage, tc, ops, loops = _cuobjdump(cubin, {"wgmma": ("HGMMA",)}, (name,), innermost=True)
    u = usage[name]
    row = asdict(Resources("triton", v.kernel_name, v.label, arch, v.num_warps * 32, u["REG"],
                           max(u["STACK"], u["LOCAL"]), max(u["SHARED"], compiled.metadata.shared), tc.get(name, 0),
                           key_loop=loops.get(name), wgmma_instrs=ops[name]["wgmma"]))
    del row["sass_ops"]  # counted for CUDA kernels only
    if row["key_loop"] is None:
        del row["key_loop"]
    return row


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def write_table(results: dict[str, dict], path: Path = RESOURCE_TABLE) -> None:
    """The committed table: one entry per line, sorted, so a kernel change shows as the lines it changed."""
    lines = [f"{json.dumps(k)}: {json.dumps(results[k], sort_keys=True)}" for k in sorted(results)]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")


def _triton_report_in_process(modules: Iterable[str], jobs: int, recompile: bool = False,
                              update_table: bool = False) -> list[dict]:
    import importlib
    from concurrent.futures import ProcessPoolExecutor

    modules = list(modules)
    cache_file = CACHE_DIR / "triton_resources.json"
    known = {} if recompile else {**_read_json(RESOURCE_TABLE), **_read_json(cache_file)}
    work, keys, results = [], [], {}
    for module_name in modules:
        variants = importlib.import_module(f"transformer_kernels.kernels.{module_name}").aot_variants()
        for i, v in enumerate(variants):
            for arch in TRITON_ARCHS:
                key = _variant_key(v, arch)
                if key in known:
                    results[key] = known[key]
                else:
                    work.append(((module_name, i, arch), key))
                keys.append(key)
    if work:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            compiled = pool.map(_compile_triton, [job for job, _ in work], chunksize=4)
            results.update(zip((key for _, key in work), compiled, strict=True))
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps({**_read_json(cache_file), **{key: results[key] for _, key in work}}))
    print(f"resources: compiled {len(work)} of {len(keys)} Triton variant-arch pairs, the rest read from "
          f"{RESOURCE_TABLE.name} or the cache", file=sys.stderr)
    if update_table:
        # A partial run keeps the other modules' entries; a full one drops entries no variant has any more.
        kept = {} if set(modules) == set(TRITON_KERNEL_MODULES) else _read_json(RESOURCE_TABLE)
        write_table({**kept, **{k: results[k] for k in keys}})
    return [results[k] for k in keys]


def triton_report(modules: Iterable[str] = TRITON_KERNEL_MODULES, jobs: int | None = None,
                  recompile: bool = False, update_table: bool = False) -> list[Resources]:
    """Resources of every Triton variant on every arch of TRITON_ARCHS (compiled in a child process where the
    committed table and the cache lack them; all of them with ``recompile``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, "-m", "transformer_kernels.tools.resources", "--triton-only", "--json",
           "--jobs", str(jobs or os.cpu_count() or 1), "--modules", ",".join(modules)]
    cmd += ["--recompile"] * recompile + ["--update-table"] * update_table
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"Triton AOT compile failed:\n{proc.stderr[-4000:]}")
    if proc.stderr.strip():  # the child's summary: how many variants it compiled
        print(proc.stderr.strip().splitlines()[-1], file=sys.stderr)
    return [_row_from_dict(r) for r in json.loads(proc.stdout)]


# ---- CUDA C++ --------------------------------------------------------------------------------


def _demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return dict(zip(names, out.splitlines(), strict=False))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


def _short_kernel_name(demangled: str) -> tuple[str, str]:
    """'void tk::(anonymous namespace)::softmax_fwd_warp<__half, 1>(tk::SoftmaxFwdArgs)' →
    ('softmax_fwd_warp', '__half, 1')."""
    m = re.search(r"(\w+)<(.*)>\(", demangled)
    if m:
        return m.group(1), m.group(2)
    m = re.search(r"(\w+)\(", demangled)
    return (m.group(1), "") if m else (demangled, "")


def _cuda_file_report(nvcc: Path, csrc: Path, f: str, arch: str, tmp: str) -> list[Resources]:
    cubin = Path(tmp) / f"{f}.sm_{arch}.cubin"
    cmd = [nvcc, *toolchain.NVCC_FLAGS, f"-arch=sm_{arch}", "-cubin", f"-I{csrc}", str(csrc / f), "-o", cubin]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {f} for sm_{arch}:\n{proc.stderr[-4000:]}")
    return _rows(*_cuobjdump(cubin), arch)


def _rows(usage: dict[str, dict[str, int]], tc: dict[str, int], ops: dict[str, dict[str, int]],
          loops: dict[str, KeyLoop], arch: str) -> list[Resources]:
    names = _demangle(list(usage))
    rows = []
    for mangled, u in sorted(usage.items(), key=lambda kv: names[kv[0]]):
        kernel, variant = _short_kernel_name(names[mangled])
        # SHARED is the static shared memory; the attention kernels add the dynamic tiles they launch with.
        rows.append(Resources("cuda", kernel, variant, int(arch), 0, u["REG"], max(u["STACK"], u["LOCAL"]),
                              u["SHARED"] + _dynamic_shared(kernel, variant), tc.get(mangled, 0),
                              ops.get(mangled), loops.get(mangled)))
    return rows


# The attention kernels' dynamic shared memory, by which pass's layout they launch with (csrc/attention_*.cu), and
# the torch dtype names of the element types their instantiations name.
ATTENTION_SMEM_PASS = {"attention_fwd_mma_kernel": "fwd", "attention_fwd_fma_kernel": "fwd",
                       "attention_dkdv_mma_kernel": "dkdv", "attention_dkdv_fma_kernel": "dkdv",
                       "attention_dq_mma_kernel": "dq", "attention_dq_fma_kernel": "dq"}
CUDA_ELEMENT_TYPES = {"float": "float32", "__half": "float16", "__nv_bfloat16": "bfloat16"}


def _dynamic_shared(kernel: str, variant: str) -> int:
    """Dynamic shared memory of a CUDA kernel instantiation ('__half, 128, false'), as its launcher passes it; the
    fp16/bf16 (mma) kernels' fifth template argument is their narrow tile."""
    if kernel not in ATTENTION_SMEM_PASS:
        return 0
    from .. import _ext

    host = _ext.load("_C_host")
    element, d, *rest = variant.split(", ")
    narrow = kernel in KEY_LOOP_KERNELS and rest[-1] == "true"
    return host.attention_smem(ATTENTION_SMEM_PASS[kernel], host.dtype_codes[CUDA_ELEMENT_TYPES[element]], int(d),
                               narrow)


def _built_extension() -> tuple[Path, list[str], str] | None:
    """The built `_C`, its arches and its sha256, when setup.py's record says that very module was compiled from
    csrc/ as it is now (same flags, arches, nvcc); else None."""
    from .. import _ext

    package = Path(_ext.__file__).parent
    record, built = package / toolchain.CUDA_BUILD_RECORD, sorted(package.glob("_C.*.so"))
    if not record.exists() or not built:
        return None
    info = json.loads(record.read_text())
    current = (info.get("digest") == toolchain.cuda_build_digest(info.get("archs", []))
               and info.get("module_sha256") == hashlib.sha256(built[0].read_bytes()).hexdigest())
    return (built[0], info["archs"], info["module_sha256"]) if current else None


def _extension_arch_report(so: Path, arch: str) -> list[Resources]:
    """Every kernel of the built extension's sm_``arch`` code: what `_cuda_file_report` reads, for all files."""
    tool = toolchain.triton_tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (ships with triton and with the CUDA toolkit)")
    usage = parse_resource_usage(subprocess.run([tool, "-arch", f"sm_{arch}", "--dump-resource-usage", so],
                                                capture_output=True, text=True, check=True).stdout)
    sass = subprocess.run([tool, "-arch", f"sm_{arch}", "--dump-sass", so], capture_output=True, text=True,
                          check=True).stdout
    return _rows(usage, count_tensor_core(sass), count_opcodes(sass), key_loops(sass), arch)


# Reports already made in this process, by (files, archs, build digest): the resource test and the static bench
# report ask for the same one.
_cuda_reports: dict[tuple, list[Resources]] = {}
CUDA_CACHE_FILE = CACHE_DIR / "cuda_resources.json"


@contextlib.contextmanager
def _cuda_cache_lock():
    """An exclusive lock on the CUDA report cache across processes (where fcntl exists; else none)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CUDA_CACHE_FILE.with_suffix(".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _row_from_dict(d: dict) -> Resources:
    return Resources(**{**d, "key_loop": KeyLoop(**d["key_loop"]) if d.get("key_loop") else None})


def _cuda_cache_key(module_sha256: str, archs: tuple[str, ...]) -> str:
    return f"{module_sha256}:{','.join(archs)}"


def _cached_cuda_rows(module_sha256: str, archs: tuple[str, ...]) -> list[Resources] | None:
    rows = _read_json(CUDA_CACHE_FILE).get(_cuda_cache_key(module_sha256, archs))
    return None if rows is None else [_row_from_dict(r) for r in rows]


def _cache_cuda_rows(module_sha256: str, archs: tuple[str, ...], rows: list[Resources]) -> None:
    # One module's rows (a rebuilt _C replaces them), written whole and renamed into place: two processes may race.
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = CUDA_CACHE_FILE.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({_cuda_cache_key(module_sha256, archs): [asdict(r) for r in rows]}))
    os.replace(tmp, CUDA_CACHE_FILE)


def cuda_report(files: Iterable[str] = CUDA_KERNEL_FILES, archs: Iterable[str] | None = None,
                jobs: int = os.cpu_count() or 1, from_extension: bool = True) -> list[Resources]:
    """Registers, spills, shared memory and SASS counts of every instantiated CUDA kernel, per arch. Read from the
    built `_C` when it is current and holds what is asked for (every file, arches it was built for): it is the
    same device code (same sources and nvcc flags, recorded by setup.py), and reading it takes seconds where
    compiling again takes minutes on two cores. Otherwise (or ``from_extension=False``) nvcc compiles each file
    to a cubin per arch, in parallel."""
    files, arch_list = tuple(files), tuple(archs or toolchain.cuda_archs())
    built = _built_extension() if from_extension and set(files) == set(CUDA_KERNEL_FILES) else None
    so = built[0] if built is not None and set(arch_list) <= set(built[1]) else None
    key = (files, arch_list, so is not None, toolchain.cuda_build_digest(list(arch_list)))
    if key not in _cuda_reports:
        if so is not None:
            # Disassembling _C takes ~15 s per arch (~180 MB of SASS each): the rows of that very module (its
            # sha256) are kept on disk for the next process that asks (the resource test and the static bench
            # report run in different test workers).
            with _cuda_cache_lock():  # a second process waits for the first's rows instead of sharing its cores
                cached = _cached_cuda_rows(built[2], arch_list)
                if cached is None:
                    with ThreadPoolExecutor(max(jobs, 1)) as pool:
                        cached = [r for part in pool.map(lambda arch: _extension_arch_report(so, arch), arch_list)
                                  for r in part]
                    _cache_cuda_rows(built[2], arch_list, cached)
            parts = [cached]
        else:
            nvcc = toolchain.nvcc()
            if nvcc is None:
                raise RuntimeError("nvcc not found: set CUDA_HOME to a CUDA toolkit")
            csrc = toolchain.csrc_dir()
            jobs_list = [(f, arch) for f in files for arch in arch_list]
            with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max(jobs, 1)) as pool:
                parts = list(pool.map(lambda fa: _cuda_file_report(nvcc, csrc, fa[0], fa[1], tmp), jobs_list))
        _cuda_reports[key] = [r for part in parts for r in part]
    return list(_cuda_reports[key])


def format_table(rows: list[Resources]) -> str:
    """One line per row; ``loop/TC``: the key loop's SASS instructions per tensor-core instruction (`KeyLoop`)."""
    head = (f"{'backend':7} {'kernel':26} {'arch':5} {'regs':>4} {'spill':>5} {'smem':>6} {'TC':>4} {'occ':>5} "
            f"{'loop/TC':>7}  variant")
    lines = [head, "-" * len(head)]
    for r in rows:
        occ = "-" if r.occupancy is None else f"{r.occupancy:.2f}"
        loop = "-" if r.key_loop is None else f"{r.key_loop.per_tensor_core:.1f}"
        lines.append(f"{r.backend:7} {r.kernel:26} sm_{r.arch:<2} {r.registers:4d} {r.stack_bytes:5d} "
                     f"{r.shared_bytes:6d} {r.tensor_core_instrs:4d} {occ:>5} {loop:>7}  {r.variant}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--triton-only", action="store_true")
    parser.add_argument("--cuda-only", action="store_true")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--modules", default=",".join(TRITON_KERNEL_MODULES))
    parser.add_argument("--recompile", action="store_true", help="ignore the committed table and the cache")
    parser.add_argument("--update-table", action="store_true", help=f"rewrite {RESOURCE_TABLE.name}")
    parser.add_argument("--check", action="store_true", help="exit 1 when a variant spills")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    rows: list[dict] = []
    if not args.cuda_only:
        modules = args.modules.split(",")
        if os.environ.get("TRITON_INTERPRET") == "1":
            rows += [asdict(r) for r in triton_report(modules, args.jobs, args.recompile, args.update_table)]
        else:
            rows += _triton_report_in_process(modules, args.jobs, args.recompile, args.update_table)
    if not args.triton_only:
        rows += [asdict(r) for r in cuda_report()]
    if args.json:
        print(json.dumps(rows))
    else:
        print(format_table([_row_from_dict(r) for r in rows]))
    spills = sum(1 for r in rows if r["stack_bytes"])
    if args.check:
        print(f"{len(rows)} kernel variants, {spills} with spills", file=sys.stderr)
    return 1 if args.check and spills else 0


if __name__ == "__main__":
    sys.exit(main())
