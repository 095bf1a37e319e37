"""The main job on the embedded defaults, end to end:

1. chat: load SmolLM2-135M-Instruct, answer two prompts with streamed output, print tokens/s;
2. fine-tune: MiniLM-L6 + LoRA on a sample of SST-2 sentiment for a couple of minutes, print dev
   accuracy before and after, then classify two new sentences with the result.

Run with ``make demo`` (sets up .venv first) or ``.venv/bin/python examples/demo.py`` from the
project root. SST-2 is read from ../shared/data (FEATHERLM_DATA overrides the folder).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import featherlm
from featherlm.evaluate import classify, evaluate_classifier
from featherlm.generate import GenerationConfig, stream
from featherlm.train import finetune, load_config, load_run
from featherlm.train.run import build_for_run

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FEATHERLM_DATA", ROOT.parent / "shared" / "data"))
PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about autumn leaves.",
]
REVIEWS = [
    "A gorgeous, witty and moving film that stays with you for days.",
    "The plot is a tired mess and the acting is even worse.",
]


def chat() -> None:
    start = time.perf_counter()
    lm = featherlm.load("smollm2-135m-instruct", dtype="bfloat16")
    info = lm.info()
    print(f"loaded {info['name']} ({info['family']}, {info['parameters'] / 1e6:.0f}M parameters, "
          f"{info['stored_as']} file, running in {info['dtype']}) in {time.perf_counter() - start:.1f}s")
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


def sentiment() -> None:
    sst2 = DATA / "sentiment" / "sst2"
    config = load_config(ROOT / "examples" / "sst2-lora.yaml", overrides=[
        "--data.train", str(sst2 / "train.tsv"), "--data.eval", str(sst2 / "dev.tsv"),
        "--data.max_train_examples", "8000",  # ~1.5 minutes on 2 CPU cores; the full recipe uses 48,000
        "--model.labels", "['0', '1']",  # fixed up front so the untrained model can be scored
        "--train.eval_every", "0", "--out.dir", str(ROOT / "runs" / "demo-sst2"), "--out.overwrite", "true",
    ])
    print(f"\nfine-tuning {config.model.name} with {config.peft.method} (r={config.peft.r}) on "
          f"{config.data.max_train_examples} SST-2 sentences; dev set: {sst2 / 'dev.tsv'}")
    model, tokenizer = build_for_run(config)
    before = evaluate_classifier(model, tokenizer, config.data.eval, max_seq_len=config.train.max_seq_len,
                                 text_column=config.data.text_column, label_column=config.data.label_column)
    del model
    result = finetune(config)
    after = result["eval"]
    print(f"dev accuracy before {before['accuracy']:.3f} -> after {after['accuracy']:.3f} "
          f"(macro F1 {after['f1']:.3f}, {after['n']} sentences); trained {result['trainable_params']:,} of "
          f"{result['total_params']:,} parameters in {result['time_s']:.0f}s; run: {result['run_dir']}")
    model, tokenizer, _ = load_run(result["run_dir"])
    names = {"0": "negative", "1": "positive"}
    for text, p in zip(REVIEWS, classify(model, tokenizer, REVIEWS), strict=True):
        print(f"  {names.get(p['label'], p['label'])} ({p['score']:.2f})  {text}")


if __name__ == "__main__":
    chat()
    sentiment()
