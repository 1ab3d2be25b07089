"""`python -m transformer_kernels info | check`: the environment report and the verification table."""

import argparse
import json
import subprocess
import sys

import torch

from transformer_kernels.tools import cli, verify


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "transformer_kernels", *args], capture_output=True, text=True, timeout=600)


def test_info_reports_builds_and_backends():
    proc = run_cli("info", "--json")
    assert proc.returncode == 0, proc.stderr
    env = json.loads(proc.stdout)
    assert env["torch"].startswith(torch.__version__)
    assert env["build _C_host"] == "loaded"
    assert env["backend torch"].startswith("available")
    assert {"triton", "nvcc", "GPU", "build _C", "backend triton", "backend cuda"} <= set(env)


def test_check_quick_passes_on_every_backend():
    proc = run_cli("check", "--quick", "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    impls = {r["impl"] for r in rows}
    assert {"torch", "triton", "cuda-warp", "cuda-block"} <= impls
    assert all(r["ok"] and r["errors"] for r in rows)


def test_check_exits_nonzero_when_a_case_fails(monkeypatch, capsys):
    def wrong(device, quick):
        yield verify.Case("fake_op", "torch", torch.float32, "off by one",
                          lambda: [("out", *verify.compare(lambda x: x + 1, lambda x: x, {"x": torch.ones(3)})[0][1:])])

    def crashing(device, quick):
        yield verify.Case("fake_op", "torch", torch.float32, "raises", lambda: 1 / 0)

    monkeypatch.setattr(verify, "CASE_SOURCES", (wrong, crashing))
    assert cli.cmd_check(argparse.Namespace(quick=True, json=False)) == 1
    out = capsys.readouterr().out
    assert "0/2 passed" in out and "ZeroDivisionError" in out


def test_importing_the_package_does_not_import_triton():
    # TRITON_INTERPRET is read when triton is first imported: the package must leave that moment to the user.
    code = "import sys, transformer_kernels; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stderr
