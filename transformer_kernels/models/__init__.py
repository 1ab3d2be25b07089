"""Small reference models of the three families, built from random weights on transformer_kernels.nn layers
(or, with ``layers="torch"``, on the torch.nn layers with the very same state_dict keys, for comparison).

- `EncoderModel`: BERT-like (token + position embeddings, LayerNorm, post-norm GELU encoder stack, padding mask,
  MLM head tied to the embeddings).
- `DecoderModel`: GPT-like (pre-norm causal stack, final norm, tied LM head, `generate()` with a KV cache).
- `EncoderDecoderModel`: BART-like (shared embeddings, encoder, decoder with cross-attention, tied LM head,
  `generate()` with a self-attention cache and cross-attention K/V projected once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import nn as tk_nn
from .. import ops
from ..nn.attention import cached_length


@dataclass
class ModelConfig:
    vocab_size: int = 101
    d_model: int = 32
    nhead: int = 4
    num_layers: int = 2
    dim_feedforward: int = 64
    max_len: int = 64
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5


def _layer_classes(layers: str):
    if layers == "tk":
        return tk_nn.TransformerEncoderLayer, tk_nn.TransformerDecoderLayer
    if layers == "torch":
        return nn.TransformerEncoderLayer, nn.TransformerDecoderLayer
    raise ValueError(f"layers must be 'tk' or 'torch', got {layers!r}")


def _layer_kwargs(cfg: ModelConfig, layers: str, backend: str | None, **extra) -> dict:
    kw = dict(d_model=cfg.d_model, nhead=cfg.nhead, dim_feedforward=cfg.dim_feedforward, dropout=cfg.dropout,
              activation="gelu", layer_norm_eps=cfg.layer_norm_eps, batch_first=True, **extra)
    if layers == "tk":
        kw["backend"] = backend
    return kw


class _Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig, norm: bool, backend: str | None) -> None:
        super().__init__()
        self.backend = backend
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = nn.Embedding(cfg.max_len, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if norm else None
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, ids: Tensor, start: int = 0) -> Tensor:
        if start + ids.shape[1] > self.positions.num_embeddings:
            raise ValueError(f"sequence of {start + ids.shape[1]} tokens exceeds max_len {self.positions.num_embeddings}")
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)
        x = self.tokens(ids) + self.positions(pos)
        if self.norm is not None:
            x = ops.layer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps, backend=self.backend)
        return self.dropout(x)


def _padding(attention_mask: Tensor | None) -> Tensor | None:
    # HF-style attention_mask (1 = token, 0 = padding) → torch.nn key_padding_mask (True = padding)
    return None if attention_mask is None else attention_mask == 0


def _final_norm(norm: nn.LayerNorm, x: Tensor, backend: str | None) -> Tensor:
    return ops.layer_norm(x, norm.weight, norm.bias, norm.eps, backend=backend)


class EncoderModel(nn.Module):
    """BERT-like masked-language model. ``forward(input_ids [B, L], attention_mask [B, L] | None)`` → logits
    ``[B, L, vocab]``."""

    def __init__(self, cfg: ModelConfig, layers: str = "tk", backend: str | None = None) -> None:
        super().__init__()
        enc_cls, _ = _layer_classes(layers)
        self.cfg, self.backend = cfg, backend
        self.embeddings = _Embeddings(cfg, True, backend)
        self.layers = nn.ModuleList([enc_cls(**_layer_kwargs(cfg, layers, backend)) for _ in range(cfg.num_layers)])
        self.head_dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.head_norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.head_bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        x = self.embeddings(input_ids)
        kpm = _padding(attention_mask)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=kpm)
        h = ops.linear(x, self.head_dense.weight, self.head_dense.bias, "gelu", backend=self.backend)
        h = _final_norm(self.head_norm, h, self.backend)
        return ops.linear(h, self.embeddings.tokens.weight, self.head_bias, backend=self.backend)


class DecoderModel(nn.Module):
    """GPT-like language model: pre-norm causal self-attention blocks (TransformerEncoderLayer with a causal mask).
    ``forward(input_ids, attention_mask=None, cache=None)`` → logits ``[B, L, vocab]``; with a ``cache`` (a list
    this model fills, one dict per layer) the call continues after the cached tokens."""

    def __init__(self, cfg: ModelConfig, layers: str = "tk", backend: str | None = None) -> None:
        super().__init__()
        enc_cls, _ = _layer_classes(layers)
        self.cfg, self.layers_kind, self.backend = cfg, layers, backend
        self.embeddings = _Embeddings(cfg, False, backend)
        self.layers = nn.ModuleList([enc_cls(**_layer_kwargs(cfg, layers, backend, norm_first=True))
                                     for _ in range(cfg.num_layers)])
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache: list[dict] | None = None) -> Tensor:
        start = cached_length(cache[0]) if cache else 0
        x = self.embeddings(input_ids, start)
        kpm = _padding(attention_mask)
        length = input_ids.shape[1]
        for i, layer in enumerate(self.layers):
            if cache is not None:
                x = layer(x, src_key_padding_mask=kpm, is_causal=True, cache=cache[i])
            elif self.layers_kind == "torch":
                mask = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
                x = layer(x, src_mask=mask, src_key_padding_mask=kpm, is_causal=True)
            else:
                x = layer(x, src_key_padding_mask=kpm, is_causal=True)
        return ops.linear(_final_norm(self.norm, x, self.backend), self.embeddings.tokens.weight, backend=self.backend)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, use_cache: bool = True) -> Tensor:
        """Greedy decoding. With ``use_cache`` each step feeds only the new token and reuses every layer's keys and
        values (causal mask aligned bottom-right); without it each step recomputes the whole sequence."""
        if use_cache and self.layers_kind != "tk":
            raise ValueError("the KV cache needs transformer_kernels.nn layers (layers='tk')")
        ids = input_ids
        cache = [{} for _ in self.layers] if use_cache else None
        step_input = ids
        for _ in range(max_new_tokens):
            logits = self(step_input, cache=cache) if use_cache else self(ids)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            step_input = nxt
        return ids


class EncoderDecoderModel(nn.Module):
    """BART-like sequence-to-sequence model (post-norm, GELU, shared embeddings, tied LM head).
    ``forward(input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None)`` → logits
    ``[B, Lt, vocab]``."""

    def __init__(self, cfg: ModelConfig, layers: str = "tk", backend: str | None = None) -> None:
        super().__init__()
        enc_cls, dec_cls = _layer_classes(layers)
        self.cfg, self.layers_kind, self.backend = cfg, layers, backend
        self.embeddings = _Embeddings(cfg, True, backend)
        self.encoder_layers = nn.ModuleList([enc_cls(**_layer_kwargs(cfg, layers, backend)) for _ in range(cfg.num_layers)])
        self.decoder_layers = nn.ModuleList([dec_cls(**_layer_kwargs(cfg, layers, backend)) for _ in range(cfg.num_layers)])

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        x = self.embeddings(input_ids)
        for layer in self.encoder_layers:
            x = layer(x, src_key_padding_mask=_padding(attention_mask))
        return x

    def decode(self, decoder_input_ids: Tensor, memory: Tensor, attention_mask: Tensor | None = None,
               decoder_attention_mask: Tensor | None = None, cache: list[dict] | None = None) -> Tensor:
        start = cached_length(cache[0].get("self", {})) if cache else 0
        x = self.embeddings(decoder_input_ids, start)
        length = decoder_input_ids.shape[1]
        for i, layer in enumerate(self.decoder_layers):
            kw = dict(memory_key_padding_mask=_padding(attention_mask), tgt_key_padding_mask=_padding(decoder_attention_mask),
                      tgt_is_causal=True)
            if cache is not None:
                x = layer(x, memory, cache=cache[i], **kw)
            elif self.layers_kind == "torch":
                mask = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
                x = layer(x, memory, tgt_mask=mask, **kw)
            else:
                x = layer(x, memory, **kw)
        return ops.linear(x, self.embeddings.tokens.weight, backend=self.backend)

    def forward(self, input_ids: Tensor, decoder_input_ids: Tensor, attention_mask: Tensor | None = None,
                decoder_attention_mask: Tensor | None = None) -> Tensor:
        memory = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, bos_id: int = 0, attention_mask: Tensor | None = None,
                 use_cache: bool = True) -> Tensor:
        """Greedy decoding from ``bos_id``; the encoder runs once. With ``use_cache`` every decoder layer keeps its
        self-attention keys/values and its cross-attention keys/values (projected from memory on the first step)."""
        if use_cache and self.layers_kind != "tk":
            raise ValueError("the KV cache needs transformer_kernels.nn layers (layers='tk')")
        memory = self.encode(input_ids, attention_mask)
        ids = torch.full((input_ids.shape[0], 1), bos_id, dtype=input_ids.dtype, device=input_ids.device)
        cache = [{} for _ in self.decoder_layers] if use_cache else None
        step_input = ids
        for _ in range(max_new_tokens):
            logits = self.decode(step_input if use_cache else ids, memory, attention_mask, cache=cache)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            step_input = nxt
        return ids


__all__ = ["DecoderModel", "EncoderDecoderModel", "EncoderModel", "ModelConfig"]
