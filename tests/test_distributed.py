"""A converted Hugging Face model trained on an existing distributed engine (DDP, FSDP2's fully_shard), gloo on CPU,
two processes: the same per-step losses as one process on the same global batch."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("transformers")

from transformer_kernels.tools import hf_testing as hft

STEPS = 4


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch built without gloo")
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_process_training_matches_one_process(mode, tmp_path):
    # The ranks hold CPU tensors (gloo, one GPU at most): the Triton kernels interpreted where the suite runs them
    # so, else the CUDA C++ kernels on the simulator build.
    backend = "triton" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    expected = hft.distributed_losses("llama", backend, "single", STEPS)
    out = tmp_path / "losses.json"
    mp.spawn(hft.distributed_worker, args=(2, str(tmp_path / "store"), "llama", backend, mode, STEPS, str(out)), nprocs=2,
             join=True)
    losses = json.loads(out.read_text())
    assert len(losses) == STEPS and expected[-1] < expected[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
