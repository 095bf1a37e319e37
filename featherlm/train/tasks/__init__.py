"""Fine-tuning tasks, one file each behind the ``Task`` interface of ``base.py``.

``model.task`` in a fine-tuning config names one of ``TASKS``; adding a task is one file and one
line here.
"""

from __future__ import annotations

from featherlm.errors import ConfigError
from featherlm.train.tasks.base import Task, TaskData, autocast, evaluating
from featherlm.train.tasks.classification import ClassificationTask
from featherlm.train.tasks.language import LmTask, SftTask
from featherlm.train.tasks.ner import NerTask
from featherlm.train.tasks.qa import QaTask
from featherlm.train.tasks.seq2seq import SummarizationTask, TranslationTask

TASKS: dict[str, Task] = {
    "classification": ClassificationTask(),
    "sft": SftTask(),
    "lm": LmTask(),
    "ner": NerTask(),
    "qa": QaTask(),
    "translation": TranslationTask(),
    "summarization": SummarizationTask(),
}


def get_task(name: str) -> Task:
    """The task registered as ``name``; ConfigError listing the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}") from None


__all__ = ["TASKS", "Task", "TaskData", "autocast", "evaluating", "get_task"]
