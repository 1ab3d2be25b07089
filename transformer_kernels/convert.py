"""`convert(model)`: swap torch.nn attention and transformer layers (or a Hugging Face model's attention, norms and
feed-forwards) for the fused ones, in place, weights kept."""

from __future__ import annotations

import sys

from torch import nn

from . import nn as tk_nn


def _mha(m: nn.MultiheadAttention, backend: str) -> tk_nn.MultiheadAttention:
    return tk_nn.MultiheadAttention(
        m.embed_dim, m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None, add_bias_kv=m.bias_k is not None,
        add_zero_attn=m.add_zero_attn, kdim=m.kdim, vdim=m.vdim, batch_first=m.batch_first, backend=backend)


def _layer_args(m: nn.Module) -> dict:
    return dict(d_model=m.linear1.in_features, nhead=m.self_attn.num_heads, dim_feedforward=m.linear1.out_features,
                dropout=m.dropout.p, activation=m.activation, layer_norm_eps=m.norm1.eps,
                batch_first=m.self_attn.batch_first, norm_first=m.norm_first, bias=m.linear1.bias is not None)


def _replacement(m: nn.Module, backend: str) -> nn.Module | None:
    # Exact types: a user subclass may change forward, so it is left alone.
    if type(m) is nn.MultiheadAttention:
        return _mha(m, backend)
    if type(m) is nn.TransformerEncoderLayer:
        return tk_nn.TransformerEncoderLayer(**_layer_args(m), backend=backend)
    if type(m) is nn.TransformerDecoderLayer:
        return tk_nn.TransformerDecoderLayer(**_layer_args(m), backend=backend)
    return None


def convert(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Puts ``model`` on our kernels, in place, weights kept; returns it.

    A Hugging Face transformers model: attention implementation "transformer_kernels" and every norm and
    feed-forward module with a fused equivalent swapped (integrations/hf_modules.py); what was swapped is logged
    and left in ``model.tk_swapped`` (class → count). ``backend`` None follows the backend in force at each call.

    Any other model: every torch.nn.MultiheadAttention, TransformerEncoderLayer and TransformerDecoderLayer inside
    it (``model`` itself included) is replaced by its transformer_kernels.nn twin with the same configuration,
    weights (load_state_dict, strict), device, dtype and train/eval mode (the replacement is returned when
    ``model`` itself was one); ``backend`` None means "auto".
    """
    if "transformers" in sys.modules:
        from .integrations import hf_modules

        if hf_modules.is_hf_model(model):
            model.tk_swapped = hf_modules.convert_hf_model(model, backend)
            return model
    return _convert_nn(model, backend or "auto")


def _convert_nn(model: nn.Module, backend: str) -> nn.Module:
    new = _replacement(model, backend)
    if new is not None:
        return _transfer(model, new)
    for name, child in list(model.named_children()):
        converted = _convert_nn(child, backend)
        if converted is not child:
            setattr(model, name, converted)
    return model


def _transfer(old: nn.Module, new: nn.Module) -> nn.Module:
    ref = next(old.parameters(), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(old.state_dict(), strict=True)
    new.train(old.training)
    return new


__all__ = ["convert"]
