"""Entity-level precision / recall / F1 of tag sequences, with seqeval's default (conlleval) semantics.

Pure maths on lists of tag strings, importing nothing of featherlm: the NER task's evaluation (in
the trainer) and the CoNLL reader (to turn IOB1 / BIOES into IOB2) both use it.

Semantics are those of ``seqeval.metrics`` without ``mode="strict"`` (as conlleval.pl): an entity
is a maximal chunk read leniently from B-/I-/E-/S- prefixes; an ``I-X`` after ``O`` or after
another type opens a chunk (IOB1 files read right without being told), and a chunk of one type
ends where another type begins. Sentences are joined with an ``O`` between them, as seqeval does,
so no entity spans two sentences. Scores are micro-averaged over entities; a zero denominator
gives 0 (seqeval's ``zero_division="warn"`` value, without the warning).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Entity = tuple[str, int, int]  # (type, first index, last index): inclusive, as seqeval reports them
SCHEMES = ("iob1", "iob2", "bioes")


def split_tag(tag: str) -> tuple[str, str]:
    """(prefix, type) of a tag exactly as seqeval parses it: "B-PER" -> ("B", "PER"), "O" -> ("O", "_").

    The prefix is the first character and the type what follows the first "-" (or "_" when
    nothing does), so odd tags ("B", "BX-Y") are read the way seqeval reads them.
    """
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """Whether a chunk ended between the previous tag and this one (seqeval's ``end_of_chunk``)."""
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    """Whether a chunk starts at this tag (seqeval's ``start_of_chunk``)."""
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def get_entities(tags: Sequence[str]) -> list[Entity]:
    """The entities of one flat tag sequence, in order: ``[("PER", 0, 1), ("LOC", 3, 3)]``."""
    prev_tag, prev_type, begin = "O", "", 0
    chunks: list[Entity] = []
    for i, chunk in enumerate([*tags, "O"]):  # the final "O" closes an entity that runs to the end
        tag, type_ = split_tag(chunk)
        if _ends(prev_tag, tag, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _starts(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return chunks


def sentence_entities(sentences: Sequence[Sequence[str]]) -> list[Entity]:
    """Entities of several sentences, indexed in the sequence seqeval builds: the sentences joined
    with one "O" after each."""
    flat: list[str] = []
    for tags in sentences:
        flat += [*tags, "O"]
    return get_entities(flat)


def _prf(correct: int, predicted: int, support: int) -> dict[str, float | int]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / support if support else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def entity_scores(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Precision, recall, F1 over all entities (micro average) and per type, plus word accuracy.

    ``y_true``/``y_pred``: one tag list per sentence, of equal lengths. Returns ``{"precision",
    "recall", "f1", "support" (gold entities), "predicted", "correct", "accuracy", "per_type":
    {type: {"precision", "recall", "f1", "support"}}}``; ``per_type`` lists every type seen in gold
    or predictions, sorted (seqeval's ``classification_report`` rows).
    """
    if len(y_true) != len(y_pred) or any(len(t) != len(p) for t, p in zip(y_true, y_pred, strict=False)):
        raise ValueError("y_true and y_pred must hold the same number of sentences and of tags per sentence")
    gold, pred = set(sentence_entities(y_true)), set(sentence_entities(y_pred))
    types = sorted({e[0] for e in gold} | {e[0] for e in pred})
    per_type = {}
    for name in types:
        g, p = {e for e in gold if e[0] == name}, {e for e in pred if e[0] == name}
        per_type[name] = _prf(len(g & p), len(p), len(g))
    overall = _prf(len(gold & pred), len(pred), len(gold))
    return {**overall, "predicted": len(pred), "correct": len(gold & pred), "accuracy": accuracy(y_true, y_pred),
            "per_type": per_type}


def accuracy(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> float:
    """Share of tags predicted exactly (seqeval's ``accuracy_score``); 0 when there is no tag."""
    pairs = [(t, p) for ts, ps in zip(y_true, y_pred, strict=True) for t, p in zip(ts, ps, strict=True)]
    return sum(t == p for t, p in pairs) / len(pairs) if pairs else 0.0


# ----------------------------------------------------------------------------- schemes


def to_iob2(tags: Sequence[str]) -> list[str]:
    """The same entities written in IOB2 (B- opens every entity, I- continues it).

    Entities are read with ``get_entities``, so IOB1, IOB2 and BIOES input (and lenient mixes)
    all give the chunks an evaluation of the original tags would count: converting never changes
    a score.
    """
    out = ["O"] * len(tags)
    for type_, start, end in get_entities(tags):
        out[start] = f"B-{type_}"
        for i in range(start + 1, end + 1):
            out[i] = f"I-{type_}"
    return out


def to_bioes(tags: Sequence[str]) -> list[str]:
    """The same entities in BIOES (S- for one-word entities, E- ending longer ones)."""
    out = ["O"] * len(tags)
    for type_, start, end in get_entities(tags):
        if start == end:
            out[start] = f"S-{type_}"
            continue
        out[start], out[end] = f"B-{type_}", f"E-{type_}"
        for i in range(start + 1, end):
            out[i] = f"I-{type_}"
    return out


def to_iob1(tags: Sequence[str]) -> list[str]:
    """The same entities in IOB1: I- throughout, B- only to open an entity right after one of its type."""
    out = ["O"] * len(tags)
    last_end, last_type = -2, ""
    for type_, start, end in get_entities(tags):
        for i in range(start, end + 1):
            out[i] = f"I-{type_}"
        if start == last_end + 1 and type_ == last_type:
            out[start] = f"B-{type_}"
        last_end, last_type = end, type_
    return out


def detect_scheme(sentences: Sequence[Sequence[str]]) -> str:
    """"bioes" when any E-/S- tag occurs; "iob1" when an I- tag opens an entity (after O, at the start,
    or after another type); "iob2" otherwise (also for data without entities)."""
    iob1 = False
    for tags in sentences:
        prev = "O"
        for tag in tags:
            prefix, type_ = split_tag(tag)
            if prefix in ("E", "S"):
                return "bioes"
            if prefix == "I" and (prev == "O" or split_tag(prev)[1] != type_):
                iob1 = True
            prev = tag
    return "iob1" if iob1 else "iob2"
