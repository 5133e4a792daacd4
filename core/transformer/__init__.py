"""The decoder-only transformer in plain PyTorch math, built from core.tensor_parallel layers."""

from core.transformer.attention import position_ids_from_segments
from core.transformer.config import TransformerConfig
from core.transformer.model import GPTModel

__all__ = ["GPTModel", "TransformerConfig", "position_ids_from_segments"]
