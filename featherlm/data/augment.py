"""Text augmentation without a thesaurus: random insertion, deletion, swap and replacement.

These are the four operations of EDA (Wei & Zou, 2019) with its synonym lookups replaced by words
drawn from the corpus itself, so they work in any language and add no word the corpus lacks.
A "unit" is a whitespace-separated word; a text with fewer than two words (Chinese, Japanese,
Thai written without spaces) is treated character by character instead.

Everything is driven by a ``numpy.random.Generator`` the caller seeds, typically from (seed,
document index, copy), so the output does not depend on worker count or order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

OPERATIONS = ("insert", "delete", "swap", "replace")
_SPACE = re.compile(r"\s+")


@dataclass
class AugmentConfig:
    copies: int = 0  # augmented copies added per training document (0: off); val is never augmented
    rate: float = 0.1  # share of a document's units one operation changes (at least one)
    operations: tuple[str, ...] = OPERATIONS  # each copy applies one, drawn uniformly
    vocab_size: int = 50_000  # corpus units kept (reservoir sample) as insertion/replacement material

    def check(self) -> None:
        unknown = [op for op in self.operations if op not in OPERATIONS]
        if unknown or not self.operations:
            raise ValueError(f"augmentation operations must be among {OPERATIONS}, got {self.operations}")
        if self.copies < 0 or not 0.0 < self.rate <= 1.0:
            raise ValueError(f"augment copies must be >= 0 and rate in (0, 1], got {self.copies}, {self.rate}")


def split_units(text: str) -> tuple[list[str], list[str], bool]:
    """(units, separators, by_word): words and the whitespace between them, or characters."""
    stripped = text.strip()
    words = _SPACE.split(stripped) if stripped else []
    if len(words) >= 2:
        return words, _SPACE.findall(stripped), True
    return list(stripped), [], False


def join_units(units: list[str], seps: list[str], by_word: bool) -> str:
    """Reassemble units with the original separators in order (spaces where there are more words)."""
    if not by_word:
        return "".join(units)
    out = []
    for i, unit in enumerate(units):
        if i:
            out.append(seps[i - 1] if i - 1 < len(seps) else " ")
        out.append(unit)
    return "".join(out)


def augment_text(text: str, vocab: Sequence[str], rng: np.random.Generator, *, operation: str | None = None,
                 rate: float = 0.1, operations: Sequence[str] = OPERATIONS) -> str:
    """One augmented copy of ``text``: ``operation`` (or one drawn from ``operations``) applied to
    ``max(1, rate * units)`` random positions. Insertion and replacement take units from ``vocab``
    (for character-level texts, characters of vocab entries); with an empty vocab they fall back
    to the text's own units. Deletion never removes the last unit."""
    units, seps, by_word = split_units(text)
    if not units:
        return text
    op = operation or operations[int(rng.integers(len(operations)))]
    if op not in OPERATIONS:
        raise ValueError(f"unknown augmentation {op!r} (choose from {OPERATIONS})")
    n = max(1, int(round(rate * len(units))))

    def draw() -> str:
        if not vocab:
            return units[int(rng.integers(len(units)))]
        unit = vocab[int(rng.integers(len(vocab)))]
        return unit if by_word else unit[int(rng.integers(len(unit)))]

    if op == "insert":
        for _ in range(n):
            units.insert(int(rng.integers(len(units) + 1)), draw())
    elif op == "delete":
        n = min(n, len(units) - 1)
        if n > 0:
            drop = set(rng.choice(len(units), size=n, replace=False).tolist())
            units = [u for i, u in enumerate(units) if i not in drop]
            seps = [s for i, s in enumerate(seps) if i not in drop]  # the separator after each dropped unit
    elif op == "swap":
        for _ in range(n if len(units) >= 2 else 0):
            i, j = rng.choice(len(units), size=2, replace=False).tolist()
            units[i], units[j] = units[j], units[i]
    else:  # replace
        for i in rng.choice(len(units), size=min(n, len(units)), replace=False).tolist():
            units[i] = draw()
    return join_units(units, seps, by_word)


class UnitReservoir:
    """A fixed-size uniform sample of the corpus's words (Vitter's algorithm R), so replacement
    words follow corpus frequencies without holding the whole vocabulary in memory. Always
    whitespace-separated words: character-level texts draw characters out of them."""

    def __init__(self, size: int = 50_000, seed: int = 0, per_document: int = 16) -> None:
        self.size, self.per_document = size, per_document
        self.rng = np.random.default_rng(seed)
        self.units: list[str] = []
        self.seen = 0

    def add(self, text: str) -> None:
        """Offer up to ``per_document`` random words of one document (bounded cost per document)."""
        units = text.split()
        if not units:
            return
        if len(units) > self.per_document:
            units = [units[i] for i in self.rng.choice(len(units), size=self.per_document, replace=False)]
        for unit in units:
            self.seen += 1
            if len(self.units) < self.size:
                self.units.append(unit)
            else:
                j = int(self.rng.integers(self.seen))
                if j < self.size:
                    self.units[j] = unit
