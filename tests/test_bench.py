"""`python -m transformer_kernels bench`: the GPU path run with only the timer faked, and the static report."""

import csv
import os

import pytest
import torch

from transformer_kernels.tools import bench, cli

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def test_fused_ops_move_fewer_bytes_than_the_unfused_sequence():
    rows = bench.memory_traffic("bert-base", 512)
    assert {r.op for r in rows} >= {"attention", "linear+bias+gelu+residual", "layer_norm+residual", "feed_forward"}
    for r in rows:
        assert 0 < r.fused_bytes < r.unfused_bytes, r
    norm = next(r for r in rows if r.op == "layer_norm+residual")
    tokens_x_embed = 8 * 512 * 768
    # fused: read x and residual, write the sum and y; unfused: add (2 reads, 1 write) then norm (1 read, 1 write)
    assert norm.fused_bytes == 2 * 4 * tokens_x_embed and norm.unfused_bytes == 2 * 5 * tokens_x_embed
    assert "saving" in bench.format_traffic(rows)


def test_attention_flop_count():
    assert bench.attention_flops(1, 1, 128, 128, 64, False, False) == 4 * 128 * 128 * 64
    assert bench.attention_flops(2, 3, 128, 128, 64, True, True) == 4 * 2 * 3 * 128 * 128 * 64 * 0.5 * 3.5


def test_gpu_path_with_a_fake_timer(tmp_path, monkeypatch):
    # a GPT-2-shaped family at toy width, so the real forward and backward of every case run quickly on the CPU
    monkeypatch.setitem(bench.MODELS, "tiny-gpt", (2, 2, 16, 32, 64))
    monkeypatch.setitem(bench.FAMILIES, "tiny-gpt", "decoder")
    calls = []

    def fake_timer(step, quantiles):
        step()  # the real forward (and backward) runs once; only the timing is made up
        calls.append(quantiles)
        return 2.0, 1.5, 2.5

    monkeypatch.setattr(bench, "DECODE_KEYS", (300,))
    monkeypatch.setattr(bench, "DECODE_HEAD_DIM", 16)
    for name, value in (("VARLEN_PADDED_LENS", (24,)), ("VARLEN_BATCH", 3), ("VARLEN_HEADS", 2),
                        ("VARLEN_HEAD_DIM", 16)):
        monkeypatch.setattr(bench, name, value)
    table, csv_path, png = bench.gpu_report(torch.device("cpu"), tmp_path, timer=fake_timer, models=("tiny-gpt",),
                                            seq_lens=(16, 32), dtype=torch.float32)
    # On CPU tensors Triton runs only interpreted (the suite's machine); on a GPU machine its cases are skipped.
    ours = "triton" if INTERPRETED else "cuda"
    n_cases = sum(1 for c in bench.cases(("tiny-gpt",), (16, 32), torch.float32) if INTERPRETED or c.impl != "triton")
    decode = [r["impl"] for r in csv.DictReader(csv_path.open()) if r["op"] == "attention_decode"]
    assert "cuda" in decode and ("triton" in decode) == INTERPRETED  # a backend that refuses CPU tensors is skipped
    # the graph-replay cases exist and need a GPU: skipped here
    assert {c.impl for c in bench.decode_cases()} >= {"triton" + bench.GRAPHED, "cuda" + bench.GRAPHED}
    assert not any(impl.endswith(bench.GRAPHED) for impl in decode)
    n_cases += len(decode)
    varlen = [(r["op"], r["impl"]) for r in csv.DictReader(csv_path.open()) if r["op"] in ("attention_varlen",
                                                                                         "attention_padded")]
    # forward and forward+backward: packed on our kernels, padded on ours and SDPA
    assert sorted(set(varlen)) == sorted({("attention_varlen", ours), ("attention_padded", ours),
                                          ("attention_padded", "sdpa")} | ({("attention_varlen", "cuda"),
                                                                           ("attention_padded", "cuda")}))
    assert len(varlen) == 2 * len(set(varlen))
    n_cases += len(varlen)
    assert len(calls) == n_cases and all(q == [0.5, 0.2, 0.8] for q in calls)
    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n_cases and rows[0]["gpu"] == "cpu"
    attn = next(r for r in rows if r["op"] == "attention" and r["impl"] == ours and r["pass_"] == "fwd"
                and r["seq_len"] == "32")
    b, h, d = bench.MODELS["tiny-gpt"][:3]
    expected = bench.attention_flops(b, h, 32, 32, d, True, False) / 2e-3 / 1e12
    assert abs(float(attn["tflops"]) - expected) < 1e-9
    assert png.exists() and png.stat().st_size > 1000
    assert all(op in table for op in ("attention", "feed_forward", "layer_norm", "layer"))


