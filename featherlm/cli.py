"""`featherlm <verb>`: a thin layer over the Python API.

Every verb accepts ``--json``: the last stdout line is then one JSON object with the verb's result.
User mistakes (``FeatherError``) print one line on stderr and exit 2, without a stack trace.
"""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--dtype", default="bfloat16", choices=sorted(featherlm.DTYPES),
                   help="weight dtype (default: %(default)s; float32 for reference numerics)")


def load_lm(args: argparse.Namespace) -> featherlm.LoadedModel:
    """The model to generate with: ``--model``, or with ``--adapter`` a fine-tuning run's model with its
    adapter merged in where the method allows (a plain model decodes fastest)."""
    if not args.adapter:
        return featherlm.load(args.model or DEFAULT_MODEL, dtype=args.dtype)
    from featherlm.peft import merge
    from featherlm.train import load_run

    model, tokenizer, config = load_run(args.adapter)
    if config.model.task == "classification":
        raise featherlm.ConfigError(f"{args.adapter}: a classification run cannot generate text")
    check_run(args.adapter, config, model=args.model)
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
    info = featherlm.load(args.model_name).info()
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


@verb("evaluate")
def cmd_evaluate(args: argparse.Namespace) -> int:
    from featherlm.evaluate import evaluate
    from featherlm.train import load_config

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
        elif isinstance(value, float):
            print(f"{key:<10} {value:.4f}")
        else:
            print(f"{key:<10} {value}")
    return 0


@verb("merge")
def cmd_merge(args: argparse.Namespace) -> int:
    from featherlm.checkpoint import export_hf, save_model
    from featherlm.peft import merge
    from featherlm.train import load_run

    model, tokenizer, config = load_run(args.adapter, args.checkpoint)
    check_run(args.adapter, config, model=args.model)
    if config.model.task == "classification":
        raise featherlm.ConfigError(f"{args.adapter}: merging is for language-model runs (sft, lm); this run "
                                    "trained a classifier, use it with `featherlm evaluate`")
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
    p.add_argument("--task", help="model.task: classification, sft or lm")
    p.add_argument("--data", help="data.train")
    p.add_argument("--eval-data", dest="eval_data", help="data.eval")
    p.add_argument("--method", help="peft.method: lora, dora, ia3, adapter, prefix, prompt, bitfit, freeze, full")
    p.add_argument("--out", help="out.dir (the run directory)")
    p.add_argument("--resume", action="store_true", help="continue the run in out.dir from its last checkpoint")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("evaluate", help="score a fine-tuning run on a data file")
    p.add_argument("--adapter", required=True, help="the run directory written by `featherlm finetune`")
    p.add_argument("--model", help="base model (checked against the run)")
    p.add_argument("--task", help="task (checked against the run)")
    p.add_argument("--data", help="data file (default: the run's eval data)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--skip-bad-rows", action="store_true")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("merge", help="fold a run's adapter into its base model and save the result")
    p.add_argument("--adapter", required=True, help="the run directory written by `featherlm finetune`")
    p.add_argument("--model", help="base model (checked against the run)")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--hf", action="store_true", help="write a Hugging Face folder (transformers loads it)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("info", help="describe a model")
    p.add_argument("model_name", metavar="MODEL")
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.verb != "finetune":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra  # finetune: dotted config overrides such as --train.lr 5e-4
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
