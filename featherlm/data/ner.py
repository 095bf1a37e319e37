"""Named-entity recognition data: CoNLL files in, subword-aligned token-classification examples out.

CoNLL format: one ``TOKEN ... TAG`` line per word (the tag is the last column; CoNLL-2003's POS
and chunk columns in between are ignored), a blank line between sentences, ``-DOCSTART-`` lines
skipped. Tags may be IOB1, IOB2 or BIOES (detected, or named by ``data.tag_scheme``); they are
converted to IOB2, the one scheme the model learns, by re-encoding the entities the original tags
describe (``featherlm.evaluate.entities.to_iob2``), so no entity is gained or lost on the way.

A word becomes one or more subwords. The label goes on its first subword and the others get
IGNORE_INDEX (no loss), as in BERT's NER recipe; ``label_all_subwords`` labels them all (a B- word
continues with I-). Evaluation reads a word's tag from its first subword's prediction, so the
model is scored on the words of the file whatever the tokenizer does.

Casing features: an uncased tokenizer (all-MiniLM-L6-v2's) lower-cases "Bush" into "bush" before
the model sees it. ``word_case`` puts each word, as written, into one of ``CASE_CLASSES`` (the
word shapes of the classic CoNLL systems and Lample et al. 2016); ``case_ids`` gives every subword
its word's class, for a ``TokenClassifier`` built with case features to embed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featherlm.data.tasks import IGNORE_INDEX, Rows, iter_lines, special_affixes
from featherlm.errors import DataError
from featherlm.evaluate.entities import SCHEMES, detect_scheme, get_entities, to_iob2

TAG = re.compile(r"O|[BIES]-\S+")
DOCSTART = "-DOCSTART-"
# Words of free text for prediction, close to CoNLL-2003's tokenisation: acronyms keep their dots
# ("U.S."), words keep inner hyphens, apostrophes, dots and commas ("1996-08-22", "O'Neil", "1,000.5"),
# any other non-space character is a word of its own.
WORD = re.compile(r"(?:[^\W\d_]\.){2,}|\w+(?:[-'’.,/&]\w+)*|\S")
# Word shapes; id 0 is for positions without a word (special tokens, padding).
CASE_CLASSES = ("none", "lower", "title", "upper", "mixed", "number", "alnum", "punct")
_CASE = {name: i for i, name in enumerate(CASE_CLASSES)}


@dataclass
class NerData:
    """Sentences of a CoNLL file: words and their IOB2 tags, the file line each sentence starts on."""

    path: str
    words: list[list[str]]
    tags: list[list[str]]  # IOB2, whatever the file's scheme
    lines: list[int]
    scheme: str  # the scheme the file was read as: iob1, iob2 or bioes
    skipped: list[tuple[int | None, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.words)


def read_conll(path: str | Path, *, scheme: str = "auto", skip_bad_rows: bool = False) -> NerData:
    """Read a CoNLL file. ``scheme``: "auto" (detected per file), "iob1", "iob2" or "bioes".

    A line with a single column, or a tag that is not O / B-X / I-X / E-X / S-X, is a DataError
    naming the line; with ``skip_bad_rows`` its whole sentence is left out instead (a sentence with a
    word missing would shift every tag after it). E-/S- tags in a file declared IOB are errors too.
    """
    if scheme != "auto" and scheme not in SCHEMES:
        raise DataError(path, None, f"unknown tag scheme {scheme!r}; expected auto, {', '.join(SCHEMES)}")
    rows = Rows(str(path), skip_bad_rows)
    words: list[list[str]] = []
    tags: list[list[str]] = []
    lines: list[int] = []
    current: list[tuple[str, str]] = []
    start, bad = 0, False

    def close() -> None:
        nonlocal current, bad
        if current and not bad:
            words.append([w for w, _ in current])
            tags.append([t for _, t in current])
            lines.append(start)
        current, bad = [], False

    for n, text in iter_lines(path, rows):
        columns = text.split()
        if not columns:
            close()
            continue
        if columns[0] == DOCSTART:
            close()  # a document boundary is a sentence boundary, even without the usual blank line
            continue
        if not current:
            start = n
        if len(columns) < 2:
            bad = True
            rows.bad(n, f"expected 'TOKEN ... TAG' (at least 2 columns), got 1 column: {text.strip()!r}")
            continue
        tag = columns[-1]
        if not TAG.fullmatch(tag):
            bad = True
            rows.bad(n, f"tag {tag!r} is not O, B-X, I-X, E-X or S-X")
            continue
        if scheme in ("iob1", "iob2") and tag[0] in "ES":
            bad = True
            rows.bad(n, f"tag {tag!r} is a BIOES tag, but the tag scheme is {scheme} (set data.tag_scheme)")
            continue
        current.append((columns[0], tag))
    close()
    if not words:
        raise DataError(path, None, "no sentences" + (f" ({len(rows.skipped)} bad rows skipped)"
                                                      if rows.skipped else ""))
    read_as = detect_scheme(tags) if scheme == "auto" else scheme
    return NerData(str(path), words, [to_iob2(t) for t in tags], lines, read_as, rows.skipped)


def ner_labels(tags: Sequence[Sequence[str]]) -> list[str]:
    """The label list of IOB2 tags: "O", then B- and I- of every entity type, types sorted.

    Both prefixes of every type, even where the data has only one-word entities of it: the model
    may then still predict a longer one.
    """
    types = sorted({t[2:] for sentence in tags for t in sentence if t != "O"})
    return ["O", *(f"{p}-{t}" for t in types for p in "BI")]


def encode_words(tokenizer, sentences: Sequence[Sequence[str]],
                 max_seq_len: int) -> list[tuple[list[int], list[int | None]]]:
    """(input_ids, word_ids) per sentence: ``word_ids[t]`` is the index of the word token t came from,
    None for special tokens.

    Words are encoded as given (pre-tokenized) through the ``tokenizers`` backend, which knows the
    word each subword came from. Truncation keeps the special tokens at both ends.
    """
    affixes = special_affixes(tokenizer)
    out = []
    for enc in tokenizer.backend.encode_batch([list(s) for s in sentences], is_pretokenized=True):
        ids, word_ids = enc.ids, enc.word_ids
        if len(ids) > max_seq_len:
            suffix = affixes[1] if max_seq_len > sum(affixes) else 0
            keep = max_seq_len - suffix
            ids = ids[:keep] + ids[len(ids) - suffix:]
            word_ids = word_ids[:keep] + word_ids[len(word_ids) - suffix:]
        out.append((ids, word_ids))
    return out


def word_case(word: str) -> int:
    """The casing class of a word as written (an id into ``CASE_CLASSES``): "lower" (all letters
    lower-case: "the", "o'clock"), "title" ("Paris", "I", "Wal-mart"), "upper" (two or more letters,
    all capitals: "EU", "U.S."), "mixed" ("McDonald", "O'Neil", "iPhone"), "number" (digits, no letters:
    "1996", "1,000.5", "08-22"), "alnum" (letters and digits: "F1", "3rd", "1990s"), "punct" (neither
    letters nor digits: ",", "(", "--")."""
    letters = [c for c in word if c.isalpha()]
    if any(c.isdigit() for c in word):
        return _CASE["alnum" if letters else "number"]
    if not letters:
        return _CASE["punct"]
    upper = [c.isupper() for c in letters]
    if not any(upper):
        return _CASE["lower"]
    if all(upper):
        return _CASE["upper" if len(letters) > 1 else "title"]
    return _CASE["title" if upper[0] and not any(upper[1:]) else "mixed"]


def case_ids(word_ids: Sequence[int | None], words: Sequence[str]) -> list[int]:
    """Each token's word casing class (``word_case`` of its word, as written), 0 for special tokens."""
    cases = [word_case(w) for w in words]
    return [0 if w is None else cases[w] for w in word_ids]


