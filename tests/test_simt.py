"""The CUDA host simulator (csrc/host/simt.h) and the proof that the tests can see a missing barrier."""

import ctypes
import importlib.util
import shutil
import subprocess
import sys
import sysconfig

import pybind11
import pytest
import torch

import transformer_kernels as tk
from transformer_kernels import _ext, reference
from transformer_kernels.tools import toolchain

C = _ext.load("_C_host")
DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}


def test_barrier_makes_shared_memory_exchange_correct():
    x = torch.arange(3 * 256, dtype=torch.float32)
    y = torch.empty_like(x)
    for seed in range(3):
        C.simt_seed(seed)
        C.selftest.reverse_static(x.data_ptr(), y.data_ptr(), 3, 256, True)
        assert torch.equal(y.view(3, 256), x.view(3, 256).flip(1))


def test_missing_barrier_gives_a_wrong_answer_for_some_seed():
    x = torch.arange(2 * 64, dtype=torch.float32)
    y = torch.empty_like(x)
    wrong = 0
    for seed in range(8):
        C.simt_seed(seed)
        C.selftest.reverse_static(x.data_ptr(), y.data_ptr(), 2, 64, False)
        wrong += not torch.equal(y.view(2, 64), x.view(2, 64).flip(1))
    assert wrong > 0


def test_dynamic_shared_memory():
    x = torch.randn(4 * 96)
    y = torch.empty_like(x)
    C.selftest.reverse_dynamic(x.data_ptr(), y.data_ptr(), 4, 96)
    assert torch.equal(y.view(4, 96), x.view(4, 96).flip(1))


def test_divergent_barriers_raise_instead_of_hanging():
    out = torch.zeros(64)
    with pytest.raises(RuntimeError, match=r"barrier divergence.*32 threads have exited"):
        C.selftest.exit_before_barrier(out.data_ptr(), 64)
    with pytest.raises(RuntimeError, match=r"barrier divergence.*waits at .*selftest.cu:\d+ but .* waits at"):
        C.selftest.different_barriers(out.data_ptr(), 64)


@pytest.mark.parametrize("code", [0, 1, 2])
def test_shuffles_are_exact(code):
    out = torch.empty(64 * 3, dtype=DTYPES[code])
    C.selftest.shuffles(out.data_ptr(), 64, code)
    out = out.view(64, 3).float()
    lane = torch.arange(64) % 32
    assert torch.equal(out[:, 0], torch.full((64,), 528.0))  # sum of 1..32 by xor butterfly
    down = torch.where(lane == 31, lane + 1, lane + 2).float()  # the last lane keeps its own value
    assert torch.equal(out[:, 1], down)
    assert torch.equal(out[:, 2], torch.full((64,), 4.0))  # lane 3 holds 4


def test_int_shuffles_ballot_and_atomics():
    out = torch.empty(64, dtype=torch.int32)
    C.selftest.int_shuffles(out.data_ptr(), 64)
    assert torch.equal(out, torch.full((64,), 496 + 0b1111, dtype=torch.int32))
    fsum, isum = torch.zeros(1), torch.zeros(1, dtype=torch.int32)
    vals = torch.arange(1000, dtype=torch.float32)
    C.selftest.atomics(fsum.data_ptr(), isum.data_ptr(), vals.data_ptr(), 1000, 128)
    assert fsum.item() == vals.sum().item() and isum.item() == 1000


@pytest.mark.parametrize("a_t,b_t", [(False, False), (True, False), (False, True), (True, True)])
def test_block_gemm(a_t, b_t):
    # C += A·B (the fp32 kernels' FMA product) with A and B staged in shared memory in either layout, against torch.
    g = torch.Generator().manual_seed(int(a_t) + 2 * int(b_t))
    a, b, c = torch.randn(32, 64, generator=g), torch.randn(64, 48, generator=g), torch.randn(32, 48, generator=g)
    expected = c + a @ b
    C.selftest.gemm(a.data_ptr(), b.data_ptr(), c.data_ptr(), a_t, b_t)
    torch.testing.assert_close(c, expected, atol=1e-4, rtol=1e-5)


