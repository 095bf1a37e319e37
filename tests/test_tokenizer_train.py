"""Tokenizer training: round trips on English and Chinese, special tokens, and transformers as the
oracle that the saved folder means what our Tokenizer says it means."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from featherlm.errors import ConfigError, DataError
from featherlm.tokenizer import SPECIAL_ROLES, Tokenizer, train_tokenizer

DATA = Path("/work/shared/data")
SHAKESPEARE = DATA / "corpus/tinyshakespeare/input.txt"
CMN = DATA / "translation/tatoeba-en-zh/cmn.txt"
ROLES = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")
VOCAB = {"bpe": 600, "wordpiece": 1500, "unigram": 1500, "char": None}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A real slice: 40k characters of Shakespeare and 1,500 Chinese Tatoeba sentences (two files)."""
    root = tmp_path_factory.mktemp("corpus")
    english = SHAKESPEARE.read_text(encoding="utf-8")[:40_000]
    chinese = [line.split("\t")[1] for line in CMN.read_text(encoding="utf-8").splitlines()[:3000:2]]
    (root / "en.txt").write_text(english, encoding="utf-8")
    (root / "zh.txt").write_text("\n".join(chinese) + "\n", encoding="utf-8")
    en_lines = [p for p in english.split("\n\n") if p.strip()]
    return {"files": [root / "en.txt", root / "zh.txt"], "en": en_lines[5:25], "zh": chinese[::25]}


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tok")
    return {kind: (train_tokenizer(corpus["files"], kind, VOCAB[kind], out=root / kind), root / kind)
            for kind in VOCAB}


@pytest.mark.parametrize("kind", ["bpe", "unigram", "char"])
def test_round_trip_english_and_chinese(trained, corpus, kind):
    tok = Tokenizer.from_dir(trained[kind][1])
    for text in corpus["en"] + corpus["zh"]:
        ids = tok.encode(text)
        assert tok.unk_id not in ids or tok.unk_id is None
        assert tok.decode(ids) == text
    if kind == "bpe":  # byte level: text it never saw, emoji included, still round-trips
        unseen = "Ünïcödé ✓ 😀 — 日本語のテキスト\t\n"
        assert tok.decode(tok.encode(unseen)) == unseen
    for text in corpus["zh"]:  # decoding token by token never shows half a character (U+FFFD)
        stream = tok.stream()
        pieces = [stream.feed(i) for i in tok.encode(text)] + [stream.flush()]
        assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_wordpiece_is_bert_style(trained, corpus):
    tok = Tokenizer.from_dir(trained["wordpiece"][1])
    assert [tok.id_to_token(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for text in corpus["en"] + corpus["zh"]:
        ids = tok.encode(text)
        assert tok.id_to_token(ids[0]) == "[CLS]" and tok.id_to_token(ids[-1]) == "[SEP]"
        assert tok.unk_id not in ids
        # uncased by default: decode gives the lowercased words, joined by spaces (CJK characters apart)
        assert "".join(tok.decode(ids).split()) == "".join(text.lower().split())
    for text in corpus["zh"]:  # each CJK character is a word of its own: one token each, whole
        han = [c for c in text if "\u4e00" <= c <= "\u9fff"]
        pieces = [tok.id_to_token(i) for i in tok.encode(text, add_special_tokens=False)]
        assert all(c in pieces for c in han)


@pytest.mark.parametrize("kind", list(VOCAB))
def test_folder_loads_in_transformers_with_the_same_ids(trained, corpus, kind):
    ours, folder = trained[kind]
    theirs = PreTrainedTokenizerFast.from_pretrained(folder)
    for role in ROLES:
        expected = SPECIAL_ROLES[kind].get(role)
        assert getattr(ours, role) == expected
        assert getattr(theirs, role) == expected
        if expected is not None:
            assert theirs.convert_tokens_to_ids(expected) == ours.token_to_id(expected)
    assert ours.mask_id is not None and ours.mask_id == theirs.mask_token_id
    assert len(theirs) == ours.vocab_size
    for text in corpus["en"][:5] + corpus["zh"][:5]:
        assert theirs(text)["input_ids"] == ours.encode(text)


def test_vocabulary_sizes(trained, corpus):
    assert trained["bpe"][0].vocab_size == VOCAB["bpe"]
    bpe = trained["bpe"][0]
    byte_alphabet = {bpe.id_to_token(i) for i in range(bpe.vocab_size)}
    assert len({bpe.encode(chr(b))[0] for b in range(128)}) == 128  # every ASCII byte has an id
    assert "<|endoftext|>" in byte_alphabet and bpe.bos_id == bpe.eos_id
    text = "".join(path.read_text(encoding="utf-8") for path in corpus["files"])
    char = trained["char"][0]
    specials = list(dict.fromkeys(SPECIAL_ROLES["char"].values()))
    assert char.vocab_size == len(specials) + len(set(text))  # every character seen, plus the specials
    assert [char.id_to_token(i) for i in range(len(specials))] == specials
    capped = train_tokenizer(corpus["files"], "char", len(specials) + 30)
    assert capped.vocab_size == len(specials) + 30
    assert capped.unk_id in capped.encode("你好 the")  # rare characters fall to <unk>, frequent ones stay
    assert capped.token_to_id("e") is not None and capped.token_to_id(" ") is not None


def test_lowercase_and_extra_special_tokens(corpus):
    tok = train_tokenizer(corpus["files"], "bpe", 400, lowercase=True, special_tokens=["<|im_start|>"])
    assert tok.encode("HELLO there") == tok.encode("hello there")
    assert tok.encode("<|im_start|>") == [tok.token_to_id("<|im_start|>")]
    cased = train_tokenizer(corpus["files"], "wordpiece", 800, lowercase=False)
    assert cased.decode(cased.encode("ROMEO")) == "ROMEO"


def test_mistakes(corpus, tmp_path):
    with pytest.raises(ConfigError, match="unknown tokenizer kind"):
        train_tokenizer(corpus["files"], "sentencepiece", 100)
    with pytest.raises(DataError, match="nope.txt: no such file"):
        train_tokenizer([tmp_path / "nope.txt"], "bpe", 500)
    with pytest.raises(ConfigError, match="at least 259"):
        train_tokenizer(corpus["files"], "bpe", 100)
    with pytest.raises(ConfigError, match="raise --vocab-size"):
        train_tokenizer(corpus["files"], "unigram", 50)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        train_tokenizer(corpus["files"], "char", None, out=busy)
    assert (busy / "notes.txt").read_text() == "keep me"
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        train_tokenizer([bad], "char", None)


def test_retraining_replaces_a_tokenizer_folder(corpus, tmp_path):
    out = tmp_path / "tok"
    train_tokenizer(corpus["files"], "char", None, out=out)
    train_tokenizer(corpus["files"], "bpe", 300, out=out)
    assert Tokenizer.from_dir(out).vocab_size == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temporary folder left behind


def test_cli_trains_a_folder(corpus, tmp_path):
    out = tmp_path / "tok"
    proc = subprocess.run([sys.executable, "-m", "featherlm.cli", "tokenizer", "train", "--data",
                           *map(str, corpus["files"]), "--kind", "unigram", "--vocab-size", "1200", "--out", str(out),
                           "--json"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    tok = Tokenizer.from_dir(out)
    assert result["vocab_size"] == tok.vocab_size == 1200 and result["eos_token"] == tok.eos_token == "</s>"
    text = corpus["zh"][0] + " " + corpus["en"][0]
    assert tok.decode(tok.encode(text)) == text
