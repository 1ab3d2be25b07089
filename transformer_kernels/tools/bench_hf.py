"""Hugging Face training-step benchmark (GPU): forward + backward of the language-model loss of a transformers model
with our kernels (`tk.convert`, each kernel backend) against the same model on transformers' "sdpa" and "eager"
attention, at bert-base, gpt2, bart-base and a Llama-like 1B shape; tokens/s and peak memory, in the CSV of
`bench.py` (op "hf_train_step"; the TFLOP/s column counts 6 FLOPs per parameter per token plus attention)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import convert
from .bench import KERNEL_IMPLS, Case, Timing, attention_flops

# name: (family, batch, sequence length, config overrides); the family's transformers defaults are the base
# sizes (bert-base, gpt2 124M, bart-base); the Llama-like shape is TinyLlama-1.1B's.
HF_SHAPES: dict[str, tuple[str, int, int, dict]] = {
    "bert-base": ("bert", 8, 512, {}),
    "gpt2": ("gpt2", 8, 1024, {}),
    "bart-base": ("bart", 8, 512, {"d_model": 768, "encoder_layers": 6, "decoder_layers": 6,
                                   "encoder_attention_heads": 12, "decoder_attention_heads": 12,
                                   "encoder_ffn_dim": 3072, "decoder_ffn_dim": 3072}),
    "llama-1b": ("llama", 4, 2048, {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                                    "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
                                    "max_position_embeddings": 2048}),
}
QUICK_SHAPES = ("bert-base", "gpt2")
IMPLS = (*KERNEL_IMPLS, "sdpa", "eager")


def _model(family: str, overrides: dict, dtype: torch.dtype, device: torch.device) -> nn.Module:
    import transformers as tf

    cls, config = {
        "bert": (tf.BertForMaskedLM, tf.BertConfig),
        "gpt2": (tf.GPT2LMHeadModel, tf.GPT2Config),
        "bart": (tf.BartForConditionalGeneration, tf.BartConfig),
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig),
    }[family]
    cfg = config(**overrides)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return cls(cfg).to(device=device, dtype=dtype).train()


def _flops(model: nn.Module, family: str, b: int, length: int) -> float:
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.encoder_layers + 2 * cfg.decoder_layers
    heads = getattr(cfg, "num_attention_heads", None) or cfg.encoder_attention_heads
    d = getattr(cfg, "hidden_size", None) or cfg.d_model
    causal = family in ("gpt2", "llama")
    return 6 * params * b * length + layers * attention_flops(b, heads, length, length, d // heads, causal, True)


def _maker(shape: str, impl: str, dtype: torch.dtype) -> Callable[[torch.device], Callable[[], torch.Tensor]]:
    family, b, length, overrides = HF_SHAPES[shape]

    def make(device: torch.device) -> Callable[[], torch.Tensor]:
        model = _model(family, overrides, dtype, device)
        if impl in KERNEL_IMPLS:
            model = convert(model, backend=impl)
        else:
            model.set_attn_implementation(impl)
        vocab = model.config.vocab_size
        ids = torch.randint(3, vocab, (b, length), device=device)
        inputs = {"input_ids": ids, "labels": ids}
        if family == "bart":
            inputs["decoder_input_ids"] = ids
        return lambda: model(**inputs).loss

    return make


def hf_cases(shapes: tuple[str, ...] = tuple(HF_SHAPES), dtype: torch.dtype = torch.bfloat16,
             impls: tuple[str, ...] = IMPLS) -> list[Case]:
    """One forward + backward case per shape and implementation (the model is built on the first call)."""
    out = []
    for shape in shapes:
        family, b, length, overrides = HF_SHAPES[shape]
        with torch.device("meta"):
            flops = _flops(_model(family, overrides, torch.float32, torch.device("meta")), family, b, length)
        for impl in impls:
            out.append(Case("hf_train_step", impl, shape, length, True, flops, 0.0, _maker(shape, impl, dtype)))
    return out


def tokens_per_second(rows: list[Timing]) -> list[tuple[str, str, float, float | None]]:
    """(shape, impl, tokens/s, peak MiB) of the hf_train_step rows."""
    out = []
    for r in rows:
        if r.op == "hf_train_step":
            b = HF_SHAPES[r.model][1]
            out.append((r.model, r.impl, b * r.seq_len / (r.median_ms / 1e3), r.peak_mib))
    return out


def format_tokens_per_second(rows: list[Timing]) -> str:
    lines = [f"{'shape':10} {'impl':7} {'tokens/s':>10} {'peak MiB':>9}"]
    for shape, impl, tps, peak in tokens_per_second(rows):
        lines.append(f"{shape:10} {impl:7} {tps:10.0f} {'-' if peak is None else f'{peak:.0f}':>9}")
    return "\n".join(lines)
