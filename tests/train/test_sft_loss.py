"""SftTask.loss runs the LM head on reply positions only: it must equal the base class's loss
(the head over every position, IGNORE_INDEX dropped by cross-entropy) in value and gradients."""

from __future__ import annotations

import pytest
import torch

from featherlm.config import preset
from featherlm.data import IGNORE_INDEX
from featherlm.model import Transformer
from featherlm.peft import PeftConfig, apply
from featherlm.train.tasks.base import Task
from featherlm.train.tasks.language import SftTask


def batch() -> dict[str, torch.Tensor]:
    """Two right-padded rows whose prompts (masked) differ in length; one reply has a masked gap."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 97, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    labels = ids.clone()
    labels[0, :7] = IGNORE_INDEX  # prompt
    labels[1, :3] = IGNORE_INDEX
    labels[1, 5:6] = IGNORE_INDEX  # a second user turn
    labels[1, 9:] = IGNORE_INDEX  # padding
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("family,overrides,method", [
    ("llama", {}, "lora"),
    ("llama", {}, "full"),  # the head's weight trains too
    ("gpt2", {}, "prompt"),  # tied embeddings; virtual tokens ahead of the input
    ("llama", {"tie_embeddings": True, "scale_output": True}, "lora"),
])
def test_reply_only_head_matches_full_head(family, overrides, method):
    torch.manual_seed(0)
    model = Transformer(preset(family, vocab_size=97, max_seq_len=64, **overrides))
    apply(model, PeftConfig(method=method, r=4, num_virtual_tokens=3, target_modules=None))
    for name, p in model.named_parameters():  # LoRA B starts at 0: move it so every path carries gradient
        if "adapter" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.eval()  # no dropout: the two passes must see the same function
    b = batch()
    results = []
    for task in (Task(), SftTask()):
        model.zero_grad(set_to_none=True)
        loss, n = task.loss(model, b)
        (loss / n).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results.append((float(loss.detach()), n, grads))
    (full, n_full, g_full), (reply, n_reply, g_reply) = results
    assert n_full == n_reply == int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert reply == pytest.approx(full, rel=1e-5)
    assert g_full and g_full.keys() == g_reply.keys()
    for k in g_full:
        torch.testing.assert_close(g_reply[k], g_full[k], rtol=1e-4, atol=1e-6, msg=k)
