"""`featherlm <verb>`: a thin layer over the Python API.

Every verb accepts ``--json``: the last stdout line is then one JSON object with the verb's result.
User mistakes (``FeatherError``) print one line on stderr and exit 2, without a stack trace.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import featherlm
from featherlm.errors import FeatherError
from featherlm.generate import GenerationConfig, generate, stream

VERBS: dict[str, Callable[[argparse.Namespace], int]] = {}


def verb(name: str):
    def register(fn):
        VERBS[name] = fn
        return fn
    return register


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="embedded name, HF/featherlm folder, .gguf file or hub id (default: %(default)s)")
    # bf16 weights halve the bytes read per generated token (decoding is memory-bound): about 1.8x the
    # float32 decode speed on a 2-core CPU. float32 is the reference numerics (parity tests).
    p.add_argument("--dtype", default="bfloat16", choices=sorted(featherlm.DTYPES),
                   help="weight dtype (default: %(default)s; float32 for reference numerics)")


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


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, num_beams=args.beams, stop=args.stop,
        seed=args.seed,
    )
    cfg.check()
    return cfg


def emit_json(obj: dict) -> None:
    print(json.dumps(obj, ensure_ascii=False))


@verb("generate")
def cmd_generate(args: argparse.Namespace) -> int:
    cfg = generation_config(args)
    lm = featherlm.load(args.model, dtype=args.dtype)
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
    lm = featherlm.load(args.model, dtype=args.dtype)
    lm.require_decoder()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"featherlm chat with {args.model}. /reset clears the history, /exit quits.")
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

    p = sub.add_parser("info", help="describe a model")
    p.add_argument("model_name", metavar="MODEL")
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
