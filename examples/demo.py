"""The main job on the embedded defaults: load SmolLM2-135M-Instruct, answer two chat prompts with
streamed output, and print prefill/decode tokens per second.

Run with ``make demo`` (sets up .venv first) or ``.venv/bin/python examples/demo.py``.
"""

from __future__ import annotations

import time

import featherlm
from featherlm.generate import GenerationConfig, stream

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about autumn leaves.",
]


def main() -> None:
    start = time.perf_counter()
    lm = featherlm.load("smollm2-135m-instruct", dtype="bfloat16")
    info = lm.info()
    print(f"loaded {info['name']} ({info['family']}, {info['parameters'] / 1e6:.0f}M parameters, "
          f"{info['dtype']}) in {time.perf_counter() - start:.1f}s")
    cfg = GenerationConfig(max_new_tokens=96, repetition_penalty=1.1)
    for question in PROMPTS:
        print(f"\nuser> {question}\nassistant> ", end="", flush=True)
        prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": question}])
        done = []
        for piece in stream(lm.model, lm.tokenizer, prompt, cfg, on_done=done.append):
            print(piece, end="", flush=True)
        t = done[0].timing
        print(f"\n[{t.prompt_tokens} prompt tokens, prefill {t.prefill_tokens_per_s:.0f} tok/s; "
              f"{t.new_tokens} new tokens, decode {t.decode_tokens_per_s:.1f} tok/s]")


if __name__ == "__main__":
    main()
