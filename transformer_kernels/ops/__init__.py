"""Functional ops: torch.library custom ops with fake impls and autograd, one name per op, three backends."""

from .attention import attention
from .softmax import masked_softmax

__all__ = ["attention", "masked_softmax"]
