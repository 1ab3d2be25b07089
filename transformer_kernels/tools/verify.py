"""The verification table behind `python -m transformer_kernels check`: every op on every backend that can
run here, against the reference, with the accuracy rule of `testing.py`.

On a CPU machine the Triton kernels run under the interpreter and the CUDA kernels through the `_C_host`
simulator build; on a GPU machine both run on the GPU. Each case returns one row per compared tensor.
"""

from __future__ import annotations

import contextlib
import itertools
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .. import backends, ops, reference
from . import testing
from .testing import compare

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Result:
    op: str
    impl: str
    dtype: str
    case: str
    errors: list[tuple[str, float, float]] = field(default_factory=list)  # (tensor, error, bound)
    failure: str = ""  # an exception the case raised

    @property
    def ok(self) -> bool:
        return not self.failure and all(err <= bound for _, err, bound in self.errors)

    def worst(self) -> tuple[str, float, float] | None:
        """The compared tensor closest to (or furthest past) its bound."""
        return max(self.errors, key=lambda r: r[1] / r[2] if r[2] else float("inf"), default=None)


@dataclass
class Case:
    op: str
    impl: str
    dtype: torch.dtype
    label: str
    run: Callable[[], list[tuple[str, float, float]]]


def implementations(op: str, device: torch.device) -> list[tuple[str, Callable[[], contextlib.AbstractContextManager]]]:
    """(label, context manager) for each backend (and CUDA kernel variant) that can run ``op`` here."""
    impls = []
    for name in ("triton", "cuda", "torch"):
        if name != "torch" and (name not in backends.GPU_PREFERENCE.get(op, ()) or not backends.status(name, device)[0]):
            continue
        if name == "cuda" and op == "masked_softmax":
            # Both CUDA softmax kernels, each forced on every row length.
            for algo in ("warp", "block"):
                impls.append((f"cuda-{algo}", lambda a=algo: _scoped("cuda", testing.force_softmax_algo(a))))
        else:
            impls.append((name, lambda n=name: _scoped(n)))
    return impls


@contextlib.contextmanager
def _scoped(backend: str, extra: contextlib.AbstractContextManager | None = None) -> Iterator[None]:
    with backends.use_backend(backend), (extra or contextlib.nullcontext()):
        yield


def _softmax_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    lengths = (1, 33, 1000) if quick else (1, 7, 33, 1000, 5000, 70000)
    for impl, scope in implementations("masked_softmax", device):
        for dtype in DTYPES:
            for n in lengths:
                # A long row runs alone and without causal masking, which would hide all but its first key.
                shape, causal = ((2, 1, n), False) if n > 5000 else ((2, 6, n), True)

                def run(shape=shape, causal=causal, dtype=dtype, scope=scope):
                    g = torch.Generator().manual_seed(shape[-1])
                    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(device)
                    n = shape[-1]
                    mask = (torch.rand(2, 1, n, generator=g) > 0.25).to(device)

                    def ours(x, mask):
                        with scope():
                            return ops.masked_softmax(x, mask, 0.7, is_causal=causal)

                    def ref(x, mask):
                        return reference.masked_softmax(x, mask, 0.7, is_causal=causal)

                    return compare(ours, ref, {"x": x, "mask": mask}, grad_of=("x",))
                yield Case("masked_softmax", impl, dtype, f"{list(shape)} bool{'+causal' if causal else ''}", run)


