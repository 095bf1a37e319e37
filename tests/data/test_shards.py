"""Token shards: exact round trips (across shard boundaries, uint16 and uint32), atomic writes, checks."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from featherlm.data import ShardWriter, TokenShards, read_manifest, write_manifest
from featherlm.errors import DataError


def write_split(out, split, docs, vocab_size, shard_tokens):
    with ShardWriter(out, split, vocab_size=vocab_size, shard_tokens=shard_tokens) as writer:
        for doc in docs:
            writer.add(doc)
    return writer


def random_docs(rng, vocab_size, n=40):
    return [rng.integers(0, vocab_size, size=int(rng.integers(0, 30))).tolist() for _ in range(n)]


@pytest.mark.parametrize(("vocab_size", "dtype"), [(65536, "uint16"), (65537, "uint32"), (300_000, "uint32")])
def test_round_trip_across_shard_boundaries(tmp_path, vocab_size, dtype):
    rng = np.random.default_rng(vocab_size)
    docs = random_docs(rng, vocab_size)
    docs[3] = [vocab_size - 1, 0, vocab_size - 1]  # the extremes of the id range survive
    flat = np.array([t for d in docs for t in d], dtype=np.int64)
    writer = write_split(tmp_path, "train", docs, vocab_size, shard_tokens=7)  # many boundaries
    assert writer.num_tokens == len(flat) and writer.documents == len(docs)
    assert len(writer.files) == -(-len(flat) // 7)
    assert all(n == 7 for n in writer.file_tokens[:-1]) and 0 < writer.file_tokens[-1] <= 7
    write_manifest(tmp_path, {"dtype": dtype, "vocab_size": vocab_size, "eos_id": None,
                              "splits": {"train": writer.split_info()}})
    # the files are plain little-endian arrays that numpy reads on its own
    raw = np.concatenate([np.fromfile(tmp_path / f, dtype=np.dtype(dtype).newbyteorder("<")) for f in writer.files])
    np.testing.assert_array_equal(raw, flat)

    shards = TokenShards(tmp_path, "train")
    assert len(shards) == len(flat) and shards.dtype == dtype and shards.vocab_size == vocab_size
    np.testing.assert_array_equal(shards.get(0, len(flat)), flat)
    for start, length in [(0, 1), (5, 4), (6, 9), (13, 15), (len(flat) - 3, 3), (len(flat), 0)]:
        got = shards.get(start, length)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, flat[start:start + length])
    with pytest.raises(IndexError):
        shards.get(len(flat) - 2, 3)
    again = pickle.loads(pickle.dumps(shards))  # DataLoader workers reopen the maps
    np.testing.assert_array_equal(again.get(0, len(flat)), flat)


def test_no_temporary_files_left_and_abort_removes_the_split(tmp_path):
    write_split(tmp_path / "ok", "val", [[1, 2, 3]] * 5, 100, shard_tokens=4)
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == [f"val-0000{i}.bin" for i in range(4)]
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "bad", "train", vocab_size=100, shard_tokens=4) as w:
        w.add([1, 2, 3, 4, 5, 6])
        raise RuntimeError("interrupted")
    assert list((tmp_path / "bad").iterdir()) == []


def test_out_of_vocabulary_id_is_refused(tmp_path):
    with pytest.raises(DataError, match="outside the vocabulary"), \
            ShardWriter(tmp_path, "train", vocab_size=10) as writer:
        writer.add([1, 10])


def test_truncated_shard_names_the_file(tmp_path):
    writer = write_split(tmp_path, "train", [list(range(50))], 100, shard_tokens=16)
    write_manifest(tmp_path, {"dtype": "uint16", "vocab_size": 100, "splits": {"train": writer.split_info()}})
    victim = tmp_path / writer.files[1]
    victim.write_bytes(victim.read_bytes()[:-2])
    with pytest.raises(DataError, match=writer.files[1]):
        TokenShards(tmp_path, "train")
    victim.unlink()
    with pytest.raises(DataError, match="missing"):
        TokenShards(tmp_path, "train")


def test_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "featherlm-shards",\n "version": 1,,}')
    with pytest.raises(DataError, match=r"manifest.json:2"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(DataError, match="not a featherlm-shards manifest"):
        read_manifest(tmp_path)
    write_manifest(tmp_path, {"dtype": "uint16", "vocab_size": 5, "splits": {}})
    with pytest.raises(DataError, match="no split 'train'"):
        TokenShards(tmp_path, "train")
