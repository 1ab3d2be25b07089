"""`make gpu-check`: the dry run here, the summary parsers, the benchmark case list and the sanitizer's driver."""

import subprocess
import sys
from pathlib import Path

import torch

from transformer_kernels import _ext
from transformer_kernels.tools import bench, cuda_driver, gpu_check

REPO = Path(__file__).resolve().parent.parent


def test_dry_run_lists_every_step_within_the_time_budget(tmp_path):
    run = subprocess.run(["make", "-s", "gpu-check", "DRY_RUN=1", f"OUT={tmp_path}", f"PYTHON={sys.executable}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    for step in gpu_check.steps(tmp_path):
        assert step.name in run.stdout
    assert sum(s.timeout_s for s in gpu_check.steps(tmp_path)) <= 540  # 9 minutes
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_summaries_read_pytest_xml_and_sanitizer_logs(tmp_path):
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite><testcase classname="tests.test_a" name="x"/>'
        '<testcase classname="tests.test_a" name="y"><failure/></testcase>'
        '<testcase classname="tests.test_b" name="z"><skipped/></testcase></testsuite></testsuites>')
    assert gpu_check.test_summary(tmp_path / "tests.xml") == [("test_a", 1, 1, 0), ("test_b", 0, 0, 1)]
    log = tmp_path / "s.log"
    log.write_text("========= ERROR SUMMARY: 3 errors\n")
    assert gpu_check.sanitizer_findings(log) == "3 errors"
    assert gpu_check.sanitizer_findings(tmp_path / "missing.log") == "not run"


def test_quick_cases_cover_the_issue_list_and_ratios_pick_the_best_of_each_side():
    cases = bench.quick_cases()
    attn = {(c.impl, c.model, c.seq_len, c.backward) for c in cases if c.op == "attention"}
    for d in (64, 128):
        for length in (1024, 4096, 16384):
            for causal in ("", " causal"):
                for backward in (False, True):
                    assert ("triton", f"D{d}{causal}", length, backward) in attn
                    assert ("sdpa-flash", f"D{d}{causal}", length, backward) in attn
    assert {"linear+gelu+res", "feed_forward", "layer_norm", "rms_norm"} <= {c.op for c in cases}
    t = lambda impl, ms: bench.Timing("attention", impl, "D64", 1024, "fwd", ms, ms, ms, 100.0 / ms, 0.0, None)
    # a graph-replay row is a diagnostic of ours, neither our figure nor a baseline
    (row,) = bench.compare_to_baselines([t("triton", 2.0), t("cuda", 1.0), t("sdpa-flash", 1.5), t("flex", 3.0),
                                         t("cuda" + bench.GRAPHED, 0.1)])
    assert row[1:3] == ("cuda", "sdpa-flash") and row[4] == 1.5 and row[5] == "TFLOP/s"


def test_the_sanitizer_driver_runs_every_cuda_kernel_on_the_simulator(monkeypatch):
    from transformer_kernels.cuda import attention as cuda_attention
    from transformer_kernels.kernels import config

    plans, mask_grads = [], []
    monkeypatch.setattr(cuda_attention, "split_plan", lambda *a: plans.append(config.split_plan(*a)) or plans[-1])
    backward = cuda_attention.attention_backward
    monkeypatch.setattr(cuda_attention, "attention_backward",
                        lambda *a, **kw: mask_grads.append(a[-1]) or backward(*a, **kw))
    host = _ext.load("_C_host")
    forward, forms, narrow = host.attention_forward, [], []

    def record(args, stream):
        forms.append(host.attention_forward_plain(args))
        narrow.append(host.attention_forward_narrow(args["dtype"], args["D"], args["smem_per_sm"]))
        return forward(args, stream)

    monkeypatch.setattr(host, "attention_forward", record)
    ran = cuda_driver.run(torch.device("cpu"))
    assert forms.count(True) == 4  # the PLAIN forward ran (dense, narrow, the decoding step, packed), the general the rest
    assert narrow.count(True) == 2  # the narrow key tile's two forms
    assert len(ran) == 15 and any("warp" in r for r in ran) and any("block" in r for r in ran)
    assert any(p.splits > 1 for p in plans)  # the split-KV forward and its combine kernel ran
    assert mask_grads.count(True) == 3  # the dQ kernel wrote the mask's gradient
    assert any("varlen" in r for r in ran)
