"""`make gpu-check OUT=<dir>`: every GPU verification and the quick benchmarks, as one command that fits 9 minutes
on one H100 with no network (a lent GPU is lent for 15 minutes in all).

Seen on an H200 (16 cores, 2026-11-26): the editable install with TK_CUDA_ARCHS=90 took about 40 s; the suite across
8 pytest-xdist workers did not finish in its 220 s (Triton's compiles); the benchmarks measured 142 of their 186
cases in 125 s, and a second run with RESUME=<the first run's results.csv> measured the rest.

Steps, each with its own time limit so one slow step cannot eat the others' time:
  env        the environment report (versions, GPU, which builds and backends load, and why not)
  tests      the whole test suite on CUDA tensors, gpu-marked tests included (JUnit XML per test)
  sanitizer  compute-sanitizer memcheck, racecheck and synccheck over tools/cuda_driver.py, which runs every CUDA
             C++ kernel once at small shapes
  bench      attention vs each SDPA backend and FlexAttention, GEMM + epilogue, FFN, norms vs torch and Liger-Kernel
Logs, results.csv and the PNG go into OUT; the last lines printed are the summary table: tests passed/failed per
file, sanitizer findings per tool, and per benchmark case our figure and the ratio to the best PyTorch baseline.

    python -m transformer_kernels.tools.gpu_check --out DIR [--dry-run]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from . import toolchain

SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    command: list[str]
    timeout_s: int
    log: str


def test_workers() -> list[str]:
    """pytest-xdist's arguments where it is installed: the GPU run's test time is mostly Triton's JIT compiles,
    which are CPU-bound and serial in one process, so one worker per two cores (at most 8) sharing the GPU."""
    if importlib.util.find_spec("xdist") is None:
        return []
    return ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]


def steps(out: Path, resume: Path | None = None) -> list[Step]:
    """The steps in order; their limits add up to 540 s, inside the 9 minutes with room for the install."""
    py = sys.executable
    sanitizer = toolchain.compute_sanitizer()
    # The ahead-of-time resource compiles and the simulator's mutation and sanitizer builds check CPU-side facts that
    # CI checks already; the GPU's minutes go to what only a GPU shows, the gpu-marked tests first (the whole suite
    # did not fit its limit on an H200).
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", "--ignore=tests/test_resources.py",
              "--ignore=tests/test_simt.py", "--ignore=tests/test_sanitizers.py", "-k", "not static_bench", "-rfE",
              "--durations=15", *test_workers()]
    out_steps = [
        Step("env", "environment report", [py, "-m", "transformer_kernels", "info", "--json"], 30, "env.json"),
        Step("gpu-tests", "the gpu-marked tests (large shapes, graphs, sync checks, two GPUs)",
             [*pytest, "-m", "gpu", f"--junitxml={out / 'gpu-tests.xml'}"], 80, "gpu-tests.log"),
        Step("tests", "the rest of the test suite on CUDA tensors",
             [*pytest, "-m", "not gpu", f"--junitxml={out / 'tests.xml'}"], 170, "tests.log"),
    ]
    for tool in SANITIZER_TOOLS:
        cmd = [str(sanitizer or "compute-sanitizer"), "--tool", tool, "--error-exitcode", "1",
               py, "-m", "transformer_kernels.tools.cuda_driver"]
        out_steps.append(Step(f"sanitizer-{tool}", f"compute-sanitizer {tool} over every CUDA C++ kernel", cmd, 45,
                              f"sanitizer-{tool}.log"))
    out_steps.append(Step("bench", "quick benchmarks (CSV, PNG, ratios to PyTorch)",
                          [py, "-m", "transformer_kernels.tools.gpu_check", "--bench-only", "--out", str(out),
                           *(["--resume", str(resume)] if resume else [])], 125,
                          "bench.log"))
    return out_steps


def run_step(step: Step, out: Path) -> tuple[int, float]:
    """(exit code, seconds); 124 when the step ran past its limit.

    A step past its limit gets SIGINT first and 15 s to wind down: pytest then still writes its JUnit XML and its
    summary of what failed so far, which a kill would lose."""
    start = time.monotonic()
    with (out / step.log).open("w") as log:
        try:
            proc = subprocess.Popen(step.command, stdout=log, stderr=subprocess.STDOUT)
        except FileNotFoundError as e:
            log.write(f"cannot run: {e}\n")
            return 127, time.monotonic() - start
        try:
            rc = proc.wait(timeout=step.timeout_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = 124
    return rc, time.monotonic() - start


def test_summary(xml_path: Path) -> list[tuple[str, int, int, int]]:
    """(test file, passed, failed or errored, skipped) from the JUnit XML pytest wrote."""
    if not xml_path.exists():
        return []
    per_file: dict[str, list[int]] = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        name = case.get("classname", "?").split(".")[-1]
        counts = per_file.setdefault(name, [0, 0, 0])
        if case.find("failure") is not None or case.find("error") is not None:
            counts[1] += 1
        elif case.find("skipped") is not None:
            counts[2] += 1
        else:
            counts[0] += 1
    return [(name, *counts) for name, counts in sorted(per_file.items())]


def sanitizer_findings(log: Path) -> str:
    """compute-sanitizer's own summary line ("ERROR SUMMARY: N errors"), or why there is none."""
    if not log.exists():
        return "not run"
    m = re.findall(r"ERROR SUMMARY: (\d+) error", log.read_text(errors="replace"))
    return f"{m[-1]} errors" if m else "no summary (see the log)"


