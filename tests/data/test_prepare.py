"""`featherlm data prepare` end to end on real text: counts add up, shards decode back to the kept
documents, the tokenizer is the oracle for the ids, runs are seeded and worker-independent."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featherlm import cli
from featherlm.data import TokenShards
from featherlm.data.clean import QualityConfig, clean_text
from featherlm.data.dedup import exact_key
from featherlm.data.prepare import PrepareConfig, prepare_corpus
from featherlm.errors import ConfigError, DataError
from featherlm.tokenizer import SPECIAL_ROLES, Tokenizer, train_tokenizer

SHAKESPEARE = Path("/work/shared/data/corpus/tinyshakespeare/input.txt")


@pytest.fixture(scope="module")
def slice_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bpe(slice_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "bpe"
    train_tokenizer([slice_file], "bpe", 400, out=out)
    return out


def documents(data_dir: Path, split: str, tok: Tokenizer) -> list[list[int]]:
    """A split's ids cut at the eos id: one list per document."""
    shards = TokenShards(data_dir, split)
    ids = shards.get(0, len(shards)).tolist()
    assert ids[-1] == shards.eos_id == tok.eos_id
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == shards.eos_id:
            docs.append(ids[start:i])
            start = i + 1
    return docs


def test_char_level_end_to_end(slice_file, tmp_path):
    out, src = tmp_path / "data", tmp_path / "src" / "shakespeare.txt"
    text = slice_file.read_text(encoding="utf-8")
    src.parent.mkdir()
    src.write_text(text + "\n\n" + text[:2000].upper(), encoding="utf-8")  # some paragraphs again
    manifest = prepare_corpus(src, "char", out, PrepareConfig(val_ratio=0.05, shard_tokens=10_000))
    paragraphs = [p for p in re.split(r"\n\s*\n", src.read_text(encoding="utf-8")) if p.strip()]
    stats = manifest["stats"]
    assert stats["documents_in"] == len(paragraphs)
    unique = {exact_key(clean_text(p)) for p in paragraphs}
    assert stats["removed_exact_duplicates"] == len(paragraphs) - len(unique) > 5
    kept = len(paragraphs) - sum(v for k, v in stats.items() if k.startswith("removed_"))
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["documents"] + val["documents"] == kept and val["documents"] == round(0.05 * kept)
    assert len(train["files"]) > 1  # several shards, read back as one stream below

    tok = Tokenizer.from_dir(out / "tokenizer")
    assert manifest["tokenizer"] == "char" and manifest["vocab_size"] == tok.vocab_size
    texts = [tok.decode(d) for split in ("train", "val") for d in documents(out, split, tok)]
    assert len(texts) == kept and stats["tokens"] == sum(map(len, texts)) + kept  # one id per char, + eos
    cleaned = {clean_text(p) for p in paragraphs}
    assert set(texts) <= cleaned and len({exact_key(t) for t in texts}) == kept
    specials = set(SPECIAL_ROLES["char"].values())
    vocab = {tok.id_to_token(i) for i in range(tok.vocab_size)} - specials
    assert vocab == set("".join(texts))  # the char vocabulary is the kept text's characters
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "src"]  # nothing temporary left