def _attention_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    # (label, B, H, Hkv, Lq, Lk, D or (D, Dv), mask builder): self, causal, padded, cross and GQA attention, and a
    # value head dim other than the query's.
    shapes = [
        ("self", 2, 2, 2, 33, 33, 64, lambda b, h, lq, lk, g: {}),
        ("causal", 2, 2, 2, 47, 47, 40, lambda b, h, lq, lk, g: {"is_causal": True}),
        ("padded", 2, 2, 2, 29, 29, 64, lambda b, h, lq, lk, g: {"key_padding_mask": torch.rand(b, lk, generator=g) < 0.3}),
        ("cross bias", 2, 2, 2, 17, 70, 32, lambda b, h, lq, lk, g: {"attn_mask": torch.randn(1, h, lq, lk, generator=g)}),
        ("gqa causal_br", 1, 4, 2, 21, 50, 64,
         lambda b, h, lq, lk, g: {"is_causal": True, "causal_alignment": "bottom_right", "enable_gqa": True,
                                  "attn_mask": torch.rand(b, 1, 1, lk, generator=g) > 0.2}),
        ("cross dv<d causal", 2, 2, 1, 19, 37, (48, 24),
         lambda b, h, lq, lk, g: {"is_causal": True, "enable_gqa": True}),
        ("wide head padded", 1, 2, 2, 20, 36, 128,
         lambda b, h, lq, lk, g: {"key_padding_mask": torch.rand(b, lk, generator=g) < 0.3}),
        ("gqa causal sinks", 1, 4, 2, 25, 25, 64,
         lambda b, h, lq, lk, g: {"is_causal": True, "enable_gqa": True, "sinks": torch.randn(h, generator=g) * 2}),
        ("causal softcap padded", 2, 2, 2, 31, 31, 64,
         lambda b, h, lq, lk, g: {"is_causal": True, "softcap": 0.5,
                                  "key_padding_mask": torch.rand(b, lk, generator=g) < 0.3}),
        ("gqa causal window padded", 1, 4, 2, 90, 90, 64,
         lambda b, h, lq, lk, g: {"is_causal": True, "enable_gqa": True, "window": (20, -1),
                                  "key_padding_mask": torch.rand(b, lk, generator=g) < 0.2}),
        ("cross window_br", 2, 2, 2, 24, 100, 32,
         lambda b, h, lq, lk, g: {"window": (9, 5), "causal_alignment": "bottom_right"}),
        ("gqa causal_br alibi padded", 2, 4, 2, 40, 56, 64,
         lambda b, h, lq, lk, g: {"is_causal": True, "causal_alignment": "bottom_right", "enable_gqa": True,
                                  "alibi_slopes": torch.rand(b, h, generator=g) * 0.5,
                                  "key_padding_mask": torch.rand(b, lk, generator=g) < 0.2}),
    ]
    if quick:
        shapes = shapes[1:3]
    for impl, scope in implementations("attention", device):
        for dtype in DTYPES:
            for label, b, h, hkv, lq, lk, d, masks in shapes:
                if "softcap" in label and impl == "triton":
                    continue  # the Triton kernels do not cap scores (the op refuses softcap on backend="triton")
                dqk, dv = d if isinstance(d, tuple) else (d, d)

                def run(b=b, h=h, hkv=hkv, lq=lq, lk=lk, dqk=dqk, dv=dv, masks=masks, dtype=dtype, scope=scope):
                    g = torch.Generator().manual_seed(lq * lk)
                    q, k, v = (torch.randn(s, generator=g).to(dtype).to(device)
                               for s in ((b, h, lq, dqk), (b, hkv, lk, dqk), (b, hkv, lk, dv)))
                    kw = {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in masks(b, h, lq, lk, g).items()}

                    def ours(q, k, v):
                        with scope():
                            return ops.attention(q, k, v, **kw)

                    def ref(q, k, v):
                        return reference.scaled_dot_product_attention(q, k, v, low_precision=q.dtype != torch.float32, **kw)

                    return compare(ours, ref, {"q": q, "k": k, "v": v}, grad_of=("q", "k", "v"))
                dims = dqk if dqk == dv else f"{dqk}x{dv}"
                yield Case("attention", impl, dtype, f"{label} [{b},{h},{lq}x{lk},{dims}]", run)


def _varlen_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    # (label, query lengths, key lengths, H, Hkv, D, options): packed sequences with empty ones on either side.
    shapes = [
        ("causal_br gqa", (5, 0, 17, 40), (7, 4, 0, 33), 4, 2, 64,
         {"is_causal": True, "causal_alignment": "bottom_right", "enable_gqa": True}),
        ("self", (13, 1, 30), (13, 1, 30), 2, 2, 40, {}),
        ("causal window", (13, 1, 60), (13, 1, 60), 2, 1, 64,
         {"is_causal": True, "window": (8, -1), "enable_gqa": True}),
        ("causal_br alibi", (9, 0, 30), (20, 3, 30), 2, 2, 32,
         {"is_causal": True, "causal_alignment": "bottom_right", "alibi_slopes": torch.tensor([0.3, 0.05])}),
    ]
    for impl, scope in implementations("varlen_attention", device):
        for dtype in DTYPES:
            for label, lens_q, lens_k, h, hkv, d, kw in shapes[:1] if quick else shapes:
                if ("window" in kw or "alibi_slopes" in kw) and impl == "triton":
                    continue  # no packed window or ALiBi in the Triton kernels (refused on backend="triton")
                def run(lens_q=lens_q, lens_k=lens_k, h=h, hkv=hkv, d=d, kw=kw, dtype=dtype, scope=scope):
                    kw = {n: x.to(device) if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
                    g = torch.Generator().manual_seed(sum(lens_q))
                    q, k, v = (torch.randn(s, generator=g).to(dtype).to(device)
                               for s in ((sum(lens_q), h, d), (sum(lens_k), hkv, d), (sum(lens_k), hkv, d)))
                    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32, device=device)
                                  for n in (lens_q, lens_k))

                    def ours(q, k, v):
                        with scope():
                            return ops.varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), **kw)

                    def ref(q, k, v):
                        return reference.varlen_attention(q, k, v, cu_q, cu_k, low_precision=q.dtype != torch.float32,
                                                          **{n: x for n, x in kw.items() if n != "enable_gqa"})

                    return compare(ours, ref, {"q": q, "k": k, "v": v}, grad_of=("q", "k", "v"))
                yield Case("varlen_attention", impl, dtype, f"{label} {list(lens_q)}x{list(lens_k)} D{d}", run)


