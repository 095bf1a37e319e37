"""Training on a padded batch runs only its real tokens (``Unpadded``): the loss and every gradient
are those of the padded computation, for encoders and decoders, LoRA and prompt-style methods,
with and without gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import featherlm.model.transformer as transformer
from featherlm import peft
from featherlm.model.heads import ClassifierConfig, SequenceClassifier
from featherlm.model.layers import Unpadded
from featherlm.peft import PeftConfig
from featherlm.train.trainer import enable_gradient_checkpointing

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def padded_batch(family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Four rows of 3..12 tokens: right padding for encoders, left padding for decoders."""
    lengths = [12, 3, 7, 5]
    ids = torch.zeros(4, 12, dtype=torch.long)
    mask = torch.zeros(4, 12, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    for i, n in enumerate(lengths):
        span = slice(0, n) if family == "bert" else slice(12 - n, 12)
        ids[i, span] = torch.randint(1, 97, (n,), generator=gen)
        mask[i, span] = 1
    return ids, mask


def build(tiny_model, family: str, method: str):
    torch.manual_seed(0)
    backbone = tiny_model(family)
    if family == "bert":
        model = SequenceClassifier(backbone, ClassifierConfig(["neg", "pos"], "mean", dropout=0.0))
        save = ["classifier"]
    else:
        model, save = backbone, []
    targets = [t for t in TARGETS if any(n.endswith(t) for n, _ in model.named_modules())]
    peft.apply(model, PeftConfig(method=method, r=4, target_modules=targets, modules_to_save=save,
                                 num_virtual_tokens=2))
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero adapters, so that they shape the loss and its gradients
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model


def loss_and_grads(model, family: str, ids, mask) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    if family == "bert":
        loss = F.cross_entropy(model(ids, mask), torch.tensor([0, 1, 1, 0]))
    else:
        logits = model(ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
        real = (mask[:, :-1] * mask[:, 1:]).bool()  # real tokens predicting real tokens
        targets = ids[:, 1:].masked_fill(~real, -100)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_unpadded_training_equals_padded(tiny_model, monkeypatch, family, method, checkpointing):
    model = build(tiny_model, family, method).train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    ids, mask = padded_batch(family)
    calls = []
    monkeypatch.setattr(transformer, "Unpadded", lambda m: calls.append(m) or Unpadded(m))
    monkeypatch.setattr(transformer, "UNPAD_MIN_PADDING", 2.0)  # never: the padded computation
    loss, grads = loss_and_grads(model, family, ids, mask)
    assert not calls
    monkeypatch.setattr(transformer, "UNPAD_MIN_PADDING", 0.1)  # this batch is 42% padding
    got_loss, got_grads = loss_and_grads(model, family, ids, mask)
    assert len(calls) == 1
    torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_unpadded_hidden_states_are_zero_at_padding(tiny_model):
    model = tiny_model("bert").eval()
    ids, mask = padded_batch("bert")
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    assert (out.hidden[mask == 0] == 0).all()
    assert (out.hidden[mask == 1] != 0).any()


def test_a_full_batch_is_not_unpadded(tiny_model, monkeypatch):
    model = tiny_model("bert").eval()
    monkeypatch.setattr(transformer, "Unpadded", lambda m: pytest.fail("unpadded a batch without padding"))
    ids = torch.randint(1, 97, (2, 6))
    model(ids, attention_mask=torch.ones_like(ids))
