"""LoRA's fast path: its own dropout (cheaper random numbers, same distribution) and the update added
inside the base matmul (scale folded into B) compute what the textbook formula computes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from featherlm.peft.lora import AdapterDropout, LoRALinear


def lora_layer(dropout: float, seed: int = 0) -> LoRALinear:
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(16, 24).requires_grad_(False), r=4, alpha=8, dropout=dropout)  # base frozen
    with torch.no_grad():
        layer.adapter_B.normal_()  # a non-zero update, so the adapter's part shows in the output
    return layer


def test_dropout_keeps_each_element_with_probability_1_minus_p():
    drop = AdapterDropout(0.05).train()
    x = torch.ones(1000, 1000)
    torch.manual_seed(0)
    keep = drop.mask(x)
    assert drop.scale == 1 / 0.95
    assert keep.dtype == x.dtype and set(keep.unique().tolist()) == {0.0, 1.0}
    kept = keep.mean().item()
    assert abs(kept - 0.95) < 5 * math.sqrt(0.95 * 0.05 / x.numel())  # 5 standard deviations
    # independent elements: rows and columns keep the same share, and a second call draws a new mask
    assert abs(keep.mean(0) - 0.95).max() < 0.04 and abs(keep.mean(1) - 0.95).max() < 0.04
    again = drop.mask(x)
    assert abs((keep != again).float().mean().item() - 2 * 0.95 * 0.05) < 0.005
    drop.eval()
    assert drop.mask(x) is None
    assert AdapterDropout(0.0).train().mask(x) is None


def test_dropout_threshold_is_exact_for_edge_probabilities():
    for p in (0.0001, 0.5, 0.9):
        drop = AdapterDropout(p).train()
        torch.manual_seed(1)
        kept = drop.mask(torch.ones(2_000_000)).mean().item()
        assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / 2_000_000)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])  # the hand-written backward; autograd's ops
def test_fast_forward_and_gradients_equal_the_formula(dtype, bias):
    """y = x W^T + b + s (dropout(x) A^T) B^T, with dropout(x) = x * mask / (1 - p); gradients for x, A,
    B, and for W and b too when they train."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 24, bias=bias), r=4, alpha=8, dropout=0.2).to(dtype).train()
    with torch.no_grad():
        layer.adapter_B.normal_()
    layer.weight.requires_grad_(True)
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    params = [x, layer.weight, layer.adapter_A, layer.adapter_B] + ([layer.bias] if bias else [])
    torch.manual_seed(7)
    y = layer(x)
    fast = torch.autograd.grad(y.float().square().sum(), params)

    torch.manual_seed(7)  # the same mask
    keep = layer.dropout.mask(x)
    assert 0 < keep.float().mean() < 1
    b = layer.bias if bias else 0
    x_drop = x * keep * layer.dropout.scale
    expected = x @ layer.weight.T + b + layer.scaling * (x_drop @ layer.adapter_A.T) @ layer.adapter_B.T
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(y, expected, **tol)
    for got, want in zip(fast, torch.autograd.grad(expected.float().square().sum(), params), strict=True):
        scale = want.abs().max().item()
        torch.testing.assert_close(got / scale, want / scale, **tol)


def test_input_without_gradient():
    """The first layer's input (frozen embeddings) needs no gradient: none is computed, adapters still learn."""
    layer = lora_layer(dropout=0.1).train()
    y = layer(torch.randn(6, 16))
    y.sum().backward()
    assert layer.adapter_A.grad is not None and layer.adapter_B.grad is not None
    assert layer.weight.grad is None and layer.bias.grad is None


def test_every_layer_draws_its_own_mask():
    """q, k and v read the same input: their dropout masks must still be independent, as in HF PEFT."""
    a, b = lora_layer(0.5), lora_layer(0.5)
    x = torch.ones(64, 16)
    torch.manual_seed(3)
    assert (a.dropout.mask(x) != b.dropout.mask(x)).any()


def test_eval_and_bf16_autocast():
    layer = lora_layer(dropout=0.1).eval()
    x = torch.randn(4, 16)
    expected = x @ layer.weight.T + layer.bias + layer.scaling * (x @ layer.adapter_A.T) @ layer.adapter_B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
