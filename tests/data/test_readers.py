"""Task readers: columns, labels, every kind of bad row, SFT prompt masking, LM blocks, batching."""

from __future__ import annotations

import json

import pytest
import torch

from featherlm.checkpoint.gguf import read_gguf_tokenizer
from featherlm.data import (
    IGNORE_INDEX,
    batch_order,
    collate,
    encode_chat,
    encode_classification,
    read_classification,
    read_lm,
    read_sft,
)
from featherlm.data.tasks import special_affixes, truncate
from featherlm.errors import DataError
from featherlm.hub import resolve
from featherlm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def bert_tok():
    return Tokenizer.from_dir(resolve("minilm-l6"))


@pytest.fixture(scope="module")
def smol_tok():
    """SmolLM2-135M-Instruct's real tokenizer and ChatML template, from the GGUF header alone."""
    return read_gguf_tokenizer(resolve("smollm2-135m-instruct"))


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- classification


def test_reads_the_real_sst2_dev_set(shared_data):
    data = read_classification(shared_data / "sentiment/sst2/dev.tsv")
    assert len(data) == 872
    assert data.label_names == ["0", "1"]
    assert data.labels.count(1) == 444 and data.labels.count(0) == 428
    assert data.lines[0] == 2  # line 1 is the header
    assert not any("\r" in t for t in data.texts)  # SST-2's rows carry a stray "\r" before the tab


