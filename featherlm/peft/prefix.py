"""Prefix tuning (Li & Liang 2021): trainable keys and values prepended in every attention layer.

Each layer gets P key and P value vectors per key/value head, through the model's generic
``Attention.kv_prefix`` hook: every query may attend to them, they carry no position and are never
written to the KV cache (so generation with a cache works unchanged). Outputs change from the start
by design. The paper's MLP reparametrisation is left out: it only helps optimisation and is folded
away after training anyway.
"""

from __future__ import annotations

import torch
from torch import nn

from featherlm.model.layers import Attention
from featherlm.peft.base import PeftConfig, backbone


class KVPrefix(nn.Module):
    """P trainable keys and values for one attention layer, shared by every sequence of a batch."""

    def __init__(self, n_kv_head: int, length: int, head_dim: int, like: torch.Tensor) -> None:
        super().__init__()
        shape = (n_kv_head, length, head_dim)
        # N(0, 1) as HF PEFT (an nn.Embedding's init): on the scale of real keys and values, so the
        # prefix matters, and learns, from the first step
        self.adapter_key = nn.Parameter(torch.randn(shape, device=like.device).to(like.dtype))  # (Hkv, P, D)
        self.adapter_value = nn.Parameter(torch.randn(shape, device=like.device).to(like.dtype))

    def forward(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:  # (B, Hkv, P, D) each
        return (self.adapter_key.expand(batch_size, -1, -1, -1),
                self.adapter_value.expand(batch_size, -1, -1, -1))


def apply(model: nn.Module, config: PeftConfig, init_ids: list[int] | None = None) -> None:
    _, transformer = backbone(model)
    cfg, like = transformer.config, transformer.embed_tokens.weight
    for module in model.modules():
        if isinstance(module, Attention):
            module.kv_prefix = KVPrefix(cfg.n_kv_head, config.num_virtual_tokens, cfg.head_dim, like)
