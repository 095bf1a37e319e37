"""Optimizer pieces a training loop shares: AdamW decay groups and the warmup + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def decay_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups: matrices (and embeddings) decayed, vectors (biases, norm gains)
    not: decaying those towards 0 only fights the scale the model sets itself (GPT-2, BERT, nanoGPT)."""
    named = [(n, p) for n, p in named if p.requires_grad]
    return [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]


def make_adamw(model: nn.Module, lr: float, weight_decay: float, betas: Iterable[float]) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters with ``decay_groups``; eps 1e-8."""
    b1, b2 = betas
    return torch.optim.AdamW(decay_groups(model.named_parameters(), weight_decay), lr=lr, betas=(b1, b2), eps=1e-8)


def warmup_cosine(step: int, *, lr: float, min_lr: float, warmup: int, total: int,
                  progress: float | None = None) -> float:
    """The learning rate of update ``step`` (0-based): linear warmup reaching ``lr`` on its last
    step, then a half cosine from ``lr`` down to ``min_lr`` at ``total`` (and ``min_lr`` after).
    ``progress`` in [0, 1] replaces the step's position in the decay (a schedule over wall time)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if progress is None:
        progress = (step - warmup) / max(total - warmup, 1)
    progress = min(max(progress, 0.0), 1.0)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
