"""SQuAD scoring: the official v1.1 answer normalisation, exact match and token F1, max over gold answers.

Pure maths on strings, importing nothing of featherlm (the QA task's evaluation in the trainer uses
it). The functions follow ``evaluate-v1.1.py`` line for line in behaviour: lower-case, drop ASCII
punctuation, drop the articles a/an/the, collapse whitespace; F1 over the multiset of remaining
tokens; each question scores the best of its gold answers; totals are percentages.

Unanswerable questions (SQuAD 2.0, no gold answer) are scored as the official v2.0 script does:
the only right answer is the empty one, so a prediction scores 1 (EM and F1) exactly when it
normalises to "" and 0 otherwise. Answerable questions keep the v1.1 functions.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, remove punctuation, remove articles, collapse whitespace (the official order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(truth)


def f1(prediction: str, truth: str) -> float:
    """Token F1 of the normalised strings; 0 when they share no token (also when both are empty, as v1.1)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def max_over_truths(metric: Callable[[str, str], float], prediction: str, truths: Sequence[str]) -> float:
    """The best score of ``prediction`` against any gold answer (needs at least one)."""
    return max(float(metric(prediction, truth)) for truth in truths)


def question_scores(prediction: str, truths: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one question; an empty ``truths`` marks it unanswerable (v2.0 rule)."""
    if not truths:
        right = float(normalize_answer(prediction) == "")
        return right, right
    return max_over_truths(exact_match, prediction, truths), max_over_truths(f1, prediction, truths)


def squad_scores(predictions: Mapping[str, str], answers: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """``{"exact_match", "f1", "total"}`` in percent over every question of ``answers`` (id -> gold
    texts, empty for unanswerable); a question without a prediction scores 0, as in the official
    script. When some questions are unanswerable, the official v2.0 breakdown is added:
    ``has_answer_exact_match``/``has_answer_f1``/``has_answer_total`` and the ``no_answer_`` ones."""
    groups: dict[str, list[tuple[float, float]]] = {"all": [], "has_answer": [], "no_answer": []}
    for qid, truths in answers.items():
        scores = question_scores(predictions[qid], truths) if qid in predictions else (0.0, 0.0)
        groups["all"].append(scores)
        groups["has_answer" if truths else "no_answer"].append(scores)

    def summary(rows: list[tuple[float, float]], prefix: str = "") -> dict[str, Any]:
        n = len(rows)
        return {f"{prefix}exact_match": 100.0 * sum(r[0] for r in rows) / n if n else 0.0,
                f"{prefix}f1": 100.0 * sum(r[1] for r in rows) / n if n else 0.0, f"{prefix}total": n}

    out = summary(groups["all"])
    if groups["no_answer"]:
        out |= summary(groups["has_answer"], "has_answer_") | summary(groups["no_answer"], "no_answer_")
    return out
