"""Pair readers (JSONL, TSV/CSV with a header, headerless Tatoeba files) and their encoding."""

from __future__ import annotations

import json

import pytest
from tokenizers import AddedToken, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from featherlm.data import IGNORE_INDEX, encode_chat
from featherlm.data.pairs import encode_pairs, read_pairs
from featherlm.errors import DataError
from featherlm.tokenizer import Tokenizer

WORDS = ["<pad>", "</s>", "<unk>", "hello", "world", "bonjour", "monde", "translate", ":", "to", "French", "English"]


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def word_tokenizer(chat: bool = False) -> Tokenizer:
    """Word-level, T5-style: ``</s>`` after every text; with ``chat`` a ChatML-like template."""
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if chat:
        backend.add_special_tokens([AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
        template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
        return Tokenizer(backend, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>", chat_template=template)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return Tokenizer(backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


# ----------------------------------------------------------------------------- layouts


def test_jsonl_default_named_and_translation_layouts(tmp_path):
    plain = write(tmp_path / "a.jsonl", '{"source": " hello ", "target": "bonjour"}\n\n'
                                        '{"source": "x", "target": "y"}\n')
    data = read_pairs(plain)
    assert (data.sources, data.targets, data.lines) == (["hello", "x"], ["bonjour", "y"], [1, 3])
    named = write(tmp_path / "b.jsonl", json.dumps({"en": "hello", "fr": "bonjour", "id": 3}) + "\n")
    assert read_pairs(named, source_column="en", target_column="fr").targets == ["bonjour"]
    hf = write(tmp_path / "c.jsonl", json.dumps({"translation": {"en": "hello", "fr": "bonjour"}}) + "\n")
    assert read_pairs(hf, source_column="en", target_column="fr").sources == ["hello"]


def test_tsv_and_csv_with_a_header(tmp_path):
    tsv = write(tmp_path / "s.tsv", "id\tdocument\tsummary\n1\ta long text\tshort\n2\tanother \"quoted\" one\tbrief\n")
    data = read_pairs(tsv)  # summarization's usual column names are found without configuration
    assert data.sources == ["a long text", 'another "quoted" one'] and data.targets == ["short", "brief"]
    csv = write(tmp_path / "t.csv", 'src,tgt\n"hello, world",bonjour\n')
    assert read_pairs(csv).sources == ["hello, world"]


def test_headerless_files_by_index(tmp_path):
    txt = write(tmp_path / "pairs.txt", "Go.\tVa !\tCC-BY 2.0\nHi.\tSalut !\tCC-BY 2.0\n")
    data = read_pairs(txt)  # a .txt file has no header: columns 0 and 1
    assert data.sources == ["Go.", "Hi."] and data.targets == ["Va !", "Salut !"]
    tsv = write(tmp_path / "pairs.tsv", "a\tb\tc\n")
    assert read_pairs(tsv, source_column=2, target_column=0).sources == ["c"]  # indices mean no header


def test_real_tatoeba_files(shared_data):
    fr = read_pairs(shared_data / "translation/tatoeba-en-fr/fra-5k.txt", source_column=0, target_column=1)
    assert len(fr) == 5000 and (fr.sources[0], fr.targets[0]) == ("Go.", "Va !")
    zh = read_pairs(shared_data / "translation/tatoeba-en-zh/cmn.txt")
    lines = (shared_data / "translation/tatoeba-en-zh/cmn.txt").read_text(encoding="utf-8").splitlines()
    assert len(zh) == sum(1 for line in lines if line.strip())
    assert all("\t" not in t for t in zh.targets) and any("\u4e00" <= c <= "\u9fff" for c in zh.targets[0])


# ----------------------------------------------------------------------------- errors with file and line


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"source": "a", "target": "b"}\n{"source": "a", "target": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: broken JSON"):
        read_pairs(path)


def test_short_rows_name_file_and_line(tmp_path):
    headerless = write(tmp_path / "short.txt", "Go.\tVa !\nHi.\n")
    with pytest.raises(DataError, match=r"short\.txt:2: 1 fields: no column 1"):
        read_pairs(headerless)
    header = write(tmp_path / "short.tsv", "source\ttarget\nhello\tbonjour\nhello\n")
    with pytest.raises(DataError, match=r"short\.tsv:3: 1 of 2 fields"):
        read_pairs(header)


def test_empty_sides_wrong_columns_and_skipping(tmp_path):
    path = write(tmp_path / "e.jsonl", '{"source": "a", "target": ""}\n{"source": 3, "target": "b"}\n'
                                       '{"source": "c", "target": "d"}\n')
    with pytest.raises(DataError, match=r"e\.jsonl:1: empty target"):
        read_pairs(path)
    data = read_pairs(path, skip_bad_rows=True)
    assert data.sources == ["c"] and [line for line, _ in data.skipped] == [1, 2]
    assert "int, not text" in data.skipped[1][1]
    with pytest.raises(DataError, match="no source column 'en'"):
        read_pairs(path, source_column="en")
    with pytest.raises(DataError, match="JSONL rows are objects"):
        read_pairs(path, source_column=0, target_column=1)
    with pytest.raises(DataError, match="no such file"):
        read_pairs(tmp_path / "missing.tsv")


# ----------------------------------------------------------------------------- encoding


def test_plain_encoding_ends_prompt_and_target_as_the_tokenizer_does(tmp_path):
    tok = word_tokenizer()
    data = read_pairs(write(tmp_path / "p.jsonl", '{"source": "hello world", "target": "bonjour monde"}\n'))
    (example,), bad = encode_pairs(data, tok, template="translate {source_lang} to {target_lang} : {source}",
                                   source_lang="English", target_lang="French")
    prompt = tok.encode("translate English to French : hello world")
    assert prompt[-1] == tok.eos_id and not bad  # T5-style: the tokenizer closes the encoder input with </s>
    assert example["input_ids"] == prompt + tok.encode("bonjour monde", add_special_tokens=False) + [tok.eos_id]
    assert example["prompt_len"] == len(prompt) and example["index"] == 0


def test_chat_encoding_splits_at_the_assistant_turn(tmp_path):
    tok = word_tokenizer(chat=True)
    data = read_pairs(write(tmp_path / "p.jsonl", '{"source": "hello", "target": "bonjour"}\n'))
    (example,), _ = encode_pairs(data, tok, template="translate : {source}", chat=True)
    ids, labels = encode_chat(tok, [{"role": "user", "content": "translate : hello"},
                                    {"role": "assistant", "content": "bonjour"}])
    assert example["input_ids"] == ids
    assert example["prompt_len"] == labels.index(next(x for x in labels if x != IGNORE_INDEX))
    assert tok.decode(ids[example["prompt_len"]:], skip_special_tokens=False).split()[0] == "bonjour"


def test_long_sources_are_cut_to_leave_room_for_the_target(tmp_path):
    tok = word_tokenizer()
    data = read_pairs(write(tmp_path / "p.jsonl", '{"source": "hello world hello world hello world", '
                                                  '"target": "bonjour monde monde"}\n'))
    (example,), bad = encode_pairs(data, tok, template="{source}", max_seq_len=8)
    # 6 source words + </s> and a 4-token target: the target keeps a quarter of the 8 positions
    assert not bad and example["prompt_len"] == 6 and len(example["input_ids"]) == 8
    assert example["input_ids"][:6] == tok.encode("hello world hello world hello")
    assert example["input_ids"][6:] == tok.encode("bonjour monde", add_special_tokens=False)


def test_a_template_that_fills_the_context_is_a_bad_row(tmp_path):
    data = read_pairs(write(tmp_path / "p.jsonl", '{"source": "hello", "target": "monde"}\n'))
    examples, bad = encode_pairs(data, word_tokenizer(), template="translate to French English : {source}",
                                 max_seq_len=4)
    assert not examples and [line for line, _ in bad] == [1] and "no target token left" in bad[0][1]
