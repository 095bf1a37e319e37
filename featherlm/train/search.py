"""Hyper-parameter search: many fine-tuning runs of one config, a table of trials, the best config.

    featherlm search --config examples/sst2-lora.yaml --space space.yaml --trials 8 --sampler bayes --out runs/search

The space is a YAML mapping of dotted config keys to distributions::

    train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
    peft.r: {type: choice, values: [4, 8, 16]}        # or just: peft.r: [4, 8, 16]
    train.batch_size: {type: int, low: 8, high: 32, step: 8}
    peft.dropout: {type: uniform, low: 0.0, high: 0.2}

Samplers: ``grid`` (every combination, in order: choices and int ranges as they are, float ranges
need ``steps: N`` points, log-spaced for loguniform), ``random`` and ``bayes`` (optuna's random
and TPE samplers, seeded: the same seed and data give the same trials). Each trial is one
``finetune`` run in ``out/trial-NNN``; its value is the run's best evaluation of the config's
metric (``train.metric``: accuracy for classification, loss for language modelling...).

``folds=k`` (k-fold cross-validation, for small datasets): the training file's examples are split
into k folds by a seeded shuffle (the same folds for every trial); each trial trains k times, on
k-1 folds, evaluating on the one left out, and its value is the mean over folds. Fold files are
written in the input's own format (TSV/CSV with the header, JSONL and text lines, CoNLL sentence
blocks for ner, SQuAD JSON paragraphs for qa) to ``trial-NNN/fold-F/`` beside that fold's run.

After every trial ``trials.jsonl`` (one object per trial), ``trials.md`` (a table) and
``best.yaml`` (the best config so far: the base config with the best values, training on the full
training file, ``out.dir`` = ``out/best``; ``featherlm finetune --config out/best.yaml`` trains
it) are rewritten atomically, so an interrupted search keeps what it found.
"""

from __future__ import annotations

import csv
import difflib
import io
import itertools
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from featherlm.data.tasks import detect_format
from featherlm.errors import ConfigError, DataError, FeatherError
from featherlm.io import atomic_write_text
from featherlm.train.config import FinetuneConfig, load_config, merge, parse_overrides, read_yaml, save_config
from featherlm.train.trainer import finetune

SAMPLERS = ("grid", "random", "bayes")
TYPES = ("choice", "uniform", "loguniform", "int")
SPEC_KEYS = {"choice": {"type", "values"}, "uniform": {"type", "low", "high", "steps"},
             "loguniform": {"type", "low", "high", "steps"}, "int": {"type", "low", "high", "step"}}
RESERVED = ("out.", "data.train", "data.eval")  # set by the search itself


@dataclass
class Param:
    """One searched config key and its distribution."""

    name: str
    type: str
    values: list[Any] = field(default_factory=list)
    low: float = 0.0
    high: float = 0.0
    step: int = 1
    steps: int = 0
    where: str = "search space"  # file:line of its entry, for messages

    def grid(self) -> list[Any]:
        """The points a grid search tries."""
        if self.type == "choice":
            return list(self.values)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, self.step))
        if self.steps < 2:
            raise ConfigError(f"grid search over {self.name}: a {self.type} range needs steps: N (N >= 2 points), "
                              "or use type: choice")
        if self.type == "loguniform":
            a, b = math.log(self.low), math.log(self.high)
            return [float(math.exp(a + (b - a) * i / (self.steps - 1))) for i in range(self.steps)]
        return [self.low + (self.high - self.low) * i / (self.steps - 1) for i in range(self.steps)]

    def suggest(self, trial) -> Any:
        """Draw a value through an optuna trial (random or TPE sampler)."""
        if self.type == "choice":
            return trial.suggest_categorical(self.name, self.values)
        if self.type == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=self.step)
        return trial.suggest_float(self.name, self.low, self.high, log=self.type == "loguniform")

    def example(self) -> Any:
        return self.values[0] if self.type == "choice" else (int(self.low) if self.type == "int" else self.low)