def _norm_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    sizes = (37, 1000) if quick else (37, 1000, 4231, 8192)
    for op, fn, ref_fn in (("layer_norm", ops.layer_norm, reference.layer_norm), ("rms_norm", ops.rms_norm, reference.rms_norm)):
        for impl, scope in implementations(op, device):
            for dtype in DTYPES:
                for n in sizes:
                    def run(n=n, dtype=dtype, scope=scope, fn=fn, ref_fn=ref_fn, op=op):
                        g = torch.Generator().manual_seed(n)
                        x, r = ((torch.randn(4, 3, n, generator=g) * 2 + 1).to(dtype).to(device) for _ in range(2))
                        w = torch.randn(n, generator=g).to(dtype).to(device)
                        extra = (None,) if op == "layer_norm" else ()  # no bias: the [N] weight alone

                        def ours(x, r, w):
                            with scope():
                                y, s = fn(x, w, *extra, 1e-5, r, True)
                            return y + 0.5 * s

                        def ref(x, r, w):
                            y, s = ref_fn(x, w, *extra, 1e-5, r, True)
                            return y + 0.5 * s

                        return compare(ours, ref, {"x": x, "r": r, "w": w}, grad_of=("x", "r", "w"))
                    yield Case(op, impl, dtype, f"[4,3,{n}] +residual", run)


def _projection_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    """linear (gelu + bias + residual), gated_linear (swiglu), qkv_projection (GQA) and out_projection."""

    def rnd(g, *shape, scale=1.0):
        return torch.randn(shape, generator=g) * scale

    def linear_case(g):
        m, n, k = 37, 100, 341
        return ({"x": rnd(g, m, k), "w": rnd(g, n, k, scale=k**-0.5), "b": rnd(g, n), "r": rnd(g, m, n)},
                lambda x, w, b, r: ops.linear(x, w, b, "gelu", r),
                lambda x, w, b, r: reference.linear(x, w, b, "gelu", r))

    def gated_case(g):
        m, n, k = 45, 64, 100
        return ({"x": rnd(g, m, k), "wg": rnd(g, n, k, scale=0.1), "wu": rnd(g, n, k, scale=0.1)},
                lambda x, wg, wu: ops.gated_linear(x, wg, wu, activation="silu"),
                lambda x, wg, wu: reference.gated_linear(x, wg, wu, activation_name="silu"))

    def qkv_case(g):
        def cat(qkv):
            return torch.cat([t.flatten() for t in qkv])
        return ({"x": rnd(g, 2, 13, 64), "w": rnd(g, (4 + 2 * 2) * 16, 64, scale=0.125), "b": rnd(g, (4 + 2 * 2) * 16)},
                lambda x, w, b: cat(ops.qkv_projection(x, w, b, 4, 2)),
                lambda x, w, b: cat(reference.qkv_projection(x, w, b, 4, 2)))

    def out_case(g):
        return ({"a": rnd(g, 2, 4, 13, 16), "w": rnd(g, 64, 64, scale=0.125), "b": rnd(g, 64), "r": rnd(g, 2, 13, 64)},
                ops.out_projection, reference.out_projection)

    builders = {"linear": linear_case, "gated_linear": gated_case, "qkv_projection": qkv_case, "out_projection": out_case}
    for op, build in builders.items():
        for impl, scope in implementations(op, device):
            for dtype in DTYPES if not quick else DTYPES[:2]:
                def run(build=build, dtype=dtype, scope=scope):
                    inputs, ours_fn, ref_fn = build(torch.Generator().manual_seed(11))
                    inputs = {n: t.to(dtype).to(device) for n, t in inputs.items()}

                    def ours(*args):
                        with scope():
                            return ours_fn(*args)

                    return compare(ours, ref_fn, inputs, grad_of=tuple(inputs))
                yield Case(op, impl, dtype, op.replace("_", " "), run)


