"""Translation and summarization scored on a model, no fine-tuning run needed (e.g. BLEU before tuning).

    featherlm evaluate --task translation --model smollm2-135m-instruct \\
        --config examples/translation-en-fr-lora.yaml

The fine-tuning task (``featherlm.train.tasks.seq2seq``) reads, prompts, generates and scores; this
module only builds its config: from a fine-tuning recipe's sections when one is given (so an untuned
model is measured on exactly the pairs, prompt, languages and held-out split a run of that recipe is
evaluated on), from a run's own config for an ``adapter``, with the options on top.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from featherlm.errors import ConfigError

# option -> the fine-tuning config key it sets (None: an option of this evaluation only)
KEYS = {
    "config": None, "source_column": "data.source_column", "target_column": "data.target_column",
    "format": "data.format", "prompt": "data.prompt", "source_lang": "data.source_lang",
    "target_lang": "data.target_lang", "chat_template": "data.chat_template", "system": "data.system",
    "eval_ratio": "data.eval_ratio",
    "seed": "train.seed", "limit": "data.max_eval_generate", "max_new_tokens": "data.eval_max_new_tokens",
    "beams": "data.eval_beams", "max_seq_len": "train.max_seq_len", "batch_size": None, "dtype": None,
    "skip_bad_rows": None, "samples": None,
}
DEFAULTS = {"batch_size": 16, "dtype": "float32", "skip_bad_rows": False, "samples": 3}


def evaluate_seq2seq(task: str, *, model: str | None, adapter: str | None, data: str | None,
                     options: Mapping[str, Any]) -> dict[str, Any]:
    """Score ``model`` (or a run's merged ``adapter``) on the pairs of ``data`` for ``task``.

    ``data`` None: the recipe's evaluation data (its data.eval, or its data.train's held-out share).
    With ``eval_ratio`` > 0 (an option or the recipe's), a file that is the recipe's training file
    is scored on its seeded held-out share only, the pairs a run of that recipe never trained on.
    Returns the task's metrics, ``pairs`` scored, ``data`` and the first ``samples`` outputs.
    """
    from featherlm.evaluate.suite import load_model, pick
    from featherlm.train import load_config
    from featherlm.train.config import read_yaml, set_dotted
    from featherlm.train.tasks import get_task

    o = pick(options, {**dict.fromkeys(KEYS), **DEFAULTS})
    if not model and not adapter:
        raise ConfigError(f"{task}: name a model (or a fine-tuning run as adapter) to evaluate")
    if o["config"]:
        base = read_yaml(o["config"])
    elif adapter:
        base = read_yaml(Path(adapter) / "config.yaml")
    else:
        base = {}
    base.setdefault("data", {})
    run_model = read_yaml(Path(adapter) / "config.yaml").get("model", {}) if adapter else {}
    base["model"] = {**run_model, "name": run_model.get("name") or model, "task": task}  # a recipe's model: not ours
    for option, key in KEYS.items():
        if key is not None and o[option] is not None:
            set_dotted(base, key, o[option])
    d = base["data"]
    recipe_train = d.get("train") or ""
    path = data or d.get("eval") or (recipe_train if d.get("eval_ratio") else "")
    if not path:
        raise ConfigError(f"{task}: name the pairs to score (--data), or a recipe (--config) with data.eval "
                          "or data.eval_ratio")
    held_out = bool(d.get("eval_ratio")) and (not data or Path(data).resolve() == Path(recipe_train).resolve())
    d.update(train=str(path), eval="")
    if not held_out:
        d["eval_ratio"] = 0.0
    cfg = load_config(base)
    net, tokenizer, label = load_model(model, adapter, o["dtype"])
    t = get_task(task)
    pairs = t.read(cfg, str(path), tokenizer, skip_bad_rows=o["skip_bad_rows"])
    if held_out:
        pairs = t.split(pairs, cfg.data.eval_ratio, cfg.train.seed)[1]
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    result = t.evaluate(net, pairs, cfg=cfg, tokenizer=tokenizer, batch_size=o["batch_size"], pad_id=pad_id)
    predictions = result.pop("predictions")
    source = pairs.source
    samples = [{"source": source.sources[e["index"]], "reference": source.targets[e["index"]], "prediction": p}
               for e, p in zip(pairs.examples[: o["samples"]], predictions, strict=False)]
    return {**{m: result[m] for m in t.metrics}, **result, "pairs": len(pairs.examples), "data": str(path),
            "held_out": held_out, "model": label, "skipped": len(pairs.skipped), "samples": samples}


def evaluate_translation(*, model: str | None, adapter: str | None, data: str | None,
                         options: Mapping[str, Any]) -> dict[str, Any]:
    """BLEU and chrF (sacrebleu) of a model's translations: see ``evaluate_seq2seq``."""
    return evaluate_seq2seq("translation", model=model, adapter=adapter, data=data, options=options)


def evaluate_summarization(*, model: str | None, adapter: str | None, data: str | None,
                           options: Mapping[str, Any]) -> dict[str, Any]:
    """ROUGE-1/2/L (rouge-score) of a model's summaries: see ``evaluate_seq2seq``."""
    return evaluate_seq2seq("summarization", model=model, adapter=adapter, data=data, options=options)


for _fn in (evaluate_translation, evaluate_summarization):
    _fn.options = set(KEYS)  # type: ignore[attr-defined]  (checked by suites before anything runs)
    _fn.needs_adapter = False  # type: ignore[attr-defined]

__all__ = ["evaluate_seq2seq", "evaluate_summarization", "evaluate_translation"]
