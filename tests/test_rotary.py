"""rotary on every backend against the reference: both layouts, partial rotary, position tables, in place."""

import pytest
import torch

import transformer_kernels as tk
from transformer_kernels import reference
from transformer_kernels.tools.testing import assert_rows, compare

BACKENDS = ["triton", "cuda", "torch"]
KERNEL_BACKENDS = ["triton", "cuda"]


def table(positions: int, r: int, interleaved: bool, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' cos/sin tables: the frequencies duplicated over the two halves (GPT-NeoX) or pairwise (GPT-J)."""
    inv = 1.0 / 10000 ** (torch.arange(0, r, 2).float() / r)
    angles = torch.outer(torch.arange(positions).float(), inv)
    angles = angles.repeat_interleave(2, -1) if interleaved else torch.cat((angles, angles), -1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def joined(pair):
    return torch.cat([t.flatten() for t in pair])


def check(backend, q, k, cos, sin, pos, interleaved, what):
    def ours(q, k):
        with tk.use_backend(backend):
            return joined(tk.ops.rotary(q, k, cos, sin, pos, interleaved=interleaved))

    def ref(q, k):
        return joined(reference.rotary(q, k, cos, sin, pos, interleaved=interleaved))

    assert_rows(compare(ours, ref, {"q": q, "k": k}, grad_of=("q", "k")), what)


# Head dims 64/80/128/256 with their rotated dims (80: Phi-2's partial rotary of 32).
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize("d,r", [(64, 64), (80, 32), (128, 128), (256, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layouts_head_dims(backend, interleaved, d, r, dtype, device):
    g = torch.Generator().manual_seed(d + r)
    # q as transformers holds it: a [B, L, H, D] projection seen as [B, H, L, D]; GQA: fewer k heads.
    q = torch.randn(2, 5, 3, d, generator=g).to(dtype).to(device).transpose(1, 2)
    k = torch.randn(2, 1, 5, d, generator=g).to(dtype).to(device)
    cos, sin = table(5, r, interleaved)
    # Per-token tables [B, L, R] as transformers' rotary embedding returns them, in the model's dtype.
    cos, sin = (t.to(dtype).to(device).expand(2, 5, r) for t in (cos, sin))
    check(backend, q, k, cos, sin, None, interleaved, f"{backend} D{d} R{r} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_position_ids_with_gaps_and_in_place(backend, device):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, h, 7, 64, generator=g).to(device) for h in (4, 2))
    cos, sin = (t.to(device) for t in table(40, 48, False))
    # Odd positions with gaps, a batch each of its own, int32; then one row of positions for the whole batch.
    pos = torch.tensor([[0, 3, 4, 11, 12, 30, 39], [1, 2, 5, 8, 13, 21, 34]], dtype=torch.int32, device=device)
    check(backend, q, k, cos, sin, pos, False, f"{backend} position_ids")
    check(backend, q, k, cos, sin, pos[0], False, f"{backend} shared position_ids")
    want_q, want_k = reference.rotary(q, k, cos, sin, pos)
    q2, k2 = q.clone(), k.clone()
    got = tk.ops.rotary(q2, k2, cos, sin, pos, inplace=True, backend=backend)
    assert got[0] is q2 and got[1] is k2
    assert torch.equal(q2, tk.ops.rotary(q, k, cos, sin, pos, backend=backend)[0])
    assert_rows([("q", (q2 - want_q).abs().max().item(), 1e-5), ("k", (k2 - want_k).abs().max().item(), 1e-5)])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_position_outside_the_table_is_nan(backend, device):
    q, k = torch.ones(1, 2, 3, 16, device=device), torch.ones(1, 1, 3, 16, device=device)
    cos, sin = (t.to(device) for t in table(4, 16, False))
    q_rot, k_rot = tk.ops.rotary(q, k, cos, sin, torch.tensor([0, 4, -1], device=device), backend=backend)
    assert q_rot[:, :, 0].isfinite().all() and k_rot[:, :, 0].isfinite().all()
    assert q_rot[:, :, 1:].isnan().all() and k_rot[:, :, 1:].isnan().all()


def test_bad_inputs(device):
    q, k = torch.randn(1, 2, 3, 16, device=device), torch.randn(1, 2, 3, 16, device=device)
    cos, sin = table(3, 16, False)
    with pytest.raises(ValueError, match="even"):
        tk.ops.rotary(q, k, cos[:, :15], sin[:, :15])
    with pytest.raises(ValueError, match="cos/sin must be"):
        tk.ops.rotary(q, k, cos[:2], sin[:2])
    with pytest.raises(ValueError, match="k must match q"):
        tk.ops.rotary(q, k[..., :8], cos, sin)
    with pytest.raises(TypeError, match="position_ids"):
        tk.ops.rotary(q, k, cos, sin, torch.zeros(3))
    with pytest.raises(ValueError, match="inplace"):
        tk.ops.rotary(q.requires_grad_(), k, cos, sin, inplace=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck(backend, device):
    q, k = torch.randn(1, 2, 3, 16, device=device), torch.randn(1, 1, 3, 16, device=device)
    cos, sin = table(5, 8, True)
    pos = torch.tensor([[4, 0, 2]], device=device)
    torch.library.opcheck(torch.ops.transformer_kernels.rotary.default,
                          (q.requires_grad_(), k.requires_grad_(), cos.to(device), sin.to(device), pos, True, backend))
