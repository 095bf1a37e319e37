"""`featherlm <verb>`: a thin layer over the Python API.

Every verb accepts ``--json``: the last stdout line is then one JSON object with the verb's result.
User mistakes (``FeatherError``) print one line on stderr and exit 2, without a stack trace.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import featherlm
from featherlm.errors import FeatherError
from featherlm.generate import GenerationConfig, generate, stream

VERBS: dict[str, Callable[[argparse.Namespace], int]] = {}
DEFAULT_MODEL = "smollm2-135m-instruct"


def verb(name: str):
    def register(fn):
        VERBS[name] = fn
        return fn
    return register


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="embedded name, HF/featherlm folder, .gguf file or hub id (default: smollm2-135m-instruct)")
    p.add_argument("--adapter", default=None, help="a fine-tuning run directory (sft or lm) to generate with")
    # bf16 weights halve the bytes read per generated token (decoding is memory-bound): about 1.8x the
    # float32 decode speed on a 2-core CPU. float32 is the reference numerics (parity tests).
    p.add_argument("--dtype", default="bfloat16", choices=sorted([*featherlm.DTYPES, *featherlm.QUANTIZED]),
                   help="weight dtype (default: %(default)s; float32 for reference numerics; q4: 4-bit linears, "
                        "a GGUF's own Q4 blocks where it has them)")


def load_lm(args: argparse.Namespace) -> featherlm.LoadedModel:
    """The model to generate with: ``--model``, or with ``--adapter`` a fine-tuning run's model with its
    adapter merged in where the method allows (a plain model decodes fastest)."""
    if not args.adapter:
        return featherlm.load(args.model or DEFAULT_MODEL, dtype=args.dtype)
    from featherlm.peft import merge
    from featherlm.train import load_run

    model, tokenizer, config = load_run(args.adapter)
    if config.model.task in ("classification", "ner", "qa"):
        raise featherlm.ConfigError(f"{args.adapter}: a {config.model.task} run cannot generate text "
                                    "(use `featherlm predict`)")
    check_run(args.adapter, config, model=args.model)
    if args.dtype in featherlm.QUANTIZED:
        from featherlm.model.quant import quantize_model

        model = merge(model).to(featherlm.DTYPES["bfloat16"])
        quantize_model(model, group_size=32)
    else:
        model = merge(model).to(featherlm.DTYPES[args.dtype])
    return featherlm.LoadedModel(model, tokenizer, f"{config.model.name} + {args.adapter}", kind="run")


def check_run(run, config, *, model: str | None = None, task: str | None = None) -> None:
    """``--model`` / ``--task`` given next to ``--adapter`` must name what the run was trained on."""
    for flag, value, expected in (("--model", model, config.model.name), ("--task", task, config.model.task)):
        if value is not None and value != expected:
            raise featherlm.ConfigError(f"{flag} {value!r} does not match the run in {run} ({expected!r})")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--beams", type=int, default=1, help="beam search width (1 = off)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def unescape(text: str) -> str:
    r"""``--stop "\n\n"`` arrives as backslash + n: read \n, \t and \\ as the characters they name."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, num_beams=args.beams,
        stop=[unescape(s) for s in args.stop], seed=args.seed,
    )
    cfg.check()
    return cfg


def emit_json(obj: dict) -> None:
    print(json.dumps(obj, ensure_ascii=False))


@verb("generate")
def cmd_generate(args: argparse.Namespace) -> int:
    cfg = generation_config(args)
    lm = load_lm(args)
    lm.require_decoder()
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    if cfg.num_beams > 1:
        result = generate(lm.model, lm.tokenizer, prompt, cfg)
        if not args.json:
            print(result.text)
    else:
        results = []
        for piece in stream(lm.model, lm.tokenizer, prompt, cfg, on_done=results.append):
            if not args.json:
                print(piece, end="", flush=True)
        result = results[0]
        if not args.json:
            print()
    if args.json:
        emit_json(result.to_dict())
    else:
        d = result.to_dict()
        print(f"[{d['prompt_tokens']} prompt tokens at {d['prefill_tokens_per_s']:.1f} tok/s, "
              f"{d['new_tokens']} new at {d['decode_tokens_per_s']:.1f} tok/s]", file=sys.stderr)
    return 0


@verb("chat")
def cmd_chat(args: argparse.Namespace) -> int:
    cfg = generation_config(args)
    if cfg.num_beams > 1:
        raise featherlm.GenerationError("chat streams its answers: use --beams 1")
    lm = load_lm(args)
    lm.require_decoder()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"featherlm chat with {lm.name}. /reset clears the history, /exit quits.")
    last = None
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(system)
            print("(history cleared)")
            continue
        history.append({"role": "user", "content": text})
        prompt = fit_history(lm, history, len(system), cfg.max_new_tokens)
        results = []
        if interactive:
            print("assistant> ", end="", flush=True)
        for piece in stream(lm.model, lm.tokenizer, prompt, cfg, on_done=results.append):
            if not args.json:
                print(piece, end="", flush=True)
        last = results[0]
        if not args.json:
            print(flush=True)
        history.append({"role": "assistant", "content": last.text})
    if args.json:
        emit_json({"turns": sum(m["role"] == "user" for m in history), "messages": history,
                   "last": last.to_dict() if last else None})
    return 0


