"""`ops.attention_with_kvcache`: a decoding step reads a paged (or dense) KV cache in place on the triton backend —
against the reference over each sequence's gathered keys, with GQA, windows, empty sequences and shuffled blocks;
the interpreter's product count shows that only the blocks holding a sequence's keys are read; the new keys and
values land in the cache; the custom op passes opcheck."""

import pytest
import torch

import transformer_kernels as tk
from transformer_kernels import reference
from transformer_kernels.kernels import attention as triton_attention
from transformer_kernels.tools.testing import count_interpreted_work

B, H, HKV, D, BLOCK, NUM_BLOCKS, MAX_BLOCKS = 3, 8, 2, 32, 16, 24, 6


def _paged(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_cache, v_cache = (torch.randn(NUM_BLOCKS, BLOCK, HKV, D, generator=g).to(dtype) for _ in range(2))
    table = torch.randperm(NUM_BLOCKS, generator=g)[:B * MAX_BLOCKS].view(B, MAX_BLOCKS).int()  # non-contiguous
    q = torch.randn(B, 1, H, D, generator=g).to(dtype)
    return q, k_cache, v_cache, table


def _expected(q, k_cache, v_cache, table, lens, window=None):
    """Each sequence's attention over its gathered first lens[b] keys (the last query sees them all)."""
    outs = []
    for b, n in enumerate(lens):
        keys, values = (c[table[b].long()].flatten(0, 1)[:n].permute(1, 0, 2)[None].double() for c in (k_cache, v_cache))
        if window is not None:
            keys, values = keys[:, :, max(0, n - 1 - window[0]):], values[:, :, max(0, n - 1 - window[0]):]
        qb = q[b:b + 1].transpose(1, 2).double()
        outs.append(reference.scaled_dot_product_attention(qb, keys, values, enable_gqa=True).transpose(1, 2)
                    if n else torch.zeros_like(qb).transpose(1, 2))
    return torch.cat(outs)


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("window", [None, (20, -1)], ids=str)
def test_paged_decoding_matches_the_reference(backend, window):
    q, k_cache, v_cache, table = _paged()
    lens = [0, 37, 96]  # an empty sequence, a partial block, every block
    out = tk.ops.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor(lens, dtype=torch.int32),
                                        block_table=table, is_causal=True, window=window, backend=backend)
    torch.testing.assert_close(out.double(), _expected(q, k_cache, v_cache, table, lens, window), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dense_cache_decoding_in_low_precision(dtype):
    # A dense [B, L_cache, Hkv, D] cache is the paged kernel's with one block per sequence.
    g = torch.Generator().manual_seed(1)
    k_cache, v_cache = (torch.randn(B, 80, HKV, D, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(B, 1, H, D, generator=g).to(dtype)
    lens = torch.tensor([5, 80, 33], dtype=torch.int32)
    out, lse = tk.ops.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, return_lse=True,
                                             backend="triton")
    table = torch.arange(B, dtype=torch.int32)[:, None]
    expected = _expected(q.float(), k_cache.float(), v_cache.float(), table, lens.tolist())
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)
    torch_out, torch_lse = tk.ops.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, return_lse=True,
                                                         backend="torch")
    torch.testing.assert_close(out, torch_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, torch_lse, atol=2e-2, rtol=1e-3)


def test_only_the_blocks_of_each_sequence_are_read():
    # 32 x 32 interpreter tiles over 16-row blocks: sequence lengths 0, 37 and 96 visit 0, 2 and 3 key tiles of the 3
    # a full table would hold, once per KV head (the group's 4 query heads share a program's rows).
    q, k_cache, v_cache, table = _paged(torch.float16)
    tile = triton_attention.INTERPRETER_CONFIG
    with count_interpreted_work() as work:
        tk.ops.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([0, 37, 96], dtype=torch.int32),
                                      block_table=table, backend="triton")
    assert work.matmul_flops == 2 * 2 * tile.block_m * tile.block_n * D * (0 + 2 + 3) * HKV


