"""Functional ops: torch.library custom ops with fake impls and autograd, one name per op, three backends."""

from .softmax import masked_softmax

__all__ = ["masked_softmax"]
