"""Tiny models saved as featherlm folders with a word-level tokenizer, and tiny task files.

A fine-tuning run loads its model by name like a user's run does, so these write real folders
(``save_model``) rather than handing a module over. Words are few enough for a 97-token vocabulary.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers, processors

from featherlm.checkpoint import save_model
from featherlm.config import preset
from featherlm.model import Transformer
from featherlm.tokenizer import Tokenizer

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<eos>"]
POSITIVE = ["good", "great", "fine", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring"]
FILLER = ["the", "movie", "film", "was", "is", "a", "plot", "acting", "really", "very", "quite", "story",
          "and", "but", "it", "this", "that", "cast", "scene", "ending"]
CHAT = ["User", "Assistant", "System", ":", "yes", "no", "say", "answer", "hello", "."]
WORDS = SPECIALS + POSITIVE + NEGATIVE + FILLER + CHAT


def word_tokenizer(encoder: bool) -> Tokenizer:
    """Whitespace word-level tokenizer; encoders wrap texts in [CLS] ... [SEP] as BERT does."""
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if encoder:
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        return Tokenizer(backend, pad_token="[PAD]", unk_token="[UNK]")
    return Tokenizer(backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="<eos>")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: ``tiny_checkpoint("bert" | "llama")`` -> a featherlm folder (random tiny model + tokenizer)."""
    made = {}

    def make(family: str = "bert") -> str:
        if family not in made:
            torch.manual_seed(0)
            model = Transformer(preset(family, vocab_size=97, max_seq_len=64, **({"n_kv_head": 2} if family == "llama"
                                                                                 else {})))
            folder = tmp_path_factory.mktemp(f"tiny_{family}")
            save_model(model, word_tokenizer(encoder=not model.config.causal), folder)
            made[family] = str(folder)
        return made[family]

    return make


def sentiment_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """Separable toy sentiment: label 1 iff the sentence holds a positive word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.sample(FILLER, rng.randint(2, 7)) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture
def sentiment_files(tmp_path):
    """(train.tsv, dev.tsv) of toy sentiment: 96 and 32 rows."""
    paths = []
    for name, n, seed in (("train.tsv", 96, 1), ("dev.tsv", 32, 2)):
        path = tmp_path / name
        path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in sentiment_rows(n, seed)))
        paths.append(path)
    return tuple(paths)


@pytest.fixture
def chat_file(tmp_path):
    """A JSONL SFT file: answer "yes ." after a positive word, "no" after a negative one (responses of
    different lengths, so micro-batches hold different numbers of target tokens)."""
    path = tmp_path / "sft.jsonl"
    with path.open("w") as f:
        for text, label in sentiment_rows(48, 3):
            f.write(json.dumps({"instruction": f"say {text}", "response": "yes ." if label else "no"}) + "\n")
    return path
