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


class AdapterDropout(nn.Module):
    """Dropout of the adapter's input as a 0/1 ``mask(x)``: the caller multiplies x by it and folds the
    rescaling ``scale`` = 1 / (1 - p) into its small adapter weights instead of a pass over x.

    The same distribution as ``nn.Dropout``: each element kept independently with probability 1 - p
    (to 2^-32; torch's CPU bernoulli_ uses 24 bits), every layer its own mask. Each 64-bit random
    draw gives two elements' 32-bit uniforms, which halves the random number generation that
    dominates dropout's cost on a CPU.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p, self.scale = p, 1.0 / (1.0 - p)
        self.threshold = round(p * 2**32) - 2**31  # int32 uniforms at or above it: kept

    def mask(self, x: torch.Tensor) -> torch.Tensor | None:  # (..., in) 0/1 in x's dtype; None: keep all
        if not self.training or self.p == 0:
            return None
        n = x.numel()
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 1) // 2,), dtype=torch.int64, device=x.device)
        return (words.view(torch.int32)[:n].view(x.shape) >= self.threshold).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LoRAMatmul(torch.autograd.Function):
    """y = x W^T + b + ((x * keep) A^T) U for x (N, in), keep (N, in) 0/1 or None, U = s B^T (r, out).

    The forward is what autograd would run; the backward is written out so that the input's gradient
    g W + ((g U^T) A) * keep is summed inside the matmul (no separate add pass or buffer), and the
    adapter's gradients are computed in the layouts a CPU matmul streams fastest (h^T g, not g^T h).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, U, keep):
        x_drop = x if keep is None else x * keep  # (N, in)
        h = x_drop @ A.t()  # (N, r)
        y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())  # (N, out)
        y.addmm_(h, U)  # + h U, inside the matmul
        ctx.save_for_backward(x if weight.requires_grad else None, weight, A, U, x_drop, h, keep)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # (N, out)
        x, weight, A, U, x_drop, h, keep = ctx.saved_tensors
        need_x, need_w, need_b, need_A, need_U, _ = ctx.needs_input_grad
        gh = g @ U.t()  # (N, r)
        grad_x = None
        if need_x:
            grad_x = gh @ A  # (N, in): the adapter's path, through the dropout mask
            if keep is not None:
                grad_x.mul_(keep)
            grad_x.addmm_(g, weight)  # + g W, the base path
        return (grad_x, g.t() @ x if need_w else None, g.sum(0) if need_b else None,
                gh.t() @ x_drop if need_A else None, h.t() @ g if need_U else None, None)


class LoRALinear(AdaptedLinear):
    """A Linear plus a low-rank update; with ``dora`` also a learned magnitude per output row."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False) -> None:
        super().__init__(base)
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.adapter_A = self.new_param(torch.empty(r, self.in_features))  # (r, in)
        nn.init.kaiming_uniform_(self.adapter_A, a=math.sqrt(5))  # as nn.Linear and HF PEFT
        self.adapter_B = self.new_param(torch.zeros(self.out_features, r))  # (out, r): zero, so no change at first
        self.dropout = AdapterDropout(dropout)
        self.register_parameter("adapter_magnitude", None)
        if dora:  # ||W|| per output row: W' == W at the start
            self.adapter_magnitude = self.new_param(self.weight.detach().norm(dim=1))  # (out,)

    def delta(self) -> torch.Tensor:
        """The weight update s * B A, (out, in)."""
        return (self.adapter_B @ self.adapter_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self.is_merged:
            return linear(x, self.weight, self.bias)
        keep = self.dropout.mask(x)  # (..., in) 0/1, None when nothing is dropped
        s = self.scaling * (1.0 if keep is None else self.dropout.scale)  # dropout's 1 / (1 - p) folded in
        if self.adapter_magnitude is None:  # LoRA: x W^T + b + s (x * keep) A^T B^T
            x2 = x.reshape(-1, self.in_features)  # (N, in)
            keep2 = None if keep is None else keep.reshape(-1, self.in_features)
            # s B^T (r, out): the scale goes onto the small B, not onto an (N, out) product
            update = (self.adapter_B * s).t().contiguous()
            if x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(x.device.type):
                y = LoRAMatmul.apply(x2, self.weight, self.bias, self.adapter_A, update, keep2)
            else:  # bf16 / autocast: autograd's ops, with linear()'s CPU bf16 handling
                y = linear(x2, self.weight, self.bias)
                h = linear(x2 if keep2 is None else x2 * keep2, self.adapter_A)  # (N, r)
                y = y.addmm_(h, update.to(h.dtype))  # y is 2-D, not a view: no CopySlices in backward
            return y.view(*x.shape[:-1], self.out_features)
        x_drop = x if keep is None else x * keep
        lora = linear(linear(x_drop, self.adapter_A), self.adapter_B) * s  # s x A^T B^T
        # DoRA: (m / ||W + sBA||) * (x W^T + s x A^T B^T), bias added last.
        # The norm is treated as a constant in backward (DoRA paper sec. 4.3, as HF PEFT does): it
        # saves memory and barely changes the gradient.
        base = linear(x, self.weight)
        with torch.no_grad():
            norm = (self.weight + self.delta()).norm(dim=1)  # (out,)
        scale = self.adapter_magnitude / norm  # (out,)
        # HF PEFT's form, equal to scale * (base + lora) without dropout; with dropout only the
        # adapter's part (including the magnitude's change of the base) sees the dropped-out input.
        base_drop = base if keep is None else linear(x_drop, self.weight) * self.dropout.scale
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
