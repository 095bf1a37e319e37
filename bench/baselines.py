"""Classic language-model baselines on Tiny Shakespeare, character level, with equal time budgets.

5-gram Kneser-Ney, RNN, GRU and LSTM (2 layers, width 256, tied embeddings, dropout 0.1, truncated
BPTT over 32 characters, batch 32, AdamW 5e-3 with cosine decay to 10% over the budget; these won
a 60-CPU-second LSTM sweep over lr 2e-3..1e-2, BPTT 32..128 and batch 16..64) on nanoGPT's split of
``../shared/data/corpus/tinyshakespeare/input.txt``: the first 90% of the characters for training,
the last 10% for validation. Each network trains for ``--budget`` seconds, then is scored on the
whole validation text as one stream (state carried: each character predicted from all the text
before it); the n-gram model is fitted in one pass (its time is reported, the budget does not
apply) and scores every character from the 4 before it. The figure is validation bits per
character (mean negative log2-likelihood).

``--clock cpu`` (default) counts the budget in CPU seconds of this process with one torch thread:
the machine is shared, and CPU seconds stay the same compute while other jobs come and go; wall
time is reported beside it. ``--clock wall --threads 2`` is the plain wall-clock comparison.

``--transformer``: also the GPT recipe ``examples/shakespeare-char.yaml`` through
``featherlm.train.pretrain`` for the same budget on the same clock (``train.clock``; its cosine
schedule runs over that budget), reported with its own validation estimate and rescored on the
whole validation text in windows of its context every half context, each character scored once with
at least half a context before it (``featherlm.train.baseline.evaluate_windows``; the score in
consecutive windows, where a window's first characters see almost nothing, is reported beside it).

    .venv/bin/python bench/baselines.py [--budget 300] [--kinds ngram,rnn,gru,lstm] [--clock cpu]
        [--threads 1] [--transformer] [--json] [--save result.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("FEATHERLM_DATA", ROOT.parent / "shared" / "data")) / "corpus/tinyshakespeare/input.txt"
RECIPE = ROOT / "examples" / "shakespeare-char.yaml"


def run_baselines(kinds: list[str], budget: float, clock: str, seed: int) -> list[dict]:
    from featherlm.train.baseline import encode_text, read_text, split_ids, train_lm_baseline

    ids, vocab_size, _, _ = encode_text(read_text(DATA), "char")
    train_ids, val_ids = split_ids(ids, 0.1)
    print(f"Tiny Shakespeare: {len(train_ids):,} training / {len(val_ids):,} validation characters, "
          f"vocabulary {vocab_size}", file=sys.stderr)
    rows = []
    for kind in kinds:
        wall = time.perf_counter()
        result = train_lm_baseline(kind, train_ids, val_ids, vocab_size, time_budget_s=budget, d_model=256,
                                   n_layer=2, dropout=0.1, seq_len=32, batch_size=32, lr=5e-3, order=5, seed=seed,
                                   clock=clock, progress=sys.stderr.isatty())
        result.pop("model")
        result.pop("history", None)
        result["wall_s"] = round(time.perf_counter() - wall, 1)
        rows.append(result)
        print(f"{kind:>6}: {result['val_bits_per_token']:.4f} bits/char  ({result['params']:,} "
              f"{'n-grams' if kind == 'ngram' else 'params'}, {result.get('steps', '-')} steps, "
              f"{result['time_s']:.0f} {clock}-s, wall {result['wall_s']:.0f} s)", file=sys.stderr)
    return rows


def run_transformer(budget: float, clock: str, threads: int, seed: int) -> dict | None:
    """The GPT recipe for the same budget, when the pretraining module and recipe exist."""
    if importlib.util.find_spec("featherlm.train.pretrain") is None or not RECIPE.is_file():
        print(f"transformer skipped: featherlm.train.pretrain or {RECIPE.name} is missing", file=sys.stderr)
        return None
    import featherlm
    from featherlm.train.baseline import evaluate_windows
    from featherlm.train.pretrain import pretrain

    cpu, wall = time.process_time(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        summary = pretrain(RECIPE, overrides={"train.time_budget_s": budget, "train.clock": clock,
                                              "train.threads": threads, "train.eval_every": 0,
                                              "train.sample_every": 0,  # the budget trains, as the baselines'
                                              "train.seed": seed, "data.train": str(DATA), "out.dir": tmp,
                                              "out.overwrite": True}, progress=sys.stderr.isatty())
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        lm = featherlm.load(Path(tmp) / "model")
        text = DATA.read_text(encoding="utf-8")
        val = torch.tensor(lm.tokenizer.encode(text[int(len(text) * 0.9):], add_special_tokens=False))
        block = lm.model.config.max_seq_len
        full = evaluate_windows(lm.model, val, block=block)["nll"]  # stride block / 2
        consecutive = evaluate_windows(lm.model, val, block=block, stride=block)["nll"]
    return {"kind": "gpt", "params": summary["params"], "steps": summary["steps"], "tokens_seen": summary["tokens"],
            "time_s": summary["elapsed_s"], "run_cpu_s": round(cpu, 1), "run_wall_s": round(wall, 1),
            "recipe_val_bits_per_token": summary["val_bits_per_token"], "val_loss": full,
            "val_bits_per_token": full / math.log(2), "consecutive_val_bits_per_token": consecutive / math.log(2),
            "context": block}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds per network (default: 300)")
    parser.add_argument("--kinds", default="ngram,rnn,gru,lstm")
    parser.add_argument("--clock", default="cpu", choices=["cpu", "wall"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transformer", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", type=Path, help="also write the JSON result to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M")
    load = os.getloadavg()
    rows = run_baselines(args.kinds.split(","), args.budget, args.clock, args.seed)
    if args.transformer:
        gpt = run_transformer(args.budget, args.clock, args.threads, args.seed)
        if gpt:
            rows.append(gpt)
    end_load = os.getloadavg()
    result = {"budget": args.budget, "clock": args.clock, "threads": args.threads, "started": started,
              "load_before": load, "load_after": end_load, "rows": rows}
    if args.save:
        args.save.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
        return
    print(f"\nbudget {args.budget:.0f} {args.clock}-seconds per network, {args.threads} thread(s); started {started}; "
          f"load average before {load[0]:.2f}, after {end_load[0]:.2f}\n")
    print("| model | parameters | steps | characters seen | training time | val bits/char | val perplexity |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        size = f"{r['params']:,} n-grams" if r["kind"] == "ngram" else f"{r['params']:,}"
        seen = f"{r['tokens_seen']:,}" if "tokens_seen" in r else f"{r.get('train_tokens', 0):,}"
        name = {"ngram": f"{r.get('order', 5)}-gram Kneser-Ney", "rnn": "RNN (tanh)", "gru": "GRU", "lstm": "LSTM",
                "gpt": "GPT (examples/shakespeare-char.yaml)"}[r["kind"]]
        print(f"| {name} | {size} | {r.get('steps', '-')} | {seen} | {r['time_s']:.0f} s "
              f"| **{r['val_bits_per_token']:.3f}** | {math.exp(r['val_loss']):.2f} |")
    for r in rows:
        if r["kind"] == "gpt":
            half = r["context"] // 2
            print(f"\nGPT: whole validation text in windows of {r['context']} characters every {half}, each "
                  f"scored once with at least {half} before it; in consecutive windows (nanoGPT's way) "
                  f"{r['consecutive_val_bits_per_token']:.3f} bits/char; the recipe's own estimate (random windows) "
                  f"{r['recipe_val_bits_per_token']:.3f} (the whole run: {r['run_wall_s']:.0f} wall-s, "
                  f"{r['run_cpu_s']:.0f} CPU-s).")


if __name__ == "__main__":
    main()
