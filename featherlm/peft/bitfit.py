"""BitFit (Ben Zaken et al. 2022): train only the biases.

Every existing bias trains (BERT: projections and LayerNorms). Llama-style models have no biases at
all, so bias-free target projections get a zero-initialised ``adapter_bias`` (the model starts
unchanged, and the base checkpoint, which has no such key, still loads). Merging is trivial: an
existing bias is already in place; an added one becomes the plain Linear's bias (``merged()``).
"""

from __future__ import annotations

import torch
from torch import nn

from featherlm.model.layers import linear
from featherlm.peft.base import AdaptedLinear, PeftConfig, matches


class BiasLinear(AdaptedLinear):
    """A bias-free Linear given a trainable bias, starting at zero."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__(base)
        self.adapter_bias = self.new_param(torch.zeros(self.out_features))  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.adapter_bias)

    def merged_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.weight, self.adapter_bias  # a new bias: merged() works, merge_() in place cannot


def apply(model: nn.Module, config: PeftConfig, init_ids: list[int] | None = None) -> None:
    for name, p in model.named_parameters():
        if name == "bias" or name.endswith(".bias"):
            p.requires_grad_(True)
    for name, module in list(model.named_modules()):
        if name and matches(name, config.target_modules) and isinstance(module, nn.Linear) and module.bias is None:
            model.set_submodule(name, BiasLinear(module))
