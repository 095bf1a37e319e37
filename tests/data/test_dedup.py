"""Dedup: planted exact and near duplicates are removed, distinct texts kept; MinHash estimates
checked against exact Jaccard similarities computed from plain Python sets of shingle strings."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from featherlm.data.dedup import (
    ExactDedup,
    MinHasher,
    NearDedup,
    dedup_texts,
    estimated_similarity,
    exact_key,
    lsh_params,
    normalize_for_dedup,
    shingle_hashes,
)

SHAKESPEARE = Path("/work/shared/data/corpus/tinyshakespeare/input.txt")


def shingle_set(text: str, kind: str = "char", n: int = 5) -> set:
    """The oracle: shingles as Python strings / word tuples, no hashing involved."""
    norm = normalize_for_dedup(text)
    units = list(norm) if kind == "char" else norm.split(" ")
    if len(units) < n:
        return {tuple(units)}
    return {tuple(units[i:i + n]) for i in range(len(units) - n + 1)}


def true_jaccard(a: str, b: str, kind: str = "char", n: int = 5) -> float:
    x, y = shingle_set(a, kind, n), shingle_set(b, kind, n)
    return len(x & y) / len(x | y)


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    """Long, mutually distinct Shakespeare speeches (distinct checked with the oracle)."""
    paras = [p for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if 300 < len(p) < 1500][:120]
    sets = [shingle_set(p) for p in paras]
    assert max(len(a & b) / len(a | b) for a, b in combinations(sets, 2)) < 0.5
    return paras


def edit_words(text: str, rng: np.random.Generator, n: int) -> str:
    words = text.split(" ")
    for i in rng.choice(len(words), size=n, replace=False):
        words[i] = "zounds"
    return " ".join(words)


def test_planted_duplicates_are_removed_and_distinct_texts_kept(paragraphs):
    rng = np.random.default_rng(0)
    docs, originals, planted_exact, planted_near = [], [], [], []
    for i, p in enumerate(paragraphs):
        originals.append(len(docs))
        docs.append(p)
        if i % 4 == 1:  # same text, other case and spacing
            planted_exact.append(len(docs))
            docs.append("  " + p.upper().replace(" ", "   ") + "\n")
        if i % 4 == 2:  # a word changed: still a copy
            near = edit_words(p, rng, 1)
            assert true_jaccard(p, near) > 0.85
            planted_near.append(len(docs))
            docs.append(near)
    kept = dedup_texts(docs, threshold=0.8)
    assert kept == originals
    assert dedup_texts(docs, near=False) == sorted(originals + planted_near)  # exact only
    assert len(dedup_texts(docs, exact=False, near=False)) == len(docs)


def test_partial_overlap_below_the_threshold_is_kept(paragraphs):
    a, b, c = paragraphs[:3]
    first, second = a + "\n" + b, a + "\n" + c
    assert true_jaccard(first, second) < 0.6
    assert dedup_texts([first, second], threshold=0.8) == [0, 1]
    assert dedup_texts([first, second], threshold=0.2) == [0]  # a low threshold calls them copies


@pytest.mark.parametrize(("kind", "n"), [("char", 5), ("word", 3)])
def test_minhash_estimates_the_exact_jaccard(paragraphs, kind, n):
    rng = np.random.default_rng(1)
    hasher = MinHasher(num_perm=256, seed=3)
    errors = []
    for _ in range(40):
        a = paragraphs[int(rng.integers(len(paragraphs)))]
        b = edit_words(a, rng, int(rng.integers(1, 40)))
        ha, hb = shingle_hashes(a, kind, n), shingle_hashes(b, kind, n)
        assert ha.size == len(shingle_set(a, kind, n))  # distinct shingles, no collisions
        estimate = estimated_similarity(hasher.signature(ha), hasher.signature(hb))
        truth = true_jaccard(a, b, kind, n)
        errors.append(estimate - truth)
        assert abs(estimate - truth) < 4 * np.sqrt(truth * (1 - truth) / 256) + 0.02  # binomial noise
    assert abs(np.mean(errors)) < 0.02  # unbiased


def test_signatures_are_stable_and_shingles_cover_short_texts():
    a = MinHasher(64, seed=7).signature(shingle_hashes("the same text"))
    b = MinHasher(64, seed=7).signature(shingle_hashes("The  SAME text"))
    np.testing.assert_array_equal(a, b)
    assert shingle_hashes("abc").size == 1 and shingle_hashes("").size == 0
    assert exact_key("Hello  World") == exact_key("hello world") != exact_key("hello world!")
    seen = ExactDedup()
    assert seen.add("x y") and not seen.add("X  y") and seen.add("x z")


def test_lsh_banding_catches_pairs_above_the_threshold():
    for threshold in (0.5, 0.8, 0.9):
        bands, rows = lsh_params(threshold, 128)
        assert bands * rows <= 128

        def p(s: float, b: int = bands, r: int = rows) -> float:
            return 1 - (1 - s ** r) ** b

        assert p(threshold) > 0.8 and p(min(1.0, threshold + 0.1)) > 0.98 and p(threshold - 0.4) < 0.05


def test_near_dedup_returns_the_kept_original():
    hasher = MinHasher(128)
    near = NearDedup(0.8, 128)
    base = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of folly"
    assert near.add(hasher.signature(shingle_hashes(base))) is None
    assert near.add(hasher.signature(shingle_hashes("Completely different words about the weather today"))) is None
    assert near.add(hasher.signature(shingle_hashes(base.replace("wisdom", "wisdoms")))) == 0
    assert near.kept == 2
    with pytest.raises(ValueError):
        near.add(np.zeros(64, dtype=np.uint32))
