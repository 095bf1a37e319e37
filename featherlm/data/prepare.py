"""`featherlm data prepare`: raw text files -> cleaned, deduplicated, tokenised shards with a manifest.

Two streaming passes, so a corpus larger than memory goes through:

1. read documents lazily (.txt split by line / blank line / file, .jsonl "text" field, .tsv/.csv
   text column) -> in worker processes: clean, length and quality filters, content hash and
   MinHash signature -> in the main process, in input order: exact and near-duplicate removal,
   which keeps only hashes and signatures. Survivors go to a temporary JSONL file in the build
   folder, and their characters / words are counted when a char tokenizer or augmentation needs
   them.
2. pick the validation documents (seeded, by document), then in worker processes: augment the
   training documents (seeded per document) and tokenise; tokens go straight into the train and
   val ``ShardWriter``.

Everything is built in a temporary folder beside ``out`` and renamed at the end: a failure leaves
no half dataset. Results do not depend on the number of workers (dedup decisions and random
draws happen in input order, seeded per document).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from featherlm.data.augment import AugmentConfig, UnitReservoir, augment_text
from featherlm.data.clean import NORMALIZATIONS, QualityConfig, clean_text, length_ok, quality_reason
from featherlm.data.dedup import ExactDedup, MinHasher, NearDedup, exact_key, shingle_hashes
from featherlm.data.shards import ShardWriter, read_manifest, shard_dtype, write_manifest
from featherlm.data.tasks import TEXT_COLUMNS, Rows, detect_format, iter_lines, iter_rows, pick_column
from featherlm.errors import ConfigError, DataError
from featherlm.io import atomic_dir
from featherlm.tokenizer import Tokenizer, char_tokenizer

DOC_SPLITS = ("line", "blank", "file")
DEDUP_KINDS = ("exact", "near")
INPUT_SUFFIXES = {".txt", ".text", ".jsonl", ".json", ".ndjson", ".tsv", ".csv"}  # taken from folders


@dataclass
class PrepareConfig:
    """Every setting of ``prepare_corpus``; saved into the manifest as "config"."""

    val_ratio: float = 0.01  # share of documents held out (at least one when there are two or more)
    doc_split: str = "blank"  # .txt documents: "line", "blank" (paragraphs) or "file"
    text_field: str | None = None  # .jsonl key / table column (default "text", tables also "sentence")
    normalization: str = "NFC"  # "NFC", "NFKC" or "none" (see featherlm.data.clean.clean_text)
    strip_html: bool = True
    quality: QualityConfig = field(default_factory=QualityConfig)
    dedup: tuple[str, ...] = DEDUP_KINDS  # any of "exact", "near"; () keeps duplicates
    near_threshold: float = 0.8  # estimated Jaccard similarity of shingle sets at which a doc is a copy
    shingle: str = "char"  # "char" n-grams (any script) or "word" n-grams
    shingle_size: int = 5
    num_perm: int = 128  # MinHash permutations: the similarity estimate's standard error is ~0.5/sqrt(num_perm)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    append_eos: bool = True  # end every document with the tokenizer's eos id (unless it already does)
    workers: int = 1  # processes for cleaning and tokenising (0: one per CPU core)
    chunk_docs: int = 256  # documents per task sent to a worker
    shard_tokens: int = 2**26  # ids per shard file (128 MiB of uint16)
    seed: int = 0
    overwrite: bool = False  # replace a non-empty output folder

    def check(self) -> None:
        if self.doc_split not in DOC_SPLITS:
            raise ConfigError(f"doc_split must be one of {', '.join(DOC_SPLITS)}, got {self.doc_split!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {self.normalization!r}")
        bad = [d for d in self.dedup if d not in DEDUP_KINDS]
        if bad:
            raise ConfigError(f"unknown dedup kind {bad[0]!r} (choose from {', '.join(DEDUP_KINDS)}, or none)")
        if not 0.0 <= self.val_ratio < 1.0:
            raise ConfigError(f"val_ratio must be in [0, 1), got {self.val_ratio}")
        if not 0.0 < self.near_threshold < 1.0:
            raise ConfigError(f"near_threshold must be in (0, 1), got {self.near_threshold}")
        if self.shingle not in ("char", "word") or self.shingle_size < 1 or self.num_perm < 2:
            raise ConfigError("shingle must be 'char' or 'word', shingle_size >= 1 and num_perm >= 2")
        if self.workers < 0 or self.chunk_docs < 1 or self.shard_tokens < 1:
            raise ConfigError("workers must be >= 0, chunk_docs and shard_tokens >= 1")
        q = self.quality
        if q.min_chars < 0 or (q.max_chars is not None and q.max_chars < q.min_chars):
            raise ConfigError(f"bad length limits: min_chars {q.min_chars}, max_chars {q.max_chars}")
        try:
            self.augment.check()
        except ValueError as e:
            raise ConfigError(str(e)) from None


# ----- reading -----------------------------------------------------------------------------------
def input_files(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files to read: given files as they are, folders walked recursively (sorted) for
    .txt/.jsonl/.tsv/.csv files. A missing path or a folder without such files is a DataError."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not items:
        raise ConfigError("no input files given")
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in INPUT_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(item).parts))
            if not found:
                raise DataError(item, None, f"no {', '.join(sorted(INPUT_SUFFIXES))} files in this folder")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(item, None, "no such file or folder")
    return files


def read_documents(path: str | Path, config: PrepareConfig) -> Iterator[str]:
    """The raw documents of one file, lazily (one paragraph / line / row in memory at a time)."""
    path = Path(path)
    fmt = detect_format(path)
    rows = Rows(str(path))  # raises DataError(path, line, reason) on the first bad row
    if fmt == "txt":
        yield from _text_documents(iter_lines(path, rows), config.doc_split)
        return
    column = None
    for line, row in iter_rows(path, fmt, rows):
        if column is None:
            defaults = ("text",) if fmt == "jsonl" else TEXT_COLUMNS[::-1]
            if fmt == "jsonl":
                column = config.text_field or "text"
            else:
                column = pick_column(path, list(row), config.text_field, defaults, "text")
        value = row.get(column)
        if not isinstance(value, str):
            what = "missing" if value is None else f"a {type(value).__name__}, not a string"
            raise DataError(path, line, f"field {column!r} is {what}")
        yield value


def _text_documents(lines: Iterable[tuple[int, str]], doc_split: str) -> Iterator[str]:
    if doc_split == "line":
        for _, text in lines:
            if text.strip():
                yield text
        return
    buffer: list[str] = []
    for _, text in lines:
        if doc_split == "blank" and not text.strip():
            if buffer:
                yield "".join(buffer)
                buffer = []
            continue
        buffer.append(text)
    if buffer:
        yield "".join(buffer)


def iter_documents(files: Sequence[Path], config: PrepareConfig) -> Iterator[str]:
    for path in files:
        yield from read_documents(path, config)


# ----- worker side -----------------------------------------------------------------------------------
_STATE: dict[str, Any] = {}  # per process: config, hasher, tokenizer, augmentation vocabulary


def _init_worker(state: dict[str, Any]) -> None:
    _STATE.clear()
    _STATE.update(state)
    if "config" in state:
        _STATE["hasher"] = MinHasher(state["config"].num_perm, state["config"].seed + 1)


def _clean_chunk(docs: list[str]) -> list[tuple[str | None, str, bytes | None, np.ndarray | None]]:
    """(drop reason or None, cleaned text, content hash, MinHash signature) per document."""
    config: PrepareConfig = _STATE["config"]
    near = "near" in config.dedup
    out = []
    for raw in docs:
        text = clean_text(raw, normalization=config.normalization, html_tags=config.strip_html)
        if not length_ok(text, config.quality):
            out.append(("length", "", None, None))
        elif quality_reason(text, config.quality) is not None:
            out.append(("quality", "", None, None))
        else:
            sig = None
            if near:
                sig = _STATE["hasher"].signature(shingle_hashes(text, config.shingle, config.shingle_size))
            out.append((None, text, exact_key(text), sig))
    return out


def _encode_chunk(items: list[tuple[int, str, bool]]) -> list[tuple[bool, np.ndarray]]:
    """(is_val, ids) per output document: each input, then its augmented copies (training only)."""
    config: PrepareConfig = _STATE["config"]
    tok: Tokenizer = _STATE["tokenizer"]
    vocab: list[str] = _STATE.get("vocab") or []
    dtype = shard_dtype(tok.vocab_size)
    texts, splits = [], []
    for index, text, is_val in items:
        texts.append(text)
        splits.append(is_val)
        if not is_val:
            for copy in range(config.augment.copies):
                rng = np.random.default_rng([config.seed, index, copy])
                texts.append(augment_text(text, vocab, rng, rate=config.augment.rate,
                                          operations=config.augment.operations))
                splits.append(False)
    eos = tok.eos_id if config.append_eos else None
    out = []
    for is_val, ids in zip(splits, tok.encode_batch(texts), strict=True):
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        out.append((is_val, np.asarray(ids, dtype=dtype)))
    return out


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Workers:
    """Ordered parallel map with a bounded number of tasks in flight (``Pool.imap`` would read the
    whole input ahead into memory); in-process when ``workers`` is 1, so small jobs and tests pay
    no process start-up."""

    def __init__(self, workers: int, state: dict[str, Any]) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.pool = None
        if self.workers == 1:
            _init_worker(state)
            return
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"  # fork: no re-import of torch
        # tokenizers disables its Rust thread pool in forked children after the parent used it, with a
        # warning on every fork; saying so in the environment first keeps the warning away
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            self.pool = mp.get_context(method).Pool(self.workers, initializer=_init_worker, initargs=(state,))
        finally:
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous

    def map(self, fn: Callable[[Any], Any], chunks: Iterable[Any]) -> Iterator[Any]:
        if self.pool is None:
            yield from map(fn, chunks)
            return
        pending: deque = deque()
        for chunk in chunks:
            pending.append(self.pool.apply_async(fn, (chunk,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----- the pipeline ------------------------------------------------------------------------------------
def prepare_corpus(inputs: str | Path | Sequence[str | Path], tokenizer: str | Path | Tokenizer,
                   out: str | Path, config: PrepareConfig | None = None, *, progress: bool = False) -> dict[str, Any]:
    """Clean, deduplicate, filter, (augment,) tokenise and shard ``inputs`` into ``out``; returns the manifest.

    ``tokenizer``: a tokenizer folder, a ``Tokenizer``, or "char" for a character tokenizer built
    from the cleaned corpus itself. The tokenizer is saved into ``out/tokenizer`` either way, so
    the dataset carries what decodes it. ``progress`` shows tqdm bars on stderr.
    """
    config = config or PrepareConfig()
    config.check()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not config.overwrite:
        raise ConfigError(f"{out}: output folder is not empty (use --overwrite to replace it)")
    files = input_files(inputs)
    tok, tok_name = _resolve_tokenizer(tokenizer)
    stats = Counter({k: 0 for k in ("documents_in", "removed_exact_duplicates", "removed_near_duplicates",
                                    "removed_by_length", "removed_by_quality", "augmented", "tokens")})
    with atomic_dir(out) as build:
        kept_path = build / ".kept.jsonl"
        kept, chars, reservoir = _pass_clean(files, config, kept_path, stats, want_chars=tok is None,
                                             progress=progress)
        if tok is None:
            tok = char_tokenizer(chars)
        tok.save(build / "tokenizer")
        manifest_splits = _pass_encode(kept_path, kept, tok, config, build, stats,
                                       vocab=reservoir.units if reservoir else [], progress=progress)
        kept_path.unlink()
        manifest = {
            "dtype": shard_dtype(tok.vocab_size).name, "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id if config.append_eos else None, "tokenizer": tok_name,
            "tokenizer_dir": "tokenizer", "splits": manifest_splits,
            "stats": {k: int(v) for k, v in stats.items()},
            "inputs": [str(p) for p in files], "config": _jsonable(asdict(config)),
        }
        write_manifest(build, manifest)
    return read_manifest(out)


def _resolve_tokenizer(tokenizer: str | Path | Tokenizer) -> tuple[Tokenizer | None, str]:
    """(tokenizer or None for "char", the name the manifest records)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer, tokenizer.source
    if str(tokenizer) == "char":
        return None, "char"
    return Tokenizer.from_dir(tokenizer), str(Path(tokenizer).resolve())


