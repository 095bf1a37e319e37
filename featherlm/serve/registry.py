"""The models a server holds, by the names requests use: ``base`` or ``base:adapter``.

Models come only from the command line (``--model``, ``--adapter NAME=RUN_DIR``); a request names one
of them and never a path. An adapter run is loaded with ``featherlm.train.load_run`` and, where the
method allows, merged into its own copy of the base weights: a merged model decodes as fast as the
base, and requests for different adapters simply go to different batches (a batch shares weights).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featherlm.errors import ConfigError, FeatherError
from featherlm.model import Transformer

GENERATIVE_TASKS = ("generate", "sft", "lm")  # entries that /v1/completions and /v1/chat/completions serve
# The engine's batch keeps one right-aligned decoder KV cache per model; T5's cross-attention cache and
# per-request source masks do not fit it, and embeddings / the attention view expect one Transformer stack.
SEQ2SEQ_NOT_SERVED = ("encoder-decoder models (T5) cannot be served yet: the server decodes decoder-only models "
                      "and embeds with encoders")


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # the names featherlm.load accepts


@dataclass
class LoadedModel:
    """A served model and its tokenizer, with the attributes of ``featherlm.LoadedModel`` (model, tokenizer,
    name, files, kind, stored_as, config; unpacks as ``model, tokenizer``).

    Defined here because the serving layer sits below the package's public API, which it must not import
    (tests/test_layering.py); ``ModelRegistry.add`` accepts a ``featherlm.LoadedModel`` just as well.
    """

    model: Transformer
    tokenizer: Any
    name: str
    files: list[Path] = field(default_factory=list)
    kind: str = ""
    stored_as: str = ""

    def __iter__(self) -> Iterator:
        return iter((self.model, self.tokenizer))

    @property
    def config(self):
        return self.model.config


def load_model(spec: str, dtype: str = "bfloat16") -> LoadedModel:
    """What ``featherlm.load`` does: an embedded name, folder, .gguf file or hub id -> model + tokenizer."""
    from featherlm.checkpoint import build_model, read_checkpoint
    from featherlm.hub import resolve

    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    checkpoint = read_checkpoint(resolve(spec))
    model = build_model(checkpoint, dtype=DTYPES[dtype]).eval()
    return LoadedModel(model, checkpoint.tokenizer, spec, checkpoint.files, checkpoint.kind, checkpoint.stored_as)


class UnknownModel(KeyError):
    """A request named a model or adapter this server does not hold (the HTTP layer answers 404)."""

    def __init__(self, message: str, param: str = "model") -> None:
        super().__init__(message)
        self.message, self.param = message, param

    def __str__(self) -> str:
        return self.message


@dataclass
class Entry:
    """One servable model.

    ``lm.model`` is always a ``Transformer`` (for task runs: the run's backbone, adapter included), so
    callers can run forward passes, read attentions or next-token logits on any entry. ``head`` is the
    run's whole task model (e.g. a ``SequenceClassifier``) for classification, ner and qa runs.
    """

    name: str
    lm: LoadedModel
    task: str  # "generate" (a base decoder), "embed" (a base encoder), or a run's task: sft, lm, classification...
    base: str | None = None  # the served base model an adapter belongs to
    adapter: str | None = None
    head: nn.Module | None = None
    run_dir: str | None = None
    max_seq_len: int = 0  # task runs: the length the run trained with; embeddings: sentence-transformers' limit
    options: dict = field(default_factory=dict)  # task runs: keyword options of their predict function

    @property
    def generates(self) -> bool:
        return self.task in GENERATIVE_TASKS and self.lm.model.config.causal and self.lm.tokenizer is not None

    def describe(self) -> dict:
        """What /v1/models says about the entry beyond OpenAI's fields."""
        c = self.lm.model.config
        return {"task": self.task, "family": c.family, "decoder": c.causal, "context_length": c.max_seq_len,
                "base": self.base, "adapter": self.adapter}


class ModelRegistry:
    """Name -> model. ``get(name)`` gives the LoadedModel, ``entry(name)`` what else the server knows.

    ``lock`` is a ``threading.Lock`` for callers that want to serialise their own direct forward passes
    (the web UI takes it). The decoding engine does not need it: served models are never modified
    after loading, and PyTorch forward passes on a model in eval mode may run from several threads.
    """

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}  # in the order added: /v1/models lists them so
        self.lock = threading.Lock()

    # ----- lookup
    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def entry(self, name: str) -> Entry:
        """The entry called ``name``; an adapter may also be named alone when no other has its name."""
        if name in self._entries:
            return self._entries[name]
        by_adapter = [e for e in self._entries.values() if e.adapter == name]
        if len(by_adapter) == 1:
            return by_adapter[0]
        base, sep, adapter = name.rpartition(":")
        if sep and base in self._entries:
            have = [e.adapter for e in self._entries.values() if e.base == base]
            raise UnknownModel(f"model {base!r} has no adapter {adapter!r}; its adapters: {', '.join(have) or 'none'}")
        raise UnknownModel(f"the model {name!r} does not exist on this server; models: {', '.join(self.names())}")

    def get(self, name: str) -> LoadedModel:
        """The LoadedModel of ``name`` (raises UnknownModel, a KeyError)."""
        return self.entry(name).lm

    # ----- building
    def add(self, name: str, lm: LoadedModel, *, task: str | None = None, base: str | None = None,
            adapter: str | None = None, head: nn.Module | None = None, run_dir: str | None = None,
            max_seq_len: int = 0, options: dict | None = None) -> Entry:
        if not name or name in self._entries:
            raise ConfigError(f"model name {name!r} is empty or used twice")
        if getattr(lm.model.config, "encoder_decoder", False):
            raise ConfigError(f"{name}: {SEQ2SEQ_NOT_SERVED}; generate with it by `featherlm generate --model "
                              f"{lm.name} --prompt TEXT`")
        if not isinstance(lm.model, Transformer):
            raise ConfigError(f"{name}: the served model must be a featherlm Transformer")
        if task is None:
            task = "generate" if lm.model.config.causal else "embed"
        entry = Entry(name, lm, task, base, adapter, head, run_dir, max_seq_len or _embedding_length(lm),
                      dict(options or {}))
        self._entries[name] = entry
        return entry

    def decoders(self) -> dict[str, LoadedModel]:
        """The entries the generation engine serves."""
        return {e.name: e.lm for e in self._entries.values() if e.generates}

    @classmethod
    def load(cls, models: Sequence[str], adapters: Mapping[str, str] | None = None, *,
             dtype: str = "bfloat16") -> ModelRegistry:
        """Load ``models`` (each ``SPEC`` or ``NAME=SPEC``; SPEC as for ``featherlm.load``) and
        ``adapters`` (NAME -> fine-tuning run directory). An adapter whose base model is served is
        named ``base:NAME``, otherwise ``NAME``."""
        registry = cls()
        specs: dict[str, str] = {}
        for item in models:
            name, spec = split_name(item)
            registry.add(name, load_model(spec, dtype))
            specs[name] = spec
        for name, run_dir in (adapters or {}).items():
            registry.add_run(name, run_dir, specs, dtype=dtype)
        if not registry.names():
            raise ConfigError("no model to serve: give at least one --model or --adapter")
        return registry

    def add_run(self, name: str, run_dir: str | Path, specs: Mapping[str, str], *, dtype: str) -> Entry:
        """Serve a fine-tuning run as adapter ``name`` (see ``load``)."""
        from featherlm.peft import merge
        from featherlm.train import load_run

        if not name or any(c in name for c in ":/= "):
            raise ConfigError(f"adapter name {name!r} must be non-empty, without ':', '/', '=' or spaces")
        model, tokenizer, config = load_run(run_dir)
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        model = merge(model).to(DTYPES[dtype]).eval()
        backbone = model if isinstance(model, Transformer) else getattr(model, "backbone", None)
        if getattr(model, "config", None) is not None and getattr(model.config, "encoder_decoder", False):
            raise ConfigError(f"{run_dir}: this {config.model.task} run is on an encoder-decoder model; "
                              f"{SEQ2SEQ_NOT_SERVED}; generate with it by `featherlm generate --adapter {run_dir} "
                              "--prompt TEXT`")
        if not isinstance(backbone, Transformer):
            raise ConfigError(f"{run_dir}: cannot find the transformer of this {config.model.task} run")
        base = next((b for b, spec in specs.items() if _same_model(spec, config.model.name)), None)
        lm = LoadedModel(backbone, tokenizer, f"{config.model.name} + {run_dir}", kind="run")
        task, length = config.model.task, config.train.max_seq_len
        options = {"max_seq_len": length}  # as `featherlm predict` runs ner and qa runs
        if task == "qa":
            d = config.data
            options.update(doc_stride=d.doc_stride, max_answer_len=d.max_answer_len,
                           allow_null=d.unanswerable == "null")
        return self.add(f"{base}:{name}" if base else name, lm, task=task, base=base, adapter=name,
                        head=None if model is backbone else model, run_dir=str(run_dir), max_seq_len=length,
                        options=options if task in ("ner", "qa") else {})


def split_name(item: str) -> tuple[str, str]:
    """``"NAME=SPEC"`` -> (NAME, SPEC); a plain SPEC is its own name."""
    name, sep, spec = item.partition("=")
    if sep and name and "/" not in name and spec:
        return name, spec
    return item, item


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    from featherlm.hub import resolve

    try:
        return resolve(a).resolve() == resolve(b).resolve()
    except FeatherError:
        return False


def _embedding_length(lm: LoadedModel) -> int:
    """Longest input to embed: sentence-transformers' ``max_seq_length`` where the model folder has its
    config (all-MiniLM-L6-v2: 256, which the reference embeddings use), else the model's context."""
    context = lm.model.config.max_seq_len
    for f in lm.files[:1]:
        path = Path(f).parent / "sentence_bert_config.json"
        try:
            limit = int(json.loads(path.read_text(encoding="utf-8"))["max_seq_length"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return max(1, min(limit, context))
    return context
