"""Classification metrics from a confusion matrix: accuracy, macro precision / recall / F1.

Pure Python on lists of ids, importing nothing from featherlm: the trainer uses it to pick the
best checkpoint (see the placement note in tests/test_layering.py), ``evaluate`` to report.
Conventions follow scikit-learn: rows of the confusion matrix are true labels, columns predicted
ones; a class's precision (recall) is 0 when nothing was predicted as (is truly) that class; the
macro average runs over the classes that occur in the references or the predictions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def confusion_matrix(predictions: Sequence[int], references: Sequence[int], num_labels: int) -> list[list[int]]:
    """``m[true][predicted]`` counts, a ``num_labels`` x ``num_labels`` list of lists."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    m = [[0] * num_labels for _ in range(num_labels)]
    for p, r in zip(predictions, references, strict=True):
        if not (0 <= p < num_labels and 0 <= r < num_labels):
            raise ValueError(f"label id out of range 0..{num_labels - 1}: prediction {p}, reference {r}")
        m[r][p] += 1
    return m


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def per_class(confusion: Sequence[Sequence[int]]) -> list[tuple[float, float, float, int]]:
    """(precision, recall, f1, support) of each class."""
    n = len(confusion)
    out = []
    for c in range(n):
        tp = confusion[c][c]
        predicted = sum(confusion[r][c] for r in range(n))
        support = sum(confusion[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.append((precision, recall, f1, support))
    return out


def macro_scores(confusion: Sequence[Sequence[int]]) -> tuple[float, float, float]:
    """Macro precision, recall and F1 (the mean of per-class F1s, not F1 of the means)."""
    n = len(confusion)
    present = [c for c in range(n) if sum(confusion[c]) or sum(confusion[r][c] for r in range(n))]
    if not present:
        return 0.0, 0.0, 0.0
    scores = per_class(confusion)
    return tuple(sum(scores[c][k] for c in present) / len(present) for k in range(3))  # type: ignore[return-value]


def classification_metrics(predictions: Sequence[int], references: Sequence[int], num_labels: int) -> dict:
    """``{"accuracy", "precision", "recall", "f1", "confusion", "n"}`` (precision/recall/f1 macro)."""
    confusion = confusion_matrix(predictions, references, num_labels)
    precision, recall, f1 = macro_scores(confusion)
    return {"accuracy": accuracy(predictions, references), "precision": precision, "recall": recall, "f1": f1,
            "confusion": confusion, "n": len(references)}


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy); inf rather than an overflow error for a diverged model."""
    return math.exp(loss) if loss < 700 else math.inf
