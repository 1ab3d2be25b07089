"""`python -m transformer_kernels info | check | bench`.

info   versions, CUDA toolkit, GPU, which builds and backends load (and why not)
check  environment report, then every op on every backend here against the reference; exit 1 on failure
bench  with a GPU: timings of every op (CSV + PNG); without one: the static resource report of every shipped
       kernel (sm_80 / sm_90 and nvcc arches) and the analytic memory traffic of each fused op (table + PNG)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path

import torch

# Triton reads TRITON_INTERPRET once, at import: without a GPU its kernels can only run interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning


def environment() -> dict[str, str]:
    from .. import __version__, _ext, backends
    from . import toolchain

    try:
        import triton

        triton_version = triton.__version__
    except ImportError as e:
        triton_version = f"not installed ({e})"
    env = {
        "transformer_kernels": __version__,
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        "triton": triton_version,
        "nvcc": str(toolchain.nvcc() or "not found"),
        "GPU": "none",
    }
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        env["GPU"] = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    for build in ("_C", "_C_host"):
        ok, why = _ext.available(build)
        env[f"build {build}"] = "loaded" if ok else why
    if env["build _C"] == "loaded" and not torch.cuda.is_available():
        env["build _C"] = "loaded (no CUDA device: its kernels cannot run here)"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in ("triton", "cuda"):
        ok, why = backends.status(name, device)
        mode = {"triton": "interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "GPU",
                "cuda": "_C on the GPU" if device.type == "cuda" else "_C_host simulator"}[name]
        env[f"backend {name}"] = f"available ({mode})" if ok else f"unavailable: {why}"
    env["backend torch"] = "available (eager.py: PyTorch's own ops)"
    return env


def print_environment() -> None:
    env = environment()
    width = max(map(len, env))
    for k, v in env.items():
        print(f"{k:{width}}  {v}")


def cmd_info(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(environment(), indent=2))
    else:
        print_environment()
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from . import verify

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.json:
        print_environment()
        print()
    todo = verify.cases(device, quick=args.quick)
    tty = sys.stderr.isatty()

    def progress(i: int, n: int, c: verify.Case) -> None:
        width = 30
        bar = "#" * (width * i // n) + "." * (width - width * i // n)
        line = f"[{bar}] {i}/{n} {c.op} {c.impl} {str(c.dtype).removeprefix('torch.')} {c.label}"
        print(f"\r{line[:110]:110}" if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    results = verify.run_cases(todo, progress)
    if tty:
        print("\r" + " " * 110 + "\r", end="", file=sys.stderr)
    failed = [r for r in results if not r.ok]
    if args.json:
        print(json.dumps([{"op": r.op, "impl": r.impl, "dtype": r.dtype, "case": r.case, "ok": r.ok,
                           "failure": r.failure, "errors": r.errors} for r in results], indent=1))
    else:
        print(verify.format_results(results))
        print(f"\n{len(results) - len(failed)}/{len(results)} passed" + (f", {len(failed)} FAILED" if failed else ""))
    return 1 if failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    out_dir = Path(args.out) if args.out else bench.RESULTS_DIR
    if args.host:
        from . import bench_host

        rows = bench_host.run(calls=50 if args.quick else 200)
        print(bench_host.format_rows(rows))
        path = bench_host.append_csv(rows, out_dir / "host.csv")
        over = [r for r in rows if r.ratio > r.target]
        print(f"\n{len(rows) - len(over)}/{len(rows)} rows within their targets; appended to {path}")
        return 0
    if args.memory:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        tokens, hidden = (bench.LM_HEAD_TOKENS, bench.LM_HEAD_HIDDEN) if device.type == "cuda" else \
            bench.LM_HEAD_CPU_SHAPE
        print(f"LM-head loss step (forward + backward), peak memory beyond the inputs, {tokens} tokens x {hidden}, "
              f"bf16, on {device.type}")
        for vocab in bench.LM_HEAD_VOCABS:
            rows = bench.lm_head_memory(device, tokens, hidden, vocab, torch.bfloat16)
            pair = rows[-1][1]
            for name, mib in rows:
                print(f"  vocab {vocab:>6}  {name:28} {mib:9.1f} MiB  {mib / pair:6.1%} of the unfused pair")
        return 0
    if torch.cuda.is_available() and not args.static:
        seq_lens = (512, 1024) if args.quick else bench.SEQ_LENS
        table, csv_path, png = bench.gpu_report(torch.device("cuda"), out_dir, seq_lens=seq_lens)
        print(table)
        if importlib.util.find_spec("transformers") is not None:
            from . import bench_hf

            shapes = bench_hf.QUICK_SHAPES if args.quick else tuple(bench_hf.HF_SHAPES)
            rows = bench.run_cases(bench_hf.hf_cases(shapes), torch.device("cuda"))
            bench.append_csv(rows, torch.device("cuda"), csv_path)
            print("\nHugging Face train step (forward + backward, bf16)\n" + bench_hf.format_tokens_per_second(rows))
        print(f"\nappended to {csv_path}; plot: {png}")
        return 0
    print("No GPU: static report (ahead-of-time compiles for sm_80/sm_90 and analytic memory traffic; no timings).\n")
    text, spills, png = bench.static_report(out_dir)
    print(text)
    print(f"\nplot: {png}")
    return 1 if spills else 0


def main(argv: list[str] | None = None) -> int:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="python -m transformer_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"transformer-kernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, GPU, builds and backends")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_info)
    p = sub.add_parser("check", help="verify every op on every backend against the reference")
    p.add_argument("--quick", action="store_true", help="fewer sizes")
    p.add_argument("--json", action="store_true", help="results as JSON on stdout")
    p.set_defaults(fn=cmd_check)
    p = sub.add_parser("bench", help="GPU timings, or without a GPU the static resource and memory-traffic report")
    p.add_argument("--quick", action="store_true", help="fewer sequence lengths")
    p.add_argument("--static", action="store_true", help="the static report even on a GPU machine")
    p.add_argument("--host", action="store_true",
                   help="host time per op call against PyTorch's op (kernel launches stubbed without a GPU)")
    p.add_argument("--memory", action="store_true",
                   help="peak memory of the fused LM-head loss against the unfused pair (CPU: launches stubbed)")
    p.add_argument("--out", default=None, help="folder for the CSV and PNG files (default: $TK_BENCH_DIR or bench_results)")
    p.set_defaults(fn=cmd_bench)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