def read_space(space: Mapping[str, Any] | str | Path) -> list[Param]:
    """The search space from a dict or a YAML file; a bad entry is a ConfigError with its line."""
    lines: dict[str, int] = {}
    where = "search space"
    if isinstance(space, (str, Path)):
        where = str(space)
        data = read_yaml(space)
        root = yaml.compose(Path(space).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
        lines = {k.value: k.start_mark.line + 1 for k, _ in root.value}
    else:
        data = dict(space)
    if not data:
        raise ConfigError(f"{where}: the search space is empty")
    params = []
    for name, spec in data.items():
        at = f"{where}:{lines[name]}" if name in lines else where
        if not isinstance(name, str) or "." not in name:
            raise ConfigError(f"{at}: {name!r} is not a dotted config key (such as train.lr)")
        if name.startswith(RESERVED):
            raise ConfigError(f"{at}: {name} is set by the search itself and cannot be searched")
        if isinstance(spec, list):
            spec = {"type": "choice", "values": spec}
        if not isinstance(spec, dict) or spec.get("type") not in TYPES:
            raise ConfigError(f"{at}: {name} needs a mapping with type: {' | '.join(TYPES)} (or a list of choices)")
        kind = spec["type"]
        for key in spec:
            if key not in SPEC_KEYS[kind]:
                close = difflib.get_close_matches(str(key), sorted(SPEC_KEYS[kind]), n=1)
                raise ConfigError(f"{at}: {name}: unknown key {key!r} for type {kind}"
                                  + (f"; did you mean {close[0]!r}?" if close else ""))
        try:
            param = _param(name, kind, spec)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{at}: {name}: {e}") from None
        param.where = at
        params.append(param)
    return params


def _param(name: str, kind: str, spec: dict[str, Any]) -> Param:
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ValueError("choice needs a non-empty list of values")
        return Param(name, kind, values=values)
    if "low" not in spec or "high" not in spec:
        raise ValueError(f"{kind} needs low and high")
    if kind == "int":
        low, high, step = spec["low"], spec["high"], spec.get("step", 1)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high, step)) or step < 1:
            raise ValueError("int needs integer low, high and step >= 1")
        if low > high:
            raise ValueError(f"low {low} is above high {high}")
        return Param(name, kind, low=low, high=high, step=step)
    low, high = float(spec["low"]), float(spec["high"])  # YAML reads 1e-4 as a string: float() takes it
    steps = spec.get("steps", 0)
    if not isinstance(steps, int) or steps < 0:
        raise ValueError("steps must be a whole number")
    if not low < high:
        raise ValueError(f"low {low} must be below high {high}")
    if kind == "loguniform" and low <= 0:
        raise ValueError("loguniform needs low > 0")
    return Param(name, kind, low=low, high=high, steps=steps)


# ----------------------------------------------------------------------------- k-fold splits


def fold_kind(path: str | Path, task: str, format: str = "auto") -> str:
    """How a training file splits into examples: csv, tsv, lines (jsonl, txt), conll or squad."""
    if task == "ner":
        return "conll"
    if task == "qa" and Path(path).suffix.lower() == ".json":
        return "squad"
    kind = detect_format(path, format)
    return kind if kind in ("csv", "tsv") else "lines"