def fit_history(lm, history: list[dict], keep: int, max_new_tokens: int) -> str:
    """Render the chat prompt, dropping the oldest turns (never the first ``keep`` system messages)
    until it leaves room for an answer in the context; the newest message always stays."""
    context = lm.model.config.max_seq_len
    room = min(max_new_tokens, context // 4)  # keep at least a quarter of the context for the answer
    while True:
        prompt = lm.tokenizer.apply_chat_template(history, add_generation_prompt=True)
        if len(lm.tokenizer.encode(prompt)) + room <= context or len(history) <= keep + 1:
            return prompt
        del history[keep]  # oldest user or assistant message


@verb("info")
def cmd_info(args: argparse.Namespace) -> int:
    info = featherlm.load(args.model_name, dtype=args.dtype).info()
    if args.json:
        emit_json(info)
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "files":
            value = "\n".join([value[0], *(" " * (width + 2) + v for v in value[1:])]) if value else "-"
        elif key == "parameters":
            value = f"{value:,} ({value / 1e6:.1f}M)"
        print(f"{key:<{width}}  {value}")
    return 0


# `featherlm finetune` shortcuts: flag -> dotted config key (any other `--section.key value` works too)
FINETUNE_SHORTCUTS = {"model": "model.name", "task": "model.task", "data": "data.train", "eval_data": "data.eval",
                      "method": "peft.method", "out": "out.dir"}


@verb("finetune")
def cmd_finetune(args: argparse.Namespace) -> int:
    from featherlm.train import finetune

    overrides = list(args.overrides)
    for flag, key in FINETUNE_SHORTCUTS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides += [f"--{key}", value]
    result = finetune(args.config or {}, overrides=overrides, resume=args.resume, progress=not args.json)
    if args.json:
        emit_json(result)
    else:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in (result.get("eval") or {}).items() if isinstance(v, float))
        print(f"run {result['run_dir']}: {result['step']}/{result['total_steps']} steps in {result['time_s']:.0f}s"
              f"{'; eval ' + scores if scores else ''}")
    return 0


# `featherlm pretrain` shortcuts: flag -> dotted config key (any other `--section.key value` works too)
PRETRAIN_SHORTCUTS = {"model": "model.arch", "data": "data.train", "tokenizer": "data.tokenizer", "out": "out.dir"}


@verb("pretrain")
def cmd_pretrain(args: argparse.Namespace) -> int:
    import os

    from featherlm.train.pretrain import pretrain

    overrides = list(args.overrides)
    for flag, key in PRETRAIN_SHORTCUTS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides += [f"--{key}", value]
    result = pretrain(args.config or {}, overrides=overrides, resume=args.resume, progress=not args.json)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only the first process reports
        return 0
    if args.json:
        emit_json(result)
    else:
        print(f"run {result['run_dir']}: {result['steps']} steps, {result['tokens']:,} tokens in "
              f"{result['time_s']:.0f}s ({result['tokens_per_s']:,.0f} tokens/s); val loss {result['val_loss']:.4f} "
              f"({result['val_bits_per_token']:.3f} bits/token)")
    return 0


@verb("evaluate")
def cmd_evaluate(args: argparse.Namespace) -> int:
    from featherlm.evaluate import evaluate
    from featherlm.train import load_config

    if args.suite:
        return evaluate_suite(args)
    if args.task in MODEL_TASKS and not (args.adapter and args.task in ("translation", "summarization")):
        return evaluate_model_task(args)  # (a translation/summarization run is scored as a run, below)
    if not args.adapter:
        raise featherlm.ConfigError("name a fine-tuning run with --adapter RUN, or use --task perplexity|code "
                                    "(with --model), or --suite FILE.yaml --out DIR")
    run = Path(args.adapter)
    config = load_config(run / "config.yaml") if (run / "config.yaml").is_file() else None
    if config is None:
        raise featherlm.CheckpointError(run, "not a fine-tuning run folder (no config.yaml); "
                                             "--adapter takes the --out folder of `featherlm finetune`")
    check_run(run, config, model=args.model, task=args.task)
    result = evaluate(run, args.data, checkpoint=args.checkpoint, skip_bad_rows=args.skip_bad_rows)
    if args.json:
        emit_json(result)
        return 0
    for key, value in result.items():
        if key == "confusion":
            labels = result.get("labels") or [str(i) for i in range(len(value))]
            width = max(len(str(x)) for x in [*labels, *(c for row in value for c in row)]) + 1
            print("confusion (rows: true, columns: predicted)")
            print(" " * width + "".join(f"{lab:>{width}}" for lab in labels))
            for lab, row in zip(labels, value, strict=True):
                print(f"{lab:>{width}}" + "".join(f"{c:>{width}}" for c in row))
        elif key == "per_type":  # ner: one row per entity type
            print(f"{'type':<10} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}")
            for name, row in value.items():
                scores = "".join(f" {row[k]:>9.4f}" for k in ("precision", "recall", "f1"))
                print(f"{name:<10}{scores} {row['support']:>9}")
        elif isinstance(value, float):
            print(f"{key:<10} {value:.4f}")
        else:
            print(f"{key:<10} {value}")
    return 0


