"""SQuAD scoring against the official evaluation scripts' functions, written out here as the oracle.

The v1.1 functions are those of ``evaluate-v1.1.py`` (rajpurkar.github.io/SQuAD-explorer), the
no-answer rule that of ``evaluate-v2.0.py``; copied verbatim in behaviour, only renamed.
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter

import pytest

from featherlm.evaluate.squad import exact_match, f1, normalize_answer, question_scores, squad_scores

# ----------------------------------------------------------------------------- the official v1.1 script


def official_normalize_answer(s):
    """Lower text and remove punctuation, articles and extra whitespace."""
    def remove_articles(text):
        return re.sub(r'\b(a|an|the)\b', ' ', text)

    def white_space_fix(text):
        return ' '.join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return ''.join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def official_f1_score(prediction, ground_truth):
    prediction_tokens = official_normalize_answer(prediction).split()
    ground_truth_tokens = official_normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def official_exact_match_score(prediction, ground_truth):
    return (official_normalize_answer(prediction) == official_normalize_answer(ground_truth))


def official_metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    scores_for_ground_truths = []
    for ground_truth in ground_truths:
        score = metric_fn(prediction, ground_truth)
        scores_for_ground_truths.append(score)
    return max(scores_for_ground_truths)


def official_evaluate(dataset, predictions):
    f1 = exact_match = total = 0
    for article in dataset:
        for paragraph in article['paragraphs']:
            for qa in paragraph['qas']:
                total += 1
                if qa['id'] not in predictions:
                    continue
                ground_truths = list(map(lambda x: x['text'], qa['answers']))
                prediction = predictions[qa['id']]
                exact_match += official_metric_max_over_ground_truths(official_exact_match_score, prediction,
                                                                      ground_truths)
                f1 += official_metric_max_over_ground_truths(official_f1_score, prediction, ground_truths)
    exact_match = 100.0 * exact_match / total
    f1 = 100.0 * f1 / total
    return {'exact_match': exact_match, 'f1': f1}


# ----------------------------------------------------------------------------- the official v2.0 no-answer rule


def v2_get_tokens(s):
    if not s:
        return []
    return official_normalize_answer(s).split()


def v2_compute_exact(a_gold, a_pred):
    return int(official_normalize_answer(a_gold) == official_normalize_answer(a_pred))


def v2_compute_f1(a_gold, a_pred):
    gold_toks = v2_get_tokens(a_gold)
    pred_toks = v2_get_tokens(a_pred)
    common = Counter(gold_toks) & Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


# ----------------------------------------------------------------------------- strings

HAND_MADE = [
    "", " ", "the", "The", "a an the", "A", "an apple", "The Apple!", "apple", "Apples", "theory", "another",
    "  Denmark,  Iceland and Norway ", "Denmark, Iceland, and Norway.", "10th and 11th centuries",
    "in the 10th and 11th centuries", "U.S.", "US", "u.s", "Rollo's", "Rollo", "'Rollo'", "$1,000", "1000",
    "1,000", "co-operation", "cooperation", "the the the", "a-the", "(the) answer", "answer (the)", "Ça va",
    "ça VA", "naïve café", "NAÏVE CAFÉ", "tab\tseparated\nlines", "tab separated lines", "!!!", "...", "—dash—",
    "dash", "«quoted»", "quoted", "Theatre", "an", "an an", "x the y the x", "x y x", "1.5", "15", "THE END.",
    "end", "the end the", "A.B.C.", "abc",
]
WORDS = ["the", "a", "an", "The", "A", "Norman", "norman", "France", "10th", "century", "and", "of", "U.S.",
         "Rollo's", "(", ")", ",", ".", "!", "-", "'", '"', "café", "Café", "1,000", "", " ", "\t", "x", "y"]


def random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(["", " "]).join(rng.choices(WORDS, k=rng.randint(0, 6))) for _ in range(n)]


STRINGS = HAND_MADE + random_strings(250, 0)


def test_normalisation_matches_the_official_script():
    for s in STRINGS:
        assert normalize_answer(s) == official_normalize_answer(s), repr(s)


def test_exact_match_and_f1_match_the_official_script():
    rng = random.Random(1)
    pairs = [(a, b) for a in HAND_MADE for b in HAND_MADE] + [(rng.choice(STRINGS), rng.choice(STRINGS))
                                                           for _ in range(3000)]
    for pred, gold in pairs:
        assert exact_match(pred, gold) == official_exact_match_score(pred, gold), (pred, gold)
        assert f1(pred, gold) == pytest.approx(official_f1_score(pred, gold), abs=1e-12), (pred, gold)


def test_max_over_gold_answers_and_totals_match_the_official_script():
    rng = random.Random(2)
    dataset = [{"paragraphs": [{"qas": [{"id": f"q{i}", "answers": [{"text": t} for t in
                                                                    rng.sample(STRINGS, rng.randint(1, 4))]}
                                        for i in range(300)]}]}]
    predictions = {f"q{i}": rng.choice(STRINGS) for i in range(300) if i % 17}  # some unanswered: score 0
    answers = {qa["id"]: [a["text"] for a in qa["answers"]] for qa in dataset[0]["paragraphs"][0]["qas"]}
    ours = squad_scores(predictions, answers)
    expected = official_evaluate(dataset, predictions)
    assert ours["exact_match"] == pytest.approx(expected["exact_match"], abs=1e-9)
    assert ours["f1"] == pytest.approx(expected["f1"], abs=1e-9)
    assert ours["total"] == 300 and "no_answer_total" not in ours
    for qid, truths in answers.items():
        em, score = question_scores(predictions.get(qid, ""), truths)
        pred = predictions.get(qid, "")
        assert em == official_metric_max_over_ground_truths(official_exact_match_score, pred, truths)
        assert score == pytest.approx(official_metric_max_over_ground_truths(official_f1_score, pred, truths))


def test_unanswerable_questions_follow_the_v2_rule():
    """No gold answer: the v2.0 script's gold list is [""], so only a prediction normalising to "" scores."""
    for pred in STRINGS:
        em, score = question_scores(pred, [])
        assert em == v2_compute_exact("", pred) and score == v2_compute_f1("", pred), repr(pred)
    predictions = {"a": "", "b": "the", "c": "Paris", "d": "Paris"}
    scores = squad_scores(predictions, {"a": [], "b": [], "c": [], "d": ["Paris"]})
    assert scores["total"] == 4 and scores["no_answer_total"] == 3 and scores["has_answer_total"] == 1
    assert scores["no_answer_exact_match"] == pytest.approx(200 / 3) and scores["has_answer_f1"] == 100.0
    assert scores["exact_match"] == 75.0


def test_no_questions_scores_zero():
    assert squad_scores({}, {}) == {"exact_match": 0.0, "f1": 0.0, "total": 0}