def read_records(path: Path, kind: str) -> tuple[Any, list[Any]]:
    """(header or document, examples) of a training file, examples kept as written."""
    if not path.is_file():
        raise DataError(path, None, "no such file" if not path.exists() else "not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(path, None, f"not UTF-8 text ({e.reason})") from None
    if kind == "csv":
        rows = [r for r in csv.reader(io.StringIO(text, newline="")) if any(cell.strip() for cell in r)]
        return (rows[0] if rows else None), rows[1:]
    if kind == "conll":
        blocks, current = [], []
        for line in text.splitlines():
            if line.strip():
                current.append(line)
            elif current:
                blocks.append(current)
                current = []
        if current:
            blocks.append(current)
        return None, blocks
    if kind == "squad":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, f"broken JSON ({e.msg})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
            raise DataError(path, None, "expected SQuAD JSON: an object with a 'data' list of articles")
        records = [(a.get("title", ""), p) for a in doc["data"] for p in a.get("paragraphs", [])]
        return {k: v for k, v in doc.items() if k != "data"}, records
    lines = [line for line in text.split("\n") if line.strip()]
    if kind == "tsv":
        return (lines[0] if lines else None), lines[1:]
    return None, lines


def write_records(path: Path, kind: str, head: Any, records: list[Any]) -> None:
    if kind == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(head)
        writer.writerows(records)
        text = buffer.getvalue()
    elif kind == "conll":
        text = "".join("\n".join(block) + "\n\n" for block in records)
    elif kind == "squad":
        articles: list[dict[str, Any]] = []
        for title, paragraph in records:  # consecutive paragraphs of one article stay one article
            if not articles or articles[-1]["title"] != title:
                articles.append({"title": title, "paragraphs": []})
            articles[-1]["paragraphs"].append(paragraph)
        text = json.dumps({**head, "data": articles}, ensure_ascii=False) + "\n"
    else:
        text = "".join(line.rstrip("\r") + "\n" for line in ([head] if head is not None else []) + records)
    atomic_write_text(path, text)


def fold_assignment(n: int, k: int, seed: int) -> list[int]:
    """The fold of each of ``n`` examples: a seeded shuffle dealt round-robin into ``k`` folds of
    sizes that differ by at most one."""
    if k < 2:
        raise ConfigError(f"folds must be at least 2 for cross-validation, got {k}")
    if n < k:
        raise ConfigError(f"{k} folds need at least {k} training examples, the file has {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    fold = [0] * n
    for position, index in enumerate(order):
        fold[index] = position % k
    return fold


def write_folds(config: FinetuneConfig, k: int, seed: int, folder: Path) -> list[tuple[Path, Path]]:
    """Write fold F's training file (the other folds) and eval file (fold F) to ``folder/fold-F/``,
    in the input's format and order; returns their paths."""
    source = Path(config.data.train)
    kind = fold_kind(source, config.model.task, config.data.format)
    head, records = read_records(source, kind)
    fold = fold_assignment(len(records), k, seed)
    suffix = "".join(source.suffixes[-1:]) or ".txt"
    paths = []
    for f in range(k):
        where = folder / f"fold-{f}"
        train, held = where / f"train{suffix}", where / f"eval{suffix}"
        write_records(train, kind, head, [r for r, g in zip(records, fold, strict=True) if g != f])
        write_records(held, kind, head, [r for r, g in zip(records, fold, strict=True) if g == f])
        paths.append((train, held))
    return paths


# ----------------------------------------------------------------------------- the search


def trial_value(summary: dict[str, Any]) -> float | None:
    """The number a trial is judged by: the run's best evaluation, else its last one."""
    value = summary.get("best_value")
    if value is None:
        value = (summary.get("eval") or {}).get(summary.get("metric"))
    return None if value is None or not math.isfinite(float(value)) else float(value)


def search(config: FinetuneConfig | Mapping[str, Any] | str | Path, space: Mapping[str, Any] | str | Path, *,
           trials: int | None = None, sampler: str = "random", folds: int = 0, out: str | Path = "runs/search",
           seed: int | None = None, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run a hyper-parameter search (see the module docstring). ``trials``: how many (grid: at most
    the grid's size; default the whole grid); ``seed``: sampler and fold seed (default the config's
    ``train.seed``). Returns ``{"best", "trials", "metric", "direction", "sampler", "out",
    "best_config"}``; ``best`` is ``{"trial", "params", "value"}``."""
    say = (lambda *a: print(*a, file=sys.stderr)) if progress else (lambda *a: None)
    base = load_config(config)
    base_dict = read_yaml(config) if isinstance(config, (str, Path)) else (
        base.to_dict() if isinstance(config, FinetuneConfig) else dict(config))
    params = read_space(space)
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    for p in params:  # a key the config does not have fails here, naming the closest one
        try:
            load_config(base_dict, {p.name: p.example()})
        except ConfigError as e:
            raise ConfigError(f"{p.where}: {p.name}: {e}") from None
    if not folds and not (base.data.eval or base.data.eval_ratio):
        raise ConfigError("a search compares evaluations: set data.eval (or data.eval_ratio), or use folds")
    seed = base.train.seed if seed is None else seed
    metric, higher = base.metric, base.higher_is_better
    out = Path(out)
    if (out / "trials.jsonl").exists():
        if not overwrite:
            raise ConfigError(f"{out} already holds a search (trials.jsonl): choose another out or overwrite it")
        for old in out.glob("trial-[0-9][0-9][0-9]"):
            shutil.rmtree(old)
    grid = [dict(zip([p.name for p in params], combo, strict=True))
            for combo in itertools.product(*(p.grid() for p in params))] if sampler == "grid" else []
    if sampler == "grid":
        trials = min(trials or len(grid), len(grid))
    elif not trials or trials < 1:
        raise ConfigError(f"{sampler} search needs trials >= 1")
    study = None
    if sampler != "grid":
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        chosen = (optuna.samplers.RandomSampler(seed=seed) if sampler == "random" else
                  # TPE starts from random points; a third of a short budget, at most optuna's 10
                  optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, trials // 3))))
        study = optuna.create_study(direction="maximize" if higher else "minimize", sampler=chosen)

    records: list[dict[str, Any]] = []
    for i in range(trials):
        trial = study.ask() if study is not None else None
        values = grid[i] if trial is None else {p.name: p.suggest(trial) for p in params}
        trial_dir = out / f"trial-{i:03d}"
        started = time.perf_counter()
        record: dict[str, Any] = {"trial": i, "params": values, "value": None, "fold_values": [], "state": "complete",
                                  "error": None, "run_dir": str(trial_dir)}
        try:
            if folds:
                runs = [{"data.train": str(tr), "data.eval": str(ev), "data.eval_ratio": 0.0,
                         "out.dir": str(tr.parent)} for tr, ev in write_folds(base, folds, seed, trial_dir)]
            else:
                runs = [{"out.dir": str(trial_dir)}]
            for run in runs:
                overrides = {**values, **run, "out.overwrite": True}
                summary = finetune(base_dict, overrides=overrides, progress=False)
                value = trial_value(summary)
                if value is None:
                    raise ConfigError(f"the run in {run['out.dir']} reported no {metric}")
                record["fold_values"].append(value)
            record["value"] = sum(record["fold_values"]) / len(record["fold_values"])
        except FeatherError as e:  # a bad combination (or a diverged run): record it, try the others
            record.update(state="failed", error=" ".join(str(e).splitlines()))
        record["time_s"] = round(time.perf_counter() - started, 3)
        if not folds:
            record.pop("fold_values")
        if study is not None:
            if record["value"] is None:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(trial, record["value"])
        records.append(record)
        best = pick_best(records, higher)
        say(f"trial {i + 1}/{trials} {format_params(values)}: "
            + (f"{metric} {record['value']:.4f}" if record["value"] is not None else f"failed ({record['error']})")
            + (f"  (best: trial {best['trial']}, {best['value']:.4f})" if best else ""))
        write_outputs(out, records, params, metric, higher, best, base_dict)
    best = pick_best(records, higher)
    if best is None:
        raise ConfigError(f"every trial failed; the first: {records[0]['error']}")
    return {"best": {k: best[k] for k in ("trial", "params", "value")}, "trials": records, "metric": metric,
            "direction": "maximize" if higher else "minimize", "sampler": sampler, "out": str(out),
            "best_config": str(out / "best.yaml")}


def pick_best(records: list[dict[str, Any]], higher: bool) -> dict[str, Any] | None:
    done = [r for r in records if r["value"] is not None]
    if not done:
        return None
    return max(done, key=lambda r: r["value"]) if higher else min(done, key=lambda r: r["value"])


def format_params(values: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def write_outputs(out: Path, records: list[dict[str, Any]], params: list[Param], metric: str, higher: bool,
                  best: dict[str, Any] | None, base_dict: dict[str, Any]) -> None:
    atomic_write_text(out / "trials.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    names = [p.name for p in params]
    lines = [f"# Search: {metric} ({'higher' if higher else 'lower'} is better)", "",
             "| trial | " + " | ".join(names) + f" | {metric} | state | time |",
             "|---" * (len(names) + 4) + "|"]
    for r in records:
        cells = [f"{r['params'][n]:.4g}" if isinstance(r["params"][n], float) else str(r["params"][n]) for n in names]
        value = f"{r['value']:.4f}" if r["value"] is not None else "-"
        if best is not None and r is best:
            value = f"**{value}**"
        state = r["state"] if r["state"] == "complete" else f"failed: {r['error']}"
        lines.append(f"| {r['trial']:03d} | " + " | ".join(cells) + f" | {value} | {state.replace('|', '/')} | "
                     f"{r['time_s']:.1f} s |")
    atomic_write_text(out / "trials.md", "\n".join(lines) + "\n")
    if best is not None:
        data = merge(base_dict, parse_overrides({**best["params"], "out.dir": str(out / "best")}))
        header = (f"# best of {len(records)} trials so far: trial-{best['trial']:03d}, {metric} {best['value']:.6g}\n"
                  f"# {format_params(best['params'])}\n")
        atomic_write_text(out / "best.yaml", header + save_config(load_config(data)))


__all__ = ["search", "read_space", "Param", "write_folds", "fold_assignment", "read_records", "SAMPLERS"]