MODEL_TASKS = ("perplexity", "code", "translation", "summarization")  # `evaluate --task T --model M`: no run needed


def evaluate_model_task(args: argparse.Namespace) -> int:
    """``--task perplexity`` (a text file) or ``--task code`` (HumanEval-style pass@k) on --model or --adapter."""
    from featherlm.evaluate.suite import EVALUATORS

    if args.task in ("translation", "summarization"):
        return evaluate_pairs(args)
    if args.task == "perplexity":
        if not args.data:
            raise featherlm.ConfigError("--task perplexity needs --data: a text file")
        options = {"window": args.window, "stride": args.stride, "batch_size": args.batch_size or 1,
                   "dtype": args.dtype or "float32", "max_chars": args.max_chars}
    else:
        try:
            ks = [int(k) for k in args.k.split(",")]
        except ValueError:
            raise featherlm.ConfigError(f"--k takes numbers separated by commas, got {args.k!r}") from None
        temperature = args.temperature if args.temperature is not None else (0.0 if args.n == 1 else 0.8)
        options = {"n": args.n, "k": ks, "limit": args.limit, "temperature": temperature,
                   "max_new_tokens": args.max_new_tokens or 384, "batch_size": args.batch_size or 8,
                   "workers": args.workers,
                   "timeout_s": args.timeout, "seed": args.seed, "dtype": args.dtype or "bfloat16",
                   "strip_prompt": not args.raw_prompt, "progress": not args.json}
    model = args.model or (None if args.adapter else DEFAULT_MODEL)
    result = EVALUATORS[args.task](model=model, adapter=args.adapter, data=args.data, options=options)
    if args.json:
        emit_json({"task": args.task, "model": model, "adapter": args.adapter, **result})
        return 0
    for key, value in result.items():
        if key == "results":
            continue
        print(f"{key:<14} {value:.4f}" if isinstance(value, float) else f"{key:<14} {value}")
    return 0


def evaluate_pairs(args: argparse.Namespace) -> int:
    """``--task translation|summarization`` on --model (or a run's merged --adapter): BLEU/chrF or ROUGE.
    ``--config`` names a fine-tuning recipe whose data section says how to read and prompt --data."""
    from featherlm.evaluate.suite import EVALUATORS

    options = {"config": args.config, "limit": args.limit or None, "beams": args.beams,
               "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size or 16,
               "dtype": args.dtype or "float32", "skip_bad_rows": args.skip_bad_rows}
    model = args.model or (None if args.adapter else DEFAULT_MODEL)
    result = EVALUATORS[args.task](model=model, adapter=args.adapter, data=args.data, options=options)
    if args.json:
        emit_json({"task": args.task, "adapter": args.adapter, **result})
        return 0
    for key, value in result.items():
        if key != "samples":
            print(f"{key:<14} {value:.4f}" if isinstance(value, float) else f"{key:<14} {value}")
    for sample in result["samples"]:
        print(f"\n  source:     {sample['source']}\n  reference:  {sample['reference']}\n"
              f"  prediction: {sample['prediction']}")
    return 0


