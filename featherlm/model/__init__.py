"""The transformer core: one implementation for encoders and decoders."""

from featherlm.model.layers import KVCache
from featherlm.model.transformer import ModelOutput, Transformer

__all__ = ["KVCache", "ModelOutput", "Transformer"]
