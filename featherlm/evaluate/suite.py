"""Evaluation suites: several evaluations from one YAML file, one results table.

    featherlm evaluate --suite suite.yaml --out results/

A suite is a YAML list; each entry names a task and what to evaluate::

    - name: smollm2-shakespeare          # optional; default "<task>-<position>"
      task: perplexity
      model: smollm2-135m-instruct       # a model (name, folder, .gguf) ...
      data: ../shared/data/corpus/tinyshakespeare/input.txt
      options: {window: 1024, stride: 512, max_chars: 20000}
    - task: code
      model: smollm2-135m-instruct
      options: {limit: 20, max_new_tokens: 256}
    - task: classification
      adapter: runs/sst2-lora              # ... or a fine-tuning run directory
      data: ../shared/data/sentiment/sst2/dev.tsv

Entries run one after another; after each, ``results.json`` (every result in full) and
``results.md`` (one row per entry, headline metrics) are rewritten atomically in the out folder,
so a crash part-way keeps the finished rows. An entry that fails (a bad data file, say) becomes a
row with its error and the suite goes on; a malformed suite file fails before anything runs, with
the file and line of the bad entry. Paths are relative to the working directory, as in configs.

``EVALUATORS`` maps a task name to a function called as ``fn(model=..., adapter=..., data=...,
options={...}) -> dict`` (model, adapter and data may be None). A function may carry an
``options`` attribute (the option names it accepts, checked before the suite starts) and
``needs_adapter = True``. A task without its own evaluator is still run for an ``adapter``
entry, by ``evaluate_run`` (featherlm.evaluate.evaluate on the run's checkpoint).
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from featherlm.errors import ConfigError, FeatherError
from featherlm.evaluate.seq2seq import evaluate_summarization, evaluate_translation
from featherlm.io import atomic_write_text

Evaluator = Callable[..., dict[str, Any]]
EVALUATORS: dict[str, Evaluator] = {}
ENTRY_KEYS = ("name", "task", "model", "adapter", "data", "options")
HEADLINE = {  # metrics shown in results.md, by task; the JSON keeps everything
    "perplexity": ("perplexity", "bits_per_byte", "tokens"),
    "classification": ("accuracy", "f1", "n"),
    "sft": ("loss", "perplexity", "tokens"),
    "lm": ("loss", "perplexity", "tokens"),
}


def register(task: str, *, options: tuple[str, ...] | None = None, needs_adapter: bool = False):
    """Decorator: ``@register("perplexity", options=(...))`` puts a function in ``EVALUATORS``."""

    def wrap(fn: Evaluator) -> Evaluator:
        if options is not None:
            fn.options = set(options)  # type: ignore[attr-defined]
        fn.needs_adapter = needs_adapter  # type: ignore[attr-defined]
        EVALUATORS[task] = fn
        return fn

    return wrap


# ----------------------------------------------------------------------------- loading models


def load_model(model: str | None, adapter: str | None, dtype: str):
    """(model, tokenizer, label) from a model name/folder/file, or from a fine-tuning run with its
    adapter merged in where the method allows (a plain model runs fastest)."""
    import torch

    from featherlm.checkpoint import build_model, read_checkpoint
    from featherlm.hub import resolve

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(dtypes)}")
    if adapter:
        from featherlm.peft import merge
        from featherlm.train import load_run

        net, tokenizer, config = load_run(adapter)
        if not getattr(getattr(net, "config", None), "causal", False):  # a classifier, tagger or encoder
            raise ConfigError(f"{adapter}: a {config.model.task} run is not a causal language model")
        if model and model != config.model.name:
            raise ConfigError(f"model {model!r} does not match the run in {adapter} ({config.model.name!r})")
        return merge(net).to(dtypes[dtype]).eval(), tokenizer, f"{config.model.name} + {adapter}"
    if not model:
        raise ConfigError("name a model or an adapter (a fine-tuning run directory)")
    checkpoint = read_checkpoint(resolve(model))
    if checkpoint.tokenizer is None:
        raise ConfigError(f"{model}: the model has no tokenizer")
    return build_model(checkpoint, dtype=dtypes[dtype]).eval(), checkpoint.tokenizer, model


def pick(options: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``defaults`` with ``options`` on top; an unknown option is a ConfigError naming the closest."""
    for key in options:
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            raise ConfigError(f"unknown option {key!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                              + f" (options: {', '.join(defaults)})")
    return {**defaults, **options}


# ----------------------------------------------------------------------------- built-in evaluators

PERPLEXITY_OPTIONS = {"window": None, "stride": None, "batch_size": 1, "bf16": False, "dtype": "float32",
                      "max_chars": 0}


@register("perplexity", options=tuple(PERPLEXITY_OPTIONS))
def evaluate_perplexity(*, model: str | None, adapter: str | None, data: str | None,
                        options: Mapping[str, Any]) -> dict[str, Any]:
    """Sliding-window perplexity on a UTF-8 text file (``max_chars`` > 0: its first characters)."""
    from featherlm.evaluate.perplexity import perplexity

    o = pick(options, PERPLEXITY_OPTIONS)
    text = read_text(data, o["max_chars"])
    net, tokenizer, _ = load_model(model, adapter, o["dtype"])
    return {**perplexity(net, tokenizer, text, window=o["window"], stride=o["stride"], batch_size=o["batch_size"],
                         bf16=o["bf16"]), "data": str(data)}


def read_text(path: str | None, max_chars: int = 0) -> str:
    from featherlm.errors import DataError

    if not path:
        raise ConfigError("perplexity needs data: a text file")
    p = Path(path)
    if not p.is_file():
        raise DataError(p, None, "no such file" if not p.exists() else "not a file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(p, line, f"not UTF-8 text ({e.reason})") from None
    return text[:max_chars] if max_chars else text


CODE_OPTIONS = {"n": 1, "k": [1], "temperature": 0.0, "top_p": 0.95, "max_new_tokens": 384, "limit": 0,
                "batch_size": 8, "workers": None, "timeout_s": 10.0, "memory_mb": 1024, "seed": 0, "dtype": "bfloat16",
                "strip_prompt": True, "progress": False}


@register("code", options=tuple(CODE_OPTIONS))
def evaluate_code_task(*, model: str | None, adapter: str | None, data: str | None,
                       options: Mapping[str, Any]) -> dict[str, Any]:
    """HumanEval-style pass@k (default data: HumanEval in the shared data; ``limit``: the first N)."""
    from featherlm.evaluate.code import default_problems_path, evaluate_code, read_problems

    o = pick(options, CODE_OPTIONS)
    path = Path(data) if data else default_problems_path()
    problems = read_problems(path)
    if o["limit"]:
        problems = problems[:o["limit"]]
    net, tokenizer, _ = load_model(model, adapter, o["dtype"])
    k = o["k"] if isinstance(o["k"], (list, tuple)) else [o["k"]]
    result = evaluate_code(net, tokenizer, problems, n=o["n"], k=k, temperature=o["temperature"], top_p=o["top_p"],
                           max_new_tokens=o["max_new_tokens"], batch_size=o["batch_size"], workers=o["workers"],
                           timeout_s=o["timeout_s"], memory_mb=o["memory_mb"], seed=o["seed"],
                           strip_prompt=o["strip_prompt"], progress=o["progress"])
    return {**result, "data": str(path)}


RUN_OPTIONS = {"checkpoint": "best", "batch_size": None, "skip_bad_rows": False}


def evaluate_run(*, model: str | None, adapter: str | None, data: str | None, options: Mapping[str, Any],
                 task: str | None = None) -> dict[str, Any]:
    """A fine-tuning run's checkpoint on ``data`` (default: the run's eval data), through
    ``featherlm.evaluate.evaluate``; ``task`` and ``model``, when given, must be the run's."""
    from featherlm.evaluate import evaluate
    from featherlm.train import load_config

    if not adapter:
        raise ConfigError("this task evaluates a fine-tuning run: name it as adapter")
    o = pick(options, RUN_OPTIONS)
    config_path = Path(adapter) / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{adapter}: not a fine-tuning run folder (no config.yaml)")
    config = load_config(config_path)
    for what, given, expected in (("task", task, config.model.task), ("model", model, config.model.name)):
        if given and given != expected:
            raise ConfigError(f"{what} {given!r} does not match the run in {adapter} ({expected!r})")
    return evaluate(adapter, data, checkpoint=o["checkpoint"], batch_size=o["batch_size"],
                    skip_bad_rows=o["skip_bad_rows"])


evaluate_run.options = set(RUN_OPTIONS)  # type: ignore[attr-defined]
evaluate_run.needs_adapter = True  # type: ignore[attr-defined]
for _task in ("classification", "sft", "lm"):
    EVALUATORS[_task] = evaluate_run
EVALUATORS["translation"] = evaluate_translation  # BLEU/chrF of a model or a run (featherlm/evaluate/seq2seq.py)
EVALUATORS["summarization"] = evaluate_summarization  # ROUGE-1/2/L of a model or a run


# ----------------------------------------------------------------------------- the suite


def read_suite(path: str | Path) -> list[dict[str, Any]]:
    """The checked entries of a suite file, each with its ``line``; a bad entry is a ConfigError
    with the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: suite file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path}: a suite is a non-empty YAML list of evaluations "
                          "({name, task, model or adapter, data, options})")
    entries, names = [], {}
    for i, (item, node) in enumerate(zip(data, root.value, strict=True)):
        where = f"{path}:{node.start_mark.line + 1}"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: an evaluation is a mapping with {', '.join(ENTRY_KEYS)}")
        for key in item:
            if key not in ENTRY_KEYS:
                close = difflib.get_close_matches(str(key), ENTRY_KEYS, n=1)
                raise ConfigError(f"{where}: unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
        task = item.get("task")
        if not isinstance(task, str) or not task:
            raise ConfigError(f"{where}: 'task' is required ({', '.join(sorted(EVALUATORS))}, or any fine-tuning "
                              "task with an adapter)")
        fn = EVALUATORS.get(task) or (evaluate_run if item.get("adapter") else None)
        if fn is None:
            raise ConfigError(f"{where}: unknown task {task!r} for a model; known: {', '.join(sorted(EVALUATORS))} "
                              "(other fine-tuning tasks need an adapter)")
        if not item.get("model") and not item.get("adapter"):
            raise ConfigError(f"{where}: name a model or an adapter to evaluate")
        if getattr(fn, "needs_adapter", False) and not item.get("adapter"):
            raise ConfigError(f"{where}: task {task!r} evaluates a fine-tuning run: give its folder as adapter")
        options = item.get("options") or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{where}: options must be a mapping")
        try:
            if getattr(fn, "options", None) is not None:
                pick(options, dict.fromkeys(fn.options))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        for key in ("name", "model", "adapter", "data"):
            if item.get(key) is not None and not isinstance(item[key], (str, int, float)):
                raise ConfigError(f"{where}: {key} must be a string")
        name = str(item.get("name") or f"{task}-{i + 1}")
        if name in names:
            raise ConfigError(f"{where}: name {name!r} is used twice (line {names[name]})")
        names[name] = node.start_mark.line + 1
        entries.append({"name": name, "task": task, "model": _str(item.get("model")),
                        "adapter": _str(item.get("adapter")), "data": _str(item.get("data")), "options": options,
                        "line": node.start_mark.line + 1})
    return entries


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def run_suite(path: str | Path, out: str | Path | None, *, progress: bool = False) -> dict[str, Any]:
    """Run every evaluation of the suite file ``path``; write ``results.json`` and ``results.md``
    to ``out`` (None: write nothing). Returns ``{"rows": [...], "markdown": str, "out": ...}``;
    each row holds the entry, ``status`` ("ok" or "error"), ``metrics`` (the evaluator's result,
    or None), ``error`` and ``time_s``."""
    import sys

    entries = read_suite(path)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"{out}: exists and is not a folder")
    rows: list[dict[str, Any]] = []
    for entry in entries:
        fn = EVALUATORS.get(entry["task"]) or evaluate_run
        kwargs = {"task": entry["task"]} if fn is evaluate_run else {}
        if progress:
            print(f"[{len(rows) + 1}/{len(entries)}] {entry['name']} ({entry['task']})", file=sys.stderr)
        started = time.perf_counter()
        row = {k: entry[k] for k in ("name", "task", "model", "adapter", "data", "options")}
        try:
            metrics = fn(model=entry["model"], adapter=entry["adapter"], data=entry["data"],
                         options=dict(entry["options"]), **kwargs)
            row.update(status="ok", metrics=metrics, error=None)
        except FeatherError as e:  # a user mistake in one entry: report it, run the others
            row.update(status="error", metrics=None, error=" ".join(str(e).splitlines()))
        row["time_s"] = round(time.perf_counter() - started, 3)
        rows.append(row)
        if out is not None:
            write_results(out, rows, entries)
    return {"rows": rows, "markdown": markdown(rows), "out": None if out is None else str(out)}


def headline(task: str, metrics: Mapping[str, Any] | None) -> str:
    if not metrics:
        return ""
    if task == "code":
        keys = [k for k in metrics if k.startswith("pass@")] + ["problems"]
    else:  # other tasks without a list: the first few numbers of the result
        keys = HEADLINE.get(task) or [k for k, v in metrics.items() if isinstance(v, (int, float))
                                      and not isinstance(v, bool) and k != "time_s"][:6]
    parts = []
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        elif isinstance(value, int) and not isinstance(value, bool):
            parts.append(f"{key} {value}")
    return ", ".join(parts)


def _cell(value: Any) -> str:
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# Evaluation results", "", "| name | task | model | data | result | time |", "|---|---|---|---|---|---|"]
    for row in rows:
        what = row["model"] if not row["adapter"] else f"{row['adapter']} (run)"
        result = headline(row["task"], row["metrics"]) if row["status"] == "ok" else f"error: {row['error']}"
        lines.append(f"| {_cell(row['name'])} | {_cell(row['task'])} | {_cell(what)} | {_cell(row['data'])} | "
                     f"{_cell(result)} | {row['time_s']:.1f} s |")
    return "\n".join(lines) + "\n"


def write_results(out: str | Path, rows: list[dict[str, Any]], entries: list[dict[str, Any]]) -> None:
    out = Path(out)
    payload = {"rows": rows, "pending": [e["name"] for e in entries[len(rows):]]}
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")
    atomic_write_text(out / "results.md", markdown(rows))


__all__ = ["EVALUATORS", "register", "run_suite", "read_suite", "evaluate_run", "evaluate_perplexity",
           "evaluate_code_task", "load_model", "markdown"]