def test_tsv_csv_jsonl_give_the_same_examples(tmp_path):
    rows = [("a fine film", "pos"), ('it said "no", twice', "neg"), ("meh", "neutral")]
    tsv = write(tmp_path, "d.tsv", "text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    csv_text = "label,text\n" + "".join(f'{y},"{t.replace(chr(34), chr(34) * 2)}"\n' for t, y in rows)
    csv = write(tmp_path, "d.csv", csv_text)
    jsonl = write(tmp_path, "d.jsonl", "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    for path in (tsv, csv, jsonl):
        data = read_classification(path)
        assert data.texts == [t for t, _ in rows], path
        assert data.label_names == ["neg", "neutral", "pos"]  # sorted: ids do not depend on row order
        assert data.labels == [2, 0, 1]


def test_columns_by_name_numeric_labels_and_csv_lines(tmp_path):
    path = write(tmp_path, "d.csv", 'id,review,stars\n1,"two\nlines",10\n2,good,2\n3,ok,1\n')
    data = read_classification(path, text_column="review", label_column="stars")
    assert data.texts == ["two\nlines", "good", "ok"]
    assert data.label_names == ["1", "2", "10"]  # numeric order, not "1" < "10" < "2"
    assert data.labels == [2, 1, 0]
    assert data.lines == [2, 4, 5]  # a quoted field spanning lines: the record's first line


def test_given_labels_fix_the_ids(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"sentence": "x", "label": 1}\n{"sentence": "y", "label": "0"}\n'
                                      '{"sentence": "z", "label": 1.0}\n')
    assert read_classification(path, labels=["1", "0"]).labels == [0, 1, 0]  # 1, "1" and 1.0 are one label


BAD_ROWS = [
    ("d.tsv", "sentence\tlabel\ngood\t1\nmissing label\n", 3, "missing column 'label'"),
    ("d.tsv", "sentence\tlabel\ngood\t1\n  \t0\n", 3, "empty text"),
    ("d.tsv", "sentence\tlabel\ngood\t1\nbad\t\n", 3, "empty or unusable label"),
    ("d.tsv", "sentence\tlabel\ngood\t1\na\ttab\t0\n", 3, "3 fields, but the header has 2"),
    ("d.tsv", "sentence\tlabel\ngood\t1\nfine\t7\n", 3, "unknown label '7'"),  # read with labels=["0", "1"]
    ("d.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", "label": 0\n', 2, "broken JSON"),
    ("d.jsonl", '{"text": "good", "label": 1}\n\n["text", 0]\n', 3, "expected a JSON object"),
    ("d.jsonl", '{"text": "good", "label": 1}\n{"label": 0}\n', 2, "missing column 'text'"),
    ("d.jsonl", '{"text": "good", "label": 1}\n{"text": 5, "label": 0}\n', 2, "is a int, not a string"),
    ("d.csv", 'text,label\ngood,1\n"",0\n', 3, "empty text"),
]


@pytest.mark.parametrize("name,text,line,reason", BAD_ROWS)
def test_bad_rows_name_file_and_line(tmp_path, name, text, line, reason):
    path = write(tmp_path, name, text)
    with pytest.raises(DataError) as err:
        read_classification(path, labels=["0", "1"])
    assert (err.value.path, err.value.line) == (str(path), line)
    assert reason in err.value.reason
    assert str(err.value).startswith(f"{path}:{line}: ")


@pytest.mark.parametrize("name,text,line,reason", BAD_ROWS)
def test_skip_bad_rows_counts_them(tmp_path, name, text, line, reason):
    data = read_classification(write(tmp_path, name, text), labels=["0", "1"], skip_bad_rows=True)
    assert data.texts == ["good"]
    assert [(n, reason in why) for n, why in data.skipped] == [(line, True)]


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_classification(tmp_path / "nope.tsv")
    with pytest.raises(DataError, match=r"no text column: expected one of sentence, text \(columns: review, label\)"):
        read_classification(write(tmp_path, "a.tsv", "review\tlabel\nx\t1\n"))
    with pytest.raises(DataError, match="no label column 'stars'"):
        read_classification(write(tmp_path, "b.tsv", "text\tlabel\nx\t1\n"), label_column="stars")
    with pytest.raises(DataError, match="empty file"):
        read_classification(write(tmp_path, "c.tsv", ""))
    with pytest.raises(DataError, match=r"no usable examples \(1 bad rows skipped\)"):
        read_classification(write(tmp_path, "d.tsv", "text\tlabel\n\t1\n"), skip_bad_rows=True)
    with pytest.raises(DataError, match="must be .tsv, .csv or .jsonl"):
        read_classification(write(tmp_path, "e.txt", "text\n"))
    path = tmp_path / "f.tsv"
    path.write_bytes(b"text\tlabel\nok\t1\n\xff\xfe\t0\n")
    with pytest.raises(DataError, match="not UTF-8") as err:
        read_classification(path)
    assert err.value.line == 3
    assert read_classification(path, skip_bad_rows=True).texts == ["ok"]


@pytest.mark.parametrize("name,sep", [("bom.csv", ","), ("bom.tsv", "\t")])
def test_a_byte_order_mark_does_not_rename_the_first_column(tmp_path, name, sep):
    path = tmp_path / name
    path.write_bytes(f"text{sep}label\nok{sep}1\n".encode("utf-8-sig"))
    assert read_classification(path).texts == ["ok"]


def test_encoding_truncates_inside_bert_specials(tmp_path, bert_tok):
    assert special_affixes(bert_tok) == (1, 1)
    data = read_classification(write(tmp_path, "d.tsv", "text\tlabel\n" + "word " * 50 + "\t1\nshort one\t0\n"))
    long, short = encode_classification(data, bert_tok, max_seq_len=8)
    cls, sep = bert_tok.token_to_id("[CLS]"), bert_tok.token_to_id("[SEP]")
    assert len(long["input_ids"]) == 8 and long["input_ids"][0] == cls and long["input_ids"][-1] == sep
    assert short == {"input_ids": bert_tok.encode("short one"), "label": 0}
    assert truncate([1, 2, 3, 4], 2, (1, 1)) == [1, 2]  # no room for the text: plain cut


# ----------------------------------------------------------------------------- SFT


def test_sft_masks_exactly_the_prompt_tokens_with_smollm2_template(smol_tok):
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    ids, labels = encode_chat(smol_tok, messages)
    prompt = smol_tok.encode(smol_tok.apply_chat_template(messages[:1], add_generation_prompt=True),
                             add_special_tokens=False)
    whole = smol_tok.encode(smol_tok.apply_chat_template(messages, add_generation_prompt=False),
                            add_special_tokens=False)
    assert ids == whole  # turn-by-turn tokenisation equals tokenising the whole text
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):]
    assert smol_tok.decode(ids[len(prompt):], skip_special_tokens=False) == "It is 4.<|im_end|>\n"


