"""Extractive question answering (SQuAD): windowed features, a span head, exact match and F1.

The examples are the features (one per context window); the questions, contexts and gold answers
stay in ``TaskData.source`` (a ``QaSource``), because a question is scored once, from the best span
over all of its windows. SQuAD 2.0's unanswerable questions follow ``data.unanswerable``: "null"
trains them (and every window without the answer) to point at [CLS] and predicts "" when that
wins; "skip" leaves them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from featherlm.data.qa import Question, build_features, decode_answer, read_squad
from featherlm.errors import ConfigError
from featherlm.evaluate.squad import squad_scores
from featherlm.model.heads import SpanExtractor
from featherlm.train.tasks.base import Task, TaskData, autocast, evaluating


@dataclass
class QaSource:
    """What scoring needs besides the features: the questions (features index them) and whether "" may
    be predicted."""

    questions: list[Question]
    allow_null: bool
    left_out: int = 0  # unanswerable questions skipped (data.unanswerable: skip)


class QaTask(Task):
    name = "qa"
    metrics = ("f1", "exact_match", "loss")
    needs_decoder = False
    head_modules = ("qa_outputs",)

    def read(self, cfg, path, tokenizer, *, skip_bad_rows=False) -> TaskData:
        """Questions of a SQuAD file as window features. On the training file (read first), an "auto"
        ``data.unanswerable`` becomes "null" or "skip" by whether the file has unanswerable questions,
        so evaluation data and the saved config follow the choice."""
        d = cfg.data
        data = read_squad(path, skip_bad_rows=skip_bad_rows)
        if d.unanswerable == "auto":
            d.unanswerable = "null" if data.unanswerable else "skip"
        questions = data.questions
        if d.unanswerable == "skip":
            questions = [q for q in questions if q.answers]
        features = build_features(questions, tokenizer, max_seq_len=cfg.train.max_seq_len, doc_stride=d.doc_stride)
        source = QaSource(questions, allow_null=d.unanswerable == "null", left_out=len(data.questions) - len(questions))
        return TaskData(data.path, features, data.skipped, source)

    def subset(self, data: TaskData, limit: int, seed: int) -> TaskData:
        """A seeded random ``limit`` *questions* (file order kept) with all of their windows."""
        src: QaSource = data.source
        if not limit or limit >= len(src.questions):
            return data
        order = torch.randperm(len(src.questions), generator=torch.Generator().manual_seed(seed))
        return self.questions(data, order[:limit].tolist())

    def split(self, data: TaskData, ratio: float, seed: int) -> tuple[TaskData, TaskData]:
        """(train, held out) by *questions*: a question's windows all go to one side, so none is scored
        from part of its context, nor trained on the context it is scored on."""
        n = len(data.source.questions)
        if n < 2:
            raise ConfigError(f"{data.path}: data.eval_ratio needs at least 2 questions, got {n}")
        k = min(max(1, round(ratio * n)), n - 1)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1)).tolist()
        held = self.questions(data, order[:k])
        held.skipped = []
        return self.questions(data, order[k:]), held

    @staticmethod
    def questions(data: TaskData, indices: list[int]) -> TaskData:
        """The TaskData of the questions ``indices`` (kept in file order), with all of their windows."""
        src: QaSource = data.source
        keep = sorted(indices)
        new_index = {old: new for new, old in enumerate(keep)}
        features = [{**f, "question": new_index[f["question"]]} for f in data.examples if f["question"] in new_index]
        source = QaSource([src.questions[i] for i in keep], src.allow_null, src.left_out)
        return TaskData(data.path, features, data.skipped, source)

    def build_model(self, backbone, cfg) -> nn.Module:
        return SpanExtractor(backbone)

    def collate(self, examples, pad_id) -> dict[str, torch.Tensor]:
        B, T = len(examples), max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((B, T), pad_id, dtype=torch.long)
        token_type_ids = torch.zeros(B, T, dtype=torch.long)
        attention_mask = torch.zeros(B, T, dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            input_ids[i, :n] = torch.tensor(e["input_ids"])
            token_type_ids[i, :n] = torch.tensor(e["token_type_ids"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
                "start": torch.tensor([e["start"] for e in examples]),  # (B,) answer's first token, or 0
                "end": torch.tensor([e["end"] for e in examples])}  # (B,) its last token

    def terms(self, batch) -> int:
        return int(batch["start"].numel())

    def logits(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end logits (B, T) in float32, padding set to -inf (never a candidate, no probability)."""
        start, end = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        pad = batch["attention_mask"] == 0  # (B, T)
        return start.float().masked_fill(pad, float("-inf")), end.float().masked_fill(pad, float("-inf"))

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        """Per feature, the mean of the start and end cross-entropies; summed over the batch."""
        start, end = self.logits(model, batch)
        loss = (F.cross_entropy(start, batch["start"], reduction="sum")
                + F.cross_entropy(end, batch["end"], reduction="sum")) / 2
        return loss, int(batch["start"].numel())

    @torch.no_grad()
    def windows(self, model, features, n_questions: int, *, batch_size: int, pad_id: int,
                bf16: bool = False) -> tuple[list[list[tuple[list[float], list[float], list]]], float]:
        """Per question, the (start log-probs, end log-probs, offsets) of each of its windows; and the
        summed feature loss. Batches are made by length, so a question's windows come in any order."""
        windows: list[list[tuple[list[float], list[float], list]]] = [[] for _ in range(n_questions)]
        total = 0.0
        with evaluating(model):
            for index, batch in self.batches(features, batch_size, pad_id):
                with autocast(bf16):
                    start, end = self.logits(model, batch)
                total += float(F.cross_entropy(start, batch["start"], reduction="sum")
                               + F.cross_entropy(end, batch["end"], reduction="sum")) / 2
                start_logp, end_logp = start.log_softmax(-1).tolist(), end.log_softmax(-1).tolist()
                for row, i in enumerate(index):
                    f = features[i]
                    n = len(f["input_ids"])
                    windows[f["question"]].append((start_logp[row][:n], end_logp[row][:n], f["offsets"]))
        return windows, total

    def evaluate(self, model, data, *, cfg, tokenizer, batch_size, pad_id, bf16=False) -> dict[str, Any]:
        """Exact match and F1 in percent (official SQuAD normalisation, best of the gold answers) over the
        questions, the feature loss, and ``predictions`` (question id -> answer text). With unanswerable
        questions present, the SQuAD 2.0 has-answer / no-answer breakdown is added."""
        src: QaSource = data.source
        windows, total = self.windows(model, data.examples, len(src.questions), batch_size=batch_size,
                                      pad_id=pad_id, bf16=bf16)
        answers = [decode_answer(q, w, max_answer_len=cfg.data.max_answer_len, allow_null=src.allow_null)
                   for q, w in zip(src.questions, windows, strict=True)]
        predictions = {q.id: a["answer"] for q, a in zip(src.questions, answers, strict=True)}
        scores = squad_scores(predictions, {q.id: q.answers for q in src.questions})
        return {**scores, "loss": total / max(len(data.examples), 1), "questions": len(src.questions),
                "features": len(data.examples), "unanswerable_left_out": src.left_out, "predictions": predictions}
