"""Test set-up: without a GPU, Triton runs under its interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so it happens here, before any test
module imports the package's kernels.
"""

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning

DEVICE = torch.device("cuda" if HAS_GPU else "cpu")


# The files that take minutes on one worker (compiler builds, the sanitizers, interpreted training curves), run first:
# `make test` hands whole files to its workers in collection order (--dist loadfile --no-loadscope-reorder), so no
# worker is left finishing a long file alone at the end (xdist's own order, by test count, ran the 6 sanitizer tests
# last: 1.5 of make test's 10 minutes on one core). A file missing here only runs in its alphabetical place.
LONG_FILES = ("test_sanitizers.py", "test_huggingface.py", "test_simt.py", "test_resources.py", "test_main.py",
              "test_bench.py", "test_distributed.py", "test_properties.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: each file keeps its order
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_backend_answers():
    """Tests patch what backend availability answers (no driver, an old driver) and the launchers' settings;
    resolve_for and the launch plans keep their answers for the process, so each test starts without them."""
    from transformer_kernels import backends
    from transformer_kernels.kernels import config

    backends.clear_caches()
    config.clear_plans()  # tests also patch the settings a launch plan is made from
    yield


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def on_test_device():
    """Factory calls that name no device (torch.randn, the parameters of nn.Linear) create on the suite's device,
    a GPU where there is one: for modules whose helpers build their own tensors. Nothing changes on a CPU run."""
    if DEVICE.type == "cpu":
        yield
        return
    with torch.device(DEVICE):
        yield
