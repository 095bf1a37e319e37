"""Classification metrics on small cases worked out by hand, and against an independent recount."""

from __future__ import annotations

import math
import random

import pytest

from featherlm.evaluate import classification_metrics, confusion_matrix, macro_scores, per_class
from featherlm.evaluate.metrics import perplexity


def test_binary_case_by_hand():
    # true:      1 1 1 1 0 0 0 0 0 0
    # predicted: 1 1 1 0 1 0 0 0 0 0   -> TP=3 FN=1 FP=1 TN=5
    refs = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    preds = [1, 1, 1, 0, 1, 0, 0, 0, 0, 0]
    m = classification_metrics(preds, refs, 2)
    assert m["confusion"] == [[5, 1], [1, 3]]  # rows true, columns predicted
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(0.8)
    # class 1: P = 3/4, R = 3/4, F1 = 3/4; class 0: P = 5/6, R = 5/6, F1 = 5/6
    assert m["precision"] == pytest.approx((3 / 4 + 5 / 6) / 2)
    assert m["recall"] == pytest.approx((3 / 4 + 5 / 6) / 2)
    assert m["f1"] == pytest.approx((3 / 4 + 5 / 6) / 2)


def test_three_classes_macro_f1_is_the_mean_of_class_f1s():
    refs = [0, 0, 0, 1, 1, 2]
    preds = [0, 1, 1, 1, 2, 2]
    m = classification_metrics(preds, refs, 3)
    assert m["confusion"] == [[1, 2, 0], [0, 1, 1], [0, 0, 1]]
    # class 0: P 1/1, R 1/3, F1 1/2;  class 1: P 1/3, R 1/2, F1 2/5;  class 2: P 1/2, R 1/1, F1 2/3
    assert m["precision"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    assert m["recall"] == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)
    assert m["f1"] == pytest.approx((1 / 2 + 2 / 5 + 2 / 3) / 3)
    assert m["accuracy"] == pytest.approx(3 / 6)


def test_a_class_never_predicted_has_zero_precision_and_absent_classes_are_not_averaged():
    refs = [0, 0, 1, 1]
    preds = [0, 0, 0, 0]  # class 1 never predicted: precision 0 by convention, not NaN
    (p0, r0, f0, s0), (p1, r1, f1, s1), (p2, r2, f2, s2) = per_class(confusion_matrix(preds, refs, 3))
    assert (p1, r1, f1, s1) == (0.0, 0.0, 0.0, 2)
    assert (p0, r0, s0) == (0.5, 1.0, 2) and f0 == pytest.approx(2 / 3)
    assert s2 == 0
    m = classification_metrics(preds, refs, 3)  # class 2 occurs nowhere: it does not drag the mean down
    assert m["f1"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["precision"] == pytest.approx(0.25)


def recount(preds, refs, k):
    """An independent macro-F1: per class counts by set membership, no confusion matrix."""
    f1s, ps, rs = [], [], []
    for c in range(k):
        tp = sum(1 for p, r in zip(preds, refs, strict=True) if p == c and r == c)
        fp = sum(1 for p, r in zip(preds, refs, strict=True) if p == c and r != c)
        fn = sum(1 for p, r in zip(preds, refs, strict=True) if p != c and r == c)
        if tp + fp + fn == 0:
            continue
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        ps.append(prec)
        rs.append(rec)
        f1s.append(2 * tp / (2 * tp + fp + fn))  # the F1 identity, a different formula from 2PR/(P+R)
    return sum(ps) / len(ps), sum(rs) / len(rs), sum(f1s) / len(f1s)


@pytest.mark.parametrize("seed", range(5))
def test_random_cases_match_an_independent_recount(seed):
    rng = random.Random(seed)
    k = rng.randint(2, 5)
    refs = [rng.randrange(k) for _ in range(60)]
    preds = [r if rng.random() < 0.6 else rng.randrange(k) for r in refs]
    m = classification_metrics(preds, refs, k)
    precision, recall, f1 = recount(preds, refs, k)
    assert m["precision"] == pytest.approx(precision)
    assert m["recall"] == pytest.approx(recall)
    assert m["f1"] == pytest.approx(f1)
    assert m["accuracy"] == pytest.approx(sum(p == r for p, r in zip(preds, refs, strict=True)) / 60)
    assert sum(map(sum, m["confusion"])) == 60
    assert macro_scores(m["confusion"]) == pytest.approx((precision, recall, f1))


def test_bad_inputs_and_perplexity():
    with pytest.raises(ValueError, match="2 predictions for 3"):
        classification_metrics([0, 1], [0, 1, 1], 2)
    with pytest.raises(ValueError, match="out of range"):
        confusion_matrix([2], [0], 2)
    assert classification_metrics([], [], 2)["accuracy"] == 0.0
    assert perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity(1e4) == math.inf
