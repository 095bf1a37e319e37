"""Prefill and decode tokens/s of featherlm against Hugging Face transformers, same weights, same run.

Both sides run SmolLM2-135M-Instruct (dequantised from the embedded GGUF; transformers gets the same
weights through featherlm's HF export), batch 1, greedy, with end-of-sequence disabled so every run
makes exactly ``--new-tokens`` tokens. Each side is timed the same way from outside:
prefill = time to the first new token, decode = (time for N tokens - time for 1 token) / (N - 1).
The median of ``--repeats`` runs is reported, and featherlm / transformers as a ratio.

``q4`` runs featherlm on the GGUF's own 4-bit blocks (``featherlm.load(..., dtype="q4")``) against
transformers in bf16 on the same stored weights dequantised (transformers has no 4-bit CPU path for
them), and reports the bytes of weights each side holds.

    .venv/bin/python bench/decode.py [--new-tokens 64] [--prompt-tokens 128] [--dtypes float32,bfloat16,q4]
        [--repeats 3] [--threads N] [--json]
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
from featherlm.model.quant import weight_bytes

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
    p.add_argument("--dtypes", default="float32,bfloat16,q4")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    lm = featherlm.load(args.model)
    ids = (lm.tokenizer.encode(TEXT * 4))[: args.prompt_tokens]
    rows = []
    theirs_by_dtype: dict[str, tuple[dict, int]] = {}  # transformers bf16 is measured once for bf16 and q4
    with tempfile.TemporaryDirectory() as folder:
        export_hf(lm.model, lm.tokenizer, folder)
        for name in args.dtypes.split(","):
            their_dtype = "bfloat16" if name == "q4" else name
            if name == "q4":
                ours = featherlm.load(args.model, dtype="q4").model
            else:
                ours = lm.model.to(featherlm.DTYPES[name])
            f = measure(time_featherlm, ours, ids, args.new_tokens, args.repeats)
            if their_dtype not in theirs_by_dtype:
                theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=featherlm.DTYPES[their_dtype]).eval()
                t = measure(time_transformers, theirs, ids, args.new_tokens, args.repeats)
                theirs_by_dtype[their_dtype] = (t, weight_bytes(theirs))
                del theirs
            t, their_bytes = theirs_by_dtype[their_dtype]
            rows.append({
                "dtype": name, "transformers_dtype": their_dtype, "featherlm": f, "transformers": t,
                "decode_ratio": f["decode_tokens_per_s"] / t["decode_tokens_per_s"],
                "prefill_ratio": f["prefill_tokens_per_s"] / t["prefill_tokens_per_s"],
                "featherlm_weight_bytes": weight_bytes(ours), "transformers_weight_bytes": their_bytes,
            })
    import transformers

    meta = {"model": args.model, "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "batch": 1,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__}
    print(f"{args.model}, batch 1, prompt {len(ids)} tokens, {args.new_tokens} new tokens, "
          f"{meta['threads']} threads, median of {args.repeats}")
    print(f"{'dtype':<10}{'side':<24}{'prefill tok/s':>15}{'decode tok/s':>14}{'weights MB':>12}")
    for r in rows:
        for side in ("featherlm", "transformers"):
            label = f"{side} ({r['transformers_dtype']})" if side == "transformers" and r["dtype"] == "q4" else side
            print(f"{r['dtype']:<10}{label:<24}{r[side]['prefill_tokens_per_s']:>15.1f}"
                  f"{r[side]['decode_tokens_per_s']:>14.2f}{r[side + '_weight_bytes'] / 1e6:>12.1f}")
        print(f"{r['dtype']:<10}{'ratio':<24}{r['prefill_ratio']:>14.2f}x{r['decode_ratio']:>13.2f}x")
    by_dtype = {r["dtype"]: r for r in rows}
    if {"bfloat16", "q4"} <= set(by_dtype):
        ratio = (by_dtype["q4"]["featherlm"]["decode_tokens_per_s"]
                 / by_dtype["bfloat16"]["featherlm"]["decode_tokens_per_s"])
        meta["q4_vs_bfloat16_decode_ratio"] = ratio
        print(f"featherlm q4 / featherlm bfloat16: decode {ratio:.2f}x")
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
