"""`MultiheadAttention`: a drop-in for torch.nn.MultiheadAttention running on the fused ops."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends, eager, ops
from ..masks import nn_masks_to_sdpa
from ..ops.attention import FAMILY
from ..ops.varlen_attention import OP as VARLEN_OP


def cached_length(cache: dict) -> int:
    """How many positions a self-attention cache holds."""
    return cache.get("len", 0)


def _append_kv(cache: dict, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Writes this step's keys/values after the cached ones in buffers that grow by doubling (amortised O(1) copy
    per position, where concatenating would copy the whole cache every step) and returns views of the filled part
    (unit stride along D, so the attention kernel reads them in place)."""
    n, step = cached_length(cache), k.shape[2]
    need = n + step
    for name, new in (("k", k), ("v", v)):
        buf = cache.get(name + "_buf")
        if buf is None or buf.shape[2] < need:
            grown = new.new_empty(*new.shape[:2], max(need, 2 * (0 if buf is None else buf.shape[2]), 16), new.shape[3])
            if buf is not None:
                grown[:, :, :n] = buf[:, :, :n]
            cache[name + "_buf"] = buf = grown
        buf[:, :, n:need] = new
    cache["len"] = need
    return cache["k_buf"][:, :, :need], cache["v_buf"][:, :, :need]


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention with the same constructor, forward arguments, mask polarities and state_dict
    keys (``in_proj_weight``/``in_proj_bias`` or ``q/k/v_proj_weight``, ``out_proj.weight``/``.bias``).

    Self-attention runs the fused QKV projection (q, k, v written as ``[B, H, L, D]``), the attention kernel and
    the output projection reading the heads in place. ``need_weights=True`` (torch.nn's default) also returns the
    attention weights, computed by the eager composition (eager.py): that is the slow path, and it applies no
    dropout; pass ``need_weights=False`` for the kernels. ``add_bias_kv`` and ``add_zero_attn`` are not supported
    (ValueError). ``backend`` is passed to every op (None: ``set_backend``/``use_backend`` decide).

    Unpadding: with a bool key padding mask (no other mask, not causal, no cache) on a kernel backend, when at
    least ``unpad_min_padding`` of the key slots are padding, the real keys and values are gathered and
    ``ops.varlen_attention`` runs with the queries as they are: the attention work shrinks with the padding and
    every output row, padded query rows included, keeps the dense result (a padded query still attends to its
    sequence's real keys, as in torch.nn). The gather costs one host sync (its size is the number of real keys),
    which is why a little padding stays on the dense kernel; never under torch.compile (a data-dependent size).
    """

    # The fraction of padded key slots from which the keys are unpadded: at 1/4 the attention work drops by a
    # quarter, well above the gather and the sync.
    unpad_min_padding: float = 0.25

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, device=None, dtype=None,
                 backend: str | None = None) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be a positive multiple of num_heads {num_heads}")
        if add_bias_kv or add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn are not supported by transformer_kernels.nn.MultiheadAttention")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.backend = backend
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory)) if bias else None
        if not bias:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # torch.nn.MultiheadAttention's initialisation
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    def _projections(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.in_proj_weight is not None:
            return self.in_proj_weight.chunk(3)
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def attend(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
               attn_mask: Tensor | None = None, is_causal: bool = False, cache: dict | None = None,
               static_kv: bool = False) -> Tensor:
        """Batch-first inputs ``[B, L, E]`` → the attention heads ``[B, H, Lq, D]`` (before the output projection),
        so a layer can fuse the output projection with its residual.

        ``cache`` (a dict the caller keeps between decoding steps): self-attention appends this step's K/V to the
        cached ones and aligns the causal mask bottom-right (query i of the step sees every earlier key);
        ``static_kv`` (cross-attention) projects key/value once and reuses them afterwards."""
        q, k, v, kwargs = self._inputs(query, key, value, key_padding_mask, attn_mask, is_causal, cache, static_kv)
        dropout_p = self.dropout if self.training else 0.0
        if cache is None:
            out = self._attend_unpadded(q, k, v, kwargs, dropout_p)
            if out is not None:
                return out
        return ops.attention(q, k, v, dropout_p=dropout_p, backend=self.backend, **kwargs)

    def _attend_unpadded(self, q: Tensor, k: Tensor, v: Tensor, kw: dict, dropout_p: float) -> Tensor | None:
        """Attention over the real keys only (see the class docstring), or None where the rule says dense."""
        kpm = kw["key_padding_mask"]
        if kpm is None or kw["attn_mask"] is not None or kw["is_causal"] or torch.compiler.is_compiling():
            return None
        backend = backends.resolve_for(VARLEN_OP, FAMILY, q.device, self.backend, q, k, v)
        if backend == "torch":
            return None
        b, h, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        real = ~kpm
        rows = real.flatten().nonzero().squeeze(1)  # the one host sync
        if rows.numel() > (1.0 - self.unpad_min_padding) * b * lk:
            return None
        # [B, H, L, D] heads as [B·L, H, D] rows (a view of the projections' [B, L, H·D] output), real keys gathered.
        k, v = (t.transpose(1, 2).reshape(b * lk, hkv, t.shape[3]).index_select(0, rows) for t in (k, v))
        cu_k = F.pad(real.sum(1).cumsum(0), (1, 0)).to(torch.int32)
        cu_q = torch.arange(0, (b + 1) * lq, lq, dtype=torch.int32, device=q.device)
        out = ops.varlen_attention(q.transpose(1, 2).reshape(b * lq, h, d), k, v, cu_q, cu_k, lq, lk, dropout_p,
                                   scale=kw["scale"], enable_gqa=h != hkv, backend=backend)
        return out.view(b, lq, h, out.shape[-1]).transpose(1, 2)

    def _inputs(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                attn_mask: Tensor | None, is_causal: bool, cache: dict | None = None,
                static_kv: bool = False) -> tuple[Tensor, Tensor, Tensor, dict]:
        """The projected heads q, k, v and the attention arguments in the functional ops' mask contract."""
        b, lq, _ = query.shape
        h, d = self.num_heads, self.head_dim
        bias = self.in_proj_bias
        w_q, w_k, w_v = self._projections()
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)

        def heads(t: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
            # [B, L, H·D] seen as [B, H, L, D]: the attention kernel reads the transposed view in place.
            return ops.linear(t, w, bias, backend=self.backend).view(b, t.shape[1], h, d).transpose(1, 2)

        if cache is not None and static_kv and "k" in cache:
            q, k, v = heads(query, w_q, b_q), cache["k"], cache["v"]
        elif query is key and key is value and self.in_proj_weight is not None:
            q, k, v = ops.qkv_projection(query, self.in_proj_weight, bias, h, backend=self.backend)
        else:
            q, k, v = heads(query, w_q, b_q), heads(key, w_k, b_k), heads(value, w_v, b_v)
        if cache is not None and static_kv:
            cache["k"], cache["v"] = k, v
        elif cache is not None:
            k, v = _append_kv(cache, k, v)
        lk = k.shape[2]
        if is_causal:
            # torch.nn documents is_causal as a hint that attn_mask *is* the causal mask (its fast path relies on
            # that too): take the causal path and never read the mask.
            attn_mask = None
        mask, kpm = nn_masks_to_sdpa(attn_mask, key_padding_mask, b, h, lq, lk, query.dtype)
        return q, k, v, {"attn_mask": mask, "is_causal": is_causal, "scale": 1.0 / math.sqrt(d),
                         "key_padding_mask": kpm,
                         "causal_alignment": "bottom_right" if cache is not None else "top_left"}

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """query ``[Lq, B, E]`` (``[B, Lq, E]`` with batch_first), key/value ``[Lk, B, kdim/vdim]``; returns
        (output like query, averaged or per-head weights or None). Fully masked query rows give zeros."""
        q, k, v = (t if self.batch_first else t.transpose(0, 1) for t in (query, key, value))
        weights = None
        if need_weights:
            # The weights exist only in the eager composition (the kernels never form them): the slow path.
            qh, kh, vh, kw = self._inputs(q, k, v, key_padding_mask, attn_mask, is_causal)
            offset = 0 if kw["causal_alignment"] == "top_left" else kh.shape[2] - qh.shape[2]
            heads, weights = eager.attention(qh, kh, vh, kw["attn_mask"], kw["key_padding_mask"], 0.0, kw["is_causal"],
                                             kw["scale"], offset, return_weights=True)
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            heads = self.attend(q, k, v, key_padding_mask, attn_mask, is_causal)
        out = ops.out_projection(heads, self.out_proj.weight, self.out_proj.bias, backend=self.backend)
        return (out if self.batch_first else out.transpose(0, 1)), weights

