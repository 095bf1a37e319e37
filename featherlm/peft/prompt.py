"""Prompt tuning (Lester et al. 2021): P trainable virtual token embeddings before the input.

Attached through the model's generic ``Transformer.embed_prefix`` hook: the vectors enter the first
layer before the tokens, pass through every layer like tokens, carry no position (the real tokens
keep positions 0..T-1, so padding and position logic are untouched) and are held in the KV cache
after the first forward, so cached generation works. The model's outputs line up with input_ids
(the prefix positions are dropped). Initialised from the embeddings of ``init_ids`` (the tokenised
``prompt_init_text``, repeated to P) or of P random vocabulary tokens: both beat random vectors in
the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from featherlm.errors import ConfigError
from featherlm.peft.base import PeftConfig, backbone


class VirtualTokens(nn.Module):
    """P trainable input embeddings, shared by every sequence of a batch."""

    def __init__(self, init: torch.Tensor) -> None:  # (P, C)
        super().__init__()
        self.num_tokens = init.shape[0]
        self.adapter_prompt = nn.Parameter(init.detach().clone())  # (P, C)

    def forward(self, batch_size: int) -> torch.Tensor:  # (B, P, C)
        return self.adapter_prompt.expand(batch_size, -1, -1)


def apply(model: nn.Module, config: PeftConfig, init_ids: list[int] | None = None) -> None:
    _, transformer = backbone(model)
    embed, n = transformer.embed_tokens.weight, config.num_virtual_tokens
    if config.prompt_init_text and not init_ids:
        raise ConfigError("peft.prompt_init_text is set: pass its token ids as apply(..., init_ids=...)")
    if init_ids:
        ids = torch.tensor((list(init_ids) * n)[:n])
        if int(ids.max()) >= embed.shape[0] or int(ids.min()) < 0:
            raise ConfigError(f"peft: init_ids must be token ids below the vocabulary size {embed.shape[0]}")
    else:
        ids = torch.randint(0, embed.shape[0], (n,))
    transformer.embed_prefix = VirtualTokens(embed.detach()[ids.to(embed.device)])
