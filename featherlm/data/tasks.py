"""Task readers: text classification tables, instruction / chat SFT files, and raw text for LM.

Every reader turns a file into examples and stops at the first malformed row with
``DataError(path, line, reason)``, so the user can open the file at that line. With
``skip_bad_rows=True`` such rows are left out and listed in ``skipped`` instead (the trainer
reports how many), which suits large scraped files where a few broken rows are expected.

Examples are plain dicts of token ids (``input_ids`` plus ``label`` or ``labels``), ready for
``featherlm.data.collate``: nothing here knows about models or batches.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featherlm.errors import DataError

TEXT_COLUMNS = ("sentence", "text")  # GLUE's name, then the common one
LABEL_COLUMNS = ("label",)
IGNORE_INDEX = -100  # label of a token that gets no loss (prompt, padding): PyTorch's cross_entropy default
FORMATS = ("tsv", "csv", "jsonl", "txt")


@dataclass
class Rows:
    """Where bad rows go: raised at once, or collected when ``skip`` is set."""

    path: str
    skip: bool = False
    skipped: list[tuple[int | None, str]] = field(default_factory=list)

    def bad(self, line: int | None, reason: str) -> None:
        if not self.skip:
            raise DataError(self.path, line, reason)
        self.skipped.append((line, reason))


@dataclass
class ClassificationData:
    """A classification file read into texts and label ids; ``label_names[i]`` is id ``i``'s name."""

    path: str
    texts: list[str]
    labels: list[int]
    label_names: list[str]
    lines: list[int]  # the file line of each example, for messages
    skipped: list[tuple[int | None, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class TokenData:
    """Tokenised examples (dicts with ``input_ids`` and ``label``/``labels``) and the rows left out."""

    path: str
    examples: list[dict[str, Any]]
    skipped: list[tuple[int | None, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)


# ----------------------------------------------------------------------------- raw rows


def detect_format(path: str | Path, format: str = "auto") -> str:
    """``format`` itself, or the one the file name says (.tsv, .csv, .jsonl/.json, anything else txt)."""
    if format != "auto":
        if format not in FORMATS:
            raise DataError(path, None, f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
        return format
    suffix = Path(path).suffix.lower()
    return {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}.get(suffix, "txt")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(path, None, "no such file" if not path.exists() else "not a file")


def iter_lines(path: str | Path, rows: Rows) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, split at "\n" only and decoded one by one.

    Splitting the bytes ourselves keeps a stray "\r" inside a field (SST-2's TSV has one in every
    row) from splitting the row, and decoding per line names the exact line of a non-UTF-8 byte.
    """
    path = Path(path)
    _check_file(path)
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")  # -sig: drop a BOM (Excel, Notepad)
            except UnicodeDecodeError as e:
                rows.bad(n, f"not UTF-8 text ({e.reason} at byte {e.start})")


def iter_rows(path: str | Path, format: str, rows: Rows) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, row) for each record of a TSV/CSV (keys from the header) or JSONL (objects) file.

    Blank lines are skipped; a record that cannot be a row (wrong field count, broken JSON, not a
    JSON object) goes to ``rows.bad``. TSV is split on tabs without quoting, as GLUE writes it
    (its sentences contain bare quotes); CSV follows RFC 4180 quoting.
    """
    path = Path(path)
    if format == "jsonl":
        for line, text in iter_lines(path, rows):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                rows.bad(line, f"broken JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                rows.bad(line, f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield line, obj
        return
    if format == "tsv":
        yield from _table(path, ((n, t.rstrip("\r\n").split("\t")) for n, t in iter_lines(path, rows) if t.strip()),
                          rows)
        return
    _check_file(path)
    try:
        # the csv module finds line ends itself (quoted fields may hold them): text mode, newline=""
        with path.open(encoding="utf-8-sig", newline="") as f:
            yield from _table(path, _csv_records(csv.reader(f)), rows)
    except UnicodeDecodeError as e:
        raise DataError(path, None, f"not UTF-8 text ({e.reason})") from None
    except csv.Error as e:
        raise DataError(path, None, f"bad CSV ({e})") from None


def _table(path: Path, records: Iterator[tuple[int, list[str]]], rows: Rows) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a table whose first record is the header."""
    header: list[str] | None = None
    for line, fields in records:
        if header is None:
            header = [h.strip() for h in fields]
            continue
        if len(fields) < len(header):
            missing = ", ".join(repr(h) for h in header[len(fields):])
            rows.bad(line, f"{len(fields)} of {len(header)} fields: missing column {missing}")
            continue
        if len(fields) > len(header):
            rows.bad(line, f"{len(fields)} fields, but the header has {len(header)} ({', '.join(header)})")
            continue
        yield line, dict(zip(header, fields, strict=True))
    if header is None:
        raise DataError(path, None, "empty file (expected a header row naming the columns)")


def _csv_records(reader) -> Iterator[tuple[int, list[str]]]:
    """(first line, fields) per CSV record; a quoted field may span lines, so track where it began."""
    start = 1
    for fields in reader:
        if fields and any(f.strip() for f in fields):
            yield start, fields
        start = reader.line_num + 1


def pick_column(path: str | Path, available: Sequence[str], wanted: str | None, defaults: Sequence[str],
                what: str) -> str:
    """The column to read: ``wanted`` when given, else the first default present; DataError otherwise."""
    if wanted:
        if wanted not in available:
            raise DataError(path, 1, f"no {what} column {wanted!r} (columns: {', '.join(available)})")
        return wanted
    for name in defaults:
        if name in available:
            return name
    raise DataError(path, 1, f"no {what} column: expected one of {', '.join(defaults)} "
                             f"(columns: {', '.join(available)}); name it with data.{what}_column")


# ----------------------------------------------------------------------------- classification


def label_name(value: Any) -> str | None:
    """A label value as its name: "1" and 1 and 1.0 are the same label; None when unusable."""
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def sort_labels(names: set[str]) -> list[str]:
    """Label order = ids: numeric names in numeric order (so "0"/"1" keep their ids), else sorted."""
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def read_classification(path: str | Path, *, text_column: str | None = None, label_column: str | None = None,
                        labels: Sequence[str] | None = None, format: str = "auto",
                        skip_bad_rows: bool = False) -> ClassificationData:
    """Read a TSV, CSV or JSONL classification file.

    ``labels``: the known label names (those of the training data when reading evaluation data);
    a row with another label is malformed. Without it, the labels are the ones found, ordered by
    ``sort_labels``.
    """
    fmt = detect_format(path, format)
    if fmt == "txt":
        raise DataError(path, None, "classification data must be .tsv, .csv or .jsonl (or set data.format)")
    rows = Rows(str(path), skip_bad_rows)
    known = None if labels is None else {str(n): i for i, n in enumerate(labels)}
    texts: list[str] = []
    names: list[str] = []
    lines: list[int] = []
    columns: tuple[str, str] | None = None
    for line, row in iter_rows(path, fmt, rows):
        if columns is None:  # from the header (TSV/CSV) or the first object (JSONL)
            keys = list(row)
            columns = (pick_column(path, keys, text_column, TEXT_COLUMNS, "text"),
                       pick_column(path, keys, label_column, LABEL_COLUMNS, "label"))
        tcol, lcol = columns
        if tcol not in row or lcol not in row:
            rows.bad(line, f"missing column {tcol if tcol not in row else lcol!r}")
            continue
        text, name = row[tcol], label_name(row[lcol])
        if not isinstance(text, str) or not text.strip():
            rows.bad(line, f"empty text in column {tcol!r}" if isinstance(text, str) or text is None
                     else f"text in column {tcol!r} is a {type(text).__name__}, not a string")
            continue
        if name is None:
            rows.bad(line, f"empty or unusable label {row[lcol]!r} in column {lcol!r}")
            continue
        if known is not None and name not in known:
            rows.bad(line, f"unknown label {name!r} (known: {', '.join(known)})")
            continue
        texts.append(text.strip())
        names.append(name)
        lines.append(line)
    if not texts:
        raise DataError(path, None, "no usable examples" + (f" ({len(rows.skipped)} bad rows skipped)"
                                                           if rows.skipped else ""))
    label_names = list(labels) if labels is not None else sort_labels(set(names))
    index = {n: i for i, n in enumerate(label_names)}
    return ClassificationData(str(path), texts, [index[n] for n in names], [str(n) for n in label_names],
                              lines, rows.skipped)


def special_affixes(tokenizer) -> tuple[int, int]:
    """How many special tokens ``encode`` puts before and after the text ([CLS] ... [SEP]: 1, 1).

    Truncation keeps them: cutting BERT's [SEP] off a long sentence would give it an input shape
    it never saw in pretraining.
    """
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return start, len(full) - start - len(plain)
    return 0, 0


def truncate(ids: list[int], max_len: int, affixes: tuple[int, int]) -> list[int]:
    """``ids`` cut to ``max_len`` tokens from the end of the text, keeping the trailing special tokens."""
    if len(ids) <= max_len:
        return ids
    suffix = affixes[1] if max_len > sum(affixes) else 0
    return ids[: max_len - suffix] + (ids[len(ids) - suffix:] if suffix else [])


def encode_classification(data: ClassificationData, tokenizer, max_seq_len: int) -> list[dict[str, Any]]:
    """Tokenise every text (in parallel) into ``{"input_ids": [...], "label": id}`` examples."""
    affixes = special_affixes(tokenizer)
    encoded = tokenizer.encode_batch(data.texts)
    return [{"input_ids": truncate(ids, max_seq_len, affixes), "label": label}
            for ids, label in zip(encoded, data.labels, strict=True)]


# ----------------------------------------------------------------------------- SFT


def row_conversations(row: dict[str, Any]) -> list[list[dict[str, str]]] | str:
    """The chat conversations one SFT row holds, or the reason it holds none.

    Accepted shapes: ``{"messages": [{"role", "content"}, ...]}``; instruction rows
    ``{"instruction"|"prompt", "context"|"input" (optional), "response"|"output", "system" (optional)}``;
    and Alpaca seed tasks ``{"instruction", "instances": [{"input", "output"}, ...]}`` (one
    conversation per instance).
    """
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                return f"messages[{i}] must be an object with string 'role' and 'content'"
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            return "no non-empty assistant message: nothing to learn from"
        return [[{"role": m["role"], "content": m["content"]} for m in messages]]
    instruction = _first(row, ("instruction", "prompt"))
    if not isinstance(instruction, str) or not instruction.strip():
        return "missing or empty field 'instruction' (or 'messages')"
    system = row.get("system")
    if "instances" in row and isinstance(row["instances"], list):
        pairs = [(i.get("input", ""), i.get("output")) for i in row["instances"] if isinstance(i, dict)]
    else:
        pairs = [(_first(row, ("context", "input")) or "", _first(row, ("response", "output")))]
    out = []
    for context, response in pairs:
        if not isinstance(response, str) or not response.strip():
            return "missing or empty field 'response' (or 'output')"
        user = instruction.strip() + (f"\n\n{context.strip()}" if isinstance(context, str) and context.strip() else "")
        messages = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
        out.append([*messages, {"role": "user", "content": user}, {"role": "assistant", "content": response}])
    return out or "no usable instances"


def _first(row: dict[str, Any], keys: Sequence[str]) -> Any:
    return next((row[k] for k in keys if k in row), None)


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation rendered with the tokenizer's chat template; labels are
    IGNORE_INDEX on every prompt token, so the loss is on the assistant turns only.

    The text is rendered turn by turn (the prompt up to each assistant turn with the generation
    prompt, then with the reply) and each piece tokenised on its own, so the prompt/response
    boundary is exact in tokens, not guessed from characters. Special tokens come from the
    template, as transformers' ``apply_chat_template(tokenize=True)`` does.
    """
    ids: list[int] = []
    labels: list[int] = []
    r: list[int] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the chat template does not render this conversation turn by turn "
                             "(an earlier turn changes when a later one is added)")
        p = tokenizer.encode(prompt[len(done):], add_special_tokens=False)
        r = tokenizer.encode(full[len(prompt):], add_special_tokens=False)
        ids += p + r
        labels += [IGNORE_INDEX] * len(p) + r
        done = full
    bos = tokenizer.bos_id
    if bos is not None and ids and ids[0] != bos and bos in tokenizer.encode(""):
        ids, labels = [bos, *ids], [IGNORE_INDEX, *labels]  # a model that expects BOS, a template without it
    eos = tokenizer.eos_id
    if eos is not None and not tokenizer.eos_ids.intersection(ids[len(ids) - len(r):]):
        ids, labels = [*ids, eos], [*labels, eos]  # no end-of-turn token: learn to stop on EOS
    return ids, labels


def read_sft(path: str | Path, tokenizer, *, max_seq_len: int, skip_bad_rows: bool = False) -> TokenData:
    """Read a JSONL SFT file into ``{"input_ids", "labels"}`` examples (prompt tokens masked).

    A conversation longer than ``max_seq_len`` is cut at the end; one whose prompt alone fills
    ``max_seq_len`` has no response token left and counts as a bad row.
    """
    if detect_format(path) != "jsonl":
        raise DataError(path, None, "SFT data must be a .jsonl file (one JSON object per line)")
    rows = Rows(str(path), skip_bad_rows)
    examples = []
    for line, row in iter_rows(path, "jsonl", rows):
        conversations = row_conversations(row)
        if isinstance(conversations, str):
            rows.bad(line, conversations)
            continue
        for messages in conversations:
            try:
                ids, labels = encode_chat(tokenizer, messages)
            except ValueError as e:
                rows.bad(line, str(e))
                break
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            if all(x == IGNORE_INDEX for x in labels[1:]):  # position 0 is never predicted
                rows.bad(line, f"the prompt fills max_seq_len ({max_seq_len} tokens): no response token left")
                break
            examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise DataError(path, None, "no usable examples" + (f" ({len(rows.skipped)} bad rows skipped)"
                                                           if rows.skipped else ""))
    return TokenData(str(path), examples, rows.skipped)


# ----------------------------------------------------------------------------- plain LM


def read_lm(path: str | Path, tokenizer, *, block_size: int, text_column: str | None = None,
            format: str = "auto", skip_bad_rows: bool = False) -> TokenData:
    """Raw text (a .txt file, or a JSONL file's text column, one document per row) cut into blocks.

    The whole stream of tokens is cut into ``block_size`` blocks (the last, shorter block is kept
    only when it is the only one); JSONL documents are joined with EOS so the model learns where
    a document ends. Labels are the inputs: the trainer shifts them.
    """
    fmt = detect_format(path, format)
    rows = Rows(str(path), skip_bad_rows)
    stream: list[int] = []
    if fmt == "txt":
        lines = [text for _, text in iter_lines(path, rows)]
        for start in range(0, len(lines), 2048):  # batches of lines: parallel encoding, bounded memory
            for ids in tokenizer.encode_batch(lines[start:start + 2048], add_special_tokens=False):
                stream += ids
    elif fmt == "jsonl":
        column = None
        eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
        for line, row in iter_rows(path, fmt, rows):
            column = column or pick_column(path, list(row), text_column, (*TEXT_COLUMNS, "content"), "text")
            text = row.get(column)
            if not isinstance(text, str) or not text.strip():
                rows.bad(line, f"missing or empty text in column {column!r}")
                continue
            stream += tokenizer.encode(text, add_special_tokens=False) + eos
    else:
        raise DataError(path, None, "language-model data must be a .txt or .jsonl file (or set data.format)")
    if len(stream) < 2:
        raise DataError(path, None, "too little text: a language model needs at least 2 tokens")
    blocks = [stream[s:s + block_size] for s in range(0, len(stream), block_size)]
    if len(blocks) > 1 and len(blocks[-1]) < block_size:
        blocks.pop()  # a short tail would be its own, mostly padded, batch row
    return TokenData(str(path), [{"input_ids": b, "labels": list(b)} for b in blocks], rows.skipped)
