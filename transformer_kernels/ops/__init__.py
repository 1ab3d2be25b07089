"""Functional ops: torch.library custom ops with fake impls and autograd, one name per op, three backends."""

from .attention import attention
from .norm import layer_norm, rms_norm
from .softmax import masked_softmax

__all__ = ["attention", "layer_norm", "masked_softmax", "rms_norm"]
