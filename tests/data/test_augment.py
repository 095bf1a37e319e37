"""Augmentation: seeded, keeps to the corpus vocabulary, and each operation does what it says."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from featherlm.data.augment import OPERATIONS, AugmentConfig, UnitReservoir, augment_text, split_units

TEXT = "Before we proceed any further, hear me speak.\nSpeak, speak. You are all resolved rather to die"
CHINESE = "我们今天晚上一起去看电影吧。"
VOCAB = ["citizen", "corn", "price", "Rome", "famish"]


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("op", OPERATIONS)
def test_seeded_and_different_seeds_differ(op):
    same = {augment_text(TEXT, VOCAB, rng(5), operation=op, rate=0.2) for _ in range(3)}
    assert len(same) == 1
    outputs = {augment_text(TEXT, VOCAB, rng(seed), operation=op, rate=0.2) for seed in range(20)}
    assert len(outputs) > 5 and TEXT not in outputs


@pytest.mark.parametrize("op", OPERATIONS)
def test_keeps_the_vocabulary(op):
    allowed = set(TEXT.split()) | set(VOCAB)
    for seed in range(30):
        out = augment_text(TEXT, VOCAB, rng(seed), operation=op, rate=0.3)
        assert set(out.split()) <= allowed
    chars = set(CHINESE) | {c for w in VOCAB for c in w}  # no spaces: works on characters
    for seed in range(30):
        assert set(augment_text(CHINESE, VOCAB, rng(seed), operation=op)) <= chars


def test_each_operation():
    words = TEXT.split()
    n = max(1, round(0.2 * len(words)))
    inserted = augment_text(TEXT, VOCAB, rng(0), operation="insert", rate=0.2).split()
    assert len(inserted) == len(words) + n and not Counter(words) - Counter(inserted)
    deleted = augment_text(TEXT, VOCAB, rng(0), operation="delete", rate=0.2).split()
    assert len(deleted) == len(words) - n and not Counter(deleted) - Counter(words)
    swapped = augment_text(TEXT, VOCAB, rng(0), operation="swap", rate=0.2).split()
    assert Counter(swapped) == Counter(words) and swapped != words
    replaced = augment_text(TEXT, VOCAB, rng(0), operation="replace", rate=0.2).split()
    assert len(replaced) == len(words) and 1 <= sum(a != b for a, b in zip(words, replaced, strict=True)) <= n
    assert "\n" in augment_text(TEXT, VOCAB, rng(0), operation="swap")  # line structure survives
    assert augment_text("x", [], rng(0), operation="delete") == "x"  # never deletes everything
    assert augment_text("two words", [], rng(0), operation="delete", rate=1.0) in ("two", "words")
    with pytest.raises(ValueError):
        augment_text(TEXT, VOCAB, rng(0), operation="shuffle")


def test_split_units_and_reservoir():
    assert split_units("a  b\nc")[0] == ["a", "b", "c"] and split_units(CHINESE)[0] == list(CHINESE)
    corpus = Path("/work/shared/data/corpus/tinyshakespeare/input.txt").read_text(encoding="utf-8")[:50_000]
    paragraphs = corpus.split("\n\n")
    reservoirs = []
    for _ in range(2):
        reservoir = UnitReservoir(size=200, seed=1, per_document=8)
        for p in paragraphs:
            reservoir.add(p)
        reservoirs.append(reservoir.units)
    assert reservoirs[0] == reservoirs[1] and len(reservoirs[0]) == 200
    assert set(reservoirs[0]) <= set(corpus.split())


def test_config_check():
    AugmentConfig(copies=2).check()
    for bad in (AugmentConfig(rate=0), AugmentConfig(copies=-1), AugmentConfig(operations=("insert", "x"))):
        with pytest.raises(ValueError):
            bad.check()
