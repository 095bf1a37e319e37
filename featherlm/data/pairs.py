"""Source/target pairs for sequence-to-sequence tasks (translation, summarization), and their encoding.

Read from JSONL (``{"source": ..., "target": ...}``, named columns, or Hugging Face's
``{"translation": {"en": ..., "fr": ...}}`` with language codes as the columns), from TSV/CSV with
a header, or from headerless tab-separated files such as Tatoeba's (``english<TAB>other<TAB>
attribution``, a .txt file): columns given by 0-based index mean "no header row". Bad rows stop
the read with ``DataError(path, line, reason)``, or are skipped and listed with ``skip_bad_rows``.

``encode_pairs`` turns pairs into examples that do not depend on the model: the prompt tokens (the
source in the prompt template, wrapped as a user turn by the chat template when there is one) and the
target tokens (ending with the end-of-sequence or end-of-turn token). A decoder-only model trains on
prompt + target with the loss on the target; an encoder-decoder reads the prompt in its encoder and
writes the target (see ``featherlm.train.tasks.seq2seq``).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featherlm.data.tasks import (
    IGNORE_INDEX,
    Rows,
    _csv_records,
    detect_format,
    encode_chat,
    iter_lines,
    iter_rows,
    pick_column,
)
from featherlm.errors import DataError

SOURCE_COLUMNS = ("source", "src", "input", "document", "article", "text")
TARGET_COLUMNS = ("target", "tgt", "output", "summary", "highlights")


@dataclass
class PairData:
    """Pairs read from a file; ``lines[i]`` is the file line of pair ``i`` (for messages)."""

    path: str
    sources: list[str]
    targets: list[str]
    lines: list[int]
    skipped: list[tuple[int | None, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sources)


def _cell(value: Any) -> str | None:
    """A cell as stripped text, or None when it is missing, empty or not a string."""
    return value.strip() if isinstance(value, str) and value.strip() else None


def read_pairs(path: str | Path, *, source_column: str | int | None = None, target_column: str | int | None = None,
               format: str = "auto", skip_bad_rows: bool = False) -> PairData:
    """Read a pairs file (see the module docstring for the layouts).

    ``source_column`` / ``target_column``: a column name (files with a header, JSONL keys) or a
    0-based index (files without a header: .txt, or a TSV/CSV when the columns are indices). None:
    the first of SOURCE_COLUMNS / TARGET_COLUMNS present, or 0 and 1 without a header.
    """
    fmt = detect_format(path, format)
    by_index = fmt == "txt" or isinstance(source_column, int) or isinstance(target_column, int)
    if by_index and fmt == "jsonl":
        raise DataError(path, None, "JSONL rows are objects: name the columns (data.source_column: source)")
    if by_index and not all(c is None or isinstance(c, int) for c in (source_column, target_column)):
        raise DataError(path, None, "give both columns as 0-based indices (a file without a header row), "
                                    f"not {source_column!r} and {target_column!r}")
    rows = Rows(str(path), skip_bad_rows)
    pairs: list[tuple[int, str, str]] = []
    if by_index:
        src = 0 if source_column is None else source_column
        tgt = 1 if target_column is None else target_column
        if min(src, tgt) < 0 or src == tgt:
            raise DataError(path, None, f"source and target columns must be two different indices >= 0, "
                                        f"got {src} and {tgt}")
        for line, fields in _headerless(path, fmt, rows):
            if len(fields) <= max(src, tgt):
                rows.bad(line, f"{len(fields)} fields: no column {max(src, tgt)} (0-based); expected "
                               f"source in column {src} and target in column {tgt}, tab-separated")
                continue
            pairs.append((line, fields[src], fields[tgt]))
    else:
        columns: tuple[str, str] | None = None
        for line, row in iter_rows(path, fmt, rows):
            if "translation" in row and isinstance(row["translation"], dict):  # Hugging Face datasets' layout
                row = {**row["translation"], **{k: v for k, v in row.items() if k != "translation"}}
            if columns is None:  # from the header (TSV/CSV) or the first object (JSONL)
                keys = list(row)
                columns = (pick_column(path, keys, source_column, SOURCE_COLUMNS, "source"),
                           pick_column(path, keys, target_column, TARGET_COLUMNS, "target"))
            scol, tcol = columns
            missing = [c for c in columns if c not in row]
            if missing:
                rows.bad(line, f"missing column {missing[0]!r}")
                continue
            pairs.append((line, row[scol], row[tcol]))
    data = PairData(str(path), [], [], [], rows.skipped)
    for line, source, target in pairs:
        s, t = _cell(source), _cell(target)
        if s is None or t is None:
            side, value = ("source", source) if s is None else ("target", target)
            rows.bad(line, f"empty {side}" if value is None or isinstance(value, str)
                     else f"{side} is a {type(value).__name__}, not text")
            continue
        data.sources.append(s)
        data.targets.append(t)
        data.lines.append(line)
    if not data.sources:
        raise DataError(path, None, "no usable pairs" + (f" ({len(rows.skipped)} bad rows skipped)"
                                                        if rows.skipped else ""))
    return data


def _headerless(path: str | Path, fmt: str, rows: Rows) -> Iterator[tuple[int, list[str]]]:
    """(line, fields) of a file without a header: tab-separated (.txt, .tsv) or CSV."""
    if fmt == "csv":
        try:
            with Path(path).open(encoding="utf-8-sig", newline="") as f:
                yield from _csv_records(csv.reader(f))
        except UnicodeDecodeError as e:
            raise DataError(path, None, f"not UTF-8 text ({e.reason})") from None
        return
    for line, text in iter_lines(path, rows):
        if text.strip():
            yield line, text.rstrip("\r\n").split("\t")


# ----------------------------------------------------------------------------- prompts and encoding


def render_prompt(template: str, source: str, *, source_lang: str = "", target_lang: str = "") -> str:
    """The prompt text of one source: ``template`` with {source}, {source_lang} and {target_lang} filled."""
    return template.format(source=source, source_lang=source_lang, target_lang=target_lang)


def encode_pairs(data: PairData, tokenizer, *, template: str, source_lang: str = "", target_lang: str = "",
                 chat: bool = False, system: str | None = None,
                 max_seq_len: int = 512) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """(examples, bad rows): ``{"input_ids": prompt + target, "prompt_len", "index"}`` per pair.

    ``chat``: the prompt is a user turn of the tokenizer's chat template and the target the assistant's
    reply, cut at the exact token boundary (``encode_chat``), after a ``system`` turn when one is given
    (None: whatever the template does without one; SmolLM2's adds its own). Otherwise the prompt is
    the template's text with the tokenizer's special tokens (BOS for Llama, ``</s>`` after the text
    for T5) and the target its text plus EOS.

    ``max_seq_len`` bounds prompt + target. A long source (a document to summarize) is cut at a
    token boundary so that the prompt leaves room for the target (all of it, up to a quarter of
    ``max_seq_len``); then the target is cut at the end if it must. A pair whose template alone
    leaves no room is a bad row.
    """
    eos = tokenizer.eos_id
    if not chat and eos is None:
        raise DataError(data.path, None, f"the tokenizer ({tokenizer.source}) has no end-of-sequence token: a model "
                                         "trained on these pairs could not learn where a target ends")
    head = [] if system is None else [{"role": "system", "content": system}]

    def encode(source: str, target: str) -> tuple[list[int], int]:  # (prompt + target ids, prompt length)
        prompt = render_prompt(template, source, source_lang=source_lang, target_lang=target_lang)
        if chat:
            ids, labels = encode_chat(tokenizer, [*head, {"role": "user", "content": prompt},
                                                  {"role": "assistant", "content": target}])
            return ids, next(i for i, x in enumerate(labels) if x != IGNORE_INDEX)
        prompt_ids = tokenizer.encode(prompt)
        return prompt_ids + tokenizer.encode(target, add_special_tokens=False) + [eos], len(prompt_ids)

    bad: list[tuple[int, str]] = []
    examples = []
    for i, (source, target) in enumerate(zip(data.sources, data.targets, strict=True)):
        ids, prompt_len = encode(source, target)
        for _ in range(3):  # cutting and re-rendering may not shrink by exactly the excess: a few tries
            room = min(len(ids) - prompt_len, max(1, max_seq_len // 4))  # tokens kept for the target
            excess = prompt_len + room - max_seq_len
            if excess <= 0:
                break
            words = tokenizer.encode(source, add_special_tokens=False)
            if len(words) <= excess:
                break
            source = tokenizer.decode(words[: len(words) - excess])
            ids, prompt_len = encode(source, target)
        if prompt_len >= max_seq_len:
            bad.append((data.lines[i], f"the prompt fills max_seq_len ({prompt_len} >= {max_seq_len} tokens): "
                                       "no target token left"))
            continue
        examples.append({"input_ids": ids[:max_seq_len], "prompt_len": prompt_len, "index": i})
    return examples, bad


__all__ = ["PairData", "SOURCE_COLUMNS", "TARGET_COLUMNS", "encode_pairs", "read_pairs", "render_prompt"]
