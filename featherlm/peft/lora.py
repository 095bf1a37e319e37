"""LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023) and DoRA (Liu et al. 2024).

LoRA learns a low-rank update of a frozen weight: W + s * B A, with A (r, in), B (out, r) and
s = alpha / r (alpha / sqrt(r) with rsLoRA, so that larger ranks keep learning). B starts at zero,
so the adapted model starts as the base model. DoRA splits the updated weight into a direction and a
learned per-output-row magnitude m: W' = m * (W + s B A) / ||W + s B A||, with m starting at ||W||.
Parameter shapes and maths follow HF PEFT, so adapter files carry over in both directions.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from featherlm.model.layers import linear
from featherlm.peft.base import AdaptedLinear, PeftConfig, linear_targets


class LoRALinear(AdaptedLinear):
    """A Linear plus a low-rank update; with ``dora`` also a learned magnitude per output row."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False) -> None:
        super().__init__(base)
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.adapter_A = self.new_param(torch.empty(r, self.in_features))  # (r, in)
        nn.init.kaiming_uniform_(self.adapter_A, a=math.sqrt(5))  # as nn.Linear and HF PEFT
        self.adapter_B = self.new_param(torch.zeros(self.out_features, r))  # (out, r): zero, so no change at first
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_parameter("adapter_magnitude", None)
        if dora:  # ||W|| per output row: W' == W at the start
            self.adapter_magnitude = self.new_param(self.weight.detach().norm(dim=1))  # (out,)

    def delta(self) -> torch.Tensor:
        """The weight update s * B A, (out, in)."""
        return (self.adapter_B @ self.adapter_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self.is_merged:
            return linear(x, self.weight, self.bias)
        x_drop = self.dropout(x)
        lora = linear(linear(x_drop, self.adapter_A), self.adapter_B) * self.scaling  # s * x A^T B^T
        if self.adapter_magnitude is None:  # LoRA: x W^T + b + s x A^T B^T (bias fused into the matmul)
            return linear(x, self.weight, self.bias) + lora
        # DoRA: (m / ||W + sBA||) * (x W^T + s x A^T B^T), bias added last.
        # The norm is treated as a constant in backward (DoRA paper sec. 4.3, as HF PEFT does): it
        # saves memory and barely changes the gradient.
        base = linear(x, self.weight)
        with torch.no_grad():
            norm = (self.weight + self.delta()).norm(dim=1)  # (out,)
        scale = self.adapter_magnitude / norm  # (out,)
        # HF PEFT's form, equal to scale * (base + lora) without dropout; with dropout only the
        # adapter's part (including the magnitude's change of the base) sees the dropped-out input.
        base_drop = linear(x_drop, self.weight) if self.training and x_drop is not x else base
        y = base + (scale - 1) * base_drop + scale * lora
        return y if self.bias is None else y + self.bias

    def merged_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight = self.weight + self.delta()
        if self.adapter_magnitude is not None:
            weight = weight * (self.adapter_magnitude / weight.norm(dim=1))[:, None]
        return weight, self.bias


def apply(model: nn.Module, config: PeftConfig, init_ids: list[int] | None = None) -> None:
    """Wrap every targeted Linear (DoRA when config.method == "dora")."""
    for name, module in linear_targets(model, config.target_modules, config.method):
        model.set_submodule(name, LoRALinear(module, config.r, config.alpha, config.dropout, config.rslora,
                                             dora=config.method == "dora"))
