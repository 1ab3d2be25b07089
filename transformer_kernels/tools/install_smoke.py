"""`python -m transformer_kernels.tools.install_smoke [--with-simulator]`: an installation works from outside the
checkout. Without the C++ modules (built where no CUDA toolkit was found) the cuda backend says why it cannot run;
`auto`, the Triton (interpreted on the CPU) and torch backends, and with ``--with-simulator`` the cuda backend on
`_C_host`, match the reference. `make install-check` runs it from outside the checkout; exit 1 on any
failure."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: CPU tensors run interpreted

import torch

import transformer_kernels as tk
from transformer_kernels import backends, reference


def main(argv: list[str] | None = None) -> int:
    # --with-simulator: the installation built _C_host (a toolkit's headers were there): the cuda backend runs too.
    with_simulator = "--with-simulator" in (sys.argv[1:] if argv is None else argv)
    cpu = torch.device("cpu")
    ok, why = backends.status("cuda", cpu)
    if with_simulator:
        assert ok, f"expected the cuda backend on _C_host, got: {why}"
    else:
        assert not ok and "_C_host" in why, f"expected the cuda backend unavailable without _C_host, got {ok}, {why!r}"
        print(f"cuda backend: unavailable ({why.split(';')[0]})")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 32, generator=g) for _ in range(3))
    x, w, b = torch.randn(24, 64, generator=g), torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    gamma, beta = torch.randn(64, generator=g), torch.randn(64, generator=g)
    expected = {
        "attention": reference.scaled_dot_product_attention(q, k, v, is_causal=True),
        "linear": reference.linear(x, w, b, "gelu"),
        "layer_norm": reference.layer_norm(x, gamma, beta),
    }
    for backend in ("auto", "triton", "torch", *(("cuda",) if with_simulator else ())):
        got = {
            "attention": tk.ops.attention(q, k, v, is_causal=True, backend=backend),
            "linear": tk.ops.linear(x, w, b, "gelu", backend=backend),
            "layer_norm": tk.ops.layer_norm(x, gamma, beta, backend=backend),
        }
        for name, want in expected.items():
            torch.testing.assert_close(got[name], want.to(got[name].dtype), atol=2e-4, rtol=2e-4,
                                       msg=lambda m, n=name, bk=backend: f"{n} on {bk}: {m}")
        print(f"{backend:6} backend: attention, linear, layer_norm match the reference")
    print(f"transformer_kernels imported from {os.path.dirname(tk.__file__)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
