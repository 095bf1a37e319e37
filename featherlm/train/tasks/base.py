"""The task interface: what a fine-tuning task reads, which model it trains, its loss, its evaluation.

The training loop knows nothing of tasks beyond this interface, so a new task is one file (a
``Task`` subclass) plus one line in the registry of ``featherlm/train/tasks/__init__.py``.

Losses are returned as a *sum* with the number of terms (examples, tags or target tokens), so the
trainer can divide by the count of a whole accumulated step: gradient accumulation then gives the
same update as one big batch, also when micro-batches hold different numbers of tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from featherlm.data import IGNORE_INDEX, batch_order, collate
from featherlm.errors import ConfigError
from featherlm.evaluate.metrics import perplexity

if TYPE_CHECKING:
    from featherlm.train.config import FinetuneConfig

LOWER_IS_BETTER = frozenset({"loss", "perplexity"})


@dataclass
class TaskData:
    """A data file read for a task: the examples batches are made of, and the rows left out.

    ``source`` holds what evaluation needs besides the examples: QA keeps its questions, contexts
    and gold answers there (one question becomes several examples when its context is long).
    """

    path: str
    examples: list[dict[str, Any]]
    skipped: list[tuple[int | None, str]] = field(default_factory=list)
    source: Any = None

    def __len__(self) -> int:
        return len(self.examples)


def autocast(bf16: bool):
    """bf16 autocast on the CPU (the device of every model here); a no-op when off."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


class Task:
    """Base class of the tasks; the defaults are those of causal language modelling.

    ``metrics``: what ``evaluate`` reports that can pick the best checkpoint; the first one is the
    default (``train.metric: auto``). ``head_modules``: modules of a freshly initialised task head,
    which must train and be saved with the adapter whatever the PEFT method.
    """

    name: str = ""
    metrics: tuple[str, ...] = ("loss", "perplexity")
    needs_decoder: bool = True
    head_modules: tuple[str, ...] = ()

    # ---- data
    def read(self, cfg: FinetuneConfig, path: str, tokenizer, *, skip_bad_rows: bool = False) -> TaskData:
        """Read one data file. Called for the training file first: a task may record what it learns
        there in ``cfg`` (classification: the label names), so evaluation data is read against it."""
        raise NotImplementedError

    def subset(self, data: TaskData, limit: int, seed: int) -> TaskData:
        """A seeded random ``limit`` examples (file order kept), or all of them when ``limit`` is 0."""
        if not limit or limit >= len(data.examples):
            return data
        keep = torch.randperm(len(data.examples), generator=torch.Generator().manual_seed(seed))[:limit]
        return TaskData(data.path, [data.examples[i] for i in sorted(keep.tolist())], data.skipped, data.source)

    def split(self, data: TaskData, ratio: float, seed: int) -> tuple[TaskData, TaskData]:
        """(train, held out): a seeded ``ratio`` of the examples held out for evaluation (at least one)."""
        n = len(data.examples)
        k = min(max(1, round(ratio * n)), n - 1)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1)).tolist()
        held = set(order[:k])
        pick = lambda keep: [e for i, e in enumerate(data.examples) if (i in held) == keep]  # noqa: E731
        return (TaskData(data.path, pick(False), data.skipped, data.source),
                TaskData(data.path, pick(True), [], data.source))

    # ---- model
    def build_model(self, backbone: nn.Module, cfg: FinetuneConfig) -> nn.Module:
        """The model to train around ``backbone`` (a Transformer); language modelling trains it as is."""
        if self.needs_decoder and not backbone.config.causal:
            raise ConfigError(f"task {self.name!r} needs a decoder; this model is an encoder "
                              f"({backbone.config.family})")
        return backbone

    # ---- training
    def collate(self, examples: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(examples, pad_id)

    def terms(self, batch: dict[str, torch.Tensor]) -> int:
        """How many loss terms a batch holds (here: predicted tokens)."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(summed loss, number of terms) of one padded batch: next-token cross-entropy."""
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
        targets = batch["labels"][:, 1:]  # (B, T-1)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
        return loss, int((targets != IGNORE_INDEX).sum())

    # ---- evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: TaskData, *, cfg: FinetuneConfig, tokenizer, batch_size: int,
                 pad_id: int, bf16: bool = False) -> dict[str, Any]:
        """``{"loss", "perplexity", "tokens"}`` over ``data`` (a task adds its own metrics)."""
        total, count = 0.0, 0
        with evaluating(model):
            for _, batch in self.batches(data.examples, batch_size, pad_id):
                with autocast(bf16):
                    loss, n = self.loss(model, batch)
                total, count = total + float(loss), count + n
        mean = total / max(count, 1)
        return {"loss": mean, "perplexity": perplexity(mean), "tokens": count}

    def batches(self, examples: Sequence[dict[str, Any]], batch_size: int,
                pad_id: int) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """(indices, batch) over ``examples`` batched by length (little padding), without shuffling."""
        for index in batch_order([len(e["input_ids"]) for e in examples], batch_size, shuffle=False, bucket=True):
            yield index, self.collate([examples[i] for i in index], pad_id)

    def higher_is_better(self, metric: str) -> bool:
        return metric not in LOWER_IS_BETTER


class evaluating:
    """``with evaluating(model):`` eval mode inside, the previous mode restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> nn.Module:
        return self.model.eval()

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)
