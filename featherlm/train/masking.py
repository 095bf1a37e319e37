"""Input corruptions of the encoder objectives: BERT's masked LM and T5's span corruption.

Both are pure functions of token ids and a ``torch.Generator``: the pretraining loop applies them
each time a window is drawn (dynamic masking, as RoBERTa: a sequence seen twice is masked
differently), and a resumed run, whose generator state is restored, masks exactly as an
uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100  # label of a position without loss (PyTorch's cross_entropy default)


def mask_tokens(ids: torch.Tensor, *, mask_id: int, vocab_size: int, special_ids: Sequence[int] = (),
                mask_prob: float = 0.15, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of ``ids`` (B, T) -> (inputs, labels), both (B, T).

    Each non-special token is chosen with probability ``mask_prob``; a chosen token becomes the
    mask token 80% of the time, a random non-special token 10%, and stays itself 10% (so the model
    cannot rely on seeing [MASK] where it must predict). ``labels`` holds the original id at chosen
    positions and ``IGNORE_INDEX`` elsewhere. Special tokens ([CLS], [SEP], padding) are never chosen.
    """
    special = torch.zeros(vocab_size, dtype=torch.bool)
    special[list(special_ids)] = True
    maskable = ~special[ids]  # (B, T)
    chosen = (torch.rand(ids.shape, generator=generator) < mask_prob) & maskable
    action = torch.rand(ids.shape, generator=generator)  # < 0.8 mask, < 0.9 random, else keep
    ordinary = (~special).nonzero().squeeze(1)  # ids a random replacement may take
    replacement = ordinary[torch.randint(len(ordinary), ids.shape, generator=generator)]
    inputs = torch.where(chosen & (action < 0.8), mask_id, ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), replacement, inputs)
    labels = torch.where(chosen, ids, IGNORE_INDEX)
    return inputs, labels


def random_spans_mask(length: int, noise_density: float = 0.15, mean_span: float = 3.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """T5's noise mask (bool, ``length``): ``round(length * noise_density)`` noisy tokens in
    ``round(noisy / mean_span)`` spans, placed at random, never at the very start.

    As T5's ``random_spans_noise_mask``: the noisy and the clean tokens are each cut into the same
    number of non-empty runs at random, then interleaved clean, noise, clean, noise... The counts
    are fixed by ``length``, so every row of a batch corrupts into the same shapes.
    """
    noisy, spans = span_counts(length, noise_density, mean_span)

    def cut(total: int) -> torch.Tensor:  # ``spans`` positive lengths summing to ``total``
        points = (torch.randperm(total - 1, generator=generator)[: spans - 1] + 1).sort().values
        return torch.diff(torch.cat([torch.tensor([0]), points, torch.tensor([total])]))

    noise_runs, clean_runs = cut(noisy), cut(length - noisy)
    runs = torch.stack([clean_runs, noise_runs], dim=1).flatten()  # clean, noise, clean, noise...
    flags = torch.tensor([False, True]).repeat(spans)
    return flags.repeat_interleave(runs)


def span_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noisy tokens, spans) of a sequence of ``length``: at least one of each, at least one clean token."""
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {length}")
    noisy = min(max(round(length * noise_density), 1), length - 1)
    spans = min(max(round(noisy / mean_span), 1), noisy, length - noisy)
    return noisy, spans


def span_corrupt(ids: torch.Tensor, noise: torch.Tensor, sentinel_ids: Sequence[int],
                 eos_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of T5's objective for one sequence ``ids`` (L,) and its noise mask (L,).

    Each noisy span of the input is replaced by one sentinel (``sentinel_ids[0]``, then ``[1]``...);
    the targets list every sentinel followed by the tokens it hid. Both end with ``eos_id`` when given:

        ids      The cute dog walks in the park
        inputs   The <0> walks <1> park </s>
        targets  <0> cute dog <1> in the </s>
    """
    starts = noise & ~torch.cat([torch.tensor([False]), noise[:-1]])  # first token of each span
    n = int(starts.sum())
    if n > len(sentinel_ids):
        raise ValueError(f"{n} noise spans but only {len(sentinel_ids)} sentinel ids")
    sentinels = torch.tensor(list(sentinel_ids[:n]), dtype=ids.dtype)
    span_index = (starts.long().cumsum(0) - 1).clamp(min=0)  # (L,) the span a noisy token belongs to
    inputs = torch.where(starts, sentinels[span_index], ids)[~noise | starts] if n else ids
    pieces = [part for i in range(n) for part in (sentinels[i : i + 1], ids[noise & (span_index == i)])]
    targets = torch.cat(pieces) if pieces else ids[:0]
    tail = torch.tensor([eos_id], dtype=ids.dtype) if eos_id is not None else ids[:0]
    return torch.cat([inputs, tail]), torch.cat([targets, tail])
