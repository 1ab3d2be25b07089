"""Every instantiation of the CUDA C++ kernel templates runs at least once against the reference, forward and
backward: each element type with each mask kind in both softmax kernels, each element type with each padded head
dim in attention — for fp16/bf16 both forms of the forward (PLAIN: no mask tensor, padding, soft cap or dropout;
the general form), dense and packed. `make coverage` found instantiations no other test reached (their lines showed
uncovered)."""

import pytest
import torch
from test_varlen_attention import check_varlen

import transformer_kernels as tk
from transformer_kernels import _ext, reference
from transformer_kernels.cuda import attention as cuda_attention
from transformer_kernels.tools import testing
from transformer_kernels.tools.testing import assert_rows, compare

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MASKS = ["none", "bool", "same dtype", "fp32"]
# Head dims that pad to each instantiated block (16, 32, 64, 128, 256), up to each dtype's widest.
ATTENTION_CASES = [(dtype, d) for dtype in DTYPES for d in (8, 32, 40, 100, 128, 200)
                   if d <= cuda_attention.max_head_dim(dtype, torch.device("cpu"))]


@pytest.mark.parametrize("algo", ["warp", "block"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_softmax_instantiation(algo, mask_kind, dtype, device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 37, generator=g).to(dtype).to(device)
    m = torch.randn(5, 37, generator=g)
    mask = {"none": None, "bool": m > -0.5, "same dtype": m.to(dtype), "fp32": m}[mask_kind]
    mask = None if mask is None else mask.to(device)

    def ours(x):
        with testing.force_softmax_algo(algo):
            return tk.ops.masked_softmax(x, mask, 0.5, True, backend="cuda")

    def ref(x):
        mk = mask if mask is None or mask.dtype == torch.bool else mask.to(x.dtype)
        return reference.masked_softmax(x, mk, 0.5, True)

    assert_rows(compare(ours, ref, {"x": x}, grad_of=("x",)))


@pytest.mark.parametrize(("dtype", "head_dim"), ATTENTION_CASES, ids=str)
def test_every_attention_instantiation(dtype, head_dim, device):
    g = torch.Generator().manual_seed(head_dim)
    q = torch.randn(1, 2, 19, head_dim, generator=g).to(dtype).to(device)
    k, v = (torch.randn(1, 1, 23, head_dim, generator=g).to(dtype).to(device) for _ in range(2))
    bias = torch.randn(19, 23, generator=g).to(dtype).to(device)
    kw = {"attn_mask": bias, "is_causal": True, "causal_alignment": "bottom_right", "enable_gqa": True}

    def ours(q, k, v):
        return tk.ops.attention(q, k, v, **kw, backend="cuda")

    def ref(q, k, v):
        return reference.scaled_dot_product_attention(q, k, v, **{**kw, "attn_mask": bias.to(q.dtype)},
                                                      low_precision=q.dtype != torch.float32)

    assert_rows(compare(ours, ref, {"q": q, "k": k, "v": v}, grad_of=("q", "k", "v")))


# The PLAIN forms (csrc/attention_fwd.cu, attention_bwd.cu) visit the key tiles every query of a block sees by
# position first, with no test, then the edge tiles. 64 queries over 320 keys, bottom-right, window 200: at 64-key
# tiles (D <= 128) the block sees tiles 0 and 64 cut by the window's left edge, tile 128 whole (visited first), 192
# and 256 cut by the diagonal — so a visit order or a position test gone wrong shows (320 is a whole number of
# tiles; the packed case below has partial ones).
PLAIN_CASES = [(dtype, d) for dtype, d in ATTENTION_CASES if dtype != torch.float32]


@pytest.mark.parametrize(("dtype", "head_dim"), PLAIN_CASES, ids=str)
def test_every_plain_forward_instantiation(dtype, head_dim, device):
    g = torch.Generator().manual_seed(head_dim)
    q = torch.randn(1, 1, 64, head_dim, generator=g).to(dtype).to(device)
    k, v = (torch.randn(1, 1, 320, head_dim, generator=g).to(dtype).to(device) for _ in range(2))
    kw = {"is_causal": True, "causal_alignment": "bottom_right", "window": (200, -1)}

    def ours(q, k, v):
        return tk.ops.attention(q, k, v, **kw, backend="cuda")

    def ref(q, k, v):
        return reference.scaled_dot_product_attention(q, k, v, **kw, low_precision=True)

    assert_rows(compare(ours, ref, {"q": q, "k": k, "v": v}, grad_of=("q", "k", "v")))


@pytest.mark.parametrize("causal,window", [(None, None), ("top_left", None), ("bottom_right", (150, -1))], ids=str)
def test_plain_forward_packed(causal, window, device):
    # sequences of 0, 1, a partial tile and several tiles (the packed PLAIN instantiations' interior and edges; the
    # first sequence's second query block, bottom-right with the window, sees key tile 64 whole between two cut ones)
    kw = {} if causal is None else {"is_causal": True, "causal_alignment": causal}
    if window is not None:
        kw["window"] = window
    check_varlen("cuda", [130, 0, 1, 70], [200, 3, 0, 140], 2, 1, 64, torch.float16, device, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_narrow_forward_tile_on_a_100_kib_sm(dtype, device, monkeypatch):
    # sm_86/sm_89 (100 KiB of shared memory per SM) take the narrow tiles at D = 128 (the wide ones fit one block):
    # the forward's 32 keys, dK/dV's 16 queries, dQ's 16 keys. The launchers' choice follows the device's shared
    # memory, set here as such a device reports it. Both forms, dense and packed, forward and every gradient, and the
    # split-KV decoding path (its splits are whole 32-key tiles) against the reference; the argument blocks carry the
    # shared memory and the bindings name the tiles it selects.
    host = _ext.load("_C_host")
    monkeypatch.setattr(_ext, "smem_per_sm", lambda device: 100 * 1024)
    code = host.dtype_codes[str(dtype).split(".")[1]]
    assert host.attention_forward_narrow(code, 128, 100 * 1024) and host.attention_backward_narrow(code, 128, 100 * 1024)
    assert not host.attention_backward_narrow(code, 128, 164 * 1024)
    assert host.attention_forward_tile(host.dtype_codes["float16"], 128, 100 * 1024) == (64, 32)
    assert host.attention_forward_tile(host.dtype_codes["float16"], 128, 164 * 1024) == (64, 64)
    plans = []
    real_plan = cuda_attention._forward_plan
    monkeypatch.setattr(cuda_attention, "_forward_plan", lambda *a: plans.append(real_plan(*a)) or plans[-1])
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 64, 128, generator=g).to(dtype).to(device)
    k, v = (torch.randn(1, 1, 150, 128, generator=g).to(dtype).to(device) for _ in range(2))
    kpm = torch.zeros(1, 150, dtype=torch.bool, device=device)
    kpm[0, 140:] = True
    mask = (torch.randn(64, 150, generator=g) > -1.0).to(device)
    for kw in ({"is_causal": True, "causal_alignment": "bottom_right", "window": (70, -1)},  # PLAIN, cut tiles
               {"attn_mask": mask, "key_padding_mask": kpm, "is_causal": True}):  # the general form

        def ours(q, k, v, kw=kw):
            return tk.ops.attention(q, k, v, enable_gqa=True, **kw, backend="cuda")

        def ref(q, k, v, kw=kw):
            return reference.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw, low_precision=True)

        assert_rows(compare(ours, ref, {"q": q, "k": k, "v": v}, grad_of=("q", "k", "v")))
    step = torch.randn(1, 2, 1, 128, generator=g).to(dtype).to(device)
    torch.testing.assert_close(tk.ops.attention(step, k, v, enable_gqa=True, backend="cuda").float(),
                               reference.scaled_dot_product_attention(step.float(), k.float(), v.float(),
                                                                      enable_gqa=True), atol=2e-2, rtol=2e-2)
    assert plans[-1][1] > 1  # the decoding step was split
    assert plans and all(args["smem_per_sm"] == 100 * 1024 for args, _ in plans)
    forwards = []

    class Recorder:  # the module, recording the shared memory each attention launch carries
        def __getattr__(self, name):
            real = getattr(host, name)
            if name not in ("attention_forward", "attention_backward"):
                return real
            return lambda args, stream: forwards.append((name, args["smem_per_sm"])) or real(args, stream)

    monkeypatch.setattr(cuda_attention._ext, "module_for", lambda device: Recorder())
    check_varlen("cuda", [70, 0, 33], [90, 5, 40], 2, 1, 128, dtype, device, is_causal=True,
                 causal_alignment="bottom_right")
    assert set(forwards) == {("attention_forward", 100 * 1024), ("attention_backward", 100 * 1024)}
    forwards.clear()
    tk.ops.attention(q.detach().requires_grad_(), k, v, enable_gqa=True, is_causal=True, backend="cuda").sum().backward()
    assert set(forwards) == {("attention_forward", 100 * 1024), ("attention_backward", 100 * 1024)}


def _forward_form(q, k, v, mask=None, kpm=None, scale=0.125, dropout_p=0.0, softcap=0.0, window=None, alibi=None):
    host = _ext.load("_C_host")
    band = cuda_attention._key_band(window is not None, window, q.shape[2], k.shape[2])
    seed = torch.zeros(1, dtype=torch.int64) if dropout_p else None
    args = cuda_attention._args(host, q, k, v, mask, kpm, scale, band, 0, dropout_p, seed, softcap, alibi)
    return "plain" if host.attention_forward_plain(args) else "general"


def test_the_plain_forward_takes_every_call_position_alone_decides():
    # Unmasked fp16/bf16 calls, causal or windowed, run the PLAIN form; anything else the general one — so the
    # SASS budget (tests/test_resources.py) is the cost of the calls it names.
    q = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    k = v = torch.randn(1, 2, 24, 64, dtype=torch.float16)
    assert _forward_form(q, k, v) == "plain"
    assert _forward_form(q, k, v, window=(4, 0)) == "plain"
    assert _forward_form(q.bfloat16(), k.bfloat16(), v.bfloat16()) == "plain"
    assert _forward_form(q.float(), k.float(), v.float()) == "general"  # fp32: the FMA kernels
    assert _forward_form(q, k, v, mask=torch.zeros(1, 2, 8, 24, dtype=torch.float16)) == "general"
    assert _forward_form(q, k, v, kpm=torch.zeros(1, 24, dtype=torch.bool)) == "general"
    assert _forward_form(q, k, v, dropout_p=0.1) == "general"
    assert _forward_form(q, k, v, softcap=30.0) == "general"
    assert _forward_form(q, k, v, alibi=torch.ones(1, 2)) == "general"
    assert _forward_form(q, k, v, scale=-0.125) == "general"  # the row max over raw products needs scale > 0
    # K/V rows whose stride is no multiple of 16 bytes cannot be copied by cp.async chunks
    wide = torch.randn(1, 2, 24, 68, dtype=torch.float16)[..., :64]
    assert _forward_form(q, wide, v) == "general"
