"""The dispatch layer: one launcher module per (op family, kernel backend), interchangeable."""

import inspect

import pytest


@pytest.mark.parametrize("family", ["softmax", "attention", "norm", "linear"])
def test_both_kernel_backends_have_the_same_launchers(family):
    # ops/ calls a family's launchers by name and argument order whatever the backend: every public function of the
    # CUDA launcher module exists in the Triton one with the same parameter names.
    from transformer_kernels import backends

    triton_mod, cuda_mod = backends.launchers(family, "triton"), backends.launchers(family, "cuda")
    public = [n for n, f in vars(cuda_mod).items() if inspect.isfunction(f) and not n.startswith("_")
              and f.__module__ == cuda_mod.__name__]
    assert public and "unsupported" in vars(triton_mod)
    for name in [*public, "unsupported"]:
        theirs, ours = inspect.signature(getattr(cuda_mod, name)), inspect.signature(getattr(triton_mod, name))
        assert list(ours.parameters) == list(theirs.parameters), (family, name)
