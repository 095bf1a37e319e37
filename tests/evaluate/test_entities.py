"""Entity metrics against seqeval (default mode, as classification_report without strict) on the same tags."""

from __future__ import annotations

import random
import warnings

import pytest
from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities as seqeval_entities

from featherlm.evaluate.entities import (
    detect_scheme,
    entity_scores,
    get_entities,
    sentence_entities,
    to_bioes,
    to_iob1,
    to_iob2,
)

TYPES = ("PER", "LOC", "ORG")
PREFIXES = {"iob1": "BI", "iob2": "BI", "bioes": "BIES"}


def random_tags(rng: random.Random, scheme: str, n: int) -> list[str]:
    """Arbitrary (often ill-formed) tag sequences: the lenient decoding rules all get exercised."""
    return [rng.choice(["O", "O", *(f"{p}-{t}" for p in PREFIXES[scheme] for t in TYPES)]) for _ in range(n)]


def random_corpus(seed: int, scheme: str) -> tuple[list[list[str]], list[list[str]]]:
    rng = random.Random(seed)
    lengths = [rng.randint(0, 12) for _ in range(rng.randint(1, 8))]
    return [random_tags(rng, scheme, n) for n in lengths], [random_tags(rng, scheme, n) for n in lengths]


def reference(y_true, y_pred) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval warns on zero divisions and sets 0, as we do
        report = classification_report(y_true, y_pred, output_dict=True)
        return {"precision": precision_score(y_true, y_pred), "recall": recall_score(y_true, y_pred),
                "f1": f1_score(y_true, y_pred), "accuracy": accuracy_score(y_true, y_pred) if any(y_true) else None,
                "per_type": {k: v for k, v in report.items() if not k.endswith(" avg")},
                "micro": report.get("micro avg")}


def assert_same(y_true, y_pred) -> None:
    ours, ref = entity_scores(y_true, y_pred), reference(y_true, y_pred)
    for key in ("precision", "recall", "f1"):
        assert ours[key] == pytest.approx(float(ref[key]), abs=1e-12), key
    if ref["accuracy"] is not None:
        assert ours["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
    assert sorted(ours["per_type"]) == sorted(ref["per_type"])
    for name, row in ours["per_type"].items():
        expected = ref["per_type"][name]
        assert row["support"] == expected["support"]
        for key, theirs in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert row[key] == pytest.approx(expected[theirs], abs=1e-12), (name, key)
    if ref["micro"] is not None:
        assert ours["support"] == ref["micro"]["support"]


@pytest.mark.parametrize("scheme", ["iob1", "iob2", "bioes"])
def test_random_sequences_match_seqeval(scheme):
    for seed in range(80):
        y_true, y_pred = random_corpus(seed, scheme)
        assert sentence_entities(y_true) == seqeval_entities(y_true)
        assert_same(y_true, y_pred)


def test_entities_of_one_sequence_match_seqeval():
    rng = random.Random(7)
    for scheme in PREFIXES:
        for _ in range(300):
            tags = random_tags(rng, scheme, rng.randint(0, 15))
            assert get_entities(tags) == seqeval_entities(tags)


@pytest.mark.parametrize("y_true,y_pred", [
    ([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-LOC"]]),  # perfect
    ([["B-PER", "I-PER", "O"]], [["B-PER", "O", "O"]]),  # boundary error
    ([["O", "O", "O"]], [["O", "O", "O"]]),  # all O: no entity anywhere
    ([["O", "O"]], [["B-PER", "O"]]),  # no gold entity, one predicted
    ([["B-ORG", "O"]], [["O", "O"]]),  # nothing predicted
    ([[]], [[]]),  # an empty sentence
    ([[], ["B-PER"]], [[], ["I-PER"]]),  # an I- opening an entity counts as its start
    ([["I-PER", "I-PER", "B-PER", "O"]], [["B-PER", "I-PER", "B-PER", "O"]]),  # IOB1 against IOB2
    ([["S-PER", "B-LOC", "E-LOC", "S-LOC"]], [["B-PER", "B-LOC", "I-LOC", "B-LOC"]]),  # BIOES against IOB2
    ([["B-PER", "I-LOC", "E-PER"]], [["B-PER", "I-PER", "I-PER"]]),  # type changes mid-entity
    ([["E-PER", "E-PER", "S-PER", "I-PER"]], [["B-PER", "I-PER", "O", "B-PER"]]),  # ill-formed BIOES
    ([["B", "I", "O", "B-X"]], [["B", "O", "O", "B-X"]]),  # tags without a type (seqeval: type "_")
    ([["B-PER"], ["I-PER"]], [["B-PER"], ["B-PER"]]),  # no entity crosses a sentence boundary
])
def test_hand_made_cases_match_seqeval(y_true, y_pred):
    assert_same(y_true, y_pred)


def test_no_sentences_scores_zero_like_seqeval():
    assert entity_scores([], [])["f1"] == 0.0
    assert entity_scores([], [])["per_type"] == {}


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError):
        entity_scores([["O", "B-PER"]], [["O"]])
    with pytest.raises(ValueError):
        entity_scores([["O"]], [["O"], ["O"]])


@pytest.mark.parametrize("scheme", ["iob1", "iob2", "bioes"])
def test_scheme_conversions_keep_the_entities(scheme):
    """to_iob2 / to_iob1 / to_bioes rewrite tags but keep every entity seqeval reads from them."""
    rng = random.Random(3)
    for _ in range(300):
        tags = random_tags(rng, scheme, rng.randint(0, 15))
        entities = seqeval_entities(tags)
        for convert in (to_iob2, to_iob1, to_bioes):
            assert seqeval_entities(convert(tags)) == entities, (convert.__name__, tags)
        iob2 = to_iob2(tags)
        assert all(t == "O" or t[0] in "BI" for t in iob2)
        assert all(not t.startswith("I-") or iob2[i - 1][2:] == t[2:] for i, t in enumerate(iob2))  # I- continues


def test_detect_scheme():
    assert detect_scheme([["B-PER", "I-PER", "O"], ["B-LOC"]]) == "iob2"
    assert detect_scheme([["I-PER", "I-PER", "O"], ["B-LOC"]]) == "iob1"
    assert detect_scheme([["B-PER", "I-LOC"]]) == "iob1"  # I- of another type opens an entity
    assert detect_scheme([["B-PER", "E-PER", "O"], ["S-LOC"]]) == "bioes"
    assert detect_scheme([["O"], []]) == "iob2"
    bioes = to_bioes(["I-PER", "I-PER", "O", "I-LOC"])
    assert detect_scheme([bioes]) == "bioes" and detect_scheme([to_iob1(bioes)]) == "iob1"
