"""Named-entity recognition: CoNLL files, a token classifier, entity-level scores (seqeval semantics)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from featherlm.data import IGNORE_INDEX, collate
from featherlm.data.ner import CASE_CLASSES, encode_ner, ner_labels, read_conll, word_tags
from featherlm.errors import ConfigError, DataError
from featherlm.evaluate.entities import entity_scores
from featherlm.model.heads import TokenClassifier
from featherlm.train.tasks.base import Task, TaskData, autocast, evaluating


class NerTask(Task):
    name = "ner"
    metrics = ("f1", "precision", "recall", "accuracy", "loss")
    needs_decoder = False
    head_modules = ("classifier", "case_embed")  # case_embed: only with model.case_features

    def read(self, cfg, path, tokenizer, *, skip_bad_rows=False) -> TaskData:
        """Sentences as token-labelled examples. The training file (read first) fixes the label list in
        ``cfg.model.labels``; evaluation files are read against it (an entity type the model never saw
        still counts as a gold entity it misses)."""
        data = read_conll(path, scheme=cfg.data.tag_scheme, skip_bad_rows=skip_bad_rows)
        if not cfg.model.labels:
            labels = ner_labels(data.tags)
            if len(labels) < 2:
                raise DataError(path, None, "no entity tag in the training file: nothing to learn")
            cfg.model.labels = labels
        elif "O" not in cfg.model.labels:
            raise ConfigError(f"model.labels {cfg.model.labels} are not NER labels (no 'O')")
        examples = encode_ner(data, tokenizer, cfg.train.max_seq_len, cfg.model.labels,
                              label_all_subwords=cfg.data.label_all_subwords)
        return TaskData(data.path, examples, data.skipped, source=data.scheme)

    def build_model(self, backbone, cfg) -> nn.Module:
        """A ``TokenClassifier``; with ``model.case_features``, one that also embeds each word's casing
        class (the examples' ``case_ids``, read from the words as written)."""
        cases = len(CASE_CLASSES) if cfg.model.case_features else 0
        return TokenClassifier(backbone, list(cfg.model.labels), cfg.model.dropout, case_classes=cases)

    def collate(self, examples, pad_id: int) -> dict[str, torch.Tensor]:
        """Padded batch plus ``case_ids`` (B, T), 0 on padding."""
        batch = collate(examples, pad_id)
        case_ids = torch.zeros_like(batch["input_ids"])
        for i, e in enumerate(examples):
            case_ids[i, :len(e["case_ids"])] = torch.tensor(e["case_ids"], dtype=torch.long)
        batch["case_ids"] = case_ids
        return batch

    def terms(self, batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss(self, model, batch) -> tuple[torch.Tensor, int]:
        """Token cross-entropy summed over labelled tokens (first subwords, unless all are labelled)."""
        logits = model(batch["input_ids"], batch["attention_mask"], case_ids=batch["case_ids"])  # (B, T, L)
        labels = batch["labels"]  # (B, T)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
        return loss, int((labels != IGNORE_INDEX).sum())

    @torch.no_grad()
    def evaluate(self, model, data, *, cfg, tokenizer, batch_size, pad_id, bf16=False) -> dict[str, Any]:
        """Entity precision / recall / F1 (micro, and ``per_type``) on the words of the file, word
        accuracy, token loss; ``predictions``: the predicted IOB2 tags of every sentence in file order.

        Each word is tagged by its first subword's prediction; words cut off by ``max_seq_len`` are
        tagged O, so truncation costs recall rather than hiding gold entities.
        """
        examples, labels = data.examples, list(cfg.model.labels)
        predictions: list[list[str]] = [[] for _ in examples]
        total, count = 0.0, 0
        with evaluating(model):
            for index, batch in self.batches(examples, batch_size, pad_id):
                with autocast(bf16):
                    logits = model(batch["input_ids"], batch["attention_mask"], case_ids=batch["case_ids"])
                targets = batch["labels"]
                total += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                               ignore_index=IGNORE_INDEX, reduction="sum"))
                count += int((targets != IGNORE_INDEX).sum())
                for i, row in zip(index, logits.argmax(-1).tolist(), strict=True):
                    predictions[i] = word_tags(examples[i]["first"], row, labels)
        scores = entity_scores([e["tags"] for e in examples], predictions)
        return {"loss": total / max(count, 1), **scores, "sentences": len(examples), "predictions": predictions}
