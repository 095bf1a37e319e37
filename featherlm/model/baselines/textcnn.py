"""TextCNN (Kim 2014): convolutions of several widths over word embeddings, max-pooled over time.

A sentence classifier that was the strong simple baseline before pretrained transformers, and the
discriminator of SeqGAN (Yu et al. 2017), which tells generated token windows from real ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from featherlm.errors import ConfigError


class TextCNN(nn.Module):
    """Embedding -> one Conv1d per kernel size (``n_filters`` each) -> ReLU -> max over time -> dropout
    -> linear.

    The convolutions are *wide* (``padding = k - 1``) over embeddings zeroed at padding positions, and
    the max skips outputs whose window lies wholly in the padding: a padded row then gives exactly
    the logits of the same row unpadded, and a text shorter than the widest kernel still has windows.
    """

    def __init__(self, vocab_size: int, num_labels: int, d_embed: int = 128, kernel_sizes: Sequence[int] = (3, 4, 5),
                 n_filters: int = 100, dropout: float = 0.5) -> None:
        super().__init__()
        if num_labels < 2:
            raise ConfigError(f"a classifier needs at least 2 labels, got {num_labels}")
        if not kernel_sizes or min(kernel_sizes) < 1:
            raise ConfigError(f"kernel sizes must be positive integers, got {list(kernel_sizes)}")
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)
        self.embed_tokens = nn.Embedding(vocab_size, d_embed)
        self.convs = nn.ModuleList(nn.Conv1d(d_embed, n_filters, k, padding=k - 1) for k in self.kernel_sizes)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(n_filters * len(self.kernel_sizes), num_labels)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled feature vector (B, n_filters * len(kernel_sizes)) before dropout and the classifier."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.to(torch.float32)  # (B, T)
        x = self.embed_tokens(input_ids) * mask[..., None]  # (B, T, E): pads are zero vectors
        x = x.transpose(1, 2)  # (B, E, T)
        lengths = attention_mask.long().sum(-1).clamp(min=1)  # (B,)
        pooled = []
        for k, conv in zip(self.kernel_sizes, self.convs, strict=True):
            h = torch.relu(conv(x))  # (B, F, T + k - 1); output j sees inputs j-k+1 .. j
            valid = torch.arange(T + k - 1, device=x.device)[None, :] < (lengths + k - 1)[:, None]  # (B, T + k - 1)
            h = h.masked_fill(~valid[:, None, :], float("-inf"))
            pooled.append(h.max(dim=-1).values)  # (B, F)
        return torch.cat(pooled, dim=-1)  # (B, F * K)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.drop(self.features(input_ids, attention_mask)))  # (B, L)
