"""Data for training and evaluation: task readers (classification, SFT, raw text) and batching."""

from featherlm.data.batching import batch_order, collate
from featherlm.data.tasks import (
    IGNORE_INDEX,
    ClassificationData,
    TokenData,
    encode_chat,
    encode_classification,
    read_classification,
    read_lm,
    read_sft,
)

__all__ = [
    "IGNORE_INDEX", "ClassificationData", "TokenData", "batch_order", "collate", "encode_chat",
    "encode_classification", "read_classification", "read_lm", "read_sft",
]
