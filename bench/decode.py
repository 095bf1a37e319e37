"""Prefill and decode tokens/s of featherlm against Hugging Face transformers, same weights, same run.

Both sides run SmolLM2-135M-Instruct (dequantised from the embedded GGUF; transformers gets the same
weights through featherlm's HF export), batch 1, greedy, with end-of-sequence disabled so every run
makes exactly ``--new-tokens`` tokens. Each side is timed the same way from outside:
prefill = time to the first new token, decode = (time for N tokens - time for 1 token) / (N - 1).
The median of ``--repeats`` runs is reported, and featherlm / transformers as a ratio.

    .venv/bin/python bench/decode.py [--new-tokens 64] [--prompt-tokens 128] [--dtypes float32,bfloat16] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

import featherlm
from featherlm.checkpoint import export_hf
from featherlm.generate import GenerationConfig, generate_ids

TEXT = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
    "France. They were descended from Norse raiders and pirates from Denmark, Iceland and Norway who, under "
    "their leader Rollo, agreed to swear fealty to King Charles III of West Francia. Through generations of "
    "assimilation and mixing with the native Frankish and Roman-Gaulish populations, their descendants would "
    "gradually merge with the Carolingian-based cultures of West Francia. The distinct cultural and ethnic "
    "identity of the Normans emerged initially in the first half of the 10th century, and it continued to "
    "evolve over the succeeding centuries. "
)


def time_featherlm(model, ids: list[int], n: int) -> float:
    start = time.perf_counter()
    out = generate_ids(model, [ids], GenerationConfig(max_new_tokens=n), eos_ids=set())
    assert len(out[0]) == n
    return time.perf_counter() - start


@torch.inference_mode()
def time_transformers(model, ids: list[int], n: int) -> float:
    x = torch.tensor([ids])
    start = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0, eos_token_id=None)
    assert out.shape[1] == len(ids) + n
    return time.perf_counter() - start


def measure(fn, model, ids: list[int], n: int, repeats: int) -> dict:
    fn(model, ids, 4)  # warm-up: allocator, kernels, lazy init
    first = statistics.median(fn(model, ids, 1) for _ in range(repeats))
    full = statistics.median(fn(model, ids, n) for _ in range(repeats))
    return {"prefill_tokens_per_s": len(ids) / first, "decode_tokens_per_s": (n - 1) / max(full - first, 1e-9)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM

    lm = featherlm.load(args.model)
    ids = (lm.tokenizer.encode(TEXT * 4))[: args.prompt_tokens]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        export_hf(lm.model, lm.tokenizer, folder)
        for name in args.dtypes.split(","):
            dtype = featherlm.DTYPES[name]
            ours = lm.model.to(dtype)
            theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
            f = measure(time_featherlm, ours, ids, args.new_tokens, args.repeats)
            t = measure(time_transformers, theirs, ids, args.new_tokens, args.repeats)
            rows.append({
                "dtype": name, "featherlm": f, "transformers": t,
                "decode_ratio": f["decode_tokens_per_s"] / t["decode_tokens_per_s"],
                "prefill_ratio": f["prefill_tokens_per_s"] / t["prefill_tokens_per_s"],
            })
            del theirs
    import transformers

    meta = {"model": args.model, "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "batch": 1,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__}
    print(f"{args.model}, batch 1, prompt {len(ids)} tokens, {args.new_tokens} new tokens, "
          f"{meta['threads']} threads, median of {args.repeats}")
    print(f"{'dtype':<10}{'side':<14}{'prefill tok/s':>15}{'decode tok/s':>14}")
    for r in rows:
        for side in ("featherlm", "transformers"):
            print(f"{r['dtype']:<10}{side:<14}{r[side]['prefill_tokens_per_s']:>15.1f}"
                  f"{r[side]['decode_tokens_per_s']:>14.2f}")
        print(f"{r['dtype']:<10}{'ratio':<14}{r['prefill_ratio']:>14.2f}x{r['decode_ratio']:>13.2f}x")
    by_dtype = {r["dtype"]: r for r in rows}
    if {"float32", "bfloat16"} <= set(by_dtype):  # each side's default: featherlm's CLI bf16, HF's fp32
        ratio = (by_dtype["bfloat16"]["featherlm"]["decode_tokens_per_s"]
                 / by_dtype["float32"]["transformers"]["decode_tokens_per_s"])
        meta["defaults_decode_ratio"] = ratio
        print(f"defaults (featherlm bfloat16 / transformers float32): decode {ratio:.2f}x")
    if args.json:
        print(json.dumps({**meta, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
