"""Sequence classification (sentiment, topics, ...): a pooled backbone and a linear head."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from featherlm.data import encode_classification, read_classification
from featherlm.evaluate.metrics import classification_metrics
from featherlm.model.heads import ClassifierConfig, SequenceClassifier
from featherlm.train.tasks.base import Task, TaskData, autocast, evaluating


class ClassificationTask(Task):
    name = "classification"
    metrics = ("accuracy", "f1", "precision", "recall", "loss")
    needs_decoder = False
    head_modules = ("classifier",)

    def read(self, cfg, path, tokenizer, *, skip_bad_rows=False) -> TaskData:
        d = cfg.data
        data = read_classification(path, text_column=d.text_column, label_column=d.label_column,
                                   labels=cfg.model.labels or None, format=d.format, skip_bad_rows=skip_bad_rows)
        cfg.model.labels = data.label_names  # evaluation data is then read against the training labels
        return TaskData(data.path, encode_classification(data, tokenizer, cfg.train.max_seq_len), data.skipped)

    def build_model(self, backbone, cfg) -> nn.Module:
        m = cfg.model
        return SequenceClassifier(backbone, ClassifierConfig(list(m.labels), m.pooling, m.dropout))  # type: ignore[arg-type]

    def terms(self, batch) -> int:
        return int(batch["labels"].numel())

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        logits = model(batch["input_ids"], batch["attention_mask"])  # (B, L)
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), int(batch["labels"].numel())

    @torch.no_grad()
    def evaluate(self, model, data, *, cfg, tokenizer, batch_size, pad_id, bf16=False) -> dict[str, Any]:
        """Loss, accuracy, macro precision / recall / F1, the confusion matrix, and the predicted label
        id of every example in file order (``predictions``)."""
        examples = data.examples
        total = 0.0
        predictions = [0] * len(examples)
        with evaluating(model):
            for index, batch in self.batches(examples, batch_size, pad_id):
                with autocast(bf16):
                    logits = model(batch["input_ids"], batch["attention_mask"])  # (B, L)
                total += float(F.cross_entropy(logits.float(), batch["labels"], reduction="sum"))
                for i, p in zip(index, logits.argmax(-1).tolist(), strict=True):
                    predictions[i] = p
        references = [e["label"] for e in examples]
        return {"loss": total / max(len(examples), 1),
                **classification_metrics(predictions, references, len(cfg.model.labels)),
                "predictions": predictions}
