"""The op families: the one table that dispatch (`backends.launchers`), the resource report, `check` and the tests
read. A family is one Triton file ``kernels/<family>.py``, one CUDA launcher module ``cuda/<family>.py`` and the
``csrc/`` sources of its kernels; its ops are the public names `backends.GPU_PREFERENCE` orders backends for. Adding a
family is adding a row here (docs/ADDING_AN_OP.md): a file or op the row does not name fails `tests/test_backends.py`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    ops: tuple[str, ...]  # public op names (transformer_kernels.ops)
    cuda_sources: tuple[str, ...]  # csrc/*.cu files holding its kernels


FAMILIES: dict[str, Family] = {
    "softmax": Family(("masked_softmax",), ("softmax.cu",)),
    "attention": Family(("attention", "varlen_attention"), ("attention_fwd.cu", "attention_bwd.cu")),
    "norm": Family(("layer_norm", "rms_norm"), ("norm.cu",)),
    "linear": Family(("linear", "gated_linear", "qkv_projection", "out_projection"), ("epilogue.cu",)),
    "rotary": Family(("rotary",), ("rotary.cu",)),
    "cross_entropy": Family(("linear_cross_entropy",), ("cross_entropy.cu",)),
}

# csrc/*.cu files that are no family's: the launch probe and the instruction-layout self-tests.
SUPPORT_CUDA_SOURCES = ("probe.cu", "ptx_selftest.cu")

OPS: tuple[str, ...] = tuple(op for family in FAMILIES.values() for op in family.ops)
CUDA_SOURCES: tuple[str, ...] = (*(src for family in FAMILIES.values() for src in family.cuda_sources),
                                 *SUPPORT_CUDA_SOURCES)
