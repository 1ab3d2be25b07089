"""Ahead-of-time resource check: every shipped kernel variant compiles for real GPUs with no spills."""

import itertools
import math
import re

import pytest

from transformer_kernels import _ext
from transformer_kernels.kernels import attention as triton_attention
from transformer_kernels.kernels import linear as triton_linear
from transformer_kernels.kernels import norm as triton_norm
from transformer_kernels.kernels import softmax as triton_softmax
from transformer_kernels.kernels.config import TRITON_DTYPE_NAMES
from transformer_kernels.tools import resources, toolchain

SAMPLE_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function softmax_fwd_kernel:
  REG:40 STACK:8 SHARED:64 LOCAL:0 CONSTANT[0]:568 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
SAMPLE_SASS = """
        Function : k
        /*0020*/                   HFMA2.MMA R7, -RZ, RZ, 0, 2.384185791015625e-07 ;
        /*0030*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0040*/                   HGMMA.64x64x16.F32 gdesc[UR4], RZ, !UP0 ;
        /*0050*/                   LDSM.16.MT88.4 R16, [R3+0x800] ;
        /*0060*/                   LDGSTS.E.BYPASS.LTC128B.128 [R5+0x4000], desc[UR6][R8.64] ;
        /*0070*/                   LDGSTS.E.BYPASS.LTC128B.128.ZFILL [R5+0x4800], desc[UR6][R10.64], P0 ;
        /*0080*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0090*/                   STG.E.128 desc[UR4][R6.64], R8 ;
        /*00a0*/                   LDG.E.U16 R9, desc[UR4][R2.64] ;
        /*00b0*/                   STG.E desc[UR4][R6.64], R9 ;
"""


def test_parsers_read_cuobjdump_output():
    assert resources.parse_resource_usage(SAMPLE_USAGE) == {
        "softmax_fwd_kernel": {"REG": 40, "STACK": 8, "SHARED": 64, "LOCAL": 0}
    }
    # HFMA2.MMA is a plain FMA, not a tensor-core instruction
    assert resources.count_tensor_core(SAMPLE_SASS) == {"k": 2}
    assert resources.count_opcodes(SAMPLE_SASS) == {"k": {"LDSM": 1, "LDGSTS": 2, "LDG.128": 1, "STG.128": 1,
                                                          "GLOBAL.16": 1}}


@pytest.fixture(scope="module")
def triton_rows():
    return resources.triton_report(["softmax"])


def test_every_triton_softmax_variant_compiles_without_spills(triton_rows):
    variants = triton_softmax.aot_variants()
    assert len(triton_rows) == len(variants) * len(resources.TRITON_ARCHS)
    assert {r.arch for r in triton_rows} == set(resources.TRITON_ARCHS)
    for r in triton_rows:
        assert r.stack_bytes == 0, f"{r.kernel} {r.variant} sm_{r.arch} spills {r.stack_bytes} bytes"
        assert 0 < r.registers <= 255
        assert r.shared_bytes <= resources.MAX_SHARED[r.arch]
        assert r.occupancy is not None and r.occupancy > 0


def test_launcher_only_picks_enumerated_configs():
    configs = set(triton_softmax.all_configs())
    for n in [1, 7, 16, 17, 33, 1000, 5000, 8192, 8193, 70000, 10**7]:
        assert triton_softmax.pick_config(n) in configs


@pytest.fixture(scope="module")
def cuda_rows():
    if toolchain.nvcc() is None:
        pytest.skip("needs nvcc")
    return resources.cuda_report()


def test_cuda_report_reads_the_built_extension_and_matches_a_fresh_compile(cuda_rows):
    # make test's set-up builds _C and records what from: the report then reads that module (seconds) instead of
    # compiling every file for every arch again (minutes). Its rows are the ones a fresh nvcc compile gives.
    assert _ext.available("_C")[0], "_C is not built: run make setup"
    assert resources._built_extension() is not None, "csrc/ changed since _C was built: run make setup"
    fresh = resources.cuda_report(files=["softmax.cu"], archs=["80"])
    assert len(fresh) == 30
    built = {(r.kernel, r.variant, r.arch): r for r in cuda_rows}
    assert all(built[(r.kernel, r.variant, r.arch)] == r for r in fresh)


