"""Token shards: flat files of token ids that pretraining reads through ``np.memmap``.

A prepared dataset is a folder with ``manifest.json`` and, per split, files
``{split}-00000.bin, {split}-00001.bin, ...``: raw little-endian ids, one document after
another (an end-of-text id between documents is the caller's choice), ``uint16`` when the
vocabulary fits in 16 bits (half the disk and page cache of ``uint32``), else ``uint32``. No
header, no pickle: ``np.fromfile(path, dtype)`` or any language can read them, and the OS pages in
only what a batch touches, so a corpus larger than memory trains without loading it.

The manifest names every file with its token count; ``TokenShards`` checks each file's size
against it when opening, so a truncated copy fails at once with the file named instead of
training on garbage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featherlm.errors import DataError
from featherlm.io import atomic_write_text

FORMAT, VERSION = "featherlm-shards", 1
MANIFEST = "manifest.json"
_FLUSH_TOKENS = 1 << 20  # buffer about 1M ids (2-4 MB) between writes: few syscalls, bounded memory


def shard_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of the vocabulary."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    if vocab_size <= 1 << 32:
        return np.dtype("<u4")
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


class ShardWriter:
    """Append documents' token ids to ``{out_dir}/{split}-NNNNN.bin`` shards of ``shard_tokens`` ids.

    A context manager: each shard is written under a temporary name and renamed when it is full or
    on a clean exit, so a reader never sees a half-written shard; on an exception the temporary
    file and the shards this writer finished are removed (the split would be incomplete).
    ``files`` lists the finished shards' names (relative to ``out_dir``), ``file_tokens`` their
    sizes in ids, ``num_tokens`` / ``documents`` the totals so far.
    """

    def __init__(self, out_dir: str | Path, split: str, *, vocab_size: int, shard_tokens: int = 2**26) -> None:
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        if not split or "/" in split or os.sep in split:
            raise ValueError(f"bad split name {split!r}")
        self.out_dir, self.split = Path(out_dir), split
        self.vocab_size, self.shard_tokens = int(vocab_size), int(shard_tokens)
        self.dtype = shard_dtype(self.vocab_size)
        self.files: list[str] = []
        self.file_tokens: list[int] = []
        self.num_tokens = 0
        self.documents = 0
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._handle: Any = None  # the open temporary file of the current shard
        self._tmp: Path | None = None
        self._in_shard = 0  # ids written to the current shard (flushed or buffered)
        self._closed = False
        self.out_dir.mkdir(parents=True, exist_ok=True)

    # ----- writing -----------------------------------------------------------------------------
    def add(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append one document's ids; an EOS id between documents is the caller's business."""
        if self._closed:
            raise ValueError("ShardWriter is closed")
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"a document is a flat sequence of ids, got shape {arr.shape}")
        self.documents += 1
        if arr.size == 0:
            return
        if arr.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise DataError(self.out_dir, None, f"token id {bad} outside the vocabulary (size {self.vocab_size})")
        arr = arr.astype(self.dtype, copy=False)
        while arr.size:  # a document may straddle shards: the stream is flat
            take = min(arr.size, self.shard_tokens - self._in_shard)
            self._buffer.append(arr[:take])
            self._buffered += take
            self._in_shard += take
            self.num_tokens += take
            arr = arr[take:]
            if self._in_shard == self.shard_tokens:
                self._finish_shard()
            elif self._buffered >= _FLUSH_TOKENS:
                self._flush()

    def _flush(self) -> None:
        if not self._buffered:
            return
        if self._handle is None:
            name = shard_name(self.split, len(self.files))
            self._tmp = self.out_dir / f".{name}.tmp"
            self._handle = open(self._tmp, "wb")  # noqa: SIM115 - stays open across add() calls
        np.concatenate(self._buffer).tofile(self._handle)
        self._buffer, self._buffered = [], 0

    def _finish_shard(self) -> None:
        self._flush()
        if self._handle is None:
            return
        self._handle.close()
        self._handle = None
        name = shard_name(self.split, len(self.files))
        os.replace(self._tmp, self.out_dir / name)
        self._tmp = None
        self.files.append(name)
        self.file_tokens.append(self._in_shard)
        self._in_shard = 0

    def close(self) -> None:
        """Write the last, partly filled shard. Idempotent."""
        if not self._closed:
            self._finish_shard()
            self._closed = True

    def abort(self) -> None:
        """Drop everything this writer wrote (temporary file and finished shards)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        for name in self.files:
            (self.out_dir / name).unlink(missing_ok=True)
        self.files, self.file_tokens, self._buffer, self._buffered = [], [], [], 0
        self._closed = True

    def split_info(self) -> dict[str, Any]:
        """This split's manifest entry."""
        return {"files": list(self.files), "tokens": self.num_tokens, "documents": self.documents,
                "file_tokens": list(self.file_tokens)}

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ----- manifest ------------------------------------------------------------------------------------
def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (format and version filled in when absent)."""
    data = {"format": FORMAT, "version": VERSION, **manifest}
    atomic_write_text(Path(out_dir) / MANIFEST, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Read and check ``manifest.json``; ``DataError`` naming the file when it is missing or broken."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        hint = " (prepare one with `featherlm data prepare`)" if Path(data_dir).is_dir() else " (no such folder)"
        raise DataError(path, None, f"no shard manifest{hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"invalid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise DataError(path, None, "not UTF-8 text") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(path, None, f"not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise DataError(path, None, f"unsupported manifest version {manifest.get('version')!r} (expected {VERSION})")
    for key in ("dtype", "vocab_size", "splits"):
        if key not in manifest:
            raise DataError(path, None, f"manifest lacks {key!r}")
    if manifest["dtype"] not in ("uint16", "uint32"):
        raise DataError(path, None, f"unsupported dtype {manifest['dtype']!r} (expected uint16 or uint32)")
    if not isinstance(manifest["splits"], dict):
        raise DataError(path, None, "'splits' must map split names to their files")
    return manifest


# ----- reading -------------------------------------------------------------------------------------
class TokenShards:
    """One split of a prepared dataset as a single flat sequence of ids, memory-mapped.

    ``get(start, length)`` returns ids ``[start, start + length)`` as int64 (the dtype embedding
    lookups take), reading across shard boundaries. Pickling sends only the folder and split
    name, so DataLoader workers reopen their own maps instead of copying the data.
    """

    def __init__(self, data_dir: str | Path, split: str) -> None:
        self.data_dir, self.split = Path(data_dir), split
        manifest = read_manifest(self.data_dir)
        where = self.data_dir / MANIFEST
        if split not in manifest["splits"]:
            known = ", ".join(sorted(manifest["splits"])) or "none"
            raise DataError(where, None, f"no split {split!r} (splits: {known})")
        entry = manifest["splits"][split]
        self.manifest = manifest
        self.dtype: str = manifest["dtype"]
        self.vocab_size: int = int(manifest["vocab_size"])
        self.eos_id: int | None = manifest.get("eos_id")
        self.documents: int | None = entry.get("documents")
        np_dtype = np.dtype(self.dtype).newbyteorder("<")
        files = [str(f) for f in entry.get("files", [])]
        counts = entry.get("file_tokens")
        if counts is not None and len(counts) != len(files):
            raise DataError(where, None, f"split {split!r}: {len(files)} files but {len(counts)} file_tokens")
        self._maps: list[np.ndarray] = []
        sizes = []
        for i, name in enumerate(files):
            path = self.data_dir / name
            if not path.is_file():
                raise DataError(path, None, f"shard listed in {MANIFEST} is missing")
            nbytes = path.stat().st_size
            if counts is not None and nbytes != int(counts[i]) * np_dtype.itemsize:
                raise DataError(path, None, f"shard is {nbytes} bytes, the manifest says {int(counts[i])} "
                                            f"{self.dtype} ids ({int(counts[i]) * np_dtype.itemsize} bytes): "
                                            "truncated or replaced")
            if nbytes % np_dtype.itemsize:
                raise DataError(path, None, f"shard size {nbytes} is not a multiple of {np_dtype.itemsize} bytes")
            n = nbytes // np_dtype.itemsize
            sizes.append(n)
            # an empty file cannot be memory-mapped; it holds nothing anyway
            self._maps.append(np.memmap(path, dtype=np_dtype, mode="r", shape=(n,)) if n else
                              np.zeros(0, np_dtype))
        self.num_tokens = int(sum(sizes))
        if int(entry.get("tokens", self.num_tokens)) != self.num_tokens:
            raise DataError(where, None, f"split {split!r}: the shards hold {self.num_tokens} ids, "
                                         f"the manifest says {entry.get('tokens')} (a shard is truncated or missing)")
        self._starts = np.cumsum([0, *sizes])  # shard i holds ids [starts[i], starts[i+1])

    def __len__(self) -> int:
        return self.num_tokens

    def get(self, start: int, length: int) -> np.ndarray:
        """Ids ``[start, start + length)`` as a fresh int64 array (across shards when needed)."""
        start, length = int(start), int(length)
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {self.num_tokens}) "
                             f"of split {self.split!r}")
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < length:
            offset = start + done - int(self._starts[shard])
            take = min(length - done, len(self._maps[shard]) - offset)
            out[done:done + take] = self._maps[shard][offset:offset + take]
            done += take
            shard += 1
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {"data_dir": str(self.data_dir), "split": self.split}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["data_dir"], state["split"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"TokenShards({str(self.data_dir)!r}, {self.split!r}: {self.num_tokens} tokens, {self.dtype})"