def measured(csv_path: Path | None, gpu: str) -> set[tuple[str, str, str, str, str]]:
    """(op, impl, model, seq_len, pass) of the rows an earlier run on this GPU wrote into csv_path."""
    if csv_path is None or not csv_path.exists():
        return set()
    with csv_path.open() as f:
        return {(r["op"], r["impl"], r["model"], r["seq_len"], r["pass_"]) for r in csv.DictReader(f)
                if r["gpu"] == gpu}


def bench(out: Path, resume: Path | None = None) -> None:
    import torch

    from . import bench as bench_mod

    device = torch.device("cuda")
    cases = (bench_mod.quick_cases() + bench_mod.decode_cases() + bench_mod.varlen_cases(padded_lens=(1024,)) +
             bench_mod.lm_head_cases() + bench_mod.rotary_cases() + bench_mod.window_cases() +
             bench_mod.paged_cases())
    if importlib.util.find_spec("transformers") is not None:
        from . import bench_hf

        cases += bench_hf.hf_cases(bench_hf.QUICK_SHAPES)
    # A lease too short for every case: a second run goes on where the first stopped.
    done = measured(resume, bench_mod.device_name(device))
    cases = [c for c in cases if (c.op, c.impl, c.model, str(c.seq_len), "fwd+bwd" if c.backward else "fwd")
             not in done]
    # One case at a time, each appended to the CSV as it lands: a step stopped at its limit (SIGINT) keeps what
    # it measured, and the table, the plot and the ratios below are made from those rows.
    rows = []
    try:
        for i, case in enumerate(cases):
            print(f"[{i + 1}/{len(cases)}] {case.op} {case.impl} {case.model} {case.seq_len}", flush=True)
            timed = bench_mod.run_cases([case], device)
            bench_mod.append_csv(timed, device, out / "results.csv")
            rows += timed
    except KeyboardInterrupt:
        print(f"stopped at its limit after {len(rows)} of {len(cases)} cases", flush=True)
    bench_mod.plot_timings(rows, out / "attention_tflops_memory.png", model="D128 causal")
    print(bench_mod.format_timings(rows))
    (out / "ratios.json").write_text(json.dumps(bench_mod.compare_to_baselines(rows)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m transformer_kernels.tools.gpu_check", description=__doc__)
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check")
    parser.add_argument("--dry-run", action="store_true", help="list the steps and exit")
    parser.add_argument("--bench-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--resume", type=Path, help="skip the benchmark cases this results.csv holds for this GPU")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.bench_only:
        out.mkdir(parents=True, exist_ok=True)
        bench(out, args.resume)
        return 0
    plan = steps(out.resolve(), args.resume.resolve() if args.resume else None)
    if args.dry_run:
        total = sum(s.timeout_s for s in plan)
        print(f"gpu-check would write into {out} ({total} s of step limits):")
        for i, s in enumerate(plan, 1):
            print(f"  {i}. {s.name:20} {s.timeout_s:4d} s  {s.what}\n     $ {' '.join(s.command)}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for s in plan:
        print(f"[gpu-check] {s.name}: {s.what} (limit {s.timeout_s} s)", flush=True)
        results[s.name] = run_step(s, out)
    print("\n== gpu-check summary ==")
    for name, (rc, sec) in results.items():
        print(f"step {name:20} exit {rc:3d}  {sec:6.1f} s")
    print(f"\n{'test file':28} {'passed':>6} {'failed':>6} {'skipped':>7}")
    for name, passed, failed, skipped in test_summary(out / "gpu-tests.xml") + test_summary(out / "tests.xml"):
        print(f"{name:28} {passed:6d} {failed:6d} {skipped:7d}")
    for tool in SANITIZER_TOOLS:
        print(f"sanitizer {tool:10} {sanitizer_findings(out / f'sanitizer-{tool}.log')}")
    ratios = out / "ratios.json"
    if ratios.exists():
        print(f"\n{'benchmark case':40} {'ours':7} {'vs':14} {'figure':>14} {'ratio':>6}")
        for case, ours, base, figure, ratio, unit in json.loads(ratios.read_text()):
            print(f"{case:40} {ours:7} {base:14} {figure:8.1f} {unit:5} {ratio:6.2f}")
    return 0 if all(rc == 0 for rc, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