def test_sft_multi_turn_masks_every_non_assistant_turn(smol_tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."}]
    ids, labels = encode_chat(smol_tok, messages)
    learnt = smol_tok.decode([i for i, y in zip(ids, labels, strict=True) if y != IGNORE_INDEX],
                             skip_special_tokens=False)
    assert learnt == "Hello.<|im_end|>\nGoodbye.<|im_end|>\n"
    assert "Bye" not in learnt and "Be brief" not in learnt


def test_sft_row_shapes_and_bad_rows(tmp_path, smol_tok):
    rows = [
        {"instruction": "Name a colour.", "response": "Red."},
        {"instruction": "Translate", "context": "bonjour", "response": "hello"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey."}]},
        {"instruction": "Add", "instances": [{"input": "1+1", "output": "2"}, {"input": "2+2", "output": "4"}]},
    ]
    path = write(tmp_path, "sft.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    data = read_sft(path, smol_tok, max_seq_len=256)
    assert len(data) == 5  # the seed-task row holds two instances
    user_turn = smol_tok.decode(data.examples[1]["input_ids"], skip_special_tokens=False)
    assert "<|im_start|>user\nTranslate\n\nbonjour<|im_end|>" in user_turn
    for e in data.examples:
        assert len(e["input_ids"]) == len(e["labels"]) and e["labels"][0] == IGNORE_INDEX
        assert any(y != IGNORE_INDEX for y in e["labels"])


@pytest.mark.parametrize("row,reason", [
    ({"instruction": "Name a colour."}, "missing or empty field 'response'"),
    ({"response": "Red."}, "missing or empty field 'instruction'"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "no non-empty assistant message"),
    ({"messages": [{"role": "user"}]}, "messages[0] must be an object"),
    ({"instruction": "x " * 300, "response": "y"}, "the prompt fills max_seq_len"),
])
def test_sft_bad_rows(tmp_path, smol_tok, row, reason):
    path = write(tmp_path, "sft.jsonl", json.dumps({"instruction": "ok", "response": "fine"}) + "\n" + json.dumps(row))
    with pytest.raises(DataError) as err:
        read_sft(path, smol_tok, max_seq_len=64)
    assert err.value.line == 2 and reason in err.value.reason
    assert len(read_sft(path, smol_tok, max_seq_len=64, skip_bad_rows=True).skipped) == 1


# ----------------------------------------------------------------------------- plain LM


def test_lm_blocks_from_text_and_jsonl(tmp_path, smol_tok, shared_data):
    text = (shared_data / "corpus/tinyshakespeare/input.txt").read_text(encoding="utf-8")[:5000]
    data = read_lm(write(tmp_path, "t.txt", text), smol_tok, block_size=64)
    stream = [i for e in data.examples for i in e["input_ids"]]
    assert all(len(e["input_ids"]) == 64 and e["labels"] == e["input_ids"] for e in data.examples)
    whole = smol_tok.encode(text, add_special_tokens=False)
    assert stream == whole[: len(stream)] and len(whole) - len(stream) < 64  # only the short tail dropped
    docs = write(tmp_path, "d.jsonl", '{"text": "one two"}\n{"text": "three"}\n')
    (only,) = read_lm(docs, smol_tok, block_size=64).examples  # a lone short block is kept
    assert only["input_ids"] == smol_tok.encode("one two", add_special_tokens=False) + [smol_tok.eos_id] + \
        smol_tok.encode("three", add_special_tokens=False) + [smol_tok.eos_id]
    with pytest.raises(DataError) as err:
        read_lm(write(tmp_path, "b.jsonl", '{"text": "one"}\n{"text": ""}\n'), smol_tok, block_size=8)
    assert err.value.line == 2
    with pytest.raises(DataError, match="too little text"):
        read_lm(write(tmp_path, "e.txt", ""), smol_tok, block_size=8)


# ----------------------------------------------------------------------------- batching


def test_batch_order_is_a_seeded_permutation_per_epoch():
    lengths = list(range(100))
    a = batch_order(lengths, 8, seed=1, epoch=0)
    assert sorted(i for b in a for i in b) == lengths and [len(b) for b in a][-1] == 4
    assert a == batch_order(lengths, 8, seed=1, epoch=0)
    assert a != batch_order(lengths, 8, seed=1, epoch=1) and a != batch_order(lengths, 8, seed=2, epoch=0)
    # a batch of 4 x 2 covers the same examples as a batch of 8 (so grad_accum keeps the data order)
    halves = batch_order(lengths, 4, seed=1, epoch=0)
    assert [sum(halves[i:i + 2], []) for i in range(0, len(halves), 2)] == a


def test_bucketing_cuts_padding_and_keeps_every_example():
    lengths = [int(x) for x in torch.randint(1, 64, (400,), generator=torch.Generator().manual_seed(0))]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    plain, bucketed = batch_order(lengths, 16, seed=0), batch_order(lengths, 16, seed=0, bucket=True)
    assert sorted(i for b in bucketed for i in b) == list(range(400))
    assert padding(bucketed) < padding(plain) / 5


def test_collate_pads_dynamically():
    batch = collate([{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": [8], "label": 0}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    lm = collate([{"input_ids": [5, 6], "labels": [-100, 6]}, {"input_ids": [7, 8, 9], "labels": [7, 8, 9]}], 2)
    assert lm["input_ids"].tolist() == [[5, 6, 2], [7, 8, 9]]
    assert lm["labels"].tolist() == [[-100, 6, -100], [7, 8, 9]]
