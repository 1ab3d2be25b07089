"""torch.nn-compatible modules running on the fused ops: same constructor and forward arguments, mask
polarities and state_dict keys as the torch.nn module each replaces."""

from .attention import MultiheadAttention
from .layers import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = ["MultiheadAttention", "Transformer", "TransformerDecoder", "TransformerDecoderLayer", "TransformerEncoder",
           "TransformerEncoderLayer"]
