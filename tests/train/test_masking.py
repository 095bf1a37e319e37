"""BERT's 80/10/10 masking and T5's span corruption: statistics, invariants, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from featherlm.train.masking import IGNORE_INDEX, mask_tokens, random_spans_mask, span_corrupt, span_counts

VOCAB, SPECIALS, MASK = 100, [0, 1, 2, 3], 3


def within(observed: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    """``observed`` successes of ``n`` Bernoulli(p) trials lie within ``sigmas`` standard deviations."""
    return abs(observed - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (64, 256), generator=gen)
    ids[:, 0], ids[:, -1] = 1, 2  # [CLS] ... [SEP]
    ids[::7, 100:140] = 0  # some padding inside rows
    return ids


def test_mask_statistics_are_80_10_10_of_15_percent(batch):
    inputs, labels = mask_tokens(batch, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS,
                                 generator=torch.Generator().manual_seed(1))
    special = torch.isin(batch, torch.tensor(SPECIALS))
    chosen = labels != IGNORE_INDEX
    n_ordinary = int((~special).sum())
    assert not bool((chosen & special).any())  # specials are never chosen
    assert bool((labels[chosen] == batch[chosen]).all())  # labels: the original ids, -100 elsewhere
    assert bool((inputs[~chosen] == batch[~chosen]).all())  # nothing else changes
    assert within(int(chosen.sum()), n_ordinary, 0.15)
    n = int(chosen.sum())
    masked = inputs[chosen] == MASK
    kept = inputs[chosen] == batch[chosen]
    replaced = ~masked & ~kept
    assert within(int(masked.sum()), n, 0.8)
    # "random" may draw the original id itself (1 in 96): kept = 10% + 10% / 96
    assert within(int(kept.sum()), n, 0.1 + 0.1 / (VOCAB - len(SPECIALS)))
    assert within(int(replaced.sum()), n, 0.1 * (1 - 1 / (VOCAB - len(SPECIALS))))
    assert not bool(torch.isin(inputs[chosen][replaced], torch.tensor(SPECIALS)).any())  # random ids are ordinary
    # replacements spread over the vocabulary rather than repeating one id
    assert len(set(inputs[chosen][replaced].tolist())) > 50


def test_masking_is_dynamic_and_seeded(batch):
    gen = torch.Generator().manual_seed(5)
    first = mask_tokens(batch, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, generator=gen)
    second = mask_tokens(batch, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, generator=gen)
    again = mask_tokens(batch, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS,
                        generator=torch.Generator().manual_seed(5))
    assert not torch.equal(first[1], second[1])  # a new mask each time the window is drawn
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])  # same seed, same masks


def test_mask_prob_is_respected(batch):
    _, labels = mask_tokens(batch, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, mask_prob=0.4,
                            generator=torch.Generator().manual_seed(2))
    ordinary = int((~torch.isin(batch, torch.tensor(SPECIALS))).sum())
    assert within(int((labels != IGNORE_INDEX).sum()), ordinary, 0.4)


# ----------------------------------------------------------------------------- span corruption


def runs(mask: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a bool vector."""
    out, n = [], 0
    for flag in mask.tolist() + [False]:
        if flag:
            n += 1
        elif n:
            out.append(n)
            n = 0
    return out


@pytest.mark.parametrize("length", [20, 114, 512])
def test_noise_mask_has_t5_counts(length):
    noisy, spans = span_counts(length, 0.15, 3.0)
    assert noisy == round(length * 0.15) and spans == max(1, round(noisy / 3))
    for seed in range(20):
        mask = random_spans_mask(length, 0.15, 3.0, generator=torch.Generator().manual_seed(seed))
        assert mask.shape == (length,) and mask.dtype == torch.bool
        assert int(mask.sum()) == noisy
        assert len(runs(mask)) == spans  # spans never touch each other: a clean token between any two
        assert not bool(mask[0])  # T5 starts with a clean run


def test_noise_spans_average_the_mean_length():
    lengths = []
    for seed in range(200):
        lengths += runs(random_spans_mask(512, 0.15, 3.0, generator=torch.Generator().manual_seed(seed)))
    assert abs(sum(lengths) / len(lengths) - 77 / 26) < 1e-9  # every mask: 77 noisy tokens in 26 spans
    assert len(set(lengths)) > 3  # but the spans vary in length


def reconstruct(inputs: list[int], targets: list[int], sentinels: list[int]) -> list[int]:
    """Put every span of the targets back in place of its sentinel in the inputs."""
    spans, current = {}, None
    for t in targets:
        if t in sentinels:
            current = t
            spans[t] = []
        elif current is not None:
            spans[current].append(t)
    out = []
    for t in inputs:
        out += spans[t] if t in sentinels else [t]
    return out


@pytest.mark.parametrize("seed", range(5))
def test_span_corruption_reconstructs_the_original(seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (64,), generator=gen)
    sentinels, eos = list(range(99, 89, -1)), 60  # T5: <extra_id_0> is the highest id, counting down
    noise = random_spans_mask(64, 0.15, 3.0, generator=gen)
    inputs, targets = span_corrupt(ids, noise, sentinels, eos_id=eos)
    noisy, spans = span_counts(64, 0.15, 3.0)
    assert inputs[-1] == eos and targets[-1] == eos
    inputs, targets = inputs[:-1].tolist(), targets[:-1].tolist()
    assert len(inputs) == 64 - noisy + spans and len(targets) == noisy + spans  # fixed shapes
    assert [t for t in inputs if t in sentinels] == sentinels[:spans]  # in order, each once
    assert [t for t in targets if t in sentinels] == sentinels[:spans]
    assert targets[0] == sentinels[0]
    assert reconstruct(inputs, targets, sentinels) == ids.tolist()


def test_span_corruption_without_eos_and_too_few_sentinels():
    ids = torch.arange(10)
    noise = torch.tensor([0, 1, 1, 0, 0, 1, 0, 0, 1, 1], dtype=torch.bool)
    inputs, targets = span_corrupt(ids, noise, [100, 101, 102])
    assert inputs.tolist() == [0, 100, 3, 4, 101, 6, 7, 102]
    assert targets.tolist() == [100, 1, 2, 101, 5, 102, 8, 9]
    with pytest.raises(ValueError, match="3 noise spans but only 2"):
        span_corrupt(ids, noise, [100, 101])