def _pass_clean(files: Sequence[Path], config: PrepareConfig, kept_path: Path, stats: Counter, *,
                want_chars: bool, progress: bool) -> tuple[int, Counter, UnitReservoir | None]:
    """Pass 1: clean, filter and deduplicate; survivors written to ``kept_path`` as JSON lines."""
    exact = ExactDedup() if "exact" in config.dedup else None
    near = NearDedup(config.near_threshold, config.num_perm, config.seed + 1) if "near" in config.dedup else None
    reservoir = UnitReservoir(config.augment.vocab_size, config.seed) if config.augment.copies else None
    chars: Counter[str] = Counter()
    kept = 0
    bar = tqdm(desc="clean+dedup", unit=" docs", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    with open(kept_path, "w", encoding="utf-8") as sink, _Workers(config.workers, {"config": config}) as pool:
        for results in pool.map(_clean_chunk, _chunks(iter_documents(files, config), config.chunk_docs)):
            for reason, text, key, sig in results:
                stats["documents_in"] += 1
                if reason is not None:
                    stats[f"removed_by_{reason}"] += 1
                elif exact is not None and not exact.add(key):
                    stats["removed_exact_duplicates"] += 1
                elif near is not None and near.add(sig) is not None:
                    stats["removed_near_duplicates"] += 1
                else:
                    sink.write(json.dumps(text, ensure_ascii=False) + "\n")
                    kept += 1
                    if want_chars:
                        chars.update(text)
                    if reservoir is not None:
                        reservoir.add(text)
            bar.update(len(results))
    bar.close()
    if kept == 0:
        raise DataError(", ".join(map(str, files)), None,
                        f"no documents left after cleaning, filtering and dedup ({_summary(stats)})")
    return kept, chars, reservoir


def _pass_encode(kept_path: Path, kept: int, tok: Tokenizer, config: PrepareConfig, build: Path, stats: Counter,
                 *, vocab: list[str], progress: bool) -> dict[str, Any]:
    """Pass 2: split by document, augment training documents, tokenise into shards."""
    rng = np.random.default_rng(config.seed)
    n_val = 0 if config.val_ratio == 0 or kept < 2 else min(kept - 1, max(1, round(config.val_ratio * kept)))
    is_val = np.zeros(kept, dtype=bool)
    is_val[rng.choice(kept, size=n_val, replace=False)] = True
    tok.backend.encode_special_tokens = True  # a literal "<|endoftext|>" in scraped text stays text
    try:
        def items() -> Iterator[tuple[int, str, bool]]:
            with open(kept_path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    yield i, json.loads(line), bool(is_val[i])

        state = {"config": config, "tokenizer": tok, "vocab": vocab}
        bar = tqdm(total=kept, desc="tokenize", unit=" docs", disable=not progress, file=sys.stderr,
                   dynamic_ncols=True)
        writers = {split: ShardWriter(build, split, vocab_size=tok.vocab_size, shard_tokens=config.shard_tokens)
                   for split in ("train", "val")}
        with writers["train"], writers["val"], _Workers(config.workers, state) as pool:
            for results in pool.map(_encode_chunk, _chunks(items(), config.chunk_docs)):
                for val, ids in results:
                    writers["val" if val else "train"].add(ids)
                bar.update(min(config.chunk_docs, kept - bar.n))  # chunks are full but the last
        bar.close()
    finally:
        tok.backend.encode_special_tokens = False
    stats["augmented"] = writers["train"].documents + writers["val"].documents - kept
    stats["tokens"] = writers["train"].num_tokens + writers["val"].num_tokens
    return {split: w.split_info() for split, w in writers.items()}


def _summary(stats: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in stats.items() if v and k != "tokens")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
