"""Inference with fine-tuned NER and QA models on free text (the CLI's ``predict`` and the server use these).

    entities = predict_entities(model, tokenizer, ["Angela Merkel visited Paris."])
    # [[{"entity": "PER", "type": "PER", "start": 0, "end": 13, "text": "Angela Merkel", "score": 0.98}, ...]]
    answers = answer_questions(model, tokenizer, ["Where did she go?"], ["Angela Merkel visited Paris."])
    # [{"answer": "Paris", "start": 22, "end": 27, "score": 0.91}]

Spans are character offsets into the given text (``text[start:end] == entity text``). The same
functions the task's evaluation uses decode the model's outputs, so a prediction here is what the
evaluation scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from featherlm.data.batching import collate
from featherlm.data.ner import case_ids, encode_words, entities_in_text, first_subwords, split_words, word_tags
from featherlm.data.qa import Question, build_features, decode_answer
from featherlm.data.tasks import special_affixes
from featherlm.train.tasks.qa import QaTask


class _eval_mode:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> torch.nn.Module:
        return self.model.eval()

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


def _context(model: torch.nn.Module) -> int:
    return model.backbone.config.max_seq_len


def _chunks(counts: Sequence[int], room: int) -> list[tuple[int, int]]:
    """[start, end) word ranges whose subword counts fit ``room`` (a word longer than that alone)."""
    out, start, used = [], 0, 0
    for i, n in enumerate(counts):
        if used and used + n > room:
            out.append((start, i))
            start, used = i, 0
        used += n
    if start < len(counts):
        out.append((start, len(counts)))
    return out


@torch.inference_mode()
def predict_entities(model, tokenizer, texts: Sequence[str], *, max_seq_len: int | None = None,
                     batch_size: int = 32) -> list[list[dict[str, Any]]]:
    """The entities a ``TokenClassifier`` finds in each text: ``{"entity", "type" (the same: the entity
    type), "start", "end", "text", "score"}`` with character offsets into that text.

    Texts are split into words (``featherlm.data.ner.split_words``, close to CoNLL-2003's tokens),
    each word tagged by its first subword, and the IOB2 tags read into entities with seqeval's rules.
    A text longer than ``max_seq_len`` tokens (default: the model's context) is tagged in pieces at
    word boundaries. ``score``: the mean over the entity's words of the predicted tag's probability.
    """
    max_len = min(max_seq_len or _context(model), _context(model))
    labels = list(model.labels)
    room = max(max_len - sum(special_affixes(tokenizer)), 1)
    pieces: list[tuple[int, list[tuple[str, int, int]]]] = []  # (text index, words with offsets)
    for t, text in enumerate(texts):
        spans = split_words(text)
        counts = [len(ids) for ids in tokenizer.encode_batch([w for w, _, _ in spans], add_special_tokens=False)]
        pieces += [(t, spans[a:b]) for a, b in _chunks(counts, room)]
    tags: list[list[str]] = []
    probs: list[list[float]] = []
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    with _eval_mode(model):
        for s in range(0, len(pieces), batch_size):
            words = [[w for w, _, _ in spans] for _, spans in pieces[s:s + batch_size]]
            encoded = encode_words(tokenizer, words, max_len)
            batch = collate([{"input_ids": ids} for ids, _ in encoded], pad_id)
            options = {}
            if getattr(model, "case_classes", 0):  # casing of the words as written, before any lower-casing
                cases = torch.zeros_like(batch["input_ids"])  # (B, T) 0 on padding
                for i, ((_, word_ids), ws) in enumerate(zip(encoded, words, strict=True)):
                    cases[i, :len(word_ids)] = torch.tensor(case_ids(word_ids, ws), dtype=torch.long)
                options["case_ids"] = cases
            p = model(batch["input_ids"], batch["attention_mask"], **options).float().softmax(-1)  # (B, T, L)
            best, best_id = p.max(-1)  # (B, T)
            for (_, word_ids), ws, row_p, row_id in zip(encoded, words, best.tolist(), best_id.tolist(), strict=True):
                first = first_subwords(word_ids, len(ws))
                tags.append(word_tags(first, row_id, labels))
                probs.append([row_p[f] if f >= 0 else 1.0 for f in first])
    out: list[list[dict[str, Any]]] = [[] for _ in texts]
    for (t, spans), piece_tags, piece_probs in zip(pieces, tags, probs, strict=True):
        for e in entities_in_text(texts[t], spans, piece_tags):
            score = sum(piece_probs[e["first"]:e["last"] + 1]) / (e["last"] - e["first"] + 1)
            out[t].append({"entity": e["type"], "type": e["type"], "start": e["start"], "end": e["end"],
                           "text": e["text"], "score": score})
    return out


@torch.inference_mode()
def answer_questions(model, tokenizer, questions: Sequence[str], contexts: Sequence[str], *,
                     max_seq_len: int | None = None, doc_stride: int | None = None, max_answer_len: int = 30,
                     allow_null: bool = False, batch_size: int = 16) -> list[dict[str, Any]]:
    """The answer span a ``SpanExtractor`` finds for each (question, context): ``{"answer", "start",
    "end", "score"}``, ``context[start:end] == answer``.

    Contexts longer than a window are split with ``doc_stride`` tokens of overlap (default: a quarter
    of the window) and the best span over all windows wins (``featherlm.data.qa.decode_answer``, as
    in the task's evaluation). ``max_seq_len``: window length (default: the smaller of 384, SQuAD's
    usual, and the model's context). ``allow_null``: answer "" (start = end = 0) when the model
    scores "no answer" above every span, for models trained with SQuAD 2.0's unanswerable questions.
    ``score``: the span's start x end probability in its window.
    """
    if len(questions) != len(contexts):
        raise ValueError(f"{len(questions)} questions but {len(contexts)} contexts")
    max_len = min(max_seq_len or 384, _context(model))
    items = [Question(str(i), q, c, [], []) for i, (q, c) in enumerate(zip(questions, contexts, strict=True))]
    features = build_features(items, tokenizer, max_seq_len=max_len,
                              doc_stride=max_len // 4 if doc_stride is None else doc_stride)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    windows, _ = QaTask().windows(model, features, len(items), batch_size=batch_size, pad_id=pad_id)
    out = []
    for q, w in zip(items, windows, strict=True):
        a = decode_answer(q, w, max_answer_len=max_answer_len, allow_null=allow_null)
        out.append({"answer": a["answer"], "start": a["start"], "end": a["end"], "score": a["score"]})
    return out
