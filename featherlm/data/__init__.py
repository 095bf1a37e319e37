"""Data for training and evaluation: task readers (classification, SFT, raw text) and batching;
pretraining corpora (cleaning, dedup, augmentation) packed into token shards."""

from featherlm.data.augment import AugmentConfig, augment_text
from featherlm.data.batching import batch_order, collate
from featherlm.data.clean import QualityConfig, clean_text, quality_reason
from featherlm.data.dedup import dedup_texts
from featherlm.data.prepare import PrepareConfig, prepare_corpus
from featherlm.data.shards import ShardWriter, TokenShards, read_manifest, write_manifest
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
    "ShardWriter", "TokenShards", "read_manifest", "write_manifest",
    "AugmentConfig", "PrepareConfig", "QualityConfig", "augment_text", "clean_text", "dedup_texts", "prepare_corpus",
    "quality_reason",
]
