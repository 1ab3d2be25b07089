"""The dispatch layer: one launcher module per (op family, kernel backend), interchangeable."""

import inspect

import pytest
import torch


def test_the_family_table_is_the_only_list():
    # families.FAMILIES is the one list of op families: every file, launcher module, op and check row that exists must
    # be in it, and everything in it must exist. A forgotten entry fails here.
    from pathlib import Path

    from transformer_kernels import backends, families, ops
    from transformer_kernels.tools import verify

    root = Path(families.__file__).resolve().parent
    assert {p.name for p in (root.parent / "csrc").glob("*.cu")} == set(families.CUDA_SOURCES)
    kernel_files = {p.stem for p in (root / "kernels").glob("*.py") if "def aot_variants" in p.read_text()}
    assert kernel_files == set(families.FAMILIES)
    assert {p.stem for p in (root / "cuda").glob("*.py") if not p.stem.startswith("_")} == set(families.FAMILIES)
    assert set(backends.GPU_PREFERENCE) == set(families.OPS)
    assert set(families.OPS) <= set(ops.__all__)
    for family in families.FAMILIES:
        assert backends.launchers(family, "triton").__name__.endswith(f".kernels.{family}")
    checked = {case.op for case in verify.cases(torch.device("cpu"), quick=True)}
    assert set(families.OPS) <= checked, set(families.OPS) - checked


@pytest.mark.parametrize("family", list(__import__("transformer_kernels.families").families.FAMILIES))
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


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_every_kernel_launch_is_guarded_by_its_tensors_device(backend, device, monkeypatch):
    # Triton and the bindings launch on the *current* CUDA device: every custom op body must first switch to its
    # tensors' device (backends.on_device). Recorded here on whatever device the suite runs on.
    import transformer_kernels as tk
    from transformer_kernels import backends

    seen = []
    real = backends.on_device
    monkeypatch.setattr(backends, "on_device", lambda t: seen.append(t.device) or real(t))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, generator=g).to(device).requires_grad_()
    w = torch.randn(8, 8, generator=g).to(device).requires_grad_()
    with tk.use_backend(backend):
        y = tk.ops.linear(x, w, activation="gelu")
        y = tk.ops.layer_norm(y, residual=x)
        y = tk.ops.masked_softmax(y, is_causal=False)
        q = y.view(2, 1, 4, 8)
        out = tk.ops.attention(q, q, q, is_causal=True)
        out.sum().backward()
    # forward and backward of linear, norm, softmax and attention
    assert len(seen) == 8 and set(seen) == {x.device}


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_tensors_on_the_second_gpu_run_there_while_the_first_is_current(backend):
    import transformer_kernels as tk
    from transformer_kernels import reference

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 300, 64, generator=g).half().to("cuda:1").requires_grad_() for _ in range(3))
    torch.cuda.set_device(0)
    with tk.use_backend(backend):
        out = tk.ops.attention(q, k, v, is_causal=True)
        out.sum().backward()
    torch.cuda.synchronize(1)
    ref = reference.scaled_dot_product_attention(*(t.detach().float() for t in (q, k, v)), is_causal=True)
    assert out.device == q.device and q.grad.device == q.device
    assert (out.float() - ref).abs().max().item() < 2e-2


def test_a_cuda_build_that_cannot_launch_is_reported_unavailable(monkeypatch):
    # _C links cudart statically: it imports under a driver older than its toolkit, and only a launch fails.
    from types import SimpleNamespace

    import transformer_kernels as tk
    from transformer_kernels import _ext, backends

    why = "CUDA driver version is insufficient for CUDA runtime version"
    current = {"device": 0}

    class switch:  # torch.cuda.device on a machine that has none
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            self.old, current["device"] = current["device"], self.index

        def __exit__(self, *exc):
            current["device"] = self.old

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["device"])
    monkeypatch.setattr(torch.cuda, "device", switch)
    monkeypatch.setattr(_ext, "load", lambda name: SimpleNamespace(probe=lambda: why))
    monkeypatch.setattr(_ext, "_launch_problems", {})
    cuda = torch.device("cuda")
    ok, reason = backends.cuda_status(cuda)
    assert not ok and why in reason
    q = torch.empty(1, 1, 4, 16)
    assert backends.resolve_for("attention", "attention", cuda, "auto", q, q, q) == "triton"
    with pytest.raises(RuntimeError, match="insufficient"), tk.use_backend("cuda"):
        backends.resolve("attention", cuda)
    monkeypatch.setattr(_ext, "_launch_problems", {})
    monkeypatch.setattr(_ext, "load", lambda name: SimpleNamespace(probe=lambda: ""))
    assert backends.cuda_status(cuda) == (True, "")
    # A node mixing architectures: each device is probed on itself, and one that cannot launch is not used.
    monkeypatch.setattr(_ext, "_launch_problems", {})
    monkeypatch.setattr(_ext, "load", lambda name: SimpleNamespace(
        probe=lambda: "" if current["device"] == 0 else "no kernel image is available for execution on the device"))
    assert backends.cuda_status(torch.device("cuda", 0)) == (True, "")
    ok, reason = backends.cuda_status(torch.device("cuda", 1))
    assert not ok and "no kernel image" in reason and "cuda:1" in reason
    assert _ext._launch_problems.keys() == {0, 1}


def test_the_cuda_probe_runs_in_both_builds():
    from transformer_kernels import _ext

    assert _ext.load("_C_host").probe() == ""  # the simulator runs every kernel
    ok, _ = _ext.available("_C")
    if ok and not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            _ext.load("_C").probe()


def test_auto_follows_the_training_order_when_the_call_will_be_differentiated(monkeypatch):
    import transformer_kernels as tk
    from transformer_kernels import backends

    monkeypatch.setattr(backends, "status", lambda name, device: (True, ""))
    cuda = torch.device("cuda")
    assert backends.resolve("layer_norm", cuda) == backends.GPU_PREFERENCE["layer_norm"][0] == "triton"
    assert backends.resolve("layer_norm", cuda, training=True) == backends.TRAINING_PREFERENCE["layer_norm"][0]
    assert backends.resolve("attention", cuda, training=True) == backends.GPU_PREFERENCE["attention"][0]
    seen = []
    real = backends.resolve_for
    monkeypatch.setattr(backends, "resolve_for", lambda *a, **kw: seen.append(kw["training"]) or real(*a, **kw))
    x, w = torch.randn(3, 8), torch.ones(8, requires_grad=True)
    tk.ops.layer_norm(x, w)
    tk.ops.rms_norm(x)
    with torch.no_grad():
        tk.ops.layer_norm(x, w)
    assert seen == [True, False, False]
