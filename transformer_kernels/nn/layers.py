"""Drop-in encoder/decoder layers and stacks: the constructor and forward arguments, mask polarities and
state_dict keys of torch.nn.TransformerEncoderLayer, TransformerDecoderLayer, TransformerEncoder,
TransformerDecoder and Transformer, running on the fused ops.

Inside a layer activations stay batch-first ``[B, L, E]`` (a ``batch_first=False`` input is transposed on entry
and exit). Fusions: QKV projection into heads; output projection + residual (pre-norm) or residual + LayerNorm
(post-norm); linear1 + bias + activation + dropout; linear2 + bias + dropout + residual.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .attention import MultiheadAttention

_NAMED_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", F.relu: "relu", F.gelu: "gelu"}


def _activation_name(activation: str | Callable[[Tensor], Tensor]) -> str | None:
    if isinstance(activation, str) and activation not in ("relu", "gelu"):
        raise ValueError(f"activation should be relu/gelu, not {activation}")
    return _NAMED_ACTIVATIONS.get(activation)


class _Layer(nn.Module):
    """Shared pieces: norms, the feed-forward block, the batch-first switch, dropout in training only."""

    def _build(self, d_model: int, dim_feedforward: int, dropout: float, activation, eps: float, batch_first: bool,
               norm_first: bool, bias: bool, factory: dict, backend: str | None, blocks: int) -> None:
        """Everything after the attention modules, registered in torch.nn's order (so state_dict keys and their
        order match): linear1, dropout, linear2, norm1..norm<blocks>, dropout1..dropout<blocks>."""
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        for i in range(1, blocks + 1):
            setattr(self, f"norm{i}", nn.LayerNorm(d_model, eps=eps, bias=bias, **factory))
        for i in range(1, blocks + 1):
            setattr(self, f"dropout{i}", nn.Dropout(dropout))
        self.activation = F.relu if activation == "relu" else F.gelu if activation == "gelu" else activation
        self._act_name = _activation_name(activation)
        self.batch_first = batch_first
        self.backend = backend

    @property
    def _ff_dropout(self) -> nn.Dropout:
        """The dropout before the feed-forward block's residual add: the layer's last one."""
        return self.dropout3 if hasattr(self, "dropout3") else self.dropout2

    def _p(self, dropout: nn.Dropout) -> float:
        return dropout.p if self.training else 0.0

    def _norm(self, norm: nn.LayerNorm, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return ops.layer_norm(x, norm.weight, norm.bias, norm.eps, residual, backend=self.backend)

    def _ff(self, x: Tensor, residual: Tensor | None) -> Tensor:
        """linear2(dropout(act(linear1(x)))), then the layer's last dropout (``_ff_dropout``) and + residual, fused."""
        if self._act_name is not None:
            hidden = ops.linear(x, self.linear1.weight, self.linear1.bias, self._act_name, dropout_p=self._p(self.dropout),
                                backend=self.backend)
        else:  # an arbitrary callable activation runs between the two GEMMs
            hidden = F.dropout(self.activation(ops.linear(x, self.linear1.weight, self.linear1.bias, backend=self.backend)),
                               self._p(self.dropout))
        return ops.linear(hidden, self.linear2.weight, self.linear2.bias, residual=residual,
                          dropout_p=self._p(self._ff_dropout), backend=self.backend)

    def _attn_block(self, attn: MultiheadAttention, x: Tensor, mem: Tensor, mask: Tensor | None, kpm: Tensor | None,
                    is_causal: bool, dropout: nn.Dropout, residual: Tensor | None, cache: dict | None = None,
                    static_kv: bool = False) -> Tensor:
        """dropout(out_proj(attention(x, mem))) (+ residual, fused into the projection when no dropout runs)."""
        heads = attn.attend(x, mem, mem, kpm, mask, is_causal, cache, static_kv)
        p = self._p(dropout)
        if p == 0.0:
            return ops.out_projection(heads, attn.out_proj.weight, attn.out_proj.bias, residual, backend=self.backend)
        y = F.dropout(ops.out_projection(heads, attn.out_proj.weight, attn.out_proj.bias, backend=self.backend), p)
        return y if residual is None else y + residual


class TransformerEncoderLayer(_Layer):
    """torch.nn.TransformerEncoderLayer on the fused ops (same arguments, masks and state_dict keys); ``backend`` is
    passed to every op of the layer (None: the global one)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str | Callable[[Tensor], Tensor] = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, device=None, dtype=None,
                 backend: str | None = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                            backend=backend, **factory)
        self._build(d_model, dim_feedforward, dropout, activation, layer_norm_eps, batch_first, norm_first, bias,
                    factory, backend, blocks=2)

    def forward(self, src: Tensor, src_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool = False, cache: dict | None = None) -> Tensor:
        """src ``[L, B, E]`` (``[B, L, E]`` with batch_first); masks in torch.nn polarity. ``cache`` (an extension,
        used by decoder-only models): a dict kept between decoding steps holding this layer's keys and values."""
        x = src if self.batch_first else src.transpose(0, 1)
        sa_args = (src_mask, src_key_padding_mask, is_causal, self.dropout1)
        if self.norm_first:
            n = self._norm(self.norm1, x)
            x = self._attn_block(self.self_attn, n, n, *sa_args, x, cache)
            x = self._ff(self._norm(self.norm2, x), residual=x)
        else:
            sa = self._attn_block(self.self_attn, x, x, *sa_args, None, cache)
            x = self._norm(self.norm1, sa, residual=x)
            x = self._norm(self.norm2, self._ff(x, residual=None), residual=x)
        return x if self.batch_first else x.transpose(0, 1)