def evaluate_suite(args: argparse.Namespace) -> int:
    from featherlm.evaluate.suite import run_suite

    if not args.out:
        raise featherlm.ConfigError("--suite needs --out DIR (where results.md and results.json go)")
    result = run_suite(args.suite, args.out, progress=not args.json)
    failed = sum(row["status"] != "ok" for row in result["rows"])
    if args.json:
        emit_json(result)
    else:
        print(result["markdown"], end="")
        print(f"wrote {Path(args.out) / 'results.md'} and results.json" + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


@verb("search")
def cmd_search(args: argparse.Namespace) -> int:
    from featherlm.train.search import search

    result = search(args.config, args.space, trials=args.trials, sampler=args.sampler, folds=args.folds,
                    out=args.out, seed=args.seed, overwrite=args.overwrite, progress=not args.json)
    if args.json:
        emit_json(result)
    else:
        best = result["best"]
        print(f"best of {len(result['trials'])} trials: trial-{best['trial']:03d}, {result['metric']} "
              f"{best['value']:.4f} with " + ", ".join(f"{k}={v}" for k, v in best["params"].items()))
        print(f"table: {Path(result['out']) / 'trials.md'}; config: {result['best_config']}")
    return 0


@verb("predict")
def cmd_predict(args: argparse.Namespace) -> int:
    """Run a NER, QA or classification run on text given on the command line."""
    from featherlm.evaluate import answer_questions, classify, predict_entities
    from featherlm.train import load_run

    model, tokenizer, config = load_run(args.adapter, args.checkpoint)
    check_run(args.adapter, config, model=args.model, task=args.task)
    task, d = config.model.task, config.data
    needs = {"ner": ("text",), "classification": ("text",), "qa": ("question", "context")}
    if task not in needs:
        raise featherlm.ConfigError(f"{args.adapter}: predict runs ner, qa and classification runs; this is a "
                                    f"{task} run (use `featherlm generate --adapter`)")
    missing = [f"--{flag}" for flag in needs[task] if getattr(args, flag) is None]
    if missing:
        raise featherlm.ConfigError(f"a {task} run needs {' and '.join(missing)}")
    if task == "ner":
        entities = predict_entities(model, tokenizer, [args.text], max_seq_len=config.train.max_seq_len)[0]
        result = {"text": args.text, "entities": entities}
        lines = [f"{e['type']:<8} {e['start']:>5}-{e['end']:<5} {e['score']:.3f}  {e['text']}" for e in entities]
        lines = lines or ["(no entities)"]
    elif task == "qa":
        answer = answer_questions(model, tokenizer, [args.question], [args.context],
                                  max_seq_len=config.train.max_seq_len, doc_stride=d.doc_stride,
                                  max_answer_len=d.max_answer_len, allow_null=d.unanswerable == "null")[0]
        result = {"question": args.question, **answer}
        span = f"[{answer['start']}:{answer['end']}]"
        lines = [f"{answer['answer'] or '(no answer)'}  {span} score {answer['score']:.3f}"]
    else:
        result = {"text": args.text, **classify(model, tokenizer, [args.text], max_seq_len=config.train.max_seq_len)[0]}
        lines = [f"{result['label']}  score {result['score']:.3f}"]
    if args.json:
        emit_json(result)
    else:
        print("\n".join(lines))
    return 0


@verb("merge")
def cmd_merge(args: argparse.Namespace) -> int:
    from featherlm.checkpoint import export_hf, save_model
    from featherlm.peft import merge
    from featherlm.train import load_run

    model, tokenizer, config = load_run(args.adapter, args.checkpoint)
    check_run(args.adapter, config, model=args.model)
    if config.model.task in ("classification", "ner", "qa"):
        raise featherlm.ConfigError(f"{args.adapter}: merging is for language-model runs (sft, lm); this run "
                                    f"trained a classifier ({config.model.task}), use it with `featherlm evaluate`")
    model = merge(model)
    out = (export_hf if args.hf else save_model)(model, tokenizer, args.out)
    result = {"out": str(out), "format": "hf" if args.hf else "featherlm", "base": config.model.name,
              "method": config.peft.method, "parameters": sum(p.numel() for p in model.parameters())}
    if args.json:
        emit_json(result)
    else:
        print(f"merged {config.peft.method} adapter of {args.adapter} into {config.model.name}: wrote {out} "
              f"({result['format']} folder)")
    return 0


@verb("tokenizer")
def cmd_tokenizer(args: argparse.Namespace) -> int:
    """`featherlm tokenizer train`: train a tokenizer folder on text files."""
    import time

    from featherlm.tokenizer import train_tokenizer

    start = time.perf_counter()
    tok = train_tokenizer(args.data, args.kind, args.vocab_size, out=args.out, special_tokens=args.special_token,
                          min_frequency=args.min_frequency, lowercase=args.lowercase, progress=not args.json)
    result = {"out": args.out, "kind": args.kind, "vocab_size": tok.vocab_size, "files": args.data,
              **{k: getattr(tok, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")},
              "time_s": round(time.perf_counter() - start, 3)}
    if args.json:
        emit_json(result)
    else:
        print(f"trained a {args.kind} tokenizer ({tok.vocab_size} ids) on {len(args.data)} file(s) in "
              f"{result['time_s']:.1f}s: wrote {args.out}")
    return 0


@verb("data")
def cmd_data(args: argparse.Namespace) -> int:
    """`featherlm data prepare`: clean, dedup, filter, augment, tokenise and shard a corpus."""
    import time

    from featherlm.data.augment import AugmentConfig
    from featherlm.data.clean import QualityConfig
    from featherlm.data.prepare import PrepareConfig, prepare_corpus

    dedup = tuple(d.strip() for d in args.dedup.split(",") if d.strip() and d.strip() != "none")
    config = PrepareConfig(
        val_ratio=args.val_ratio, doc_split=args.doc_split, text_field=args.text_field,
        normalization=args.normalization,
        quality=QualityConfig(min_chars=args.min_chars, max_chars=args.max_chars, enabled=not args.no_quality),
        dedup=dedup, near_threshold=args.near_threshold, augment=AugmentConfig(copies=args.augment),
        workers=args.workers, shard_tokens=args.shard_tokens, seed=args.seed, overwrite=args.overwrite)
    start = time.perf_counter()
    manifest = prepare_corpus(args.input, args.tokenizer, args.out, config, progress=not args.json)
    splits = manifest["splits"]
    result = {"out": args.out, **manifest["stats"], "vocab_size": manifest["vocab_size"], "dtype": manifest["dtype"],
              **{f"{name}_{key}": splits[name][key] for name in splits for key in ("tokens", "documents")},
              "time_s": round(time.perf_counter() - start, 3)}
    if args.json:
        emit_json(result)
        return 0
    for key, value in result.items():
        print(f"{key:<26} {value:,}" if isinstance(value, int) else f"{key:<26} {value}")
    return 0


@verb("serve")
def cmd_serve(args: argparse.Namespace) -> int:
    """Serve models over an OpenAI-compatible HTTP API until interrupted."""
    from featherlm.serve import check_bind, serve

    check_bind(args.host, args.api_key, args.insecure)  # before any model is loaded
    adapters = {}
    for item in args.adapter:
        name, sep, run_dir = item.partition("=")
        if not sep or not name or not run_dir:
            raise featherlm.ConfigError(f"--adapter takes NAME=RUN_DIR, got {item!r}")
        adapters[name] = run_dir
    serve(models=args.model if args.model is not None else ([] if adapters else [DEFAULT_MODEL]), adapters=adapters,
          host=args.host, port=args.port, api_key=args.api_key, insecure=args.insecure, dtype=args.dtype,
          max_batch=args.max_batch, max_queue=args.max_queue, max_tokens=args.max_tokens)
    return 0


@verb("baseline")
def cmd_baseline(args: argparse.Namespace) -> int:
    """`featherlm baseline lm|classify`: train a classic baseline on the data a transformer is compared on."""
    from featherlm.train.baseline import lm_baseline_from_file, train_classifier_baseline

    if args.action == "lm":
        result = lm_baseline_from_file(
            args.kind, args.data, tokenizer=args.tokenizer, time_budget_s=args.time_budget, d_model=args.d_model,
            n_layer=args.n_layer, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, order=args.order,
            seed=args.seed, out=args.out, sample_tokens=args.sample, progress=not args.json)
        summary = (f"{args.kind}: validation {result['val_bits_per_token']:.4f} bits/token, perplexity "
                   f"{result['val_perplexity']:.3f} ({result['val_tokens']:,} tokens); {result['params']:,} "
                   f"{'n-grams' if args.kind == 'ngram' else 'parameters'}, trained {result['time_s']:.1f}s")
    else:
        if not args.eval_data:
            raise featherlm.ConfigError("baseline classify needs --eval-data (the file accuracy is measured on)")
        result = train_classifier_baseline(
            args.kind, args.data, args.eval_data, args.tokenizer, epochs=args.epochs, time_budget_s=args.time_budget,
            batch_size=args.batch_size, lr=args.lr, max_seq_len=args.max_seq_len, d_model=args.d_model,
            max_train_examples=args.max_train_examples, seed=args.seed, progress=not args.json)
        summary = (f"{args.kind}: accuracy {result['accuracy']:.4f}, macro F1 {result['f1']:.4f} on "
                   f"{result['eval_examples']} examples; {result['params']:,} parameters, {result['steps']} steps "
                   f"in {result['time_s']:.1f}s")
    result.pop("model", None)
    if args.json:
        emit_json(result)
    else:
        if result.get("sample"):
            print(result["sample"])
        print(summary)
    return 0


@verb("gan")
def cmd_gan(args: argparse.Namespace) -> int:
    """`featherlm gan`: SeqGAN-style training after MLE, against MLE only for the same time."""
    from featherlm.config import from_dict
    from featherlm.train.gan import GanConfig, gan_from_file

    settings: dict = {"mle_time_s": args.mle_time, "adv_time_s": args.adv_time, "reward": args.reward,
                      "seed": args.seed}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise featherlm.ConfigError(f"--set takes KEY=VALUE (a GanConfig field), got {item!r}")
        settings[key.strip().replace("-", "_")] = value
    cfg = from_dict(GanConfig, settings, where="gan config")
    result = gan_from_file(args.data, generator=args.generator, out=args.out, cfg=cfg, progress=not args.json)
    if args.json:
        emit_json({k: v for k, v in result.items() if k != "config"})
        return 0
    keys = ("val_loss", "val_perplexity", "bleu", "self_bleu", "fresh_discriminator_accuracy")
    print(f"{'':<11}" + "".join(f"{k:>30}" for k in keys))
    for name in ("warm_start", "mle", "gan"):
        print(f"{name:<11}" + "".join(f"{result[name][k]:>30.4f}" for k in keys))
    print(f"GAN: {result['gan_training']['g_steps']} generator steps, own discriminator accuracy "
          f"{result['gan']['own_discriminator_accuracy']:.3f}; wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featherlm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"featherlm {featherlm.__version__}")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("generate", help="continue a prompt (streamed)")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_sampling_args(p, temperature=0.0)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("chat", help="interactive chat in the terminal")
    add_model_args(p)
    p.add_argument("--system", default=None, help="system message")
    add_sampling_args(p, temperature=0.0)
    p.set_defaults(repetition_penalty=1.1)  # small chat models loop without it
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("finetune", help="fine-tune a model (PEFT or full); any config field as --section.key VALUE",
                       epilog="example: featherlm finetune --config examples/sst2-lora.yaml --train.lr 5e-4")
    p.add_argument("--config", help="YAML recipe (see examples/)")
    p.add_argument("--model", help="model.name")
    p.add_argument("--task", help="model.task: classification, sft, lm, ner or qa")
    p.add_argument("--data", help="data.train")
    p.add_argument("--eval-data", dest="eval_data", help="data.eval")
    p.add_argument("--method", help="peft.method: lora, dora, ia3, adapter, prefix, prompt, bitfit, freeze, full")
    p.add_argument("--out", help="out.dir (the run directory)")
    p.add_argument("--resume", action="store_true", help="continue the run in out.dir from its last checkpoint")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("pretrain", help="train a model from scratch; any config field as --section.key VALUE",
                       epilog="example: featherlm pretrain --config examples/shakespeare-char.yaml --out runs/shakes; "
                              "data parallel: torchrun --nproc_per_node 2 -m featherlm.cli pretrain ...")
    p.add_argument("--config", help="YAML recipe (see examples/)")
    p.add_argument("--model", help="model.arch: gpt, llama, bert, t5, lstm, gru, rnn or ngram")
    p.add_argument("--data", help="data.train: a text file or a folder of token shards")
    p.add_argument("--tokenizer", help="data.tokenizer: a tokenizer folder, or char")
    p.add_argument("--out", help="out.dir (the run directory)")
    p.add_argument("--resume", action="store_true", help="continue the run in out.dir from its last checkpoint")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("evaluate", help="score a fine-tuning run, a model's perplexity or code, or a suite",
                       epilog="examples: featherlm evaluate --adapter runs/sst2;  featherlm evaluate --task perplexity "
                              "--model smollm2-135m-instruct --data input.txt --window 1024;  featherlm evaluate "
                              "--task code --limit 20;  featherlm evaluate --suite suite.yaml --out results")
    p.add_argument("--adapter", help="the run directory written by `featherlm finetune`")
    p.add_argument("--model", help="base model (checked against the run); the model for --task perplexity|code")
    p.add_argument("--task", help="task (checked against the run); perplexity, code, translation or summarization "
                                  "evaluate --model")
    p.add_argument("--data", help="data file (default: the run's eval data; code: HumanEval in the shared data)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--skip-bad-rows", action="store_true")
    p.add_argument("--suite", help="a YAML list of evaluations to run (with --out)")
    p.add_argument("--out", help="--suite: folder for results.md and results.json")
    p.add_argument("--dtype", choices=sorted(featherlm.DTYPES),
                   help="perplexity, code: weight dtype (default: float32 for perplexity, bfloat16 for code)")
    p.add_argument("--window", type=int, help="perplexity: tokens per window (default: the model's context)")
    p.add_argument("--stride", type=int, help="perplexity: tokens between windows (default: window / 2)")
    p.add_argument("--batch-size", type=int, help="perplexity: windows per batch; code: prompts per batch")
    p.add_argument("--max-chars", type=int, default=0, help="perplexity: the first N characters of --data (0: all)")
    p.add_argument("--n", type=int, default=1, help="code: samples per problem (default: %(default)s)")
    p.add_argument("--k", default="1", help="code: pass@k for these k, comma-separated (default: %(default)s)")
    p.add_argument("--limit", type=int, default=0, help="code: the first N problems only (0: all); translation, "
                                                        "summarization: pairs generated (default: 200)")
    p.add_argument("--temperature", type=float, help="code: sampling temperature (default: 0 = greedy for n=1, "
                                                      "0.8 otherwise)")
    p.add_argument("--max-new-tokens", type=int, help="code: completion length limit (default: 384); translation, "
                                                       "summarization: tokens per output (default: auto)")
    p.add_argument("--config", help="translation, summarization: a fine-tuning recipe whose data section (columns, "
                                    "prompt, languages, eval_ratio) says how to read --data")
    p.add_argument("--beams", type=int, help="translation, summarization: beam search width (default: greedy)")
    p.add_argument("--workers", type=int, help="code: programs run at once (default: up to 4)")
    p.add_argument("--timeout", type=float, default=10.0, help="code: seconds per program (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="code: sampling seed")
    p.add_argument("--raw-prompt", action="store_true",
                   help="code: keep each prompt's trailing newline (OpenAI's human-eval; default: strip it as the "
                        "bigcode harness does)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("search", help="tune hyper-parameters: many fine-tuning runs, a table, the best config",
                       epilog="example: featherlm search --config examples/sst2-lora.yaml --space space.yaml "
                              "--trials 8 --sampler bayes --out runs/search")
    p.add_argument("--config", required=True, help="the fine-tuning recipe (YAML) to tune")
    p.add_argument("--space", required=True, help="YAML: dotted config keys -> {type: choice|uniform|loguniform|int}")
    p.add_argument("--trials", type=int, help="how many runs (grid: default the whole grid)")
    p.add_argument("--sampler", default="random", choices=["grid", "random", "bayes"])
    p.add_argument("--folds", type=int, default=0, help="k-fold cross-validation on the training file (0: off)")
    p.add_argument("--seed", type=int, help="sampler and fold seed (default: the config's train.seed)")
    p.add_argument("--out", required=True, help="folder for trial-NNN/, trials.md, trials.jsonl, best.yaml")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier search in --out")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("predict", help="run a ner, qa or classification run on text: entities, an answer, a label",
                       epilog='example: featherlm predict --adapter runs/conll --text "Merkel visited Paris."')
    p.add_argument("--adapter", required=True, help="the run directory written by `featherlm finetune`")
    p.add_argument("--model", help="base model (checked against the run)")
    p.add_argument("--task", help="task (checked against the run)")
    p.add_argument("--text", help="ner, classification: the text")
    p.add_argument("--question", help="qa: the question")
    p.add_argument("--context", help="qa: the passage that holds the answer")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("merge", help="fold a run's adapter into its base model and save the result")
    p.add_argument("--adapter", required=True, help="the run directory written by `featherlm finetune`")
    p.add_argument("--model", help="base model (checked against the run)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--hf", action="store_true", help="write a Hugging Face folder (transformers loads it)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("tokenizer", help="train a tokenizer (`featherlm tokenizer train --help`)")
    tsub = p.add_subparsers(dest="action", required=True)
    p = tsub.add_parser("train", help="train a BPE, WordPiece, Unigram or character tokenizer on text files",
                        epilog="example: featherlm tokenizer train --data corpus.txt --kind bpe --vocab-size 8000 "
                               "--out tok/")
    p.add_argument("--data", nargs="+", required=True, help="plain-text training files")
    p.add_argument("--kind", default="bpe", choices=["bpe", "wordpiece", "unigram", "char"],
                   help="byte-level BPE (GPT-2), WordPiece (BERT), Unigram (SentencePiece) or char (default: bpe)")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (char: optional cap)")
    p.add_argument("--out", required=True, help="tokenizer folder to write")
    p.add_argument("--min-frequency", type=int, default=2, help="rarest pair/piece kept (default: %(default)s)")
    p.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None,
                   help="lowercase (default: on for wordpiece, off otherwise)")
    p.add_argument("--special-token", action="append", default=[], help="extra special token (repeatable)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("data", help="prepare pretraining data (`featherlm data prepare --help`)")
    dsub = p.add_subparsers(dest="action", required=True)
    p = dsub.add_parser("prepare", help="clean, dedup, filter, tokenise and shard a text corpus",
                        epilog="example: featherlm data prepare --input corpus/ --tokenizer tok/ --out data/")
    p.add_argument("--input", nargs="+", required=True, help="files or folders (.txt, .jsonl, .tsv, .csv)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder, or 'char' to build one from the corpus")
    p.add_argument("--out", required=True, help="dataset folder to write (must be new or empty)")
    p.add_argument("--val-ratio", type=float, default=0.01, help="share of documents held out (default: %(default)s)")
    p.add_argument("--min-chars", type=int, default=1, help="drop shorter documents (default: %(default)s)")
    p.add_argument("--max-chars", type=int, default=None, help="drop longer documents")
    p.add_argument("--no-quality", action="store_true", help="skip the quality heuristics (length limits stay)")
    p.add_argument("--dedup", default="exact,near", help="exact, near, both comma-separated, or none")
    p.add_argument("--near-threshold", type=float, default=0.8, help="MinHash Jaccard threshold (default: %(default)s)")
    p.add_argument("--augment", type=int, default=0, help="augmented copies per training document (default: 0)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (0: one per core; default: 1)")
    p.add_argument("--doc-split", default="blank", choices=["line", "blank", "file"],
                   help=".txt documents: one per line, per blank-line paragraph, or per file (default: blank)")
    p.add_argument("--text-field", default=None, help="JSONL key or table column (default: text / sentence)")
    p.add_argument("--normalization", default="NFC", choices=["NFC", "NFKC", "none"])
    p.add_argument("--shard-tokens", type=int, default=2**26, help="ids per shard file (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API (completions, chat, embeddings, task endpoints)")
    p.add_argument("--model", action="append", default=None, metavar="[NAME=]MODEL",
                   help="a model to serve (repeatable; default: smollm2-135m-instruct)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN_DIR",
                   help="a fine-tuning run to serve, as model `base:NAME` (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("FEATHERLM_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $FEATHERLM_API_KEY)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(featherlm.DTYPES),
                   help="weight dtype (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=32, help="rows decoded together (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting beyond the batch before a 429 (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=2048, help="largest max_tokens a request may ask for")

    p = sub.add_parser("baseline", help="classic baselines: n-gram / RNN / LSTM / GRU LMs, TextCNN / BiLSTM")
    bsub = p.add_subparsers(dest="action", required=True)
    p = bsub.add_parser("lm", help="train an n-gram or recurrent LM on a text file (last 10%% = validation)",
                        epilog="example: featherlm baseline lm --kind lstm --data input.txt --time-budget 120")
    p.add_argument("--kind", required=True, choices=["ngram", "rnn", "lstm", "gru"])
    p.add_argument("--data", required=True, help="a plain-text file")
    p.add_argument("--tokenizer", default="char", help="'char' (the file's characters) or a tokenizer folder")
    p.add_argument("--time-budget", type=float, default=60.0, help="training seconds (recurrent; default: 60)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32, help="truncated BPTT window (default: 32)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--order", type=int, default=5, help="n-gram order (default: 5)")
    p.add_argument("--sample", type=int, default=0, help="print a sample of this many tokens")
    p.add_argument("--out", default=None, help="folder to save the model in")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p = bsub.add_parser("classify", help="train a TextCNN or BiLSTM classifier; accuracy on --eval-data",
                        epilog="example: featherlm baseline classify --kind textcnn --data train.tsv "
                               "--eval-data dev.tsv --tokenizer minilm-l6")
    p.add_argument("--kind", required=True, choices=["textcnn", "bilstm"])
    p.add_argument("--data", required=True, help="training file (.tsv, .csv, .jsonl with text and label)")
    p.add_argument("--eval-data", dest="eval_data", help="evaluation file")
    p.add_argument("--tokenizer", required=True, help="a model name (minilm-l6) or a tokenizer folder")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--time-budget", type=float, default=None, help="stop training after this many seconds")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128, help="embedding width (and BiLSTM hidden size)")
    p.add_argument("--max-train-examples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("gan", help="SeqGAN-style adversarial training of a decoder vs MLE only, same wall time",
                       epilog="example: featherlm gan --data input.txt --out runs/gan --mle-time 180 --adv-time 120")
    p.add_argument("--data", required=True, help="a plain-text file (last 10%% = validation)")
    p.add_argument("--generator", default=None, help="a decoder folder with its tokenizer (default: train a small "
                                                     "character-level GPT here first, --mle-time seconds)")
    p.add_argument("--out", required=True, help="folder for result.json, samples.txt and both generators")
    p.add_argument("--mle-time", type=float, default=180.0, help="MLE warm start seconds (default: 180)")
    p.add_argument("--adv-time", type=float, default=120.0,
                   help="seconds of adversarial training, and of the MLE-only branch (default: 120)")
    p.add_argument("--reward", default="sequence", choices=["sequence", "rollout"],
                   help="sequence: D(sample) with a leave-one-out baseline; rollout: Monte Carlo per-token rewards")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any GanConfig field, e.g. --set g_lr=5e-5 --set mle_every=0 (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("info", help="describe a model")
    p.add_argument("model_name", metavar="MODEL")
    p.add_argument("--dtype", default="float32", choices=sorted([*featherlm.DTYPES, *featherlm.QUANTIZED]),
                   help="load the weights as (default: %(default)s); q4 also reports the 4-bit layers and bytes")
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.verb not in ("finetune", "pretrain"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra  # finetune, pretrain: dotted config overrides such as --train.lr 5e-4
    try:
        return VERBS[args.verb](args)
    except FeatherError as e:
        message = " ".join(str(e).splitlines())  # one line, even when a wrapped library message has several
        print(f"featherlm {args.verb}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