# The instruction self-tests run the same kernels (csrc/ptx_selftest.cu) on the simulator and, on a GPU, on the
# hardware: both must give every lane the elements the PTX ISA's table names.
INSTRUCTION_TARGETS = ["simulator", pytest.param("gpu", marks=pytest.mark.gpu)]


def instruction_target(target):
    """(module, device) the self-test kernels of `target` run with."""
    if target == "simulator":
        return C, torch.device("cpu")
    return _ext.load("_C"), torch.device("cuda")


def finish(device):
    if device.type == "cuda":
        torch.cuda.synchronize()  # the self-tests launch on the default stream


@pytest.mark.parametrize("target", INSTRUCTION_TARGETS)
@pytest.mark.parametrize("code", [1, 2])
def test_mma_16816_fragment_layout(code, target):
    # Every lane builds its A, B, C fragments from the PTX ISA's table and writes D where the table puts it: the
    # whole 16 x 8 product right means every lane's elements are where the ISA says (a misplaced element would
    # land in a wrong row or column of D). Distinct powers of two per element make any misplacement visible.
    mod, device = instruction_target(target)
    dtype = DTYPES[code]
    g = torch.Generator().manual_seed(code)
    a = torch.randint(-4, 5, (16, 16), generator=g).to(dtype) * 2.0 ** torch.arange(16).remainder(5).to(dtype)
    b = torch.randint(-4, 5, (16, 8), generator=g).to(dtype)
    c = torch.randint(-8, 9, (16, 8), generator=g).float()
    a_dev, b_dev, c_dev = (t.to(device) for t in (a, b, c))
    d = torch.empty(16, 8, device=device)
    mod.ptx_selftest.mma_16816(a_dev.data_ptr(), b_dev.data_ptr(), c_dev.data_ptr(), d.data_ptr(), code)
    finish(device)
    d = d.cpu()
    assert torch.equal(d, c + a.float() @ b.float())  # small integers times powers of two: exact in any order
    # the layout is asymmetric: transposing either operand's placement changes the product
    assert not torch.allclose(d, c + a.float().T @ b.float(), atol=1e-3)


