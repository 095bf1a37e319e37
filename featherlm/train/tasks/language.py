"""Language-model tasks on a decoder: instruction / chat tuning (``sft``) and plain text (``lm``).

Both train next-token prediction (the base class's loss); they differ in what they read. SFT masks
the prompt tokens (IGNORE_INDEX), so the loss is on the assistant's replies only, and the LM head
is applied to the positions that predict a reply token only (see ``SftTask.loss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featherlm.data import IGNORE_INDEX, read_lm, read_sft
from featherlm.model import Transformer
from featherlm.model.layers import linear
from featherlm.train.tasks.base import Task, TaskData


class SftTask(Task):
    name = "sft"

    def read(self, cfg, path, tokenizer, *, skip_bad_rows=False) -> TaskData:
        data = read_sft(path, tokenizer, max_seq_len=cfg.train.max_seq_len, skip_bad_rows=skip_bad_rows)
        return TaskData(data.path, data.examples, data.skipped)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """The base class's loss, with the LM head run on reply positions only.

        Prompts are most of an SFT batch's tokens (a chat template's system prompt alone is ~30),
        and the head is a (V, C) matmul plus an fp32 softmax over V per position (V = 49k for
        SmolLM2): computing it where the target is IGNORE_INDEX is wasted. Same value and
        gradients as ``Task.loss`` (tests/train/test_sft_loss.py).
        """
        if not isinstance(model, Transformer) or not model.config.causal:
            return super().loss(model, batch)
        ids = batch["input_ids"]
        targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
        keep = targets != IGNORE_INDEX  # (B, T-1)
        out = model(ids, attention_mask=batch["attention_mask"], logits_from=ids.shape[1])  # hidden only
        h = out.hidden[:, :-1][keep]  # (N, C): the positions that predict a reply token
        if model.config.scale_output:  # as Transformer.forward does before its head
            h = h * model.config.d_model**-0.5
        logits = linear(h, model.output_weight)  # (N, V)
        loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return loss, int(keep.sum())


class LmTask(Task):
    name = "lm"

    def read(self, cfg, path, tokenizer, *, skip_bad_rows=False) -> TaskData:
        data = read_lm(path, tokenizer, block_size=cfg.train.max_seq_len, text_column=cfg.data.text_column,
                       format=cfg.data.format, skip_bad_rows=skip_bad_rows)
        return TaskData(data.path, data.examples, data.skipped)