def test_new_keys_and_values_are_appended_in_place():
    q, k_cache, v_cache, table = _paged()
    g = torch.Generator().manual_seed(3)
    k_new, v_new = (torch.randn(B, 1, HKV, D, generator=g) for _ in range(2))
    lens = torch.tensor([0, 37, 95], dtype=torch.int32)
    before = k_cache.clone()
    out = tk.ops.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, lens, table, backend="triton")
    for b, n in enumerate(lens.tolist()):
        block, row = table[b, n // BLOCK].item(), n % BLOCK
        assert torch.equal(k_cache[block, row], k_new[b, 0]) and torch.equal(v_cache[block, row], v_new[b, 0])
    changed = (k_cache != before).any(dim=(2, 3)).sum().item()
    assert changed == B
    torch.testing.assert_close(out.double(), _expected(q, k_cache, v_cache, table, [1, 38, 96]), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("per_sequence", [False, True], ids=["slopes[H]", "slopes[B,H]"])
def test_alibi_over_a_paged_cache_takes_each_sequences_positions(backend, per_sequence):
    # Two new queries appended at each sequence's end: query i of sequence b sits at lens[b] + i, so its bias is
    # −slope·|lens[b] + i − j| over that sequence's keys only (the gathered copy runs to the table's capacity). Not
    # causal, so the first query also sees a key after it: a bias with the wrong diagonal is then no longer a
    # per-row constant (which the softmax would cancel).
    q, k_cache, v_cache, table = _paged()
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, 2, H, D, generator=g)
    k_new, v_new = (torch.randn(B, 2, HKV, D, generator=g) for _ in range(2))
    slopes = torch.rand((B, H) if per_sequence else (H,), generator=g) + 0.2
    lens = [0, 37, 94]
    out = tk.ops.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, torch.tensor(lens, dtype=torch.int32),
                                        table, alibi_slopes=slopes, backend=backend)
    for b, n in enumerate(lens):
        keys, values = (c[table[b].long()].flatten(0, 1)[:n + 2].permute(1, 0, 2)[None].double()
                        for c in (k_cache, v_cache))
        qb = q[b:b + 1].transpose(1, 2).double()
        sb = slopes[b] if per_sequence else slopes
        expected = reference.scaled_dot_product_attention(qb, keys, values, enable_gqa=True,
                                                          causal_alignment="bottom_right", alibi_slopes=sb.double())
        torch.testing.assert_close(out[b:b + 1].double(), expected.transpose(1, 2), atol=2e-6, rtol=1e-5)
        plain = reference.scaled_dot_product_attention(qb, keys, values, enable_gqa=True)
        assert (plain - expected).abs().max() > 0.05  # the bias moved the output: a backend that dropped it fails


def test_alibi_on_a_decoding_step_leaves_the_paged_kernel_for_the_gathered_path():
    # The Triton paged-decode kernel has no ALiBi: a step with slopes runs the gathered path (a float mask holding the
    # bias), one with none the kernel; both against the reference.
    q, k_cache, v_cache, table = _paged()
    slopes = torch.linspace(0.1, 0.8, H)
    lens = torch.tensor([0, 37, 96], dtype=torch.int32)
    with count_interpreted_work() as work:
        out = tk.ops.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, block_table=table,
                                            alibi_slopes=slopes, backend="triton")
    assert "attn_decode_paged_kernel" not in work.launches
    for b, n in enumerate(lens.tolist()):
        keys, values = (c[table[b].long()].flatten(0, 1)[:n].permute(1, 0, 2)[None].double() for c in (k_cache, v_cache))
        qb = q[b:b + 1].transpose(1, 2).double()
        expected = (reference.scaled_dot_product_attention(qb, keys, values, enable_gqa=True,
                                                           causal_alignment="bottom_right", alibi_slopes=slopes.double())
                    if n else torch.zeros_like(qb))
        torch.testing.assert_close(out[b:b + 1].double(), expected.transpose(1, 2), atol=2e-6, rtol=1e-5)
    with count_interpreted_work() as work:
        tk.ops.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, block_table=table, backend="triton")
    assert "attn_decode_paged_kernel" in work.launches


def test_paged_decode_opcheck():
    q, k_cache, v_cache, table = _paged()
    args = (q.transpose(1, 2), k_cache, v_cache, table, torch.tensor([0, 37, 96], dtype=torch.int32), 0.2, 10, "triton")
    torch.library.opcheck(torch.ops.transformer_kernels.paged_decode.default, args)


def test_bad_caches_raise():
    q, k_cache, v_cache, table = _paged()
    with pytest.raises(ValueError, match="block_table"):
        tk.ops.attention_with_kvcache(q, k_cache, v_cache, block_table=table.long())
    with pytest.raises(ValueError, match="k_new and v_new"):
        tk.ops.attention_with_kvcache(q, k_cache, v_cache, k_new=q, block_table=table)
    with pytest.raises(ValueError, match="one dtype"):
        tk.ops.attention_with_kvcache(q.half(), k_cache, v_cache, block_table=table)
    with pytest.raises(ValueError, match="window"):
        tk.ops.attention_with_kvcache(q, k_cache, v_cache, block_table=table, window=(-3, 0))