@pytest.mark.parametrize("target", INSTRUCTION_TARGETS)
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_x4_gives_each_lane_its_documented_elements(trans, target):
    mod, device = instruction_target(target)
    # 16-bit elements whose value is their position (int16: every device copies it; the kernel moves bits)
    tile = torch.arange(256, dtype=torch.int16).view(16, 16).to(device)
    out = torch.empty(32, 4, 2, dtype=torch.int16, device=device)
    mod.ptx_selftest.ldmatrix(tile.data_ptr(), out.data_ptr(), trans)
    finish(device)
    out = out.cpu()
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):  # matrix i: rows 8(i % 2).., columns 8(i // 2)..
            for h in range(2):
                r, col = (2 * t + h, g) if trans else (g, 2 * t + h)
                expected = (8 * (i % 2) + r) * 16 + 8 * (i // 2) + col
                assert int(out[lane, i, h]) == expected, (lane, i, h)


@pytest.mark.parametrize("target", INSTRUCTION_TARGETS)
def test_cp_async_copies_zero_fill_and_groups(target):
    # Full, zero-filled and partial copies land as the ISA says after the wait that retires their group; waiting for
    # the older group only guarantees the even chunks (the first group).
    mod, device = instruction_target(target)
    n = 40
    src = torch.randn(n * 4, device=device)
    sizes = torch.tensor([16, 0, 8, 16, 4] * 8, dtype=torch.int32, device=device)
    expected = src.cpu().clone().view(n, 4)
    for i, b in enumerate(sizes.tolist()):
        expected[i, b // 4:] = 0.0
    out = torch.empty(n, 4, device=device)
    for wait in (0, 1):
        mod.ptx_selftest.cp_async(src.data_ptr(), sizes.data_ptr(), out.data_ptr(), n, 32, wait)
        finish(device)
        got = out.cpu()
        assert torch.equal(got if wait == 0 else got[0::2], expected if wait == 0 else expected[0::2]), wait


def test_simulated_cp_async_lands_between_issue_and_the_wait_that_retires_its_group():
    n = 40
    src = torch.randn(n * 4)
    sizes = torch.tensor([16, 0, 8, 16, 4] * 8, dtype=torch.int32)
    expected = src.clone().view(n, 4)
    for i, b in enumerate(sizes.tolist()):
        expected[i, b // 4:] = 0.0
    out = torch.empty(n, 4)
    C.simt_seed(0)
    # Waiting for the older group only: each odd chunk, in flight, either landed at its issue or still reads as the
    # poisoned shared memory (0xFF bytes: NaN) — both happen.
    C.ptx_selftest.cp_async(src.data_ptr(), sizes.data_ptr(), out.data_ptr(), n, 32, 1)
    landed = (out[1::2] == expected[1::2]).all(1)
    assert (landed | out[1::2].isnan().all(1)).all() and landed.any() and not landed.all()
    # a read before any wait sees only the copies that landed at issue
    C.ptx_selftest.cp_async(src.data_ptr(), sizes.data_ptr(), out.data_ptr(), n, 32, -1)
    landed = (out == expected).all(1)
    assert (landed | out.isnan().all(1)).all() and not landed.all()


def test_cuda_build_without_a_device_raises_cleanly():
    ok, why = _ext.available("_C")
    if not ok:
        pytest.skip(f"_C not built here: {why}")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    mod = _ext.load("_C")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        mod.device_count()
    with pytest.raises(RuntimeError, match="no CUDA device"):
        mod.softmax_forward(0, 0, 0, 1, 1, 1, 1, [0] * 4, [0] * 4, 1.0, False, 0, 0, 0, 0, 0)
    for launcher in ("attention_forward", "attention_backward", "norm_forward", "norm_backward", "epilogue_forward",
                     "activation_backward", "head_split", "head_merge"):
        with pytest.raises(RuntimeError, match="no CUDA device"):
            getattr(mod, launcher)({}, 0)


# ---- mutation: a copy of a kernel source with one barrier removed must fail the comparison ----

PY_INCLUDES = [sysconfig.get_paths()["include"], pybind11.get_include()]
# What setup.py compiles into _C_host: the bindings, every kernel file and the simulator's own sources.
HOST_SOURCES = ["bindings.cpp", *sorted(p.name for p in toolchain.csrc_dir().glob("*.cu")),
                *sorted(f"host/{p.name}" for p in (toolchain.csrc_dir() / "host").glob("*.cu"))]


def compile_host(src_dir, source, out):
    lang = ["-x", "c++"] if source.endswith(".cu") else []
    cmd = ["c++", *lang, "-std=c++17", "-O1", "-fPIC", "-DTK_HOST_SIM", "-DTK_MODULE_NAME=" + out.stem.split(".")[0],
           f"-I{src_dir}", f"-I{toolchain.host_cuda_include()}", *(f"-I{p}" for p in PY_INCLUDES),
           "-c", str(src_dir / source), "-o", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_all(procs):
    for p in procs:
        out, _ = p.communicate()
        assert p.returncode == 0, out.decode()


@pytest.fixture(scope="module")
def pristine_objects(tmp_path_factory):
    """Every source of the simulator build compiled once; a mutant recompiles only what its change touches. The
    module name is baked into bindings.cpp only, which every mutant recompiles."""
    out = tmp_path_factory.mktemp("objects")
    wait_all([compile_host(toolchain.csrc_dir(), s, out / (s.replace("/", "_") + ".o")) for s in HOST_SOURCES[1:]])
    return out


# A mutant build keeps every barrier of its file behind a switch, `tk_mutant_removed_barrier` (-1: none removed; k: the
# k-th `__syncthreads();` of the file's text is skipped), so one build serves every barrier of the file.
SWITCH = "tk_mutant_removed_barrier"


def build_mutant(tmp_path, objects, file, tag):
    """(the module, its switch as a ctypes int, the file's number of barriers) of the simulator build whose ``file``
    has its barriers switchable."""
    src = tmp_path / "csrc"
    shutil.copytree(toolchain.csrc_dir(), src)
    parts = (src / file).read_text().split("__syncthreads();")
    barriers = len(parts) - 1
    switched = "".join(f"{part}do {{ if ({SWITCH} != {k}) __syncthreads(); }} while (0);"
                       for k, part in enumerate(parts[:-1]))
    (src / file).write_text(f'extern "C" int {SWITCH};\n' + switched + parts[-1])
    (src / "host" / "mutant_switch.cpp").write_text(f'extern "C" int {SWITCH} = -1;\n')
    name = f"_tk_mutant_{tag}"
    # A mutated header reaches every kernel file; a mutated .cu only itself.
    rebuilt = [s for s in HOST_SOURCES if s == "bindings.cpp" or s == file or not file.endswith(".cu")]
    rebuilt.append("host/mutant_switch.cpp")
    objs = {s: (objects / (s.replace("/", "_") + ".o")) for s in HOST_SOURCES}
    for s in rebuilt:
        objs[s] = tmp_path / f"{name}.{s.replace('/', '_')}.o"
    wait_all([compile_host(src, s, objs[s]) for s in rebuilt])
    out = tmp_path / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run(["c++", "-shared", *map(str, objs.values()), "-o", str(out)], check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location(name, out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module, ctypes.c_int.in_dll(ctypes.CDLL(str(out)), SWITCH), barriers


def max_error(ours, expected):
    """Max absolute difference; NaN (a poisoned read) counts as infinitely wrong."""
    return (ours.float() - expected.float()).abs().max().nan_to_num(float("inf")).item()


def softmax_error(module, direction):
    torch.manual_seed(0)
    x = torch.randn(1, 1, 4, 300)
    if direction == "forward":
        y = torch.empty_like(x)
        module.softmax_forward(x.data_ptr(), 0, y.data_ptr(), 4, 300, 1, 4, list(x.stride()), [0] * 4, 1.0, False, 0,
                               0, 0, C.softmax_algos["block"], 0)
        return max_error(y, reference.masked_softmax(x))
    y = reference.masked_softmax(x)
    g = torch.randn_like(x)
    dx = torch.empty_like(x)
    module.softmax_backward(y.data_ptr(), g.data_ptr(), dx.data_ptr(), 4, 300, 1, 4, list(g.stride()), 1.0, 0,
                            C.softmax_algos["block"], 0)
    exp = y * (g - (g * y).sum(-1, keepdim=True))
    return max_error(dx, exp)


def norm_error(module, direction, monkeypatch):
    """Max error of the module's LayerNorm forward or dx (two block reductions per row each) against the reference."""
    monkeypatch.setattr(_ext, "module_for", lambda device: module)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 700, generator=g) * 3 + 1).requires_grad_()
    dy = torch.randn(6, 700, generator=g)
    with tk.use_backend("cuda"):
        y = tk.ops.layer_norm(x)
    ref = reference.layer_norm(x, None, None)
    if direction == "forward":
        return max_error(y, ref)
    ours, theirs = torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(ref, x, dy)[0]
    return max_error(ours, theirs)


def attention_error(module, direction, monkeypatch, dtype=torch.float16, lq=40):
    """Max error of the module's attention (forward, or one gradient) against the fp32 reference: 200 keys, so the
    forward streams several double-buffered key tiles past the 40 queries (`lq` = 140: the dK/dV pass streams three
    query tiles, refilling a stage); fp32 at D = 64, where the FMA product of a row runs on other warps than the
    row's softmax."""
    monkeypatch.setattr(_ext, "module_for", lambda device: module)
    torch.manual_seed(0)
    d = 64 if dtype == torch.float32 else 32
    q = torch.randn(1, 2, lq, d, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, 2, 200, d, dtype=dtype, requires_grad=True) for _ in range(2))
    mask = torch.rand(lq, 200) > 0.2
    with tk.use_backend("cuda"):
        out = tk.ops.attention(q, k, v, attn_mask=mask, is_causal=True, causal_alignment="bottom_right")
    ref = reference.scaled_dot_product_attention(*(t.float() for t in (q, k, v)), mask, is_causal=True,
                                                 causal_alignment="bottom_right")
    if direction == "forward":
        return max_error(out, ref)
    g = torch.randn_like(ref)
    ours = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    theirs = torch.autograd.grad(ref, (q, k, v), g)
    grad = {"dq": 0, "dk": 1, "dv": 2}[direction]
    return max_error(ours[grad], theirs[grad])


# (file, which __syncthreads() occurrence, what to compare): for every kernel with shared memory, a barrier whose
# loss lets a warp read a tile other warps have not finished writing.
MUTANTS = [
    ("softmax.cu", 0, "softmax", "forward"),        # softmax_fwd_block: warp partials visible
    ("common.cuh", 0, "softmax", "backward"),       # block_allreduce (softmax_bwd_block): warp partials visible
    ("attention_fwd.cu", 2, "attention", "forward"),  # mma: other threads' cp.async copies of the tile landed
    ("attention_fwd.cu", 3, "attention", "forward"),  # mma: a stage drained by every warp before it is refilled
    ("attention_fwd.cu", 8, "attention_fp32", "forward"),  # fma: probabilities and rescaled accumulators complete
    ("attention_bwd.cu", 3, "attention_fp32", "dv"),  # dkdv (fma): P and dS complete before dV += P^T dO
    ("attention_bwd.cu", 5, "attention", "dk"),     # dkdv (mma): other threads' copies of K, V, Q and dO landed
    ("attention_bwd.cu", 6, "attention_tiles", "dv"),  # dkdv (mma): a stage drained by every warp before refill
    ("attention_bwd.cu", 7, "attention", "dq"),     # dq (mma): other threads' cp.async copies of K and V landed
    ("common.cuh", 1, "norm", "forward"),           # block_allreduce (norm_fwd_kernel): scratch read before reuse
    ("common.cuh", 1, "norm", "backward"),          # the same in norm_bwd_kernel
]


# (error of the real build stays below, error of some mutant run exceeds): fp32 softmax, fp16 and fp32 attention
# (fp16 also over three query tiles per key block).
BOUNDS = {"softmax": (1e-5, 1e-3), "attention": (2e-2, 0.1), "attention_fp32": (1e-4, 0.1),
          "attention_tiles": (2e-2, 0.1), "norm": (1e-4, 1e-2)}


@pytest.fixture(scope="module")
def mutant_of(tmp_path_factory, pristine_objects):
    """The switchable simulator build of a file (`build_mutant`), built once: a .cu file's recompiles that file
    (~15 s for an attention file), common.cuh's every kernel file (~45 s on 2 busy cores)."""
    built = {}

    def build(file):
        if file not in built:
            built[file] = build_mutant(tmp_path_factory.mktemp("mutant"), pristine_objects, file, file.split(".")[0])
        return built[file]

    return build


@pytest.mark.parametrize("file,occurrence,op,direction", MUTANTS)
def test_removing_a_barrier_is_caught(mutant_of, monkeypatch, file, occurrence, op, direction):
    def error(module):
        if op == "softmax":
            return softmax_error(module, direction)
        if op == "norm":
            return norm_error(module, direction, monkeypatch)
        return attention_error(module, direction, monkeypatch,
                               torch.float32 if op == "attention_fp32" else torch.float16,
                               140 if op == "attention_tiles" else 40)

    ok, caught = BOUNDS[op]
    assert error(C) < ok  # the real build passes the same check
    mutant, removed, barriers = mutant_of(file)
    assert occurrence < barriers, f"{file} has no barrier #{occurrence}"
    errors = []
    removed.value = occurrence
    try:
        for seed in range(4):
            mutant.simt_seed(seed)
            errors.append(error(mutant))
    finally:
        removed.value = -1
    assert max(errors) > caught, f"removing barrier #{occurrence} of {file} went unnoticed: errors {errors}"
