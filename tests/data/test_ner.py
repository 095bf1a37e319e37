"""CoNLL reading (schemes, bad lines), word -> subword label alignment, truncation, free-text words."""

from __future__ import annotations

import pytest
from seqeval.metrics.sequence_labeling import get_entities as seqeval_entities

from featherlm.data import IGNORE_INDEX
from featherlm.data.ner import (
    encode_ner,
    encode_words,
    entities_in_text,
    first_subwords,
    ner_labels,
    read_conll,
    split_words,
    word_tags,
)
from featherlm.errors import DataError
from featherlm.hub import resolve
from featherlm.tokenizer import Tokenizer

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP I-ORG
rejects VBZ B-VP O
German JJ B-NP I-MISC
call NN I-NP O
. . O O

Peter NNP B-NP I-PER
Blackburn NNP I-NP I-PER
Smith NNP I-NP B-PER
"""


@pytest.fixture(scope="module")
def bert_tok():
    """MiniLM-L6's real WordPiece tokenizer: words split into several subwords."""
    return Tokenizer.from_dir(resolve("minilm-l6"))


def write(tmp_path, text, name="data.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_the_last_column_skips_docstart_and_converts_iob1(tmp_path):
    data = read_conll(write(tmp_path, CONLL))
    assert data.words == [["EU", "rejects", "German", "call", "."], ["Peter", "Blackburn", "Smith"]]
    assert data.scheme == "iob1"
    assert data.tags == [["B-ORG", "O", "B-MISC", "O", "O"], ["B-PER", "I-PER", "B-PER"]]
    assert data.lines == [3, 9]
    raw = [["I-ORG", "O", "I-MISC", "O", "O"], ["I-PER", "I-PER", "B-PER"]]  # the file's own tags
    assert [seqeval_entities(t) for t in data.tags] == [seqeval_entities(t) for t in raw]


def test_bioes_and_declared_schemes(tmp_path):
    bioes = "John B-PER\nSmith E-PER\nin O\nParis S-LOC\n\nNew B-LOC\nYork I-LOC\nCity E-LOC\n"
    data = read_conll(write(tmp_path, bioes))
    assert data.scheme == "bioes"
    assert data.tags == [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "I-LOC", "I-LOC"]]
    assert read_conll(write(tmp_path, bioes), scheme="bioes").tags == data.tags
    with pytest.raises(DataError, match=r"data.txt:2: tag 'E-PER' is a BIOES tag, but the tag scheme is iob2"):
        read_conll(write(tmp_path, bioes), scheme="iob2")
    iob2 = "John B-PER\nSmith I-PER\n"
    assert read_conll(write(tmp_path, iob2)).scheme == "iob2"
    with pytest.raises(DataError, match="unknown tag scheme"):
        read_conll(write(tmp_path, iob2), scheme="bilou")


def test_windows_line_ends_tabs_and_no_final_blank_line(tmp_path):
    data = read_conll(write(tmp_path, "A\tB-X\r\nb\tI-X\r\n\r\nc\tO"))
    assert data.words == [["A", "b"], ["c"]] and data.tags == [["B-X", "I-X"], ["O"]]


@pytest.mark.parametrize("text,line,reason", [
    ("EU B-ORG\nrejects\n", 2, "at least 2 columns"),
    ("EU B-ORG\n\nfoo O\nx PER\n", 4, "tag 'PER' is not O, B-X, I-X, E-X or S-X"),
    ("a O\nb B_ORG\n", 2, "tag 'B_ORG'"),
    ("a O\nb B-\n", 2, "tag 'B-'"),
])
def test_malformed_lines_name_file_and_line(tmp_path, text, line, reason):
    path = write(tmp_path, text)
    with pytest.raises(DataError, match=reason) as err:
        read_conll(path)
    assert (err.value.path, err.value.line) == (str(path), line)


def test_skip_bad_rows_drops_the_whole_sentence(tmp_path):
    data = read_conll(write(tmp_path, "a O\nb\nc O\n\nd B-X\n\ne Q\n"), skip_bad_rows=True)
    assert data.words == [["d"]]
    assert [line for line, _ in data.skipped] == [2, 7]
    with pytest.raises(DataError, match="no sentences"):
        read_conll(write(tmp_path, "\n-DOCSTART- O\n\n"))
    with pytest.raises(DataError, match="no such file"):
        read_conll(tmp_path / "missing.txt")


