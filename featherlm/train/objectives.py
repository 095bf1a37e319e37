"""What each task trains and measures: the model it needs, its loss, its evaluation.

Losses are returned as a *sum* with the number of terms (examples, or target tokens), so the
trainer can divide by the count of a whole accumulated step: gradient accumulation then gives
the same update as one big batch, also when micro-batches hold different numbers of tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from featherlm.data import IGNORE_INDEX, batch_order, collate
from featherlm.errors import ConfigError
from featherlm.evaluate.metrics import classification_metrics, perplexity
from featherlm.model import Transformer
from featherlm.model.heads import ClassifierConfig, SequenceClassifier


def build_task_model(backbone: Transformer, task: str, *, labels: Sequence[str] = (), pooling: str = "auto",
                     dropout: float = 0.1) -> nn.Module:
    """The backbone itself for language modelling (sft, lm), a SequenceClassifier around it otherwise."""
    if task == "classification":
        return SequenceClassifier(backbone, ClassifierConfig(list(labels), pooling, dropout))  # type: ignore[arg-type]
    if not backbone.config.causal:
        raise ConfigError(f"task {task!r} needs a decoder; this model is an encoder ({backbone.config.family})")
    return backbone


def autocast(bf16: bool):
    """bf16 autocast on the device of the model (CPU autocast works too); a no-op when off."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def forward_loss(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> tuple[torch.Tensor, int, Any]:
    """(summed loss, number of terms, logits) of one padded batch."""
    if task == "classification":
        logits = model(batch["input_ids"], batch["attention_mask"])  # (B, L)
        loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        return loss, int(batch["labels"].numel()), logits
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
    targets = batch["labels"][:, 1:]  # (B, T-1)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum()), None


@torch.no_grad()
def run_eval(model: nn.Module, examples: Sequence[dict[str, Any]], task: str, *, batch_size: int, pad_id: int,
             num_labels: int = 0, bf16: bool = False) -> dict[str, Any]:
    """Loss plus the task's metrics on ``examples``: classification metrics, or perplexity.

    Examples are batched by length (no shuffling) so little time goes into padding; predictions
    come back in the examples' own order under ``"predictions"`` for classification.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    predictions: list[int] = [0] * len(examples)
    try:
        for index in batch_order([len(e["input_ids"]) for e in examples], batch_size, shuffle=False, bucket=True):
            batch = collate([examples[i] for i in index], pad_id)
            with autocast(bf16):
                loss, n, logits = forward_loss(model, batch, task)
            total, count = total + float(loss), count + n
            if logits is not None:
                for i, p in zip(index, logits.argmax(-1).tolist(), strict=True):
                    predictions[i] = p
    finally:
        model.train(was_training)
    mean = total / max(count, 1)
    if task == "classification":
        references = [e["label"] for e in examples]
        return {"loss": mean, **classification_metrics(predictions, references, num_labels),
                "predictions": predictions}
    return {"loss": mean, "perplexity": perplexity(mean), "tokens": count}
