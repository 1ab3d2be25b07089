"""The CUDA host simulator (csrc/host/simt.h) and the proof that the tests can see a missing barrier."""

import importlib.util
import shutil
import subprocess
import sys
import sysconfig

import pybind11
import pytest
import torch

from transformer_kernels import _ext, reference, toolchain

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


# ---- mutation: a copy of a kernel source with one barrier removed must fail the comparison ----

# (file, which __syncthreads() occurrence, the algo whose kernel uses it, forward or backward)
MUTANTS = [("softmax.cu", 0, "block", "forward"), ("common.cuh", 0, "block", "backward")]


def build_mutant(tmp_path, file, occurrence, tag):
    src = tmp_path / "csrc"
    shutil.copytree(toolchain.csrc_dir(), src)
    text = (src / file).read_text()
    parts = text.split("__syncthreads();")
    assert len(parts) > occurrence + 1, f"{file} has no barrier #{occurrence}"
    mutated = "__syncthreads();".join(parts[: occurrence + 1]) + "/* barrier removed */" + \
        "__syncthreads();".join(parts[occurrence + 1:])
    (src / file).write_text(mutated)
    name = f"_tk_mutant_{tag}"
    out = tmp_path / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    cmd = ["c++", "-x", "c++", "-std=c++17", "-O1", "-shared", "-fPIC", "-DTK_HOST_SIM", f"-DTK_MODULE_NAME={name}",
           f"-I{src}", f"-I{toolchain.cuda_home() / 'include'}", f"-I{sysconfig.get_paths()['include']}",
           f"-I{pybind11.get_include()}", str(src / "bindings.cpp"), str(src / "softmax.cu"),
           str(src / "host" / "selftest.cu"), "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location(name, out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def softmax_error(module, direction):
    torch.manual_seed(0)
    x = torch.randn(1, 1, 4, 300)
    if direction == "forward":
        y = torch.empty_like(x)
        module.softmax_forward(x.data_ptr(), 0, y.data_ptr(), 4, 300, 1, 4, list(x.stride()), [0] * 4, 1.0, False, 0,
                               0, 0, _ext.SOFTMAX_ALGOS["block"], 0)
        return (y - reference.masked_softmax(x)).abs().max().nan_to_num(float("inf")).item()
    y = reference.masked_softmax(x)
    g = torch.randn_like(x)
    dx = torch.empty_like(x)
    module.softmax_backward(y.data_ptr(), g.data_ptr(), dx.data_ptr(), 4, 300, 1, 4, list(g.stride()), 1.0, 0,
                            _ext.SOFTMAX_ALGOS["block"], 0)
    exp = y * (g - (g * y).sum(-1, keepdim=True))
    return (dx - exp).abs().max().nan_to_num(float("inf")).item()


@pytest.mark.parametrize("file,occurrence,algo,direction", MUTANTS)
def test_removing_a_barrier_is_caught(tmp_path, file, occurrence, algo, direction):
    assert softmax_error(C, direction) < 1e-5  # the real build passes the same check
    mutant = build_mutant(tmp_path, file, occurrence, f"{file.split('.')[0]}_{occurrence}")
    errors = []
    for seed in range(4):
        mutant.simt_seed(seed)
        errors.append(softmax_error(mutant, direction))
    assert max(errors) > 1e-3, f"removing barrier #{occurrence} of {file} went unnoticed: errors {errors}"