def _rotary_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    """GQA q/k in transformers' [B, L, H, D]-seen-as-[B, H, L, D] layout: a Llama-like full rotation (per-token
    tables), and a GPT-J interleaved partial one read from a position table."""
    shapes = [("neox per-token", 64, 64, False, False), ("gptj positions", 80, 32, True, True)]
    if quick:
        shapes = shapes[1:]
    for impl, scope in implementations("rotary", device):
        for dtype in DTYPES:
            for label, d, r, interleaved, by_position in shapes:
                def run(d=d, r=r, interleaved=interleaved, by_position=by_position, dtype=dtype, scope=scope):
                    g = torch.Generator().manual_seed(d)
                    q = torch.randn(2, 9, 4, d, generator=g).to(dtype).to(device).transpose(1, 2)
                    k = torch.randn(2, 2, 9, d, generator=g).to(dtype).to(device)
                    angles = torch.randn(16, r // 2, generator=g)
                    angles = angles.repeat_interleave(2, -1) if interleaved else torch.cat((angles, angles), -1)
                    cos, sin = angles.cos().to(device), angles.sin().to(device)
                    pos = torch.randint(0, 16, (2, 9), generator=g).to(device)
                    if not by_position:
                        cos, sin, pos = cos[pos].to(dtype), sin[pos].to(dtype), None

                    def ours(q, k):
                        with scope():
                            return torch.cat([t.flatten() for t in ops.rotary(q, k, cos, sin, pos, interleaved)])

                    def ref(q, k):
                        return torch.cat([t.flatten() for t in reference.rotary(q, k, cos, sin, pos, interleaved)])

                    return compare(ours, ref, {"q": q, "k": k}, grad_of=("q", "k"))
                yield Case("rotary", impl, dtype, f"{label} D{d} R{r}", run)


def _loss_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    """linear_cross_entropy over ragged chunks with ignored targets: mean with label smoothing and a bias, a softcapped
    sum, and per-token losses."""
    options = [("mean smooth bias", {"label_smoothing": 0.1}, True),
               ("sum softcap z-loss", {"reduction": "sum", "softcap": 5.0, "z_loss": 1e-3}, False),
               ("none", {"reduction": "none"}, False)]
    if quick:
        options = options[:1]
    for impl, scope in implementations("linear_cross_entropy", device):
        for dtype in DTYPES:
            for label, kw, has_bias in options:
                def run(kw=kw, has_bias=has_bias, dtype=dtype, scope=scope):
                    g = torch.Generator().manual_seed(3)
                    inputs = {"x": torch.randn(2, 23, 32, generator=g), "w": torch.randn(1100, 32, generator=g) * 0.2}
                    if has_bias:
                        inputs["b"] = torch.randn(1100, generator=g)
                    inputs = {n: t.to(dtype).to(device) for n, t in inputs.items()}
                    target = torch.randint(0, 1100, (2, 23), generator=g).to(device)
                    target[:, ::4] = -100

                    def ours(x, w, b=None):
                        with scope():
                            return ops.linear_cross_entropy(x, w, target, b, **kw)

                    def ref(x, w, b=None):
                        return reference.linear_cross_entropy(x, w, target, b, **kw)

                    return compare(ours, ref, inputs, grad_of=tuple(inputs))
                yield Case("linear_cross_entropy", impl, dtype, label, run)


def _architecture_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    """Each model family on each backend against the same model built on torch.nn layers with the same
    state_dict: logits (padded positions zeroed) and every parameter's gradient, fp32."""
    from .. import models
    from .testing import MODEL_RTOL, max_error, randomize_

    cfg = models.ModelConfig(vocab_size=53, d_model=32, nhead=4, num_layers=2, dim_feedforward=48, max_len=24)

    def tokens(g: torch.Generator, b: int, n: int) -> torch.Tensor:
        return torch.randint(0, cfg.vocab_size, (b, n), generator=g).to(device)

    def encoder_args(g):
        mask = torch.ones(2, 10, dtype=torch.long, device=device)
        mask[1, -3:] = 0
        return (tokens(g, 2, 10), mask), mask.bool().unsqueeze(-1)

    def decoder_args(g):
        return (tokens(g, 2, 9),), None

    def seq2seq_args(g):
        mask = torch.ones(2, 10, dtype=torch.long, device=device)
        mask[0, -4:] = 0
        return (tokens(g, 2, 10), tokens(g, 2, 6), mask), None

    archs = {"encoder (BERT)": (models.EncoderModel, encoder_args), "decoder (GPT)": (models.DecoderModel, decoder_args),
             "enc-dec (BART)": (models.EncoderDecoderModel, seq2seq_args)}
    for arch, (cls, make_args) in archs.items():
        for backend in ("triton", "cuda", "torch"):
            needed = ("attention", "linear", "qkv_projection", "out_projection", "layer_norm")
            if backend != "torch" and not (backends.status(backend, device)[0]
                                           and all(backend in backends.GPU_PREFERENCE[op] for op in needed)):
                continue

            def run(cls=cls, make_args=make_args, backend=backend):
                ref = randomize_(cls(cfg, layers="torch")).to(device).eval()
                ours = cls(cfg, layers="tk", backend=backend).to(device).eval()
                ours.load_state_dict(ref.state_dict())
                args, keep = make_args(torch.Generator().manual_seed(0))
                a, b = ref(*args), ours(*args)
                if keep is not None:  # torch.nn gives NaN/garbage on padded rows: compare the tokens only
                    a, b = a * keep, b * keep
                a.square().mean().backward()
                b.square().mean().backward()
                rows = [("logits", max_error(b, a), MODEL_RTOL * max(1.0, float(a.abs().max())))]
                grads = [(q.grad, p.grad) for p, q in zip(ref.parameters(), ours.parameters(), strict=True)]
                g_err = max(max_error(q, p) for q, p in grads)
                g_max = max(float(p.abs().max()) for _, p in grads)
                return [*rows, ("grads", g_err, MODEL_RTOL * max(1.0, g_max))]
            yield Case(arch, backend, torch.float32, "vs torch.nn layers", run)


def _huggingface_cases(device: torch.device, quick: bool) -> Iterator[Case]:
    """Each transformers family (tiny random config) converted onto each kernel backend against the same model on
    eager attention: logits and every parameter's gradient with right and left padding, and greedy generation with
    the KV cache (the count of differing tokens). Quick: Llama (GQA) only. Without transformers: none."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return
    from . import hf_testing

    families = ("llama",) if quick else hf_testing.FAMILIES
    for family in families:
        for backend in ("triton", "cuda"):
            if not backends.status(backend, device)[0]:
                continue

            def run(family=family, backend=backend):
                eager, ours = hf_testing.converted_pair(family, backend, device)
                rows = hf_testing.compare_family(family, backend, device, (eager, ours))
                if hf_testing.is_generator(family):
                    expected = hf_testing.generate(eager, family, device)
                    got = hf_testing.generate(ours, family, device)
                    # A count: any differing token fails (bound below 1).
                    rows.append((f"greedy tokens differing of {got.numel()}", float((got != expected).sum()), 0.5))
                return rows
            yield Case(f"hf {family}", backend, torch.float32, "vs eager attention", run)


# Case generators, one per op; later ops add theirs here.
CASE_SOURCES: tuple[Callable[[torch.device, bool], Iterator[Case]], ...] = (
    _softmax_cases, _attention_cases, _varlen_cases, _norm_cases, _projection_cases, _rotary_cases, _loss_cases,
    _architecture_cases, _huggingface_cases)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    return [c for source in CASE_SOURCES for c in source(device, quick)]


def run_cases(todo: list[Case], progress: Callable[[int, int, Case], None] | None = None) -> list[Result]:
    results = []
    for i, c in enumerate(todo):
        if progress:
            progress(i, len(todo), c)
        res = Result(c.op, c.impl, str(c.dtype).removeprefix("torch."), c.label)
        try:
            res.errors = c.run()
        except Exception as e:  # a crashing case is a failed row, not a crashed check
            res.failure = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            res.errors = []
            if progress is None:
                traceback.print_exc()
        results.append(res)
    return results


def format_results(results: list[Result]) -> str:
    head = f"{'op':16} {'impl':11} {'dtype':8} {'case':28} {'worst':6} {'max error':>10} {'bound':>10}  result"
    lines = [head, "-" * len(head)]
    for r in results:
        w = r.worst()
        name, err, bound = w if w else ("-", float("nan"), float("nan"))
        verdict = "PASS" if r.ok else f"FAIL {r.failure}"
        lines.append(f"{r.op:16} {r.impl:11} {r.dtype:8} {r.case:28} {name:6} {err:10.2e} {bound:10.2e}  {verdict}")
    return "\n".join(lines)
