"""The fine-tuning configuration: nested dataclasses that a YAML file mirrors section by section.

Loading is strict (``featherlm.config.from_dict``): an unknown key is a ``ConfigError`` naming the
closest valid one, and values are coerced by annotation, so YAML's ``lr: 5e-4`` (a string to
PyYAML) and the CLI's ``--train.lr 5e-4`` both become floats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from featherlm.config import from_dict
from featherlm.errors import ConfigError
from featherlm.peft import PeftConfig

SCRATCH = "scratch:"  # model.name prefix of a new, randomly initialised model


@dataclass
class ModelSection:
    name: str = ""  # embedded name, HF/featherlm folder, .gguf file or hub id (as featherlm.load)
    task: str = "classification"  # a name in featherlm.train.tasks.TASKS: classification, sft, lm, ...
    pooling: Literal["auto", "pooler", "cls", "mean", "last"] = "auto"  # classification (see model/heads.py)
    dropout: float = 0.1  # before the classifier
    labels: list[str] = field(default_factory=list)  # label names in id order; empty: those of the train data
    # ner: a learned embedding of each word's casing (lower, Title, ALL CAPS...) read before an uncased
    # tokenizer lower-cases it. Off by default so runs saved before the option existed load as they were
    case_features: bool = False
    # a new, randomly initialised model: name "scratch:FAMILY" (t5, llama, gpt2, bert), trained with peft.method full
    tokenizer: str = ""  # scratch models: a tokenizer folder, or a model (name, folder, .gguf) whose tokenizer to use
    size: str = "tiny"  # scratch models: featherlm.checkpoint.SCRATCH_SIZES (tiny, mini, small, base)
    overrides: dict = field(default_factory=dict)  # scratch models: ModelConfig fields over the size (n_layer: 4)


@dataclass
class DataSection:
    train: str = ""  # a path, relative to the working directory
    eval: str = ""  # optional; early stopping and the best checkpoint need it
    format: Literal["auto", "tsv", "csv", "jsonl", "txt"] = "auto"  # auto: from the file name
    text_column: str | None = None  # None: "sentence" or "text"
    label_column: str | None = None  # None: "label"
    max_train_examples: int = 0  # > 0: a seeded random subset of the training data (time budgets)
    max_eval_examples: int = 0
    eval_ratio: float = 0.0  # > 0 and no data.eval: hold out this seeded share of the training file instead
    skip_bad_rows: bool = False  # count and report malformed rows instead of stopping at the first
    bucket_by_length: bool = False  # batches of similar lengths: less padding, faster on CPU
    # ner / qa
    tag_scheme: Literal["auto", "iob1", "iob2", "bioes"] = "auto"  # ner: the files' tags (read into IOB2)
    label_all_subwords: bool = False  # ner: label every subword of a word, not only its first
    doc_stride: int = 128  # qa: tokens two windows of a long context share (transformers' run_qa default)
    max_answer_len: int = 30  # qa: longest answer predicted, in tokens (BERT's SQuAD recipe)
    # qa, SQuAD 2.0 questions without an answer. "null": train them on [CLS] and answer "" when that
    # scores best; "skip": leave them out (train and evaluation); "auto": null when the training
    # file has any, else skip (and the run's config records which)
    unanswerable: Literal["auto", "null", "skip"] = "auto"
    # seq2seq (translation, summarization)
    source_column: int | str | None = None  # a name, or a 0-based index for files without a header (Tatoeba: 0)
    target_column: int | str | None = None  # None: "source"/"target" (or document/summary...), 0/1 without a header
    prompt: str = ""  # "": the task's template; fields {source}, {source_lang}, {target_lang}
    source_lang: str = ""  # language names as the prompt says them ("English"); a Chinese target scores BLEU
    target_lang: str = ""  # with sacrebleu's "zh" tokenizer
    chat_template: bool | None = None  # the prompt as a user turn of the tokenizer's chat template; None: if it has one
    system: str | None = None  # chat template: a system turn before the prompt; None: the template's default
    # tokens generated per example; 0: 1.5x the longest reference + 8 (an untuned model may never stop)
    eval_max_new_tokens: int = 0
    eval_beams: int = 1  # beam search width at evaluation; 1: greedy
    max_eval_generate: int = 200  # examples generated and scored at each evaluation (the first ones); 0: all


@dataclass
class TrainSection:
    lr: float = 5e-4
    epochs: int = 1
    max_steps: int = 0  # > 0: this many optimizer steps, whatever ``epochs`` says
    batch_size: int = 16
    eval_batch_size: int = 0  # 0: twice batch_size (no activations are kept for backward)
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup_ratio: float = 0.06  # share of the steps with a linearly rising lr (BERT/RoBERTa recipes)
    schedule: Literal["linear", "cosine", "constant"] = "linear"  # decay after the warmup
    weight_decay: float = 0.01  # AdamW; never on biases and norm weights
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    max_grad_norm: float = 1.0  # 0 turns clipping off
    eval_every: int = 0  # steps between evaluations (and `last` checkpoints); 0: at each epoch's end
    early_stopping_patience: int = 0  # stop after this many evaluations without improvement; 0: never
    metric: str = "auto"  # one the task reports (accuracy, f1, loss, ...); auto: the task's first
    seed: int = 0
    bf16: bool = False  # bf16 autocast (weights and optimizer stay fp32)
    gradient_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% slower
    max_seq_len: int = 128  # longer examples are cut
    log_every: int = 10  # steps between training-loss lines in metrics.jsonl


@dataclass
class OutSection:
    dir: str = "runs/finetune"
    overwrite: bool = False  # start afresh in a dir that already holds a run (else: error, or resume)
    plot: bool = True  # curves.png (loss and metric against steps)


@dataclass
class FinetuneConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainSection = field(default_factory=TrainSection)
    out: OutSection = field(default_factory=OutSection)

    @property
    def metric(self) -> str:
        """The metric that picks the best checkpoint and drives early stopping."""
        if self.train.metric != "auto":
            return self.train.metric
        return self.task.metrics[0]

    @property
    def higher_is_better(self) -> bool:
        return self.task.higher_is_better(self.metric)

    @property
    def task(self):
        """The ``Task`` named by ``model.task`` (see featherlm/train/tasks)."""
        from featherlm.train.tasks import get_task  # the tasks import this module's types

        return get_task(self.model.task)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> FinetuneConfig:
        """Reject inconsistent values before any work starts; returns self."""
        t = self.train
        task = self.task  # ConfigError for an unknown task name
        problems = [
            (not self.model.name, "model.name is required (a model name, folder or .gguf file)"),
            (not self.data.train, "data.train is required (the training data file)"),
            (t.lr <= 0, f"train.lr must be positive, got {t.lr}"),
            (t.batch_size < 1, f"train.batch_size must be at least 1, got {t.batch_size}"),
            (t.grad_accum < 1, f"train.grad_accum must be at least 1, got {t.grad_accum}"),
            (t.epochs < 1 and t.max_steps < 1, "set train.epochs or train.max_steps to at least 1"),
            (not 0 <= t.warmup_ratio < 1, f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}"),
            (t.max_seq_len < 2, f"train.max_seq_len must be at least 2, got {t.max_seq_len}"),
            (t.eval_every < 0 or t.log_every < 1, "train.eval_every must be >= 0 and train.log_every >= 1"),
            (t.max_grad_norm < 0 or t.weight_decay < 0, "train.max_grad_norm and train.weight_decay must be >= 0"),
            (t.early_stopping_patience > 0 and not (self.data.eval or self.data.eval_ratio),
             "train.early_stopping_patience needs evaluation data (data.eval)"),
            (self.metric not in task.metrics,
             f"train.metric {self.metric!r} is not reported by task {task.name!r} "
             f"(it reports {', '.join(task.metrics)})"),
            (not 0 <= self.model.dropout < 1, f"model.dropout must be in [0, 1), got {self.model.dropout}"),
            (not 0 <= self.data.eval_ratio < 1, f"data.eval_ratio must be in [0, 1), got {self.data.eval_ratio}"),
            (self.data.eval_ratio > 0 and bool(self.data.eval), "set data.eval or data.eval_ratio, not both"),
            *self.scratch_problems(),
            (self.data.eval_beams < 1 or self.data.eval_max_new_tokens < 0 or self.data.max_eval_generate < 0,
             "data.eval_beams must be >= 1, data.eval_max_new_tokens and data.max_eval_generate >= 0"),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(message)
        return self

    def scratch_problems(self) -> list[tuple[bool, str]]:
        """A model from scratch (``model.name: scratch:t5``) needs a tokenizer and trains every weight."""
        m = self.model
        if not m.name.startswith(SCRATCH):
            return [(bool(m.tokenizer or m.overrides),
                     "model.tokenizer and model.overrides are for new models (model.name: scratch:FAMILY); "
                     f"{m.name!r} brings its own")]
        return [(not m.tokenizer, f"model.name {m.name!r} is a new model: set model.tokenizer (a tokenizer folder, "
                                  "or a model whose tokenizer to use, e.g. minilm-l6)"),
                (self.peft.method != "full", f"model.name {m.name!r} starts from random weights: train it with "
                                             f"peft.method full, not {self.peft.method}")]


def parse_overrides(args: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """``["--train.lr", "5e-4", "--peft.r=16", "--data.skip_bad_rows"]`` -> a nested dict.

    Values are read as YAML scalars or lists (``null``, ``[q_proj, v_proj]``, ``true``); a flag
    with no value is ``true``. A mapping of dotted keys (``{"train.lr": 5e-4}``) works too.
    """
    pairs: list[tuple[str, Any]] = []
    if isinstance(args, Mapping):
        pairs = list(args.items())
    else:
        items = list(args)
        i = 0
        while i < len(items):
            item = items[i]
            if not item.startswith("--") or len(item) == 2:
                raise ConfigError(f"expected --section.key, got {item!r}")
            key, eq, value = item[2:].partition("=")
            if not eq:
                if i + 1 < len(items) and not items[i + 1].startswith("--"):
                    value, i = items[i + 1], i + 1
                else:
                    value = "true"
            pairs.append((key, _yaml_value(value)))
            i += 1
    out: dict[str, Any] = {}
    for key, value in pairs:
        set_dotted(out, key, value)
    return out


def _yaml_value(text: str) -> Any:
    if not text.strip():
        return text  # `--data.eval ""` clears a path; YAML would read it as null
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # a string YAML cannot read ("a: b: c") is meant as a string
    if isinstance(value, dict) and value and all(v is None for v in value.values()):
        return text  # "{source}" is a prompt template, not a mapping whose values are all empty
    return value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "train.lr", 1e-3)`` sets ``d["train"]["lr"]``, creating sections as needed."""
    parts = key.replace("-", "_").split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra``'s values put in, section by section (copies; neither input changes)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, peft, train, out)")
    return data


def load_config(source: FinetuneConfig | Mapping[str, Any] | str | Path | None = None,
                overrides: Sequence[str] | Mapping[str, Any] = ()) -> FinetuneConfig:
    """A checked ``FinetuneConfig`` from a YAML path, a dict or a config, with dotted overrides on top."""
    where = "finetune config"
    if isinstance(source, FinetuneConfig):
        data = source.to_dict()
    elif isinstance(source, (str, Path)):
        data, where = read_yaml(source), str(source)
    else:
        data = dict(source or {})
    data = merge(data, parse_overrides(overrides))
    config = from_dict(FinetuneConfig, data, where=where)
    head = [m for m in config.task.head_modules if m not in config.peft.modules_to_save]
    if head and config.peft.method != "full":
        # a new task head starts random: it must train, and be saved with the adapter
        config.peft = dataclasses.replace(config.peft, modules_to_save=[*config.peft.modules_to_save, *head])
    if config.peft.base_model is None:  # recorded in the adapter file (PEFT's base_model_name_or_path)
        config.peft = dataclasses.replace(config.peft, base_model=config.model.name)
    return config.check()


def save_config(config: FinetuneConfig) -> str:
    """The resolved config as YAML text (what the run dir keeps, and what ``load_config`` reads back)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
