"""Evaluation: classification metrics, and scoring a fine-tuned run on a data file.

    from featherlm.evaluate import evaluate
    evaluate("runs/sst2-lora")                              # the run's eval data, best checkpoint
    evaluate("runs/sst2-lora", "other.tsv", checkpoint="last")

``metrics`` is pure maths and is imported by the trainer too, so this package imports the layers
it drives (train, data) only inside functions: importing ``featherlm.evaluate.metrics`` from
the trainer must not pull the trainer back in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from featherlm.evaluate.metrics import (
    accuracy,
    classification_metrics,
    confusion_matrix,
    macro_scores,
    per_class,
)
from featherlm.evaluate.metrics import (
    perplexity as perplexity_from_loss,
)


def evaluate_classifier(model, tokenizer, data, *, batch_size: int = 32, max_seq_len: int = 128,
                        text_column: str | None = None, label_column: str | None = None, format: str = "auto",
                        skip_bad_rows: bool = False) -> dict[str, Any]:
    """Score a ``SequenceClassifier`` on a classification file (or ``ClassificationData``).

    Labels are read against the model's own label names, so a label the model does not know is a
    bad row. Returns ``{"accuracy", "precision", "recall", "f1", "confusion", "n", "loss",
    "labels", "skipped"}`` (precision/recall/f1 macro; confusion rows = true labels).
    """
    from featherlm.data import ClassificationData, encode_classification, read_classification
    from featherlm.train.config import FinetuneConfig, ModelSection
    from featherlm.train.tasks import TaskData, get_task

    if not isinstance(data, ClassificationData):
        data = read_classification(data, text_column=text_column, label_column=label_column, labels=model.labels,
                                   format=format, skip_bad_rows=skip_bad_rows)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    examples = encode_classification(data, tokenizer, max_seq_len)
    cfg = FinetuneConfig(model=ModelSection(labels=list(model.labels)))  # all the task's evaluation reads
    result = get_task("classification").evaluate(model, TaskData(data.path, examples), cfg=cfg, tokenizer=tokenizer,
                                                 batch_size=batch_size, pad_id=pad_id)
    result.pop("predictions")
    return {**result, "labels": list(model.labels), "skipped": len(data.skipped)}


def evaluate(run: str | Path, data: str | Path | None = None, *, checkpoint: str = "best",
             batch_size: int | None = None, skip_bad_rows: bool = False) -> dict[str, Any]:
    """Score a fine-tuning run's checkpoint on ``data`` (default: the run's own eval data).

    Classification runs give the ``evaluate_classifier`` metrics; sft and lm runs give ``loss``,
    ``perplexity`` and ``tokens``; ner runs entity precision / recall / F1 (overall and
    ``per_type``) and word accuracy; qa runs ``exact_match`` and ``f1`` in percent. The run's config
    decides columns, format and lengths.
    """
    from featherlm.errors import ConfigError
    from featherlm.train import load_run

    model, tokenizer, cfg = load_run(run, checkpoint)
    held_out = not data and not cfg.data.eval and cfg.data.eval_ratio > 0  # the run's own held-out share
    path = data or cfg.data.eval or (cfg.data.train if held_out else "")
    if not path:
        raise ConfigError(f"{run}: the run has no eval data; name a data file to evaluate on")
    bs = batch_size or cfg.train.eval_batch_size or 2 * cfg.train.batch_size
    task = cfg.task
    read = task.read(cfg, str(path), tokenizer, skip_bad_rows=skip_bad_rows)
    if held_out:
        read = task.split(read, cfg.data.eval_ratio, cfg.train.seed)[1]
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    result = task.evaluate(model, read, cfg=cfg, tokenizer=tokenizer, batch_size=bs, pad_id=pad_id)
    result.pop("predictions", None)
    if task.name == "classification":
        result["labels"] = list(cfg.model.labels)
    return {"run": str(run), "checkpoint": checkpoint, "data": str(path), "task": task.name, **result,
            "skipped": len(read.skipped)}


@torch.inference_mode()
def classify(model, tokenizer, texts: list[str], *, max_seq_len: int = 128) -> list[dict[str, Any]]:
    """Label each text with a ``SequenceClassifier``: ``[{"label", "score", "scores"}, ...]`` where
    ``score`` is the probability of the predicted label and ``scores`` maps every label to its own."""
    from featherlm.data import collate
    from featherlm.data.tasks import special_affixes, truncate

    if not texts:
        return []
    affixes = special_affixes(tokenizer)
    examples = [{"input_ids": truncate(ids, max_seq_len, affixes)} for ids in tokenizer.encode_batch(texts)]
    batch = collate(examples, tokenizer.pad_id if tokenizer.pad_id is not None else 0)
    was_training = model.training
    probs = model.eval()(batch["input_ids"], attention_mask=batch["attention_mask"]).float().softmax(-1)  # (B, L)
    model.train(was_training)
    out = []
    for row in probs.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        out.append({"label": model.labels[best], "score": row[best],
                    "scores": dict(zip(model.labels, row, strict=True))})
    return out


def predict_entities(model, tokenizer, texts: list[str], **options: Any) -> list[list[dict[str, Any]]]:
    """Entities in each text with a ``TokenClassifier`` (NER run): ``[[{"entity", "type", "start", "end",
    "text", "score"}, ...], ...]``, character spans into each text. Options and details:
    ``featherlm.evaluate.predict.predict_entities`` (imported on call: this package's import stays light)."""
    from featherlm.evaluate.predict import predict_entities as run

    return run(model, tokenizer, texts, **options)


def answer_questions(model, tokenizer, questions: list[str], contexts: list[str],
                     **options: Any) -> list[dict[str, Any]]:
    """The answer to each question in its context with a ``SpanExtractor`` (QA run): ``[{"answer", "start",
    "end", "score"}, ...]``, ``context[start:end] == answer``. Options and details:
    ``featherlm.evaluate.predict.answer_questions``."""
    from featherlm.evaluate.predict import answer_questions as run

    return run(model, tokenizer, questions, contexts, **options)


__all__ = ["accuracy", "answer_questions", "classification_metrics", "classify", "confusion_matrix", "evaluate",
           "evaluate_classifier", "macro_scores", "per_class", "perplexity_from_loss", "predict_entities"]
