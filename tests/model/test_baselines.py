"""The classic baselines: Kneser-Ney n-gram LM, RNN / LSTM / GRU LMs, TextCNN and BiLSTM classifiers.

The n-gram expectations are worked out by hand from Chen & Goodman's formulas on corpora small
enough to count on paper (nltk, the usual reference, is not a dependency); the rest are properties
every correct model has: distributions sum to one, state carried across calls equals one long
call, padding changes nothing, small models learn easy patterns.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from featherlm.errors import CheckpointError, ConfigError
from featherlm.model.baselines import BiLSTMClassifier, KneserNeyLM, RecurrentConfig, RecurrentLM, TextCNN
from featherlm.model.baselines.ngram import estimate_discounts

CELLS = ["rnn", "lstm", "gru"]

# ----------------------------------------------------------------------------- Kneser-Ney


def test_bigram_probabilities_match_the_formulas_by_hand():
    # corpus 0 1 0 2 0 1, vocabulary of 4 (token 3 never seen), order 2, one discount D = 0.5
    lm = KneserNeyLM(order=2, discount=0.5, vocab_size=4).fit([0, 1, 0, 2, 0, 1])
    # unigram level, continuation counts (distinct left neighbours): 0 <- {1, 2}: 2; 1 <- {0}: 1;
    # 2 <- {0}: 1; 3: 0. Total 4; three tokens seen -> gamma = 0.5 * 3 = 1.5; uniform 1/4 below.
    p1 = {0: (2 - 0.5 + 1.5 / 4) / 4, 1: (1 - 0.5 + 1.5 / 4) / 4, 2: (1 - 0.5 + 1.5 / 4) / 4, 3: (1.5 / 4) / 4}
    for w, p in p1.items():
        assert lm.prob([], w) == pytest.approx(p)
    # bigram level after 0: raw counts 0->1: 2, 0->2: 1; total 3; gamma = 0.5 * 2 = 1
    for w in range(4):
        c = {1: 2, 2: 1}.get(w, 0)
        assert lm.prob([0], w) == pytest.approx((max(c - 0.5, 0) + 1.0 * p1[w]) / 3)
    # after 1: 1->0 once; after 3 (never seen as a context): the unigram distribution itself
    assert lm.prob([1], 0) == pytest.approx((1 - 0.5 + 0.5 * p1[0]) / 1)
    assert lm.prob([1], 2) == pytest.approx(0.5 * p1[2])
    assert [lm.prob([3], w) for w in range(4)] == pytest.approx([p1[w] for w in range(4)])
    # only the last order-1 tokens of a longer context matter
    assert lm.prob([2, 3, 0], 1) == pytest.approx(lm.prob([0], 1))


def test_modified_discounts_follow_chen_and_goodman():
    # n1..n4 = 10, 5, 3, 2: Y = 10 / 20; D1 = 1 - 2Y*5/10; D2 = 2 - 3Y*3/5; D3+ = 3 - 4Y*2/3
    assert estimate_discounts({1: 10, 2: 5, 3: 3, 4: 2}) == pytest.approx((0.5, 1.1, 3 - 4 / 3))
    # degenerate count-of-counts stay in (0, k] so that every distribution still sums to one
    for coc in ({}, {1: 5}, {2: 7, 3: 1}, {1: 1, 2: 100, 3: 1, 4: 1000}):
        d1, d2, d3 = estimate_discounts(coc)
        assert 0 < d1 <= 1 and 0 < d2 <= 2 and 0 < d3 <= 3


def test_modified_kn_uses_count_dependent_discounts():
    # order 1 (no continuation counts): counts 0: 3, 1: 2, 2: 1, 3: 1 -> n1 = 2, n2 = 1, n3 = 1, n4 = 0
    lm = KneserNeyLM(order=1, vocab_size=5).fit([0, 1, 0, 2, 0, 1, 3])
    d1, d2, d3 = estimate_discounts({1: 2, 2: 1, 3: 1})
    gamma = d1 * 2 + d2 * 1 + d3 * 1
    expected = {0: 3 - d3, 1: 2 - d2, 2: 1 - d1, 3: 1 - d1, 4: 0.0}
    for w, num in expected.items():
        assert lm.prob([], w) == pytest.approx((num + gamma / 5) / 7)


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_distributions_sum_to_one_for_seen_unseen_contexts_and_tokens(order):
    rng = random.Random(order)
    corpus = [rng.choice([0, 1, 1, 2, 3, 5, 8, 13]) for _ in range(3000)]  # some ids never occur
    lm = KneserNeyLM(order=order, vocab_size=20).fit(corpus)
    contexts = [corpus[i:i + order - 1] for i in rng.sample(range(len(corpus) - order), 20)]
    contexts += [[rng.randrange(20) for _ in range(order - 1)] for _ in range(20)]  # mostly unseen
    contexts += [[], [19] * 4, [4, 19, 0]]
    for context in contexts:
        probs = [lm.prob(context, w) for w in range(20)]
        assert math.fsum(probs) == pytest.approx(1.0, abs=1e-9)
        assert all(p > 0 for p in probs)  # unseen tokens get mass through the uniform floor
        assert lm.distribution(context) == pytest.approx(probs)


def test_evaluate_figures_agree_and_context_helps():
    pattern = [0, 1, 2, 3, 2, 1] * 200
    lm = KneserNeyLM(order=3).fit(pattern)
    scores = lm.evaluate(pattern[:300])
    assert scores["tokens"] == 300
    assert scores["nll"] == pytest.approx(-lm.logprob_sequence(pattern[:300]) / 300)
    assert scores["bits_per_token"] == pytest.approx(scores["nll"] / math.log(2))
    assert scores["perplexity"] == pytest.approx(math.exp(scores["nll"]))
    unigram = KneserNeyLM(order=1).fit(pattern).evaluate(pattern[:300])
    assert scores["nll"] < 0.5 * unigram["nll"]  # two tokens of context make the pattern predictable


def test_ngrams_do_not_cross_sequence_boundaries():
    lm = KneserNeyLM(order=2, discount=0.5).fit([[0, 1], [2, 3]])
    assert lm.prob([1], 2) == pytest.approx(lm.prob([], 2))  # "1 2" never occurs: context 1 is unseen
    joined = KneserNeyLM(order=2, discount=0.5).fit([0, 1, 2, 3])
    assert joined.prob([1], 2) > lm.prob([1], 2)


def test_save_load_roundtrip_and_generation(tmp_path):
    rng = random.Random(0)
    corpus = [rng.randrange(6) for _ in range(500)] + [0, 1, 2, 3, 4, 5] * 50
    lm = KneserNeyLM(order=4).fit(corpus)
    path = lm.save(tmp_path / "kn.json")
    back = KneserNeyLM.load(path)
    for context in ([], [1], [0, 1, 2], [5, 5, 5]):
        assert back.distribution(context) == pytest.approx(lm.distribution(context), abs=1e-15)
    assert lm.generate([0, 1], 30, seed=3) == back.generate([0, 1], 30, seed=3)
    assert lm.generate([0, 1], 30, seed=3) != lm.generate([0, 1], 30, seed=4)
    strong = KneserNeyLM(order=4).fit([0, 1, 2, 3, 4, 5] * 100)
    assert strong.generate([0, 1, 2], 12, seed=0) == [3, 4, 5, 0, 1, 2] * 2

    (tmp_path / "bad.json").write_text('{"format": "featherlm-kneser-ney", "order": 2}')
    with pytest.raises(CheckpointError, match="bad.json"):
        KneserNeyLM.load(tmp_path / "bad.json")
    with pytest.raises(CheckpointError):
        KneserNeyLM.load(tmp_path / "missing.json")


def test_kn_refuses_bad_input():
    with pytest.raises(ConfigError):
        KneserNeyLM(order=0)
    with pytest.raises(ConfigError):
        KneserNeyLM(discount=1.5)
    with pytest.raises(ConfigError, match="not fitted"):
        KneserNeyLM().prob([], 0)
    lm = KneserNeyLM(order=2, vocab_size=3).fit([0, 1, 2])
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        lm.prob([0], 3)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        KneserNeyLM(vocab_size=2).fit([0, 1, 2])


# ----------------------------------------------------------------------------- recurrent LMs


def tiny_lm(cell: str, **overrides) -> RecurrentLM:
    torch.manual_seed(0)
    return RecurrentLM(RecurrentConfig(vocab_size=11, d_model=24, n_layer=2, cell=cell, dropout=0.0, **overrides))


@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_lm_learns_a_repeating_pattern(cell):
    model = tiny_lm(cell)
    pattern = torch.tensor([1, 2, 3, 4, 5, 6, 7] * 10)[None].repeat(8, 1)  # (8, 70)
    for i in range(8):
        pattern[i] = pattern[i].roll(i)  # every row at another phase
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        logits = model(pattern[:, :-1]).logits  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, 11), pattern[:, 1:].reshape(-1))
        first = first if first is not None else float(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 2.0 and float(loss.detach()) < 0.1, (first, float(loss.detach()))
    model.eval()
    assert model.generate([3, 4, 5], 7, temperature=0) == [6, 7, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("cell", CELLS)
def test_state_carry_over_equals_one_pass(cell):
    model = tiny_lm(cell).eval()
    ids = torch.randint(0, 11, (3, 20))
    whole = model(ids)
    first = model(ids[:, :7])
    second = model(ids[:, 7:15], state=first.state)
    third = model(ids[:, 15:], state=second.state)
    joined = torch.cat([first.logits, second.logits, third.logits], dim=1)
    torch.testing.assert_close(joined, whole.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(*(s if isinstance(s, tuple) else (s,) for s in (third.state, whole.state)), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_right_padding_gives_the_unpadded_logits_and_state(cell):
    model = tiny_lm(cell).eval()
    short, long = torch.randint(1, 11, (5,)), torch.randint(1, 11, (9,))
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0, :5], batch[1] = short, long
    mask = (torch.arange(9)[None] < torch.tensor([[5], [9]])).long()
    out = model(batch, attention_mask=mask)
    alone = model(short[None])
    torch.testing.assert_close(out.logits[0, :5], alone.logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[1], model(long[None]).logits[0], atol=1e-5, rtol=1e-5)
    states = out.state if isinstance(out.state, tuple) else (out.state,)
    alone_states = alone.state if isinstance(alone.state, tuple) else (alone.state,)
    for s, a in zip(states, alone_states, strict=True):
        torch.testing.assert_close(s[:, 0], a[:, 0], atol=1e-5, rtol=1e-5)  # the state at the last real token
    with pytest.raises(ValueError, match="right-padded"):
        model(batch, attention_mask=mask.flip(-1))


def test_generation_with_state_equals_rereading_the_sequence():
    model = tiny_lm("gru").eval()
    prompt = [3, 1, 4, 1, 5]
    fast = model.generate(prompt, 10, temperature=0)
    ids = list(prompt)
    for _ in range(10):  # the slow way: the whole sequence every step
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert fast == ids[len(prompt):]
    assert model.generate(prompt, 10, seed=1) == model.generate(prompt, 10, seed=1)


def test_tied_weights_params_and_save_load(tmp_path):
    model = tiny_lm("lstm")
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = tiny_lm("lstm", tie_weights=False)
    assert untied.num_params() - model.num_params() == 11 * 24  # the output matrix counts once when tied
    for m in (model, untied):
        folder = m.save(tmp_path / m.config.cell / str(m.config.tie_weights))
        back = RecurrentLM.load(folder)
        assert back.config == m.config
        ids = torch.randint(0, 11, (2, 6))
        torch.testing.assert_close(back(ids).logits, m.eval()(ids).logits)
        assert (back.lm_head.weight is back.embed_tokens.weight) == m.config.tie_weights
    with pytest.raises(CheckpointError):
        RecurrentLM.load(tmp_path)
    with pytest.raises(ConfigError, match="cell"):
        RecurrentConfig(vocab_size=5, cell="transformer")


# ----------------------------------------------------------------------------- classifiers


def toy_task(n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Label 1 iff token 3 occurs; filler tokens 4..19; lengths 2..12 (padding in every batch)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(2)
        ids = [rng.randrange(4, 20) for _ in range(rng.randint(1, 11))]
        ids.insert(rng.randrange(len(ids) + 1), 3 if label else rng.randrange(4, 20))
        texts.append(ids)
        labels.append(label)
    return texts, labels


def pad(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(x) for x in batch)
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    mask = torch.zeros(len(batch), T, dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, :len(x)], mask[i, :len(x)] = torch.tensor(x), 1
    return ids, mask


def make_classifier(kind: str):
    torch.manual_seed(0)
    if kind == "textcnn":
        return TextCNN(20, 2, d_embed=16, n_filters=16, dropout=0.1)
    return BiLSTMClassifier(20, 2, d_model=16, dropout=0.1)


@pytest.mark.parametrize("kind", ["textcnn", "bilstm"])
def test_classifiers_learn_a_separable_toy_task(kind):
    model = make_classifier(kind)
    texts, labels = toy_task(256, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(6):
        for start in range(0, 256, 32):
            ids, mask = pad(texts[start:start + 32])
            loss = F.cross_entropy(model(ids, mask), torch.tensor(labels[start:start + 32]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    test, test_labels = toy_task(200, seed=2)
    ids, mask = pad(test)
    accuracy = (model(ids, mask).argmax(-1) == torch.tensor(test_labels)).float().mean()
    assert accuracy > 0.95


@pytest.mark.parametrize("kind", ["textcnn", "bilstm"])
def test_classifiers_ignore_padding(kind):
    model = make_classifier(kind).eval()
    rows = [[5, 6], [7, 8, 9, 3, 10, 11, 12], [4]]  # shorter than the widest kernel too
    ids, mask = pad(rows)
    padded = model(ids, mask)
    for i, row in enumerate(rows):
        torch.testing.assert_close(padded[i], model(torch.tensor([row]))[0], atol=1e-5, rtol=1e-5)
    garbage = ids.masked_fill(mask == 0, 17)  # what sits under the padding does not matter
    torch.testing.assert_close(model(garbage, mask), padded, atol=1e-5, rtol=1e-5)
    assert padded.shape == (3, 2)
