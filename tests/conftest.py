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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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