def test_every_cuda_instantiation_compiles_without_spills(cuda_rows):
    archs = {int(a) for a in toolchain.cuda_archs()}
    assert {r.arch for r in cuda_rows} == archs
    assert {f for f in resources.CUDA_KERNEL_FILES} == {p.name for p in toolchain.csrc_dir().glob("*.cu")}
    for r in cuda_rows:
        assert r.stack_bytes == 0, f"{r.kernel}<{r.variant}> sm_{r.arch} spills {r.stack_bytes} bytes"
        assert r.shared_bytes <= resources.MAX_SHARED[r.arch]


def test_cuda_softmax_instantiations(cuda_rows):
    names = {(r.kernel, r.variant) for r in cuda_rows}
    # 4 mask kinds x 3 dtypes for each forward kernel, 3 dtypes for each backward kernel
    assert len([n for n in names if n[0].startswith("softmax_fwd")]) == 2 * 4 * 3
    assert len([n for n in names if n[0].startswith("softmax_bwd")]) == 2 * 3
    # __launch_bounds__: a block kernel launched with 1024 threads compiles to at most 64 registers a thread (more
    # would fail the launch: 1024 x 64 fills the register file), the warp kernels' 128 threads to at most 255.
    for r in cuda_rows:
        if r.kernel.startswith("softmax_") and r.kernel.endswith("_block"):
            assert r.registers * 1024 <= resources.MAX_REGISTERS, (r.kernel, r.variant, r.arch, r.registers)


def test_cuda_attention_instantiations_use_tensor_cores(cuda_rows):
    # Every head dim the bindings report, for fp16 and bf16 (on tensor cores) and fp32 up to its limit (FMA), dense
    # and packed (varlen).
    c = _ext.load("_C_host")
    expected = {(t, d) for t in ("__half", "__nv_bfloat16") for d in c.attention_head_dims
                if d <= c.attention_max_head_dim["half"]}
    expected |= {("float", d) for d in c.attention_head_dims if d <= c.attention_max_head_dim["float"]}
    for kernel in ("attention_fwd", "attention_dkdv", "attention_dq"):
        rows = [r for r in cuda_rows if r.kernel.startswith(kernel)]
        # (element type, head dim, packed[, PLAIN]): the fp16/bf16 forward comes in both forms (csrc/attention_fwd.cu)
        assert {tuple(r.variant.split(", ")[:3]) for r in rows} == {(t, str(d), p) for t, d in expected
                                                                    for p in ("false", "true")}
        for r in rows:
            assert (r.tensor_core_instrs > 0) == (not r.variant.startswith("float")), (kernel, r.variant, r.arch)
    # every pass: mma.sync for fp16/bf16, the FMA kernels for fp32
    for kernel in ("attention_fwd_fma_kernel", "attention_dkdv_fma_kernel", "attention_dq_fma_kernel"):
        assert {r.variant.split(", ")[0] for r in cuda_rows if r.kernel == kernel} == {"float"}


