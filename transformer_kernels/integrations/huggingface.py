"""Hugging Face transformers: our attention as ``attn_implementation="transformer_kernels"``.

Importing this module registers, under the name ``"transformer_kernels"`` (idempotent):
- in ``AttentionInterface``, `attention_forward`, which runs ``tk.ops.attention``;
- in ``AttentionMaskInterface``, transformers' own ``sdpa_mask``: a bool ``[B, 1, Lq, Lk]`` mask (True = attend), or
  None where ``is_causal`` says it all. Without a mask function registered under the same name transformers would
  pass ``attention_mask=None`` for every model: padding and causality silently lost.

Then ``from_pretrained(..., attn_implementation="transformer_kernels")`` or
``model.set_attn_implementation("transformer_kernels")``; ``tk.convert(model)`` does it and also swaps the fused
norm and feed-forward layers in (integrations/hf_modules.py). transformers is optional: ``pip install
transformer-kernels[hf]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops


def _import_failure(error: ImportError) -> str:
    """Why transformers could not be used: missing, or installed but failing to import (say a dependency of its own
    shadowed by a folder on sys.path) — the second must never read as the first."""
    from importlib import metadata

    try:
        version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return ("transformer_kernels.integrations.huggingface needs transformers: "
                "pip install 'transformer-kernels[hf]'")
    return (f"transformer_kernels.integrations.huggingface: transformers {version} is installed but importing it "
            f"failed: {type(error).__name__}: {error}")


try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:
    raise ImportError(_import_failure(e)) from e

NAME = "transformer_kernels"

def _refuse_unsupported(kwargs: dict) -> None:
    # Keyword arguments the models may pass that we cannot honour are refused by name, never ignored.
    if kwargs.get("output_attentions"):
        raise ValueError("transformer_kernels attention never materialises the attention weights: "
                         "`output_attentions=True` needs attn_implementation='eager'")


def _with_bias(position_bias: Tensor, mask: Tensor | None) -> Tensor:
    """T5's position bias (float, added to the scores) combined with the model's mask into one additive mask;
    gradients flow into the bias (its relative-attention embedding trains)."""
    if mask is None:
        return position_bias
    if mask.dtype == torch.bool:
        return torch.where(mask, position_bias, float("-inf"))
    return position_bias + mask


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                      position_bias: Tensor | None = None, cache=None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function contract: query ``[B, H, Lq, D]``, key/value ``[B, Hkv, Lk, D]`` (RoPE
    applied, KV cache included); returns ``([B, Lq, H, Dv], None)``.

    Grouped-query attention runs natively (no repeat_kv; head counts from the tensors, so tensor-parallel shards
    work). ``is_causal`` is decided as transformers' sdpa path does: causal only without a mask and with more than
    one query; a decoding step (Lq = 1) sees every cached key, and a chunked prefill (Lq < Lk) gets its causal
    pattern from the mask. Bool masks (True = attend) and float (additive) masks pass to the kernels through their
    strides; T5's ``position_bias`` is added to the scores and gets its gradient. Packed sequences
    (``cu_seq_lens_q/k`` kwargs) run `ops.varlen_attention`. gpt-oss's attention sinks (``s_aux``, one logit per
    head) join each row's softmax denominator in the op, with their gradient; Gemma 2's ``softcap`` caps the scores in
    the CUDA kernels (a triton-converted model's soft-capped attention goes where `auto` sends it). A sliding window
    (``sliding_window``: Mistral, Gemma 2/3, gpt-oss) reaches the op as its ``window`` (the CUDA kernels then never
    load the key tiles outside it): packed, instead of any mask (a triton-converted model's packed windowed
    attention goes where `auto` sends it); dense without a cache (Lq = Lk: training, a prefill) beside transformers'
    mask, which holds the same window (a cache's rows sit at its positions, which only the mask knows, so there the
    mask alone applies). The backend is the module's ``tk_backend`` (set by
    `tk.convert`), else the one in force.
    """
    _refuse_unsupported(kwargs)
    if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("cu_seq_lens_k") is not None and position_bias is None:
        return _packed_forward(module, query, key, value, dropout, scaling, is_causal, kwargs), None
    sinks = kwargs.get("s_aux")
    if cache is not None and hasattr(cache, "update") and getattr(module, "layer_idx", None) is not None:
        # transformers' continuous batching hands its paged cache to the attention function to update.
        key, value = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx, kwargs=kwargs)
    lq, lk = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and lq > 1 and attention_mask is None
    if causal and lk > lq:
        # Prefill into an empty static cache: the keys past the queries are not written yet (as sdpa crops them).
        key, value = key[:, :, :lq], value[:, :, :lq]
        position_bias = None if position_bias is None else position_bias[..., :lq]
    mask = attention_mask if position_bias is None else _with_bias(position_bias, attention_mask)
    window = None
    if kwargs.get("sliding_window") and lq == key.shape[2] and getattr(module, "is_causal", True):
        window = (int(kwargs["sliding_window"]) - 1, 0)  # transformers' sliding_window_overlay: i - j < window
    out = ops.attention(query, key, value, attn_mask=mask, dropout_p=float(dropout), is_causal=causal, scale=scaling,
                        enable_gqa=query.shape[1] != key.shape[1], sinks=sinks, softcap=kwargs.get("softcap"),
                        window=window, backend=_backend(module, kwargs.get("softcap")))
    return out.transpose(1, 2).contiguous(), None


def _backend(module: nn.Module, softcap: float | None, packed_window: bool = False) -> str | None:
    """The module's backend (set by `tk.convert`); for a soft-capped model, or a sliding window on packed sequences,
    converted onto triton, whose kernels take neither yet, `auto`'s choice among the backends that do (the CUDA
    kernels on a GPU, else the torch backend)."""
    backend = getattr(module, "tk_backend", None)
    return "auto" if (softcap or packed_window) and backend == "triton" else backend


def _packed_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, dropout: float,
                    scaling: float | None, is_causal: bool | None, kwargs: dict) -> Tensor:
    """Packed sequences (transformers passes ``cu_seq_lens_q/k`` and ``max_length_q/k`` when a batch of one row holds
    several sequences, e.g. from ``DataCollatorWithFlattening``): `ops.varlen_attention` on the rows, so no query
    attends across a sequence boundary and no padding is computed; the block-diagonal mask transformers built
    alongside is not needed, and a sliding window (``sliding_window``) is the op's ``window``. Causal alignment
    bottom-right, as flash-attn's varlen function."""
    if query.shape[0] != 1:
        raise ValueError(f"cu_seq_lens_q/k describe packed sequences in one batch row; got a batch of {query.shape[0]}")
    # max_length_* are Python ints from transformers' collators; a tensor costs one host sync here.
    max_q, max_k = (int(kwargs[name]) for name in ("max_length_q", "max_length_k"))
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    window = (int(kwargs["sliding_window"]) - 1, -1) if kwargs.get("sliding_window") else None
    out = ops.varlen_attention(q, k, v, kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], max_q, max_k,
                               dropout_p=float(dropout), is_causal=bool(causal), scale=scaling,
                               enable_gqa=q.shape[1] != k.shape[1], causal_alignment="bottom_right",
                               sinks=kwargs.get("s_aux"), softcap=kwargs.get("softcap"), window=window,
                               backend=_backend(module, kwargs.get("softcap"), window is not None))
    return out.unsqueeze(0)


def register() -> None:
    """Registers the attention and the mask function under ``"transformer_kernels"`` (idempotent)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


register()

__all__ = ["NAME", "attention_forward", "register"]