class TransformerDecoderLayer(_Layer):
    """torch.nn.TransformerDecoderLayer on the fused ops: masked self-attention, cross-attention over ``memory``,
    feed-forward; pre- or post-norm."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str | Callable[[Tensor], Tensor] = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, device=None, dtype=None,
                 backend: str | None = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                            backend=backend, **factory)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                                 backend=backend, **factory)
        self._build(d_model, dim_feedforward, dropout, activation, layer_norm_eps, batch_first, norm_first, bias,
                    factory, backend, blocks=3)

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None, memory_mask: Tensor | None = None,
                tgt_key_padding_mask: Tensor | None = None, memory_key_padding_mask: Tensor | None = None,
                tgt_is_causal: bool = False, memory_is_causal: bool = False, cache: dict | None = None) -> Tensor:
        """tgt ``[Lt, B, E]``, memory ``[Ls, B, E]`` (batch-first with batch_first); masks in torch.nn polarity.
        ``cache`` (an extension, for incremental decoding): a dict kept between steps; it holds the self-attention
        keys/values (appended each step) and the cross-attention keys/values (projected from memory once)."""
        x = tgt if self.batch_first else tgt.transpose(0, 1)
        mem = memory if self.batch_first else memory.transpose(0, 1)
        sa_cache = None if cache is None else cache.setdefault("self", {})
        ca_cache = None if cache is None else cache.setdefault("cross", {})
        sa_args = (tgt_mask, tgt_key_padding_mask, tgt_is_causal, self.dropout1)
        ca_args = (memory_mask, memory_key_padding_mask, memory_is_causal, self.dropout2)
        if self.norm_first:
            n = self._norm(self.norm1, x)
            x = self._attn_block(self.self_attn, n, n, *sa_args, x, sa_cache)
            x = self._attn_block(self.multihead_attn, self._norm(self.norm2, x), mem, *ca_args, x, ca_cache, True)
            x = self._ff(self._norm(self.norm3, x), residual=x)
        else:
            x = self._norm(self.norm1, self._attn_block(self.self_attn, x, x, *sa_args, None, sa_cache), residual=x)
            ca = self._attn_block(self.multihead_attn, x, mem, *ca_args, None, ca_cache, True)
            x = self._norm(self.norm2, ca, residual=x)
            x = self._norm(self.norm3, self._ff(x, residual=None), residual=x)
        return x if self.batch_first else x.transpose(0, 1)


class TransformerEncoder(nn.Module):
    """torch.nn.TransformerEncoder: ``num_layers`` copies of ``encoder_layer`` and an optional final norm
    (state_dict keys ``layers.N.*``, ``norm.*``)."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: nn.Module | None = None,
                 enable_nested_tensor: bool = True, mask_check: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src: Tensor, mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool | None = None) -> Tensor:
        x = src
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
        return _final_norm(self.norm, x, getattr(self.layers[0], "backend", None) if len(self.layers) else None)


class TransformerDecoder(nn.Module):
    """torch.nn.TransformerDecoder: ``num_layers`` copies of ``decoder_layer`` and an optional final norm."""

    def __init__(self, decoder_layer: nn.Module, num_layers: int, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None, memory_mask: Tensor | None = None,
                tgt_key_padding_mask: Tensor | None = None, memory_key_padding_mask: Tensor | None = None,
                tgt_is_causal: bool | None = None, memory_is_causal: bool = False) -> Tensor:
        x = tgt
        for layer in self.layers:
            x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_key_padding_mask,
                      memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=bool(tgt_is_causal),
                      memory_is_causal=memory_is_causal)
        return _final_norm(self.norm, x, getattr(self.layers[0], "backend", None) if len(self.layers) else None)


def _final_norm(norm: nn.Module | None, x: Tensor, backend: str | None) -> Tensor:
    if norm is None:
        return x
    if isinstance(norm, nn.LayerNorm) and norm.weight is not None:
        return ops.layer_norm(x, norm.weight, norm.bias, norm.eps, backend=backend)
    return norm(x)


class Transformer(nn.Module):
    """torch.nn.Transformer (encoder-decoder) on the fused layers, same arguments and state_dict keys."""

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str | Callable[[Tensor], Tensor] = F.relu, custom_encoder: nn.Module | None = None,
                 custom_decoder: nn.Module | None = None, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None, backend: str | None = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        layer_args = (d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first, norm_first, bias)
        self.encoder = custom_encoder or TransformerEncoder(
            TransformerEncoderLayer(*layer_args, backend=backend, **factory), num_encoder_layers,
            nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory))
        self.decoder = custom_decoder or TransformerDecoder(
            TransformerDecoderLayer(*layer_args, backend=backend, **factory), num_decoder_layers,
            nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory))
        self.d_model, self.nhead, self.batch_first = d_model, nhead, batch_first
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, tgt: Tensor, src_mask: Tensor | None = None, tgt_mask: Tensor | None = None,
                memory_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                tgt_key_padding_mask: Tensor | None = None, memory_key_padding_mask: Tensor | None = None,
                src_is_causal: bool | None = None, tgt_is_causal: bool | None = None,
                memory_is_causal: bool = False) -> Tensor:
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                            tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)

    @staticmethod
    def generate_square_subsequent_mask(sz: int, device=None, dtype=None) -> Tensor:
        return torch.nn.Transformer.generate_square_subsequent_mask(sz, device=device, dtype=dtype)