def test_cuda_attention_passes_are_register_resident_and_pipelined(cuda_rows):
    # mma.sync (HMMA) fed by ldmatrix (LDSM) from tiles copied by cp.async (LDGSTS), for every fp16/bf16
    # instantiation; the shared-memory column counts the dynamic tiles, and at D = 128 fp16 two 4-warp blocks fit
    # an sm_80 SM (<= 80 KiB each).
    mma = {"attention_fwd_mma_kernel", "attention_dkdv_mma_kernel", "attention_dq_mma_kernel"}
    rows = [r for r in cuda_rows if r.kernel in mma]
    assert {r.kernel for r in rows} == mma
    for r in rows:
        where = f"{r.kernel}<{r.variant}> sm_{r.arch}"
        assert r.tensor_core_instrs > 0 and r.sass_ops["LDSM"] > 0 and r.sass_ops["LDGSTS"] > 0, (where, r.sass_ops)
        assert r.shared_bytes <= resources.MAX_SHARED[86], where
    d128 = [r for r in rows if r.variant.startswith("__half, 128,") and r.arch == 80]
    assert d128 and all(r.shared_bytes <= 80 * 1024 for r in d128), [r.shared_bytes for r in d128]
    assert all(resources.MAX_SHARED[80] // r.shared_bytes >= 2 for r in d128)
    # every attention kernel reports the dynamic shared memory it launches with
    c = _ext.load("_C_host")
    for r in cuda_rows:
        if r.kernel in resources.ATTENTION_SMEM_PASS:
            element, d, *rest = r.variant.split(", ")
            code = c.dtype_codes[resources.CUDA_ELEMENT_TYPES[element]]
            narrow = r.kernel in resources.KEY_LOOP_KERNELS and rest[-1] == "true"  # the mma kernels' narrow tile
            assert r.shared_bytes >= c.attention_smem(resources.ATTENTION_SMEM_PASS[r.kernel], code, int(d), narrow) > 0


def test_cuda_attention_at_head_dim_128_fits_two_blocks_per_sm_on_every_arch(cuda_rows):
    # Each fp16/bf16 attention kernel (forward, dK/dV, dQ) at D = 128 with the tile its launcher takes for the arch's
    # shared memory per SM (the narrow tiles where the wide ones would fit one block: sm_86/sm_89), both forms, dense
    # and packed: two blocks of 4 warps resident per SM by shared memory (1 KiB reserved per block) and registers.
    c = _ext.load("_C_host")
    chooses = {"attention_fwd_mma_kernel": c.attention_forward_narrow,
               "attention_dkdv_mma_kernel": c.attention_backward_narrow,
               "attention_dq_mma_kernel": c.attention_backward_narrow}
    seen = set()
    for r in cuda_rows:
        if r.kernel not in chooses or r.variant.split(", ")[1] != "128":
            continue
        element, _, packed, plain, narrow = r.variant.split(", ")
        smem = resources.SMEM_PER_SM[r.arch]
        if (narrow == "true") != chooses[r.kernel](c.dtype_codes[resources.CUDA_ELEMENT_TYPES[element]], 128, smem):
            continue  # the tile this arch's launcher never takes
        blocks = min(smem // (r.shared_bytes + 1024), resources.MAX_REGISTERS // (r.registers * 128))
        assert blocks >= 2, (r.kernel, r.variant, r.arch, r.shared_bytes, r.registers)
        seen.add((r.kernel, element, packed, plain, r.arch))
    archs = {int(a) for a in toolchain.cuda_archs()}
    assert seen == {(k, e, p, f, a) for k in chooses for e in ("__half", "__nv_bfloat16") for p in ("false", "true")
                    for f in ("false", "true") for a in archs}
    for choose in set(chooses.values()):
        assert {a for a in archs if choose(c.dtype_codes["float16"], 128, resources.SMEM_PER_SM[a])} == archs & {86, 89}


# The element-wise kernels (csrc/epilogue.cu) and the norms' packed kernels (csrc/norm.cu) where rows allow 16-byte
# packs: every access to a stream is 16 bytes (no 2-byte access is left), and the norm kernels read a row once — the
# forward 4 loads a pack it holds (x, residual, weight, bias; the general kernel reads x and the residual three
# times), the backward 7 (the weight once; x, residual and dy of this row and of the next) and 1 + 2·(pack / 4)
# stores (dx, and the dW/dB partials in fp32 16-byte pieces).
PACKED_STREAM_KERNELS = ("epilogue_kernel", "activation_backward_kernel", "head_split_kernel", "head_merge_kernel")


def test_cuda_elementwise_and_norm_kernels_move_16_bytes_an_access(cuda_rows):
    seen = set()
    for r in cuda_rows:
        element, *rest = r.variant.split(", ")
        pack = 16 // (4 if element == "float" else 2)
        where, ops = f"{r.kernel}<{r.variant}> sm_{r.arch}", r.sass_ops
        if r.kernel in PACKED_STREAM_KERNELS and int(rest[0]) == pack:
            assert ops["LDG.128"] > 0 and ops["STG.128"] > 0 and ops["GLOBAL.16"] == 0, (where, ops)
        elif r.kernel == "norm_fwd_packed_kernel":
            c = int(rest[0])
            assert (ops["LDG.128"], ops["STG.128"], ops["GLOBAL.16"]) == (4 * c, 2 * c, 0), (where, ops)
        elif r.kernel == "norm_bwd_packed_kernel":
            c = int(rest[0])
            assert (ops["LDG.128"], ops["STG.128"], ops["GLOBAL.16"]) == (7 * c, c * (1 + 2 * pack // 4), 0), (where, ops)
        else:
            continue
        seen.add((r.kernel, element, r.arch))
    kernels = {*PACKED_STREAM_KERNELS, "norm_fwd_packed_kernel", "norm_bwd_packed_kernel"}
    archs = {int(a) for a in toolchain.cuda_archs()}
    assert seen == {(k, e, a) for k in kernels for e in resources.CUDA_ELEMENT_TYPES for a in archs}


# The key loops of the PLAIN forms (csrc/attention_fwd.cu, attention_bwd.cu: no mask tensor, padding mask, soft cap
# or dropout; causal and windows allowed): SASS instructions per HMMA, dense, by head dim, on sm_80 and sm_90
# (`resources.KeyLoop`). Issue 27's budgets are 6 for the forward at D = 128 and 8 for each backward kernel
# (FlashAttention-2 spends ~3.5); smaller head dims do the same per-score work over fewer products. dK/dV has no PLAIN
# form at D = 256. Measured with nvcc 13.0, sm_80 / sm_90, D = 16 / 32 / 64 / 128 / 256:
#   forward 16.9 / 16.9, 10.5 / 10.5, 7.6 / 7.4, 5.9 / 5.9, 7.2 / 7.3
#   dK/dV   17.9 / 18.2, 10.3 / 10.5, 6.6 / 6.6, 5.8 / 5.9
#   dQ      11.8 / 11.8, 7.4 / 7.4, 5.1 / 5.2, 5.0 / 4.6, 6.2 / 6.3
# (the general forms: 24-47 at D >= 128, with runtime-bounded load loops nested in them).
PLAIN_LOOP_BUDGET = {
    "attention_fwd_mma_kernel": {16: 17.5, 32: 11.5, 64: 8.0, 128: 6.0, 256: 7.5},
    "attention_dkdv_mma_kernel": {16: 18.5, 32: 11.0, 64: 7.0, 128: 6.5},
    "attention_dq_mma_kernel": {16: 12.5, 32: 8.0, 64: 6.0, 128: 6.0, 256: 7.0},
}
# The narrow tiles at D = 128, taken on sm_86/sm_89 only (100 KiB SMs: two blocks where the wide tiles fit one): the
# same per-tile work over fewer products. Measured on sm_86 / sm_89: forward (32 keys) 7.3, dK/dV (16 queries) 7.7 /
# 7.6 dense / packed, dQ (16 keys) 5.3 — issue 27's ≤ 8 for each backward kernel holds.
NARROW_LOOP_BUDGET = {"attention_fwd_mma_kernel": 7.5, "attention_dkdv_mma_kernel": 8.0, "attention_dq_mma_kernel": 6.0}


def test_cuda_plain_key_loops_are_within_budget(cuda_rows):
    for kernel, budget in PLAIN_LOOP_BUDGET.items():
        rows = [r for r in cuda_rows if r.kernel == kernel]
        plain = [r for r in rows if r.variant.split(", ")[3] == "true"]
        assert {int(r.variant.split(", ")[1]) for r in plain} == set(budget), kernel
        for r in plain:
            d, packed, *rest = r.variant.split(", ")[1:]
            narrow = rest[1:] == ["true"]
            where, loop = f"{kernel}<{r.variant}> sm_{r.arch}", r.key_loop
            # the whole key loop, straight-line: every product of the kernel sits in it (or in its two copies, the
            # interior and edge loops), and no loop is nested in it
            assert loop is not None and not loop.nested, (where, loop)
            assert r.tensor_core_instrs in (loop.tensor_core, 2 * loop.tensor_core), (where, loop)
            if packed == "false" and narrow and r.arch in (86, 89):
                assert loop.per_tensor_core <= NARROW_LOOP_BUDGET[kernel], (where, loop)
            elif packed == "false" and not narrow and r.arch in (80, 90):
                assert loop.per_tensor_core <= budget[int(d)], (where, loop)


@pytest.fixture(scope="module")
def attention_rows():
    return resources.triton_report(["attention"])


def test_every_triton_attention_config_compiles_without_spills_on_tensor_cores(attention_rows):
    variants = triton_attention.aot_variants()
    assert len(attention_rows) == len(variants) * len(resources.TRITON_ARCHS)
    # every tile the launchers can pick, for every dtype, head-dim block and feature class, is in the report
    labels = {r.variant for r in attention_rows}
    for (features, elem, block_d), tiles in triton_attention.PASSES["fwd"].items():
        for c in tiles:
            for dtype in triton_attention.SUPPORTED_DTYPES:
                if max(dtype.itemsize, 2) == elem:
                    name = TRITON_DTYPE_NAMES[dtype]
                    assert f"{name} D={block_d} M={c.block_m} N={c.block_n} w={c.num_warps} s={c.num_stages} {features}" in labels
    for r in attention_rows:
        where = f"{r.kernel} {r.variant} sm_{r.arch}"
        assert r.stack_bytes == 0, f"{where} spills {r.stack_bytes} bytes"
        assert r.shared_bytes <= resources.MAX_SHARED[r.arch], f"{where} needs {r.shared_bytes} B of shared memory"
        if r.kernel not in ("attn_bwd_preprocess", "attn_fwd_combine"):  # row reductions, no products
            # fp32 above FP32_TENSOR_CORE_MAX_D runs ieee FMA products, everything else tensor cores
            dtype, d = r.variant.split()[:2]
            fma = dtype == "fp32" and int(d.removeprefix("D=")) > triton_attention.FP32_TENSOR_CORE_MAX_D.value
            assert (r.tensor_core_instrs > 0) != fma, f"{where}: {r.tensor_core_instrs} tensor-core instructions"
    # the split-KV forward and its combine, for every dtype and head-dim block
    for kernel in ("attn_fwd_split", "attn_fwd_combine", "attn_dmask"):
        assert any(r.kernel == kernel for r in attention_rows), kernel


# The Triton attention forward, 2-byte "plain" class (causal at most), its preferred tile: SASS instructions in the
# interior key loop (`resources.KeyLoop`, innermost loops) per m16n8k16-equivalent of its two products, i.e.
# 2·M·N·D / (2048·warps) (the loop's HMMA count on sm_80; sm_90's wgmma do the same work in fewer instructions).
# Interior tiles take no visibility test and one FMA per score (issue 26). Measured 2026-12-07 (triton 3.9), fp16,
# sm_80 / sm_90, D = 16 / 32 / 64 / 128 / 256: 14.5 / 16.2, 8.4 / 8.5, 5.3 / 4.9, 4.0 / 3.0, 9.4 / 7.8; before (every
# tile tested, natural units; at D = 128 a 64-row tile): 25.8 / 27.6, 13.6 / 14.1, 8.3 / 7.8, 10.1 / 8.6, 10.8 / 8.6.
TRITON_FWD_LOOP_BUDGET = {80: {16: 16.0, 32: 9.5, 64: 6.0, 128: 4.5, 256: 10.0},
                          90: {16: 18.0, 32: 9.5, 64: 5.5, 128: 3.5, 256: 8.5}}


def _plain_label(dtype: str, d: int, c, suffix: str = "") -> str:
    # The resource-table label of a 2-byte "plain" attention tile (`triton_attention.aot_variant`).
    return f"{dtype} D={d} M={c.block_m} N={c.block_n} w={c.num_warps} s={c.num_stages} plain{suffix}"


def test_triton_attention_forward_interior_loop_is_within_budget(attention_rows):
    rows = {(r.kernel, r.variant, r.arch): r for r in attention_rows}
    for arch, budget in TRITON_FWD_LOOP_BUDGET.items():
        assert set(budget) == set(triton_attention.HEAD_DIM_BLOCKS), arch
        for d, most in budget.items():
            c = triton_attention.PASSES["fwd"][("plain", 2, d)][0]
            units = 2 * c.block_m * c.block_n * d / (2048 * c.num_warps)
            for dtype in ("fp16", "bf16"):
                label = _plain_label(dtype, d, c)
                loop = rows[("attn_fwd", label, arch)].key_loop
                assert loop is not None and loop.instructions / units <= most, (label, arch, loop)


# The Triton attention backward, 2-byte "plain" class, its preferred tiles: SASS instructions in the innermost query
# loop of dK/dV and the key loop of the deterministic dQ pass, per m16n8k16-equivalent of their products,
# products·M·N·D / (2048·warps) with five products for dK/dV with the fused dQ (QKᵀ, dO·Vᵀ, dV, dK, dS·K), four without
# (D = 16: its fused tile spilled) and three for dQ. The probabilities are recomputed with one FMA per score from the
# preprocess's lse2 instead of (s·scale − m)·log2(e) then ·1/l (issue 26). Measured 2026-12-07 (triton 3.9), fp16,
# D = 16 / 32 / 64 / 128 / 256, before -> now: dK/dV sm_80 73.7 -> 61.3, 20.8 -> 18.3, 17.1 -> 15.7, 12.8 -> 12.2,
# 11.0 -> 10.6; sm_90 24.1 -> 20.9, 18.0 -> 15.4, 14.5 -> 13.2, 10.0 -> 9.4, 8.8 -> 8.3; dQ sm_80 22.4 -> 18.5,
# 11.9 -> 9.9, 7.0 -> 6.0, 5.3 -> 4.8, 4.8 -> 4.8; sm_90 24.4 -> 20.3, 12.8 -> 10.8, 6.9 -> 5.9, 7.2 -> 6.1, 4.9 -> 5.0.
# The D = 256 dQ pass changed its tile only (its two-stage tiles took stack with the new form): a guard there.
TRITON_BWD_LOOP_BUDGET = {("dkdv", 80): {16: 62.0, 32: 18.5, 64: 16.0, 128: 12.5, 256: 10.75},
                          ("dkdv", 90): {16: 21.5, 32: 15.75, 64: 13.5, 128: 9.6, 256: 8.5},
                          ("dq", 80): {16: 19.0, 32: 10.25, 64: 6.25, 128: 5.0, 256: 5.0},
                          ("dq", 90): {16: 21.0, 32: 11.0, 64: 6.25, 128: 6.5, 256: 5.25}}


def test_triton_attention_backward_loops_are_within_budget(attention_rows):
    rows = {(r.kernel, r.variant, r.arch): r for r in attention_rows}
    for (pass_name, arch), budget in TRITON_BWD_LOOP_BUDGET.items():
        assert set(budget) == set(triton_attention.HEAD_DIM_BLOCKS), (pass_name, arch)
        for d, most in budget.items():
            c = triton_attention.PASSES[pass_name][("plain", 2, d)][0]
            fused = pass_name == "dkdv" and c in triton_attention.fused_dq_tiles(d, 2, "plain", False, False)
            products = 3 if pass_name == "dq" else 5 if fused else 4
            units = products * c.block_m * c.block_n * d / (2048 * c.num_warps)
            for dtype in ("fp16", "bf16"):
                label = _plain_label(dtype, d, c, "" if pass_name == "dq" or fused else " two-pass")
                loop = rows[(f"attn_{pass_name}", label, arch)].key_loop
                assert loop is not None and loop.instructions / units <= most, (label, arch, loop)


def test_triton_attention_forward_is_wgmma_on_sm_90(attention_rows):
    for r in attention_rows:
        where = f"{r.kernel} {r.variant} sm_{r.arch}"
        if r.arch != 90:
            assert r.wgmma_instrs == 0, where  # sm_80 has no wgmma
        elif r.kernel == "attn_fwd" and r.variant.startswith(("fp16", "bf16")) \
                and int(re.search(r"M=(\d+)", r.variant).group(1)) >= 64:
            # wgmma works on 64-row slices of a warpgroup: every forward tile of 64+ rows takes it for both products
            assert r.wgmma_instrs == r.tensor_core_instrs > 0, (where, r.wgmma_instrs, r.tensor_core_instrs)


def test_every_triton_norm_config_compiles_without_spills():
    rows = resources.triton_report(["norm"])
    assert len(rows) == len(triton_norm.aot_variants()) * len(resources.TRITON_ARCHS)
    for r in rows:
        assert r.stack_bytes == 0, f"{r.kernel} {r.variant} sm_{r.arch} spills {r.stack_bytes} bytes"
        assert r.shared_bytes <= resources.MAX_SHARED[r.arch]
    # The backward keeps rows in flight: rows per step x programs resident per SM (registers and threads from the
    # compiled kernel; the grid of 16384 rows over an H100's 132 SMs). One row per step and one 16-warp program per
    # SM (1 row) was the latency-bound form. At most 1024 columns (BERT, GPT-2) 8 rows fit the register file; a
    # wider row keeps ~7 fp32 values per column live, so fewer fit.
    bwd = {(r.variant, r.arch): r for r in rows if r.kernel == "norm_bwd"}
    programs_per_sm = math.ceil(16384 / triton_norm.ROWS_PER_PROGRAM / 132)
    for n, at_least in ((768, 8), (1024, 8), (2048, 2), (4096, 1)):
        block, warps, step = triton_norm.pick_backward_config(n)
        for dt, kind, arch in itertools.product(("fp16", "bf16"), ("ln", "rms"), resources.TRITON_ARCHS):
            r = bwd[(f"{dt} {kind} BLOCK={block} warps={warps} rows={step}", arch)]
            resident = min(round(r.occupancy * resources.MAX_THREADS_PER_SM[arch] / r.threads), programs_per_sm)
            assert step * resident >= at_least, (n, r.variant, arch, r.registers, resident)


def test_norm_launchers_only_pick_enumerated_configs():
    for n in [1, 37, 1000, 4096, 4097, 4231, 8192, triton_norm.MAX_BACKWARD_COLS]:
        assert triton_norm.pick_config(n) in triton_norm.all_configs()
        assert triton_norm.pick_backward_config(n) in triton_norm.all_backward_configs()


def test_every_triton_gemm_config_compiles_without_spills_on_tensor_cores():
    rows = resources.triton_report(["linear"])
    assert len(rows) == len(triton_linear.aot_variants()) * len(resources.TRITON_ARCHS)
    labels = {r.variant for r in rows}
    for (features, elem), tiles in triton_linear.GEMM_CONFIGS.items():
        for c in tiles:
            tile = f"M={c.block_m} N={c.block_n} K={c.block_k} w={c.num_warps} s={c.num_stages}"
            assert any(label.endswith(f"{features} {tile}") for label in labels), (features, elem, tile)
    for r in rows:
        where = f"{r.kernel} {r.variant} sm_{r.arch}"
        assert r.stack_bytes == 0, f"{where} spills {r.stack_bytes} bytes"
        assert r.shared_bytes <= resources.MAX_SHARED[r.arch]
        if r.kernel == "matmul":
            assert r.tensor_core_instrs > 0, f"{where} does not use tensor cores"
            if r.variant.startswith(("fp16", "bf16")):
                # every fp16/bf16 GEMM tile is wgmma (HGMMA) on sm_90 (issue 30), mma.sync on sm_80, which has no wgmma
                assert r.wgmma_instrs == (r.tensor_core_instrs if r.arch == 90 else 0), (where, r.wgmma_instrs)