def test_bpe_ids_match_the_tokenizer_and_workers_do_not_change_the_result(slice_file, bpe, tmp_path):
    config = PrepareConfig(val_ratio=0.1, doc_split="line", shard_tokens=5_000, chunk_docs=64)
    one = prepare_corpus([slice_file], bpe, tmp_path / "one", config)
    tok = Tokenizer.from_dir(bpe)
    assert one["tokenizer"] == str(bpe.resolve()) and one["dtype"] == "uint16" and one["eos_id"] == tok.eos_id
    for split in ("train", "val"):
        for ids in documents(tmp_path / "one", split, tok)[:200]:
            text = tok.decode(ids)
            assert tok.encode(text) == ids and text.strip() == text and text  # a whole, cleaned line
    config.workers = 2
    two = prepare_corpus([slice_file], bpe, tmp_path / "two", config)
    assert one["stats"] == two["stats"] and one["splits"] == two["splits"]
    for name in one["splits"]["train"]["files"] + one["splits"]["val"]["files"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_planted_duplicates_filters_and_formats(tmp_path):
    paragraphs = [p for p in SHAKESPEARE.read_text(encoding="utf-8")[:200_000].split("\n\n") if len(p) > 400][:30]
    near = paragraphs[0].replace("the", "thee", 1)
    rows = [*paragraphs[:20], paragraphs[3], paragraphs[5].upper(), near,  # 2 exact, 1 near duplicate
            "<html><body><p>" + paragraphs[20] + "</p><p>&copy; 2024</p></body></html>",
            "hi", "12 34 56 78 90 12 34 56 78 90 11 22 33 44 55 66 77 88"]  # 1 too short, 1 junk
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(rows)))
    (src / "b.tsv").write_text("label\tsentence\n" + "".join(f"0\t{p}\n" for p in
                                                             (x.replace("\n", " ") for x in paragraphs[21:30])))
    (src / "notes.md").write_text("not read: only .txt/.jsonl/.tsv/.csv files are taken from a folder")
    config = PrepareConfig(val_ratio=0.0, quality=QualityConfig(min_chars=10))
    manifest = prepare_corpus(src, "char", tmp_path / "out", config)
    stats = manifest["stats"]
    assert stats == {**stats, "documents_in": len(rows) + 9, "removed_exact_duplicates": 2,
                     "removed_near_duplicates": 1, "removed_by_length": 1, "removed_by_quality": 1}
    assert manifest["splits"]["val"]["documents"] == 0 and manifest["splits"]["train"]["documents"] == 30
    tok = Tokenizer.from_dir(tmp_path / "out" / "tokenizer")
    texts = [tok.decode(d) for d in documents(tmp_path / "out", "train", tok)]
    assert any(t.endswith("\n© 2024") and "<p>" not in t for t in texts)  # HTML stripped, entity decoded


def test_augmentation_is_seeded_and_only_for_training(slice_file, tmp_path):
    config = PrepareConfig(val_ratio=0.1, seed=3)
    config.augment.copies = 2
    a = prepare_corpus(slice_file, "char", tmp_path / "a", config)
    prepare_corpus(slice_file, "char", tmp_path / "b", config)
    plain = prepare_corpus(slice_file, "char", tmp_path / "plain", PrepareConfig(val_ratio=0.1, seed=3))
    train, val = a["splits"]["train"], a["splits"]["val"]
    assert a["stats"]["augmented"] == 2 * plain["splits"]["train"]["documents"]
    assert train["documents"] == 3 * plain["splits"]["train"]["documents"]
    assert val == plain["splits"]["val"]  # validation documents are the same and never augmented
    for name in train["files"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    config.seed = 4
    c = prepare_corpus(slice_file, "char", tmp_path / "c", config)
    assert c["splits"]["train"]["tokens"] != train["tokens"] or c["splits"]["val"] != val


def test_bad_input(slice_file, tmp_path):
    with pytest.raises(DataError, match="nope.txt: no such file"):
        prepare_corpus(tmp_path / "nope.txt", "char", tmp_path / "x")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n\n{"text": "broken\n')
    with pytest.raises(DataError, match=r"broken.jsonl:3: broken JSON"):
        prepare_corpus([slice_file, broken], "char", tmp_path / "x")
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"nofield.jsonl:1: field 'text' is missing"):
        prepare_corpus(tmp_path / "nofield.jsonl", "char", tmp_path / "x")
    assert not (tmp_path / "x").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        prepare_corpus(slice_file, "char", busy)
    prepare_corpus(slice_file, "char", busy, PrepareConfig(overwrite=True))
    assert not (busy / "keep.txt").exists() and (busy / "manifest.json").is_file()
    with pytest.raises(ConfigError, match="dedup"):
        prepare_corpus(slice_file, "char", tmp_path / "y", PrepareConfig(dedup=("fuzzy",)))
    assert cli.main(["data", "prepare", "--input", str(broken), "--tokenizer", "char", "--out",
                     str(tmp_path / "z")]) == 2


def test_cli_prepare_once(slice_file, bpe, tmp_path):
    out = tmp_path / "data"
    proc = subprocess.run([sys.executable, "-m", "featherlm.cli", "data", "prepare", "--input", str(slice_file),
                           "--tokenizer", str(bpe), "--out", str(out), "--val-ratio", "0.1", "--workers", "2",
                           "--dedup", "exact", "--json"], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    manifest = json.loads((out / "manifest.json").read_text())
    assert result == {**result, **manifest["stats"]} and result["removed_near_duplicates"] == 0
    train = TokenShards(out, "train")
    assert result["train_tokens"] == len(train) and train.vocab_size == 400
    assert np.all(train.get(0, len(train)) < 400)
