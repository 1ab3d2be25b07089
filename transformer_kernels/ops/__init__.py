"""Functional ops: torch.library custom ops with fake impls and autograd, one name per op, three backends."""

from .attention import attention, merge_attention
from .cross_entropy import linear_cross_entropy
from .kvcache import attention_with_kvcache
from .linear import feed_forward, gated_linear, linear, out_projection, qkv_projection
from .norm import layer_norm, rms_norm
from .rotary import rotary
from .softmax import masked_softmax
from .varlen_attention import varlen_attention

__all__ = ["attention", "attention_with_kvcache", "feed_forward", "gated_linear", "layer_norm", "linear",
           "linear_cross_entropy", "masked_softmax", "merge_attention", "out_projection", "qkv_projection", "rms_norm",
           "rotary", "varlen_attention"]