def first_subwords(word_ids: Sequence[int | None], n_words: int) -> list[int]:
    """Position of each word's first subword; -1 for a word with none (a character the tokenizer
    drops, or a word cut off by truncation)."""
    first = [-1] * n_words
    for position, w in enumerate(word_ids):
        if w is not None and first[w] < 0:
            first[w] = position
    return first


def encode_ner(data: NerData, tokenizer, max_seq_len: int, labels: Sequence[str], *,
               label_all_subwords: bool = False) -> list[dict[str, Any]]:
    """Examples ``{"input_ids", "labels", "case_ids", "first", "tags"}``: token labels (IGNORE_INDEX on
    special tokens, on continuation subwords unless ``label_all_subwords``, and for tags the label
    list lacks), each token's word casing class (``case_ids``, from the words as the file writes
    them), the first subword of each word, and the gold IOB2 word tags (for entity scoring)."""
    index = {name: i for i, name in enumerate(labels)}
    examples = []
    encoded = encode_words(tokenizer, data.words, max_seq_len)
    for (ids, word_ids), words, tags in zip(encoded, data.words, data.tags, strict=True):
        first = first_subwords(word_ids, len(tags))
        token_labels = [IGNORE_INDEX] * len(ids)
        for position, w in enumerate(word_ids):
            if w is None:
                continue
            tag = tags[w]
            if position != first[w]:
                if not label_all_subwords:
                    continue
                tag = "I-" + tag[2:] if tag.startswith("B-") else tag  # the word's entity goes on
            token_labels[position] = index.get(tag, IGNORE_INDEX)
        examples.append({"input_ids": ids, "labels": token_labels, "case_ids": case_ids(word_ids, words),
                         "first": first, "tags": list(tags)})
    return examples


def word_tags(first: Sequence[int], token_predictions: Sequence[int], labels: Sequence[str]) -> list[str]:
    """Word-level tags from per-token predicted label ids: each word takes its first subword's
    prediction; a word without one (dropped, or cut by truncation) is "O"."""
    return [labels[token_predictions[p]] if p >= 0 else "O" for p in first]


def split_words(text: str) -> list[tuple[str, int, int]]:
    """(word, start, end) of each word of free text, character offsets into ``text`` (see ``WORD``)."""
    return [(m.group(), m.start(), m.end()) for m in WORD.finditer(text)]


def entities_in_text(text: str, spans: Sequence[tuple[str, int, int]], tags: Sequence[str]) -> list[dict[str, Any]]:
    """Entities of ``tags`` (one per word of ``spans``) as character spans of ``text``:
    ``[{"type", "start", "end", "text", "first", "last"}]`` (first/last: word indices)."""
    out = []
    for type_, a, b in get_entities(list(tags)):
        start, end = spans[a][1], spans[b][2]
        out.append({"type": type_, "start": start, "end": end, "text": text[start:end], "first": a, "last": b})
    return out
