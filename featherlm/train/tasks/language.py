"""Language-model tasks on a decoder: instruction / chat tuning (``sft``) and plain text (``lm``).

Both train next-token prediction (the base class's loss); they differ in what they read. SFT masks
the prompt tokens (IGNORE_INDEX), so the loss is on the assistant's replies only.
"""

from __future__ import annotations

from featherlm.data import read_lm, read_sft
from featherlm.train.tasks.base import Task, TaskData


class SftTask(Task):
    name = "sft"

    def read(self, cfg, path, tokenizer, *, skip_bad_rows=False) -> TaskData:
        data = read_sft(path, tokenizer, max_seq_len=cfg.train.max_seq_len, skip_bad_rows=skip_bad_rows)
        return TaskData(data.path, data.examples, data.skipped)


class LmTask(Task):
    name = "lm"

    def read(self, cfg, path, tokenizer, *, skip_bad_rows=False) -> TaskData:
        data = read_lm(path, tokenizer, block_size=cfg.train.max_seq_len, text_column=cfg.data.text_column,
                       format=cfg.data.format, skip_bad_rows=skip_bad_rows)
        return TaskData(data.path, data.examples, data.skipped)