def test_reads_the_real_conll2003_test_split(shared_data):
    data = read_conll(shared_data / "ner/conll2003/test.txt")
    assert len(data) == 3453  # the count SOURCES.md gives
    assert data.scheme == "iob2"
    assert ner_labels(data.tags) == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]


def test_first_subword_carries_the_label(bert_tok):
    words = [["Blackburn", "visited", "Ouagadougou", "in", "1996-08-22", "."]]
    tags = [["B-PER", "O", "B-LOC", "O", "O", "O"]]
    labels = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    data = type("D", (), {"words": words, "tags": tags})
    (ex,) = encode_ner(data, bert_tok, 64, labels)
    counts = [len(bert_tok.encode(w, add_special_tokens=False)) for w in words[0]]  # the oracle: words alone
    assert max(counts) > 1  # real subword splitting is exercised
    assert ex["input_ids"][0] == bert_tok.token_to_id("[CLS]") and ex["input_ids"][-1] == bert_tok.token_to_id("[SEP]")
    assert len(ex["input_ids"]) == sum(counts) + 2
    position = 1
    for w, n in enumerate(counts):
        assert ex["first"][w] == position
        assert ex["labels"][position] == labels.index(tags[0][w])
        assert ex["labels"][position + 1:position + n] == [IGNORE_INDEX] * (n - 1)
        assert ex["input_ids"][position:position + n] == bert_tok.encode(words[0][w], add_special_tokens=False)
        position += n
    assert ex["labels"][0] == ex["labels"][-1] == IGNORE_INDEX

    (every,) = encode_ner(data, bert_tok, 64, labels, label_all_subwords=True)
    span = slice(ex["first"][2], ex["first"][3])  # "Ouagadougou": B-LOC, then I-LOC on its other pieces
    assert every["labels"][span] == [labels.index("B-LOC")] + [labels.index("I-LOC")] * (counts[2] - 1)
    assert every["labels"][ex["first"][4]:ex["first"][5]] == [0] * counts[4]  # an O word: O throughout


def test_truncation_keeps_cls_and_sep_and_marks_cut_words(bert_tok):
    words = [["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]]
    data = type("D", (), {"words": words, "tags": [["B-X", "I-X", "O", "O", "O", "B-X"]]})
    (ex,) = encode_ner(data, bert_tok, 5, ["O", "B-X", "I-X"])
    assert len(ex["input_ids"]) == 5
    assert ex["input_ids"][-1] == bert_tok.token_to_id("[SEP]") and ex["labels"][-1] == IGNORE_INDEX
    assert ex["first"] == [1, 2, 3, -1, -1, -1]
    assert word_tags(ex["first"], [0, 1, 2, 0, 0], ["O", "B-X", "I-X"]) == ["B-X", "I-X", "O", "O", "O", "O"]


def test_words_without_subwords_are_tagged_o(bert_tok):
    ((ids, word_ids),) = encode_words(bert_tok, [["a", "\u200b", "b"]], 16)  # a zero-width space vanishes
    first = first_subwords(word_ids, 3)
    assert first[1] == -1 and first[0] > 0 and first[2] > first[0]
    assert word_tags(first, [0] * len(ids), ["O", "B-X"])[1] == "O"


def test_unknown_evaluation_tags_get_no_loss_but_stay_gold(bert_tok):
    data = type("D", (), {"words": [["Rome", "x"]], "tags": [["B-LOC", "B-NEW"]]})
    (ex,) = encode_ner(data, bert_tok, 16, ["O", "B-LOC", "I-LOC"])
    assert ex["labels"][ex["first"][1]] == IGNORE_INDEX and ex["tags"] == ["B-LOC", "B-NEW"]


def test_split_words_offsets_index_the_text():
    text = "EU rejects German call on 1996-08-22 in the U.S. , says O'Neil (Reuters)."
    spans = split_words(text)
    assert all(text[s:e] == w for w, s, e in spans)
    assert [w for w, _, _ in spans] == ["EU", "rejects", "German", "call", "on", "1996-08-22", "in", "the", "U.S.",
                                        ",", "says", "O'Neil", "(", "Reuters", ")", "."]
    assert "".join(text.split()) == "".join(w for w, _, _ in spans)  # nothing but spaces is left out


def test_entities_in_text_are_character_spans():
    text = "Peter Blackburn went to New York."
    spans = split_words(text)
    tags = ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O"]
    found = entities_in_text(text, spans, tags)
    assert [(e["type"], e["text"]) for e in found] == [("PER", "Peter Blackburn"), ("LOC", "New York")]
    assert all(text[e["start"]:e["end"]] == e["text"] for e in found)
