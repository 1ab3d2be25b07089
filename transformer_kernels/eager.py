"""The "torch" backend: every op composed from PyTorch's own functional ops and differentiated by autograd. It is
what ``auto`` runs on CPU tensors and what runs fp64 (gradcheck). It keeps the ops' contracts (fp32 accumulation,
fully hidden rows give zeros and zero gradients, NaN under a mask never leaks) but is not the test oracle:
``reference.py`` is, and this module never imports it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import band_mask

_ACTIVATION_FNS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
}


def _acc(t: Tensor) -> Tensor:
    # fp64 stays fp64 (gradcheck); the 16-bit types and fp32 compute in fp32.
    return t if t.dtype == torch.float64 else t.float()


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device) -> Tensor:
    """This backend's dropout keep-mask, drawn from torch's default generator of ``device`` (torch.manual_seed
    reproduces it; no host sync, and a CUDA graph replay draws a new one); autograd keeps it for backward. The
    kernels hash a seed drawn from the same generator: the bits differ, the contract not."""
    return torch.rand(shape, device=device) >= p


def _hidden_rows_softmax(scores: Tensor, visible: Tensor | None) -> Tensor:
    """torch.softmax over the last dim where only ``visible`` entries (and finite scores) count; rows with
    nothing visible give zeros instead of NaN, with zero gradients."""
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    if scores.shape[-1] == 0:
        return scores
    empty = torch.isneginf(scores.amax(-1, keepdim=True))
    return torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)


def masked_softmax(x: Tensor, mask: Tensor | None, scale: float, is_causal: bool) -> Tensor:
    """Softmax of ``scale * x`` over the last dim; mask bool (True = keep) or float (added), causal over the
    last two dims (top-left)."""
    s = _acc(x) * scale
    visible = None
    if mask is not None and mask.dtype == torch.bool:
        visible = mask
    elif mask is not None:
        s = s + _acc(mask)
    if is_causal:
        causal = torch.ones(x.shape[-2:], dtype=torch.bool, device=x.device).tril()
        visible = causal if visible is None else visible & causal
    return _hidden_rows_softmax(s, visible).to(x.dtype).contiguous()


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
              dropout_p: float, is_causal: bool, scale: float, causal_offset: int,
              return_weights: bool = False, return_lse: bool = False,
              sinks: Tensor | None = None, softcap: float | None = None,
              window: tuple[int, int] | None = None) -> Tensor | tuple[Tensor, ...]:
    """Attention with the ops' mask contract (see ops.attention). Returns ``[B, H, Lq, Dv]`` contiguous, then the
    pre-dropout weights ``[B, H, Lq, Lk]`` with ``return_weights`` and the rows' log-sum-exp of their visible scores
    (and the sink) ``[B, H, Lq]`` (−inf where no key is visible; no gradient) with ``return_lse``. sinks ``[H]``: a
    logit per head in every row's softmax denominator that contributes no value. softcap: scaled scores s become
    softcap·tanh(s / softcap) before the masks. window: ``(left, right)`` around the diagonal i + causal_offset
    (−1 unbounded)."""
    b, h, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    # Grouped heads: view the query heads as [B, Hkv, group, ...] so each K/V head serves its group unrepeated.
    qg = _acc(q).view(b, hkv, h // hkv, lq, q.shape[-1])
    kf, vf = _acc(k).unsqueeze(2), _acc(v).unsqueeze(2)
    visible = None
    bias = None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = attn_mask.expand(b, h, lq, lk)
    elif attn_mask is not None:
        bias = _acc(attn_mask).expand(b, h, lq, lk)
        visible = ~torch.isneginf(bias)
    if key_padding_mask is not None:
        pad = ~key_padding_mask[:, None, None, :]
        visible = pad if visible is None else visible & pad
    if is_causal or (window is not None and max(window) >= 0):
        left, right = (-1, -1) if window is None else window
        band = band_mask(lq, lk, causal_offset, left, 0 if is_causal else right, q.device)
        visible = band if visible is None else visible & band
    if visible is not None:
        # A key no query sees must not reach a product: 0 · NaN would poison the row.
        visible = visible.expand(b, h, lq, lk).reshape(b, hkv, h // hkv, lq, lk)
        seen = visible.any(dim=3).any(dim=2)[:, :, None, :, None]  # [B, Hkv, 1, Lk, 1]
        kf, vf = kf.where(seen, 0.0), vf.where(seen, 0.0)
    scores = (qg @ kf.transpose(-2, -1)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias.reshape(b, hkv, h // hkv, lq, lk)
    # Hidden scores at -inf: the sinks' softmax and the lse read them (one masked copy for both).
    hidden = None
    if sinks is not None or return_lse:
        hidden = scores if visible is None else scores.masked_fill(~visible, float("-inf"))
    if sinks is None:
        p = _hidden_rows_softmax(scores, visible)
    else:
        sink = _acc(sinks).view(1, hkv, h // hkv, 1, 1).expand(b, hkv, h // hkv, lq, 1)
        p = torch.softmax(torch.cat([hidden, sink], -1), dim=-1)[..., :lk]
    weights = p
    if dropout_p > 0.0:
        p = p * keep_mask((b, h, lq, lk), dropout_p, q.device).view_as(p) / (1.0 - dropout_p)
    out = (p @ vf).view(b, h, lq, v.shape[-1]).to(q.dtype)
    extras = [weights.view(b, h, lq, lk).to(q.dtype)] if return_weights else []
    if return_lse:
        lse = torch.logsumexp(hidden.detach(), -1).view(b, h, lq)
        if sinks is not None:
            lse = torch.where(torch.isneginf(lse), lse, torch.logaddexp(lse, _acc(sinks).detach().view(1, h, 1)))
        extras.append(lse)
    return (out, *extras) if extras else out


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, residual: Tensor | None,
               return_residual: bool) -> Tensor | tuple[Tensor, Tensor]:
    s = _acc(x) if residual is None else _acc(x) + _acc(residual)
    y = F.layer_norm(s, s.shape[-1:], None if weight is None else _acc(weight), None if bias is None else _acc(bias),
                     eps).to(x.dtype)
    return (y, s.to(x.dtype)) if return_residual else y


def rms_norm(x: Tensor, weight: Tensor | None, eps: float, residual: Tensor | None,
             return_residual: bool) -> Tensor | tuple[Tensor, Tensor]:
    s = _acc(x) if residual is None else _acc(x) + _acc(residual)
    y = F.rms_norm(s, s.shape[-1:], None if weight is None else _acc(weight), eps).to(x.dtype)
    return (y, s.to(x.dtype)) if return_residual else y


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None, residual: Tensor | None,
           dropout_p: float) -> Tensor:
    y = F.linear(_acc(x), _acc(weight), None if bias is None else _acc(bias))
    if activation:
        y = _ACTIVATION_FNS[activation](y)
    if dropout_p > 0.0:
        y = y * keep_mask(tuple(y.shape), dropout_p, x.device) / (1.0 - dropout_p)
    if residual is not None:
        y = y + _acc(residual)
    return y.to(x.dtype)


def gated_linear(x: Tensor, w_gate: Tensor, w_up: Tensor, b_gate: Tensor | None, b_up: Tensor | None,
                 activation: str) -> Tensor:
    gate = F.linear(_acc(x), _acc(w_gate), None if b_gate is None else _acc(b_gate))
    up = F.linear(_acc(x), _acc(w_up), None if b_up is None else _acc(b_up))
    return (_ACTIVATION_FNS[activation](gate) * up).to(x.dtype)


def qkv_projection(x: Tensor, w_qkv: Tensor, b_qkv: Tensor | None, num_heads: int,
                   num_kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    b, length, _ = x.shape
    d = w_qkv.shape[0] // (num_heads + 2 * num_kv_heads)
    y = linear(x, w_qkv, b_qkv, None, None, 0.0)
    parts = y.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    return tuple(t.view(b, length, t.shape[-1] // d, d).transpose(1, 2) for t in parts)  # type: ignore[return-value]


def out_projection(attn: Tensor, w_o: Tensor, b_o: Tensor | None, residual: Tensor | None) -> Tensor:
    b, h, length, d = attn.shape
    return linear(attn.transpose(1, 2).reshape(b, length, h * d), w_o, b_o, None, residual, 0.0)


def rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None,
           interleaved: bool) -> tuple[Tensor, Tensor]:
    """q ``[B, H, L, D]``, k ``[B, Hk, L, D]``; cos, sin ``[B, L, R]`` (or ``[P, R]`` read at position_ids
    ``[B, L]``): the first R dims rotated in fp32, the rest passed through."""
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    cos, sin = _acc(cos).unsqueeze(1), _acc(sin).unsqueeze(1)
    r = cos.shape[-1]

    def rotate(x: Tensor) -> Tensor:
        xr = _acc(x[..., :r])
        if interleaved:
            turned = torch.stack((-xr[..., 1::2], xr[..., 0::2]), dim=-1).flatten(-2)
        else:
            turned = torch.cat((-xr[..., r // 2:], xr[..., : r // 2]), dim=-1)
        return torch.cat(((xr * cos + turned * sin).to(x.dtype), x[..., r:]), dim=-1)

    return rotate(q), rotate(k)


def linear_cross_entropy(x: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None, ignore_index: int,
                         label_smoothing: float, reduction: str, softcap: float | None, z_loss: float) -> Tensor:
    """x ``[N, H]``, weight ``[V, H]``, target ``[N]``: torch's linear and cross-entropy (the logits whole, in
    fp32), with the optional softcap between them and z-loss beside; the loss in x's dtype."""
    logits = _acc(F.linear(x, weight, bias))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction=reduction)
    if z_loss:
        counted = target != ignore_index
        rows = torch.logsumexp(logits, -1).square() * counted
        rows = rows if reduction == "none" else rows.sum() / (counted.sum() if reduction == "mean" else 1)
        loss = loss + z_loss * rows
    return loss.to(x.dtype)