def test_static_bench_command_writes_the_report_and_plot(tmp_path, capsys):
    assert cli.main(["bench", "--static", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0 with spills" in out and "Memory traffic" in out and "attn_fwd" in out
    assert (tmp_path / "memory_traffic.png").stat().st_size > 1000


def test_hf_train_step_cases_run_with_a_fake_timer(monkeypatch):
    pytest.importorskip("transformers")
    from transformer_kernels.tools import bench_hf

    # the Llama family at toy width: every implementation's real forward and backward runs once on the CPU
    monkeypatch.setitem(bench_hf.HF_SHAPES, "tiny-llama", ("llama", 2, 16, {
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 64}))
    # On CPU tensors: Triton only where it runs interpreted, the CUDA C++ kernels on the simulator build.
    impls = ("triton", "cuda", "sdpa", "eager") if INTERPRETED else ("cuda", "sdpa", "eager")
    todo = bench_hf.hf_cases(("tiny-llama",), dtype=torch.float32, impls=impls)
    assert [c.impl for c in todo] == list(impls) and all(c.flops > 0 for c in todo)
    rows = bench.run_cases(todo, torch.device("cpu"), timer=lambda step, quantiles: (step(), (4.0, 3.0, 5.0))[1])
    assert [r.impl for r in rows] == list(impls)
    (shape, impl, tps, _), *_ = bench_hf.tokens_per_second(rows)
    assert (shape, impl) == ("tiny-llama", impls[0]) and tps == 2 * 16 / 4e-3
    assert "tokens/s" in bench_hf.format_tokens_per_second(rows)


def test_lm_head_and_rotary_cases_run(monkeypatch):
    # The GPU benchmark's new cases at toy sizes on the CPU: each maker builds a step that runs forward and backward
    # on our kernels and on the torch peer; the loss of the fused op equals the unfused pair's.
    monkeypatch.setattr(bench, "LM_HEAD_TOKENS", 6)
    monkeypatch.setattr(bench, "LM_HEAD_HIDDEN", 8)
    monkeypatch.setattr(bench, "LM_HEAD_VOCABS", (40,))
    monkeypatch.setattr(bench, "ROTARY_SHAPE", (1, 3, 2, 1, 16))
    device = torch.device("cpu")
    ours = "triton" if INTERPRETED else "cuda"
    cases = [c for c in bench.lm_head_cases(torch.float32) + bench.rotary_cases(torch.float32)
             if c.impl in (ours, "torch")]
    assert {(c.op, c.impl) for c in cases} == {(op, impl) for op in ("linear_cross_entropy", "rotary")
                                               for impl in (ours, "torch")}
    for c in cases:
        bench._step(c.make(device), c.backward)()
    losses = [c.make(device)().item() for c in cases if c.op == "linear_cross_entropy"]
    assert abs(losses[0] - losses[1]) < 1e-5


def test_window_cases_run(monkeypatch):
    # The sliding-window benchmark at a toy size on the CPU: every form (the window in the kernels, as a mask on our
    # kernels, as a mask to SDPA) gives the same output.
    monkeypatch.setattr(bench, "WINDOW_SHAPE", (1, 2, 40, 16))
    monkeypatch.setattr(bench, "WINDOW_LEFT", 6)
    device = torch.device("cpu")
    ours = "triton" if INTERPRETED else "cuda"
    cases = [c for c in bench.window_cases(torch.float32) if not c.backward and c.impl in (ours, "sdpa", "cuda+mask")]
    outs = []
    for c in cases:
        torch.manual_seed(0)  # the same q, k, v for every form
        outs.append(c.make(device)())
    assert len(outs) == 3
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)


def test_paged_cases_run(monkeypatch):
    # The paged-cache decoding benchmark at a toy size on the CPU: ours in place equals SDPA on the gathered keys.
    monkeypatch.setattr(bench, "PAGED_BATCH", 2)
    monkeypatch.setattr(bench, "PAGED_KEYS", (64,))
    monkeypatch.setattr(bench, "DECODE_HEADS", 4)
    monkeypatch.setattr(bench, "DECODE_KV_HEADS", 2)
    monkeypatch.setattr(bench, "DECODE_HEAD_DIM", 16)
    ours = "triton" if INTERPRETED else "cuda"
    cases = [c for c in bench.paged_cases(torch.float32) if c.impl in (ours, "sdpa")]
    outs = [c.make(torch.device("cpu"))() for c in cases]
    torch.testing.assert_close(outs[0], outs[1].transpose(1, 2), atol=1e-5, rtol=1e-5)
