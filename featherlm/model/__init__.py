"""The transformer core: one implementation for encoders, decoders and encoder-decoders."""

from featherlm.config import ModelConfig
from featherlm.model.layers import KVCache
from featherlm.model.seq2seq import Seq2SeqTransformer
from featherlm.model.transformer import ModelOutput, Transformer


def new_model(config: ModelConfig) -> Transformer | Seq2SeqTransformer:
    """The module a config describes: a ``Seq2SeqTransformer`` for encoder-decoders (T5), else a ``Transformer``."""
    return Seq2SeqTransformer(config) if config.encoder_decoder else Transformer(config)


__all__ = ["KVCache", "ModelOutput", "Seq2SeqTransformer", "Transformer", "new_model"]
