"""Batches: which examples go together (seeded, optionally bucketed by length) and how they are padded.

The order of an epoch is a pure function of ``(seed, epoch)``: a resumed run recomputes it and
skips the batches it has already seen, so no sampler or iterator state has to be saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from featherlm.data.tasks import IGNORE_INDEX

BUCKET_WINDOW = 50  # batches per sorting window: few pads, yet batches of every length turn up throughout


def batch_order(lengths: Sequence[int], batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                bucket: bool = False) -> list[list[int]]:
    """The example indices of each batch of one epoch (the last batch may be smaller).

    ``bucket``: sort examples by length inside windows of ``BUCKET_WINDOW`` batches of the shuffled
    order, then shuffle the batches, so each batch pads little while the order stays random.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    n = len(lengths)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # distinct per (seed, epoch)
    order = torch.randperm(n, generator=gen).tolist() if shuffle else list(range(n))
    if bucket:
        window = batch_size * BUCKET_WINDOW
        order = [i for s in range(0, n, window) for i in sorted(order[s:s + window], key=lengths.__getitem__)]
    batches = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    if bucket and shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
    return batches


def collate(examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a list of examples to the longest one (right padding).

    Returns ``input_ids`` and ``attention_mask`` (B, T), plus ``labels``: (B,) class ids when the
    examples carry ``label``, (B, T) token labels padded with IGNORE_INDEX when they carry ``labels``.
    """
    B, T = len(examples), max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "label" in examples[0]:
        batch["labels"] = torch.tensor([e["label"] for e in examples], dtype=torch.long)
    elif "labels" in examples[0]:
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"], dtype=torch.long)
        batch["labels"] = labels
    return batch
