"""Benchmarks time kernels on a GPU; without one every case is skipped (see `python -m transformer_kernels bench`
for the static report a CPU machine gets instead)."""

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run_op(benchmark, fn, *args, backward: bool = False, **kwargs):
    """Times fn(*args) (and its backward with a fixed grad when ``backward``) with CUDA syncs around it."""
    def step():
        out = fn(*args, **kwargs)
        if backward:
            out.backward(grad)
        torch.cuda.synchronize()

    grad = None
    if backward:
        grad = torch.randn_like(fn(*args, **kwargs))
    step()  # compile / autotune outside the timing
    benchmark.pedantic(step, rounds=20, warmup_rounds=3)
