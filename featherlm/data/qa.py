"""Extractive question answering data: SQuAD files in, windowed span features out, spans back to text.

Files: SQuAD JSON (v1.1 and v2.0: ``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id",
"question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}``), or JSONL with one
question per line in the Hugging Face ``datasets`` shape (``{"id", "question", "context",
"answers": {"text": [...], "answer_start": [...]}}``).

A feature is one window of the context behind the question: ``[CLS] question [SEP] context window
[SEP]``. Long contexts give several windows overlapping by ``doc_stride`` tokens, as the tokenizer's
own overflow (the ``tokenizers`` truncation with a stride that transformers' QA recipe uses)
produces them; every context token keeps its character offsets, so a predicted token span maps back
to the exact characters of the context. A training window holds the answer's first and last token;
a window without the whole answer, and an unanswerable question, point at index 0 ([CLS]): the
"no answer here" position.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as Backend

from featherlm.data.tasks import Rows, iter_rows
from featherlm.errors import ConfigError, DataError

MAX_QUERY_TOKENS = 64  # BERT's SQuAD recipe: a longer question is cut, so the context keeps room
N_BEST = 20  # start and end candidates per window (the recipe's n_best_size)


@dataclass
class Question:
    """One question on one context; ``answers`` empty when it is unanswerable (SQuAD 2.0)."""

    id: str
    question: str
    context: str
    answers: list[str]
    starts: list[int]  # character offset of each answer in the context
    line: int | None = None
    title: str = ""


@dataclass
class SquadData:
    path: str
    questions: list[Question]
    skipped: list[tuple[int | None, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def unanswerable(self) -> int:
        return sum(not q.answers for q in self.questions)


# ----------------------------------------------------------------------------- reading


def read_squad(path: str | Path, *, skip_bad_rows: bool = False) -> SquadData:
    """Read a SQuAD JSON (v1.1 or v2.0) or JSONL file; a malformed question is a DataError naming its line.

    Checked per question: an id and a non-empty question, answers with text and an ``answer_start``
    where that text really is in the context, and at least one answer unless ``is_impossible``.
    """
    path = Path(path)
    rows = Rows(str(path), skip_bad_rows)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        questions = [q for line, row in iter_rows(path, "jsonl", rows)
                     if (q := _question(row, row.get("context"), row.get("title", ""), line, rows)) is not None]
    else:
        questions = _read_json(path, rows)
    if not questions:
        raise DataError(path, None, "no usable questions" + (f" ({len(rows.skipped)} bad rows skipped)"
                                                             if rows.skipped else ""))
    return SquadData(str(path), questions, rows.skipped)


def _read_json(path: Path, rows: Rows) -> list[Question]:
    if not path.is_file():
        raise DataError(path, None, "no such file" if not path.exists() else "not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
        doc = json.loads(text)
    except UnicodeDecodeError as e:
        raise DataError(path, None, f"not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, f"broken JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(path, 1, "expected a SQuAD object {\"version\", \"data\": [articles]}")
    questions = []
    for a, article in enumerate(doc["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            rows.bad(None, f"data[{a}]: expected an article with a 'paragraphs' list")
            continue
        for p, paragraph in enumerate(paragraphs):
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            if not isinstance(qas, list):
                rows.bad(None, f"data[{a}].paragraphs[{p}]: expected a paragraph with a 'qas' list")
                continue
            for qa in qas:
                line = _line_of(text, qa)
                q = _question(qa, paragraph.get("context"), article.get("title", ""), line, rows)
                if q is not None:
                    questions.append(q)
    return questions


def _line_of(text: str, qa: Any) -> int | None:
    """The file line of a question object, found by its id (or its question text): json keeps no positions."""
    if not isinstance(qa, dict):
        return None
    for key in ("id", "question"):
        if isinstance(qa.get(key), str):
            m = re.search(rf'"{key}"\s*:\s*{re.escape(json.dumps(qa[key]))}', text)
            if m is None:  # written with non-ASCII characters unescaped
                m = re.search(rf'"{key}"\s*:\s*{re.escape(json.dumps(qa[key], ensure_ascii=False))}', text)
            if m is not None:
                return text.count("\n", 0, m.start()) + 1
    return None


def _question(qa: Any, context: Any, title: Any, line: int | None, rows: Rows) -> Question | None:
    """A checked Question, or None after reporting the reason to ``rows``."""
    if not isinstance(qa, dict):
        rows.bad(line, f"expected a question object, got {type(qa).__name__}")
        return None
    if not isinstance(context, str) or not context.strip():
        rows.bad(line, "missing or empty 'context'")
        return None
    qid, question = qa.get("id"), qa.get("question")
    if not isinstance(qid, (str, int)) or isinstance(qid, bool) or str(qid) == "":
        rows.bad(line, "missing 'id'")
        return None
    if not isinstance(question, str) or not question.strip():
        rows.bad(line, f"question {qid}: missing or empty 'question'")
        return None
    raw = qa.get("answers", [])
    if isinstance(raw, dict):  # datasets' shape: {"text": [...], "answer_start": [...]}
        texts, starts = raw.get("text", []), raw.get("answer_start", [])
        if not (isinstance(texts, list) and isinstance(starts, list) and len(texts) == len(starts)):
            rows.bad(line, f"question {qid}: 'answers' needs lists 'text' and 'answer_start' of one length")
            return None
        raw = [{"text": t, "answer_start": s} for t, s in zip(texts, starts, strict=True)]
    if not isinstance(raw, list):
        rows.bad(line, f"question {qid}: 'answers' must be a list")
        return None
    impossible = bool(qa.get("is_impossible", False))
    answers, starts = [], []
    for answer in [] if impossible else raw:
        text, start = (answer.get("text"), answer.get("answer_start")) if isinstance(answer, dict) else (None, None)
        if not isinstance(text, str) or not text or not isinstance(start, int) or isinstance(start, bool):
            rows.bad(line, f"question {qid}: each answer needs a non-empty 'text' and an integer 'answer_start'")
            return None
        if context[start:start + len(text)] != text:
            rows.bad(line, f"question {qid}: answer {text!r} is not at character {start} of the context "
                           f"(found {context[start:start + len(text)]!r})")
            return None
        answers.append(text)
        starts.append(start)
    if not answers and not impossible:
        rows.bad(line, f"question {qid}: no answer, and not marked 'is_impossible'")
        return None
    return Question(str(qid), question.strip(), context, answers, starts, line, str(title or ""))


# ----------------------------------------------------------------------------- features


def window_tokenizer(tokenizer, max_seq_len: int, doc_stride: int) -> Backend:
    """A copy of the tokenizer's backend that cuts the context (the pair's second text) into windows of
    ``max_seq_len`` tokens overlapping by ``doc_stride``; the copy leaves the shared tokenizer as it was."""
    backend = Backend.from_str(tokenizer.backend.to_str())
    backend.enable_truncation(max_length=max_seq_len, stride=doc_stride, strategy="only_second")
    return backend


def _query(tokenizer, question: str, max_seq_len: int) -> str:
    """The question, cut to MAX_QUERY_TOKENS (and a third of the window) tokens at a token boundary."""
    limit = min(MAX_QUERY_TOKENS, max_seq_len // 3)
    enc = tokenizer.backend.encode(question, add_special_tokens=False)
    return question if len(enc.ids) <= limit else question[: enc.offsets[limit - 1][1]]


def build_features(questions: Sequence[Question], tokenizer, *, max_seq_len: int, doc_stride: int,
                   null_index: int = 0) -> list[dict[str, Any]]:
    """Windowed features of every question, in order: ``{"input_ids", "token_type_ids", "start", "end",
    "question" (index into ``questions``), "offsets"}``.

    ``offsets[t]`` is the (start, end) characters of context token t, None for question and special
    tokens. ``start``/``end``: the first answer's first and last token when the window holds all of
    it, else ``null_index`` (both). ``doc_stride`` must leave the window room to move forward.
    """
    backend = window_tokenizer(tokenizer, max_seq_len, doc_stride)
    specials = len(backend.encode("a", "b").ids) - len(backend.encode("a", "b", add_special_tokens=False).ids)
    features = []
    for qi, q in enumerate(questions):
        query = _query(tokenizer, q.question, max_seq_len)
        room = max_seq_len - len(tokenizer.backend.encode(query, add_special_tokens=False).ids) - specials
        if doc_stride >= room:
            raise ConfigError(f"data.doc_stride ({doc_stride}) must be smaller than the context room of a window "
                              f"({room} tokens at train.max_seq_len {max_seq_len} after a {len(query)}-character "
                              f"question); lower doc_stride or raise max_seq_len")
        first = backend.encode(query, q.context)
        for enc in (first, *first.overflowing):
            offsets = [o if s == 1 else None for o, s in zip(enc.offsets, enc.sequence_ids, strict=True)]
            start, end = null_index, null_index
            if q.answers:
                start, end = answer_tokens(offsets, q.starts[0], q.starts[0] + len(q.answers[0]), null_index)
            features.append({"input_ids": enc.ids, "token_type_ids": enc.type_ids, "start": start, "end": end,
                             "question": qi, "offsets": offsets})
    return features


def answer_tokens(offsets: Sequence[tuple[int, int] | None], start_char: int, end_char: int,
                  null_index: int = 0) -> tuple[int, int]:
    """(first, last) token of the characters [start_char, end_char) among the context tokens, or
    (null_index, null_index) when the window does not hold the whole span."""
    context = [t for t, o in enumerate(offsets) if o is not None]
    if not context or offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return null_index, null_index
    first = next(t for t in context if offsets[t][1] > start_char)  # the token the answer starts in
    last = next(t for t in reversed(context) if offsets[t][0] < end_char)  # and ends in
    return (first, last) if first <= last else (null_index, null_index)


# ----------------------------------------------------------------------------- decoding


def log_softmax(logits: Sequence[float]) -> list[float]:
    top = max(logits)
    norm = top + math.log(sum(math.exp(x - top) for x in logits))
    return [x - norm for x in logits]


def best_spans(start_logp: Sequence[float], end_logp: Sequence[float], offsets: Sequence[tuple[int, int] | None], *,
               max_answer_len: int, n_best: int = N_BEST) -> list[tuple[float, int, int]]:
    """Candidate spans of one window, best first: (start + end log-probability, first token, last token).

    Starts and ends come from the ``n_best`` highest of each; a span must lie in the context, end at
    or after its start, and hold at most ``max_answer_len`` tokens (the recipe's rules).
    """
    starts = sorted(range(len(start_logp)), key=start_logp.__getitem__, reverse=True)[:n_best]
    ends = sorted(range(len(end_logp)), key=end_logp.__getitem__, reverse=True)[:n_best]
    spans = [(start_logp[s] + end_logp[e], s, e) for s in starts for e in ends
             if offsets[s] is not None and offsets[e] is not None and s <= e < s + max_answer_len]
    return sorted(spans, reverse=True)


def decode_answer(question: Question, windows: Sequence[tuple[list[float], list[float], list]], *,
                  max_answer_len: int, allow_null: bool, null_index: int = 0,
                  n_best: int = N_BEST) -> dict[str, Any]:
    """The answer to one question from its windows' (start log-probs, end log-probs, offsets).

    The best span over all windows is mapped back to context characters. The null score is the
    smallest over windows of the log-probability of (null_index, null_index) (the window most sure
    an answer is in it); with ``allow_null`` the answer is "" when that beats the best span, as in
    the SQuAD 2.0 recipes. Returns ``{"answer", "start", "end", "score", "null_score"}``; scores are
    probabilities (each window's start and end distributions are softmaxes over its tokens).
    """
    best: tuple[float, int, int, int] | None = None  # (log-prob, window, first token, last token)
    null = math.inf
    for w, (start_logp, end_logp, offsets) in enumerate(windows):
        null = min(null, start_logp[null_index] + end_logp[null_index])
        spans = best_spans(start_logp, end_logp, offsets, max_answer_len=max_answer_len, n_best=n_best)
        if spans and (best is None or spans[0][0] > best[0]):
            best = (spans[0][0], w, spans[0][1], spans[0][2])
    null_score = math.exp(null) if windows else 1.0
    if best is None or (allow_null and null > best[0]):
        return {"answer": "", "start": 0, "end": 0, "score": null_score, "null_score": null_score}
    logp, w, s, e = best
    offsets = windows[w][2]
    start, end = offsets[s][0], offsets[e][1]
    return {"answer": question.context[start:end], "start": start, "end": end, "score": math.exp(logp),
            "null_score": null_score}
