"""(IA)^3 (Liu et al. 2022): learned vectors that rescale keys, values and the FFN activation.

Each target gets one vector, starting at 1 (so the adapted model starts as the base model). On the
attention projections it scales the output (k = s * (x W^T + b)); on ``feedforward_modules``
(down_proj) it scales the input, i.e. the MLP's hidden activation. Both are linear in W, so the
vector folds into the weight: diag(s) W (and s * b) or W diag(s). As in HF PEFT.
"""

from __future__ import annotations

import torch
from torch import nn

from featherlm.model.layers import linear
from featherlm.peft.base import AdaptedLinear, PeftConfig, linear_targets, matches


class IA3Linear(AdaptedLinear):
    """A Linear whose output (or, with ``on_input``, input) is scaled by a learned vector."""

    def __init__(self, base: nn.Linear, on_input: bool) -> None:
        super().__init__(base)
        self.on_input = on_input
        self.adapter_scale = self.new_param(torch.ones(self.in_features if on_input else self.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self.is_merged:
            return linear(x, self.weight, self.bias)
        if self.on_input:  # feed-forward: rescale the hidden activation entering the layer
            return linear(x * self.adapter_scale, self.weight, self.bias)
        return linear(x, self.weight, self.bias) * self.adapter_scale  # keys/values: rescale the output

    def merged_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.adapter_scale
        if self.on_input:
            return self.weight * s[None, :], self.bias
        return self.weight * s[:, None], None if self.bias is None else self.bias * s


def apply(model: nn.Module, config: PeftConfig, init_ids: list[int] | None = None) -> None:
    for name, module in linear_targets(model, config.target_modules, "ia3"):
        model.set_submodule(name, IA3Linear(module, on_input=matches(name, config.feedforward_modules)))
