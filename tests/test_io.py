"""Atomic writes: a failure at any point leaves the old file or folder intact and no temp files behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from featherlm.io import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_text


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_atomic_write_text_replaces_and_creates_parents(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second é")
    assert target.read_text(encoding="utf-8") == "second é"
    assert names(target.parent) == {"out.txt"}


def test_atomic_write_keeps_old_content_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def half_then_crash(self: Path, data: bytes) -> int:
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new content that never fully lands")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert names(tmp_path) == {"out.txt"}


def test_atomic_write_text_keeps_old_content_on_encoding_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(target, "bad \ud800 surrogate")
    assert target.read_text() == "old"
    assert names(tmp_path) == {"out.txt"}


def test_atomic_path_keeps_old_content_when_the_block_raises(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert names(tmp_path) == {"model.safetensors"}
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert names(tmp_path) == {"model.safetensors"}


def test_atomic_dir_keeps_old_folder_when_the_block_raises(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(folder) as tmp:
            (tmp / "config.json").write_text("new")
            (tmp / "weights.bin").write_bytes(b"partial")
            raise RuntimeError("interrupted")
    assert names(folder) == {"config.json"}
    assert (folder / "config.json").read_text() == "old"
    assert names(tmp_path) == {"run"}


def test_atomic_dir_replaces_the_whole_folder_on_success(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "stale.txt").write_text("from the previous run")
    with atomic_dir(folder) as tmp:
        assert not (tmp / "stale.txt").exists()  # starts empty, not a copy of the old folder
        (tmp / "config.json").write_text("new")
        assert (folder / "stale.txt").exists()  # the old folder stays until the block succeeds
    assert names(folder) == {"config.json"}
    assert names(tmp_path) == {"run"}
    with atomic_dir(tmp_path / "fresh" / "nested") as tmp:  # creates missing parents
        (tmp / "x").write_text("x")
    assert (tmp_path / "fresh" / "nested" / "x").read_text() == "x"


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    """mkstemp/mkdtemp make private 0600 files and 0700 folders; the results follow the umask instead."""
    import os

    from featherlm.io import atomic_dir, atomic_write_text

    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("y")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
