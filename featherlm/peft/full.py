"""Full fine-tuning: every parameter trains. The baseline the other methods are measured against;
its "adapter" file is the whole model."""

from __future__ import annotations

from torch import nn

from featherlm.peft.base import PeftConfig


def apply(model: nn.Module, config: PeftConfig, init_ids: list[int] | None = None) -> None:
    model.requires_grad_(True)
