"""Bottleneck adapters (Houlsby et al. 2019): a small MLP with a skip connection after a sublayer.

Houlsby places one adapter after attention and one after the MLP, each right after the projection
back to the model width and before the residual sum. Wrapping ``o_proj`` and ``down_proj`` puts it
exactly there, for pre-LN (Llama) and post-LN (BERT) blocks alike, without touching the model:
h = o_proj(x); h + up(act(down(h))). ``up`` starts at zero, so the adapter starts as the identity.
The GELU between the projections is not linear, so adapters cannot be merged into the weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from featherlm.model.layers import linear
from featherlm.peft.base import AdaptedLinear, PeftConfig, linear_targets


class BottleneckLinear(AdaptedLinear):
    """A Linear followed by a residual bottleneck MLP of width ``size``."""

    mergeable = False

    def __init__(self, base: nn.Linear, size: int) -> None:
        super().__init__(base)
        c = self.out_features
        self.adapter_down = self.new_param(torch.empty(size, c))  # (size, C)
        nn.init.kaiming_uniform_(self.adapter_down, a=math.sqrt(5))  # as nn.Linear
        self.adapter_down_bias = self.new_param(torch.zeros(size))
        self.adapter_up = self.new_param(torch.zeros(c, size))  # (C, size): zero, so identity at first
        self.adapter_up_bias = self.new_param(torch.zeros(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = linear(x, self.weight, self.bias)  # (..., C): the sublayer's output
        z = F.gelu(linear(h, self.adapter_down, self.adapter_down_bias))  # (..., size)
        return h + linear(z, self.adapter_up, self.adapter_up_bias)


def apply(model: nn.Module, config: PeftConfig, init_ids: list[int] | None = None) -> None:
    for name, module in linear_targets(model, config.target_modules, "adapter"):
        model.set_submodule(name, BottleneckLinear(module, config.adapter_size))
